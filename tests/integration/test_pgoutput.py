"""pgoutput as walpipe's input: the same raw_events rows as wal2json, and mirrors equal to their sources.

The differential test decodes one workload twice, from two slots at the same position (the
pgoutput slot is a copy of the wal2json slot), by two walpipes staging into two databases, and
compares the staged rows one by one.  The only differences allowed are where wal2json is lossy:
it prints NaN and +-Infinity as null; pgoutput keeps them, and the test checks the values it
keeps.
"""

import json
import re
import signal
import time

import psycopg2

import truth
import wptest
from test_core import setup_source, wait_caught_up
from test_workers import (CHANGES, ROWS, TABLE_KEYS, TYPES_SCHEMA, assert_mirrored, dead_letters, start,
                          wait_applied)
from wptest import wait_until

PUB = "walpipe pub"  # a name that needs quoting everywhere it goes

EXTRA_SCHEMA = r"""
CREATE TABLE t_full (id int PRIMARY KEY, v text, qty int, big text);
ALTER TABLE t_full REPLICA IDENTITY FULL;
CREATE TABLE specials (id int PRIMARY KEY, f4 real, f8 double precision, n numeric, i8 bigint);
"""
EXTRA_SCHEMA += 'CREATE TABLE "Odd ""Name""" ("K ey" text PRIMARY KEY, v int);\n'

EXTRA = [
    # REPLICA IDENTITY FULL: updates and deletes carry the whole old row ("before")
    "INSERT INTO t_full VALUES (1, 'one', 1, NULL), (2, NULL, 2, NULL), (3, 'three', 3, NULL)",
    "UPDATE t_full SET qty = 10 WHERE id = 1",
    "UPDATE t_full SET id = 4 WHERE id = 3",
    "DELETE FROM t_full WHERE id = 2",
    # wal2json loses these (null); pgoutput keeps them
    "INSERT INTO specials VALUES (1, 'NaN', 'Infinity', 'NaN', 1), (2, '-Infinity', '-Infinity', 'Infinity', 2), "
    "(3, 1.5, -0.0, '-Infinity', 9007199254740993)",
    "UPDATE specials SET f8 = 'NaN' WHERE id = 3",
    'INSERT INTO "Odd ""Name""" VALUES (\'a\', 1), (\'b\'\'c\', 2)',
    'UPDATE "Odd ""Name""" SET "K ey" = \'moved\' WHERE v = 1',
    # several tables in one truncate; messages in and out of transactions, one with a NUL cut off
    "TRUNCATE specials, t_full",
    "SELECT pg_logical_emit_message(true, 'app', 'in a transaction')",
    "SELECT pg_logical_emit_message(false, 'app', 'outside one')",
    "BEGIN; INSERT INTO kids VALUES (-1, 'msg'); SELECT pg_logical_emit_message(true, 'p', E'\\u00e9t\\u00e9'); "
    "SELECT pg_logical_emit_message(false, 'p', 'immediate'); COMMIT",
    "SELECT pg_logical_emit_message(true, 'bin', 'a\\000b'::bytea)",
    # over 8 MB of pgoutput messages in one transaction: streamed into staging before its Commit arrives
    "INSERT INTO trunc_me SELECT g, repeat('x', 200) || g FROM generate_series(100000, 150000) g",
]

COMPARED = ("lsn", "seq", "event_type", "schema_name", "table_name", "payload", "xid", "commit_ts")


def setup_two_slots(source_pg):
    """The database, its tables, the publication, a wal2json slot and a pgoutput copy of it."""
    source_pg.createdb("app")
    source_pg.sql(TYPES_SCHEMA + EXTRA_SCHEMA, dbname="app")
    # older than both slots: pgoutput reads publications as of each change's position
    source_pg.sql(f'CREATE PUBLICATION "{PUB}" FOR ALL TABLES', dbname="app")
    wptest.create_slot(source_pg, "app", "walpipe_app")
    source_pg.sql("SELECT pg_copy_logical_replication_slot('walpipe_app', 'walpipe_pgo', false, 'pgoutput')",
                  dbname="app")


