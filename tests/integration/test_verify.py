"""`walpipe verify`: mirrors compared with their sources by checksums over key ranges, at one
source position the mirror has reached; `--resync` repairs what differs.

Every expectation is computed here independently of walpipe: the key ranges from the mirror's
keys in key order (every N-th key is a boundary, as the README says), the differences from the
hand-made changes, and the end state by the ordered checksum test_workers.py uses.
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

import wptest
from test_workers import (PGBENCH, PGBENCH_TABLES, assert_mirrored, pgbench_source, start,
                          wait_applied)
from wptest import wait_until

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, v text, n numeric(10,2), at timestamptz);
CREATE TABLE "We""ird" ("K" text, k2 int, val jsonb, PRIMARY KEY ("K", k2));
CREATE TABLE dropme (id int PRIMARY KEY, v text);
CREATE TABLE unmirrored (id int PRIMARY KEY, v text);
"""

WORKLOAD = [
    "INSERT INTO t SELECT g, 'v' || g, g / 7.0, '2024-01-01 00:00+00'::timestamptz + g * interval '1 hour' "
    "FROM generate_series(1, 1000) g",
    "UPDATE t SET v = NULL WHERE id % 10 = 3",
    "UPDATE t SET v = '' WHERE id % 10 = 4",
    "DELETE FROM t WHERE id % 50 = 0",
    "INSERT INTO t VALUES (1000 + 50, 'back', 1, NULL)",
    "INSERT INTO \"We\"\"ird\" SELECT chr(65 + g % 26) || g, g, jsonb_build_object('g', g) "
    "FROM generate_series(1, 300) g",
    "INSERT INTO dropme SELECT g, 'x' FROM generate_series(1, 10) g",
    "INSERT INTO unmirrored SELECT g, 'x' FROM generate_series(1, 10) g",
]

LINE = re.compile(r"^(\S+) (.+?): (.*)$")


def verify(w, *args, timeout=300):
    """Runs `walpipe verify`; returns (exit code, {"schema.table": line text}, summary line, stdout)."""
    r = w.command("verify", *args, timeout=timeout)
    lines = {}
    summary = None
    for line in r.stdout.splitlines():
        if line.startswith("verify: "):
            summary = line
            continue
        m = LINE.match(line)
        if m and m.group(1) == "app":
            lines[m.group(2)] = m.group(3)  # a later line (after a resync) replaces an earlier one
    assert summary is not None, r.stdout + r.stderr
    return r.returncode, lines, summary, r.stdout + r.stderr


def mirror_ranges(staging_pg, mirror, key, every):
    """The key ranges as the README defines them: every `every`-th mirror key in key order (from
    the (every+1)-th) starts a range.  Returns the boundary keys, ascending."""
    keys = [r[0] for r in staging_pg.sql(f"SELECT {key} FROM {mirror} ORDER BY {key}", dbname="staging")]
    return keys[every::every]


def range_text(bounds, key):
    """The range holding key, as verify prints it: [start, (b1)), [(b1), (b2)), ..., [(bn), end]."""
    lo = None
    for b in bounds:
        if key < b:
            return f"[{'start' if lo is None else f'({lo})'}, ({b}))"
        lo = b
    return f"[({lo}), end]" if lo is not None else "[start, end]"


def start_app(source_pg, staging_pg, walpipe_factory, workers=2):
    source_pg.createdb("app")
    source_pg.sql(SCHEMA, dbname="app")
    wptest.create_slot(source_pg, "app", "walpipe_app")
    return start(walpipe_factory, staging_pg, source_pg, workers=workers)


# --------------------------------------------------------------------------

