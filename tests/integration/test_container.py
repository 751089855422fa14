"""The container users run: docker/Dockerfile and docker/compose.yaml, built and run for real.

Opt-in (minutes, and it needs root and podman): WALPIPE_CONTAINER_TESTS=1.  Skipped, saying
why, otherwise and in the sanitizer pass (it builds its own binary inside the image, so a
second pass would test nothing new).

What it does, as a user would on this machine:
  1. docker/base-image: the Debian 12 base image walpipe-base:bookworm (debootstrap + podman
     import), kept across runs on purpose; made only when missing.
  2. podman-compose build: the walpipe image (docker/Dockerfile, on that base) and the
     PostgreSQL 15 + wal2json image, twice (cold, then from the layer cache).
  3. podman-compose up -d: source, staging and walpipe (its Kafka sink to the entrypoint's stand-in
     broker, read back with kcat), on free ports.
  4. A workload on the source (inserts, updates, deletes in several transactions); it waits
     until staging's walpipe.raw_events holds every change exactly once and the mirror
     analytics.public_orders equals the source table.
  5. podman-compose down -v, and checks that no container or volume of the project is left.
Cleanup runs on failure too: the project's containers, volumes and network, and the images
this test built (WALPIPE_CONTAINER_KEEP_IMAGES=1 keeps them as a build cache).

This machine's sandbox refuses podman's default runtime (crun) and its default rlimits, and
the containers use the host's network: the test runs podman with a containers.conf of its own
(CONTAINERS_CONF: runtime runc, nofile and nproc limits, netns host).  Debian 12's
podman-compose 1.0.3 runs through docker/podman-hostnet (see that file).
The times it measured are printed (base image, cold and cached build, up -> rows in staging ->
down, image sizes).
"""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

import wptest
from wptest import wait_until

REPO = Path(wptest.repo_root())
DOCKER = REPO / "docker"
BASE_TAG = "localhost/walpipe-base:bookworm"
WALPIPE_TAG = "localhost/walpipe-test:latest"
POSTGRES_TAG = "localhost/walpipe-test-postgres:15"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
netns = "host"

