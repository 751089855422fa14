"""Kafka sink: exactly once into Kafka across SIGKILLs and broker outages.

The broker is librdkafka's mock cluster in its own process (tools/kafka-mock,
kafkamock.py); what landed is read back by clients walpipe did not write (kcat and
python3-confluent-kafka) and compared, record by record, with the truth: every
event's records exactly once, identified by walpipe's headers (source, lsn, seq,
record index), in order within each partition and per key.

test_driver_exactly_once_across_kills drives the plugin with kafka_driver (the
core's delivery loop in miniature: a durable position in a file, written only as
far as the plugin reports durable), without PostgreSQL.
"""

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict

import pytest

import kafkamock
from kafkamock import KafkaMock, identity, lsn_int
from wptest import wait_until

SANITIZED = os.environ.get("WALPIPE_SANITIZED", "").lower() in ("1", "true", "on")


def _need_tools():
    if not kafkamock.mock_bin().exists():
        pytest.skip("tools/kafka-mock is not built (librdkafka-dev missing?)")
    if not (kafkamock.plugin_dir() / "walpipe_sink_kafka.so").exists():
        pytest.skip("the kafka plugin is not built")


def _driver_bin():
    return kafkamock.build_dir() / "plugins" / "kafka" / "kafka_driver"


def _records_per_event(ev, tombstones=True):
    return 2 if ev["op"] == "delete" and tombstones else 1


def _check_exactly_once(recs, truth, source):
    """recs: every record read back; truth: the events sent (driver dump order = stream order)."""
    got = Counter(identity(r) for r in recs)
    doubled = {k: n for k, n in got.items() if n > 1}
    want = set()
    for ev in truth:
        lsn = "%X/%X" % (ev["lsn"] >> 32, ev["lsn"] & 0xFFFFFFFF)
        for rec in range(1, _records_per_event(ev) + 1):
            want.add((source, lsn, ev["seq"], rec))
    missing = want - set(got)
    extra = set(got) - want
    if doubled:
        first = sorted(doubled)[:3]
        where = [(r["topic"], r["partition"], r["offset"], identity(r)) for r in recs if identity(r) in first]
    assert not doubled, "doubled records: %d, e.g. %s" % (len(doubled), where)
    assert not missing, "missing records: %d, e.g. %s" % (len(missing), sorted(missing)[:5])
    assert not extra, "records nobody sent: %s" % sorted(extra)[:5]

    # order: within each partition, identities strictly increase (so per key too)
    by_part = defaultdict(list)
    for r in recs:
        _, lsn, seq, rec = identity(r)
        by_part[(r["topic"], r["partition"])].append((lsn_int(lsn), seq, rec))
    for tp, ids in by_part.items():
        assert ids == sorted(ids), "partition %s out of order" % (tp,)
    # per key, the records follow the events' order, and a delete's second record is its tombstone
    by_key = defaultdict(list)
    for r in recs:
        _, lsn, seq, rec = identity(r)
        by_key[(r["topic"], r["key"])].append((lsn_int(lsn), seq, rec, r["value"] is None))
    for k, seq_ in by_key.items():
        assert [x[:3] for x in seq_] == sorted(x[:3] for x in seq_), "key %s out of order" % (k,)
        for lsn, seq, rec, tomb in seq_:
            assert tomb == (rec == 2), "key %s: record %d tombstone=%s" % (k, rec, tomb)


def _read_all(mock, reader):
    recs = []
    for t in mock.topics():
        recs.extend(reader(t))
    return recs


