"""pytest fixtures for the outboxd integration tests (see harness.py for the servers and helpers).

Scopes: one temporary root per session; one PostgreSQL cluster per test module (tests use their own
table, slot and publication names, and ctx drops its slots and publications afterwards); one
nats-server per test (so every test has a fresh JetStream with its own stream on outbox.>).
Everything started is stopped by PID in the finalizers, also when a test fails; when a test fails,
the relay's log tail is added to its report.

PostgreSQL version: OUTBOXD_TEST_PG (15, the default, 16, 17 or 18) picks the server build every
PostgreSQL fixture starts (harness.pg_version); the report header names it. The whole suite runs on
15; PG_MATRIX below is the core subset scripts/test's pg-matrix stage runs on 16, 17 and 18
(`pytest -m pg_matrix`).
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

# The core subset run on PostgreSQL 16, 17 and 18 (scripts/test, stage pg-matrix): every test whose
# outcome depends on the server — relaying and confirming through pgoutput, restarts of the server
# and kills of the relay, rewinding, replaying and advancing slots, backfill from the slot's
# snapshot, prune, column types, logical messages and partitions, setup / doctor / status and the
# start-up checks with their catalog queries and server errors, TLS and SCRAM to the server. Left
# to 15 only: tests of NATS alone (credentials, outages, the three-node cluster), of settings
# parsing, the 50k-event kill loop (the same path as the five-kill test here, ten times longer),
# and scripts/demo (it starts Debian's 15 itself).
# Test names per module; a name that no longer exists is an error, so the subset cannot shrink
# silently.
PG_MATRIX = {
    "test_relay": [
        "test_10k_events_exactly_once_with_row_contents_in_commit_order",
        "test_rollbacks_and_other_statements_publish_nothing",
        "test_idle_outbox_does_not_hold_back_wal",
        "test_sigkill_five_times_during_a_burst_loses_and_duplicates_nothing",
        "test_broker_down_relay_stays_up_confirms_nothing_unpublished_then_catches_up",
        "test_sigterm_during_a_burst_confirms_exactly_what_was_acked",
        "test_mixed_workload_with_a_dead_letter_then_a_clean_stop",
    ],
    "test_failures": [
        "test_postgres_restarted_during_load_and_idle_republishes_nothing",
        "test_two_relays_on_one_slot_standby_takes_over",
        "test_poison_events_go_to_the_dead_letter_subject_or_stop_the_relay",
    ],
    "test_replay": [
        "test_rewind_to_a_time_or_an_lsn_publishes_exactly_what_committed_after_it",
        "test_replay_from_the_table_by_time_and_aggregate",
        "test_slot_advance_past_a_poison_event",
        "test_slot_list_create_drop_and_refusals",
    ],
    "test_backfill": [
        "test_rows_before_the_slot_are_published_once_then_never_again",
        "test_without_backfill_existing_rows_are_counted_and_skipped",
    ],
    "test_prune": [
        "test_prune_deletes_confirmed_old_rows_and_keeps_new_ones",
        "test_prune_never_deletes_rows_the_relay_has_not_confirmed",
        "test_prune_deletes_in_batches",
        "test_prune_dry_run_counts_and_deletes_nothing",
        "test_prune_passes_an_idle_database_right_after_a_wal_switch",
        "test_prune_refusals",
        "test_prune_every_table_by_its_mapped_time_column",
    ],
    "test_shapes": [
        "test_debezium_table_relayed_unchanged_with_the_preset",
        "test_a_debezium_table_without_the_preset_is_refused_with_the_fix",
        "test_each_payload_type_arrives_byte_for_byte",
        "test_two_tables_with_own_templates_arrive_in_commit_order",
        "test_table_less_events_publish_on_commit_only",
        "test_messages_can_be_turned_off",
        "test_partitioned_outbox_is_relayed_under_its_root",
    ],
    "test_setup": [
        "test_setup_prints_sql_and_stream_and_creates_nothing",
        "test_printed_sql_runs_twice_and_matches_apply",
        "test_odd_names_are_quoted",
        "test_setup_apply_twice_then_the_role_is_enough_to_relay",
        "test_setup_apply_needs_an_administrator",
        "test_doctor_fails_on_wal_level_replica",
        "test_doctor_passes_after_setup",
    ],
    "test_audit": [
        "test_complete_stream_then_deleted_events_and_a_range",
    ],
    "test_observability": [
        "test_status_with_a_running_and_a_stopped_relay",
    ],
    "test_startup": [
        "test_starts_creates_publication_and_slot_and_stops_cleanly",
        "test_wrong_password",
        "test_wal_level_replica",
        "test_table_missing",
        "test_table_without_required_column",
        "test_publication_missing_without_create",
        "test_publication_not_covering_the_table",
        "test_role_without_replication_attribute",
    ],
    "test_promises": [
        "test_a_transaction_longer_than_the_duplicate_window_cut_by_a_crash_is_stored_once",
    ],
    "test_positions": [
        "test_a_restored_volume_snapshot_publishes_every_event_of_the_new_history",
        "test_backfilled_rows_and_streamed_transactions_never_share_a_position",
    ],
    "test_outages": [
        "test_a_lost_slot_stops_the_relay_with_the_runbook_and_status_says_so",
    ],
    "test_security": [
        "test_postgres_tls_with_verify_full_and_a_client_certificate",
        "test_postgres_password_from_a_file",
    ],
    "test_failover": [
        "test_primary_killed_under_load_the_relay_follows_the_promoted_standby_exactly_once",
        "test_with_the_standby_down_the_relay_publishes_nothing_the_promoted_standby_lacks",
        "test_a_relay_back_after_an_async_failover_skips_nothing_the_new_primary_committed",
        "test_failover_to_a_standby_without_the_slot_stops_with_the_runbook_which_closes_the_gap",
    ],
}

# The sanitizer build (scripts/test, stage asan) runs PG_MATRIX and these: the paths of the relay
# that the core subset does not take (silent connections and lost acknowledgements, proven skips,
# a recovery, the audit). Whole modules are named by None.
SANITIZE = {
    "test_network": None,
    "test_positions": None,
    "test_audit": None,
    "test_outages": ["test_a_lost_slot_is_recovered_in_commit_order_with_nothing_twice"],
}

# Tests that need a newer PostgreSQL than some under test: {module: {test: (major, reason)}}. On an
# older server they are deselected, not skipped (scripts/test counts a skip as a failure: a
# missing test), and the end of the run lists them with the reason; they are in PG_MATRIX too, so
# the pg-matrix stage runs them on every version that has what they need. A name that no longer
# exists is an error, as in PG_MATRIX.
_FAILOVER_SLOTS = ("failover slots (the standby's sync_replication_slots, the primary's "
                   "synchronized_standby_slots) are new in PostgreSQL 17")
PG_MIN = {
    "test_failover": {
        "test_primary_killed_under_load_the_relay_follows_the_promoted_standby_exactly_once":
            (17, _FAILOVER_SLOTS),
        "test_with_the_standby_down_the_relay_publishes_nothing_the_promoted_standby_lacks":
            (17, _FAILOVER_SLOTS),
        "test_a_relay_back_after_an_async_failover_skips_nothing_the_new_primary_committed":
            (17, _FAILOVER_SLOTS),
    },
}


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): per-test time bound (pytest-timeout)")
    config.addinivalue_line("markers", "pg_matrix: in the core subset run on every PostgreSQL version")
    config.addinivalue_line("markers", "sanitize: run by the sanitizer build beside the core subset")


def pytest_report_header(config):
    try:
        bindir, version = harness.pg_server()
    except RuntimeError as e:  # the PostgreSQL fixtures fail with it again, test by test
        return f"PostgreSQL: {e}"
    return f"PostgreSQL {harness.pg_version()} (OUTBOXD_TEST_PG): {version}, {bindir}"


def pytest_collection_modifyitems(session, config, items):
    modules = {}
    for item in items:
        modules[item.module.__name__] = item.module
        name, module = item.originalname or item.name, item.module.__name__
        if name in PG_MATRIX.get(module, ()):
            item.add_marker(pytest.mark.pg_matrix)
        if module in SANITIZE and (SANITIZE[module] is None or name in SANITIZE[module]):
            item.add_marker(pytest.mark.sanitize)
    for table, what in ((PG_MATRIX, "PG_MATRIX"), (PG_MIN, "PG_MIN"), (SANITIZE, "SANITIZE")):
        missing = [f"{m}::{n}" for m, mod in modules.items() for n in table.get(m) or ()
                   if not callable(getattr(mod, n, None))]
        if missing:
            raise pytest.UsageError(f"{what} names tests that do not exist: " + ", ".join(missing))

    # Deselect (not skip) what the server under test is too old for; pytest_terminal_summary
    # names them.
    version = int(harness.pg_version())
    keep, too_new = [], []
    for item in items:
        need = PG_MIN.get(item.module.__name__, {}).get(item.originalname or item.name)
        if need and version < need[0]:
            too_new.append((item, need))
        else:
            keep.append(item)
    if too_new:
        config.hook.pytest_deselected(items=[item for item, _ in too_new])
        items[:] = keep
    config._outboxd_needs_newer_pg = [(item.nodeid, need) for item, need in too_new]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    listed = getattr(config, "_outboxd_needs_newer_pg", [])
    if listed:
        tr = terminalreporter
        tr.write_sep("-", f"deselected on PostgreSQL {harness.pg_version()}: "
                          f"{len(listed)} tests need a newer server")
        for nodeid, (major, reason) in listed:
            tr.write_line(f"{nodeid}: needs PostgreSQL {major}+: {reason}")


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
    """PostgreSQL (the OUTBOXD_TEST_PG version) with wal_level=logical, shared by one module's tests."""
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
        self.proxies = []
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

    def proxy(self, target_port):
        """A harness.TcpProxy to target_port, stopped when the test ends."""
        p = harness.TcpProxy(target_port)
        self.proxies.append(p)
        return p

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
        for p in self.proxies:
            p.stop()
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