def start_walpipe(walpipe_factory, staging_pg, source_pg, dbname, slot, name, **src_extra):
    w = walpipe_factory("[placeholder]\n", name=name)
    src = {"conninfo": source_pg.conninfo("app"), "slot": slot, "snapshot": "never"}
    src.update(src_extra)
    wptest.write_config(w.config_path, staging_pg.conninfo(dbname), {"app": src})
    with open(w.config_path, "a") as f:
        f.write("\n[workers]\ncount = 0\n")
    staging_pg.createdb(dbname)
    r = w.init()
    assert r.returncode == 0, r.stderr
    w.start()
    return w


def staged(staging_pg, dbname):
    rows = staging_pg.sql(
        "SELECT e.lsn::text, e.seq, e.event_type, e.schema_name, e.table_name, e.payload::text, e.xid, "
        "e.commit_ts, s.columns::text FROM walpipe.raw_events e "
        "LEFT JOIN walpipe.table_schemas s ON s.source = e.source AND s.shape_id = e.shape_id "
        "ORDER BY e.lsn, e.seq, e.id", dbname=dbname)
    return rows


def lossy(w2j, pgo):
    """True when row w2j differs from pgo only where wal2json prints NaN or +-Infinity as null
    (and pgoutput has the value's text there)."""
    if w2j[:5] != pgo[:5] or w2j[6:] != pgo[6:]:
        return False
    a, b = json.loads(w2j[5]), json.loads(pgo[5])
    if a.keys() != b.keys():
        return False
    for image in a:
        if not isinstance(a[image], dict) or a[image].keys() != b[image].keys():
            return a[image] == b[image]
        for col, v in a[image].items():
            if v != b[image][col] and not (v is None and b[image][col] in ("NaN", "Infinity", "-Infinity")):
                return False
    return True


def test_pgoutput_stages_what_wal2json_stages(source_pg, staging_pg, walpipe_factory):
    setup_two_slots(source_pg)
    w2j = start_walpipe(walpipe_factory, staging_pg, source_pg, "staging", "walpipe_app", "w2j")
    pgo = start_walpipe(walpipe_factory, staging_pg, source_pg, "staging_pgo", "walpipe_pgo", "pgo",
                        plugin="pgoutput", publication=PUB)
    for stmt in ROWS + CHANGES + EXTRA:
        source_pg.sql(stmt, dbname="app")
    wait_caught_up(source_pg, w2j, slot="walpipe_app")
    wait_caught_up(source_pg, pgo, slot="walpipe_pgo")
    a, b = staged(staging_pg, "staging"), staged(staging_pg, "staging_pgo")
    assert staging_pg.sql("SELECT reason FROM walpipe.dead_letters", dbname="staging_pgo") == []
    assert staging_pg.sql("SELECT reason FROM walpipe.dead_letters", dbname="staging") == []
    assert len(a) == len(b), f"wal2json staged {len(a)} rows, pgoutput {len(b)}"
    allowed = 0
    for ra, rb in zip(a, b):
        if ra != rb:
            assert lossy(ra, rb), f"rows differ:\nwal2json: {ra}\npgoutput: {rb}"
            allowed += 1
    # the lossy ones: specials' NaN and infinities (3 inserts, 1 update; the truncate has no values)
    specials = [json.loads(r[5]) for r in b if r[4] == "specials" and r[2] != "truncate"]
    assert specials[0]["after"] == {"id": 1, "f4": "NaN", "f8": "Infinity", "n": "NaN", "i8": 1}
    assert specials[1]["after"] == {"id": 2, "f4": "-Infinity", "f8": "-Infinity", "n": "Infinity", "i8": 2}
    assert specials[2]["after"]["n"] == "-Infinity" and specials[2]["after"]["i8"] == "9007199254740993"
    assert specials[3]["after"]["f8"] == "NaN"
    assert allowed == 4, f"{allowed} rows differ where wal2json is lossy"
    print(f"{len(a)} rows staged alike by both inputs but for {allowed} where wal2json is lossy")
    # the workload's variety really reached both (a check of the check)
    kinds = {(r[2], r[4]) for r in b}
    assert {("truncate", "t_full"), ("truncate", "specials"), ("message", None), ("update", "t_full"),
            ("delete", "t_full")} <= kinds
    full = [json.loads(r[5]) for r in b if r[4] == "t_full" and r[2] == "delete"]
    assert full == [{"before": {"id": 2, "v": None, "qty": 2, "big": None}}]
    assert w2j.stop() == 0
    assert pgo.stop() == 0


