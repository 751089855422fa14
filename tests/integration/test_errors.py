"""The errors a walpipe user will meet, produced for real.

Fatal ones (misconfigured source, refused checkpoints) must exit 1 with one
line that names the fix; transient ones (unreachable source or staging, lost
connection) must be retried without losing or doubling anything.
"""

import threading
import time

import pytest

import truth
import wptest
from test_core import LOAD_SCHEMA, _writer, setup_source, staged_count, start_walpipe, wait_caught_up
from wptest import wait_until


def error_lines(w):
    return [l for l in w.log(since_start=True).splitlines() if " ERROR " in l]


def expect_fatal(w, *needles, timeout=60):
    rc = w.wait_exit(timeout)
    assert rc == 1, f"exit code {rc}\n{w.log_tail()}"
    errors = error_lines(w)
    assert errors, w.log_tail()
    first = errors[0]
    for n in needles:
        assert n in first, f"{n!r} not in the first error line: {first}"
    return first


@pytest.mark.source_settings(wal_level="replica")
def test_wal_level_not_logical(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    expect_fatal(w, "wal_level", "hint: set wal_level = logical")


@pytest.mark.source_settings(dynamic_library_path="/nonexistent")
def test_wal2json_not_installed(source_pg, staging_pg, walpipe_factory):
    # the plugin is looked up on dynamic_library_path: pointing it elsewhere is what a missing package looks like
    source_pg.createdb("app")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    expect_fatal(w, "wal2json", "postgresql-15-wal2json")


def test_role_without_replication(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql("CREATE ROLE plain LOGIN")
    conninfo = source_pg.conninfo("app").replace("user=postgres", "user=plain")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": conninfo}})
    expect_fatal(w, "ALTER ROLE <user> WITH REPLICATION")


def test_staging_not_initialized(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    staging_pg.createdb("staging")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}}, init=False)
    expect_fatal(w, "walpipe init --config")


def test_bad_config_exits_2_with_file_and_line(tmp_path, walpipe_bin):
    cfg = tmp_path / "bad.conf"
    cfg.write_text("[staging]\nconninfo = dbname=x\n\n[source a]\nconninfo = dbname=y\nslots = s\n")
    w = wptest.Walpipe(str(cfg), tmp_path / "w", binary=walpipe_bin)
    r = w.command("run")
    assert r.returncode == 2
    assert f"{cfg}:6:" in r.stderr and "slots" in r.stderr, r.stderr
    w.close()


def test_source_unreachable_then_back(pg_factory, staging_pg, walpipe_factory):
    """The source server is down at first, then comes up before its database exists (the order of
    the race the issue reproduced, forced here): walpipe retries, loudly, until the database is
    there, because its first attempt failed for a passing reason (README, "Errors")."""
    source = pg_factory("source", start=False)
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source.conninfo("app")}})
    wait_until(lambda: "retrying in" in w.log(since_start=True), timeout=60, what="a retry", walpipe=w)
    assert "could not connect to source" in w.log(since_start=True)
    source.start()
    missing = 'database "app" does not exist'
    wait_until(lambda: w.log(since_start=True).count(missing) >= 2, timeout=120,
               what="two attempts that found no database app", walpipe=w)
    assert w.running
    setup_source(source, schema="CREATE TABLE t (id int PRIMARY KEY)")
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), timeout=120,
               what="streaming after the database was created", walpipe=w)
    source.sql("INSERT INTO t SELECT generate_series(1, 100)", dbname="app")
    wait_caught_up(source, w)
    assert w.stop() == 0
    truth.assert_exactly_once(truth.read_truth(source, "app", "truth"), truth.read_staged(staging_pg, "staging"))


def test_unknown_database_on_first_start_is_fatal(source_pg, staging_pg, walpipe_factory):
    """A source never staged from, reachable, without its database: a typo in the configuration."""
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("nosuch")}})
    expect_fatal(w, 'database "nosuch" does not exist', "hint: check dbname")


