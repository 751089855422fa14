"""The http sink plugin (plugins/http): walpipe POSTs staged events to a local receiver.

The receiver is Python's http.server on 127.0.0.1 in a thread of the test.  It verifies every
request's signature (HMAC-SHA256 over "<timestamp>.<body>"), fails on purpose now and then
(500, a dropped connection, an answer slower than the sink's timeout, a 429 with Retry-After)
and records the events it accepted.  The guarantee checked is at-least-once: after dedupe on
(source, lsn, seq) no staged event is missing and each source's events came in (lsn, seq) order;
the duplicates the failures caused are counted, not bounded.
"""

import hashlib
import hmac
import http.server
import json
import os
import ssl
import subprocess
import threading
import time

import pytest

import wptest
from test_core import setup_source, wait_caught_up
from test_sinks import STAGED_SQL
from wptest import wait_until

SECRET = "wh-s3cret-value"

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, note text, n int);
CREATE TABLE rejected (id int PRIMARY KEY);
"""


def parse_lsn(text):
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


class Receiver:
    """A webhook receiver.  plan(n) gives the answer to the n-th request (from 0):
    'ok', '500', 'drop', 'slow', '429' or '400'."""

    def __init__(self, plan=None, secret=SECRET, tls=None, slow_s=3.0):
        self.plan = plan or (lambda n: "ok")
        self.secret = secret.encode()
        self.slow_s = slow_s
        self.lock = threading.Lock()
        self.requests = 0
        self.answers = {}          # answer -> count
        self.accepted = []         # (source, lsn, seq) in arrival order, duplicates included
        self.seen = set()
        self.duplicates = 0
        self.bad = []              # what failed a check: signature, header, body
        self.retry_after_gaps = []  # seconds from a 429 to the next request
        self._last_429 = None
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                receiver.handle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, scheme="http"):
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h, status, body=b"", headers=()):
        try:
            h.send_response(status)
            for k, v in headers:
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True  # a slow answer the sink gave up on

    def handle(self, h):
        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        now = time.monotonic()
        with self.lock:
            n = self.requests
            self.requests += 1
            if self._last_429 is not None:
                self.retry_after_gaps.append(now - self._last_429)
                self._last_429 = None
            action = self.plan(n)
            self.answers[action] = self.answers.get(action, 0) + 1
        ts = h.headers.get("X-Walpipe-Timestamp", "")
        want = "sha256=" + hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, h.headers.get("X-Walpipe-Signature", "")) or \
                abs(time.time() - int(ts or 0)) > 300:
            with self.lock:
                self.bad.append(f"request {n}: bad signature")
            return self._answer(h, 401, b"bad signature")
        if h.headers.get("Content-Type") != "application/json":
            with self.lock:
                self.bad.append(f"request {n}: Content-Type {h.headers.get('Content-Type')}")
        if action == "500":
            return self._answer(h, 500, b"receiver on fire")
        if action == "drop":
            h.close_connection = True  # no answer at all: the client sees the connection close
            return None
        if action == "429":
            with self.lock:
                self._last_429 = time.monotonic()
            return self._answer(h, 429, b"slow down", [("Retry-After", "1")])
        if action == "400":
            return self._answer(h, 400, b"rejected: table public.rejected is not accepted here")
        events = json.loads(body)
        key = h.headers.get("Idempotency-Key", "")
        first, last = events[0], events[-1]
        if key != f"{first['source']}/{first['lsn']}:{first['seq']}-{last['lsn']}:{last['seq']}":
            with self.lock:
                self.bad.append(f"request {n}: Idempotency-Key {key!r}")
        with self.lock:
            for e in events:
                k = (e["source"], parse_lsn(e["lsn"]), e["seq"])
                self.accepted.append(k)
                if k in self.seen:
                    self.duplicates += 1
                self.seen.add(k)
        if action == "slow":
            time.sleep(self.slow_s)  # stored, but answered after the sink's timeout: a duplicate follows
        return self._answer(h, 200, b"ok")

    def count(self):
        with self.lock:
            return len(self.seen)

    def seen_copy(self):
        with self.lock:
            return set(self.seen)

    def first_seen_order(self):
        """Each source's distinct events in the order they first arrived."""
        with self.lock:
            order, seen = {}, set()
            for k in self.accepted:
                if k not in seen:
                    seen.add(k)
                    order.setdefault(k[0], []).append(k[1:])
            return order


