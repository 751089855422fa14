"""Table shapes are recorded by content: an id that staging holds for another shape is never reused.

The decoder proposes a shape id, a 63-bit FNV-1a hash of (schema, table, columns); anyone who
may create tables on a source can aim a table at another's id.  Here the crafted shape is put
into walpipe.table_schemas directly, under the very id the next shape of table b will propose:
walpipe must notice, record b's shape under another id, point b's rows at it (also after a
restart), and the mirror must follow b's real columns, not the crafted ones.
"""

import json

import wptest
from test_core import setup_source, wait_caught_up
from test_workers import start, wait_applied

FNV_OFFSET = 14695981039346656037
FNV_PRIME = 1099511628211


def proposed_shape_id(schema, table, columns):
    """The decoder's id (src/capture/decoder.c shape_build): FNV-1a of schema NUL table NUL columns JSON."""
    h = FNV_OFFSET
    for b in schema.encode() + b"\0" + table.encode() + b"\0" + columns.encode():
        h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return (h & 0x7FFFFFFFFFFFFFFF) or 1


# as the decoder writes it: "position" is the column's attnum (wal2json's include-column-positions)
B_COLUMNS = ('[{"name":"id","type":"integer","typeoid":23,"position":1},{"name":"v","type":"text","typeoid":25,'
             '"position":2},{"name":"w","type":"integer","typeoid":23,"position":3}]')
CRAFTED = '[{"name":"id","type":"integer","typeoid":23}]'  # would make the mirror drop v and w


def shapes_of_b(staging_pg):
    return staging_pg.sql("SELECT DISTINCT r.shape_id, s.schema_name, s.table_name, s.columns FROM "
                          "walpipe.raw_events r LEFT JOIN walpipe.table_schemas s USING (source, shape_id) "
                          "WHERE r.table_name = 'b'", dbname="staging")


def test_crafted_shape_id_collision_is_detected_and_avoided(source_pg, staging_pg, walpipe_factory):
    setup_source(source_pg, schema="CREATE TABLE b (id int PRIMARY KEY, v text, w int)")
    w = start(walpipe_factory, staging_pg, source_pg, run=False)
    target = proposed_shape_id("public", "b", B_COLUMNS)
    staging_pg.sql("INSERT INTO walpipe.table_schemas (source, shape_id, schema_name, table_name, columns) "
                   "VALUES ('app', %s, 'public', 'evil', %s)", (target, CRAFTED), dbname="staging")
    w.start()
    source_pg.sql("INSERT INTO b VALUES (1, 'one', 10)", dbname="app")
    wait_applied(source_pg, staging_pg, w)

    shapes = shapes_of_b(staging_pg)
    assert len(shapes) == 1, shapes
    shape_id, schema, table, columns = shapes[0]
    assert shape_id != target
    assert (schema, table, columns) == ("public", "b", json.loads(B_COLUMNS))
    # the crafted row is left as it was, and the log says what happened
    assert staging_pg.sql("SELECT table_name, columns FROM walpipe.table_schemas WHERE shape_id = %s", (target,),
                          dbname="staging") == [("evil", json.loads(CRAFTED))]
    assert f"hashes to id {target}, which staging holds for another shape" in w.log(since_start=True)
    assert staging_pg.sql("SELECT id, v, w FROM analytics.public_b", dbname="staging") == [(1, "one", 10)]
    assert w.stop() == 0

    # a restart finds the same id again: one shape row for b, and b's new rows point at it
    w.start()
    source_pg.sql("INSERT INTO b VALUES (2, 'two', 20)", dbname="app")
    wait_applied(source_pg, staging_pg, w)
    assert w.stop() == 0
    assert [s[0] for s in shapes_of_b(staging_pg)] == [shape_id]
    assert staging_pg.scalar("SELECT count(*) FROM walpipe.table_schemas WHERE source = 'app'",
                             dbname="staging") == 2
    assert staging_pg.sql("SELECT id, v, w FROM analytics.public_b ORDER BY id", dbname="staging") == \
        [(1, "one", 10), (2, "two", 20)]


def test_shape_recorded_again_after_a_rolled_back_batch(source_pg, staging_pg, walpipe_factory):
    """A batch that recorded a new shape and then rolled back must not leave later rows without it.

    A trigger on raw_events refuses table b's rows until the test allows them: the staging
    transaction that recorded b's shape fails, walpipe retries from the checkpoint in the same
    process, and the rows staged in the end must find their shape in table_schemas."""
    setup_source(source_pg, schema="CREATE TABLE b (id int PRIMARY KEY, v text, w int)")
    w = start(walpipe_factory, staging_pg, source_pg, workers=0, run=False)
    staging_pg.sql("""
        CREATE TABLE public.allow_b (ok boolean);
        CREATE FUNCTION public.refuse_b() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.table_name = 'b' AND NOT EXISTS (SELECT 1 FROM public.allow_b) THEN
                RAISE EXCEPTION 'refusing table b for now';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_b BEFORE INSERT ON walpipe.raw_events FOR EACH ROW EXECUTE FUNCTION public.refuse_b();
    """, dbname="staging")
    w.start()
    source_pg.sql("INSERT INTO b VALUES (1, 'one', 10)", dbname="app")
    wptest.wait_until(lambda: "refusing table b for now" in w.log(since_start=True), timeout=120,
                      what="a staging batch with b's first row to fail", walpipe=w)
    staging_pg.sql("INSERT INTO public.allow_b VALUES (true)", dbname="staging")
    wait_caught_up(source_pg, w, timeout=180)
    assert w.stop() == 0
    shapes = shapes_of_b(staging_pg)
    assert len(shapes) == 1 and shapes[0][2] == "b", shapes
    assert shapes[0][0] == proposed_shape_id("public", "b", B_COLUMNS)
