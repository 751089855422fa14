"""Filters and masking (README "Filters and masking"): excluded tables and columns never land in
staging (raw_events, table_schemas, snapshots, mirrors), masked columns land masked everywhere
(inserts, updates, old rows of updates and deletes, snapshot rows, mirrors), and a filter or mask
on a key column is refused at start.  The sha256 masks are recomputed here with hashlib."""

import hashlib
import json

import wptest
from test_core import wait_caught_up
from test_workers import ident, unprocessed, retrying
from wptest import wait_until

SALT = "test-salt-\u00e9-0123456789"  # non-ASCII on purpose: the salt is hashed as UTF-8 bytes


def sha(text):
    return hashlib.sha256((SALT + text).encode("utf-8")).hexdigest()


def start(walpipe_factory, source_pg, staging_pg, source_extra, sections, run=True, workers=1):
    """A walpipe whose [source app] has source_extra keys, followed by the text of sections."""
    w = walpipe_factory("[placeholder]\n")
    src = {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app", **source_extra}
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"), {"app": src})
    with open(w.config_path, "a") as f:
        f.write(f"\n[workers]\ncount = {workers}\nretry_backoff_ms = 200\n\n" + sections)
    staging_pg.createdb("staging")
    r = w.init(extra_env={"WP_TEST_SALT": SALT})
    assert r.returncode == 0, r.stderr
    if run:
        w.start(extra_env={"WP_TEST_SALT": SALT})
    return w


def wait_applied(source_pg, staging_pg, w):
    wait_caught_up(source_pg, w)
    wait_until(lambda: unprocessed(staging_pg) == 0 and retrying(staging_pg) == 0, timeout=180, interval=0.1,
               what="every raw event processed", walpipe=w)


def staged(staging_pg, table):
    rows = staging_pg.sql("SELECT event_type, payload::text FROM walpipe.raw_events WHERE table_name = %s "
                          "ORDER BY id", (table,), dbname="staging")
    return [(t, json.loads(p)) for t, p in rows]


# --------------------------------------------------------------------------
# exclude_tables

EXCLUDED = [("public", "audit"), ("odd.schema", "a, b"), ("public", "It's"), ("public", "Case"),
            ("public", "back\\slash*")]
KEPT = [("public", "keep"), ("public", "case"), ("odd.schema", "a")]


def test_excluded_tables_never_staged(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql('CREATE SCHEMA "odd.schema"', dbname="app")
    for schema, table in EXCLUDED + KEPT:
        q = f"{ident(schema)}.{ident(table)}"
        source_pg.sql(f"CREATE TABLE {q} (id int PRIMARY KEY, v text); INSERT INTO {q} VALUES (1, 'before')",
                      dbname="app")
    def quoted(schema, table):
        return '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'
    exclude = ", ".join(quoted(s, t) for s, t in EXCLUDED)
    w = start(walpipe_factory, source_pg, staging_pg, {"exclude_tables": exclude}, "")
    wait_until(lambda: "initial snapshot done" in w.log(since_start=True), timeout=120, what="snapshot done",
               walpipe=w)
    for schema, table in EXCLUDED + KEPT:
        q = f"{ident(schema)}.{ident(table)}"
        source_pg.sql(f"INSERT INTO {q} VALUES (2, 'after'); UPDATE {q} SET v = 'changed' WHERE id = 1; "
                      f"DELETE FROM {q} WHERE id = 2; TRUNCATE {q}; INSERT INTO {q} VALUES (3, 'last')",
                      dbname="app")
    wait_applied(source_pg, staging_pg, w)

    def names(sql):
        return {tuple(r) for r in staging_pg.sql(sql, dbname="staging")}
    events = names("SELECT DISTINCT schema_name, table_name FROM walpipe.raw_events WHERE schema_name IS NOT NULL")
    shapes = names("SELECT DISTINCT schema_name, table_name FROM walpipe.table_schemas")
    snapshot = names("SELECT DISTINCT schema_name, table_name FROM walpipe.raw_events WHERE event_type = 'snapshot'")
    mirrors = names("SELECT schema_name, table_name FROM walpipe.mirrors")
    keys = names("SELECT schema_name, table_name FROM walpipe.source_tables")
    catalog = names("SELECT DISTINCT schema_name, table_name FROM walpipe.source_columns")
    copied = staging_pg.scalar("SELECT tables::text FROM walpipe.snapshots", dbname="staging")
    for what, got in [("raw_events", events), ("table_schemas", shapes), ("snapshot rows", snapshot),
                      ("mirrors", mirrors), ("source_tables", keys), ("source_columns", catalog)]:
        assert got == set(KEPT), (what, got)
    for schema, table in EXCLUDED:
        assert f"{schema}.{table}" not in copied, copied
    # the kept tables went the whole way: their mirrors equal the source
    for schema, table in KEPT:
        mschema, mtable = staging_pg.sql("SELECT mirror_schema, mirror_table FROM walpipe.mirrors WHERE "
                                         "schema_name = %s AND table_name = %s", (schema, table),
                                         dbname="staging")[0]
        rows = staging_pg.sql(f"SELECT id, v FROM {ident(mschema)}.{ident(mtable)} ORDER BY id", dbname="staging")
        assert rows == [(3, "last")], (schema, table, rows)
        assert rows == source_pg.sql(f"SELECT id, v FROM {ident(schema)}.{ident(table)} ORDER BY id", dbname="app")
    # verify compares the captured tables only: an excluded table has no mirror and is no difference
    r = w.command("verify", extra_env={"WP_TEST_SALT": SALT}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "audit" not in r.stdout, r.stdout
    assert w.stop() == 0


# --------------------------------------------------------------------------
# column filters and masks

USERS = """
CREATE TABLE users (id int PRIMARY KEY, email text, phone text, ssn text, dob date, notes text NOT NULL,
                    n int, b bytea, flag bool, price numeric, big text, "Odd, col" text,
                    score float8 NOT NULL DEFAULT 'NaN');
ALTER TABLE users REPLICA IDENTITY FULL;
ALTER TABLE users ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE "Wide T" (id int PRIMARY KEY, "Kept Col" text, secret text, other int);
INSERT INTO users VALUES (1, 'one@example.com', '+1 555', '111-11-1111', '1990-01-01', 'note 1', 42,
                          '\\x00ff', true, 1.50, NULL, 'odd 1');
INSERT INTO "Wide T" VALUES (1, 'k1', 'hidden 1', 7);
CREATE TABLE kv (id int PRIMARY KEY);
INSERT INTO kv VALUES (1);
"""

SECTIONS = """
[table app.public.users]
exclude_columns = ssn, dob, "Odd, col"
mask = email:sha256, phone:redact, notes:null, n:sha256, b:sha256, flag:sha256, price:sha256, big:sha256, score:null

[table app.public."Wide T"]
include_columns = id, "Kept Col"

[table app.public.kv]
exclude_columns = hidden
mask = token:sha256
"""

SECRETS = ["tok-secret", "hidden default", "111-11-1111", "222-22-2222", "1990-01-01", "1985-05-05", "hidden 1", "hidden 2", "odd 1", "odd 2",
           "one@example.com", "two@example.com", "+1 555", "+2 555", "note 1", "note 2", "note 3"]


def masked_user(id_, email, phone, n, b_hex, flag, price, big=None):
    """The row as staged: excluded columns absent, masked ones masked (big only when present)."""
    row = {"id": id_, "email": sha(email) if email is not None else None, "phone": "***" if phone else None,
           "notes": None, "n": sha(str(n)) if n is not None else None,
           "b": sha("\\x" + b_hex) if b_hex is not None else None,
           "flag": sha("true" if flag else "false") if flag is not None else None,
           "price": sha(price) if price is not None else None, "score": None}
    if big is not False:
        row["big"] = sha(big) if big is not None else None
    return row


def test_columns_excluded_and_masked_everywhere(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql(USERS, dbname="app")
    w = start(walpipe_factory, source_pg, staging_pg, {"mask_salt": "${WP_TEST_SALT}"}, SECTIONS)
    wait_until(lambda: "initial snapshot done" in w.log(since_start=True), timeout=120, what="snapshot done",
               walpipe=w)
    big = "B" * 5000
    source_pg.sql(f"""
        INSERT INTO users VALUES (2, 'two@example.com', '+2 555', '222-22-2222', '1985-05-05', 'note 2', -7,
                                  '\\xdeadbeef', false, 0.001, '{big}', 'odd 2');
        UPDATE users SET email = 'three@example.com', notes = 'note 3' WHERE id = 1;
        UPDATE users SET n = 8 WHERE id = 2;
        DELETE FROM users WHERE id = 1;
        INSERT INTO "Wide T" VALUES (2, 'k2', 'hidden 2', 8);
        UPDATE "Wide T" SET secret = 'hidden 3', "Kept Col" = 'k3' WHERE id = 1;
        DELETE FROM "Wide T" WHERE id = 2;
        ALTER TABLE kv ADD COLUMN token text DEFAULT 'tok-secret', ADD COLUMN hidden text DEFAULT 'hidden default';
        ALTER TABLE "Wide T" ADD COLUMN extra text DEFAULT 'hidden default';
    """, dbname="app")
    # the mirror gives rows that existed before ADD COLUMN ... DEFAULT the source's missing value: masked too
    source_pg.sql("INSERT INTO kv VALUES (2)", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    # score is NOT NULL on the source: its null is the mask's, not a NaN wal2json lost (no parked event)
    assert staging_pg.sql("SELECT reason FROM walpipe.dead_letters", dbname="staging") == []

    one = masked_user(1, "one@example.com", "+1 555", 42, "00ff", True, "1.50", None)
    one_after = dict(one, email=sha("three@example.com"))
    two = masked_user(2, "two@example.com", "+2 555", -7, "deadbeef", False, "0.001", big)
    two_after = dict(masked_user(2, "two@example.com", "+2 555", 8, "deadbeef", False, "0.001", False))
    want = [("snapshot", {"after": one}),
            ("insert", {"after": two}),
            ("update", {"after": one_after, "before": one}),
            # big is TOASTed and unchanged: absent from "after" (not hashed, not null), whole in "before"
            ("update", {"after": two_after, "before": two}),
            ("delete", {"before": one_after})]
    assert staged(staging_pg, "users") == want
    assert staged(staging_pg, "Wide T") == [
        ("snapshot", {"after": {"id": 1, "Kept Col": "k1"}}),
        ("insert", {"after": {"id": 2, "Kept Col": "k2"}}),
        ("update", {"after": {"id": 1, "Kept Col": "k3"}, "key": {"id": 1}}),
        ("delete", {"key": {"id": 2}})]
    # the same digest as SQL computes it on the source (the README's recipe)
    assert source_pg.scalar("SELECT encode(sha256(convert_to(%s || n::text, 'UTF8')), 'hex') FROM users "
                            "WHERE id = 2", (SALT,), dbname="app") == sha("8")

    # no excluded or unmasked value anywhere in staging, no excluded column in any shape
    dump = "\n".join(r[0] for r in staging_pg.sql(
        "SELECT payload::text FROM walpipe.raw_events UNION ALL SELECT columns::text FROM walpipe.table_schemas "
        "UNION ALL SELECT coalesce(convert_from(raw, 'UTF8'), '') FROM walpipe.dead_letters "
        "UNION ALL SELECT s::text FROM walpipe.source_columns s", dbname="staging"))
    for secret in SECRETS + ['"ssn"', '"dob"', "Odd, col", '"secret"', '"other"']:
        assert secret not in dump, secret
    shapes = staging_pg.sql("SELECT table_name, columns::text FROM walpipe.table_schemas", dbname="staging")
    seen = {"users": set(), "Wide T": set(), "kv": set()}
    for table, cols in shapes:
        cols = {c["name"]: c["type"] for c in json.loads(cols)}
        seen[table] |= set(cols)
        if table == "users":
            # a sha256 or redact mask stages text, so the shape says text; null keeps the type
            assert all(cols[c] == "text" for c in ("email", "phone", "n", "b", "flag", "price") if c in cols), cols
            assert cols.get("notes", "text") == "text" and cols["id"] == "integer", cols
    # each shape is a subset (a delete's shape is the key); together they are the columns staged
    assert seen == {"users": {"id", "email", "phone", "notes", "n", "b", "flag", "price", "big", "score"},
                    "Wide T": {"id", "Kept Col"}, "kv": {"id", "token"}}, seen

    # the mirrors hold the masked values and have no excluded column
    mcols = [r[0] for r in staging_pg.sql(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'analytics' "
        "AND table_name = 'public_users' AND column_name NOT LIKE '\\_walpipe\\_%' ORDER BY ordinal_position", dbname="staging")]
    assert set(mcols) == {"id", "email", "phone", "notes", "n", "b", "flag", "price", "big", "score"}, mcols
    got = staging_pg.sql("SELECT id, email, phone, notes, n, b, flag, price, big, score FROM analytics.public_users",
                         dbname="staging")
    assert got == [(2, two["email"], "***", None, sha("8"), two["b"], two["flag"], two["price"], two["big"],
                    None)], got
    wcols = {r[0] for r in staging_pg.sql(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'analytics' "
        "AND table_name = 'public_Wide T' AND column_name NOT LIKE '\\_walpipe\\_%'", dbname="staging")}
    assert wcols == {"id", "Kept Col"}, wcols
    assert staging_pg.sql('SELECT id, "Kept Col" FROM analytics."public_Wide T"', dbname="staging") == [(1, "k3")]
    assert staging_pg.sql("SELECT id, token FROM analytics.public_kv ORDER BY id", dbname="staging") == [
        (1, sha("tok-secret")), (2, sha("tok-secret"))]
    kvcols = staging_pg.sql("SELECT name, type, missing_value FROM walpipe.source_columns WHERE table_name = 'kv' "
                            "ORDER BY attnum", dbname="staging")
    assert kvcols == [("id", "integer", None), ("token", "text", sha("tok-secret"))], kvcols
    # verify skips the excluded and masked columns (and says so) and compares the rest
    r = w.command("verify", extra_env={"WP_TEST_SALT": SALT}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'source column "ssn" is excluded by the configuration (not compared)' in r.stdout, r.stdout
    assert 'column "email" is masked by the configuration (not compared)' in r.stdout, r.stdout
    assert SALT not in w.log()
    assert w.stop() == 0


# --------------------------------------------------------------------------
# keys cannot be filtered or masked

KEYED = """
CREATE TABLE t_pk (id int PRIMARY KEY, v text);
CREATE TABLE t_ri (a int NOT NULL, b int NOT NULL, v text);
CREATE UNIQUE INDEX t_ri_ab ON t_ri (a, b);
ALTER TABLE t_ri REPLICA IDENTITY USING INDEX t_ri_ab;
CREATE TABLE t_uq (code text NOT NULL UNIQUE, email text NOT NULL UNIQUE, v text);
CREATE TABLE tp (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE tp_1 PARTITION OF tp FOR VALUES FROM (0) TO (100);
"""


def test_key_columns_cannot_be_excluded_or_masked(source_pg, staging_pg, walpipe_factory):
    source_pg.createdb("app")
    source_pg.sql(KEYED, dbname="app")
    cases = [
        ("[table app.public.t_pk]\nexclude_columns = id\n", 'column "id" of table "public"."t_pk" is in its primary '
         'key, so it cannot be excluded', "remove it from exclude_columns in [table app.public.t_pk]"),
        ("[table app.public.t_pk]\ninclude_columns = v\n", 'column "id" of table "public"."t_pk" is in its primary '
         'key, so it cannot be excluded', "add it to include_columns"),
        ("[table app.public.t_pk]\nmask = id:sha256\n", 'column "id" of table "public"."t_pk" is in its primary key, '
         'so it cannot be masked', "remove its mask"),
        ("[table app.public.t_ri]\nmask = v:redact, b:null\n", 'column "b" of table "public"."t_ri" is in its '
         'replica identity index, so it cannot be masked', "remove its mask"),
        # no primary key: the mirror is keyed on the first unique index on NOT NULL columns
        ("[table app.public.t_uq]\nmask = code:sha256\n", 'column "code" of table "public"."t_uq" is in its unique '
         'index (the key of its mirror), so it cannot be masked', "remove its mask"),
        # a partitioned table's rows come under its partitions' names: naming it would filter nothing
        ("[table app.public.tp]\nmask = v:redact\n", 'table "public"."tp" is partitioned, so exclude_tables or a '
         '[table] section naming it filters nothing', "name its partitions instead (public.tp_1)"),
        ("", 'table "public"."tp" is partitioned', "name its partitions instead (public.tp_1)"),
    ]
    for i, (section, problem, hint) in enumerate(cases):
        if i:
            staging_pg.sql("DROP DATABASE staging")
        extra = {"mask_salt": "${WP_TEST_SALT}"} if section else {"exclude_tables": "public.tp"}
        w = start(walpipe_factory, source_pg, staging_pg, extra, section)
        rc = w.wait_exit(120)
        log = w.log(since_start=True)
        assert rc != 0, log
        assert problem in log and hint in log, log
        assert SALT not in log
        # refused before any slot or row: nothing of the table was staged
        assert source_pg.scalar("SELECT count(*) FROM pg_replication_slots") == 0
        # `walpipe check` says the same before a run
        r = w.command("check", extra_env={"WP_TEST_SALT": SALT})
        line = [x for x in r.stdout.splitlines() if x.split()[1:2] == ["filters"]]
        assert r.returncode == 1 and len(line) == 1 and line[0].split()[0] == "fail", r.stdout
        assert problem in line[0] and hint in line[0], line
        w.close()
    # the refusal is about the key only: masking v, and a unique column that is not the key, streams
    staging_pg.sql("DROP DATABASE staging")
    w = start(walpipe_factory, source_pg, staging_pg, {"mask_salt": "${WP_TEST_SALT}"},
              "[table app.public.t_ri]\nmask = v:redact\n[table app.public.t_uq]\nmask = email:redact\n")
    wait_until(lambda: "initial snapshot done" in w.log(since_start=True), timeout=120, what="snapshot done",
               walpipe=w)
    source_pg.sql("INSERT INTO t_ri VALUES (1, 2, 'x')", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert staged(staging_pg, "t_ri") == [("insert", {"after": {"a": 1, "b": 2, "v": "***"}})]
    r = w.command("check", extra_env={"WP_TEST_SALT": SALT})
    assert "pass  filters" in r.stdout and "2 table(s) with column filters or masks" in r.stdout, r.stdout
    source_pg.sql("INSERT INTO t_uq VALUES ('c1', 'e@x', 'v')", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert staged(staging_pg, "t_uq") == [("insert", {"after": {"code": "c1", "email": "***", "v": "v"}})]
    assert w.stop() == 0


# --------------------------------------------------------------------------
# dead letters

def test_dead_letters_withhold_raw_text_of_filtered_sources(source_pg, staging_pg, walpipe_factory):
    """A message the decoder rejects keeps its raw text in dead_letters, unless it may hold what
    the filters keep out: here a SQL_ASCII source sends bytes that are not UTF-8 in a row whose
    ssn column is excluded."""
    source_pg.sql("CREATE DATABASE app ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    source_pg.sql("CREATE TABLE users (id int PRIMARY KEY, ssn text, note text)", dbname="app")
    w = start(walpipe_factory, source_pg, staging_pg, {}, "[table app.public.users]\nexclude_columns = ssn\n")
    wait_until(lambda: "initial snapshot done" in w.log(since_start=True), timeout=120, what="snapshot done",
               walpipe=w)
    source_pg.sql("INSERT INTO users VALUES (1, '333-33-3333', E'bad \\xff byte'); "
                  "INSERT INTO users VALUES (2, '444-44-4444', 'fine')", dbname="app")
    wait_caught_up(source_pg, w)
    dead = staging_pg.sql("SELECT raw, reason FROM walpipe.dead_letters", dbname="staging")
    assert len(dead) == 1, dead
    raw = bytes(dead[0][0])
    assert b"333-33-3333" not in raw and raw.startswith(b"(raw text withheld"), raw
    assert "UTF-8" in dead[0][1], dead
    assert staged(staging_pg, "users") == [("insert", {"after": {"id": 2, "note": "fine"}})]
    assert w.stop() == 0
