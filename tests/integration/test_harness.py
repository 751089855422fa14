"""Tests of the integration-test harness itself (wptest.py, conftest.py).
They need PostgreSQL 15 and wal2json, not the walpipe binary."""

import os
import pwd
import signal

import pytest

import wptest


def _proc_uid(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def _alive(pid):
    """True if pid exists and is not a zombie (the postmaster's parent,
    pg_ctl, has exited, so it may linger unreaped as a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_two_clusters_side_by_side(pg_factory):
    a = pg_factory("a")
    b = pg_factory("b", wal_sender_timeout="5s", logical_decoding_work_mem="64kB",
                   max_slot_wal_keep_size="64MB")
    assert a.port != b.port
    assert a.socket_dir != b.socket_dir
    assert os.path.exists(a.socket_dir / f".s.PGSQL.{a.port}")
    assert os.path.exists(b.socket_dir / f".s.PGSQL.{b.port}")
    for c in (a, b):
        assert c.scalar("SHOW wal_level") == "logical"
        assert c.scalar("SHOW max_replication_slots") == "20"
        assert c.scalar("SHOW max_wal_senders") == "20"
        assert c.scalar("SHOW fsync") == "off"
        assert c.scalar("SHOW listen_addresses") == ""
        assert c.scalar("SHOW port") == str(c.port)
        assert c.scalar("SHOW server_encoding") == "UTF8"
        assert c.scalar("SELECT current_user") == "postgres"
        assert c.scalar("SELECT version()").startswith("PostgreSQL 15")
        assert c.conninfo().startswith(f"host={c.socket_dir} port={c.port} dbname=postgres")
    assert a.scalar("SHOW wal_sender_timeout") == "1min"
    assert b.scalar("SHOW wal_sender_timeout") == "5s"
    assert b.scalar("SHOW logical_decoding_work_mem") == "64kB"
    assert b.scalar("SHOW max_slot_wal_keep_size") == "64MB"
    # each cluster has its own data
    a.sql("CREATE TABLE only_in_a (x int)")
    assert b.scalar("SELECT to_regclass('only_in_a')") is None


def test_runs_as_postgres_when_root(source_pg):
    uid = _proc_uid(source_pg.postmaster_pid())
    st = os.stat(source_pg.data_dir)
    if os.geteuid() == 0:
        pg_uid = pwd.getpwnam("postgres").pw_uid
        assert uid == pg_uid, "server must run as the postgres OS user when we are root"
        assert st.st_uid == pg_uid
        assert os.stat(source_pg.base_dir).st_uid == pg_uid
    else:
        assert uid == os.geteuid()
        assert st.st_uid == os.geteuid()
    # clients run as us, over the socket, as database user postgres
    assert source_pg.scalar("SELECT current_user") == "postgres"
    assert source_pg.scalar("SELECT inet_server_addr()") is None  # Unix socket


def test_wal2json_ground_truth_and_copy_slot(source_pg):
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE public.orders (id int PRIMARY KEY, note text)", dbname="app")
    lsn = wptest.create_slot(source_pg, "app", "s")
    assert lsn
    source_pg.sql("INSERT INTO public.orders VALUES (1, 'héllo')", dbname="app")
    wptest.copy_slot(source_pg, "app", "s", "s_copy")
    assert wptest.slot_info(source_pg, "s_copy")["plugin"] == "wal2json"

    changes = wptest.slot_changes_v2(source_pg, "app", "s")
    assert [c["action"] for c in changes] == ["B", "I", "C"]
    b, i, c = changes
    assert b["xid"] == i["xid"] == c["xid"]
    assert "timestamp" in b and "lsn" in i
    assert i["schema"] == "public" and i["table"] == "orders"
    assert {col["name"]: col["value"] for col in i["columns"]} == {"id": 1, "note": "héllo"}
    assert {col["name"]: col["type"] for col in i["columns"]} == {"id": "integer", "note": "text"}

    # the copy starts where the source slot was: it sees the same transaction
    assert wptest.slot_changes_v2(source_pg, "app", "s_copy") == changes
    # consumed: nothing pending on either
    assert wptest.slot_changes_v2(source_pg, "app", "s") == []

    source_pg.sql("UPDATE public.orders SET note = 'x' WHERE id = 1", dbname="app")
    peeked = wptest.slot_changes_v2(source_pg, "app", "s", peek=True)
    assert [c["action"] for c in peeked] == ["B", "U", "C"]
    assert wptest.slot_changes_v2(source_pg, "app", "s") == peeked
    assert [c["action"] for c in wptest.slot_changes_v2(source_pg, "app", "s_copy")] == \
        ["B", "U", "C"]
    wptest.drop_slot(source_pg, "app", "s_copy")
    assert wptest.slot_info(source_pg, "s_copy") is None


def test_immediate_stop_start_and_restart(source_pg):
    source_pg.sql("CREATE TABLE t (x int)")
    wptest.create_slot(source_pg, "postgres", "keep")
    source_pg.sql("INSERT INTO t SELECT generate_series(1, 100)")
    pid = source_pg.postmaster_pid()
    source_pg.stop("immediate")
    assert not source_pg.running and not source_pg.is_running()
    source_pg.start()
    assert source_pg.is_running()
    assert source_pg.postmaster_pid() != pid
    assert source_pg.scalar("SELECT count(*) FROM t") == 100
    assert wptest.slot_info(source_pg, "keep") is not None
    source_pg.restart()
    assert source_pg.scalar("SELECT count(*) FROM t") == 100
    # errors reach the server log (log_min_messages = warning)
    with pytest.raises(Exception):
        source_pg.sql("SELECT 1/0")
    assert "division by zero" in source_pg.server_log()


def test_destroy_and_context_manager():
    c = wptest.PgCluster("gone")
    base = c.base_dir
    c.start()
    assert c.scalar("SELECT 1") == 1
    assert c in wptest._LIVE_CLUSTERS
    c.destroy()
    assert not base.exists()
    assert c not in wptest._LIVE_CLUSTERS
    c.destroy()  # idempotent

    with pytest.raises(ZeroDivisionError):
        with wptest.PgCluster("cm") as cm:
            base = cm.base_dir
            assert cm.scalar("SELECT 2") == 2
            1 / 0
    assert not base.exists()
    assert cm not in wptest._LIVE_CLUSTERS


def test_stale_cluster_sweep():
    c = wptest.PgCluster("stale")
    c.start()
    base, pid = c.base_dir, c.postmaster_pid()
    # pretend its owner process is dead
    (base / wptest.OWNER_FILE).write_text("999999999 0\n")
    wptest.cleanup_stale()
    assert not base.exists()
    assert not _alive(pid), "postmaster of the stale cluster must be stopped"
    c.base_dir = None
    wptest._LIVE_CLUSTERS.remove(c)


FAKE_WALPIPE = """#!/bin/sh
echo "fake $*"
if [ "$1" = run ]; then
    trap 'echo "got TERM"; exit 3' TERM
    echo "ready FOO=$FOO"
    while :; do sleep 0.05; done
fi
exit 0
"""


def test_walpipe_wrapper_with_fake_binary(tmp_path):
    fake = tmp_path / "fake-walpipe"
    fake.write_text(FAKE_WALPIPE)
    fake.chmod(0o755)
    cfg = wptest.write_config(
        tmp_path / "wp.conf", "host=/tmp/x port=5433 dbname=staging user=postgres",
        {"app": {"conninfo": "host=/tmp/y port=5432 dbname=app user=postgres",
                 "slot": "walpipe_app", "tables": ["public.orders", "public.users"]}},
        staging_extra={"batch_rows": 100, "payload_gin_index": True})
    assert cfg.read_text() == (
        "[staging]\n"
        "conninfo = host=/tmp/x port=5433 dbname=staging user=postgres\n"
        "batch_rows = 100\n"
        "payload_gin_index = true\n"
        "\n"
        "[source app]\n"
        "conninfo = host=/tmp/y port=5432 dbname=app user=postgres\n"
        "slot = walpipe_app\n"
        "tables = public.orders, public.users\n")

    with wptest.Walpipe(cfg, tmp_path / "wp", binary=fake) as wp:
        r = wp.init()
        assert r.returncode == 0 and r.stdout == f"fake init --config {cfg}\n"
        wp.start(extra_env={"FOO": "bar"})
        wptest.wait_until(lambda: "ready FOO=bar" in wp.log(), timeout=10,
                          what="fake walpipe ready", walpipe=wp)
        assert wp.rss_peak_kb() > 0
        assert wp.stop(timeout=10) == 3
        assert "got TERM" in wp.log(since_start=True)
        with pytest.raises(RuntimeError):
            wp.rss_peak_kb()
        wp.start()
        assert wp.kill() == -signal.SIGKILL
        # a walpipe that exits makes wait_until fail at once, with its log
        wp.start()
        wptest.wait_until(lambda: "ready" in wp.log(since_start=True), timeout=10,
                          what="fake walpipe ready again", walpipe=wp)
        wp.signal(signal.SIGTERM)
        with pytest.raises(AssertionError, match="exited with code 3"):
            wptest.wait_until(lambda: False, timeout=10, what="never", walpipe=wp)
        assert wp.wait_exit(5) == 3

    # config text is written into the workdir
    wp2 = wptest.Walpipe("[staging]\nconninfo = x\n", tmp_path / "wp2", binary=fake)
    assert wp2.config_path.read_text() == "[staging]\nconninfo = x\n"
    wp2.close()


def test_wait_until_timeout_message():
    with pytest.raises(AssertionError, match="timed out after 0.2s waiting for the moon"):
        wptest.wait_until(lambda: False, timeout=0.2, what="the moon")
    assert wptest.wait_until(lambda: 42, timeout=1) == 42


def test_walpipe_factory_skips_without_binary(request):
    if wptest.walpipe_bin().exists():
        pytest.skip("walpipe binary present")
    with pytest.raises(pytest.skip.Exception):
        request.getfixturevalue("walpipe_factory")
