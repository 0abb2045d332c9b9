"""Test servers and helpers for the outboxd integration tests.

Everything here starts real processes: a throwaway PostgreSQL cluster (PgServer), a nats-server with
JetStream (NatsServer), the relay itself (Relay), and talks to JetStream through the jstool binary
built next to the relay (JetStream). Every process is stopped by its PID by whoever started it
(the fixtures in conftest.py), and a last-resort sweep at interpreter exit kills anything still
registered. Every wait is a poll of a condition with a deadline (wait_until), never a bare sleep.

All files go under one temporary directory per test session (TempRoot), removed at the end unless
OUTBOXD_KEEP_TMP=1.

Environment:
  OUTBOXD_BUILD_DIR  meson build directory (default <repo>/build; relative paths are taken from the
                     repository root)
  OUTBOXD_BIN        the relay binary (default <build>/outboxd)
  OUTBOXD_JSTOOL     the jstool binary (default <build>/tests/jstool)
  OUTBOXD_KEEP_TMP   1 keeps the temporary directory for a post-mortem
  OUTBOXD_TEST_PG    the PostgreSQL major version to run: 15 (default; Debian's postgresql-15), 16,
                     17 or 18 (the pinned builds scripts/install-pg-servers puts under
                     OUTBOXD_TEST_PG_ROOT, default /opt/outboxd-test-pg/<major>)
"""

import atexit
import base64
import datetime as dt
import functools
import json
import os
import pwd
import random
import re
import shutil
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import psycopg2.extras

REPO = Path(__file__).resolve().parents[2]


def build_dir():
    d = Path(os.environ.get("OUTBOXD_BUILD_DIR", "build"))
    return d if d.is_absolute() else REPO / d


def relay_bin():
    return Path(os.environ.get("OUTBOXD_BIN") or build_dir() / "outboxd")


def jstool_bin():
    return Path(os.environ.get("OUTBOXD_JSTOOL") or build_dir() / "tests" / "jstool")


PG_VERSIONS = ("15", "16", "17", "18")
PG_DEFAULT_VERSION = "15"


def pg_version():
    """The PostgreSQL major version under test, from OUTBOXD_TEST_PG (default 15)."""
    v = os.environ.get("OUTBOXD_TEST_PG", "").strip() or PG_DEFAULT_VERSION
    if v not in PG_VERSIONS:
        raise RuntimeError(f"OUTBOXD_TEST_PG={v!r}: the tests know PostgreSQL {', '.join(PG_VERSIONS)}")
    return v


def _bindir_candidates(version):
    # The pinned build first (scripts/install-pg-servers; there is none for 15), then Debian's layout.
    root = Path(os.environ.get("OUTBOXD_TEST_PG_ROOT") or "/opt/outboxd-test-pg")
    yield root / version / "bin"
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        yield Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    yield Path("/usr/lib/postgresql") / version / "bin"


@functools.lru_cache(maxsize=None)
def pg_server(version=None):
    """(bindir, `postgres --version` text) of the server build for the major version under test.
    Only a build whose postgres reports that major version is taken."""
    version = version or pg_version()
    for d in _bindir_candidates(version):
        if not (d / "initdb").exists() or not (d / "postgres").exists():
            continue
        r = subprocess.run([str(d / "postgres"), "--version"], capture_output=True, text=True)
        m = re.search(r"PostgreSQL\)? (\d+)", r.stdout)
        if r.returncode == 0 and m and m.group(1) == version:
            return d, r.stdout.strip()
    hint = "install postgresql-15" if version == "15" else "run scripts/install-pg-servers"
    raise RuntimeError(f"PostgreSQL {version} server binaries not found ({hint}, or scripts/install-deps)")


def pg_bindir():
    return pg_server()[0]


def nats_server_bin():
    p = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(p):
        raise RuntimeError("nats-server not found; run scripts/install-deps")
    return p


# ---- waiting ------------------------------------------------------------------------------------


def wait_until(fn, timeout, what, interval=0.05, detail=None):
    """Polls fn() until it returns something truthy, and returns that.

    Raises AssertionError naming `what` after `timeout` seconds; detail(), if given, is called then
    and its result added to the message (e.g. the last value seen). Exceptions from fn propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:g}s waiting for {what}"
            if detail is not None:
                try:
                    msg += f" ({detail()})"
                except Exception as e:  # noqa: BLE001 - best effort context
                    msg += f" (detail unavailable: {e!r})"
            raise AssertionError(msg)
        time.sleep(interval)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def lsn_int(text):
    """'16/B374D848' -> int. None stays None."""
    if text is None:
        return None
    hi, lo = str(text).split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(n):
    return f"{n >> 32:X}/{n & 0xFFFFFFFF:X}"


def log_tail(path, nbytes=6000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"


# ---- processes ----------------------------------------------------------------------------------

_live = set()
_live_lock = threading.Lock()


def _register(proc):
    with _live_lock:
        _live.add(proc)


def _unregister(proc):
    with _live_lock:
        _live.discard(proc)


@atexit.register
def _kill_leftovers():
    with _live_lock:
        procs = list(_live)
    for p in procs:
        if p.poll() is None:
            try:
                p.kill()
                p.wait(5)
            except Exception:  # noqa: BLE001 - last resort
                pass


def stop_process(proc, sig=signal.SIGTERM, timeout=20.0):
    """Sends sig to proc (by PID) and waits; SIGKILLs it if still alive after timeout. Returns rc."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    _unregister(proc)
    return proc.returncode


