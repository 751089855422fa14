"""Catch-up after an outage: walpipe stopped while the source writes ~100 MB of WAL, then started
again.  The log reports how far behind it is, the net rate and the time left every 10 s and says
when it has caught up; `walpipe status` and /metrics show the same.

The catch-up is throttled deterministically: the test holds staging's raw_events locked (EXCLUSIVE:
reads go on, the stager's inserts wait) and lets it go one staging transaction at a time, so every
window the test asserts on is held open by the lock, not by luck."""

import json
import re
import subprocess
import urllib.request

import wptest
from test_core import wait_caught_up
from wptest import wait_until

MB = 1024 * 1024
BACKLOG = 96 * MB  # > 64 MB: enough to count as catching up
CATCHING = re.compile(r'source "app": catching up: ([0-9.]+) MB of WAL \(([0-9?]+) s by commit time\) behind '
                      r'the source(?:, (-?[0-9.]+) MB/s net \(staging (-?[0-9.]+) MB/s, the source writing '
                      r'(-?[0-9.]+) MB/s\), ([^;\n]*))?')
CAUGHT = re.compile(r'source "app": caught up after ([0-9]+) s, ([0-9.]+) MB of WAL staged')


def catching_lines(w):
    return [m for m in CATCHING.finditer(w.log(since_start=True))]


def status_json(w):
    r = subprocess.run([str(w.binary), "status", "--config", str(w.config_path), "--json"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)["sources"][0]


def json_docs(path):
    """The complete JSON documents `status --json --watch` has written to path so far."""
    text, docs, dec, i = path.read_text(), [], json.JSONDecoder(), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            doc, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return docs
        docs.append(doc)


def metric(port, name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    m = re.search(r'^' + re.escape(name) + r'\{source="app"\} (\S+)$', body, re.M)
    return float(m.group(1)) if m else None


def checkpoint(staging_pg):
    return staging_pg.scalar("SELECT lsn::text FROM walpipe.checkpoints WHERE source = 'app'", dbname="staging")


class RawEventsLock:
    """Holds walpipe.raw_events locked EXCLUSIVE in a transaction of its own."""

    def __init__(self, staging_pg):
        self.conn = staging_pg.connect("staging", autocommit=False)

    def take(self):
        with self.conn.cursor() as cur:  # waits for the stager's transaction in flight
            cur.execute("LOCK TABLE walpipe.raw_events IN EXCLUSIVE MODE")

    def release(self):
        self.conn.commit()


def start_streaming(source_pg, staging_pg, walpipe_factory):
    """walpipe streaming table big (empty) to staging, no workers, /metrics on a port of its own."""
    source_pg.createdb("app")
    # autovacuum off: the source writes nothing but the backlog, so behind only shrinks
    source_pg.sql("CREATE TABLE big (id int PRIMARY KEY, pad text) WITH (autovacuum_enabled = false)", dbname="app")
    staging_pg.createdb("staging")
    port = wptest.free_port()
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}},
                        staging_extra={"batch_rows": 2000})
    with open(w.config_path, "a") as f:
        f.write(f"\n[workers]\ncount = 0\n\n[metrics]\nlisten = {port}\n")
    assert w.init().returncode == 0
    w.start()
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming", walpipe=w)
    source_pg.sql("INSERT INTO big VALUES (0, 'x')", dbname="app")
    wait_caught_up(source_pg, w)
    assert status_json(w)["catchup"]["state"] == "streaming"
    return w, port


def write_backlog(source_pg, since_lsn, start):
    """Inserts rows of 960 bytes (under the TOAST threshold: stored as they are) from id start on, in
    transactions of 2000, until the source wrote BACKLOG bytes of WAL past since_lsn; the next id."""
    n = start
    while source_pg.scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (since_lsn,),
                           dbname="app") < BACKLOG:
        source_pg.sql("INSERT INTO big SELECT g, repeat(md5(g::text), 30) FROM generate_series(%s, %s) g",
                      (n, n + 1999), dbname="app")
        n += 2000
    return n


