"""wptest: integration-test harness for walpipe.

Throwaway PostgreSQL 15 clusters (PgCluster), a wrapper around the walpipe
binary (Walpipe), the walpipe INI config writer (write_config), a polling
helper (wait_until) and the wal2json ground-truth helpers (create_slot,
copy_slot, slot_changes_v2, ...).

Clusters live in a fresh temp directory each (socket, server log and data
directory) and listen on a Unix socket only.  When the test process runs as
root, initdb and pg_ctl run as the `postgres` OS user (setpriv, or runuser as
a fallback); clients (psycopg2, walpipe) always run as the invoking user and
connect as database user `postgres` with trust authentication.

Cleanup: every cluster and walpipe process is registered; pytest fixtures
(conftest.py) destroy them at test end, an atexit hook is the backstop, and
clusters left behind by a test process that died (e.g. SIGKILLed by a ctest
timeout) are removed the next time a cluster is created.
"""

import atexit
import ctypes
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import psycopg2.sql

PG_BIN = Path(os.environ.get("WPTEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_OS_USER = "postgres"   # OS user the server runs as when we are root
PG_DB_USER = "postgres"   # database superuser (initdb -U)
DIR_PREFIX = "wpt-"       # temp dir prefix, used by the stale-cluster sweep
OWNER_FILE = "wptest.owner"
LOG_TAIL_LINES = 50

DEFAULT_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": 20,
    "max_wal_senders": 20,
    "listen_addresses": "",
    "fsync": False,
    "shared_buffers": "128MB",
    "max_connections": 100,
    "log_min_messages": "warning",
    "logging_collector": False,
}

_IS_ROOT = os.geteuid() == 0

# Live objects, for atexit cleanup and for log tails on test failure.
_LIVE_CLUSTERS = []
_LIVE_WALPIPES = []
_USED_PORTS = set()
_STALE_SWEPT = False


# --------------------------------------------------------------------------
# small helpers

def repo_root():
    """Repository root: $WALPIPE_SRC, else two levels above this file."""
    src = os.environ.get("WALPIPE_SRC")
    return Path(src) if src else Path(__file__).resolve().parents[2]


def walpipe_bin():
    """Path of the walpipe binary: $WALPIPE_BIN, else <repo>/build/walpipe."""
    b = os.environ.get("WALPIPE_BIN")
    return Path(b) if b else repo_root() / "build" / "walpipe"


def tail(text, n=LOG_TAIL_LINES):
    lines = text.splitlines()
    return "\n".join(lines[-n:])


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _pg_value(v):
    """A postgresql.conf value."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


def _conninfo_value(v):
    v = str(v)
    if v and not re.search(r"[\s'\\]", v):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pid_alive(pid, starttime=None):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if starttime is not None:
        return _proc_starttime(pid) == starttime
    return True


def _proc_starttime(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        # field 22, counted after the ")" that ends the command name
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _postgres_ids():
    pw = pwd.getpwnam(PG_OS_USER)
    return pw.pw_uid, pw.pw_gid


def _as_pg_user(cmd):
    """Prefix cmd so that it runs as the postgres OS user when we are root."""
    if not _IS_ROOT:
        return list(cmd)
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={PG_OS_USER}", f"--regid={PG_OS_USER}",
                "--init-groups", "--"] + list(cmd)
    return ["runuser", "-u", PG_OS_USER, "--"] + list(cmd)


def _tmp_root():
    """Parent directory for cluster dirs: short (socket path limit is 107
    bytes) and, when root, traversable by the postgres user (o+x on every
    ancestor)."""
    cand = Path(tempfile.gettempdir()).resolve()
    if len(str(cand)) > 60:
        return Path("/tmp")
    if _IS_ROOT:
        p = cand
        while True:
            try:
                if not os.stat(p).st_mode & 0o001:
                    return Path("/tmp")
            except OSError:
                return Path("/tmp")
            if p.parent == p:
                break
            p = p.parent
    return cand


def _socket_in_use(port):
    pattern = f".s.PGSQL.{port}"
    root = _tmp_root()
    candidates = [root / pattern, Path("/tmp") / pattern,
                  Path("/var/run/postgresql") / pattern]
    candidates += [Path(p) for p in glob.glob(str(root / (DIR_PREFIX + "*") / pattern))]
    return any(os.path.exists(c) or os.path.exists(str(c) + ".lock") for c in candidates)


def free_port():
    """A port number free on 127.0.0.1 with no .s.PGSQL.<port> socket file
    in the usual socket directories, not handed out before in this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in _USED_PORTS or _socket_in_use(port):
            continue
        _USED_PORTS.add(port)
        return port
    raise RuntimeError("could not find a free port")


def cleanup_stale():
    """Remove cluster dirs left by wptest processes that no longer exist."""
    root = _tmp_root()
    for d in glob.glob(str(root / (DIR_PREFIX + "*"))):
        owner = _read_text(os.path.join(d, OWNER_FILE)).split()
        if len(owner) != 2:
            continue  # not ours, or still being created
        try:
            pid = int(owner[0])
        except ValueError:
            continue
        if _pid_alive(pid, owner[1]):
            continue
        data = os.path.join(d, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            try:
                subprocess.run(_as_pg_user([str(PG_BIN / "pg_ctl"), "-D", data,
                                            "-m", "immediate", "-w", "-t", "30", "stop"]),
                               cwd=d, capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# PostgreSQL clusters

class PgError(RuntimeError):
    pass


class PgCluster:
    """A throwaway PostgreSQL 15 cluster.

    PgCluster(name, **settings) makes its data directory at once (not
    started yet); settings override DEFAULT_SETTINGS in postgresql.conf.  As
    a context manager it starts on enter and is destroyed on exit.

    The data directory is a copy of one initdb'd template (per PostgreSQL
    version, shared by every test process): initdb takes 2-7 s on a loaded
    2-core machine and the suite makes about a hundred clusters per pass.
    Copies share the template's system identifier; fresh=True runs initdb
    instead, for a test that needs a cluster of its own identity (another
    cluster than its source, for walpipe).
    """

    def __init__(self, name="pg", fresh=False, **settings):
        global _STALE_SWEPT
        if not _STALE_SWEPT:
            _STALE_SWEPT = True
            cleanup_stale()
        self.name = name
        self.settings = dict(DEFAULT_SETTINGS)
        self.settings.update(settings)
        self.running = False
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:20]
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{safe}-", dir=_tmp_root()))
        self.socket_dir = self.base_dir
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"
        self.port = free_port()
        _LIVE_CLUSTERS.append(self)
        try:
            with open(self.base_dir / OWNER_FILE, "w") as f:
                f.write(f"{os.getpid()} {_proc_starttime(os.getpid())}\n")
            os.chmod(self.base_dir, 0o755)
            if _IS_ROOT:
                uid, gid = _postgres_ids()
                os.chown(self.base_dir, uid, gid)
            self._initdb(fresh)
        except BaseException:
            self.destroy()
            raise

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"<PgCluster {self.name} port={self.port} dir={self.base_dir} {state}>"

    # -- process control

    def _run(self, cmd, timeout=120, check=True):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if _IS_ROOT:
            env["HOME"] = str(self.base_dir)
            env["USER"] = env["LOGNAME"] = PG_OS_USER
        r = subprocess.run(_as_pg_user(cmd), cwd=self.base_dir, env=env,
                           stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise PgError(
                f"{self.name}: {' '.join(map(str, cmd))} failed with exit code {r.returncode}\n"
                f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}\n"
                f"server log tail:\n{self.server_log_tail()}")
        return r

    def _initdb(self, fresh):
        if fresh:
            _run_initdb(self.data_dir, self._run)
        else:
            self._run(["cp", "-a", str(_template_data_dir()), str(self.data_dir)])
        conf = dict(self.settings)
        conf["port"] = self.port
        conf["unix_socket_directories"] = str(self.socket_dir)
        self.configure(**conf)

    def configure(self, **settings):
        """Append settings to postgresql.conf (later lines win).  Takes
        effect on reload() or restart(), as PostgreSQL decides."""
        lines = [f"{k} = {_pg_value(v)}\n" for k, v in settings.items()]
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# wptest\n" + "".join(lines))
        for k, v in settings.items():
            if k not in ("port", "unix_socket_directories"):
                self.settings[k] = v

    def start(self, timeout=60):
        if self.base_dir is None:
            raise PgError(f"{self.name}: cluster was destroyed")
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path),
                   "-w", "-t", str(timeout), "-s", "start"], timeout=timeout + 30)
        self.running = True
        return self

    def stop(self, mode="fast", timeout=60):
        if mode not in ("fast", "immediate", "smart"):
            raise ValueError(f"bad stop mode {mode!r}")
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-m", mode,
                   "-w", "-t", str(timeout), "-s", "stop"], timeout=timeout + 30)
        self.running = False

    def restart(self, mode="fast"):
        self.stop(mode)
        self.start()

    def reload(self):
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "-s", "reload"])

    def is_running(self):
        """Asks pg_ctl (the running attribute is our own bookkeeping)."""
        r = self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data_dir), "status"], check=False)
        return r.returncode == 0

    def postmaster_pid(self):
        first = _read_text(self.data_dir / "postmaster.pid").split("\n", 1)[0].strip()
        return int(first) if first else None

    def destroy(self):
        """Stop (immediate) if running and remove the directory.  Idempotent."""
        if self.base_dir is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                try:
                    self.stop("immediate", timeout=30)
                except Exception as e:  # last resort: kill the postmaster
                    print(f"wptest: {self.name}: stop failed: {e}", file=sys.stderr)
                    pid = self.postmaster_pid()
                    if pid:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
                        time.sleep(0.2)
        finally:
            self.running = False
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
            if self in _LIVE_CLUSTERS:
                _LIVE_CLUSTERS.remove(self)

    def __enter__(self):
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.base_dir is not None:
            print(f"\n--- wptest: {self.name} server log (last {LOG_TAIL_LINES} lines) ---\n"
                  f"{self.server_log_tail()}", file=sys.stderr)
        self.destroy()
        return False

    # -- clients

    def conninfo(self, dbname="postgres", **extra):
        parts = {"host": self.socket_dir, "port": self.port, "dbname": dbname,
                 "user": PG_DB_USER}
        parts.update(extra)
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items())

    def connect(self, dbname="postgres", autocommit=True, **extra):
        conn = psycopg2.connect(self.conninfo(dbname, **extra))
        conn.autocommit = autocommit
        return conn

    def sql(self, query, params=None, dbname="postgres"):
        """Run one statement in its own autocommit connection; returns
        fetchall() for statements that return rows, else None."""
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description is not None else None
        finally:
            conn.close()

    def scalar(self, query, params=None, dbname="postgres"):
        rows = self.sql(query, params, dbname)
        return rows[0][0] if rows else None

    def createdb(self, name):
        self.sql(psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(name)))

    def server_log(self):
        return _read_text(self.log_path) if self.base_dir is not None else ""

    def server_log_tail(self, n=LOG_TAIL_LINES):
        return tail(self.server_log(), n)


