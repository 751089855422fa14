"""The mirror against awkward tables: composite text keys, long and quoted names, user-defined
types, apply errors whose text is cut.  Each test compares mirror and source by the ordered
checksum of test_workers.py, or says exactly what must be in walpipe.dead_letters.
"""

from test_core import setup_source, wait_caught_up
from test_workers import (assert_mirrored, dead_letters, stage_only, start, start_work, unprocessed, wait_applied,
                          wait_dead)
from wptest import wait_until


def mirror_table(staging_pg, schema, table):
    """The mirror table's (schema, name) as walpipe.mirrors records it."""
    rows = staging_pg.sql("SELECT mirror_schema, mirror_table FROM walpipe.mirrors "
                          "WHERE source = 'app' AND schema_name = %s AND table_name = %s", (schema, table),
                          dbname="staging")
    assert len(rows) == 1, rows
    return rows[0]


# --------------------------------------------------------------------------
# composite text keys

def test_composite_keys_that_join_alike_stay_apart(source_pg, staging_pg, walpipe_factory):
    """Keys ('a<US>b','c') and ('a','b<US>c') in one claim are two rows, not one (US = byte 0x1F)."""
    w = stage_only(source_pg, staging_pg, walpipe_factory, "CREATE TABLE pairs (a text, b text, v int, PRIMARY KEY (a, b))",
                   ["INSERT INTO pairs VALUES (E'a\\x1fb', 'c', 1)",
                    "INSERT INTO pairs VALUES ('a', E'b\\x1fc', 2)",
                    # and ones that a separator other than 0x1F would confuse
                    "INSERT INTO pairs VALUES ('x,y', 'z', 3), ('x', 'y,z', 4), ('1:x', '', 5), ('1', ':x', 6)",
                    "UPDATE pairs SET v = v + 10"],
                   workers_extra={"claim_size": 1000})
    # one worker, one claim: every change of the table is applied together
    work = start_work(walpipe_factory, w, 1)
    wait_applied(source_pg, staging_pg, w, workers=work)
    assert dead_letters(staging_pg) == []
    count, _ = assert_mirrored(source_pg, staging_pg, "pairs", ["a", "b"])
    assert count == 6
    assert work.stop() == 0
    assert w.stop() == 0


# --------------------------------------------------------------------------
# apply errors cut mid-character

WIDE_COLS = 12


def test_cut_multibyte_error_lands_in_dead_letters(source_pg, staging_pg, walpipe_factory):
    """An apply error longer than the reason's limit, cut inside a multibyte character, is still
    recorded (valid UTF-8) instead of failing the dead-letter insert and looping on the claim."""
    cols = ", ".join(f"c{i} text" for i in range(WIDE_COLS))
    setup = f"CREATE TABLE wide (id int PRIMARY KEY, {cols})"
    setup_source(source_pg, schema=setup)
    w = start(walpipe_factory, staging_pg, source_pg, workers=1,
              workers_extra={"max_attempts": 1, "retry_backoff_ms": 100})
    source_pg.sql("INSERT INTO wide (id) VALUES (1)", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    # the mirror refuses what the source takes; PostgreSQL's DETAIL quotes the row, each value cut to
    # 64 bytes on a character boundary, so a dozen columns of 3-byte characters make it far longer
    # than the reason's limit, and prefixes of 0, 1, 2 ASCII bytes put the cut inside a character
    staging_pg.sql("ALTER TABLE analytics.public_wide ADD CONSTRAINT short CHECK (length(c0) < 10)",
                   dbname="staging")
    vals = ", ".join(["repeat('\u20ac', 100)"] * (WIDE_COLS - 1))
    for i, prefix in enumerate(["", "x", "xy"]):
        source_pg.sql(f"INSERT INTO wide VALUES ({10 + i}, '{prefix}' || repeat('\u20ac', 100), {vals})",
                      dbname="app")
    wait_caught_up(source_pg, w)
    wait_dead(staging_pg, 3, walpipe=w)
    wait_until(lambda: unprocessed(staging_pg) == 0, timeout=60, what="the failing claim processed", walpipe=w)
    reasons = [r[0] for r in staging_pg.sql("SELECT reason FROM walpipe.dead_letters ORDER BY event_id",
                                            dbname="staging")]
    assert len(reasons) == 3
    for r in reasons:
        assert 'violates check constraint "short"' in r, r
        assert len(r.encode()) <= 399 and "\u20ac" in r, r
    # the reasons were cut (a DETAIL this long does not fit), at three different byte offsets
    assert min(len(r.encode()) for r in reasons) >= 396, [len(r.encode()) for r in reasons]
    assert "could not record a dead letter" not in w.log()
    assert w.stop() == 0