def test_pgoutput_mirrors_equal_their_sources(source_pg, staging_pg, walpipe_factory):
    """walpipe creates the slot and its publication (FOR TABLE the tables list), snapshots, streams
    and mirrors: every mirror equals its source."""
    source_pg.createdb("app")
    source_pg.sql(TYPES_SCHEMA + EXTRA_SCHEMA, dbname="app")
    source_pg.sql("INSERT INTO all_types (id, txt) VALUES (9000, 'before the slot')", dbname="app")
    tables = ["public.all_types", "public.kids", "public.trunc_me", "public.t_full"]
    w = start(walpipe_factory, staging_pg, source_pg, workers=2, tables=tables, run=False)
    # start() writes slot = walpipe_app and no plugin: add ours to the source section
    text = w.config_path.read_text().replace("[source app]\n", "[source app]\nplugin = pgoutput\n")
    w.config_path.write_text(text)
    w.start()
    wait_until(lambda: source_pg.scalar("SELECT count(*) FROM pg_publication_tables WHERE pubname = "
                                        "'walpipe_app'", dbname="app") == 4,
               timeout=60, what="walpipe's publication", walpipe=w)
    for stmt in ROWS + CHANGES + EXTRA[:4]:
        source_pg.sql(stmt, dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert dead_letters(staging_pg) == []
    for t, k in dict(TABLE_KEYS, t_full=["id"]).items():
        assert_mirrored(source_pg, staging_pg, t, k)
    assert staging_pg.scalar("SELECT count(*) FROM analytics.public_all_types WHERE id = 9000",
                             dbname="staging") == 1  # copied by the initial snapshot
    assert source_pg.scalar("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'walpipe_app'") == "pgoutput"
    assert 'created publication "walpipe_app" for the source\'s tables' in w.log()
    assert w.stop() == 0


def test_tables_added_later_join_walpipes_publication(source_pg, staging_pg, walpipe_factory):
    """A table added to `tables` after walpipe created its publication (FOR TABLE the list then) is
    added to it at the next start, so its changes are sent from then on; a named publication is
    never changed: walpipe warns with the ALTER PUBLICATION that fixes it."""
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE \"B c\" (id int PRIMARY KEY); "
                  "CREATE TABLE d (id int PRIMARY KEY)", dbname="app")
    w = start(walpipe_factory, staging_pg, source_pg, workers=0, tables=["public.a"], run=False)
    text = w.config_path.read_text().replace("[source app]\n", "[source app]\nplugin = pgoutput\n")
    w.config_path.write_text(text)
    w.start()
    wait_until(lambda: source_pg.scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walpipe_app'"),
               timeout=60, what="walpipe's slot", walpipe=w)
    wait_caught_up(source_pg, w)  # streaming: the rows below are changes, not the initial snapshot's
    source_pg.sql("INSERT INTO a VALUES (1); INSERT INTO \"B c\" VALUES (1)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    pubtables = "SELECT tablename FROM pg_publication_tables WHERE pubname = 'walpipe_app' ORDER BY 1"
    assert source_pg.sql(pubtables, dbname="app") == [("a",)]
    assert w.config_path.read_text().count('public.a') == 1
    w.config_path.write_text(w.config_path.read_text().replace('public.a', 'public.a, public."B c"'))
    w.start()
    wait_until(lambda: "added public.\"B c\" to publication \"walpipe_app\"" in w.log(), timeout=60,
               what="the new table added to the publication", walpipe=w)
    assert source_pg.sql(pubtables, dbname="app") == [("B c",), ("a",)]
    source_pg.sql("INSERT INTO \"B c\" VALUES (2); INSERT INTO a VALUES (2)", dbname="app")
    wait_caught_up(source_pg, w)
    staged = staging_pg.sql("SELECT table_name, payload->'after'->>'id' FROM walpipe.raw_events "
                            "WHERE event_type = 'insert' ORDER BY id", dbname="staging")
    # B c's row 1 was committed before it joined the publication: not sent (the warning says so)
    assert staged == [("a", "1"), ("B c", "2"), ("a", "2")], staged
    assert w.stop() == 0
    # the next start finds nothing to add
    w.start()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    assert w.log().count("to publication \"walpipe_app\"") == 1

    # a named publication lacking a listed table: a warning with the fix, the publication unchanged
    source_pg.sql("CREATE PUBLICATION mine FOR TABLE a", dbname="app")
    # (another source name: a checkpoint is tied to its slot)
    text = w.config_path.read_text().replace("slot = walpipe_app", "slot = walpipe_mine\npublication = mine")
    text = text.replace("[source app]", "[source mine]")
    text = text.replace('public.a, public."B c"', 'public.a, public.d')
    w.config_path.write_text(text)
    w.start()
    wait_until(lambda: 'publication "mine" (source "mine") does not publish public.d' in w.log(), timeout=60,
               what="the named publication's warning", walpipe=w)
    assert 'ALTER PUBLICATION "mine" ADD TABLE public.d' in w.log()
    wait_caught_up(source_pg, w, slot="walpipe_mine")
    assert source_pg.sql("SELECT tablename FROM pg_publication_tables WHERE pubname = 'mine'", dbname="app") == \
        [("a",)]
    assert w.stop() == 0


def check_line(w, check):
    """`walpipe check --json`'s object for check of source app."""
    r = w.command("check", "--json", timeout=180)
    objs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    found = [o for o in objs if o.get("check") == check and o.get("source") == "app"]
    assert len(found) == 1, r.stdout
    return found[0]


def test_named_publication_must_exist(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql("CREATE TABLE t (id int PRIMARY KEY); "
                  "CREATE TABLE nokey (v int PRIMARY KEY); ALTER TABLE nokey REPLICA IDENTITY NOTHING", dbname="app")
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "plugin": "pgoutput",
                                 "publication": "nope"}})
    staging_pg.createdb("staging")
    assert w.init().returncode == 0
    w.start()
    wait_until(lambda: 'publication "nope"' in w.log(), timeout=60, what="the publication error", walpipe=w)
    w.stop()
    log = w.log()
    assert 'publication "nope" (source "app") does not exist on the source' in log
    assert "CREATE PUBLICATION" in log
    # walpipe check says the same before a start, and the plugin check is the publication's
    o = check_line(w, "publication")
    assert o["status"] == "fail" and 'CREATE PUBLICATION "nope"' in o["fix"], o
    source_pg.sql("CREATE PUBLICATION nope FOR TABLE t", dbname="app")
    o = check_line(w, "publication")
    assert o["status"] == "pass" and "for a list of tables (1 table(s) now)" in o["message"], o
    r = w.command("check", "--json", timeout=180)
    assert '"check":"wal2json"' not in r.stdout
    o = check_line(w, "table")  # pgoutput's words for a table without a replica identity
    assert o["status"] == "fail" and "the source refuses its UPDATEs and DELETEs" in o["message"], o