def test_source_database_away_under_a_running_walpipe_is_retried(source_pg, staging_pg, walpipe_factory):
    """The source database goes away under a running walpipe (closed to connections, then renamed,
    as during a restore) and comes back: walpipe retries loudly and resumes, losing nothing."""
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t SELECT generate_series(1, 10)", dbname="app")
    wait_caught_up(source_pg, w)
    # no new connection can reach app from here on; then every existing one goes
    source_pg.sql("ALTER DATABASE app ALLOW_CONNECTIONS false")
    source_pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'app'")
    wait_until(lambda: source_pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = 'app'") == 0,
               timeout=60, what="no session left in database app", walpipe=w)
    closed = 'database "app" is not currently accepting connections'
    wait_until(lambda: closed in w.log(since_start=True), timeout=120,
               what="an attempt refused by the closed database", walpipe=w)
    source_pg.sql("ALTER DATABASE app RENAME TO app_away")
    missing = 'database "app" does not exist'
    wait_until(lambda: w.log(since_start=True).count(missing) >= 2, timeout=120,
               what="two attempts that found no database app", walpipe=w)
    assert w.running
    errors = [l for l in error_lines(w) if missing in l]
    assert all("hint: check dbname" in l for l in errors), errors
    source_pg.sql("ALTER DATABASE app_away RENAME TO app")
    source_pg.sql("ALTER DATABASE app ALLOW_CONNECTIONS true")
    source_pg.sql("INSERT INTO t SELECT generate_series(11, 20)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    assert "has staged from before" in w.log(since_start=True)
    truth.assert_exactly_once(truth.read_truth(source_pg, "app", "truth"), truth.read_staged(staging_pg, "staging"))
    assert staged_count(staging_pg) == 20


def test_walsender_terminated_mid_stream(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema=LOAD_SCHEMA)
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}},
                      staging_extra={"batch_rows": 500})
    stop = threading.Event()
    t = threading.Thread(target=_writer, args=(source_pg, stop))
    t.start()
    try:
        for _ in range(3):
            base = staged_count(staging_pg)
            wait_until(lambda: staged_count(staging_pg) > base + 1000, timeout=120, what="progress", walpipe=w)
            # rows staged after a terminate may predate the reconnect: wait for a walsender to kill
            wait_until(lambda: source_pg.scalar("SELECT active_pid FROM pg_replication_slots "
                                                "WHERE slot_name = 'walpipe_app'"),
                       timeout=120, what="walpipe streaming again", walpipe=w)
            n = source_pg.scalar("SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots "
                                 "WHERE slot_name = 'walpipe_app' AND active_pid IS NOT NULL")
            assert n == 1
    finally:
        stop.set()
        t.join()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    assert w.log().count("streaming from slot") >= 4
    truth.assert_exactly_once(truth.read_truth(source_pg, "app", "truth"), truth.read_staged(staging_pg, "staging"))


def test_staging_unreachable_stops_acknowledging(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY, v text)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t SELECT g, 'a' FROM generate_series(1, 1000) g", dbname="app")
    wait_caught_up(source_pg, w)
    acked = wptest.slot_info(source_pg, "walpipe_app")["confirmed_flush_lsn"]
    staging_pg.stop("immediate")
    source_pg.sql("INSERT INTO t SELECT g, 'b' FROM generate_series(1001, 3000) g", dbname="app")
    wait_until(lambda: "retrying in" in w.log(since_start=True), timeout=90, what="a staging retry", walpipe=w)
    time.sleep(3)
    # nothing new is committed in staging, so nothing new may be acknowledged
    assert wptest.slot_info(source_pg, "walpipe_app")["confirmed_flush_lsn"] == acked
    staging_pg.start()
    wait_caught_up(source_pg, w, timeout=120)
    assert w.stop() == 0
    assert staged_count(staging_pg) == 3000
    truth.assert_exactly_once(truth.read_truth(source_pg, "app", "truth"), truth.read_staged(staging_pg, "staging"))


