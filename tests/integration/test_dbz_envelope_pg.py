"""Real rows -> walpipe payloads -> the Kafka plugin's Debezium encoder (plugins/kafka/envelope.c).

The unit fixtures (plugins/kafka/tests) pin the format from hand-written payloads; this checks
that what walpipe really stages for PostgreSQL 15's text output of each type (through wal2json
and jsonb) encodes to Debezium's values.  The expected values come from the SOURCE itself
(PostgreSQL computes the epoch days, microseconds, UTC times, hex of each value), not from the
encoder.  The encoder runs in the driver build/plugins/kafka/tests/dbz_encode_lines.
"""

import base64
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from test_core import setup_source, start_walpipe, wait_caught_up
import wptest

PH = "__debezium_unavailable_value"

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE TABLE t (
    id int PRIMARY KEY, b bool, i2 smallint, i8 bigint, r4 real, r8 float8,
    n numeric(22,2), nv numeric, d date, tm time, tm3 time(3), ttz timetz,
    ts timestamp, ts3 timestamp(3), tz timestamptz, tz0 timestamptz(0), iv interval,
    j json, jb jsonb, u uuid, x xml, ip inet, by bytea, tx text, e mood,
    ai int[], at text[], aby bytea[], an numeric(5,2)[], doc text);