def clean_env(extra=None):
    """The environment for child processes: no OUTBOXD_* or libpq PG* settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTBOXD_", "PG"))}
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


class TempRoot:
    """One temporary directory for a test session, readable by the postgres user."""

    def __init__(self):
        self.path = Path(tempfile.mkdtemp(prefix="outboxd-it-", dir="/tmp"))
        os.chmod(self.path, 0o755)
        self._n = 0
        self._lock = threading.Lock()

    def mkdir(self, name):
        with self._lock:
            self._n += 1
            n = self._n
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:60]
        d = self.path / f"{n:03d}-{safe}"
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
        return d

    def cleanup(self):
        if os.environ.get("OUTBOXD_KEEP_TMP") == "1":
            print(f"\nkeeping test files in {self.path}")
            return
        shutil.rmtree(self.path, ignore_errors=True)


# ---- PostgreSQL ---------------------------------------------------------------------------------


class PgServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, run as `postgres` when we are root,
    of the major version OUTBOXD_TEST_PG names (pg_version()); every version gets the same settings.

    pg_hba: local trust; authuser needs a scram password over TCP; everyone else trusted over TCP.
    """

    AUTH_USER = "authuser"
    AUTH_PASSWORD = "right-password"

    def __init__(self, root_dir, wal_level="logical", extra_conf=None, hba_first=()):
        """hba_first: pg_hba.conf lines put before the defaults (e.g. hostssl ... cert)."""
        self.hba_first = list(hba_first)
        self.dir = Path(root_dir)
        self.datadir = self.dir / "data"
        self.sockdir = self.dir / "sock"
        self.logfile = self.dir / "postgres.log"
        self.wal_level = wal_level
        self.extra_conf = dict(extra_conf or {})
        self.port = free_port()
        self.proc = None
        self._conn = None
        self._bindir = pg_bindir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs a 'postgres' user to run the server "
                                   "(Debian's postgresql-15 creates it)") from None
            self._uid, self._gid = pw.pw_uid, pw.pw_gid

    # -- process handling

    def _popen_kw(self):
        kw = {"cwd": str(self.dir), "env": clean_env()}
        if self._as_root:
            kw.update(user=self._uid, group=self._gid, extra_groups=[])
        return kw

    def _own(self, path):
        if self._as_root:
            os.chown(path, self._uid, self._gid)

    def init(self):
        self.sockdir.mkdir(mode=0o700, exist_ok=True)
        self._own(self.dir)
        self._own(self.sockdir)
        cmd = [str(self._bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
               "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
        r = subprocess.run(cmd, capture_output=True, text=True, **self._popen_kw())
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "wal_level": self.wal_level,
            "fsync": "off",
            "max_wal_senders": "20",
            "max_replication_slots": "20",
            "max_connections": "100",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        conf.update(self.extra_conf)
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# outboxd integration tests\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        with open(self.datadir / "pg_hba.conf", "w") as f:
            f.writelines(line + "\n" for line in self.hba_first)
            f.write("local all all trust\n"
                    f"host all {self.AUTH_USER} 127.0.0.1/32 scram-sha-256\n"
                    "host all all 127.0.0.1/32 trust\n")
        return self

    def start(self, timeout=60):
        assert self.proc is None or self.proc.poll() is not None, "PostgreSQL already running"
        log = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen([str(self._bindir / "postgres"), "-D", str(self.datadir)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         **self._popen_kw())
        finally:
            log.close()
        _register(self.proc)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"postgres exited with {self.proc.returncode}:\n{log_tail(self.logfile)}")
            try:
                psycopg2.connect(self.dsn, connect_timeout=2).close()
                return True
            except psycopg2.OperationalError:
                return False

        wait_until(ready, timeout, f"PostgreSQL on port {self.port} to accept connections", interval=0.1)
        return self

    def stop(self, mode="fast", timeout=30):
        """Stops the server by PID: mode fast (SIGINT), smart (SIGTERM) or immediate (SIGQUIT)."""
        self._close_conn()
        sig = {"fast": signal.SIGINT, "smart": signal.SIGTERM, "immediate": signal.SIGQUIT}[mode]
        stop_process(self.proc, sig, timeout)

    def kill(self):
        self._close_conn()
        stop_process(self.proc, signal.SIGKILL, 10)

    def restart(self, mode="fast"):
        self.stop(mode)
        return self.start()

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # -- connecting

    @property
    def dsn(self):
        """A libpq conninfo the relay can use (it adds replication=database itself)."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def dsn_for(self, user, password=None, dbname="postgres"):
        s = f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"
        if password is not None:
            s += f" password={password}"
        return s

    @property
    def url(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def connect(self, autocommit=True, **kw):
        conn = psycopg2.connect(self.dsn, connect_timeout=5, **kw)
        conn.autocommit = autocommit
        return conn

    def _close_conn(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def sql(self, query, *args):
        """Runs one statement on a shared autocommit connection; returns all rows ([] if none)."""
        for attempt in (0, 1):
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            try:
                with self._conn.cursor() as cur:
                    cur.execute(query, args if args else None)
                    return cur.fetchall() if cur.description is not None else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                # The server was restarted under us: reconnect once.
                self._close_conn()
                if attempt == 1:
                    raise
        return []

    def scalar(self, query, *args):
        rows = self.sql(query, *args)
        return rows[0][0] if rows else None

    # -- replication helpers

    def current_lsn(self):
        return lsn_int(self.scalar("SELECT pg_current_wal_lsn()::text"))

    def timeline(self):
        """The timeline the server writes WAL on (after promotion, the new one)."""
        return int(self.scalar("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)

    def slot(self, name):
        """The slot's row as a dict, or None."""
        rows = self.sql("SELECT slot_name, plugin, slot_type, active, active_pid, restart_lsn::text, "
                        "confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", name)
        if not rows:
            return None
        keys = ("slot_name", "plugin", "slot_type", "active", "active_pid", "restart_lsn", "confirmed_flush_lsn")
        return dict(zip(keys, rows[0]))

    def confirmed_flush(self, slot):
        s = self.slot(slot)
        return lsn_int(s["confirmed_flush_lsn"]) if s else None

    def drop_slot(self, name, timeout=15):
        """Drops the slot if it exists, terminating a walsender that still holds it."""
        def try_drop():
            s = self.slot(name)
            if s is None:
                return True
            if s["active"]:
                if s["active_pid"]:
                    self.sql("SELECT pg_terminate_backend(%s)", s["active_pid"])
                return False
            try:
                self.sql("SELECT pg_drop_replication_slot(%s)", name)
            except psycopg2.errors.ObjectInUse:
                return False
            except psycopg2.errors.UndefinedObject:
                pass
            return True

        wait_until(try_drop, timeout, f"replication slot {name} to be dropped", interval=0.1)

    def peek_probe(self, slot):
        """Reads a test_decoding slot without consuming it: a list of (lsn:int, xid:str, data:str)."""
        rows = self.sql("SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes("
                        "%s, NULL, NULL, 'include-xids', '1', 'skip-empty-xacts', '1')", slot)
        return [(lsn_int(lsn), xid, data) for lsn, xid, data in rows]

    def probe_transactions(self, slot, table):
        """Transactions that inserted into `table` ("schema.name"), in commit order, from a
        test_decoding slot: dicts {xid, event_ids (in insert order), end_lsn}.

        test_decoding reports a COMMIT with the commit record's end LSN in the lsn column.
        """
        prefix = f"table {table}: INSERT: "
        id_re = re.compile(r"event_id\[(?:uuid|text)\]:(?:'([^']*)'|null)")
        txs, cur = [], None
        for lsn, xid, data in self.peek_probe(slot):
            if data.startswith("BEGIN"):
                cur = {"xid": xid, "event_ids": [], "end_lsn": None}
            elif data.startswith("COMMIT"):
                if cur is not None and cur["event_ids"]:
                    cur["end_lsn"] = lsn
                    txs.append(cur)
                cur = None
            elif data.startswith(prefix) and cur is not None:
                m = id_re.search(data)
                assert m, f"no event_id in test_decoding row: {data[:200]}"
                cur["event_ids"].append(m.group(1))
        return txs



class PgStandby(PgServer):
    """A hot standby of a PgServer, made without pg_basebackup (the npm server builds lack it): from
    a copy (`cp -a`) of the primary's data folder taken while the primary is cleanly stopped, with
    standby.signal and primary_conninfo (dbname included, for slot synchronisation). Like
    pg_basebackup it leaves the primary's replication slots out of the copy.

    physical_slot: the primary's physical slot it streams through (primary_slot_name; create it on
    the primary with create_physical_slot() before the copy, so the primary keeps the WAL from then
    on). sync_slots: PostgreSQL 17+ slot synchronisation (sync_replication_slots = on, with
    hot_standby_feedback = on). promote() makes it a primary on a new timeline.
    """

    # The pg_hba.conf line a primary needs for a standby's (physical) replication connection:
    # PgServer(..., hba_first=[PgStandby.PRIMARY_HBA]).
    PRIMARY_HBA = "host replication postgres 127.0.0.1/32 trust"

    def __init__(self, root_dir, primary, physical_slot=None, sync_slots=False, extra_conf=None):
        super().__init__(root_dir, wal_level=primary.wal_level, extra_conf=extra_conf)
        self.primary = primary
        self.physical_slot = physical_slot
        self.sync_slots = sync_slots
        self.application_name = self.dir.name.replace("-", "_")

    def init(self):
        assert not self.primary.running, "the primary must be stopped cleanly before its data folder is copied"
        self.sockdir.mkdir(mode=0o700, exist_ok=True)
        self._own(self.dir)
        self._own(self.sockdir)
        # cp -a keeps the owner (postgres) and the 0700 mode the server insists on.
        r = subprocess.run(["cp", "-a", str(self.primary.datadir), str(self.datadir)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"copying {self.primary.datadir} failed: {r.stderr.strip()}")
        for leftover in ("postmaster.pid", "postmaster.opts"):
            (self.datadir / leftover).unlink(missing_ok=True)
        for slot_dir in (self.datadir / "pg_replslot").iterdir():
            shutil.rmtree(slot_dir)
        (self.datadir / "standby.signal").touch()
        self._own(self.datadir / "standby.signal")
        primary_conninfo = (f"host=127.0.0.1 port={self.primary.port} user=postgres dbname=postgres "
                            f"application_name={self.application_name}")
        conf = {
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockdir}'",
            "primary_conninfo": f"'{primary_conninfo}'",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "wal_receiver_status_interval": "1s",
            "wal_retrieve_retry_interval": "'500ms'",
        }
        if self.physical_slot:
            conf["primary_slot_name"] = f"'{self.physical_slot}'"
        if self.sync_slots:
            conf["sync_replication_slots"] = "on"
        conf.update(self.extra_conf)
        # Later lines win: these override the primary's copied settings.
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# outboxd integration tests: standby\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        return self

    # -- state

    def in_recovery(self):
        return bool(self.scalar("SELECT pg_is_in_recovery()"))

    def replay_lsn(self):
        """pg_last_wal_replay_lsn() as int (None once promoted and nothing was replayed)."""
        return lsn_int(self.scalar("SELECT pg_last_wal_replay_lsn()::text"))

    def wait_replayed(self, lsn, timeout=60):
        """Waits until the standby replayed the WAL up to lsn (e.g. the primary's current_lsn())."""
        last = [None]

        def done():
            last[0] = self.replay_lsn()
            return last[0] is not None and last[0] >= lsn

        wait_until(done, timeout, f"the standby to replay up to {lsn_text(lsn)}", interval=0.05,
                   detail=lambda: f"replayed {lsn_text(last[0]) if last[0] is not None else 'nothing'}")

    def wait_caught_up(self, timeout=60):
        """Waits until the standby replayed everything the (running) primary has written."""
        self.wait_replayed(self.primary.current_lsn(), timeout)

    def wait_streaming(self, timeout=60):
        """Waits until the primary shows this standby streaming (pg_stat_replication)."""
        wait_until(lambda: self.primary.scalar(
            "SELECT state FROM pg_stat_replication WHERE application_name = %s",
            self.application_name) == "streaming",
            timeout, f"standby {self.application_name} to stream from the primary", interval=0.1)

    def synced_slot(self, name):
        """The synchronised copy of the primary's slot name (PostgreSQL 17+) as a dict (synced,
        temporary, confirmed_flush_lsn as int, ...), or None."""
        rows = self.sql("SELECT synced, temporary, failover, restart_lsn::text, confirmed_flush_lsn::text, "
                        "invalidation_reason FROM pg_replication_slots WHERE slot_name = %s", name)
        if not rows:
            return None
        synced, temporary, failover, restart, confirmed, invalidation = rows[0]
        return {"synced": synced, "temporary": temporary, "failover": failover,
                "restart_lsn": lsn_int(restart), "confirmed_flush_lsn": lsn_int(confirmed),
                "invalidation_reason": invalidation}

    def wait_synced_slot(self, name, at_least=None, timeout=90):
        """Waits until the slot-sync worker made a persistent (not temporary) synchronised copy of
        slot name, at or past the confirmed LSN at_least if given; returns synced_slot(name)."""
        last = [None]

        def ready():
            s = last[0] = self.synced_slot(name)
            if not s or not s["synced"] or s["temporary"] or s["invalidation_reason"]:
                return None
            if at_least is not None and (s["confirmed_flush_lsn"] or 0) < at_least:
                return None
            return s

        return wait_until(ready, timeout, f"a synchronised slot {name} on the standby", interval=0.1,
                          detail=lambda: f"last seen: {last[0]}")

    def start_slot_sync(self):
        """Turns on slot synchronisation (PostgreSQL 17+) on a running standby made without it.

        The sync worker backs off (0.2 s doubling to 30 s) while the primary's slot is not yet
        safe to copy (its catalog xmin older than the standby's); turning it on once the slot
        has moved past a running-transactions record makes the first attempt succeed."""
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("sync_replication_slots = on\n")
        self.sql("SELECT pg_reload_conf()")
        wait_until(lambda: self.scalar("SHOW sync_replication_slots") == "on", 10,
                   "sync_replication_slots to take effect")

    def promote(self, timeout=60):
        """pg_promote(); returns once the server accepts writes (a new timeline)."""
        assert self.scalar("SELECT pg_promote(true, %s)", int(timeout)), "pg_promote() gave up"
        wait_until(lambda: not self.in_recovery(), timeout, "the promoted standby to leave recovery")
        return self


def create_physical_slot(pg, name):
    """A physical slot on pg that keeps WAL from now on (a standby's primary_slot_name)."""
    pg.sql("SELECT pg_create_physical_replication_slot(%s, true)", name)


def multi_host_dsn(*servers, **params):
    """One libpq conninfo naming several servers, trying them in order; with
    target_session_attrs=read-write libpq skips a server in recovery (a standby)."""
    kv = {"host": ",".join("127.0.0.1" for _ in servers), "port": ",".join(str(s.port) for s in servers),
          "dbname": "postgres", "user": "postgres", "target_session_attrs": "read-write",
          "connect_timeout": "5"}
    kv.update(params)
    return " ".join(f"{k}={v}" for k, v in kv.items())


# ---- a TCP proxy that can go silent --------------------------------------------------------------

_proxies = set()
_proxies_lock = threading.Lock()


@atexit.register
def _stop_leftover_proxies():
    with _proxies_lock:
        proxies = list(_proxies)
    for p in proxies:
        p.stop()


class _ProxyPair:
    """One proxied connection: the client's socket, the server's, a pump thread per direction."""

    def __init__(self, proxy, client, server):
        self.proxy = proxy
        self.client, self.server = client, server
        self.silent = {"c2s": False, "s2c": False}
        self.held = {"c2s": bytearray(), "s2c": bytearray()}
        self.lock = threading.Lock()
        self.closed = False
        self.threads = [threading.Thread(target=self._pump, args=(client, server, "c2s"),
                                         name=f"proxy-{proxy.port}-c2s", daemon=True),
                        threading.Thread(target=self._pump, args=(server, client, "s2c"),
                                         name=f"proxy-{proxy.port}-s2c", daemon=True)]
        for t in self.threads:
            t.start()

    def _pump(self, src, dst, way):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            with self.lock:
                silent = self.silent[way]
                if data and silent:
                    self.held[way] += data  # what a partition delays: TCP would resend it later
                    continue
            if not data:
                # An end (FIN) crosses only a direction that is not silent.
                if not silent:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def set_silent(self, c2s, s2c):
        with self.lock:
            flush = []
            for way, on in (("c2s", c2s), ("s2c", s2c)):
                if self.silent[way] and not on and self.held[way]:
                    flush.append((way, bytes(self.held[way])))
                    self.held[way].clear()
                self.silent[way] = on
            for way, data in flush:
                try:
                    (self.server if way == "c2s" else self.client).sendall(data)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def join(self, timeout=5):
        for t in self.threads:
            t.join(timeout)


class TcpProxy:
    """A TCP forwarder on 127.0.0.1:<free port> to target_port, for network failures a test
    cannot make with the servers alone: silence() makes the connections open so far carry
    nothing more without closing them — both ways, or server to client only (a one-way
    partition) — as a NAT entry or a load balancer that dropped them would, or a partition:
    nothing arrives, and no FIN (an end crosses only a direction that is not silent). What a
    silent direction receives is held, as TCP would keep resending it; unsilence() delivers it
    and lets bytes flow again. Connections made after silence() flow normally (a new NAT entry).
    close_all() closes every connection; stop() also closes the listener and joins every thread.
    Started proxies are stopped at the end of the test (Ctx.cleanup) and at interpreter exit."""

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.pairs = []
        self._lock = threading.Lock()
        self._stopped = False
        self._accepter = threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True)
        self._accepter.start()
        with _proxies_lock:
            _proxies.add(self)

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def dsn(self, pg):
        """pg's conninfo, through this proxy."""
        return pg.dsn.replace(f"port={pg.port}", f"port={self.port}")

    def _accept(self):
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped:
                    client.close()
                    server.close()
                    return
                self.pairs = [p for p in self.pairs if not p.closed]
                self.pairs.append(_ProxyPair(self, client, server))

    @property
    def connections(self):
        with self._lock:
            return len([p for p in self.pairs if not p.closed])

    def silence(self, direction="both"):
        """The connections open now carry nothing more: direction "both", or "s2c" (server to
        client only; the client's bytes still reach the server)."""
        assert direction in ("both", "s2c"), direction
        with self._lock:
            pairs = list(self.pairs)
        for p in pairs:
            p.set_silent(c2s=direction == "both", s2c=True)
        return len(pairs)

    def unsilence(self):
        with self._lock:
            pairs = list(self.pairs)
        for p in pairs:
            p.set_silent(c2s=False, s2c=False)

    def close_all(self):
        with self._lock:
            pairs, self.pairs = list(self.pairs), []
        for p in pairs:
            p.close()
        for p in pairs:
            p.join()

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._accepter.join(5)
        self.close_all()
        with _proxies_lock:
            _proxies.discard(self)


# ---- NATS ---------------------------------------------------------------------------------------


def nats_request(port, subject, payload=b"", timeout=2.0):
    """A minimal NATS request over a raw socket. Returns (headers_block or None, payload) of the
    reply, or None when nothing answered in time. Used for readiness checks without libnats."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None
    try:
        s.settimeout(timeout)
        f = s.makefile("rb")
        if not f.readline().startswith(b"INFO"):
            return None
        inbox = f"_INBOX.{uuid.uuid4().hex}"
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                  + f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
        while True:
            line = f.readline()
            if not line:
                return None
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                n = int(line.split()[-1])
                body = f.read(n + 2)[:n]
                return None, body
            elif line.startswith(b"HMSG "):
                parts = line.split()
                hlen, tlen = int(parts[-2]), int(parts[-1])
                blob = f.read(tlen + 2)[:tlen]
                return blob[:hlen], blob[hlen:]
            elif line.startswith(b"-ERR"):
                return None
    except OSError:
        return None
    finally:
        s.close()


class NatsServer:
    """nats-server on 127.0.0.1:<port chosen once>, so that stop() + start() keeps the address and
    the JetStream store directory."""

    def __init__(self, root_dir, jetstream=True, conf=None, port=None, name=None):
        """conf: extra nats-server configuration text (e.g. "max_payload: 65536" or a cluster
        block), written to a file in root_dir and passed with -c."""
        self.dir = Path(root_dir)
        self.storedir = self.dir / "jetstream"
        self.logfile = self.dir / "nats-server.log"
        self.jetstream = jetstream
        self.port = port or free_port()
        self.name = name
        self.conf = conf
        self.proc = None

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def _js_ready(self):
        r = nats_request(self.port, "$JS.API.INFO", b"", timeout=1.0)
        if r is None:
            return False
        hdrs, body = r
        if hdrs is not None and b"503" in hdrs.split(b"\r\n", 1)[0]:
            return False  # no responders yet
        try:
            return "error" not in json.loads(body)
        except ValueError:
            return False

    def start(self, timeout=30, wait=True):
        assert self.proc is None or self.proc.poll() is not None, "nats-server already running"
        cmd = [nats_server_bin(), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.conf:
            conf_file = self.dir / "nats-server.conf"
            conf_file.write_text(self.conf)
            cmd += ["-c", str(conf_file)]
        if self.name:
            cmd += ["-n", self.name]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.storedir)]
        log = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(cmd, cwd=str(self.dir), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=clean_env())
        finally:
            log.close()
        _register(self.proc)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=30):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"nats-server exited with {self.proc.returncode}:\n{log_tail(self.logfile)}")
            if not tcp_open(self.port):
                return False
            return self._js_ready() if self.jetstream else True

        wait_until(ready, timeout, f"nats-server on port {self.port} to be ready", interval=0.05)
        return self

    def request_json(self, subject, payload=b"", timeout=2.0):
        """A JetStream API request through this server; the decoded JSON reply or None."""
        r = nats_request(self.port, subject, payload, timeout=timeout)
        if r is None or not r[1]:
            return None
        try:
            return json.loads(r[1])
        except ValueError:
            return None

    def stop(self, timeout=20):
        """Graceful stop (SIGTERM), by PID."""
        stop_process(self.proc, signal.SIGTERM, timeout)

    def kill(self):
        stop_process(self.proc, signal.SIGKILL, 10)

    def restart(self):
        self.stop()
        return self.start()

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """n nats-servers with JetStream, clustered over loopback (each its own store and name)."""

    def __init__(self, root_dir, n=3):
        root = Path(root_dir)
        ports = [free_port() for _ in range(n)]
        cports = [free_port() for _ in range(n)]
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in cports)
        self.nodes = []
        for i in range(n):
            d = root / f"n{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            conf = (f"cluster {{\n  name: outboxd-test\n  listen: 127.0.0.1:{cports[i]}\n"
                    f"  routes: [{routes}]\n}}\n")
            self.nodes.append(NatsServer(d, conf=conf, port=ports[i], name=f"n{i + 1}"))

    @property
    def url(self):
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout=60):
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            n.wait_ready(timeout)
        return self

    def kill(self):
        for n in self.nodes:
            if n.proc is not None:
                n.kill()

    def node(self, name):
        return next(n for n in self.nodes if n.name == name)

    def stream_leader(self, stream):
        """The name of the node leading the stream's group, or None while there is none."""
        for n in self.nodes:
            if not n.running:
                continue
            info = n.request_json(f"$JS.API.STREAM.INFO.{stream}")
            leader = ((info or {}).get("cluster") or {}).get("leader")
            if leader:
                return leader
        return None


class JetStream:
    """JetStream as seen through jstool."""

    def __init__(self, url):
        self.url = url
        self.tool = jstool_bin()
        if not os.access(self.tool, os.X_OK):
            raise RuntimeError(f"{self.tool} not found: build it (meson compile -C {build_dir()}) "
                               "or set OUTBOXD_BUILD_DIR / OUTBOXD_JSTOOL")

    def run(self, *args, timeout=60, check=True):
        r = subprocess.run([str(self.tool), *args, f"--url={self.url}"], capture_output=True,
                           timeout=timeout, env=clean_env())
        if check and r.returncode != 0:
            raise AssertionError(f"jstool {' '.join(args)} failed ({r.returncode}): "
                                 f"{r.stderr.decode('utf-8', 'replace').strip()}")
        return r

    def add_stream(self, name, subjects=("outbox.>",), dupe_window=120, storage="file", max_msg_size=None,
                   replicas=1):
        args = ["add-stream", f"--name={name}", f"--dupe-window={int(dupe_window)}", f"--storage={storage}",
                f"--replicas={int(replicas)}"]
        args += [f"--subjects={s}" for s in subjects]
        if max_msg_size is not None:
            args.append(f"--max-msg-size={int(max_msg_size)}")
        self.run(*args)

    def delete_stream(self, name):
        self.run("delete-stream", f"--name={name}")

    def info(self, name):
        return json.loads(self.run("info", f"--stream={name}").stdout)

    def count(self, name):
        return self.info(name)["messages"]

    def dump(self, name):
        """Every message in sequence order: dicts with seq, subject, headers, data (bytes)."""
        out = self.run("dump", f"--stream={name}", timeout=120).stdout
        msgs = []
        for line in out.splitlines():
            m = json.loads(line)
            m["data"] = base64.b64decode(m.pop("data_b64"))
            msgs.append(m)
        return msgs

    def msg_ids(self, name):
        return [m["headers"].get("Nats-Msg-Id") for m in self.dump(name)]

    def publish(self, subject, data, msg_id=None):
        args = ["publish", f"--subject={subject}", f"--data={data}"]
        if msg_id is not None:
            args.append(f"--msg-id={msg_id}")
        return json.loads(self.run(*args).stdout)

    def wait_count(self, name, n, timeout, what=None):
        """Waits until the stream holds at least n messages; returns the count."""
        last = [None]

        def enough():
            try:
                last[0] = self.count(name)
            except AssertionError as e:  # e.g. a timeout while the stream elects a leader
                last[0] = f"unknown ({e})"
                return False
            return last[0] >= n

        wait_until(enough, timeout, what or f"stream {name} to hold {n} messages", interval=0.1,
                   detail=lambda: f"it holds {last[0]}")
        return last[0]


# ---- the relay ----------------------------------------------------------------------------------


class Relay:
    """One `outboxd run` configuration, startable several times. Output (stdout and stderr) of every
    run is appended to one log file; log lookups only look at the current run."""

    def __init__(self, log_dir, args, env=None, name="relay"):
        self.bin = relay_bin()
        self.args = list(args)
        self.env = dict(env or {})
        self.dir = Path(log_dir)
        self.logfile = self.dir / f"{name}.log"
        self.proc = None
        self.runs = 0
        self._offset = 0
        self.http_url = None

    def start(self):
        assert self.proc is None or self.proc.poll() is not None, "relay already running"
        if not os.access(self.bin, os.X_OK):
            raise AssertionError(f"relay binary {self.bin} not found or not executable "
                                 "(build it, or set OUTBOXD_BUILD_DIR / OUTBOXD_BIN)")
        self.runs += 1
        with open(self.logfile, "ab") as log:
            log.write(f"==== harness: run {self.runs}: {self.bin} run {' '.join(self.args)}\n".encode())
            log.flush()
            self._offset = log.tell()
            # OUTBOXD_RELAY_WRAPPER runs the relay under a tool, e.g. valgrind (scripts/test).
            wrapper = shlex.split(os.environ.get("OUTBOXD_RELAY_WRAPPER", ""))
            self.proc = subprocess.Popen([*wrapper, str(self.bin), "run", *self.args], cwd=str(self.dir),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=clean_env(self.env))
        _register(self.proc)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def http_get(self, path, timeout=5):
        """(status, body text) of GET path on the relay's HTTP listener; (None, "") when it
        does not answer."""
        import urllib.error
        import urllib.request
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return None, ""

    def metrics(self):
        """The relay's /metrics as {"name{labels}": value}."""
        status, text = self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}"
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def logs(self, all_runs=False):
        """The log text of the current run (or of all runs)."""
        try:
            with open(self.logfile, "rb") as f:
                if not all_runs:
                    f.seek(self._offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, nbytes=6000):
        return log_tail(self.logfile, nbytes)

    def wait_for_log(self, pattern, timeout=30):
        """Waits until the current run's log matches pattern (a substring, or a compiled regex).
        Returns the re.Match (regex) or True (substring). Fails early if the relay exits first."""
        rx = pattern if isinstance(pattern, re.Pattern) else None

        def found():
            text = self.logs()
            hit = rx.search(text) if rx else (pattern in text)
            if hit:
                return hit
            if self.proc.poll() is not None:
                text = self.logs()  # the last lines may have landed just before the exit
                hit = rx.search(text) if rx else (pattern in text)
                if hit:
                    return hit
                raise AssertionError(
                    f"relay exited with code {self.proc.returncode} before logging "
                    f"{getattr(pattern, 'pattern', pattern)!r}; its log:\n{self.logs()[-4000:]}")
            return None

        return wait_until(found, timeout, f"relay log line {getattr(pattern, 'pattern', pattern)!r}",
                          interval=0.05, detail=lambda: "log tail:\n" + self.logs()[-2000:])

    def wait_streaming(self, slot=None, timeout=30):
        """Waits for `streaming from slot "S" at X/X`; returns the LSN as int."""
        name = re.escape(slot) if slot else r"[^\"]+"
        # \\? : in JSON logs the quotes around the slot name are escaped
        m = self.wait_for_log(re.compile(rf'streaming from slot \\?"{name}\\?" at ([0-9A-Fa-f]+/[0-9A-Fa-f]+)'),
                              timeout)
        return lsn_int(m.group(1))

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def kill(self):
        """SIGKILL by PID; returns once it is gone."""
        return stop_process(self.proc, signal.SIGKILL, 10)

    def wait(self, timeout):
        """Waits for the relay to exit; returns the exit code (negative: killed by that signal).
        Raises AssertionError if it is still running after timeout."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"relay still running {timeout:g}s later; log tail:\n"
                                 f"{self.logs()[-2000:]}") from None
        _unregister(self.proc)
        return rc

    def run_to_exit(self, timeout=20):
        """Starts the relay and waits for it to exit by itself; returns (exit code, log of this run)."""
        self.start()
        rc = self.wait(timeout)
        return rc, self.logs()

    def stop(self, timeout=10):
        """SIGTERM, then SIGKILL after timeout. Returns the exit code."""
        return stop_process(self.proc, signal.SIGTERM, timeout)


# ---- the outbox ---------------------------------------------------------------------------------

OUTBOX_SQL = REPO / "scripts" / "outbox.sql"

# Values that exercise the subject escaping: dots, NATS wildcards, spaces, non-ASCII, '%', empty.
AGGREGATE_TYPES = ["order", "order", "order", "customer", "customer", "invoice", "Order-Line_2",
                   "a.b", "caf\u00e9", "x y", "*", ">", "50%", "", "r&d(1)+[x]|y^z~!@#$:/?;=,'"]
EVENT_TYPES = ["created", "created", "updated", "shipped", "cancelled", "PaymentReceived", "v1.0",
               "\u65e5\u672c", "tab\there", "_"]

# Bytes kept as they are in a subject token; everything else becomes %XX (upper-case hex).
_SUBJECT_SAFE = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_~!@#$&'()+,;=:/?[]^|")


def subject_token(value):
    """The relay's escaping of one template value (the contract): NULL or empty becomes '_'."""
    if value is None or value == "":
        return "_"
    return "".join(chr(b) if b in _SUBJECT_SAFE else f"%{b:02X}" for b in value.encode("utf-8"))


