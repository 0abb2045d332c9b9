"""pytest fixtures for the outboxd integration tests (see harness.py for the servers and helpers).

Scopes: one temporary root per session; one PostgreSQL cluster per test module (tests use their own
table, slot and publication names, and ctx drops its slots and publications afterwards); one
nats-server per test (so every test has a fresh JetStream with its own stream on outbox.>).
Everything started is stopped by PID in the finalizers, also when a test fails; when a test fails,
the relay's log tail is added to its report.
"""

import itertools
import os
import sys

import pytest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import JetStream, free_port, NatsServer, OutboxWriter, PgServer, Relay, TempRoot  # noqa: E402

_names = itertools.count(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): per-test time bound (pytest-timeout)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when not in ("setup", "call") or not rep.failed:
        return
    ctx = getattr(item, "funcargs", {}).get("ctx")
    if ctx is None:
        return
    for r in ctx.relays:
        rep.sections.append((f"outboxd log ({r.logfile}, last 6 kB)", r.tail()))


@pytest.fixture(scope="session")
def root():
    r = TempRoot()
    yield r
    r.cleanup()


def _start_pg(root, name, **kw):
    pg = PgServer(root.mkdir(name), **kw).init()
    try:
        pg.start()
        pg.sql(f"CREATE ROLE {PgServer.AUTH_USER} LOGIN REPLICATION PASSWORD %s", PgServer.AUTH_PASSWORD)
    except BaseException:
        pg.kill()
        raise
    return pg


@pytest.fixture(scope="module")
def pg(root, request):
    """PostgreSQL 15 with wal_level=logical, shared by the tests of one module."""
    server = _start_pg(root, f"pg-{request.module.__name__}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg_replica(root, request):
    """A second PostgreSQL with wal_level=replica (for the start-up check)."""
    server = _start_pg(root, f"pg-replica-{request.module.__name__}", wal_level="replica")
    yield server
    server.stop()


@pytest.fixture
def nats(root, request):
    """nats-server with JetStream, one per test; stop()/start() keep its port and store."""
    server = NatsServer(root.mkdir(f"nats-{request.node.name}")).start()
    yield server
    server.kill()


@pytest.fixture
def nats_nojs(root, request):
    """nats-server without JetStream."""
    server = NatsServer(root.mkdir(f"nats-nojs-{request.node.name}"), jetstream=False).start()
    yield server
    server.kill()


@pytest.fixture
def js(nats):
    return JetStream(nats.url)


class Ctx:
    """One test's world: names, the relays and writers it started, and their clean-up.

    Names are unique per test: table public.outbox_tN, slot and publication outboxd_tN, stream
    OUTBOX (the nats-server is per test anyway)."""

    def __init__(self, root, request, pg, nats, js):
        n = next(_names)
        self.pg, self.nats, self.js = pg, nats, js
        self.dir = root.mkdir(request.node.name)
        self.tag = f"t{n}"
        self.table = f"public.outbox_{self.tag}"
        self.slot = f"outboxd_{self.tag}"
        self.publication = f"outboxd_{self.tag}"
        self.stream = "OUTBOX"
        self.relays = []
        self.writers = []
        self.slots = {self.slot}
        self.publications = {self.publication}
        self.tables = set()

    # -- setup helpers

    def create_table(self, table=None):
        table = table or self.table
        harness.create_outbox(self.pg, table)
        if table != "public.outbox":
            self.tables.add(table)
        return table

    def add_stream(self, **kw):
        self.js.add_stream(self.stream, **kw)

    def setup(self, **stream_kw):
        """The usual start: the outbox table and the stream."""
        self.create_table()
        self.add_stream(**stream_kw)

    def relay(self, *extra, env=None, name=None, pg_url="default", nats_url="default", slot="default",
              publication="default", table="default", http_addr="default"):
        """A Relay (not started) with this test's settings; pass None to leave a flag out. Each
        relay gets its own HTTP port (relay.http_url), kept across its restarts."""
        http_port = free_port()
        vals = {
            "http-addr": f"127.0.0.1:{http_port}" if http_addr == "default" else http_addr,
            "pg-url": self.pg.dsn if pg_url == "default" else pg_url,
            "nats-url": (self.nats.url if self.nats else None) if nats_url == "default" else nats_url,
            "slot": self.slot if slot == "default" else slot,
            "publication": self.publication if publication == "default" else publication,
            "table": self.table if table == "default" else table,
        }
        if vals["slot"]:
            self.slots.add(vals["slot"])
        if vals["publication"]:
            self.publications.add(vals["publication"])
        args = [f"--{k}={v}" for k, v in vals.items() if v is not None] + list(extra)
        r = Relay(self.dir, args, env=env, name=name or f"relay{len(self.relays) + 1}")
        r.http_url = f"http://127.0.0.1:{http_port}" if http_addr == "default" else None
        self.relays.append(r)
        return r

    def start_relay(self, *extra, timeout=30, **kw):
        """Starts a relay and waits until it streams from its slot."""
        r = self.relay(*extra, **kw).start()
        r.wait_streaming(timeout=timeout)
        return r

    def writer(self, table=None, seed=None):
        w = OutboxWriter(self.pg, table or self.table, seed=seed)
        self.writers.append(w)
        return w

    def create_probe(self, name=None):
        """A test_decoding slot that records every transaction from now on (dropped afterwards)."""
        name = name or f"probe_{self.tag}"
        self.slots.add(name)
        self.pg.sql("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", name)
        return name

    # -- teardown

    def cleanup(self):
        errors = []
        for r in self.relays:
            if r.proc is not None:
                r.kill()
        for w in self.writers:
            w.close()
        if self.pg.running:
            for s in sorted(self.slots):
                try:
                    self.pg.drop_slot(s)
                except Exception as e:  # noqa: BLE001 - report all, then fail
                    errors.append(f"slot {s}: {e}")
            for p in sorted(self.publications):
                try:
                    self.pg.sql(f'DROP PUBLICATION IF EXISTS "{p}"')
                except Exception as e:  # noqa: BLE001
                    errors.append(f"publication {p}: {e}")
        if errors:
            raise AssertionError("clean-up failed: " + "; ".join(errors))


@pytest.fixture
def ctx(root, request, pg, nats, js):
    c = Ctx(root, request, pg, nats, js)
    yield c
    c.cleanup()