ALTER TABLE t ALTER COLUMN doc SET STORAGE EXTERNAL;
"""

ROW = """INSERT INTO t VALUES (1, true, -32768, 9223372036854775807, 1.5, 0.1,
    '-12345678901234567890.12', '1.500', '2020-09-27', '13:37:24.058468', '13:37:24.058', '15:37:24.5+02',
    '2020-09-27 13:37:24.058468', '1969-12-31 23:59:59.999', '2020-09-27 13:37:24.05+00', '2020-01-01 00:30:00+01',
    '1 year 2 mons 3 days 04:05:06.789', '{"a": [1, 2.50]}', '{"b": 1}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '<a>1</a>', '192.168.0.1/24', '\\x00ff10', 'żółć 😀', 'happy',
    '{1,2,NULL}', '{a,"b c","d\\"e",NULL}', '{"\\\\x0102"}', '{1.50,-2.25}', repeat('x', 30000))"""


def driver():
    p = Path(os.path.dirname(wptest.walpipe_bin())) / "plugins" / "kafka" / "tests" / "dbz_encode_lines"
    if not p.exists():
        pytest.skip(f"{p} is not built (cmake --build <build> --target dbz_encode_lines)")
    return p


def events(staging_pg):
    rows = staging_pg.sql("""
        SELECT r.event_type, r.schema_name, r.table_name, (r.lsn - '0/0')::bigint, r.seq, r.xid,
               (extract(epoch FROM r.commit_ts) * 1000000)::bigint, r.payload::text, s.columns::text,
               st.key_columns::text
          FROM walpipe.raw_events r
          LEFT JOIN walpipe.table_schemas s ON s.source = r.source AND s.shape_id = r.shape_id
          LEFT JOIN walpipe.source_tables st ON st.source = r.source AND st.schema_name = r.schema_name
                                             AND st.table_name = r.table_name
         ORDER BY r.lsn, r.seq, r.id""", dbname="staging")
    out = []
    for op, sch, tab, lsn, seq, xid, cus, payload, cols, keys in rows:
        out.append({"op": op, "schema": sch, "table": tab, "lsn": int(lsn), "seq": seq, "xid": xid,
                    "commit_us": int(cus) if cus is not None else 0, "payload": payload, "columns": cols,
                    "key_columns": keys})
    return out


def encode(evs, schemas):
    r = subprocess.run([str(driver()), "1" if schemas else "0"], input="".join(json.dumps(e) + "\n" for e in evs),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def unscaled(b64):
    return int.from_bytes(base64.b64decode(b64), "big", signed=True)


def test_real_rows_encode_as_debezium(source_pg, staging_pg, walpipe_factory):
    driver()
    setup_source(source_pg, schema=SCHEMA)
    # walpipe pins the walsender's TimeZone to UTC (reader.c); the database's own zone must not leak in
    source_pg.sql("ALTER DATABASE app SET timezone = 'Asia/Kolkata'", dbname="app")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app"),
                                                             "slot": "walpipe_app"}})
    source_pg.sql(ROW, dbname="app")
    source_pg.sql("UPDATE t SET tx = 'changed' WHERE id = 1", dbname="app")  # doc: unchanged TOAST
    source_pg.sql("UPDATE t SET id = 2 WHERE id = 1", dbname="app")           # key change
    source_pg.sql("DELETE FROM t WHERE id = 2", dbname="app")
    source_pg.sql("SELECT pg_logical_emit_message(true, 'audit', 'hello')", dbname="app")
    source_pg.sql("TRUNCATE t", dbname="app")
    wait_caught_up(source_pg, w)
    wptest.wait_until(lambda: staging_pg.scalar(
        "SELECT count(*) FROM walpipe.raw_events WHERE event_type = 'truncate'", dbname="staging") == 1,
        timeout=60, what="the truncate to be staged", walpipe=w)
    assert w.stop() == 0

    # the oracle: PostgreSQL's own arithmetic on the values it stored
    source_pg.sql(ROW, dbname="app")
    o = source_pg.sql("""
        SELECT d - date '1970-01-01',
               (extract(epoch FROM tm) * 1000000)::bigint,
               (extract(epoch FROM tm3) * 1000)::bigint,
               (extract(epoch FROM ts) * 1000000)::bigint,
               floor(extract(epoch FROM ts3) * 1000)::bigint,
               to_char(tz AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               to_char(tz0 AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               encode(by, 'hex'), (n * 100)::numeric(30,0)::text
          FROM t WHERE id = 1""", dbname="app")[0]
    days, tm_us, tm3_ms, ts_us, ts3_ms, tz_iso, tz0_iso, by_hex, n_unscaled = o

    evs = events(staging_pg)
    assert [e["op"] for e in evs] == ["insert", "update", "update", "delete", "message", "truncate"], evs
    recs = encode(evs, schemas=False)
    errors = [r for r in recs if "error" in r]
    assert not errors, errors
    # insert, update, key change (d, tombstone, c), delete + tombstone, message, truncate
    assert [(r["topic"], r["header"]) for r in recs] == [
        ("pg.public.t", None), ("pg.public.t", None),
        ("pg.public.t", "__debezium.newkey"), ("pg.public.t", "__debezium.newkey"),
        ("pg.public.t", "__debezium.oldkey"),
        ("pg.public.t", None), ("pg.public.t", None),
        ("pg.message", None), ("pg.public.t", None)]
    ins = json.loads(recs[0]["value"])
    assert json.loads(recs[0]["key"]) == {"id": 1}
    assert list(ins) == ["before", "after", "source", "transaction", "op", "ts_ms", "ts_us", "ts_ns"]
    assert ins["op"] == "c" and ins["before"] is None
    src = ins["source"]
    assert list(src) == ["version", "connector", "name", "ts_ms", "snapshot", "db", "sequence", "ts_us", "ts_ns",
                         "schema", "table", "txId", "lsn", "xmin"]
    assert (src["connector"], src["name"], src["db"], src["schema"], src["table"], src["snapshot"]) == \
        ("postgresql", "pg", "app", "public", "t", "false")
    assert src["txId"] == evs[0]["xid"] and src["lsn"] == evs[0]["lsn"]
    assert src["ts_us"] == evs[0]["commit_us"] and src["ts_ms"] == evs[0]["commit_us"] // 1000

    a = ins["after"]
    assert list(a) == ["id", "b", "i2", "i8", "r4", "r8", "n", "nv", "d", "tm", "tm3", "ttz", "ts", "ts3", "tz", "tz0",
                       "iv", "j", "jb", "u", "x", "ip", "by", "tx", "e", "ai", "at", "aby", "an", "doc"]
    assert (a["b"], a["i2"], a["i8"], a["r4"], a["r8"]) == (True, -32768, 9223372036854775807, 1.5, 0.1)
    assert unscaled(a["n"]) == int(n_unscaled)
    assert a["nv"]["scale"] == 1 and unscaled(a["nv"]["value"]) == 15
    assert (a["d"], a["tm"], a["tm3"], a["ts"], a["ts3"]) == (days, int(tm_us), int(tm3_ms), int(ts_us), int(ts3_ms))
    assert (a["tz"], a["tz0"]) == (tz_iso, tz0_iso)
    assert a["ttz"] == "13:37:24.5Z"
    # MicroDuration.durationMicros over pgjdbc PGInterval's fields (whole seconds + micros / 1e6)
    seconds = 6 + 789000 / 1e6
    number_of_days = ((1 * 12) + 2) * (365.25 / 12.0) + 3
    assert a["iv"] == int(((((number_of_days * 24 + 4) * 60) + 5) * 60 + seconds) * 1e6)
    assert json.loads(a["j"]) == {"a": [1, 2.5]} and json.loads(a["jb"]) == {"b": 1}
    assert (a["u"], a["x"], a["ip"], a["tx"], a["e"]) == \
        ("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "<a>1</a>", "192.168.0.1/24", "żółć 😀", "happy")
    assert base64.b64decode(a["by"]).hex() == by_hex
    assert a["ai"] == [1, 2, None] and a["at"] == ["a", "b c", 'd"e', None]
    assert a["aby"] == [base64.b64encode(b"\x01\x02").decode()]
    assert [unscaled(x) for x in a["an"]] == [150, -225]
    assert a["doc"] == "x" * 30000

    upd = json.loads(recs[1]["value"])
    assert upd["op"] == "u" and upd["after"]["tx"] == "changed"
    assert upd["after"]["doc"] == PH, "unchanged TOAST column: Debezium's placeholder"
    kd, kt, kc = recs[2], recs[3], recs[4]
    assert json.loads(kd["key"]) == {"id": 1} and json.loads(kd["value"])["op"] == "d"
    assert kt["value"] is None and json.loads(kt["key"]) == {"id": 1}
    assert json.loads(kc["key"]) == {"id": 2} and json.loads(kc["value"])["op"] == "c"
    dl, tomb = recs[5], recs[6]
    assert json.loads(dl["value"])["op"] == "d" and json.loads(dl["value"])["before"]["id"] == 2
    assert tomb["value"] is None and json.loads(tomb["key"]) == {"id": 2}
    msg = json.loads(recs[7]["value"])
    assert json.loads(recs[7]["key"]) == {"prefix": "audit"}
    assert msg["op"] == "m" and base64.b64decode(msg["message"]["content"]) == b"hello"
    tr = json.loads(recs[8]["value"])
    assert recs[8]["key"] is None and tr["op"] == "t" and tr["before"] is None and tr["after"] is None

    # schemas.enable: the same payloads inside {"schema","payload"}, the schema naming every column
    recs_s = encode(evs, schemas=True)
    assert len(recs_s) == len(recs)
    for plain, withs in zip(recs, recs_s):
        for part in ("key", "value"):
            if plain[part] is None:
                assert withs[part] is None
                continue
            doc = json.loads(withs[part])
            assert list(doc) == ["schema", "payload"]
            p, q = json.loads(plain[part]), doc["payload"]
            for k in ("ts_ms", "ts_us", "ts_ns"):  # processing time differs between the two runs
                p.pop(k, None)
                q.pop(k, None)
            assert p == q
    vs = json.loads(recs_s[0]["value"])["schema"]
    after_fields = [f["field"] for f in vs["fields"][1]["fields"]]
    assert after_fields == list(a)
    assert math.isfinite(ins["ts_ms"])