_C_UTF8 = None
_TEMPLATE = None


def _initdb_cmd(data_dir):
    locale = "C.UTF-8" if _have_c_utf8() else "C"
    return [str(PG_BIN / "initdb"), "-D", str(data_dir), "-U", PG_DB_USER,
            "-A", "trust", "-E", "UTF8", f"--locale={locale}", "-N"]


def _run_initdb(data_dir, run):
    run(_initdb_cmd(data_dir))


def _template_data_dir():
    """The initdb'd template's data directory, made once (by whichever test process comes first;
    built aside and renamed into place, so a concurrent process never sees half of it)."""
    global _TEMPLATE
    if _TEMPLATE is not None and _TEMPLATE.exists():
        return _TEMPLATE
    version = subprocess.run([str(PG_BIN / "initdb"), "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    key = re.sub(r"[^A-Za-z0-9]+", "_", f"{version} {_initdb_cmd('')[3:]} {os.geteuid()}")
    final = _tmp_root() / f"wptemplate-{key}"
    if not (final / "data" / "PG_VERSION").exists():
        build = Path(tempfile.mkdtemp(prefix="wptemplate-build-", dir=_tmp_root()))
        try:
            os.chmod(build, 0o755)
            if _IS_ROOT:
                uid, gid = _postgres_ids()
                os.chown(build, uid, gid)
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env["LC_ALL"] = "C"

            def run(cmd):
                r = subprocess.run(_as_pg_user(cmd), cwd=build, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=300)
                if r.returncode != 0:
                    raise PgError(f"template initdb failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")

            _run_initdb(build / "data", run)
            try:
                os.rename(build, final)
                build = None
            except OSError:
                pass  # another process was first: use its template
        finally:
            if build is not None:
                shutil.rmtree(build, ignore_errors=True)
    _TEMPLATE = final / "data"
    return _TEMPLATE


def _have_c_utf8():
    global _C_UTF8
    if _C_UTF8 is None:
        try:
            out = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout
            _C_UTF8 = any(l.lower() in ("c.utf8", "c.utf-8") for l in out.split())
        except OSError:
            _C_UTF8 = False
    return _C_UTF8


# --------------------------------------------------------------------------
# walpipe

def _set_pdeathsig():
    """In the child: die with SIGKILL when the test process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Walpipe:
    """The walpipe binary, run in workdir.

    config: a path to a config file, or config text (anything containing a
    newline or starting with '['), which is written to workdir/walpipe.conf.
    Output of every run (and of init) is appended to workdir/walpipe.log.
    """

    def __init__(self, config, workdir, binary=None, name="walpipe"):
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = Path(binary) if binary else walpipe_bin()
        if isinstance(config, str) and ("\n" in config or config.lstrip().startswith("[")):
            self.config_path = self.workdir / "walpipe.conf"
            self.config_path.write_text(config)
        else:
            self.config_path = Path(config)
        self.log_path = self.workdir / "walpipe.log"
        self.proc = None
        self.starts = 0
        self._log_offset = 0
        _LIVE_WALPIPES.append(self)

    def __repr__(self):
        return f"<Walpipe {self.name} pid={self.pid} running={self.running}>"

    def _env(self, extra_env):
        env = dict(os.environ)
        if extra_env:
            env.update({k: str(v) for k, v in extra_env.items()})
        return env

    def _append_log(self, text):
        with open(self.log_path, "a") as f:
            f.write(text)

    def command(self, subcommand, *args, timeout=120, extra_env=None):
        """Run `walpipe SUBCOMMAND --config FILE ARGS...` to completion;
        returns CompletedProcess (text, stdout/stderr captured).  The
        output is also appended to the log."""
        cmd = [str(self.binary), subcommand, "--config", str(self.config_path), *map(str, args)]
        r = subprocess.run(cmd, cwd=self.workdir, env=self._env(extra_env),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        self._append_log(f"=== wptest: {' '.join(cmd)} -> exit {r.returncode}\n"
                         f"{r.stdout}{r.stderr}")
        return r

    def init(self, timeout=120, extra_env=None):
        return self.command("init", timeout=timeout, extra_env=extra_env)

    def start(self, extra_env=None, args=(), subcommand="run"):
        """Start `walpipe SUBCOMMAND --config FILE ARGS...` (run, or work) in the background."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        cmd = [str(self.binary), subcommand, "--config", str(self.config_path), *map(str, args)]
        self._append_log(f"=== wptest: start #{self.starts}: {' '.join(cmd)}\n")
        self._log_offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(extra_env),
                                         stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig)
        if self not in _LIVE_WALPIPES:
            _LIVE_WALPIPES.append(self)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self):
        return self.proc.poll() if self.proc else None

    def signal(self, sig):
        if self.running:
            self.proc.send_signal(sig)

    def stop(self, timeout=60):
        """SIGTERM and wait; returns the exit code.  Kills it and raises
        AssertionError if it does not exit within timeout."""
        if self.proc is None:
            return None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM "
                                 f"(killed)\n{self.log_tail()}") from None

    def kill(self):
        """SIGKILL and reap; returns the exit code (-9 if it was running)."""
        if self.proc is None:
            return None
        if self.running:
            self.proc.kill()
        return self.proc.wait()

    def wait_exit(self, timeout):
        """Wait for the process to exit by itself; returns the exit code,
        raises AssertionError on timeout (the process keeps running)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s\n"
                                 f"{self.log_tail()}") from None

    def rss_peak_kb(self):
        """VmHWM (peak resident set size) in kB; the process must be alive."""
        if not self.running:
            raise RuntimeError(f"{self.name} is not running")
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmHWM in /proc/PID/status")

    def log(self, since_start=False):
        """Log text; since_start: only what the latest run wrote."""
        text = _read_text(self.log_path)
        if since_start:
            return text.encode("utf-8", "replace")[self._log_offset:].decode("utf-8", "replace")
        return text

    def log_tail(self, n=LOG_TAIL_LINES):
        return f"--- {self.name} log (last {n} lines) ---\n{tail(self.log(), n)}"

    def close(self):
        """Kill if running; forget it."""
        self.kill()
        if self in _LIVE_WALPIPES:
            _LIVE_WALPIPES.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            print("\n" + self.log_tail(), file=sys.stderr)
        self.close()
        return False


def write_config(path, staging_conninfo, sources, staging_extra=None, walpipe_extra=None):
    """Write a walpipe INI config; returns its Path.

    sources: {name: {"conninfo": ..., "slot": ..., "tables": [..] or "a, b", **other keys}}
    staging_extra: extra [staging] keys (batch_rows, ...); walpipe_extra:
    keys for a [walpipe] section (log_level, ...).
    """
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v))
        return str(v)

    out = []
    if walpipe_extra:
        out.append("[walpipe]")
        out += [f"{k} = {val(v)}" for k, v in walpipe_extra.items()]
        out.append("")
    out.append("[staging]")
    out.append(f"conninfo = {staging_conninfo}")
    out += [f"{k} = {val(v)}" for k, v in (staging_extra or {}).items()]
    for name, src in sources.items():
        out.append("")
        out.append(f"[source {name}]")
        keys = [k for k in ("conninfo", "slot", "tables") if k in src]
        keys += [k for k in src if k not in keys]
        out += [f"{k} = {val(src[k])}" for k in keys if src[k] is not None]
    path = Path(path)
    path.write_text("\n".join(out) + "\n")
    return path


def wait_until(predicate, timeout=90, interval=0.05, what="condition", walpipe=None,
               ignore=()):
    """Poll predicate() until it returns something truthy; returns that.

    On timeout raises AssertionError naming `what`, with the walpipe log
    tail (of `walpipe`, or of every live Walpipe when None).  If `walpipe`
    is given and its process has exited, fails at once instead of waiting.
    Exceptions of the types in `ignore` count as "not yet".  The default
    deadline is generous on purpose: it only matters when the condition never
    comes, and a loaded 2-core machine running an ASan build is slow.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        exited = walpipe is not None and walpipe.proc is not None and not walpipe.running
        try:
            v = predicate()
            if v:
                return v
        except ignore as e:  # noqa: PERF203
            last_exc = e
        if exited:
            raise AssertionError(f"while waiting for {what}: {walpipe.name} exited with code "
                                 f"{walpipe.returncode}\n{walpipe.log_tail()}")
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout}s waiting for {what}"
            if last_exc is not None:
                msg += f"\nlast ignored exception: {last_exc!r}"
            wps = [walpipe] if walpipe is not None else list(_LIVE_WALPIPES)
            for wp in wps:
                msg += "\n" + wp.log_tail()
            raise AssertionError(msg)
        time.sleep(interval)


