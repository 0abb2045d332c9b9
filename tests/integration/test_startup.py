"""Start-up of `outboxd run`: a clean start and stop, settings from the environment, and every
start-up check with its exit code (2 bad setting, 3 failed check) and message. Every relay run here
must end by itself within RUN_LIMIT seconds."""

import signal

import pytest

from harness import PgServer, create_outbox, free_port

RUN_LIMIT = 20

pytestmark = pytest.mark.timeout(90)


def run_check(ctx, *extra, rc=3, expect=(), **kw):
    """Runs the relay until it exits; asserts its exit code and that each string of expect is in
    its output. Returns the output."""
    relay = ctx.relay(*extra, **kw)
    code, log = relay.run_to_exit(timeout=RUN_LIMIT)
    assert code == rc, f"exit code {code}, expected {rc}; output:\n{log[-3000:]}"
    for s in expect:
        assert s in log, f"{s!r} not in the output:\n{log[-3000:]}"
    return log


def test_starts_creates_publication_and_slot_and_stops_cleanly(ctx, pg):
    ctx.setup()
    relay = ctx.start_relay()
    slot = pg.slot(ctx.slot)
    assert slot is not None and slot["plugin"] == "pgoutput" and slot["slot_type"] == "logical"
    tables = pg.sql("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
                    ctx.publication)
    assert tables == [(ctx.table,)]
    assert pg.sql("SELECT pubinsert FROM pg_publication WHERE pubname = %s", ctx.publication) == [(True,)]

    relay.send_signal(signal.SIGTERM)
    assert relay.wait(10) == 0
    assert "shutting down: confirmed " in relay.logs()

    # A second start reuses the publication and the slot.
    relay.start()
    relay.wait_streaming(ctx.slot)
    relay.send_signal(signal.SIGINT)
    assert relay.wait(10) == 0


def test_settings_from_the_environment(ctx, pg, nats):
    ctx.setup()
    env = {"OUTBOXD_PG_URL": pg.dsn, "OUTBOXD_NATS_URL": nats.url, "OUTBOXD_SLOT": ctx.slot,
           "OUTBOXD_PUBLICATION": ctx.publication, "OUTBOXD_TABLE": ctx.table}
    relay = ctx.relay(env=env, pg_url=None, nats_url=None, slot=None, publication=None, table=None).start()
    relay.wait_streaming(ctx.slot)
    assert pg.slot(ctx.slot) is not None
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(10) == 0


def test_missing_pg_url_is_a_bad_setting(ctx):
    run_check(ctx, pg_url=None, rc=2, expect=["missing setting: --pg-url"])


@pytest.mark.parametrize("flag", ["--max-inflight=lots", "--ack-timeout=soon", "--create=maybe"])
def test_unparsable_setting_is_a_bad_setting(ctx, flag):
    ctx.setup()
    run_check(ctx, flag, rc=2)


def test_postgres_unreachable(ctx):
    ctx.add_stream()
    run_check(ctx, pg_url=f"host=127.0.0.1 port={free_port()} user=postgres dbname=postgres connect_timeout=5",
              expect=["could not connect to PostgreSQL"])


def test_wrong_password(ctx, pg):
    ctx.setup()
    run_check(ctx, pg_url=pg.dsn_for(PgServer.AUTH_USER, "wrong-password"),
              expect=["could not connect to PostgreSQL", "password authentication failed"])


def test_wal_level_replica(ctx, pg_replica):
    ctx.add_stream()
    create_outbox(pg_replica, ctx.table)
    run_check(ctx, pg_url=pg_replica.dsn, expect=['wal_level is "replica"'])


def test_role_without_replication_attribute(ctx, pg):
    ctx.setup()
    role = f"norepl_{ctx.tag}"
    pg.sql(f"CREATE ROLE {role} LOGIN NOREPLICATION")
    pg.sql(f"GRANT SELECT ON {ctx.table} TO {role}")
    # The publication exists, so only the missing attribute stands in the way.
    pg.sql(f'CREATE PUBLICATION "{ctx.publication}" FOR TABLE {ctx.table} WITH (publish = \'insert\')')
    run_check(ctx, pg_url=pg.dsn_for(role), expect=["lacks the REPLICATION attribute"])


def test_table_missing(ctx, pg):
    ctx.add_stream()
    run_check(ctx, table="public.nope", expect=["outbox table public.nope does not exist"])


@pytest.mark.parametrize("column", ["event_id", "payload"])
def test_table_without_required_column(ctx, pg, column):
    ctx.add_stream()
    ctx.create_table()
    pg.sql(f"ALTER TABLE {ctx.table} DROP COLUMN {column}")
    run_check(ctx, expect=[f'has no column "{column}"'])


def test_subject_template_names_a_missing_column(ctx):
    ctx.setup()
    run_check(ctx, "--subject=outbox.{aggregate_type}.{nope}", expect=['subject template names column "nope"'])


def test_publication_missing_without_create(ctx, pg):
    ctx.setup()
    run_check(ctx, "--create=false", expect=[f'publication "{ctx.publication}" does not exist'])
    assert pg.slot(ctx.slot) is None, "--create=false created a slot"
    assert pg.sql("SELECT 1 FROM pg_publication WHERE pubname = %s", ctx.publication) == []


def test_publication_not_covering_the_table(ctx, pg):
    ctx.setup()
    other = ctx.create_table(f"public.other_{ctx.tag}")
    pg.sql(f'CREATE PUBLICATION "{ctx.publication}" FOR TABLE {other} WITH (publish = \'insert\')')
    run_check(ctx, expect=[f'publication "{ctx.publication}" does not cover {ctx.table}'])


def test_nats_unreachable(ctx):
    ctx.setup()
    run_check(ctx, nats_url=f"nats://127.0.0.1:{free_port()}", expect=["could not connect to NATS"])


def test_jetstream_not_enabled(ctx, nats_nojs):
    ctx.create_table()
    run_check(ctx, nats_url=nats_nojs.url, expect=["JetStream is not enabled"])