# ---- streaming: rows keyed by the commit end predicted at Begin (reader.c) ----------------------

STREAM_SCHEMA = """
CREATE TABLE plain (id int PRIMARY KEY, pad text);
CREATE TABLE other (id int PRIMARY KEY, v text);
CREATE TABLE doomed (id int PRIMARY KEY);
CREATE TABLE emptied (id int PRIMARY KEY);
INSERT INTO emptied VALUES (1);
CREATE TABLE big (id int PRIMARY KEY, pad text);
CREATE TABLE first_one (id int PRIMARY KEY);
"""

# transactions whose commit record is longer than a plain one's 46 bytes
LONG_COMMITS = [
    # subtransactions that wrote rows (one rolled back), and a transactional message in one
    ["INSERT INTO other VALUES (1, 'a')", "SAVEPOINT s1", "INSERT INTO other VALUES (2, 'b')", "RELEASE s1",
     "SAVEPOINT s2", "INSERT INTO other VALUES (3, 'c')", "ROLLBACK TO s2", "SAVEPOINT s3",
     "SELECT pg_logical_emit_message(true, 'p', 'in a subtransaction')", "INSERT INTO other VALUES (4, 'd')"],
    # DDL: a new table and its first rows (a new shape, recorded under the prediction)
    ["CREATE TABLE made (id int PRIMARY KEY, v text)", "INSERT INTO made VALUES (1, 'x'), (2, 'y')"],
    ["ALTER TABLE other ADD COLUMN extra int", "UPDATE other SET extra = 7 WHERE id = 1"],
    # a dropped table (its files go with the commit)
    ["INSERT INTO other VALUES (5, 'e')", "DROP TABLE doomed"],
    ["TRUNCATE emptied", "INSERT INTO other VALUES (6, 'f')"],
]