def stop_worlds(ctxs, servers):
    """Stops, by PID, the relays and writers of test worlds made on servers of their own, then
    those servers (newest first)."""
    for c in ctxs:
        for r in c.relays:
            if r.proc is not None:
                r.kill()
        for w in c.writers:
            w.close()
    for s in reversed(servers):
        if s.running:
            s.stop("immediate")


@pytest.fixture
def servers(root, request, nats, js):
    """make(name, port=None, extra_conf=None) -> a Ctx on a PostgreSQL server of its own (the
    module's pg is shared; these are for tests that restart, restore or replace a database).
    Everything is stopped by PID afterwards."""
    made, ctxs = [], []

    def make(name, port=None, extra_conf=None):
        server = PgServer(root.mkdir(f"pg-{name}"), extra_conf=extra_conf)
        if port:
            server.port = port
        made.append(server)
        server.init().start()
        server.sql(f"CREATE ROLE {PgServer.AUTH_USER} LOGIN REPLICATION PASSWORD %s",
                   PgServer.AUTH_PASSWORD)
        c = Ctx(root, request, server, nats, js)
        ctxs.append(c)
        return c

    yield make
    stop_worlds(ctxs, made)


@pytest.fixture
def ctx(root, request, pg, nats, js):
    c = Ctx(root, request, pg, nats, js)
    yield c
    c.cleanup()
