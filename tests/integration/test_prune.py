"""`outboxd prune`: old outbox rows are deleted in batches, and never a row whose event the relay has
not confirmed (the slot's confirmed position must pass the WAL position at the fence first)."""

import re
import subprocess
import time

import pytest

from harness import clean_env, lsn_int, relay_bin, wait_until
from test_replay import check

SUMMARY_RE = re.compile(r"deleted (\d+) rows from (\S+) in (\d+) batch(?:es)? of at most (\d+) in [0-9.]+ s")


def add_rows(pg, table, n, age="2 days"):
    """Inserts n outbox rows whose occurred_at is `age` ago (None: now), in one transaction;
    returns their event ids."""
    at = "now()" if age is None else f"now() - interval '{age}'"
    rows = pg.sql(f"INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload, "
                  f"occurred_at) SELECT gen_random_uuid(), 'order', 'o-' || g, 'created', "
                  f"jsonb_build_object('g', g), {at} FROM generate_series(1, %s) g RETURNING event_id::text", n)
    return [r[0] for r in rows]


def remaining(pg, table):
    return {r[0] for r in pg.sql(f"SELECT event_id::text FROM {table}")}


def prune(ctx, *args, table=None, slot=None):
    """Runs `outboxd prune ARGS` with this test's settings; returns the CompletedProcess (text)."""
    cmd = [str(relay_bin()), "prune", *args, f"--pg-url={ctx.pg.dsn}", f"--slot={slot or ctx.slot}",
           f"--publication={ctx.publication}", f"--table={table or ctx.table}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean_env(),
                          stdin=subprocess.DEVNULL)


@pytest.mark.timeout(120)
def test_prune_deletes_confirmed_old_rows_and_keeps_new_ones(ctx, pg, js):
    ctx.setup()
    ctx.start_relay("--status-interval=500ms")
    old = add_rows(pg, ctx.table, 20)
    new = add_rows(pg, ctx.table, 5, age=None)
    recent = add_rows(pg, ctx.table, 3, age="2 hours")
    js.wait_count(ctx.stream, 28, 60)

    r = check(prune(ctx, "--older-than=1d", "--wait=30s"))
    m = SUMMARY_RE.search(r.stdout)
    assert m and int(m.group(1)) == 20 and m.group(2) == ctx.table, r.stdout
    assert remaining(pg, ctx.table) == set(new + recent)
    assert set(old) <= set(js.msg_ids(ctx.stream)), "every pruned row had been published"

    # Hours work as well as days; nothing older is left, so a second run deletes nothing.
    r = check(prune(ctx, "--older-than=1h"))
    assert SUMMARY_RE.search(r.stdout).group(1) == "3", r.stdout
    assert remaining(pg, ctx.table) == set(new)
    r = check(prune(ctx, "--older-than=1h"))
    assert SUMMARY_RE.search(r.stdout).groups()[0::2] == ("0", "1"), r.stdout