def stream_walpipe(walpipe_factory, staging_pg, source_pg, staging_extra=None):
    """walpipe on slot walpipe_app (a pgoutput copy of the wal2json truth slot), logging at debug."""
    w = walpipe_factory("[placeholder]\n", name="pgo")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"),
                        {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app",
                                 "plugin": "pgoutput", "snapshot": "never"}},
                        staging_extra=staging_extra, walpipe_extra={"log_level": "debug"})
    with open(w.config_path, "a") as f:
        f.write("\n[workers]\ncount = 0\n")
    staging_pg.createdb("staging")
    r = w.init()
    assert r.returncode == 0, r.stderr
    w.start()
    return w


def truth_commits(source_pg):
    """(xid, commit start, commit end) of each transaction the truth slot holds (peeked, not consumed)."""
    rows = source_pg.sql("SELECT data FROM pg_logical_slot_peek_changes('truth', NULL, NULL, 'format-version', "
                         "'2', 'include-xids', '1', 'include-lsn', '1')", dbname="app")
    begins = [json.loads(d) for (d,) in rows if d.startswith('{"action":"B"')]
    return [(b["xid"], truth.lsn_int(b["lsn"]), truth.lsn_int(b["nextlsn"])) for b in begins]


def mispredicted(w):
    """The xids walpipe logged as mispredicted, each with (commit end, prediction)."""
    found = re.findall(r"pgoutput transaction (\d+): commit at \S+ ends at (\S+), not at the predicted (\S+)",
                       w.log())
    return {int(x): (truth.lsn_int(end), truth.lsn_int(pred)) for x, end, pred in found}


