"""The torture suite's short form (torture.py), one test per scenario.

scripts/torture runs the same scenarios standalone; scripts/torture --full
runs the full form (20 kills, a 60 s staging outage, a 2 000 000-row
transaction, ...).  WP_SEED=N reproduces a run's random kill moments.
"""

import os
import random

import pytest

import torture
import truth
import wptest
from test_core import setup_source, start_walpipe, wait_caught_up

SEED = int(os.environ.get("WP_SEED", random.randrange(1 << 30)))
_ROWS = []


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    yield
    if _ROWS:  # past pytest's output capture: the table is the point of a run
        capman = request.config.pluginmanager.get_plugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\nwalpipe torture suite, short form, seed {SEED}\n{torture.table(_ROWS)}")
            for row in _ROWS:
                for note in row.notes:
                    print(f"  {row.name}: {note}")


LONG = os.environ.get("WALPIPE_LONG") == "1"
# Under pgoutput the default suite runs the scenarios that reach pgoutput's own code (src/capture/
# pgoutput.c): a restart inside a half-staged transaction (sigkill, source-crash, walsender,
# big-txn) and a stream resumed after staging went away (staging-down).  staging-slow and
# source-down exercise the stager and the source loop, which do not depend on the input: with
# WALPIPE_LONG=1 they run under pgoutput too.
PGOUTPUT_DEFAULT = {"sigkill", "source-crash", "walsender", "staging-down", "big-txn"}


def _cases():
    for name in torture.SCENARIOS:
        yield pytest.param(name, "wal2json", id=name)
        marks = [] if name in PGOUTPUT_DEFAULT else [pytest.mark.skipif(
            not LONG, reason="input-independent fault (stager / source loop): run under pgoutput with WALPIPE_LONG=1")]
        yield pytest.param(name, "pgoutput", id=f"{name}-pgoutput", marks=marks)


@pytest.mark.parametrize("name,plugin", list(_cases()))
def test_torture(name, plugin, walpipe_bin, tmp_path):
    """One scenario, walpipe reading with plugin; the truth slot is wal2json's either way, so under
    pgoutput the verdict also compares the two inputs under faults."""
    row = torture.run_one(name, full=False, seed=SEED, workdir=tmp_path, plugin=plugin)
    if plugin != "wal2json":
        row.name = f"{name} ({plugin})"
    _ROWS.append(row)
    assert row.ok, f"{name} with {plugin} (WP_SEED={SEED}): " + "; ".join(row.problems)


def test_stream_compare_detects_loss_duplicates_and_wrong_images(source_pg, staging_pg, walpipe_factory):
    """The torture verdict must be able to fail: corrupt a correct staging
    copy four ways and check each is counted."""
    setup_source(source_pg, schema="CREATE TABLE t (id int PRIMARY KEY, v text, n numeric)")
    w = start_walpipe(walpipe_factory, staging_pg, {"app": {"conninfo": source_pg.conninfo("app")}})
    source_pg.sql("INSERT INTO t SELECT g, 'v' || g, g * 1.5 FROM generate_series(1, 50) g", dbname="app")
    source_pg.sql("UPDATE t SET v = 'u' WHERE id <= 5", dbname="app")
    source_pg.sql("SELECT pg_logical_emit_message(false, 'p', 'c')", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.stop() == 0
    good = truth.stream_compare(source_pg, "app", "truth", staging_pg, "staging")
    assert (good.expected, good.staged, good.missing, good.doubled, good.extra, good.mismatched) == \
        (56, 56, 0, 0, 0, 0), good
    run = lambda q: staging_pg.sql(q, dbname="staging")
    cols = "source, event_type, payload, lsn, xid, commit_ts, seq, schema_name, table_name, shape_id"
    run("DELETE FROM walpipe.raw_events WHERE payload->'after'->>'id' = '10' AND event_type = 'insert'")
    run(f"INSERT INTO walpipe.raw_events ({cols}) SELECT {cols} FROM walpipe.raw_events "
        "WHERE payload->'after'->>'id' = '20'")
    run("UPDATE walpipe.raw_events SET payload = jsonb_set(payload, '{after,n}', '\"30.5\"') "
        "WHERE payload->'after'->>'id' = '30'")
    run("UPDATE walpipe.raw_events SET payload = jsonb_set(payload, '{key,id}', '4') "
        "WHERE event_type = 'update' AND payload->'key'->>'id' = '3'")
    run(f"INSERT INTO walpipe.raw_events ({cols}) SELECT source, event_type, payload, lsn, xid, commit_ts, "
        "seq + 1000, schema_name, table_name, shape_id FROM walpipe.raw_events WHERE payload->'after'->>'id' = '40'")
    bad = truth.stream_compare(source_pg, "app", "truth", staging_pg, "staging")
    assert (bad.missing, bad.doubled, bad.extra, bad.mismatched) == (1, 1, 1, 2), bad
    assert {m["expected"]["after"]["id"] for m in bad.examples["mismatched"] if "after" in m["expected"]} >= {30}
    # the truth slot was only peeked: a second comparison sees the same source changes
    assert truth.stream_compare(source_pg, "app", "truth", staging_pg, "staging").expected == 56
    wptest.drop_slot(source_pg, "app", "truth")
