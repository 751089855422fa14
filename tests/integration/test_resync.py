"""Divergences walpipe learns of from the capture side, and resyncs that repair them.

- wal2json drops the UPDATEs and DELETEs of a table without a replica identity
  (REPLICA IDENTITY NOTHING, or no key under DEFAULT) and sends only a WARNING
  notice: walpipe records an open "dropped_change" divergence for the table at
  the commit LSN of the transaction, in the staging transaction of its
  checkpoint (a SIGKILL after it is staged keeps it, a re-decode adds none).
- A resync (`walpipe snapshot --table`, or `walpipe run` by itself with
  [workers] resync = auto) stages a truncate at its consistent point before
  the copied rows, so the mirror ends exactly equal to the source, rows the
  source no longer has included, while streaming goes on.

Mirrors are compared with their sources by the ordered checksum of test_workers.py.
"""

import threading
import time

import wptest
from test_core import wait_caught_up
from test_workers import assert_mirrored, checksum, columns, ident, start, wait_applied
from wptest import wait_until


def open_divergences(staging_pg, kind=None):
    return staging_pg.sql(
        "SELECT schema_name, table_name, kind, lsn::text, reason FROM walpipe.divergences "
        "WHERE resolved_at IS NULL AND (%s::text IS NULL OR kind = %s) ORDER BY id", (kind, kind), dbname="staging")


def commit_end_of(source_pg, slot, xid):
    """The commit end LSN (nextlsn of its B message) of transaction xid, as a wal2json slot decodes it."""
    for change in wptest.slot_changes_v2(source_pg, "app", slot, peek=True):
        if change.get("action") == "B" and change.get("xid") == xid:
            return change["nextlsn"]
    raise AssertionError(f"transaction {xid} not in slot {slot}")


def in_one_txn(source_pg, statements):
    """Runs statements in one source transaction; returns its xid."""
    conn = source_pg.connect("app", autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
            xid = cur.fetchone()[0]
            for s in statements:
                cur.execute(s)
        conn.commit()
        return xid
    finally:
        conn.close()


def setup_app(source_pg, schema_sql):
    source_pg.createdb("app")
    source_pg.sql(schema_sql, dbname="app")
    wptest.create_slot(source_pg, "app", "walpipe_app")
    wptest.create_slot(source_pg, "app", "truth")


# A schema and table whose names hold a dot, a quote and a non-ASCII letter (the notice
# prints them unescaped: "we.ird"."t"x.ü"), and a pair whose notice "x"."y"."z" splits
# two ways: walpipe finds which table staging knows.
WEIRD = 'we.ird', 't"x.ü'
AMBIGUOUS = 'x"."y', 'z'
DROPPED_SCHEMA = f"""
CREATE SCHEMA {ident(WEIRD[0])};
CREATE TABLE {ident(WEIRD[0])}.{ident(WEIRD[1])} (id int PRIMARY KEY, v text);
ALTER TABLE {ident(WEIRD[0])}.{ident(WEIRD[1])} REPLICA IDENTITY NOTHING;
CREATE SCHEMA {ident(AMBIGUOUS[0])};
CREATE TABLE {ident(AMBIGUOUS[0])}.{ident(AMBIGUOUS[1])} (id int PRIMARY KEY, v text);
ALTER TABLE {ident(AMBIGUOUS[0])}.{ident(AMBIGUOUS[1])} REPLICA IDENTITY NOTHING;
"""


def test_dropped_changes_recorded_and_kept_over_a_crash(source_pg, staging_pg, walpipe_factory):
    setup_app(source_pg, DROPPED_SCHEMA)
    weird = f"{ident(WEIRD[0])}.{ident(WEIRD[1])}"
    amb = f"{ident(AMBIGUOUS[0])}.{ident(AMBIGUOUS[1])}"
    w = start(walpipe_factory, staging_pg, source_pg, workers_extra={"resync": "off"})
    in_one_txn(source_pg, [f"INSERT INTO {weird} SELECT g, 'v' || g FROM generate_series(1, 5) g",
                           f"INSERT INTO {amb} SELECT g, 'v' || g FROM generate_series(1, 5) g"])
    wait_caught_up(source_pg, w)
    # wal2json drops all of these; it emits an empty B/C pair and WARNING notices
    x1 = in_one_txn(source_pg, [f"UPDATE {weird} SET v = 'changed' WHERE id <= 2",
                                f"DELETE FROM {weird} WHERE id = 5"])
    x2 = in_one_txn(source_pg, [f"DELETE FROM {amb} WHERE id = 1"])
    end1 = commit_end_of(source_pg, "truth", x1)
    end2 = commit_end_of(source_pg, "truth", x2)
    wait_until(lambda: len(open_divergences(staging_pg, "dropped_change")) == 2, timeout=60,
               what="two dropped_change divergences", walpipe=w)
    rows = open_divergences(staging_pg, "dropped_change")
    assert [(r[0], r[1], r[3]) for r in rows] == [(WEIRD[0], WEIRD[1], end1), (AMBIGUOUS[0], AMBIGUOUS[1], end2)]
    assert "UPDATEs and DELETEs" in rows[0][4] and "REPLICA IDENTITY" in rows[0][4], rows[0][4]
    assert "DELETEs" in rows[1][4] and "UPDATE" not in rows[1][4], rows[1][4]
    assert "diverged" in w.log(since_start=True)

    # a crash once the transactions are staged and acknowledged keeps the record, and
    # decoding them again (the slot may resend them) adds none
    wait_caught_up(source_pg, w)
    w.kill()
    w.start()
    in_one_txn(source_pg, [f"INSERT INTO {weird} VALUES (100, 'after')"])
    wait_caught_up(source_pg, w)
    assert [(r[0], r[1], r[3]) for r in open_divergences(staging_pg)] == [
        (WEIRD[0], WEIRD[1], end1), (AMBIGUOUS[0], AMBIGUOUS[1], end2)]
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.divergences", dbname="staging") == 2
    assert w.stop() == 0
