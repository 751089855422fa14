"""`walpipe check`: the production checklist, every failure produced for real.

Each test builds the bad setup on real clusters (wal_level = replica, a role
without REPLICATION, slots used up, a short wal_sender_timeout, tables
without a key or identity, staging not initialized or older, a role without
CREATE, an unreachable host, a wrong database) and checks the line that names
it and the exit code; one test checks an all-pass run on a good setup, with
and without a walpipe streaming, and that `walpipe run` with
log_format = json writes parseable JSON lines only.
"""

import json
import re

import pytest

import wptest
from wptest import wait_until

PASSWORD = "s3cret-check-pw"
LINE = re.compile(r"^  (pass|warn|fail)  (\S+)\s+(.*)$")


def check_config(w, staging_conninfo, sources, walpipe_extra=None, staging_extra=None):
    wptest.write_config(w.config_path, staging_conninfo, sources, staging_extra=staging_extra,
                        walpipe_extra=walpipe_extra)


def run_check(w, *args):
    """Runs `walpipe check`; returns (exit code, [(scope, status, check, text)], stdout)."""
    r = w.command("check", *args, timeout=180)
    assert PASSWORD not in r.stdout + r.stderr, "the password leaked"
    lines, scope = [], None
    for raw in r.stdout.splitlines():
        m = LINE.match(raw)
        if m:
            assert scope is not None, raw
            lines.append((scope, m.group(1), m.group(2), m.group(3)))
        elif raw.startswith("source ") or raw.startswith("staging ("):
            scope = raw.split(" (")[0]
        else:
            assert raw.startswith("walpipe ") or raw.startswith("check: "), f"unexpected line: {raw!r}"
    summary = r.stdout.strip().splitlines()[-1]
    counts = {s: sum(1 for l in lines if l[1] == s) for s in ("pass", "warn", "fail")}
    assert summary == f"check: {counts['pass']} pass, {counts['warn']} warn, {counts['fail']} fail", r.stdout
    assert r.returncode == (1 if counts["fail"] else 0), r.stdout + r.stderr
    return r.returncode, lines, r.stdout


def find(lines, scope, check, status=None, needle=None):
    """The lines of scope's check (with that status and text); asserts there is one."""
    got = [l for l in lines if l[0] == scope and l[2] == check
           and (status is None or l[1] == status) and (needle is None or needle in l[3])]
    assert got, f"no {status or ''} {check} line of {scope} with {needle!r} in:\n" + \
        "\n".join(" ".join(l) for l in lines)
    return got


GOOD_SCHEMA = """
CREATE TABLE accounts (id bigint PRIMARY KEY, name text);
CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text);
CREATE TABLE byindex (code text NOT NULL, v int);
CREATE UNIQUE INDEX byindex_code ON byindex (code);
ALTER TABLE byindex REPLICA IDENTITY USING INDEX byindex_code;
CREATE TABLE fullrow (id int PRIMARY KEY, v text);
ALTER TABLE fullrow REPLICA IDENTITY FULL;
"""


