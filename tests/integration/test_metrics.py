"""Prometheus metrics: a real Prometheus scrapes `walpipe run` every second and its query API
shows the counts the workload made; `promtool check metrics` accepts a scrape; the lag guard warns
(log and metric) while staging is stopped under writes and clears after."""

import json
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request

import pytest

import wptest
from test_core import setup_source, wait_caught_up
from wptest import wait_until

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE nokey (a int, b text);
"""


def start(walpipe_factory, staging_pg, source_pg, metrics_port, source_extra=None, workers_extra=None):
    w = walpipe_factory("[placeholder]\n")
    src = {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}
    src.update(source_extra or {})
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"), {"app": src})
    workers = {"count": 1}
    workers.update(workers_extra or {})
    with open(w.config_path, "a") as f:
        f.write("\n[workers]\n" + "".join(f"{k} = {v}\n" for k, v in workers.items()))
        f.write(f"\n[metrics]\nlisten = {metrics_port}\n")  # a bare port: 127.0.0.1
    staging_pg.createdb("staging")
    assert w.init().returncode == 0
    w.start()
    return w


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def sample(text, name, **labels):
    """The value of the series name{labels} in an exposition, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


class Prometheus:
    """A real Prometheus server scraping walpipe every second, with its own storage."""

    def __init__(self, workdir, target_port):
        self.port = wptest.free_port()
        (workdir / "prom").mkdir(parents=True, exist_ok=True)
        cfg = workdir / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                       "scrape_configs:\n  - job_name: walpipe\n    static_configs:\n"
                       f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'prom'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def query(self, expr):
        """Instant query; the single result's value as a float, or None when empty."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        res = body["data"]["result"]
        assert len(res) <= 1, res
        return float(res[0]["value"][1]) if res else None

    def wait_value(self, expr, want, walpipe, timeout=90):
        last = []

        def check():
            last.append(self.query(expr))
            return last[-1] == want
        wait_until(check, timeout=timeout, interval=0.2, what=f"Prometheus: {expr} == {want} (last: {last[-1:]})",
                   walpipe=walpipe, ignore=(OSError,))

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.skip("Debian's prometheus package is not installed (scripts/setup installs it)")
    made = []

    def make(target_port):
        p = Prometheus(tmp_path / f"prometheus{len(made)}", target_port)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def test_prometheus_sees_the_workload(source_pg, staging_pg, walpipe_factory, prometheus):
    setup_source(source_pg, schema=SCHEMA)
    port = wptest.free_port()
    # a failed apply waits an hour before its retry: it stays "waiting"
    w = start(walpipe_factory, staging_pg, source_pg, port,
              workers_extra={"retry_backoff_ms": 3600000, "max_attempts": 5})
    prom = prometheus(port)
    prom.wait_value('up{job="walpipe"}', 1.0, w)
    prom.wait_value('walpipe_build_info', 1.0, w)
    text = scrape(port)
    assert sample(text, "walpipe_events_staged_total", source="app", type="insert") == 0

    # the workload: 300 inserts in one transaction, 40 updates, 15 deletes; 3 inserts into a
    # keyless table (parked dead letters at once); then 1 insert the mirror rejects (waiting)
    source_pg.sql("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 300) g", dbname="app")
    source_pg.sql("UPDATE t SET v = 'u' WHERE id <= 40", dbname="app")
    source_pg.sql("DELETE FROM t WHERE id > 285", dbname="app")
    for i in range(3):
        source_pg.sql("INSERT INTO nokey VALUES (%s, 'x')", (i,), dbname="app")
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE NOT processed",
                                         dbname="staging") == 0, what="applied", walpipe=w)
    wait_until(lambda: staging_pg.scalar("SELECT to_regclass('analytics.public_t') IS NOT NULL",
                                         dbname="staging"), what="mirror", walpipe=w)
    staging_pg.sql("ALTER TABLE analytics.public_t ADD CONSTRAINT no_bad CHECK (v <> 'bad')", dbname="staging")
    source_pg.sql("INSERT INTO t VALUES (1000, 'bad')", dbname="app")
    wait_caught_up(source_pg, w)

    staged = 'walpipe_events_staged_total{source="app",type="%s"}'
    prom.wait_value(staged % "insert", 304.0, w)
    prom.wait_value(staged % "update", 40.0, w)
    prom.wait_value(staged % "delete", 15.0, w)
    assert prom.query(staged % "snapshot") == 0.0 and prom.query(staged % "truncate") == 0.0
    # every streamed change has a commit time: one latency observation each
    prom.wait_value('walpipe_commit_to_staged_seconds_count{source="app"}', 359.0, w)
    assert prom.query('walpipe_commit_to_staged_seconds_bucket{source="app",le="+Inf"}') == 359.0
    assert prom.query('walpipe_staging_commits_total{source="app"}') >= 1
    assert prom.query('walpipe_staged_bytes_total{source="app"}') > 300 * 20
    assert prom.query('walpipe_reconnects_total{source="app"}') is None  # never reconnected: no series
    assert prom.query('walpipe_queue_capacity_segments{source="app"}') == 16.0

    # dead letters by kind: what walpipe.dead_letters holds
    def dead(cond):
        return float(staging_pg.scalar(f"SELECT count(*) FROM walpipe.dead_letters WHERE {cond}",
                                       dbname="staging"))
    wait_until(lambda: dead("kind = 'apply' AND next_attempt_at IS NOT NULL") == 1, what="waiting dead letter",
               walpipe=w)
    assert dead("kind = 'apply' AND next_attempt_at IS NULL") == 3
    prom.wait_value('walpipe_dead_letters{kind="parked"}', 3.0, w)
    prom.wait_value('walpipe_dead_letters{kind="waiting"}', 1.0, w)
    prom.wait_value('walpipe_dead_letters{kind="undecodable"}', dead("kind = 'decode'"), w)
    prom.wait_value('walpipe_consumer_backlog_events{consumer="mirror"}', 0.0, w)
    # the workers applied the 355 changes of t and dead-lettered the other 4
    prom.wait_value('walpipe_events_applied_total{consumer="mirror"}', 355.0, w)
    prom.wait_value('walpipe_events_dead_lettered_total{consumer="mirror"}', 4.0, w)

    # caught up: the slot's lag falls back to (about) nothing, lag seconds to 0
    wait_caught_up(source_pg, w)
    wait_until(lambda: (prom.query('walpipe_replication_lag_bytes{source="app"}') or 1e9) < 64 * 1024,
               what="lag bytes back to ~0", walpipe=w, interval=0.2)
    prom.wait_value('walpipe_replication_lag_seconds{source="app"}', 0.0, w)
    prom.wait_value('walpipe_replication_slot_active{source="app"}', 1.0, w)
    prom.wait_value('walpipe_source_up{source="app"}', 1.0, w)

    # the exposition passes promtool's lint; no conninfo (nor its password) in it
    text = scrape(port)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "host=" not in text and "password" not in text and "port=" not in text
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert e.value.code == 404
    assert w.stop() == 0


@pytest.mark.source_settings(max_slot_wal_keep_size="64MB")
def test_lag_guard_warns_before_the_slot_is_lost(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=SCHEMA)
    port = wptest.free_port()
    w = start(walpipe_factory, staging_pg, source_pg, port,
              source_extra={"max_lag_bytes": "1MB", "max_lag_seconds": 2, "max_stall_seconds": 3})

    def warning(reason):
        return sample(scrape(port), "walpipe_lag_warning", source="app", reason=reason)

    source_pg.sql("INSERT INTO t VALUES (1, 'a')", dbname="app")
    wait_caught_up(source_pg, w)
    # max_slot_wal_keep_size = 64MB leaves less than min_safe_wal_size (1GB by default): warned at once
    wait_until(lambda: warning("safe_wal_size") == 1, what="safe_wal_size warning", walpipe=w, ignore=(OSError,))
    safe = sample(scrape(port), "walpipe_replication_slot_safe_wal_size_bytes", source="app")
    assert 0 < safe <= (64 + 16) * 1024 * 1024  # PostgreSQL counts from the slot's WAL segment (16 MB) boundary
    assert "only" in w.log() and "max_slot_wal_keep_size invalidates the slot" in w.log()
    for reason in ("retained_wal", "lag_seconds", "stalled"):
        assert warning(reason) == 0

    # staging stops taking rows (raw_events locked) while the source writes
    lock = staging_pg.connect("staging", autocommit=False)
    lock.cursor().execute("LOCK TABLE walpipe.raw_events IN ACCESS EXCLUSIVE MODE")
    stop = threading.Event()

    def write():
        conn = source_pg.connect("app")
        i = 2
        while not stop.is_set():
            conn.cursor().execute("INSERT INTO t SELECT g, repeat('w', 200) FROM generate_series(%s, %s) g",
                                  (i, i + 199))
            i += 200
            stop.wait(0.05)
        conn.close()
    t = threading.Thread(target=write)
    t.start()
    try:
        for reason in ("stalled", "retained_wal", "lag_seconds"):
            wait_until(lambda: warning(reason) == 1, what=f"{reason} warning", walpipe=w, timeout=120,
                       interval=0.2, ignore=(OSError,))
        log = w.log()
        assert "confirmed_flush_lsn has stood at" in log
        assert "retains" in log and "more than max_lag_bytes" in log
        assert "behind the source's commits, more than max_lag_seconds (2)" in log
        lag = sample(scrape(port), "walpipe_replication_lag_bytes", source="app")
        assert lag > 1024 * 1024
    finally:
        lock.rollback()
        lock.close()
        stop.set()
        t.join()

    # recovered: staging catches up, every warning clears (a checkpoint lets the slot's
    # restart_lsn move on, which is what frees the retained WAL)
    wait_caught_up(source_pg, w, timeout=180)

    def cleared():
        source_pg.sql("CHECKPOINT", dbname="app")
        return all(warning(r) == 0 for r in ("stalled", "retained_wal", "lag_seconds"))
    wait_until(cleared, what="warnings cleared", walpipe=w, timeout=120, interval=0.5, ignore=(OSError,))
    log = w.log()
    for reason in ("stalled", "retained_wal", "lag_seconds"):
        assert f"{reason} cleared" in log, log
    assert w.stop() == 0


def test_listen_address_taken(walpipe_factory, tmp_path):
    """`run` refuses to start when [metrics] listen cannot be bound (nothing else is started)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        w = walpipe_factory("[staging]\nconninfo = host=127.0.0.1 port=1 dbname=x\n[source app]\n"
                            f"conninfo = host=127.0.0.1 port=1 dbname=x\n[metrics]\nlisten = 127.0.0.1:{port}\n")
        w.start()
        assert w.wait_exit(60) == 1
        assert f"metrics: could not listen on 127.0.0.1 port {port}" in w.log()
        assert "starting with" not in w.log()
    finally:
        s.close()