def header_value(value):
    """A column value as the relay writes it into a header: control bytes (below 0x20, and 0x7F)
    become %XX, since CR or LF would end the header; everything else is kept byte for byte. An
    empty value gets no header (None here), since libnats 3.4 misreads empty header values."""
    if value == "":
        return None
    return "".join(f"%{ord(c):02X}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in value)


def expected_subject(aggregate_type, event_type, prefix="outbox"):
    return f"{prefix}.{subject_token(aggregate_type)}.{subject_token(event_type)}"


def create_outbox(pg, table="public.outbox"):
    """Creates public.outbox from scripts/outbox.sql and, for another name, a table like it."""
    pg.sql(OUTBOX_SQL.read_text())
    if table != "public.outbox":
        pg.sql(f"CREATE TABLE {table} (LIKE public.outbox INCLUDING ALL)")
    return table


def mixed_sizes(total, ntx, lo, hi, rng):
    """ntx transaction sizes in [lo, hi] that add up to total, in random order."""
    assert lo * ntx <= total <= hi * ntx, "impossible sizes"
    sizes = [lo] * ntx
    extra = total - lo * ntx
    open_ = list(range(ntx))
    while extra > 0:
        i = rng.randrange(len(open_))
        k = open_[i]
        sizes[k] += 1
        extra -= 1
        if sizes[k] == hi:
            open_[i] = open_[-1]
            open_.pop()
    return sizes


def random_sizes(total, lo, hi, rng):
    """Random transaction sizes in [lo, hi] adding up to total (the last may be smaller)."""
    sizes = []
    while total > 0:
        n = min(total, rng.randint(lo, hi))
        sizes.append(n)
        total -= n
    return sizes


class OutboxWriter:
    """Writes events into an outbox table over its own connection. Transactions commit one after
    the other, so the order of `event_ids` (and of `transactions`) is the commit order."""

    COLUMNS = ("event_id", "aggregate_type", "aggregate_id", "event_type", "payload", "trace_id")

    def __init__(self, pg, table="public.outbox", seed=None):
        self.pg = pg
        self.table = table
        self.rng = random.Random(seed)
        self.conn = pg.connect(autocommit=False)
        self.transactions = []  # event ids per committed transaction, in commit order
        self._thread = None
        self._error = None
        self._stop = threading.Event()
        self._seq = 0
        self.in_doubt = None  # event ids of a COMMIT whose outcome is unknown (see insert_txn)

    @property
    def event_ids(self):
        return [e for tx in self.transactions for e in tx]

    def reconnect(self):
        """A new connection, e.g. after the server restarted."""
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - the old connection is gone anyway
            pass
        self.conn = self.pg.connect(autocommit=False)

    def make_event(self, **over):
        """One event as a dict of column values (payload as a Python object)."""
        rng = self.rng
        self._seq += 1
        ev = {
            "event_id": str(uuid.uuid4()),
            "aggregate_type": rng.choice(AGGREGATE_TYPES),
            "aggregate_id": f"agg-{rng.randrange(1000)}",
            "event_type": rng.choice(EVENT_TYPES),
            "payload": {
                "seq": self._seq,
                "zeta": rng.random(),
                "alpha": [1, 2.5, None, True, "s\u00fc\u00df \"quoted\" \\ back"],
                "nested": {"b": rng.randrange(10 ** 12), "a": "x" * rng.randrange(0, 200)},
                "emoji": "\U0001F680",
            },
            "trace_id": None if rng.random() < 0.3 else uuid.uuid4().hex,
        }
        ev.update(over)
        return ev

    def insert_rows(self, cur, events):
        """INSERTs events through cursor cur, inside whatever transaction is open there."""
        rows = [(e["event_id"], e["aggregate_type"], e["aggregate_id"], e["event_type"],
                 psycopg2.extras.Json(e["payload"]), e["trace_id"]) for e in events]
        psycopg2.extras.execute_values(
            cur, f"INSERT INTO {self.table} ({', '.join(self.COLUMNS)}) VALUES %s", rows,
            template="(%s, %s, %s, %s, %s::jsonb, %s)", page_size=1000)

    def insert_txn(self, events=None, n=None, before_commit=None):
        """Inserts events (or n new ones) in one transaction and commits. before_commit(cursor),
        if given, runs after the inserts and before COMMIT; its result is returned with the ids.
        Returns the event ids (or (ids, before_commit result))."""
        if events is None:
            events = [self.make_event() for _ in range(n)]
        res = None
        try:
            with self.conn.cursor() as cur:
                self.insert_rows(cur, events)
                if before_commit is not None:
                    res = before_commit(cur)
            # If the connection breaks during COMMIT (the server killed), the transaction may
            # or may not have committed: in_doubt says which events.
            self.in_doubt = [e["event_id"] for e in events]
            self.conn.commit()
            self.in_doubt = None
        except BaseException:
            self.conn.rollback()
            raise
        ids = [e["event_id"] for e in events]
        self.transactions.append(ids)
        return ids if before_commit is None else (ids, res)

    def write(self, sizes, pause=0.0):
        """One transaction per size, sequentially. Returns the ids written by this call."""
        ids = []
        for n in sizes:
            if self._stop.is_set():
                break
            ids += self.insert_txn(n=n)
            if pause:
                time.sleep(pause)  # pacing a burst, not synchronisation
        return ids

    def start_background(self, sizes, pause=0.0):
        """Writes the transactions on a thread; wait() joins it."""
        assert self._thread is None, "a background write is already running"

        def run():
            try:
                self.write(sizes, pause)
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="outbox-writer", daemon=True)
        self._thread.start()
        return self

    @property
    def busy(self):
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout=120):
        """Waits for the background writer; re-raises its exception."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError(f"background writer still running after {timeout}s")
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def rows(self):
        """The table's rows as dicts keyed by event_id, rendered by PostgreSQL (payload::text)."""
        with self.pg.connect() as c, c.cursor() as cur:
            cur.execute(f"SELECT event_id::text, aggregate_type, aggregate_id, event_type, payload::text, "
                        f"occurred_at, schema_version, trace_id FROM {self.table}")
            keys = ("event_id", "aggregate_type", "aggregate_id", "event_type", "payload",
                    "occurred_at", "schema_version", "trace_id")
            out = {r[0]: dict(zip(keys, r)) for r in cur.fetchall()}
        c.close()
        return out

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass


def parse_rfc3339(s):
    """Parses the relay's RFC 3339 UTC timestamps (Z suffix, 0..6 fraction digits)."""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", s), f"not RFC 3339 UTC: {s!r}"
    base, _, frac = s[:-1].partition(".")
    t = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)
    if frac:
        t += dt.timedelta(microseconds=int((frac + "000000")[:6]))
    return t