def test_catchup_after_outage(source_pg, staging_pg, walpipe_factory, tmp_path):
    w, port = start_streaming(source_pg, staging_pg, walpipe_factory)

    # the outage: walpipe stopped while the source writes ~100 MB of WAL
    assert w.stop() == 0
    assert status_json(w)["catchup"]["state"] == "inactive"
    confirmed = source_pg.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots", dbname="app")
    rows = write_backlog(source_pg, confirmed, 1) - 1
    down = status_json(w)["catchup"]
    assert down["state"] == "inactive" and down["behind_bytes"] >= BACKLOG

    lock = RawEventsLock(staging_pg)
    lock.take()
    watch = None
    try:
        w.start()
        # nothing can be staged: catching up, behind by the whole backlog, no progress, so no time left
        first = wait_until(lambda: catching_lines(w), what="the first catching-up line", walpipe=w)[0]
        assert float(first.group(1)) * MB >= BACKLOG - 0.1 * MB, first.group(0)
        s = wait_until(lambda: (lambda c: c if c["state"] == "catching_up" else None)(status_json(w)["catchup"]),
                       what="status: catching_up", walpipe=w)
        assert s["behind_bytes"] >= BACKLOG
        assert s["behind_seconds"] > 0
        assert s["rate_bytes_per_second"] is not None and s["rate_bytes_per_second"] <= 0
        assert s["rate_seconds"] >= 1
        assert s["eta_seconds"] is None
        table = subprocess.run([str(w.binary), "status", "--config", str(w.config_path)], capture_output=True,
                               text=True, timeout=60, stdin=subprocess.DEVNULL).stdout
        row = next(ln.split() for ln in table.splitlines() if ln.startswith("app "))
        assert row[-1] == "catching_up", table
        # no progress and no time left; the idle source may still write a few bytes of WAL of its own
        # (the bgwriter's running-xacts record every 15 s, autovacuum: seen as "27 B/s net further behind")
        assert re.search(r"^ +catching up: [0-9.]+ MB \([0-9]+ s\) behind the source, "
                         r"(0 B/s net|[0-9.]+ [KMG]?B/s net further behind)$", table, re.M), table
        assert metric(port, "walpipe_source_catching_up") == 1
        assert metric(port, "walpipe_source_behind_bytes") >= BACKLOG

        watch_out = tmp_path / "watch.json"
        with open(watch_out, "w") as out:
            watch = subprocess.Popen([str(w.binary), "status", "--config", str(w.config_path), "--json",
                                      "--watch", "1"], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        # let staging go a few transactions at a time, then hold it again: a report after that step is
        # behind by less than the one before (one may come between the release and the stager's commit:
        # it shows no progress yet), and its rate since the report before is positive, with a time left
        reports = [first]
        for _ in range(2):
            prev = reports[-1]
            before = len(catching_lines(w))
            cp = checkpoint(staging_pg)
            lock.release()
            wait_until(lambda: checkpoint(staging_pg) != cp, what="a staging commit", walpipe=w)
            lock.take()
            line = wait_until(lambda: next((m for m in catching_lines(w)[before:]
                                            if float(m.group(1)) < float(prev.group(1))), None),
                              timeout=60, what="a catching-up report behind by less", walpipe=w)
            reports.append(line)
            assert line.group(3) is not None and float(line.group(3)) > 0, line.group(0)
            assert float(line.group(4)) > 0, line.group(0)
            assert re.fullmatch(r"about [0-9]+ s left", line.group(6)), line.group(0)
        # status --watch saw the same: catching up, a positive net rate, a time left
        doc = wait_until(lambda: [d for d in json_docs(watch_out)
                                  if d["sources"][0]["catchup"]["state"] == "catching_up"
                                  and (d["sources"][0]["catchup"]["rate_bytes_per_second"] or 0) > 0
                                  and (d["sources"][0]["catchup"]["eta_seconds"] or 0) > 0],
                         what="status --watch: a rate and a time left", walpipe=w)[0]["sources"][0]["catchup"]
        assert doc["behind_bytes"] > 0 and doc["staged_bytes_per_second"] > 0
    finally:
        lock.release()
        if watch is not None:
            watch.terminate()
            watch.wait(30)

    caught = wait_until(lambda: CAUGHT.search(w.log(since_start=True)), timeout=180, what="caught up", walpipe=w)
    # it staged at least the backlog minus what is left when it counts as caught up (16 MB)
    assert float(caught.group(2)) * MB >= float(first.group(1)) * MB - 16 * MB - 0.1 * MB, caught.group(0)
    s = status_json(w)["catchup"]
    assert s["state"] == "streaming" and s["behind_bytes"] < 16 * MB and s["eta_seconds"] == 0
    assert s["behind_seconds"] == 0
    wait_until(lambda: metric(port, "walpipe_source_catching_up") == 0, what="metric: caught up", walpipe=w)
    wait_caught_up(source_pg, w)
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name = 'big' "
                             "AND event_type = 'insert'", dbname="staging") == rows + 1
    assert w.stop() == 0


def test_catchup_after_staging_outage(source_pg, staging_pg, walpipe_factory):
    """Staging down while the source writes: walpipe keeps running, its lag guard (which reads the
    slot's confirmed_flush_lsn when it cannot read the checkpoint) reports catching up, and once
    staging is back walpipe stages the backlog and says it caught up."""
    w, port = start_streaming(source_pg, staging_pg, walpipe_factory)
    staging_pg.stop()
    confirmed = source_pg.scalar("SELECT confirmed_flush_lsn::text FROM pg_replication_slots", dbname="app")
    rows = write_backlog(source_pg, confirmed, 1) - 1
    first = wait_until(lambda: catching_lines(w), what="a catching-up line while staging is down", walpipe=w)[0]
    assert float(first.group(1)) * MB >= 64 * MB, first.group(0)
    assert metric(port, "walpipe_source_catching_up") == 1
    # status: staging unreachable (exit 1), but how far behind the slot is comes from the source
    r = subprocess.run([str(w.binary), "status", "--config", str(w.config_path), "--json"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["staging"]["reachable"] is False
    c = doc["sources"][0]["catchup"]
    assert c["state"] in ("catching_up", "inactive") and c["behind_bytes"] >= BACKLOG, c

    staging_pg.start()
    caught = wait_until(lambda: CAUGHT.search(w.log(since_start=True)), timeout=180, what="caught up", walpipe=w)
    assert float(caught.group(2)) * MB >= float(first.group(1)) * MB - 16 * MB - 0.1 * MB, caught.group(0)
    assert status_json(w)["catchup"]["state"] == "streaming"
    wait_caught_up(source_pg, w)
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name = 'big' "
                             "AND event_type = 'insert'", dbname="staging") == rows + 1
    assert w.stop() == 0