def test_mispredicted_commit_ends_are_relabelled(source_pg, staging_pg, walpipe_factory):
    """Rows are staged keyed by the commit end predicted at Begin (a plain 46-byte commit record,
    after a page header when it crosses a page).  Commits that are longer (subtransactions, DDL, a
    dropped table, a truncate) end elsewhere: their rows, shapes included, are relabelled before the
    checkpoint.  Every staged key equals wal2json's, and exactly the long commits were mispredicted:
    the plain ones, some crossing a WAL page, were predicted right."""
    setup_source(source_pg, schema=STREAM_SCHEMA, plugin="pgoutput")
    w = stream_walpipe(walpipe_factory, staging_pg, source_pg)
    conn = source_pg.connect("app", autocommit=False)
    long_xids = set()
    try:
        with conn.cursor() as cur:
            for i in range(1500):  # plain transactions of varied sizes: some commit records cross a page
                cur.execute("INSERT INTO plain VALUES (%s, repeat('x', %s))", (i, (i * 37) % 300))
                conn.commit()
                if i % 300 == 0:
                    stmts = LONG_COMMITS[i // 300]
                    for stmt in stmts:
                        cur.execute(stmt)
                    cur.execute("SELECT txid_current()")
                    long_xids.add(cur.fetchone()[0])
                    conn.commit()
    finally:
        conn.close()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0

    commits = truth_commits(source_pg)
    crossing = [c for c in commits if c[0] not in long_xids and c[1] // 8192 != (c[2] - 1) // 8192]
    assert crossing, "no plain commit record crossed a WAL page: the workload does not test the rule"
    wrong = mispredicted(w)
    assert set(wrong) == long_xids, (f"mispredicted {sorted(wrong)}, expected exactly the long commits "
                                     f"{sorted(long_xids)}")
    ends = {xid: end for xid, _, end in commits}
    assert all(ends[x] == end != pred for x, (end, pred) in wrong.items())

    expected = truth.read_truth(source_pg, "app", "truth")
    staged = truth.read_staged(staging_pg, "staging")
    truth.assert_exactly_once(expected, staged)
    keys = {e["lsn"] for e in expected}
    assert len(expected) == 1500 + 4 + 2 + 1 + 1 + 2
    # the shape first seen in a relabelled transaction carries its real commit end
    firsts = staging_pg.sql("SELECT table_name, first_lsn::text FROM walpipe.table_schemas", dbname="staging")
    assert {t for t, _ in firsts} >= {"plain", "other", "made"}
    assert all(truth.lsn_int(lsn) in keys for _, lsn in firsts), firsts
    print(f"{len(wrong)} mispredicted and relabelled; {len(crossing)} plain commits crossed a page")


def stager_waits_for_a_lock(staging_pg):
    return staging_pg.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walpipe_stager_app' "
                             "AND wait_event_type = 'Lock'", dbname="staging") == 1


def id_sequence(staging_pg):
    return staging_pg.scalar("SELECT last_value FROM walpipe.raw_events_id_seq", dbname="staging")


def test_a_streamed_transaction_commits_in_staging_whole(source_pg, staging_pg, walpipe_factory):
    """A big transaction is streamed into staging as it arrives, in one staging transaction that
    commits only after its Commit: with small batches (batch_rows 1000), and the checkpoint table
    locked once its first rows are copied, all of its rows get copied (ids taken) and none is
    visible; once the lock goes they all are, at once, with the checkpoint past the transaction."""
    n = 40000
    setup_source(source_pg, schema=STREAM_SCHEMA, plugin="pgoutput")
    w = stream_walpipe(walpipe_factory, staging_pg, source_pg, staging_extra={"batch_rows": 1000})
    source_pg.sql("INSERT INTO other VALUES (1, 'before')", dbname="app")
    wait_caught_up(source_pg, w)
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events", dbname="staging") == 1,
               what="the first row staged", walpipe=w)
    seq0 = id_sequence(staging_pg)
    source_pg.sql(f"INSERT INTO big SELECT g, repeat('y', 50) FROM generate_series(1, {n}) g", dbname="app")
    wait_until(lambda: id_sequence(staging_pg) > seq0, what="the big transaction's first rows copied", walpipe=w)
    locker = staging_pg.connect("staging", autocommit=False)
    try:
        locker.cursor().execute("LOCK TABLE walpipe.checkpoints IN EXCLUSIVE MODE")
        wait_until(lambda: id_sequence(staging_pg) - seq0 >= n and stager_waits_for_a_lock(staging_pg),
                   timeout=180, what=f"all {n} rows copied in one staging transaction, its commit waiting",
                   walpipe=w)
        assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name = 'big'",
                                 dbname="staging") == 0
    finally:
        locker.rollback()
        locker.close()
    wait_until(lambda: staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name = 'big'",
                                         dbname="staging") == n, what="the big transaction committed", walpipe=w)
    wait_caught_up(source_pg, w)
    assert staging_pg.sql("SELECT txn_end FROM walpipe.checkpoints", dbname="staging") == [(None,)]
    assert w.stop() == 0
    truth.assert_exactly_once(truth.read_truth(source_pg, "app", "truth"), truth.read_staged(staging_pg, "staging"))


def signal_taken(w):
    """True once no signal is pending for the process (its handler ran: the stop flag is set)."""
    with open(f"/proc/{w.pid}/status") as f:
        return any(line.startswith("ShdPnd:") and int(line.split()[1], 16) == 0 for line in f)