def test_driver_exactly_once_across_kills(tmp_path, request):
    """12 SIGKILLs of the delivering process, brokers down and up and produce errors between
    them: kcat and confluent-kafka read every record exactly once, in order."""
    _need_tools()
    n_events = 20000
    state = tmp_path / "drv.state"
    plugin = str(kafkamock.plugin_dir() / "walpipe_sink_kafka.so")
    truth = [json.loads(line) for line in subprocess.run(
        [str(_driver_bin()), plugin, str(state), str(n_events), "--dump"],
        capture_output=True, text=True, check=True).stdout.splitlines()]
    assert len(truth) == n_events
    rng = random.Random(11)

    def position():
        try:
            return int(state.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    # schemas_enable=false keeps records small: the mock keeps only the last 5 MB of a partition
    with KafkaMock(3, log_path=tmp_path / "kafka-mock.log") as mock:
        logs = []
        procs = []
        request.addfinalizer(lambda: [p.kill() for p in procs if p.poll() is None])

        def start():
            log = open(tmp_path / ("driver-%d.log" % len(logs)), "w+")
            logs.append(log)
            procs.append(subprocess.Popen([str(_driver_bin()), plugin, str(state), str(n_events),
                                           "-o", "brokers=" + mock.bootstrap, "-o", "schemas_enable=false",
                                           "--delay-ms", "20"],
                                          stdout=subprocess.DEVNULL, stderr=log, text=True))
            return procs[-1]

        kills = 0
        retries = 0
        k = 0
        while kills < 12 and k < 40:
            k += 1
            proc = start()
            target = min(n_events - 1, position() + n_events // 24)
            fault = k % 4
            if fault == 1:
                # a broker goes away under load; the plugin holds and waits, then it comes back
                b = rng.randint(1, 3)
                mock.down(b)
                time.sleep(0.5)  # the outage's length; nothing below depends on it
                mock.up(b)
            # Not injected: Produce errors, neither those that drop the connection (-195) nor refused
            # requests (7, REQUEST_TIMED_OUT).  librdkafka 2.0.2's mock checks idempotent sequences
            # only for transactional producers (rd_kafka_mock_validate_records returns at once
            # without a TransactionalId).  So a retried batch whose first try was appended is
            # appended again (seen: 14 doubled in one session), and a batch behind a refused one,
            # already in flight, is appended before the refused one is retried: killed in between,
            # the refused batch is lost behind a newer tail (seen once in CI: 1 missing).  A real
            # broker refuses both (DUPLICATE_SEQUENCE_NUMBER, OUT_OF_ORDER_SEQUENCE_NUMBER), and the
            # idempotent producer retries in order.  Those faults test the mock, not the plugin.
            wait_until(lambda: position() >= target or proc.poll() is not None, timeout=120,
                       what="driver progress past %d" % target)
            if proc.poll() is not None:
                if proc.returncode == 3:   # RETRY: the core would open a new session
                    retries += 1
                    continue
                assert proc.returncode == 0, open(logs[-1].name).read()[-3000:]
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        # the last session runs to the end
        for _ in range(5):
            proc = start()
            proc.wait(timeout=600 if SANITIZED else 300)
            if proc.returncode != 3:
                break
        assert proc.returncode == 0, open(logs[-1].name).read()[-3000:]
        assert position() == n_events
        assert kills >= 10, "only %d kills landed mid-stream" % kills

        for reader in (mock.read_kcat, mock.read_confluent):
            recs = _read_all(mock, reader)
            _check_exactly_once(recs, truth, "drv")
        # a Debezium consumer's view: every value parses, with the op of its event
        ops = {"insert": "c", "update": "u", "delete": "d", "truncate": "t"}
        by_id = {("%X/%X" % (e["lsn"] >> 32, e["lsn"] & 0xFFFFFFFF), e["seq"]): e for e in truth}
        for r in recs:
            _, lsn, seq, rec = identity(r)
            if r["value"] is None:
                continue
            v = json.loads(r["value"])
            ev = by_id[(lsn, seq)]
            assert v["op"] == ops[ev["op"]], (r, ev)
            if v["op"] == "d":
                assert v["after"] is None and v["before"]["id"] == ev["payload"]["key"]["id"]
            elif v["op"] in ("c", "u"):
                assert v["after"] == {**v["after"], **ev["payload"]["after"]}
        # key-less rows all in partition 0 (null key)
        assert {r["partition"] for r in mock.read_kcat("drv.public.nokey")} == {0}
        # the skip path was taken: a killed session left records the next one found in Kafka
        skipped_sessions = sum("not sent again" in open(f.name).read() for f in logs)
        assert skipped_sessions >= 1


# --------------------------------------------------------------------------
# walpipe run with a [sink k] plugin = kafka, against real PostgreSQL clusters

def _sink_pos(staging_pg):
    rows = staging_pg.sql("SELECT lsn::text, seq FROM walpipe.sink_positions WHERE sink = 'k' AND source = 'app'",
                          dbname="staging")
    return (lsn_int(rows[0][0]), rows[0][1]) if rows else (0, -1)


@pytest.mark.parametrize("plugin", ["wal2json", "pgoutput"])
def test_walpipe_kafka_exactly_once_across_sigkills(source_pg, staging_pg, walpipe_factory, tmp_path, plugin):
    """10 SIGKILLs of walpipe under a write load and brokers down/up: every staged event's record
    is in Kafka exactly once (kcat and confluent-kafka), in order per partition and key, each
    committed insert is there as a Debezium create, and the values parse as Debezium's."""
    _need_tools()
    from test_core import setup_source, wait_caught_up
    from test_sinks import SCHEMA, Writers, start, staged

    setup_source(source_pg, schema=SCHEMA, plugin=plugin)
    rng = random.Random(12)
    with KafkaMock(3, log_path=tmp_path / "kafka-mock.log") as mock:
        # schemas off and 16 partitions: the mock keeps only the last 5 MB of each partition
        for t in ("app.public.t1", "app.public.t2"):
            mock.create(t, 32)
        w = start(walpipe_factory, staging_pg, source_pg,
                  {"k": {"plugin": "kafka", "brokers": mock.bootstrap, "schemas_enable": "false"}}, plugin=plugin)
        writers = Writers(source_pg, n=1).start()
        try:
            for kill in range(10):
                before = _sink_pos(staging_pg)
                if kill % 3 == 1:
                    # a broker away: staging goes on, the sink holds, then catches up
                    b = rng.randint(1, 3)
                    mock.down(b)
                    n0 = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")
                    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events",
                                                         dbname="staging") > n0 + 100,
                               timeout=120, what="staging to go on while a broker is down", walpipe=w)
                    mock.up(b)
                wait_until(lambda: _sink_pos(staging_pg) > before, timeout=180,
                           what="the kafka sink's position to advance", walpipe=w)
                w.kill()
                w.start()
        finally:
            writers.stop()
        wait_caught_up(source_pg, w)
        assert source_pg.scalar("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'walpipe_app'") == plugin
        truth = staged(staging_pg)
        last = max((lsn_int(lsn), seq) for (_, lsn, seq, *_rest) in truth)
        wait_until(lambda: _sink_pos(staging_pg) >= last, timeout=180,
                   what="the kafka sink to deliver every staged event", walpipe=w)
        assert w.stop() == 0

        want = Counter(("app", "%X/%X" % (lsn_int(lsn) >> 32, lsn_int(lsn) & 0xFFFFFFFF), seq, 1)
                       for (_, lsn, seq, *_rest) in truth)
        ops = {"insert": "c", "update": "u", "delete": "d", "truncate": "t", "snapshot": "r"}
        want_op = {("%X/%X" % (lsn_int(lsn) >> 32, lsn_int(lsn) & 0xFFFFFFFF), seq): op
                   for (_, lsn, seq, op, *_rest) in truth}
        for reader in (mock.read_kcat, mock.read_confluent):
            recs = [r for t in mock.topics() if t.startswith("app.") for r in reader(t)]
            got = Counter(identity(r) for r in recs)
            doubled = sorted(k for k, n in got.items() if n > 1)
            missing = sorted(set(want) - set(got))
            if doubled:
                where = [(r["topic"], r["partition"], r["offset"], identity(r)) for r in recs
                         if identity(r) in doubled[:3]]
            assert not doubled, "doubled: %d, e.g. %s" % (len(doubled), where)
            assert not missing, "missing: %d, e.g. %s" % (len(missing), missing[:5])
            assert set(got) == set(want)
            by_part = defaultdict(list)
            for r in recs:
                _, lsn, seq, rec = identity(r)
                by_part[(r["topic"], r["partition"])].append((lsn_int(lsn), seq, rec))
                v = json.loads(r["value"])           # a Debezium consumer's view
                assert v["op"] == ops[want_op[(lsn, seq)]]
                assert set(v) >= {"before", "after", "source", "op", "ts_ms"}
                assert v["source"]["lsn"] == lsn_int(lsn)
            for tp, ids in by_part.items():
                assert ids == sorted(ids), "partition %s out of order" % (tp,)
        # the source's truth: every committed insert is a create, once
        creates = sorted((r["topic"].split(".")[-1], json.loads(r["value"])["after"]["id"])
                         for t in mock.topics() if t.startswith("app.") for r in mock.read_kcat(t)
                         if json.loads(r["value"])["op"] == "c")
        assert creates == sorted(writers.committed)
