"""pytest fixtures for walpipe integration tests (see wptest.py).

Fixtures (all function-scoped):
  pg_factory        make(name='pg', start=True, **settings) -> PgCluster; all
                    destroyed at teardown
  source_pg         a started PgCluster named 'source'
  staging_pg        a started PgCluster named 'staging'
  walpipe_bin       Path of the walpipe binary; skips the test if missing
  walpipe_factory   make(config, workdir=None, name=None) -> Walpipe in
                    tmp_path; all killed at teardown (before the clusters go)

Markers: @pytest.mark.source_settings(**settings) and
@pytest.mark.staging_settings(**settings) pass postgresql.conf settings to
source_pg / staging_pg, e.g. source_settings(wal_sender_timeout='5s').

On a failing test the last 50 lines of every live cluster's server log and
every walpipe log are attached to the failure report.
"""

import os
import signal

import pytest

import wptest


def _sigterm(signum, frame):
    # ctest/CI may send SIGTERM: turn it into KeyboardInterrupt so that
    # pytest runs the fixture finalizers (atexit is the backstop).
    raise KeyboardInterrupt("SIGTERM")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "source_settings(**settings): postgresql.conf settings for source_pg")
    config.addinivalue_line(
        "markers", "staging_settings(**settings): postgresql.conf settings for staging_pg")
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for title, text in wptest.failure_log_tails():
            rep.sections.append((title, text))


@pytest.fixture
def pg_factory():
    clusters = []

    def make(name="pg", start=True, **settings):
        c = wptest.PgCluster(name, **settings)
        clusters.append(c)
        if start:
            c.start()
        return c

    yield make
    for c in reversed(clusters):
        c.destroy()


def _marker_settings(request, marker):
    m = request.node.get_closest_marker(marker)
    return dict(m.kwargs) if m else {}


@pytest.fixture
def source_pg(pg_factory, request):
    return pg_factory("source", **_marker_settings(request, "source_settings"))


@pytest.fixture
def staging_pg(pg_factory, request):
    return pg_factory("staging", **_marker_settings(request, "staging_settings"))


@pytest.fixture
def walpipe_bin():
    b = wptest.walpipe_bin()
    if not (b.is_file() and os.access(b, os.X_OK)):
        pytest.skip(f"walpipe binary not found at {b} (set WALPIPE_BIN or build into "
                    f"<repo>/build/walpipe)")
    return b


@pytest.fixture
def walpipe_factory(walpipe_bin, tmp_path, pg_factory):
    # Depends on pg_factory so that walpipes are killed before clusters go.
    made = []

    def make(config, workdir=None, name=None):
        n = len(made) + 1
        name = name or ("walpipe" if n == 1 else f"walpipe{n}")
        wp = wptest.Walpipe(config, workdir or tmp_path / name, binary=walpipe_bin, name=name)
        made.append(wp)
        return wp

    yield make
    for wp in reversed(made):
        wp.close()