def test_a_stop_inside_a_transaction_rolls_its_rows_back(source_pg, staging_pg, walpipe_factory):
    """Stopped (SIGTERM) while a big transaction streams and before its Commit arrived: walpipe
    exits cleanly with none of the transaction's rows committed and the checkpoint before it, and
    the next start stages it whole, exactly once.  By condition: a new table's shape cannot be
    recorded (table_schemas locked), so the stager waits inside the transaction's first rows, the
    reader fills the queue, and the walsender blocks with the Commit unsent."""
    n = 100000
    setup_source(source_pg, schema=STREAM_SCHEMA, plugin="pgoutput")
    w = stream_walpipe(walpipe_factory, staging_pg, source_pg)
    wait_caught_up(source_pg, w)
    locker = staging_pg.connect("staging", autocommit=False)
    try:
        locker.cursor().execute("LOCK TABLE walpipe.table_schemas IN EXCLUSIVE MODE")
        source_pg.sql("BEGIN; INSERT INTO first_one VALUES (1); "
                      f"INSERT INTO big SELECT g, repeat('z', 50) FROM generate_series(1, {n}) g; COMMIT",
                      dbname="app")
        after = truth.lsn_int(source_pg.scalar("SELECT pg_current_wal_insert_lsn()::text", dbname="app"))

        def walsender_blocked():
            q = ("SELECT sent_lsn::text FROM pg_stat_replication WHERE pid = (SELECT active_pid "
                 "FROM pg_replication_slots WHERE slot_name = 'walpipe_app')")
            a = source_pg.scalar(q)
            time.sleep(1)
            b = source_pg.scalar(q)
            return a == b and b is not None and truth.lsn_int(b) < after and stager_waits_for_a_lock(staging_pg)
        wait_until(walsender_blocked, timeout=120, what="the walsender blocked inside the transaction", walpipe=w)
        w.signal(signal.SIGTERM)
        wait_until(lambda: signal_taken(w), timeout=30, what="walpipe to take the SIGTERM")
    finally:
        locker.rollback()
        locker.close()
    assert w.wait_exit(120) == 0
    assert "stopped inside a source transaction whose commit had not arrived" in w.log()
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.raw_events WHERE table_name IN ('big', 'first_one')",
                             dbname="staging") == 0
    ck = staging_pg.sql("SELECT lsn::text, txn_end FROM walpipe.checkpoints", dbname="staging")[0]
    assert truth.lsn_int(ck[0]) < after and ck[1] is None
    w.start()
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    truth.assert_exactly_once(truth.read_truth(source_pg, "app", "truth"), truth.read_staged(staging_pg, "staging"))


def test_a_backlog_of_transactions_commits_in_batches(source_pg, staging_pg, walpipe_factory):
    """Staging commits a pgoutput batch only between transactions; read from a backlog, segments
    fill up inside transactions, so each transaction that filled one ends its own segment at its
    Commit, where a full batch commits: no batch grows past batch_rows by more than the segment
    that filled it and the rest of the transaction under way."""
    txns, rows, batch_rows = 40, 1000, 2000
    setup_source(source_pg, schema=STREAM_SCHEMA, plugin="pgoutput")
    for t in range(txns):  # the backlog: written before walpipe starts
        source_pg.sql(f"INSERT INTO big SELECT g, repeat('b', 40) FROM generate_series({t * rows + 1}, "
                      f"{(t + 1) * rows}) g", dbname="app")
    w = stream_walpipe(walpipe_factory, staging_pg, source_pg, staging_extra={"batch_rows": batch_rows})
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    sizes = [n for (n,) in staging_pg.sql("SELECT count(*) FROM walpipe.raw_events GROUP BY batch_id",
                                          dbname="staging")]
    assert sum(sizes) == txns * rows
    most = batch_rows + 2000 + rows  # full, plus the segment that filled it (SEGMENT_MAX_ROWS), plus a transaction
    assert max(sizes) <= most, f"a batch of {max(sizes)} rows (batches: {sorted(sizes)})"
    truth.assert_exactly_once(truth.read_truth(source_pg, "app", "truth"), truth.read_staged(staging_pg, "staging"))