[engine]
runtime = "runc"
"""
ROWS = 2000
DEADLINE = 300  # seconds for each condition; they only matter when it never comes

pytestmark = [
    pytest.mark.skipif(os.environ.get("WALPIPE_CONTAINER_TESTS") != "1",
                       reason="container test is opt-in: WALPIPE_CONTAINER_TESTS=1 (builds images, minutes)"),
    pytest.mark.skipif(os.environ.get("WALPIPE_SANITIZED", "0") not in ("", "0", "FALSE", "OFF"),
                       reason="container test builds its own binary in the image: plain pass only"),
]


class Stack:
    """podman and podman-compose for one compose project, with a log of every command."""

    def __init__(self, tmp, project, env):
        self.project = project
        self.env = env
        self.log_path = tmp / "podman.log"
        self.compose_cmd = ["podman-compose", "--podman-path", str(DOCKER / "podman-hostnet"),
                            "-p", project, "-f", str(DOCKER / "compose.yaml")]

    def _run(self, cmd, timeout, check=True):
        with open(self.log_path, "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            r = subprocess.run(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=timeout, cwd=REPO)
            log.write(r.stdout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{wptest.tail(r.stdout)}")
        return r

    def podman(self, *args, timeout=120, check=True):
        return self._run(["podman", *args], timeout, check)

    def compose(self, *args, timeout=1200):
        # podman-compose 1.0.3 exits 0 even when a podman command fails: callers check results.
        return self._run([*self.compose_cmd, *args], timeout, check=True)

    def ids(self, kind):
        flt = f"label=io.podman.compose.project={self.project}"
        if kind == "container":
            out = self.podman("ps", "-a", "-q", "--filter", flt).stdout
        else:
            out = self.podman("volume", "ls", "-q", "--filter", flt).stdout
        return out.split()

    def container(self, service):
        return f"{self.project}_{service}_1"

    def logs(self, service, n=40):
        r = self.podman("logs", self.container(service), check=False)
        return wptest.tail(r.stdout, n)

    def log_tail(self, n=60):
        return wptest.tail(self.log_path.read_text(errors="replace"), n) if self.log_path.exists() else ""


def image_ids():
    r = subprocess.run(["podman", "images", "-a", "-q", "--no-trunc"], stdout=subprocess.PIPE, text=True,
                       check=True)
    return set(r.stdout.split())


def built_images(before):
    """Images that appeared since `before` and descend from the base image: this test's builds
    (and their build-stage layers), not an image someone else imported meanwhile."""
    base = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", BASE_TAG], stdout=subprocess.PIPE,
                          text=True).stdout.strip()
    ours = set()
    for iid in image_ids() - before:
        cur, seen = iid, set()
        while cur and cur not in seen:
            if cur == base:
                ours.add(iid)
                break
            seen.add(cur)
            cur = subprocess.run(["podman", "image", "inspect", "--format", "{{.Parent}}", cur],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    return ours


def image_size_mb(stack, tag):
    return int(stack.podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()) / 1e6


def connect(port, dbname, password):
    return psycopg2.connect(host="127.0.0.1", port=port, dbname=dbname, user="walpipe", password=password,
                            connect_timeout=5)


def scalar(port, dbname, password, query, params=None):
    conn = connect(port, dbname, password)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


def kafka_events(bootstrap, topic):
    """What the container's Kafka sink wrote to topic, read back by kcat (a client walpipe did not
    write): {(lsn, seq): [value is None, ...]} by the walpipe.lsn/walpipe.seq headers."""
    r = subprocess.run(["kcat", "-b", bootstrap, "-C", "-t", topic, "-J", "-e", "-q"], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        return {}  # the topic may not exist yet
    events = {}
    for line in r.stdout.splitlines():
        m = json.loads(line)
        h = m.get("headers") or []
        hd = dict(zip(h[0::2], h[1::2]))
        events.setdefault((hd["walpipe.lsn"], hd["walpipe.seq"]), []).append(m["payload"] is None)
    return events


def table_digest(port, dbname, password, table):
    """(rows, md5 of the rows' text in key order), the same query on both sides."""
    return scalar(port, dbname, password,
                  f"SELECT count(*) || ' ' || md5(coalesce(string_agg(t::text, E'\\n' ORDER BY id), '')) "
                  f"FROM (SELECT id, qty, note FROM {table}) t")


def cleanup(stack, images_before, keep_images):
    """Remove what this test made, whatever state it is in; every step is tried."""
    errors = []
    for cid in stack.ids("container"):
        if stack.podman("rm", "-f", "-v", "-t", "10", cid, check=False).returncode:
            errors.append(f"container {cid}")
    for vid in stack.ids("volume"):
        if stack.podman("volume", "rm", "-f", vid, check=False).returncode:
            errors.append(f"volume {vid}")
    if stack.podman("network", "exists", f"{stack.project}_default", check=False).returncode == 0:
        stack.podman("network", "rm", "-f", f"{stack.project}_default", check=False)
    if not keep_images:
        for tag in (WALPIPE_TAG, POSTGRES_TAG):
            if stack.podman("image", "exists", tag, check=False).returncode == 0:
                stack.podman("rmi", tag, check=False)
        # the intermediate images of this test's builds (never one that was there before it)
        for _ in range(3):
            left = built_images(images_before)
            if not left:
                break
            for iid in left:
                stack.podman("rmi", iid, check=False)
        if built_images(images_before):
            errors.append(f"images {sorted(built_images(images_before))}")
    return errors


def test_compose_streams_into_staging(tmp_path, capsys, monkeypatch):
    for tool in ("podman", "podman-compose", "debootstrap", "runc"):
        assert shutil.which(tool), f"{tool} missing: run scripts/setup"
    assert os.geteuid() == 0, "the container test runs rootful podman: run it as root"
    assert not (DOCKER / ".env").exists(), "docker/.env would override the test's settings: move it away"

    conf = tmp_path / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    password = hashlib.sha256(os.urandom(16)).hexdigest()[:24]
    src_port, stg_port = wptest.free_port(), wptest.free_port()
    project = f"wpct{os.getpid()}"
    env = dict(os.environ, CONTAINERS_CONF=str(conf),
               WALPIPE_BASE_IMAGE=BASE_TAG, WALPIPE_RUNTIME_IMAGE=BASE_TAG,
               WALPIPE_IMAGE=WALPIPE_TAG, WALPIPE_POSTGRES_IMAGE=POSTGRES_TAG,
               WALPIPE_SOURCE_PORT=str(src_port), WALPIPE_STAGING_PORT=str(stg_port),
               WALPIPE_PG_PASSWORD=password)
    monkeypatch.setenv("CONTAINERS_CONF", str(conf))  # for image_ids()
    stack = Stack(tmp_path, project, env)
    keep_images = os.environ.get("WALPIPE_CONTAINER_KEEP_IMAGES") == "1"
    times = {}

    # 1. the base image: kept across runs, made when missing
    t = time.monotonic()
    had_base = stack.podman("image", "exists", BASE_TAG, check=False).returncode == 0
    subprocess.run([str(DOCKER / "base-image"), BASE_TAG], env=env, check=True, timeout=1800)
    times["base image" + (" (cached)" if had_base else " (debootstrap + import)")] = time.monotonic() - t
    images_before = image_ids()

    try:
        # 2. build both images; then again, from the layer cache
        for label in ("build", "build again (layer cache)"):
            t = time.monotonic()
            stack.compose("build")
            times[label] = time.monotonic() - t
            for tag in (WALPIPE_TAG, POSTGRES_TAG):
                assert stack.podman("image", "exists", tag, check=False).returncode == 0, \
                    f"{tag} was not built:\n{stack.log_tail()}"
        assert stack.podman("run", "--rm", WALPIPE_TAG, "--version").stdout.startswith("walpipe ")

        # 3. up
        t_up = time.monotonic()
        stack.compose("up", "-d")
        for svc in ("source", "staging", "walpipe"):
            assert stack.podman("container", "exists", stack.container(svc), check=False).returncode == 0, \
                f"no container for {svc}:\n{stack.log_tail()}"
        # every process runs as an unprivileged user
        for svc in ("source", "staging", "walpipe"):
            uid = stack.podman("exec", stack.container(svc), "id", "-u").stdout.strip()
            assert uid != "0", f"{svc} runs as root"

        def running(svc):
            state = stack.podman("inspect", "--format", "{{.State.Status}}", stack.container(svc)).stdout.strip()
            assert state == "running", f"{svc} is {state}:\n{stack.logs(svc)}"

        def slot_streaming():
            for svc in ("source", "staging", "walpipe"):
                running(svc)
            return scalar(src_port, "app", password,
                          "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'walpipe_app' AND active")

        try:
            wait_until(slot_streaming, timeout=DEADLINE, interval=0.5, what="walpipe streaming from the source",
                       ignore=(psycopg2.OperationalError,))
        except AssertionError as e:
            raise AssertionError(f"{e}\nwalpipe:\n{stack.logs('walpipe')}") from None

        # 4. the workload: created after the slot, so every row is a streamed change
        conn = connect(src_port, "app", password)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE public.orders (id int PRIMARY KEY, qty int NOT NULL, note text)")
            for lo in range(1, ROWS + 1, 500):
                cur.execute("INSERT INTO public.orders SELECT g, g %% 13, 'n°' || g || ' ünïcödé' "
                            "FROM generate_series(%s, %s) g", (lo, lo + 499))
            cur.execute("UPDATE public.orders SET qty = qty + 100, note = note || ' ✓' WHERE id % 5 = 0")
            updates = cur.rowcount
            cur.execute("DELETE FROM public.orders WHERE id % 7 = 0")
            deletes = cur.rowcount
        conn.close()
        expected = {"insert": ROWS, "update": updates, "delete": deletes}
        source_digest = table_digest(src_port, "app", password, "public.orders")

        def staged():
            running("walpipe")
            rows = connect(stg_port, "staging", password)
            try:
                with rows.cursor() as cur:
                    cur.execute("SELECT event_type, count(*) FROM walpipe.raw_events "
                                "WHERE source = 'app' AND schema_name = 'public' AND table_name = 'orders' "
                                "GROUP BY 1")
                    return dict(cur.fetchall())
            finally:
                rows.close()

        def mirrored():
            running("walpipe")
            return table_digest(stg_port, "staging", password, "analytics.public_orders") == source_digest

        try:
            wait_until(lambda: staged() == expected, timeout=DEADLINE, interval=0.5,
                       what=f"raw_events holding {expected}", ignore=(psycopg2.Error,))
            wait_until(mirrored, timeout=DEADLINE, interval=0.5, what="analytics.public_orders equal to the source",
                       ignore=(psycopg2.Error,))
        except AssertionError as e:
            last = None
            try:
                last = staged()
            except psycopg2.Error as err:
                last = err
            raise AssertionError(f"{e}\nstaged: {last}\nwalpipe:\n{stack.logs('walpipe')}") from None
        assert scalar(stg_port, "staging", password, "SELECT count(*) FROM walpipe.dead_letters") == 0
        times["up -> rows in staging and mirror"] = time.monotonic() - t_up

        # the Kafka sink (the entrypoint's stand-in broker, on the host network): every staged event
        # once in app.public.orders, a delete followed by its tombstone
        bootstrap = stack.podman("exec", stack.container("walpipe"), "cat", "/tmp/kafka-bootstrap").stdout.strip()
        total = sum(expected.values())
        try:
            got = wait_until(lambda: (lambda e: e if len(e) == total else None)(
                kafka_events(bootstrap, "app.public.orders")), timeout=DEADLINE, interval=1,
                what=f"{total} events in Kafka")
        except AssertionError as e:
            raise AssertionError(f"{e}\nwalpipe:\n{stack.logs('walpipe')}") from None
        assert sum(1 for recs in got.values() if recs == [False, True]) == deletes  # delete, then tombstone
        assert all(recs in ([False], [False, True]) for recs in got.values()), "an event written twice"

        # 5. down, volumes too
        t = time.monotonic()
        stack.compose("down", "-v")
        times["down -v"] = time.monotonic() - t
        times["up -> rows in staging -> down"] = time.monotonic() - t_up
        assert stack.ids("container") == [], f"containers left after down:\n{stack.log_tail()}"
        assert stack.ids("volume") == [], f"volumes left after down:\n{stack.log_tail()}"
        sizes = {tag: image_size_mb(stack, tag) for tag in (BASE_TAG, WALPIPE_TAG, POSTGRES_TAG)}
    finally:
        errors = cleanup(stack, images_before, keep_images)
    assert not errors, f"cleanup left {errors}:\n{stack.log_tail()}"

    with capsys.disabled():
        print("\ncontainer test times:")
        for k, v in times.items():
            print(f"  {k:40s} {v:7.1f} s")
        for k, v in sizes.items():
            print(f"  image {k:34s} {v:7.0f} MB")
        print(f"  staged: {json.dumps(expected)}; images {'kept' if keep_images else 'removed'}")