@pytest.mark.timeout(120)
def test_prune_never_deletes_rows_the_relay_has_not_confirmed(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay("--status-interval=500ms")
    assert relay.stop() == 0
    ids = add_rows(pg, ctx.table, 12)  # old enough, but the relay is not running

    started = time.monotonic()
    r = check(prune(ctx, "--older-than=1d", "--wait=2s"), 1)
    assert time.monotonic() - started < 30
    assert remaining(pg, ctx.table) == set(ids), "nothing may be deleted"
    confirmed = pg.confirmed_flush(ctx.slot)
    m = re.search(r'the relay has confirmed slot "([^"]+)" only up to (\S+), prune needs (\S+) ', r.stderr)
    assert m and m.group(1) == ctx.slot, r.stderr
    assert lsn_int(m.group(2)) == confirmed and lsn_int(m.group(3)) > confirmed, r.stderr
    assert "deleted nothing" in r.stderr and "is it running?" in r.stderr and "outboxd status" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""

    # The dry run waits for the same fence.
    check(prune(ctx, "--older-than=1d", "--wait=0s", "--dry-run"), 1)
    assert remaining(pg, ctx.table) == set(ids)

    relay.start()
    js.wait_count(ctx.stream, 12, 60)
    r = check(prune(ctx, "--older-than=1d", "--wait=30s"))
    assert SUMMARY_RE.search(r.stdout).group(1) == "12", r.stdout
    assert remaining(pg, ctx.table) == set()
    assert js.msg_ids(ctx.stream) == ids


@pytest.mark.timeout(120)
def test_prune_deletes_in_batches(ctx, pg, js):
    ctx.setup()
    ctx.start_relay("--status-interval=500ms")
    add_rows(pg, ctx.table, 35)
    keep = add_rows(pg, ctx.table, 4, age=None)
    js.wait_count(ctx.stream, 39, 60)

    r = check(prune(ctx, "--older-than=1d", "--batch=10"))
    m = SUMMARY_RE.search(r.stdout)
    assert m and (m.group(1), m.group(3), m.group(4)) == ("35", "4", "10"), r.stdout
    assert remaining(pg, ctx.table) == set(keep)


@pytest.mark.timeout(120)
def test_prune_dry_run_counts_and_deletes_nothing(ctx, pg, js):
    ctx.setup()
    ctx.start_relay("--status-interval=500ms")
    ids = add_rows(pg, ctx.table, 7) + add_rows(pg, ctx.table, 2, age=None)
    js.wait_count(ctx.stream, 9, 60)

    r = check(prune(ctx, "--older-than=1d", "--dry-run"))
    assert re.search(rf"would delete 7 rows from {re.escape(ctx.table)} .*dry run, deleted nothing", r.stdout), r.stdout
    assert remaining(pg, ctx.table) == set(ids)


@pytest.mark.timeout(120)
def test_prune_passes_an_idle_database_right_after_a_wal_switch(ctx, pg, js):
    """After pg_switch_wal() the insert position reads past the new segment's page header, where no
    record ends; the relay confirms only the segment boundary. prune must take that as its fence."""
    ctx.setup()
    ctx.start_relay("--status-interval=500ms")
    add_rows(pg, ctx.table, 3)
    js.wait_count(ctx.stream, 3, 60)
    pg.sql("SELECT pg_switch_wal()")
    insert = lsn_int(pg.scalar("SELECT pg_current_wal_insert_lsn()::text"))
    boundary = insert - insert % (16 << 20)
    wait_until(lambda: pg.confirmed_flush(ctx.slot) >= boundary, 30, "the relay to confirm the segment boundary")
    # Fencing at the reported insert position instead waited here until the background writer
    # logged its next running-xacts record (14-15 s when measured), so 5 s tells the two apart.
    r = check(prune(ctx, "--older-than=1d", "--wait=5s"))
    assert SUMMARY_RE.search(r.stdout).group(1) == "3", r.stdout


@pytest.mark.timeout(120)
def test_prune_refusals(ctx, pg, js):
    ctx.setup()
    ctx.start_relay("--status-interval=500ms")

    r = check(prune(ctx, "--older-than=1d", slot="no_such_slot"), 3)
    assert 'replication slot "no_such_slot" does not exist' in r.stderr and "deletes nothing" in r.stderr

    r = check(prune(ctx), 2)
    assert "prune needs --older-than" in r.stderr
    for bad in ("--older-than=soon", "--batch=0", "--wait=x"):
        args = [bad] if bad.startswith("--older-than") else ["--older-than=1d", bad]
        assert prune(ctx, *args).returncode == 2, bad

    # A table without the time column, a partitioned one, one the publication does not cover.
    notime = f"{ctx.table}_notime"
    pg.sql(f"CREATE TABLE {notime} (event_id uuid PRIMARY KEY, payload jsonb NOT NULL)")
    pg.sql(f"ALTER PUBLICATION {ctx.publication} ADD TABLE {notime}")
    r = check(prune(ctx, "--older-than=1d", table=notime), 3)
    assert 'has no column "occurred_at": prune needs a time column' in r.stderr, r.stderr

    parted = f"{ctx.table}_parted"
    pg.sql(f"CREATE TABLE {parted} (LIKE {ctx.table}) PARTITION BY RANGE (occurred_at)")
    r = check(prune(ctx, "--older-than=1d", table=parted), 3)
    assert "is partitioned" in r.stderr and "drop old partitions" in r.stderr, r.stderr

    unpublished = f"{ctx.table}_unpublished"
    pg.sql(f"CREATE TABLE {unpublished} (LIKE {ctx.table} INCLUDING ALL)")
    add_rows(pg, unpublished, 2)
    r = check(prune(ctx, "--older-than=1d", table=unpublished), 3)
    assert "does not publish inserts into" in r.stderr, r.stderr
    assert pg.scalar(f"SELECT count(*) FROM {unpublished}") == 2


@pytest.mark.timeout(120)
def test_prune_every_table_by_its_mapped_time_column(ctx, pg, js):
    ctx.add_stream()
    a, b = f"public.pa_{ctx.tag}", f"public.pb_{ctx.tag}"
    for t in (a, b):
        pg.sql(f"CREATE TABLE {t} (id text PRIMARY KEY, aggregatetype text, aggregateid text, type text, "
               "payload jsonb, created_at timestamptz NOT NULL)")
    conf = ctx.dir / "tables.conf"
    conf.write_text(f"columns = debezium\n[table {a}]\n[table {b}]\n")
    ctx.start_relay(f"--config={conf}", "--status-interval=500ms", table=None)
    for t in (a, b):
        pg.sql(f"INSERT INTO {t} VALUES ('{t}-old', 'o', '1', 'x', '{{}}', now() - interval '3 days'), "
               f"('{t}-new', 'o', '1', 'x', '{{}}', now())")
    js.wait_count(ctx.stream, 4, 60)

    base = [str(relay_bin()), "prune", "--older-than=1d", f"--pg-url={ctx.pg.dsn}", f"--slot={ctx.slot}",
            f"--publication={ctx.publication}", f"--config={conf}"]
    run = lambda *extra: subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60,  # noqa: E731
                                        env=clean_env(), stdin=subprocess.DEVNULL)
    # Without a time column for the layout, prune says which setting names one.
    r = run()
    assert r.returncode == 2 and "--column-occurred-at" in r.stderr, r.stderr
    r = check(run("--column-occurred-at=created_at"))
    assert [m.group(2) for m in SUMMARY_RE.finditer(r.stdout)] == [a, b], r.stdout
    assert {row[0] for row in pg.sql(f"SELECT id FROM {a} UNION ALL SELECT id FROM {b}")} == {f"{a}-new", f"{b}-new"}