@pytest.mark.source_settings(max_slot_wal_keep_size="1GB")
def test_all_pass_then_streaming_with_json_logs(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql(GOOD_SCHEMA, dbname="app")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    sources = {"app": {"conninfo": source_pg.conninfo("app", password=PASSWORD)}}
    check_config(w, staging_pg.conninfo("staging", password=PASSWORD), sources,
                 walpipe_extra={"log_format": "json"})
    assert w.init().returncode == 0

    rc, lines, out = run_check(w)
    assert rc == 0
    assert [l for l in lines if l[1] != "pass"] == [], out
    for check in ("reachable", "wal_level", "replication_privilege", "replication_slots", "wal_senders",
                  "replication_connection", "wal2json", "wal_sender_timeout", "max_slot_wal_keep_size", "slot",
                  "tables"):
        find(lines, "source app", check, "pass")
    for check in ("reachable", "schema_version", "mirror_schema"):
        find(lines, "staging", check, "pass")
    find(lines, "source app", "tables", "pass", "4 captured table(s)")
    find(lines, "source app", "slot", "pass", "does not exist yet")
    # Debian's wal2json is 2.5: the probe bounds the version, it does not invent one
    find(lines, "source app", "wal2json", "pass", "loads and accepts walpipe's options; version ")
    # the probe's temporary slot is gone
    assert source_pg.scalar("SELECT count(*) FROM pg_replication_slots") == 0

    # --json: one object per check, then the summary
    r = w.command("check", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    objs = [json.loads(l) for l in r.stdout.splitlines()]
    assert objs[-1] == {"summary": {"pass": len(lines), "warn": 0, "fail": 0}}
    assert [(o["scope"], o["check"], o["status"]) for o in objs[:-1]] == \
        [(l[0].split(" ")[0], l[2], l[1]) for l in lines]
    assert all(set(o) == {"scope", "source", "check", "status", "message", "fix"} for o in objs[:-1])

    # a streaming walpipe: its slot and its WAL sender count as present; its log is JSON lines only
    w.start()
    wait_until(lambda: "streaming from slot" in w.log(since_start=True), what="streaming", walpipe=w)
    source_pg.sql("INSERT INTO accounts SELECT g, 'n' FROM generate_series(1, 100) g", dbname="app")
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE event_type = 'insert'",
                                         dbname="staging") == 100, what="100 inserts staged", walpipe=w)
    wait_until(lambda: source_pg.scalar("SELECT active FROM pg_replication_slots WHERE slot_name = 'walpipe_app'"),
               what="walpipe's slot active", walpipe=w)
    # its own log file: the run's log must hold the run's lines only
    checker = walpipe_factory(str(w.config_path), name="checker")
    rc, lines, out = run_check(checker)
    assert rc == 0, out
    find(lines, "source app", "slot", "pass", "active (walsender pid")
    find(lines, "source app", "wal_senders", "pass", "(one streams from walpipe's slot)")
    find(lines, "source app", "replication_slots", "pass", "walpipe's slot among them")
    assert w.stop() == 0
    log = w.log(since_start=True)
    records = []
    for raw in log.splitlines():
        if raw.startswith("=== wptest:"):
            continue
        rec = json.loads(raw)  # every line walpipe wrote is one JSON object
        assert set(rec) == {"time", "level", "component", "message"}, raw
        records.append(rec)
    assert any(r["message"].startswith("streaming from slot") for r in records), log
    assert any(r["component"] == "main" and r["message"] == "walpipe stopped" for r in records), log