def test_undecodable_message_goes_to_dead_letters(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    # wal2json copies message content raw: a non-UTF-8 byte makes the message invalid JSON text
    conn = source_pg.connect("app", autocommit=False)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (1)")
        cur.execute("SELECT pg_logical_emit_message(true, 'bin', '\\xff41'::bytea)")
        cur.execute("INSERT INTO t VALUES (2)")
    conn.commit()
    conn.close()
    source_pg.sql("INSERT INTO t VALUES (3)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    rows = staging_pg.sql("SELECT payload->'after'->>'id', seq FROM walpipe.raw_events ORDER BY id", dbname="staging")
    assert rows == [("1", 1), ("2", 3), ("3", 1)]
    dead = staging_pg.sql("SELECT raw, reason, seq FROM walpipe.dead_letters", dbname="staging")
    assert len(dead) == 1
    raw, reason, seq = bytes(dead[0][0]), dead[0][1], dead[0][2]
    assert seq == 2
    assert b'"prefix":"bin"' in raw and b"\xff" in raw, raw
    assert "UTF-8" in reason or "utf-8" in reason.lower(), reason


def test_different_cluster_is_refused(source_pg, pg_factory, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    other = pg_factory("other", fresh=True)   # its own system identifier
    setup_source(other, schema="CREATE TABLE t (id int PRIMARY KEY)")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"), {"app": {"conninfo": other.conninfo("app")}})
    w.start()
    expect_fatal(w, "different cluster", "refusing")


def test_slot_ahead_of_checkpoint_is_refused(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    # changes staging never saw, then the slot moved past them by hand
    source_pg.sql("INSERT INTO t VALUES (2)", dbname="app")
    source_pg.sql("SELECT pg_replication_slot_advance('walpipe_app', pg_current_wal_lsn())", dbname="app")
    w.start()
    expect_fatal(w, "slot \"walpipe_app\" has confirmed", "silent gap")
    assert staged_count(staging_pg) == 1


def test_dropped_slot_is_refused(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    wptest.drop_slot(source_pg, "app", "walpipe_app")
    w.start()
    expect_fatal(w, "no longer exists", "silent gap")
    assert wptest.slot_info(source_pg, "walpipe_app") is None, "walpipe must not recreate a dropped slot"


def test_accepted_gap_is_recorded_and_streaming_goes_on(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    ck_before = staging_pg.scalar("SELECT lsn::text FROM walpipe.checkpoints", dbname="staging")
    source_pg.sql("INSERT INTO t VALUES (2)", dbname="app")
    source_pg.sql("SELECT pg_replication_slot_advance('walpipe_app', pg_current_wal_lsn())", dbname="app")
    ahead = wptest.slot_info(source_pg, "walpipe_app")["confirmed_flush_lsn"]
    w.start(args=["--accept-gap", "app"])
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming after the gap", walpipe=w)
    source_pg.sql("INSERT INTO t VALUES (3)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    gaps = staging_pg.sql("SELECT source, slot, from_lsn::text, to_lsn::text, reason FROM walpipe.accepted_gaps",
                          dbname="staging")
    assert gaps == [("app", "walpipe_app", ck_before, ahead, "slot had confirmed past the checkpoint")]
    ids = staging_pg.sql("SELECT payload->'after'->>'id' FROM walpipe.raw_events ORDER BY id", dbname="staging")
    assert ids == [("1",), ("3",)]   # row 2 is the accepted gap, and only it is missing
    assert "accepted a gap" in w.log()


def test_dropped_slot_with_accept_gap_is_recreated(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    wptest.drop_slot(source_pg, "app", "walpipe_app")
    source_pg.sql("INSERT INTO t VALUES (2)", dbname="app")
    w.start(args=["--accept-gap", "app"])
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming after the gap", walpipe=w)
    source_pg.sql("INSERT INTO t VALUES (3)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    gaps = staging_pg.sql("SELECT reason FROM walpipe.accepted_gaps", dbname="staging")
    assert gaps == [("slot was missing; created anew",)]
    ids = staging_pg.sql("SELECT payload->'after'->>'id' FROM walpipe.raw_events ORDER BY id", dbname="staging")
    assert ids == [("1",), ("3",)]


def test_accept_gap_names_an_unknown_source(source_pg, staging_pg, walpipe_factory, tmp_path):
    cfg = wptest.write_config(tmp_path / "w.conf", staging_pg.conninfo("staging"),
                              {"app": {"conninfo": source_pg.conninfo("app")}})
    w = walpipe_factory(str(cfg))
    r = w.command("run", "--accept-gap", "nosuch")
    assert r.returncode == 2 and "nosuch" in r.stderr, r.stderr


@pytest.mark.source_settings(max_slot_wal_keep_size="1MB", max_wal_size="32MB", min_wal_size="32MB")
def test_invalidated_slot_stops_loudly(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY, v text)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t VALUES (0, 'x')", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    # walpipe is down; the source writes far past max_slot_wal_keep_size and checkpoints
    for i in range(6):
        source_pg.sql(f"INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series({i * 20000 + 1}, "
                      f"{(i + 1) * 20000}) g", dbname="app")
        source_pg.sql("SELECT pg_switch_wal()")
        source_pg.sql("CHECKPOINT")
    assert wptest.slot_info(source_pg, "walpipe_app")["wal_status"] == "lost"
    w.start(args=["--accept-gap", "app"])   # even an accepted gap cannot revive a lost slot
    line = expect_fatal(w, "invalidated", "create a new one and re-snapshot")
    assert "walpipe_app" in line
