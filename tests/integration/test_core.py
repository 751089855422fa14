"""walpipe core: source slot -> raw_events, exactly once, against real clusters.

Each test derives its ground truth independently of walpipe: walpipe's slot is
created by the test and copied (same position) into a truth slot that is read
through SQL afterwards (see truth.py).
"""

import json
import os
import random
import signal
import threading
import time

import psycopg2
import pytest

import truth
import wptest
from wptest import wait_until

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE t_types (
    id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric, n2 numeric(10,2), f4 real, f8 double precision,
    b boolean, by bytea, arr int[], tarr text[], j json, jb jsonb, ts timestamp, tstz timestamptz,
    d date, iv interval, u uuid, e mood, txt text, "Mixed Case Col" text, vc varchar(5), inet_c inet);
CREATE TABLE t_full (id int PRIMARY KEY, name text, qty int);
ALTER TABLE t_full REPLICA IDENTITY FULL;
CREATE TABLE "Weird ""Table"" Name" (k text PRIMARY KEY, "select" int);
CREATE TABLE t_trunc (id int PRIMARY KEY);
"""

WORKLOAD = [
    """INSERT INTO t_types VALUES (1, -32768, 9223372036854775807, 12345678901234567890.123456789, 10.50,
        1.5, 0.1, false, '\\x00ff41', '{1,2,NULL}', '{"a b","c\\"d",NULL}', '{"k": [1, 2]}', '{"k": [1, 2]}',
        '2024-02-29 13:14:15.123456', '2024-02-29 11:14:15.123456+00', '2024-02-29', '1 day 02:03:04',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', E'line1\\nline2\\t"quoted" \\\\ back é', 'mixed',
        'héllo', '192.168.0.1/24')""",
    "INSERT INTO t_types (id) VALUES (2)",
    "UPDATE t_types SET txt = 'changed', n = 'NaN' WHERE id = 1",
    "UPDATE t_types SET id = 3 WHERE id = 2",
    "DELETE FROM t_types WHERE id = 3",
    "INSERT INTO t_full VALUES (1, 'full-row', 5), (2, NULL, 7)",
    "UPDATE t_full SET qty = 6 WHERE id = 1",
    "DELETE FROM t_full WHERE id = 2",
    """INSERT INTO "Weird ""Table"" Name" VALUES ('a', 1), ('b', 2)""",
    """UPDATE "Weird ""Table"" Name" SET "select" = 3 WHERE k = 'a'""",
    "INSERT INTO t_trunc SELECT generate_series(1, 3)",
    "TRUNCATE t_trunc, t_full",
    "SELECT pg_logical_emit_message(true, 'app', 'transactional')",
    "SELECT pg_logical_emit_message(false, 'app', 'not transactional')",
]


def setup_source(source_pg, dbname="app", schema=SCHEMA, slot="walpipe_app", truth_slot="truth", plugin="wal2json"):
    """Creates the database, its tables, walpipe's slot and a truth copy of it.  plugin =
    pgoutput: walpipe's slot is a pgoutput copy of the (wal2json) truth slot, and the publication
    walpipe would create (walpipe_app, FOR ALL TABLES) is made first, older than both slots."""
    source_pg.createdb(dbname)
    if schema:
        source_pg.sql(schema, dbname=dbname)
    if plugin == "pgoutput":
        source_pg.sql(f'CREATE PUBLICATION "{slot}" FOR ALL TABLES', dbname=dbname)
        wptest.create_slot(source_pg, dbname, truth_slot)
        source_pg.sql("SELECT pg_copy_logical_replication_slot(%s, %s, false, 'pgoutput')", (truth_slot, slot),
                      dbname=dbname)
        return
    wptest.create_slot(source_pg, dbname, slot)
    wptest.copy_slot(source_pg, dbname, slot, truth_slot)


def start_walpipe(walpipe_factory, staging_pg, sources, staging_extra=None, init=True):
    cfg = wptest.write_config
    workdir_cfg = {name: dict(src) for name, src in sources.items()}
    w = walpipe_factory("[placeholder]\n")
    cfg(w.config_path, staging_pg.conninfo("staging"), workdir_cfg, staging_extra=staging_extra)
    if init:
        if "staging" not in [r[0] for r in staging_pg.sql("SELECT datname FROM pg_database")]:
            staging_pg.createdb("staging")
        r = w.init()
        assert r.returncode == 0, r.stderr
    w.start()
    return w


def staged_count(staging_pg):
    return staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging")


def wait_caught_up(source_pg, walpipe, slot="walpipe_app", dbname="app", timeout=120):
    """Waits until the slot has confirmed everything written so far.

    The insert position, not pg_current_wal_lsn() (the write position): a non-transactional
    message's record may still sit in WAL buffers, undecoded, until the WAL writer flushes it.
    Committing a catalog-only transaction (decoded as an empty one) flushes it now."""
    source_pg.sql("CREATE TEMP TABLE wp_flush_wal (); DROP TABLE wp_flush_wal", dbname=dbname)
    target = source_pg.scalar("SELECT pg_current_wal_insert_lsn()::text", dbname=dbname)
    wait_until(lambda: source_pg.scalar(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
        (target, slot)), timeout=timeout, interval=0.1, what=f"slot {slot} to confirm {target}",
        walpipe=walpipe)


def test_changes_land_once_with_correct_payloads(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg)
    w = start_walpipe(walpipe_factory, staging_pg,
                      {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}})
    for stmt in WORKLOAD:
        source_pg.sql(stmt, dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0

    # xid and commit_ts are the source transaction's as wal2json printed them (walpipe sends them
    # in binary COPY: commit_ts as microseconds it computed from the text)
    begins = [json.loads(d) for (d,) in source_pg.sql(
        "SELECT data FROM pg_logical_slot_peek_changes('truth', NULL, NULL, 'format-version', '2', "
        "'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1')", dbname="app")]
    begins = [b for b in begins if b["action"] == "B"]
    checked = 0
    for b in begins:
        rows, same = staging_pg.sql(
            "SELECT count(*), count(*) FILTER (WHERE xid = %s AND commit_ts = %s::timestamptz) "
            "FROM walpipe.raw_events WHERE lsn = %s::pg_lsn", (b["xid"], b["timestamp"], b["nextlsn"]),
            dbname="staging")[0]
        assert rows == same, f"transaction {b}: {rows - same} of {rows} staged rows differ in xid or commit_ts"
        checked += rows
    # every change but the non-transactional message (seq 0, no transaction) belongs to one
    in_txn = staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE seq > 0", dbname="staging")
    assert checked == in_txn == 18, f"{checked} of {in_txn} transactional staged rows matched a source transaction"

    expected = truth.read_truth(source_pg, "app", "truth")
    staged = truth.read_staged(staging_pg, "staging")
    r = truth.assert_exactly_once(expected, staged)
    assert r.expected == 19  # every statement of WORKLOAD, row by row

    by_key = {(s["table"], s["type"], s["seq"], s["lsn"]): s for s in staged}
    rows = [s for s in staged if s["table"] == "t_types"]
    first = rows[0]["payload"]["after"]
    # numeric keeps precision and scale as text; floats and safe integers are numbers
    assert first["n"] == "12345678901234567890.123456789"
    assert first["n2"] == "10.50"
    assert first["i8"] == "9223372036854775807"   # beyond 2^53: text, not a lossy number
    assert first["i2"] == -32768
    assert first["by"] == "\\x00ff41"
    assert first["arr"] == "{1,2,NULL}"
    assert first["j"] == '{"k": [1, 2]}'
    assert first["tstz"] == "2024-02-29 11:14:15.123456+00"   # TimeZone pinned to UTC
    assert first["txt"] == 'line1\nline2\t"quoted" \\ back é'
    assert first["Mixed Case Col"] == "mixed"
    assert rows[1]["payload"]["after"]["txt"] is None
    upd = [s for s in rows if s["type"] == "update"]
    assert upd[0]["payload"]["key"] == {"id": 1}
    assert upd[0]["payload"]["after"]["n"] is None    # wal2json 2.5 prints NaN as null (documented)
    assert upd[1]["payload"]["key"] == {"id": 2} and upd[1]["payload"]["after"]["id"] == 3
    full = [s for s in staged if s["table"] == "t_full" and s["type"] in ("update", "delete")]
    assert full[0]["payload"]["before"] == {"id": 1, "name": "full-row", "qty": 5}
    assert full[1]["payload"]["before"] == {"id": 2, "name": None, "qty": 7}
    weird = [s for s in staged if s["table"] == 'Weird "Table" Name']
    assert [s["payload"]["after"]["select"] for s in weird] == [1, 2, 3]
    truncs = sorted(s["table"] for s in staged if s["type"] == "truncate")
    assert truncs == ["t_full", "t_trunc"]
    msgs = [s["payload"] for s in staged if s["type"] == "message"]
    assert {"prefix": "app", "content": "transactional", "transactional": True} in msgs
    assert {"prefix": "app", "content": "not transactional", "transactional": False} in msgs
    del by_key

    # every event references its table shape, recorded once
    shapes = staging_pg.sql("SELECT schema_name, table_name, columns FROM walpipe.table_schemas "
                            "WHERE table_name = 't_types' ORDER BY first_lsn", dbname="staging")
    assert shapes and [c["name"] for c in shapes[0][2]][:3] == ["id", "i2", "i8"]
    assert shapes[0][2][0]["typeoid"] == 23
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE shape_id IS NULL "
                             "AND event_type IN ('insert','update','delete')", dbname="staging") == 0
    # the checkpoint covers everything and the slot was acknowledged exactly up to it
    ck = staging_pg.sql("SELECT lsn::text, txn_end FROM walpipe.checkpoints WHERE source = 'app'",
                        dbname="staging")[0]
    slot = wptest.slot_info(source_pg, "walpipe_app")
    assert ck[1] is None
    assert truth.lsn_int(slot["confirmed_flush_lsn"]) <= truth.lsn_int(ck[0])
    assert truth.lsn_int(ck[0]) >= max(e["lsn"] for e in expected)


def test_million_row_transaction_bounded_memory(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE big (id int PRIMARY KEY, v text, n numeric)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO big SELECT g, md5(g::text), g * 1.25 FROM generate_series(1, 1000000) g",
                  dbname="app")
    peak = 0

    def done():
        nonlocal peak
        peak = max(peak, w.rss_peak_kb())
        return staged_count(staging_pg) >= 1000000

    wait_until(done, timeout=600, interval=0.5, what="1 000 000 rows staged", walpipe=w)
    wait_caught_up(source_pg, w)
    peak = max(peak, w.rss_peak_kb())
    assert w.stop() == 0
    stats = staging_pg.sql("SELECT count(*), count(DISTINCT seq), min(seq), max(seq), count(DISTINCT lsn), "
                           "count(DISTINCT batch_id) FROM walpipe.raw_events", dbname="staging")[0]
    assert stats[:5] == (1000000, 1000000, 1, 1000000, 1), stats
    assert stats[5] > 1, "a 1M-row transaction must be split across staging commits"
    if os.environ.get("WALPIPE_SANITIZED") == "1":
        print(f"peak RSS {peak} kB not checked: AddressSanitizer's shadow memory and quarantine inflate RSS")
    else:
        assert peak < 64 * 1024, f"peak RSS {peak} kB"
    print(f"1M-row transaction: peak RSS {peak} kB over {stats[5]} staging commits")


def _writer(source_pg, stop, dbname="app", big_every=40):
    """Sustained load: small multi-statement transactions and an occasional larger one."""
    conn = source_pg.connect(dbname)
    cur = conn.cursor()
    i = 0
    try:
        while not stop.is_set():
            i += 1
            cur.execute("BEGIN")
            cur.execute("INSERT INTO load (id, v) VALUES (%s, %s)", (i, f"v{i}"))
            if i > 3:
                cur.execute("UPDATE load SET v = v || '+' WHERE id = %s", (i - 3,))
            if i % 7 == 0:
                cur.execute("DELETE FROM load WHERE id = %s", (i - 5,))
            if i % big_every == 0:
                cur.execute("INSERT INTO bulk SELECT %s * 100000 + g, 'x' FROM generate_series(1, 5000) g", (i,))
            cur.execute("COMMIT")
    finally:
        conn.close()


LOAD_SCHEMA = "CREATE TABLE load (id int PRIMARY KEY, v text); CREATE TABLE bulk (id bigint PRIMARY KEY, v text);"


def test_sigkill_mid_stream_exactly_once(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=LOAD_SCHEMA)
    # small batches: many checkpoints, many of them inside a transaction
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}},
                      staging_extra={"batch_rows": 700})
    stop = threading.Event()
    t = threading.Thread(target=_writer, args=(source_pg, stop))
    t.start()
    rnd = random.Random(int(os.environ.get("WP_SEED", "7")))
    kills = 0
    try:
        for _ in range(4):
            base = staged_count(staging_pg)
            wait_until(lambda: staged_count(staging_pg) > base + 2000, timeout=120, interval=0.05,
                       what="progress before the kill", walpipe=w)
            time.sleep(rnd.uniform(0, 0.5))
            assert w.kill() == -signal.SIGKILL
            kills += 1
            w.start()
    finally:
        stop.set()
        t.join()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    expected = truth.read_truth(source_pg, "app", "truth")
    staged = truth.read_staged(staging_pg, "staging")
    r = truth.assert_exactly_once(expected, staged)
    print(f"{kills} SIGKILLs: {r.expected} source changes, {r.staged} staged, none missing or doubled")
    # the restarts really did resume inside transactions at least once
    assert "streaming from slot" in w.log()


def test_two_sources_and_quiet_slot_advances(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, dbname="busy", schema=LOAD_SCHEMA, slot="walpipe_busy", truth_slot="truth_busy")
    setup_source(source_pg, dbname="quiet", schema="CREATE TABLE q (id int PRIMARY KEY)", slot="walpipe_quiet",
                 truth_slot="truth_quiet")
    source_pg.sql("INSERT INTO q VALUES (1), (2)", dbname="quiet")
    w = start_walpipe(walpipe_factory, staging_pg, {
        "busy": {"conninfo": source_pg.conninfo("busy"), "slot": "walpipe_busy"},
        "quiet": {"conninfo": source_pg.conninfo("quiet"), "slot": "walpipe_quiet", "status_interval_ms": 200},
    })
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE source = 'quiet'",
                                         dbname="staging") == 2, what="quiet source's two rows", walpipe=w)
    before = wptest.slot_info(source_pg, "walpipe_quiet")["confirmed_flush_lsn"]
    stop = threading.Event()
    t = threading.Thread(target=_writer, args=(source_pg, stop, "busy"))
    t.start()
    try:
        time.sleep(3)
        mid = source_pg.scalar("SELECT pg_current_wal_lsn()::text")
        # the quiet database writes nothing, yet its slot must follow the WAL the busy one produces
        wait_until(lambda: truth.lsn_int(wptest.slot_info(source_pg, "walpipe_quiet")["confirmed_flush_lsn"])
                   >= truth.lsn_int(mid), timeout=120, interval=0.2,
                   what="quiet slot's confirmed_flush_lsn to advance past the busy database's WAL", walpipe=w)
    finally:
        stop.set()
        t.join()
    after = wptest.slot_info(source_pg, "walpipe_quiet")["confirmed_flush_lsn"]
    assert truth.lsn_int(after) > truth.lsn_int(before)
    wait_caught_up(source_pg, w, slot="walpipe_busy", dbname="busy")
    assert w.stop() == 0
    for name in ("busy", "quiet"):
        expected = truth.read_truth(source_pg, name, f"truth_{name}")
        staged = truth.read_staged(staging_pg, "staging", source=name)
        truth.assert_exactly_once(expected, staged)
    # the quiet source's checkpoint recorded the advance before it was acknowledged
    ck = staging_pg.scalar("SELECT lsn::text FROM walpipe.checkpoints WHERE source = 'quiet'", dbname="staging")
    assert truth.lsn_int(ck) >= truth.lsn_int(after)



def test_received_at_is_each_rows_clock(source_pg, staging_pg, walpipe_factory):
    """received_at defaults to clock_timestamp(): each row's own time, in id order, not one time per
    batch.  (A cheaper default that keeps this was measured and not adopted; README "Where the time goes".)

    Batches are made big by configuration, not by speed: the 20 000 rows are one source transaction
    committed before walpipe starts, and neither batch_rows nor batch_bytes nor batch_ms closes a
    batch before the whole backlog is read.  The check adds up over every batch, so it holds
    however the reader happened to split them."""
    setup_source(source_pg, schema="CREATE TABLE r (id int PRIMARY KEY, v text)")
    source_pg.sql("INSERT INTO r SELECT g, md5(g::text) FROM generate_series(1, 20000) g", dbname="app")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}},
                      staging_extra={"batch_rows": 1000000, "batch_bytes": "1GB", "batch_ms": 60000})
    wait_until(lambda: staged_count(staging_pg) >= 20000, timeout=300, what="20 000 rows staged", walpipe=w)
    assert w.stop() == 0
    backwards = staging_pg.scalar("SELECT count(*) FROM (SELECT received_at < lag(received_at) OVER (ORDER BY id) "
                                  "AS back FROM walpipe.raw_events) s WHERE back", dbname="staging")
    assert backwards == 0, f"{backwards} rows have an earlier received_at than the row before them in id order"
    # per row, not per statement or transaction: with one time per batch, every batch would have exactly one
    batches = staging_pg.sql("SELECT count(*), count(DISTINCT received_at) FROM walpipe.raw_events "
                             "GROUP BY batch_id", dbname="staging")
    rows_beyond_first = sum(rows - 1 for rows, _ in batches)
    times_beyond_first = sum(times - 1 for _, times in batches)
    assert rows_beyond_first >= 10000, f"20 000 rows of one transaction split into {len(batches)} batches"
    assert times_beyond_first > rows_beyond_first // 10, \
        f"{len(batches)} batches of {rows_beyond_first + len(batches)} rows have only " \
        f"{times_beyond_first + len(batches)} distinct received_at values"
    print(f"{len(batches)} staging batches (rows, distinct received_at): {sorted(batches, reverse=True)[:5]}")


def test_large_payloads_are_compressed_with_lz4(source_pg, staging_pg, walpipe_factory):
    """005_payload_lz4: payloads big enough to be compressed use lz4, in every partition of
    raw_events, including those walpipe creates after init (Debian's PostgreSQL has lz4)."""
    setup_source(source_pg, schema="CREATE TABLE big (id int PRIMARY KEY, v text)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO big SELECT g, repeat('walpipe ' || g, 2000) FROM generate_series(1, 3) g",
                  dbname="app")
    wait_until(lambda: staged_count(staging_pg) >= 3, timeout=60, what="3 rows staged", walpipe=w)
    assert w.stop() == 0
    methods = staging_pg.sql("SELECT DISTINCT pg_column_compression(payload) FROM walpipe.raw_events",
                             dbname="staging")
    assert methods == [("lz4",)], methods
    parts = staging_pg.sql(
        "SELECT c.relname, a.attcompression FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'payload' "
        "WHERE i.inhparent = 'walpipe.raw_events'::regclass", dbname="staging")
    assert len(parts) >= 3 and all(m == "l" for _, m in parts), parts
    # the payload reads back whole
    v = staging_pg.scalar("SELECT payload->'after'->>'v' FROM walpipe.raw_events WHERE payload->'after'->>'id' = '2'",
                          dbname="staging")
    assert v == "walpipe 2" * 2000