@pytest.mark.source_settings(wal_level="replica")
def test_wal_level_replica(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE t (id int PRIMARY KEY)", dbname="app")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    check_config(w, staging_pg.conninfo("staging"), {"app": {"conninfo": source_pg.conninfo("app")}})
    assert w.init().returncode == 0
    rc, lines, out = run_check(w)
    assert rc == 1
    find(lines, "source app", "wal_level", "fail", "wal_level is replica; logical decoding needs logical; "
         "fix: ALTER SYSTEM SET wal_level = logical, then restart the source")
    find(lines, "source app", "wal2json", "warn", "not checked")
    assert [l for l in lines if l[1] == "fail"] == find(lines, "source app", "wal_level", "fail"), out


def test_roles_without_replication_or_create_and_old_staging(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE t (id int PRIMARY KEY)", dbname="app")
    source_pg.sql("CREATE ROLE plain LOGIN")
    staging_pg.createdb("staging")
    staging_pg.sql("CREATE ROLE stager LOGIN")
    w = walpipe_factory("[placeholder]\n")
    # initialized by the owner, then one migration forgotten: older than the binary
    check_config(w, staging_pg.conninfo("staging"), {"app": {"conninfo": source_pg.conninfo("app")}})
    assert w.init().returncode == 0
    binary = staging_pg.scalar("SELECT max(version) FROM walpipe.schema_migrations", dbname="staging")
    staging_pg.sql("GRANT USAGE ON SCHEMA walpipe TO stager; GRANT SELECT ON walpipe.schema_migrations TO stager; "
                   "REVOKE CREATE ON DATABASE staging FROM PUBLIC; "
                   "DELETE FROM walpipe.schema_migrations WHERE version = "
                   "(SELECT max(version) FROM walpipe.schema_migrations)", dbname="staging")
    older = staging_pg.scalar("SELECT max(version) FROM walpipe.schema_migrations", dbname="staging")
    check_config(w, staging_pg.conninfo("staging", user="stager"),
                 {"app": {"conninfo": source_pg.conninfo("app", user="plain")}})
    rc, lines, out = run_check(w)
    assert rc == 1
    find(lines, "source app", "reachable", "pass", 'as role "plain"')
    find(lines, "source app", "replication_privilege", "fail",
         'role "plain" has neither REPLICATION nor superuser')
    find(lines, "source app", "replication_privilege", "fail", 'fix: ALTER ROLE "plain" WITH REPLICATION')
    find(lines, "source app", "replication_connection", "fail", "fix: ALTER ROLE <user> WITH REPLICATION")
    find(lines, "source app", "wal2json", "warn", "not checked")
    find(lines, "staging", "schema_version", "fail",
         f"at version {older}, older than this walpipe's {binary}; `walpipe run` refuses to start; "
         f"fix: walpipe init --config {w.config_path}")
    find(lines, "staging", "mirror_schema", "fail",
         'role "stager" lacks CREATE on database "staging"')
    find(lines, "staging", "mirror_schema", "fail", 'fix: GRANT CREATE ON DATABASE "staging" TO "stager"')

    # with CREATE on the database, an existing mirror schema without CREATE for the role is named instead
    staging_pg.sql('GRANT CREATE ON DATABASE staging TO stager; CREATE SCHEMA analytics', dbname="staging")
    rc, lines, out = run_check(w)
    find(lines, "staging", "mirror_schema", "fail", 'lacks CREATE on schema "analytics"')
    # a configuration that starts no workers only warns: whoever runs them needs the right
    with open(w.config_path, "a") as f:
        f.write("\n[workers]\ncount = 0\n")
    rc, lines, out = run_check(w)
    find(lines, "staging", "mirror_schema", "warn", "this configuration starts no workers")
    staging_pg.sql('GRANT CREATE ON SCHEMA analytics TO stager', dbname="staging")
    rc, lines, out = run_check(w)
    find(lines, "staging", "mirror_schema", "pass", 'may create mirror tables in "analytics" (it exists)')


@pytest.mark.source_settings(max_replication_slots=2, max_wal_senders=1, wal_sender_timeout="1s")
def test_slots_and_senders_used_up_and_short_sender_timeout(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE t (id int PRIMARY KEY)", dbname="app")
    source_pg.sql("SELECT pg_create_physical_replication_slot('standby1')")
    wptest.create_slot(source_pg, "app", "someone_else", plugin="test_decoding")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    check_config(w, staging_pg.conninfo("staging"),
                 {"app": {"conninfo": source_pg.conninfo("app"), "status_interval_ms": 2000}})
    assert w.init().returncode == 0
    # another replication client holds the only WAL sender
    holder = source_pg.connect("app", replication="database")
    try:
        rc, lines, out = run_check(w)
    finally:
        holder.close()
    assert rc == 1
    find(lines, "source app", "wal_senders", "fail",
         "1 of max_wal_senders = 1 in use: none is free for walpipe; fix: raise max_wal_senders")
    find(lines, "source app", "replication_connection", "fail", "fix: no WAL sender or connection is free")
    find(lines, "source app", "replication_slots", "fail",
         '2 of max_replication_slots = 2 in use (walpipe\'s slot not created yet): none is free for slot '
         '"walpipe_app"; fix: raise max_replication_slots')
    find(lines, "source app", "wal2json", "warn", "no replication slot is free")
    find(lines, "source app", "wal_sender_timeout", "fail",
         "1000 ms is not above status_interval_ms = 2000")
    find(lines, "source app", "wal_sender_timeout", "fail", "lower status_interval_ms in [source app]")

    # walpipe's slot taken by another plugin under its name: named, with the fix
    wait_until(lambda: source_pg.scalar("SELECT count(*) FROM pg_stat_get_wal_senders()") == 0,
               what="the other client's WAL sender gone")
    source_pg.sql("SELECT pg_drop_replication_slot('standby1')")
    wptest.create_slot(source_pg, "app", "walpipe_app", plugin="test_decoding")
    source_pg.configure(wal_sender_timeout="3s")
    source_pg.reload()
    wait_until(lambda: source_pg.scalar("SHOW wal_sender_timeout") == "3s", what="the reload")
    rc, lines, out = run_check(w)
    find(lines, "source app", "slot", "fail", '"walpipe_app" exists but is not a wal2json logical slot of this '
         "database (type logical, plugin test_decoding")
    # walpipe's slot exists: it counts as present, so no free slot is a warning, not a failure
    find(lines, "source app", "replication_slots", "warn", "walpipe's slot among them): none left over")
    find(lines, "source app", "wal_sender_timeout", "warn", "less than twice status_interval_ms = 2000")
    find(lines, "source app", "wal_senders", "warn", "0 of max_wal_senders = 1 in use: none left over")
    find(lines, "source app", "replication_connection", "pass")


@pytest.mark.source_settings(max_slot_wal_keep_size="1MB")
def test_invalidated_slot(source_pg, staging_pg, walpipe_factory):
    """walpipe's slot falls more than max_slot_wal_keep_size behind and a checkpoint invalidates it."""
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE t (id int PRIMARY KEY, pad text)", dbname="app")
    wptest.create_slot(source_pg, "app", "walpipe_app")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    check_config(w, staging_pg.conninfo("staging"), {"app": {"conninfo": source_pg.conninfo("app")}})
    assert w.init().returncode == 0

    def lost():
        source_pg.sql("INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 20000) g "
                      "ON CONFLICT (id) DO UPDATE SET pad = excluded.pad", dbname="app")
        source_pg.sql("SELECT pg_switch_wal()")
        source_pg.sql("CHECKPOINT")
        return source_pg.scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walpipe_app'") \
            == "lost"
    wait_until(lost, timeout=120, interval=0.1, what="the slot invalidated")
    rc, lines, out = run_check(w)
    assert rc == 1
    find(lines, "source app", "slot", "fail", '"walpipe_app" has been invalidated (wal_status = lost)')
    find(lines, "source app", "slot", "fail", "fix: drop it (SELECT pg_drop_replication_slot('walpipe_app')), then "
         "`walpipe run --accept-gap app` creates a new one")
    find(lines, "source app", "max_slot_wal_keep_size", "pass", "1 MB: a slot further behind is invalidated")


@pytest.mark.source_settings(dynamic_library_path="/nonexistent")
def test_tables_without_key_or_identity_and_no_wal2json(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql("""
        CREATE TABLE ok (id int PRIMARY KEY, v text);
        CREATE TABLE nothing (id int PRIMARY KEY, v text);
        ALTER TABLE nothing REPLICA IDENTITY NOTHING;
        CREATE TABLE nokey (id int, v text);
        CREATE TABLE "Full No Key" (id int, v text);
        ALTER TABLE "Full No Key" REPLICA IDENTITY FULL;
        CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
        CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
        CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
        CREATE TABLE uniq (code text NOT NULL UNIQUE, v int);
    """, dbname="app")
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    tables = 'public.ok, public.nothing, public.nokey, public."Full No Key", public.missing, public.parted, ' \
             'public.scratch, public.uniq'
    check_config(w, staging_pg.conninfo("staging"), {"app": {"conninfo": source_pg.conninfo("app"),
                                                             "tables": tables}})
    assert w.init().returncode == 0
    rc, lines, out = run_check(w)
    assert rc == 1
    find(lines, "source app", "wal2json", "fail", "not installed")
    find(lines, "source app", "wal2json", "fail", "apt-get install postgresql-15-wal2json")
    find(lines, "source app", "table", "fail",
         '"public"."nothing": wal2json drops its UPDATEs and DELETEs (REPLICA IDENTITY NOTHING)')
    find(lines, "source app", "table", "fail", 'keyed on (id)')
    find(lines, "source app", "table", "fail", 'fix: ALTER TABLE "public"."nothing" REPLICA IDENTITY DEFAULT')
    find(lines, "source app", "table", "fail", '"public"."nokey" cannot be mirrored: it has no usable primary key')
    find(lines, "source app", "table", "fail", '"public"."nokey" cannot be mirrored: it has no usable primary key')
    assert "REPLICA IDENTITY DEFAULT, so its UPDATEs and DELETEs carry no key (wal2json drops them" in \
        find(lines, "source app", "table", "fail", '"public"."nokey"')[0][3]
    find(lines, "source app", "table", "fail", '"public"."Full No Key" cannot be mirrored: it has REPLICA IDENTITY '
         'FULL but no primary key')
    # mirrored by its unique index (keys.c), but without a primary key wal2json still drops its UPDATEs/DELETEs
    find(lines, "source app", "table", "fail", '"public"."uniq": wal2json drops its UPDATEs and DELETEs (REPLICA '
         'IDENTITY DEFAULT without a primary key), with only a warning; the mirror, keyed on (code)')
    find(lines, "source app", "table", "fail", 'fix: ALTER TABLE "public"."uniq" REPLICA IDENTITY USING INDEX')
    find(lines, "source app", "table", "warn", '"public"."missing" is in tables but not on the source')
    find(lines, "source app", "table", "fail", '"public"."parted" is a partitioned table')
    find(lines, "source app", "table", "fail", '"public"."scratch" is unlogged')
    find(lines, "source app", "tables", "pass", "1 other captured table(s) can be mirrored")
    assert not [l for l in lines if "Full No Key" in l[3] and "drops its UPDATEs" in l[3]], out
    assert len([l for l in lines if l[2] == "table"]) == 7, out


def test_unreachable_wrong_database_and_staging_not_initialized(source_pg, staging_pg, walpipe_factory):
    staging_pg.createdb("staging")
    w = walpipe_factory("[placeholder]\n")
    down = f"host=127.0.0.1 port={wptest.free_port()} dbname=app user=postgres password={PASSWORD} " \
           f"connect_timeout=5"
    check_config(w, staging_pg.conninfo("staging"), {
        "down": {"conninfo": down},
        "nodb": {"conninfo": source_pg.conninfo("nosuch", password=PASSWORD)},
    })
    rc, lines, out = run_check(w)
    assert rc == 1
    find(lines, "source down", "reachable", "fail", "fix: check host and port in the conninfo")
    find(lines, "source nodb", "reachable", "fail", 'database "nosuch" does not exist')
    find(lines, "source nodb", "reachable", "fail", "fix: check dbname in the conninfo, or create the database")
    # an unreachable source has its one line, nothing guessed
    assert [l[2] for l in lines if l[0] == "source down"] == ["reachable"]
    assert [l[2] for l in lines if l[0] == "source nodb"] == ["reachable"]
    find(lines, "staging", "reachable", "pass")
    find(lines, "staging", "schema_version", "fail", 'not initialized: there is no walpipe schema in database '
         f'"staging"; `walpipe run` refuses to start; fix: walpipe init --config {w.config_path}')
    assert "host=127.0.0.1" in out and "dbname=app" in out  # where it looked, without the password
    r = w.command("check", "--json")
    assert r.returncode == 1 and PASSWORD not in r.stdout
    objs = [json.loads(l) for l in r.stdout.splitlines()]
    assert objs[-1] == {"summary": {"pass": 2, "warn": 0, "fail": 3}}
    down_obj = objs[0]
    assert (down_obj["scope"], down_obj["source"], down_obj["check"], down_obj["status"]) == \
        ("source", "down", "reachable", "fail")
    assert down_obj["fix"].startswith("check host and port in the conninfo"), down_obj


def test_usage(tmp_path, walpipe_bin):
    w = wptest.Walpipe(str(tmp_path / "none.conf"), tmp_path / "w", binary=walpipe_bin)
    assert w.command("check").returncode == 2
    r = w.command("check", "--resync")
    assert r.returncode == 2 and "--resync goes with the verify command" in r.stderr
    w.close()
