"""Mirrors never diverge silently: rewrites the WAL does not show are detected and repaired.

ADD COLUMN with a volatile default and ALTER COLUMN TYPE ... USING rewrite the source table
without a row change in the WAL.  walpipe notices the rewrite from the source's catalog,
records an open divergence, and (resync = auto) re-snapshots the table with a truncate at the
snapshot's consistent point, while a writer keeps changing the table.  The mirror must end
equal to the source by the suite's ordered checksum, the divergence resolved, and
`walpipe verify` must agree.
"""

import os
import threading

import psycopg2
import pytest

from test_core import wait_caught_up
from test_workers import assert_mirrored, start, unprocessed, retrying
from wptest import wait_until


def open_divergences(staging_pg, kind=None):
    q = "SELECT schema_name, table_name, kind, lsn::text, reason FROM walpipe.divergences WHERE resolved_at IS NULL"
    params = None
    if kind:
        q += " AND kind = %s"
        params = (kind,)
    return staging_pg.sql(q, params, dbname="staging")


def resolved(staging_pg, kind):
    return staging_pg.scalar("SELECT count(*) FROM walpipe.divergences WHERE kind = %s AND resolved_at IS NOT NULL",
                             (kind,), dbname="staging")


def mirrored_now(source_pg, staging_pg, table, keys):
    try:
        assert_mirrored(source_pg, staging_pg, table, keys)
        return True
    except (AssertionError, psycopg2.Error):
        return False


def writer(source_pg, stop, table):
    conn = source_pg.connect("app")
    i = 0
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                i += 1
                cur.execute(f"UPDATE {table} SET s = s || 'x' WHERE id = %s", (i % 200 + 1,))
                cur.execute(f"INSERT INTO {table} (id, v, s) VALUES (%s, %s, 'w') ON CONFLICT (id) DO NOTHING",
                            (1000 + i, i))
                if i % 7 == 0:
                    cur.execute(f"DELETE FROM {table} WHERE id = %s", (1000 + i - 3,))
    finally:
        conn.close()


LONG = os.environ.get("WALPIPE_LONG") == "1"


# Under pgoutput with WALPIPE_LONG=1 only: ~75 s a pass, and what it adds to the default suite's
# pgoutput cover (a resync meeting pgoutput's held transactions) test_resync.py's requested resync
# under writes has; detection here reads the source's catalog, whatever the input.
@pytest.mark.parametrize("plugin", ["wal2json", pytest.param("pgoutput", marks=pytest.mark.skipif(
    not LONG, reason="rewrite detection is input-independent; the pgoutput resync is covered by test_resync.py "
                     "(run with WALPIPE_LONG=1)"))])
def test_rewrites_are_detected_and_resynced_under_writes(source_pg, staging_pg, walpipe_factory, plugin):
    """Under pgoutput walpipe creates the slot and its publication (FOR ALL TABLES) itself, and the
    automatic resyncs' truncates and copied rows meet pgoutput's held transactions."""
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE rw (id int PRIMARY KEY, v int, s text);"
                  "INSERT INTO rw SELECT g, g, 's' || g FROM generate_series(1, 500) g", dbname="app")
    w = start(walpipe_factory, staging_pg, source_pg, workers=2, plugin=plugin)
    wait_until(lambda: mirrored_now(source_pg, staging_pg, "rw", ["id"]), timeout=120, what="rw mirrored", walpipe=w)

    stop = threading.Event()
    t = threading.Thread(target=writer, args=(source_pg, stop, "rw"), daemon=True)
    t.start()
    try:
        # a type change whose USING changes every value: no row change in the WAL
        source_pg.sql("ALTER TABLE rw ALTER COLUMN v TYPE bigint USING v * 10", dbname="app")
        wait_until(lambda: resolved(staging_pg, "rewrite") >= 1, timeout=120,
                   what="the type rewrite recorded and resolved by a resync", walpipe=w)
        # a volatile default fills every existing row with its own value
        source_pg.sql("ALTER TABLE rw ADD COLUMN r double precision DEFAULT random()", dbname="app")
        wait_until(lambda: resolved(staging_pg, "rewrite") >= 2, timeout=120,
                   what="the volatile-default rewrite recorded and resolved by a resync", walpipe=w)
    finally:
        stop.set()
        t.join(timeout=60)
    wait_caught_up(source_pg, w)
    wait_until(lambda: unprocessed(staging_pg) == 0 and retrying(staging_pg) == 0
               and mirrored_now(source_pg, staging_pg, "rw", ["id"]),
               timeout=180, what="the mirror equal to the source after the resyncs", walpipe=w)
    assert open_divergences(staging_pg) == []
    assert source_pg.scalar("SELECT count(*) FROM rw WHERE r IS NULL", dbname="app") == 0
    assert source_pg.scalar("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'walpipe_app'") == plugin
    r = w.command("verify")
    assert r.returncode == 0, r.stdout + r.stderr
    w.stop()