@pytest.fixture
def receivers():
    made = []

    def make(*args, **kwargs):
        r = Receiver(*args, **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def staged(staging_pg):
    """(source, lsn, seq) of every event a sink is to deliver (test_sinks' reading of staging)."""
    return {(r[0], parse_lsn(r[1]), r[2]) for r in staging_pg.sql(STAGED_SQL.format(extra=""), dbname="staging")}


def start_walpipe(walpipe_factory, staging_pg, sources, sink, init=True):
    w = walpipe_factory("[placeholder]\n")
    wptest.write_config(w.config_path, staging_pg.conninfo("staging"), sources)
    with open(w.config_path, "a") as f:
        f.write("\n[sink hook]\nplugin = http\n" + "".join(f"{k} = {v}\n" for k, v in sink.items()))
    if init:
        staging_pg.createdb("staging")
        r = w.init()
        assert r.returncode == 0, r.stderr
    w.start()
    return w


def write_load(source_pg, dbname, txns, rows, start=0):
    """txns transactions of inserts, an update and a delete each."""
    conn = source_pg.connect(dbname, autocommit=False)
    try:
        with conn.cursor() as cur:
            for t in range(txns):
                base = start + t * rows
                cur.execute("INSERT INTO items SELECT g, 'n' || g, 0 FROM generate_series(%s, %s) g",
                            (base, base + rows - 1))
                cur.execute("UPDATE items SET n = n + 1 WHERE id = %s", (base,))
                cur.execute("DELETE FROM items WHERE id = %s", (base + 1,))
                conn.commit()
    finally:
        conn.close()


def test_every_event_arrives_through_failures(source_pg, staging_pg, walpipe_factory, receivers):
    """Two sources under a write load and a SIGKILL of walpipe; the receiver fails one request in
    four, by turns a 500, a dropped connection, an answer slower than timeout_ms and a 429 with
    Retry-After: 1."""
    kinds = ["500", "drop", "slow", "429"]

    def plan(n):
        return kinds[(n // 4) % len(kinds)] if n % 4 == 1 else "ok"

    rx = receivers(plan)
    setup_source(source_pg, "app", SCHEMA, "walpipe_app", "truth")
    setup_source(source_pg, "app2", SCHEMA, "walpipe_app2", "truth2")
    sources = {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"},
               "app2": {"conninfo": source_pg.conninfo("app2"), "slot": "walpipe_app2"}}
    w = start_walpipe(walpipe_factory, staging_pg, sources,
                      {"url": rx.url(), "secret": SECRET, "post_events": 40, "timeout_ms": 1500,
                       "max_backoff_ms": 400})
    loads = [threading.Thread(target=write_load, args=(source_pg, db, 30, 20)) for db in ("app", "app2")]
    for t in loads:
        t.start()
    # a SIGKILL while events flow: the next run delivers again from the saved position
    wait_until(lambda: rx.count() >= 200, timeout=120, walpipe=w, what="200 events at the receiver")
    w.kill()
    w.start()
    for t in loads:
        t.join()
    wait_caught_up(source_pg, w, "walpipe_app", "app")
    wait_caught_up(source_pg, w, "walpipe_app2", "app2")
    want = staged(staging_pg)
    assert len(want) == 2 * 30 * 22
    wait_until(lambda: rx.seen_copy() >= want, timeout=180, interval=0.2, walpipe=w,
               what=f"every staged event at the receiver ({len(want)})")
    assert rx.bad == []
    assert rx.seen == want
    for source, keys in rx.first_seen_order().items():
        assert keys == sorted(keys), f"events of {source} out of (lsn, seq) order"
    # every kind of failure happened, and was survived
    for k in kinds:
        assert rx.answers.get(k, 0) >= 1, (k, rx.answers)
    assert rx.retry_after_gaps and min(rx.retry_after_gaps) >= 0.99, rx.retry_after_gaps
    log = w.log()
    assert SECRET not in log
    assert "HTTP 500" in log
    print(f"\n{len(want)} events, {rx.requests} requests ({rx.answers}), {rx.duplicates} duplicates")
    assert w.stop() == 0


def test_400_stops_the_sink_and_staging_goes_on(source_pg, staging_pg, walpipe_factory, receivers):
    rx = receivers(lambda n: "ok" if n == 0 else "400")
    setup_source(source_pg, "app", SCHEMA, "walpipe_app", "truth")
    w = start_walpipe(walpipe_factory, staging_pg,
                      {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}},
                      {"url": rx.url().replace("http://", "http://user:pw-in-url@"), "secret": SECRET,
                       "post_events": 1000})
    source_pg.sql("INSERT INTO items VALUES (1, 'a', 0)", dbname="app")
    wait_until(lambda: rx.count() == 1, walpipe=w, what="the first event accepted")
    source_pg.sql("INSERT INTO rejected VALUES (1)", dbname="app")
    wait_until(lambda: "HTTP 400" in w.log(), walpipe=w, what="the 400 reported")
    log = w.log()
    line = next(x for x in log.splitlines() if "HTTP 400" in x)
    assert "rejected: table public.rejected is not accepted here" in line
    assert "pw-in-url" not in log and "user:" not in log
    # staging goes on: a later change is staged while the sink stays stopped
    source_pg.sql("INSERT INTO items VALUES (2, 'b', 0)", dbname="app")
    wait_caught_up(source_pg, w)
    assert w.running
    assert len(staged(staging_pg)) == 3
    assert rx.count() == 1
    assert w.stop() == 0
    assert rx.requests == 2  # the refused batch is not sent again (not even by the flush at stop)


@pytest.fixture
def self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return cert, ctx


def test_tls_verified_by_default(source_pg, staging_pg, walpipe_factory, receivers, self_signed):
    cert, ctx = self_signed
    rx = receivers(tls=ctx)
    setup_source(source_pg, "app", SCHEMA, "walpipe_app", "truth")
    sources = {"app": {"conninfo": source_pg.conninfo("app"), "slot": "walpipe_app"}}
    w = start_walpipe(walpipe_factory, staging_pg, sources, {"url": rx.url("https"), "secret": SECRET})
    source_pg.sql("INSERT INTO items VALUES (1, 'a', 0)", dbname="app")
    wait_until(lambda: "TLS verification" in w.log(), walpipe=w, what="the certificate refused")
    assert "ca_file" in next(x for x in w.log().splitlines() if "TLS verification" in x)
    assert rx.requests == 0
    assert w.stop() == 0

    # the same receiver, its certificate given as the CA: the event arrives
    with open(w.config_path, "a") as f:
        f.write(f"ca_file = {cert}\n")
    w.start()
    wait_until(lambda: rx.count() == 1, walpipe=w, what="the event over verified TLS")
    assert rx.bad == []
    assert w.stop() == 0

    # tls_verify = off (no ca_file): it passes, with a warning at every start
    text = w.config_path.read_text().replace(f"ca_file = {cert}\n", "tls_verify = off\n")
    w.config_path.write_text(text)
    w.start()
    source_pg.sql("INSERT INTO items VALUES (2, 'b', 0)", dbname="app")
    wait_until(lambda: rx.count() == 2, walpipe=w, what="the event without verification")
    assert "tls_verify = off: the receiver's certificate is NOT checked" in w.log(since_start=True)
    assert w.stop() == 0