# --------------------------------------------------------------------------
# wal2json ground truth

def wait_client_gone(cluster, dbname, application_name="pgbench", timeout=120):
    """Waits until no session of a stopped client is left on the server.  A client
    killed mid-statement leaves its backend running: the backend notices the lost
    connection only when it next writes to it, after the statement and (in
    autocommit) its COMMIT.  So a transaction of a stopped pgbench can still commit
    after pgbench has exited, and a WAL position taken before that misses it."""
    wait_until(lambda: cluster.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (dbname, application_name)) == 0,
        timeout=timeout, interval=0.05, what=f"the sessions of {application_name} on {dbname} to end")


def create_slot(cluster, dbname, slot, plugin="wal2json", temporary=False):
    """pg_create_logical_replication_slot; returns the consistent-point LSN."""
    return cluster.scalar("SELECT lsn FROM pg_create_logical_replication_slot(%s, %s, %s)",
                          (slot, plugin, temporary), dbname=dbname)


def copy_slot(cluster, dbname, src, dst, temporary=False):
    """pg_copy_logical_replication_slot(src, dst): dst starts where src is."""
    return cluster.sql("SELECT * FROM pg_copy_logical_replication_slot(%s, %s, %s)",
                       (src, dst, temporary), dbname=dbname)


def drop_slot(cluster, dbname, slot):
    cluster.sql("SELECT pg_drop_replication_slot(%s)", (slot,), dbname=dbname)