def test_equal_then_hand_made_differences_named(source_pg, staging_pg, walpipe_factory):
    w = start_app(source_pg, staging_pg, walpipe_factory)
    for stmt in WORKLOAD:
        source_pg.sql(stmt, dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "t", ["id"])

    # equal after the workload (the ordered checksum above agrees)
    rc, lines, summary, out = verify(w, "--range-rows", 100)
    assert rc == 0, out
    assert lines["public.t"].startswith("equal (981 rows in 10 key ranges at "), out
    assert lines['public.We"ird'].startswith("equal (300 rows in 3 key ranges at "), out
    assert lines["public.dropme"].startswith("equal (10 rows in 1 key range at "), out
    assert summary == "verify: 4 tables: 4 equal, 0 differ, 0 missing, 0 not compared", out

    # hand-made differences in the mirror: a changed value, a missing row, an extra row (with an
    # old version, as if walpipe had written it)
    mirror = "analytics.public_t"
    staging_pg.sql(f"UPDATE {mirror} SET n = n + 1 WHERE id = 151", dbname="staging")
    staging_pg.sql(f"DELETE FROM {mirror} WHERE id = 420", dbname="staging")
    staging_pg.sql(f"INSERT INTO {mirror} (id, v, n, at, _walpipe_lsn, _walpipe_seq) "
                   f"VALUES (5000, 'extra', 1, NULL, '0/1', 1)", dbname="staging")
    staging_pg.sql("UPDATE analytics.\"public_We\"\"ird\" SET val = '{\"g\": 0}' WHERE \"K\" = 'P41'",
                   dbname="staging")
    # a mirror whose source table is gone, and a source table whose mirror is gone
    source_pg.sql("DROP TABLE dropme", dbname="app")
    mid = staging_pg.scalar("SELECT id FROM walpipe.mirrors WHERE table_name = 'unmirrored'", dbname="staging")
    staging_pg.sql(f"DROP TABLE analytics.public_unmirrored; DROP TABLE walpipe.tombstones_{mid}; "
                   f"DELETE FROM walpipe.mirrors WHERE id = {mid}", dbname="staging")
    wait_applied(source_pg, staging_pg, w)

    bounds = mirror_ranges(staging_pg, mirror, "id", 100)
    assert len(bounds) == 9
    rc, lines, summary, out = verify(w, "--range-rows", 100)
    assert rc == 1, out
    t = lines["public.t"]
    assert t.startswith("differs at ") and "1 missing, 1 extra, 1 different in 3 of 10 key ranges" in t, out
    assert f"{range_text(bounds, 151)} 0 missing, 0 extra, 1 different (different (151))" in t, out
    assert f"{range_text(bounds, 420)} 1 missing, 0 extra, 0 different (missing (420))" in t, out
    assert f"{range_text(bounds, 5000)} 0 missing, 1 extra, 0 different (extra (5000))" in t, out
    assert lines['public.We"ird'].startswith("differs at "), out
    assert "0 missing, 0 extra, 1 different in 1 of 3 key ranges" in lines['public.We"ird'], out
    assert "different (P41,41)" in lines['public.We"ird'], out
    assert lines["public.dropme"] == "missing source table (mirror analytics.public_dropme)", out
    assert lines["public.unmirrored"] == "missing mirror (the source table has rows)", out
    assert summary == "verify: 4 tables: 0 equal, 2 differ, 2 missing, 0 not compared", out

    # the same as JSON, one object per line
    r = w.command("verify", "--json", "--range-rows", 100, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert objs[-1] == {"summary": {"tables": 4, "equal": 0, "differ": 2, "missing": 2, "not_compared": 0}}
    jt = next(o for o in objs if o.get("table") == "t")
    assert (jt["verdict"], jt["missing"], jt["extra"], jt["different"], jt["key_ranges"]) == \
        ("differs", 1, 1, 1, 10), jt
    assert jt["text"] == t.replace(position_of(t), jt["position"]), jt
    i = sum(b <= 420 for b in bounds)
    assert {"from": [str(bounds[i - 1])], "to": [str(bounds[i])], "missing": 1, "extra": 0, "different": 0,
            "keys": [{"kind": "missing", "key": "(420)"}]} in jt["differing_ranges"], jt
    assert {"from": [str(bounds[-1])], "to": None, "missing": 0, "extra": 1, "different": 0,
            "keys": [{"kind": "extra", "key": "(5000)"}]} in jt["differing_ranges"], jt
    assert next(o for o in objs if o.get("table") == "dropme")["verdict"] == "missing"

    # --resync of a table without a mirror: re-snapshotted, its mirror made again, equal
    rc, lines, summary, out = verify(w, "--table", "public.unmirrored", "--resync")
    assert "app public.unmirrored: missing mirror (the source table has rows)" in out, out
    assert rc == 0 and lines["public.unmirrored"].startswith("equal (10 rows in 1 key range at "), out
    assert staging_pg.sql("SELECT kind, resolved_at IS NOT NULL FROM walpipe.divergences "
                          "WHERE table_name = 'unmirrored'", dbname="staging") == [("verify", True)]

    # --table narrows it; a bad name or source is a usage error
    rc, lines, summary, out = verify(w, "--source", "app", "--table", "public.t", "--range-rows", 100)
    assert rc == 1 and list(lines) == ["public.t"], out
    rc, lines, summary, out = verify(w, "--table", "public.nosuch")
    assert rc == 1 and lines == {"public.nosuch": "not found: no such table on the source and no mirror of it"}, out
    assert verify_usage(w, "--source", "nosuch") == 2
    assert verify_usage(w, "--table", "no_dot") == 2
    r = w.command("run", "--resync")
    assert r.returncode == 2 and "--resync goes with the verify command" in r.stderr
    r = w.command("run", "--json")
    assert r.returncode == 2 and "--json goes with the verify, check and status commands" in r.stderr
    assert w.stop() == 0


def verify_usage(w, *args):
    return w.command("verify", *args, timeout=60).returncode


# --------------------------------------------------------------------------
# every column type the fidelity test writes, keys of several kinds; verify agrees with the ordered
# checksum, and one value off in a hard type is found

ENUM_KEYS = """
CREATE TYPE color AS ENUM ('red', 'green', 'blue');
CREATE TABLE ek (c color, n int, note text, PRIMARY KEY (c, n));
INSERT INTO ek SELECT (ARRAY['red', 'green', 'blue']::color[])[g % 3 + 1], g, 'n' || g FROM generate_series(1, 90) g;
"""


def test_every_type_equal_then_one_value_off(source_pg, staging_pg, walpipe_factory):
    from test_core import setup_source
    from test_workers import CHANGES, ROWS, TABLE_KEYS, TYPES_SCHEMA
    setup_source(source_pg, schema=TYPES_SCHEMA)
    w = start(walpipe_factory, staging_pg, source_pg, workers=2)
    for stmt in ROWS + CHANGES + [ENUM_KEYS]:
        source_pg.sql(stmt, dbname="app")
    wait_applied(source_pg, staging_pg, w)
    for t, k in TABLE_KEYS.items():
        assert_mirrored(source_pg, staging_pg, t, k)
    # an enum key is text in the mirror: both sides order it by its text (red < green by the enum)
    src = source_pg.sql("SELECT c::text, n, note FROM ek ORDER BY c::text COLLATE \"C\", n", dbname="app")
    assert src == staging_pg.sql("SELECT c, n, note FROM analytics.public_ek ORDER BY c COLLATE \"C\", n",
                                 dbname="staging")

    rc, lines, summary, out = verify(w, "--range-rows", 20)
    assert rc == 0, out
    for t in list(TABLE_KEYS) + ["ek"]:
        assert lines[f"public.{t}"].startswith("equal ("), out
    assert lines["public.ek"].startswith("equal (90 rows in 5 key ranges at "), out

    staging_pg.sql("UPDATE analytics.public_all_types SET tstz = tstz + interval '1 microsecond' WHERE id = 3",
                   dbname="staging")
    staging_pg.sql("UPDATE analytics.public_ek SET note = 'off' WHERE c = 'green' AND n = 1", dbname="staging")
    rc, lines, summary, out = verify(w, "--range-rows", 20)
    assert rc == 1, out
    assert "0 missing, 0 extra, 1 different in 1 of " in lines["public.all_types"], out
    assert "(different (3))" in lines["public.all_types"], out
    # the ranges of ek in text order of its enum key: every 20th of the 90 keys
    keys = [r[0] for r in staging_pg.sql("SELECT ROW(c, n::text)::text FROM analytics.public_ek "
                                         "ORDER BY c COLLATE \"C\", n", dbname="staging")]
    assert "0 missing, 0 extra, 1 different in 1 of 5 key ranges" in lines["public.ek"], out
    r = keys.index("(green,1)") // 20
    lo = keys[20 * r] if r else "start"
    hi = f"{keys[20 * (r + 1)]})" if 20 * (r + 1) < len(keys) else "end]"
    assert f"[{lo}, {hi} 0 missing, 0 extra, 1 different (different (green,1))" in lines["public.ek"], out
    assert w.stop() == 0


# --------------------------------------------------------------------------
# under pgbench load: the load changes pgbench_accounts (and the other tables) while verify runs

ACCOUNTS = 20000
RANGE_ROWS = 2000  # 10 key ranges of accounts

LOAD_SCRIPT = """\\set aid random(1001, 20000)
\\set bid 1
\\set tid random(1, 10)
\\set delta random(-5000, 5000)
\\set c1 random(1, 300)
\\set c2 random(1, 300)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO churn VALUES (:c1, :delta) ON CONFLICT (k) DO UPDATE SET v = excluded.v;
DELETE FROM churn WHERE k = :c2;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"""


class Load:
    """pgbench's TPC-B-like transactions at a steady rate until stopped (accounts 1-1000 are left
    alone, so hand-made differences there stay differences), plus an insert and a delete of
    random keys of churn (deleted keys: the mirror's tombstones move past verify's position too).
    The branch row serializes the transactions before churn, so they cannot deadlock."""

    def __init__(self, source_pg, tmp_path):
        script = Path(tmp_path) / "load.sql"
        script.write_text(LOAD_SCRIPT)
        cmd = [str(PGBENCH), "-h", str(source_pg.socket_dir), "-p", str(source_pg.port), "-U", "postgres",
               "-n", "-c", "2", "-j", "2", "-R", "40", "-T", "600", "-f", str(script), "app"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.source_pg = source_pg

    def stop(self):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        wptest.wait_client_gone(self.source_pg, "app")  # its last transaction may commit after it exited
        return out


def fill(source_pg):
    """pgbench's tables at a fifth of scale 1 (20 000 accounts: the resync copies them all), and churn."""
    source_pg.sql(f"CREATE TABLE churn (k int PRIMARY KEY, v int); "
                  f"INSERT INTO churn SELECT g, 0 FROM generate_series(1, 300, 2) g; "
                  f"INSERT INTO pgbench_branches VALUES (1, 0, ''); "
                  f"INSERT INTO pgbench_tellers SELECT g, 1, 0, '' FROM generate_series(1, 10) g; "
                  f"INSERT INTO pgbench_accounts SELECT g, 1, 0, '' FROM generate_series(1, {ACCOUNTS}) g",
                  dbname="app")


def history_top(source_pg):
    return source_pg.scalar("SELECT coalesce(max(hid), 0) FROM pgbench_history", dbname="app")


def accounts_changed_after(staging_pg, lsn):
    """Staged changes of pgbench_accounts after lsn: the source's accounts moved on after it."""
    return staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name = 'pgbench_accounts' "
                             "AND event_type = 'update' AND lsn > %s::pg_lsn", (lsn,), dbname="staging")


def accounts_equal(line):
    """An equal line of pgbench_accounts: every account compared or named as not settled (the load
    changed it after every position verify took; it neither inserts nor deletes accounts)."""
    m = re.match(r"equal \((\d+) rows in 10 key ranges at [0-9A-F]+/[0-9A-F]+(?:; (\d+) keys? changed after every "
                 r"position and (?:is|are) not settled: [^;]*)?\)$", line)
    assert m, line
    return int(m.group(1)) + int(m.group(2) or 0) == ACCOUNTS


def position_of(line):
    m = re.search(r" at ([0-9A-F]+/[0-9A-F]+)", line)
    assert m, line
    return m.group(1)


def test_under_pgbench_load_equal_then_resync(source_pg, staging_pg, walpipe_factory, tmp_path):
    pgbench_source(source_pg)
    w = start(walpipe_factory, staging_pg, source_pg, workers=2)
    fill(source_pg)
    wait_applied(source_pg, staging_pg, w, timeout=300)

    load = Load(source_pg, tmp_path)
    try:
        # the load is running: wait until it has committed something
        top = history_top(source_pg)
        wait_until(lambda: history_top(source_pg) > top + 20, timeout=60, what="pgbench load")
        before = history_top(source_pg)
        rc, lines, summary, out = verify(w, "--range-rows", RANGE_ROWS)
        after = history_top(source_pg)
        assert rc == 0, out
        for t in list(PGBENCH_TABLES) + ["churn"]:
            assert lines[f"public.{t}"].startswith("equal ("), out
        assert accounts_equal(lines["public.pgbench_accounts"]), out
        # the load really ran while verify did, and changed accounts after the position compared
        assert after > before, (before, after)
        p = position_of(lines["public.pgbench_accounts"])
        wait_until(lambda: accounts_changed_after(staging_pg, p) > 0, timeout=60,
                   what="an accounts change after the position")

        # hand-made differences where the load does not write: a changed balance, a missing account
        mirror = "analytics.public_pgbench_accounts"
        staging_pg.sql(f"UPDATE {mirror} SET abalance = abalance + 12345 WHERE aid = 777", dbname="staging")
        staging_pg.sql(f"DELETE FROM {mirror} WHERE aid = 5", dbname="staging")
        bounds = mirror_ranges(staging_pg, mirror, "aid", RANGE_ROWS)  # the load neither inserts nor deletes accounts
        assert len(bounds) == 9
        rc, lines, summary, out = verify(w, "--table", "public.pgbench_accounts", "--resync",
                                         "--range-rows", RANGE_ROWS)
        assert "differs at " in out and "1 missing, 0 extra, 1 different in 1 of 10 key ranges" in out, out
        assert f"{range_text(bounds, 5)} 1 missing, 0 extra, 1 different (missing (5), different (777))" in out, out
        assert "app: resynced 1 table(s); verifying them again" in out, out
        assert rc == 0, out
        assert accounts_equal(lines["public.pgbench_accounts"]), out
        assert summary == "verify: 1 table: 1 equal, 0 differ, 0 missing, 0 not compared", out
        div = staging_pg.sql("SELECT kind, resolved_at IS NOT NULL FROM walpipe.divergences "
                             "WHERE table_name = 'pgbench_accounts'", dbname="staging")
        assert div == [("verify", True)], div
    finally:
        load.stop()
    wait_applied(source_pg, staging_pg, w, timeout=300)
    for t, k in list(PGBENCH_TABLES.items()) + [("churn", ["k"])]:
        assert_mirrored(source_pg, staging_pg, t, k)
    assert w.stop() == 0


RESYNC_H = Path(__file__).resolve().parents[2] / "src" / "capture" / "resync.h"


@pytest.mark.skipif(not RESYNC_H.exists(),
                    reason="removing a mirror's extra rows needs the resync's truncate at the consistent point "
                           "(src/capture/resync.h, h-capture's branch); until then verify resyncs through "
                           "`walpipe snapshot`, which only upserts")
def test_resync_removes_extra_rows_under_load(source_pg, staging_pg, walpipe_factory, tmp_path):
    pgbench_source(source_pg)
    w = start(walpipe_factory, staging_pg, source_pg, workers=2)
    fill(source_pg)
    wait_applied(source_pg, staging_pg, w, timeout=300)
    load = Load(source_pg, tmp_path)
    try:
        staging_pg.sql("INSERT INTO analytics.public_pgbench_accounts (aid, bid, abalance, filler, _walpipe_lsn, "
                       "_walpipe_seq) VALUES (20001, 1, 0, '', '0/1', 1)", dbname="staging")
        rc, lines, summary, out = verify(w, "--table", "public.pgbench_accounts", "--resync",
                                         "--range-rows", RANGE_ROWS)
        # 20 001 mirror rows: the extra one starts an 11th range of its own
        assert "0 missing, 1 extra, 0 different in 1 of 11 key ranges: [(20001), end] 0 missing, 1 extra, " \
               "0 different (extra (20001))" in out, out
        assert "app: resynced 1 table(s); verifying them again" in out, out
        assert rc == 0, out
        assert accounts_equal(lines["public.pgbench_accounts"]), out
    finally:
        load.stop()
    wait_applied(source_pg, staging_pg, w, timeout=300)
    assert_mirrored(source_pg, staging_pg, "pgbench_accounts", ["aid"])
    assert w.stop() == 0
