"""`walpipe replay --mirror`: a staged range handed to the transform workers again.

A mirror that lost rows (deleted from it by hand: no tombstone, nothing in the stream says
so) gets them back from staging, at their versions; rows outside the range or the --table
list stay lost, which shows the range is what was applied; a range older than staging
holds is refused with what is left.
"""

from test_core import setup_source
from test_workers import assert_mirrored, start, wait_applied

SCHEMA = """
CREATE TABLE a (id int PRIMARY KEY, v text NOT NULL);
CREATE TABLE b (id int PRIMARY KEY, v text NOT NULL);
"""


def mirror_count(staging_pg, table):
    return staging_pg.scalar(f"SELECT count(*) FROM analytics.public_{table}", dbname="staging")


def test_replay_mirror_restores_what_a_mirror_lost(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, "app", SCHEMA, "walpipe_app", "truth")
    w = start(walpipe_factory, staging_pg, source_pg, workers=2)
    source_pg.sql("INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 300) g", dbname="app")
    source_pg.sql("INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 300) g", dbname="app")
    source_pg.sql("UPDATE a SET v = v || '!' WHERE id <= 100", dbname="app")
    source_pg.sql("DELETE FROM a WHERE id > 290", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "a", ["id"])
    assert_mirrored(source_pg, staging_pg, "b", ["id"])
    first_b = staging_pg.scalar("SELECT min(lsn)::text FROM walpipe.raw_events WHERE table_name = 'b'",
                                dbname="staging")

    # the mirrors lose rows behind walpipe's back
    staging_pg.sql("DELETE FROM analytics.public_a WHERE id % 3 = 0", dbname="staging")
    staging_pg.sql("DELETE FROM analytics.public_b WHERE id % 3 = 0", dbname="staging")
    lost_b = mirror_count(staging_pg, "b")
    assert lost_b == 200

    # a range older than staging holds is refused, saying what is left
    r = w.command("replay", "--mirror", "--source", "app", "--from", "0/10")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "older than what staging still holds" in r.stderr and "oldest event is at lsn" in r.stderr

    # only table a, from the first staged event: a comes back whole (updates and deletes included), b stays short
    oldest = staging_pg.scalar("SELECT min(lsn)::text FROM walpipe.raw_events WHERE source = 'app'", dbname="staging")
    r = w.command("replay", "--mirror", "--source", "app", "--from", oldest, "--table", "public.a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "handed to the transform workers" in r.stdout
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "a", ["id"])
    assert mirror_count(staging_pg, "b") == lost_b

    # then b, by time: from the first commit of its rows
    ts = staging_pg.scalar("SELECT min(commit_ts)::text FROM walpipe.raw_events WHERE lsn = %s::pg_lsn",
                           (first_b,), dbname="staging")
    r = w.command("replay", "--mirror", "--source", "app", "--from-time", ts)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_applied(source_pg, staging_pg, w)
    assert_mirrored(source_pg, staging_pg, "a", ["id"])
    assert_mirrored(source_pg, staging_pg, "b", ["id"])
    assert w.stop() == 0