def slot_info(cluster, slot):
    """The pg_replication_slots row of slot as a dict, or None."""
    conn = cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT * FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            return dict(zip([d[0] for d in cur.description], row)) if row else None
    finally:
        conn.close()


def slot_changes_v2(cluster, dbname, slot, upto_lsn=None, peek=False, options=None):
    """All pending changes of a wal2json slot in format-version 2 (with
    xids, timestamps and LSNs), as parsed JSON objects (B/I/U/D/T/M/C).
    Consumes them unless peek=True.  options: extra wal2json options."""
    fn = "pg_logical_slot_peek_changes" if peek else "pg_logical_slot_get_changes"
    opts = {"format-version": "2", "include-xids": "1", "include-timestamp": "1",
            "include-lsn": "1"}
    opts.update({k: str(v) for k, v in (options or {}).items()})
    args = []
    for k, v in opts.items():
        args += [k, v]
    placeholders = ", ".join(["%s"] * len(args))
    rows = cluster.sql(f"SELECT data FROM {fn}(%s, %s, NULL, {placeholders})",
                       [slot, upto_lsn] + args, dbname=dbname)
    return [json.loads(r[0]) for r in rows]


# --------------------------------------------------------------------------
# cleanup

def failure_log_tails(n=LOG_TAIL_LINES):
    """(title, text) pairs: the log tails of every live cluster and walpipe."""
    out = []
    for c in list(_LIVE_CLUSTERS):
        out.append((f"wptest: {c.name} server log (last {n} lines, {c.log_path})",
                    c.server_log_tail(n)))
    for w in list(_LIVE_WALPIPES):
        out.append((f"wptest: {w.name} log (last {n} lines, {w.log_path})",
                    tail(w.log(), n)))
    return out


def cleanup_all():
    for w in list(_LIVE_WALPIPES):
        try:
            w.close()
        except Exception as e:
            print(f"wptest: cleanup of {w.name} failed: {e}", file=sys.stderr)
    for c in list(_LIVE_CLUSTERS):
        try:
            c.destroy()
        except Exception as e:
            print(f"wptest: cleanup of {c.name} failed: {e}", file=sys.stderr)


atexit.register(cleanup_all)
