"""outboxd through a PostgreSQL failover: the primary killed (SIGKILL) while events are written, a
standby promoted, the relay following it through a multi-host --pg-url
(target_session_attrs=read-write: libpq skips the standby until it is promoted).

- PostgreSQL 17+ with failover slots (outboxd's default there): the standby synchronises the slot;
  with synchronized_standby_slots on the primary the relay never receives what the standby lacks,
  so the stream holds exactly what the new primary committed, once and in commit order.
- 17+ with an asynchronous standby and a relay that comes back late: its checkpoint is past the
  point where the new timeline forked; nothing the new primary committed may be skipped for it.
- Any version, a standby without the slot: the relay stops with the runbook instead of silently
  making a new slot, and the runbook's commands close the gap.

Each test has its own primary, standby and nats-server; figures (recovery times, counts) are
printed (run with -s to see them). Tests needing 17+ are deselected on older servers (conftest.py,
PG_MIN).
"""

import collections
import json
import re
import shlex
import subprocess
import time
import os

import psycopg2
import pytest

from harness import (OutboxWriter, PgServer, PgStandby, clean_env, create_physical_slot, lsn_int, lsn_text,
                     multi_host_dsn, random_sizes, relay_bin, wait_until)
from test_relay import assert_exactly_once_in_order, assert_positions_increase

PHYSICAL_SLOT = "standby1"
# Confirm often so the synchronised slot follows closely; come back quickly once the standby is
# promoted; store the checkpoint often so it is recent when the primary dies.
RELAY_FLAGS = ("--status-interval=500ms", "--retry-max=1s", "--checkpoint-interval=200ms")


def report(what, value, unit="s"):
    if unit == "s":
        print(f"\nfailover: {what}: {value:.2f} s")
    else:
        print(f"\nfailover: {what}: {value}{unit}")


@pytest.fixture
def failover(root, request, nats, js):
    """make(synchronized_standby_slots) -> (ctx, primary, standby): a primary with a physical slot
    for a hot standby made from its data folder, both running, the standby streaming, and a Ctx on
    the primary. Everything is stopped by PID afterwards."""
    from conftest import Ctx, stop_worlds
    servers, ctxs = [], []

    def make(synchronized_standby_slots=False):
        # autovacuum off: an ANALYZE takes an xid, which can put the standby's catalog xmin
        # ahead of the slot's again just as sync_the_slot turns slot synchronisation on.
        primary = PgServer(root.mkdir("primary"), hba_first=[PgStandby.PRIMARY_HBA],
                           extra_conf={"autovacuum": "off"})
        servers.append(primary)
        primary.init().start()
        create_physical_slot(primary, PHYSICAL_SLOT)
        primary.stop()
        # Slot synchronisation is turned on later (sync_the_slot), once there is a slot to copy.
        standby = PgStandby(root.mkdir("standby"), primary, physical_slot=PHYSICAL_SLOT)
        servers.append(standby)
        standby.init()
        primary.start()
        standby.start()
        if synchronized_standby_slots:
            primary.sql(f"ALTER SYSTEM SET synchronized_standby_slots = '{PHYSICAL_SLOT}'")
            primary.sql("SELECT pg_reload_conf()")
            wait_until(lambda: primary.scalar("SHOW synchronized_standby_slots") == PHYSICAL_SLOT, 10,
                       "synchronized_standby_slots to take effect")
        standby.wait_streaming()
        ctx = Ctx(root, request, primary, nats, js)
        ctxs.append(ctx)
        return ctx, primary, standby

    yield make
    stop_worlds(ctxs, servers)


def relay_for(ctx, primary, standby, *extra):
    return ctx.relay(*RELAY_FLAGS, *extra, pg_url=multi_host_dsn(primary, standby))


def writer_on(ctx, server, seed):
    w = OutboxWriter(server, ctx.table, seed=seed)
    ctx.writers.append(w)
    return w


def stop_writer_by_failure(w, timeout=60):
    """Waits for a background writer that lost its server; returns what it raised."""
    try:
        w.wait(timeout)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as e:
        return e
    return None


def table_ids(server, table):
    return {r[0] for r in server.sql(f"SELECT event_id::text FROM {table}")}


def committed_on_the_new_primary(w, new_ids):
    """The old primary's writer's events the new primary has, in commit order: a prefix of what
    was acknowledged, plus the transaction whose COMMIT was cut off if it made it. Returns
    (events, acknowledged but lost, in-doubt transaction made it)."""
    kept = [e for e in w.event_ids if e in new_ids]
    assert kept == w.event_ids[:len(kept)], "the standby holds a non-prefix of the old primary's commits"
    lost = len(w.event_ids) - len(kept)
    in_doubt = list(w.in_doubt or [])
    made_it = bool(in_doubt) and in_doubt[0] in new_ids
    if made_it:
        assert lost == 0 and all(e in new_ids for e in in_doubt), "half a transaction survived"
        kept += in_doubt
    return kept, lost, made_it


def sync_the_slot(ctx, primary, standby):
    """Gives the standby a persistent synchronised copy of the relay's slot, quickly. PostgreSQL
    copies a slot only once its catalog xmin is not older than the standby's; on its own the slot
    gets there with the running-transactions records the server logs every 15 s, and the sync
    worker's backoff (0.2 s doubling to 30 s) made that take 25 s. So, with the outbox quiet: log
    such records (pg_log_standby_snapshot) until the relay confirmed past one that moved the
    slot's catalog xmin up to the primary's oldest running xid, then turn the worker on: its
    first attempt succeeds. Returns (the copy, seconds)."""
    t0 = time.monotonic()
    state = {}

    def slot_is_safe_to_copy():
        primary.sql("SELECT pg_log_standby_snapshot()")
        target = primary.current_lsn()
        wait_until(lambda: (primary.confirmed_flush(ctx.slot) or 0) >= target, 30,
                   "the relay to confirm past a running-transactions record")
        state["catalog_xmin"], state["oldest"] = primary.sql(
            "SELECT (SELECT catalog_xmin::text::bigint FROM pg_replication_slots WHERE slot_name = %s), "
            "txid_snapshot_xmin(txid_current_snapshot()) %% 4294967296", ctx.slot)[0]
        return state["catalog_xmin"] >= state["oldest"]

    wait_until(slot_is_safe_to_copy, 60, "the slot's catalog xmin to reach the oldest running xid",
               interval=0.2, detail=lambda: state)
    standby.wait_caught_up()
    standby.start_slot_sync()
    synced = standby.wait_synced_slot(ctx.slot, at_least=primary.confirmed_flush(ctx.slot), timeout=90)
    return synced, time.monotonic() - t0


def fork_lsn(standby, timeline):
    """Where timeline `timeline` forked from its parent: pg_wal/<timeline>.history's last line."""
    text = (standby.datadir / "pg_wal" / f"{timeline:08X}.history").read_text()
    last = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")][-1]
    return lsn_int(last[1])


def checkpoint(js, slot, bucket="outboxd"):
    """The relay's newest stored checkpoint for slot (a dict), or None."""
    try:
        msgs = js.dump(f"KV_{bucket}")
    except AssertionError:
        return None
    found = [m for m in msgs if m["subject"].endswith("." + slot) and m["data"]]
    return json.loads(found[-1]["data"]) if found else None


def streaming_sessions(relay):
    return len(re.findall(r"streaming from slot", relay.logs()))


def first_arrival(js, stream, event_id, timeout, what):
    """Waits until event_id is in the stream; returns the seconds it took."""
    t0 = time.monotonic()
    wait_until(lambda: event_id in js.msg_ids(stream), timeout, what, interval=0.25)
    return time.monotonic() - t0


@pytest.mark.timeout(300)
def test_primary_killed_under_load_the_relay_follows_the_promoted_standby_exactly_once(failover, js):
    ctx, primary, standby = failover(synchronized_standby_slots=True)
    ctx.setup()
    relay = relay_for(ctx, primary, standby).start()
    relay.wait_streaming(timeout=30)
    failover_flag = primary.scalar("SELECT failover FROM pg_replication_slots WHERE slot_name = %s", ctx.slot)
    assert failover_flag is True, f"outboxd made slot {ctx.slot} with failover = {failover_flag}"

    # Events flowing, and the standby holding a usable copy of the slot.
    w = writer_on(ctx, primary, seed=51)
    first = w.write(random_sizes(500, 1, 20, w.rng))
    js.wait_count(ctx.stream, len(first), 60)
    synced, took = sync_the_slot(ctx, primary, standby)
    report("slot synchronised to the standby (persistent)", took)

    # Kill the primary in the middle of a burst.
    w.start_background(random_sizes(200_000, 1, 20, w.rng), pause=0.002)
    js.wait_count(ctx.stream, len(first) + 3_000, 120, "the burst under way")
    old_lsn = primary.current_lsn()
    primary.kill()
    t_kill = time.monotonic()
    err = stop_writer_by_failure(w)
    assert err is not None, "the writer did not notice the primary's death"
    standby.promote()
    t_promoted = time.monotonic()
    report("primary killed to standby promoted", t_promoted - t_kill)
    timeline = standby.timeline()
    fork = fork_lsn(standby, timeline)
    slot_after = standby.synced_slot(ctx.slot)
    assert slot_after is not None, "the promoted standby has no slot"

    # Writes go on on the new primary while the relay finds it.
    w2 = writer_on(ctx, standby, seed=52)
    w2.start_background(random_sizes(3_000, 1, 20, w2.rng), pause=0.002)
    wait_until(lambda: w2.event_ids, 30, "a first commit on the new primary")
    wait_until(lambda: streaming_sessions(relay) >= 2, 60, "the relay streaming from the promoted standby",
               detail=lambda: relay.logs()[-2000:])
    report("promotion to the relay streaming from the new primary", time.monotonic() - t_promoted)
    took = first_arrival(js, ctx.stream, w2.event_ids[0], 60, "the first new-primary event in the stream")
    report("promotion to the first new-primary event stored", time.monotonic() - t_promoted)
    w2.wait(120)

    new_ids = table_ids(standby, ctx.table)
    old_kept, lost, made_it = committed_on_the_new_primary(w, new_ids)
    expected = old_kept + w2.event_ids
    js.wait_count(ctx.stream, len(expected), 120, "every event on the new primary")
    msgs = js.dump(ctx.stream)
    got = [m["headers"].get("Nats-Msg-Id") for m in msgs]
    published_lacking = [e for e in got if e not in new_ids]
    m = relay.metrics()
    report("events acknowledged by the old primary / on the new one / lost with it",
           f"{len(w.event_ids)} / {len(old_kept)} / {lost}", unit="")
    report("commit cut off by the kill survived on the new primary", made_it, unit="")
    report("events written on the new primary", len(w2.event_ids), unit="")
    report(f"timeline {timeline} forked at {lsn_text(fork)}; old primary's WAL end just before the kill",
           lsn_text(old_lsn), unit="")
    report("synced slot before / after promotion (confirmed)",
           f"{lsn_text(synced['confirmed_flush_lsn'])} / {lsn_text(slot_after['confirmed_flush_lsn'])}", unit="")
    report("stream messages / duplicates counted by the relay / published events the new primary lacks",
           f"{len(got)} / {m['outboxd_events_duplicate_total']:.0f} / {len(published_lacking)}", unit="")
    assert not published_lacking, (
        f"with synchronized_standby_slots the relay published {len(published_lacking)} events the "
        f"standby never got (e.g. {published_lacking[:3]})")
    assert_exactly_once_in_order(msgs, expected)
    assert relay.running and relay.runs == 1, "the relay did not ride through the failover"
    assert took < 60


@pytest.mark.timeout(240)
def test_with_the_standby_down_the_relay_publishes_nothing_the_promoted_standby_lacks(failover, js):
    ctx, primary, standby = failover(synchronized_standby_slots=True)
    ctx.setup()
    relay = relay_for(ctx, primary, standby).start()
    relay.wait_streaming(timeout=30)
    w = writer_on(ctx, primary, seed=81)
    first = w.write(random_sizes(500, 1, 20, w.rng))
    js.wait_count(ctx.stream, len(first), 60)
    synced, took = sync_the_slot(ctx, primary, standby)
    report("slot synchronised to the standby", took)

    # The standby goes down; the primary goes on committing (its standby is asynchronous), and
    # synchronized_standby_slots holds the relay back. Then the primary is killed mid-burst.
    standby.stop("fast")
    held_at = js.count(ctx.stream)
    w.start_background(random_sizes(200_000, 1, 20, w.rng), pause=0.002)
    wait_until(lambda: len(w.event_ids) >= len(first) + 2_000, 60, "2000 events committed with the standby down")
    published_meanwhile = js.count(ctx.stream) - held_at
    primary.kill()
    stop_writer_by_failure(w)
    standby.start()
    standby.promote()
    t_promoted = time.monotonic()

    w2 = writer_on(ctx, standby, seed=82)
    w2.write(random_sizes(1_000, 1, 20, w2.rng))
    first_arrival(js, ctx.stream, w2.event_ids[-1], 60, "the new primary's events")
    report("promotion to the new primary's events stored", time.monotonic() - t_promoted)
    new_ids = table_ids(standby, ctx.table)
    old_kept, lost, made_it = committed_on_the_new_primary(w, new_ids)
    msgs = js.dump(ctx.stream)
    got = [m["headers"].get("Nats-Msg-Id") for m in msgs]
    lacking = [e for e in got if e not in new_ids]
    report("events committed on the old primary with the standby down, lost with it", lost, unit="")
    report("events published while the standby was down", published_meanwhile, unit="")
    report("stream messages / published events the new primary lacks", f"{len(got)} / {len(lacking)}", unit="")
    assert lost >= 2_000, "the standby had the events: the case is not exercised"
    assert not lacking, (f"the relay published {len(lacking)} events the standby never flushed "
                         f"(e.g. {lacking[:3]})")
    assert_exactly_once_in_order(msgs, old_kept + w2.event_ids)
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(300)
def test_a_relay_back_after_an_async_failover_skips_nothing_the_new_primary_committed(failover, js):
    ctx, primary, standby = failover(synchronized_standby_slots=False)
    ctx.setup()
    relay = relay_for(ctx, primary, standby).start()
    relay.wait_streaming(timeout=30)
    w = writer_on(ctx, primary, seed=61)

    # A: on both servers, relayed, and the slot synchronised up to it.
    a = w.write(random_sizes(2_000, 1, 20, w.rng))
    js.wait_count(ctx.stream, len(a), 60)
    standby.wait_caught_up()
    wait_until(lambda: relay.metrics()["outboxd_in_flight_events"] == 0, 30, "A confirmed")
    synced, took = sync_the_slot(ctx, primary, standby)
    report("slot synchronised to the standby", took)

    # B: the standby is down (an asynchronous standby that fell behind); the relay publishes B.
    standby.stop("fast")
    b = w.write(random_sizes(1_500, 1, 20, w.rng))
    js.wait_count(ctx.stream, len(a) + len(b), 60)
    wait_until(lambda: relay.metrics()["outboxd_in_flight_events"] == 0, 30, "B confirmed")
    assert relay.stop() == 0
    old_lsn = primary.current_lsn()
    primary.kill()
    cp = checkpoint(js, ctx.slot)
    assert cp and cp.get("timeline") == 1, f"checkpoint after the relay stopped: {cp}"

    # The standby comes back, without B, and is promoted: a new timeline forks before B.
    standby.start()
    standby.promote()
    timeline = standby.timeline()
    fork = fork_lsn(standby, timeline)
    cp_lsn = lsn_int(cp["lsn"])
    report(f"timeline {timeline} forked at / relay's checkpoint on timeline 1 / old primary's WAL end",
           f"{lsn_text(fork)} / {lsn_text(cp_lsn)} / {lsn_text(old_lsn)}", unit="")
    assert cp_lsn > fork, "the checkpoint is not past the fork: the case is not exercised"

    # C: the new primary writes until its WAL is past the relay's checkpoint.
    w2 = writer_on(ctx, standby, seed=62)
    c = []
    while standby.current_lsn() <= cp_lsn + 64 * 1024 or len(c) < 1_000:
        c += w2.write(random_sizes(200, 1, 20, w2.rng))
    report("events written on the new primary (C) / its WAL end", f"{len(c)} / {lsn_text(standby.current_lsn())}",
           unit="")

    t_start = time.monotonic()
    relay.start()
    relay.wait_streaming(timeout=60)
    report("relay start to streaming from the new primary", time.monotonic() - t_start)
    # D: writes while it runs.
    d = w2.write(random_sizes(500, 1, 20, w2.rng))
    try:
        first_arrival(js, ctx.stream, d[-1], 90, "the last event written on the new primary")
    finally:
        report("relay start to every event of the new primary stored", time.monotonic() - t_start)

    new_ids = table_ids(standby, ctx.table)
    msgs = js.dump(ctx.stream)
    got = [m["headers"].get("Nats-Msg-Id") for m in msgs]
    counts = collections.Counter(got)
    missing = [e for e in c + d if e not in counts]
    lacking = [e for e in got if e not in new_ids]
    report("published from the old primary, lacking on the new one (B)", f"{len(lacking)} of {len(b)}", unit="")
    report("new-primary events missing from the stream", len(missing), unit="")
    report("stream messages / duplicated ids", f"{len(got)} / {sum(1 for n in counts.values() if n > 1)}", unit="")
    report("synced slot confirmed before the failover", lsn_text(synced["confirmed_flush_lsn"]), unit="")
    assert not missing, (f"{len(missing)} of {len(c) + len(d)} events committed on the new primary are not in "
                         f"the stream (e.g. {missing[:3]}); relay log:\n{relay.logs()[-3000:]}")
    assert set(lacking) == set(b), "the events the new primary lacks should be exactly B"
    assert_exactly_once_in_order(msgs, a + b + c + d)


def outboxd(ctx, pg, *args, timeout=90):
    """Runs an `outboxd` subcommand with this test's settings against pg; (rc, stdout + stderr)."""
    wrapper = shlex.split(os.environ.get("OUTBOXD_RELAY_WRAPPER", ""))
    cmd = [*wrapper, str(relay_bin()), *args, f"--pg-url={pg.dsn}", f"--nats-url={ctx.nats.url}",
           f"--slot={ctx.slot}", f"--publication={ctx.publication}", f"--table={ctx.table}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(),
                       stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.timeout(240)
def test_failover_to_a_standby_without_the_slot_stops_with_the_runbook_which_closes_the_gap(failover, js):
    ctx, primary, standby = failover(synchronized_standby_slots=False)
    ctx.setup()
    relay = relay_for(ctx, primary, standby).start()
    relay.wait_streaming(timeout=30)
    w = writer_on(ctx, primary, seed=71)
    a = w.write(random_sizes(1_000, 1, 20, w.rng))
    js.wait_count(ctx.stream, len(a), 60)
    standby.wait_caught_up()
    wait_until(lambda: (checkpoint(js, ctx.slot) or {}).get("commit_time"), 30, "a checkpoint with a commit time")

    primary.kill()
    t_kill = time.monotonic()
    standby.promote()
    t_promoted = time.monotonic()
    # G: committed on the new primary while no slot records anything.
    w2 = writer_on(ctx, standby, seed=72)
    g = w2.write(random_sizes(300, 1, 20, w2.rng))

    rc = relay.wait(60)
    log = relay.logs()
    report("primary killed to the relay's exit", time.monotonic() - t_kill)
    report("promotion to the relay's exit", time.monotonic() - t_promoted)
    runbook = [ln for ln in log.splitlines() if "does not exist" in ln or "outboxd recover" in ln]
    print("\nfailover: the relay's words:\n  " + "\n  ".join(runbook))
    assert rc == 1, f"exit code {rc}; log:\n{log[-3000:]}"
    assert "does not exist" in log and "outboxd recover --yes" in log, log[-3000:]
    assert standby.slot(ctx.slot) is None, "the relay made a fresh slot on the new primary by itself"
    # The runbook: the plan first (exit 2, nothing changed), then the recovery.
    rc, out = outboxd(ctx, standby, "recover")
    print("\nfailover: outboxd recover:\n  " + out.strip().replace("\n", "\n  "))
    assert rc == 2 and "run again with --yes" in out and "missing" in out, out
    cp = checkpoint(js, ctx.slot)
    assert f"committed at {cp['commit_time']}" in out or "the stream's last event" in out, out
    # Written on the relay's exit from the new primary: its position was reached on timeline 1.
    assert cp["timeline"] == 1, cp
    rc, out = outboxd(ctx, standby, "recover", "--yes")
    assert rc == 0, f"the runbook's `outboxd recover --yes` failed with exit code {rc}: {out}"
    relay.start()
    relay.wait_streaming(timeout=60)
    d = w2.write(random_sizes(300, 1, 20, w2.rng))
    first_arrival(js, ctx.stream, d[-1], 60, "the events written after the runbook")

    msgs = js.dump(ctx.stream)
    got = [m["headers"].get("Nats-Msg-Id") for m in msgs]
    missing = [e for e in table_ids(standby, ctx.table) if e not in got]
    report("stream messages: before the failover / gap replayed / after", f"{len(a)} / {len(g)} / {len(d)}",
           unit="")
    assert not missing, f"{len(missing)} events of the new primary are not in the stream"
    dups = [e for e, n in collections.Counter(got).items() if n > 1]
    assert not dups, f"{len(dups)} events stored twice (e.g. {dups[:3]})"
    # Before the failover: relayed in commit order. The gap: recovered from the table in commit
    # order (one writer: its transactions one after the other), each row once - the rows of A
    # that the recovery read within its margin were found in the stream. After: relayed.
    assert got[:len(a)] == a, "the events relayed before the failover changed"
    gap, gap_msgs = got[len(a):len(a) + len(g)], msgs[len(a):len(a) + len(g)]
    assert set(gap) == set(g), "the stream does not continue with the recovered gap"
    txn_of = {e: k for k, tx in enumerate(w2.transactions) for e in tx}
    order = [txn_of[e] for e in gap]
    assert order == sorted(order), "the gap was not recovered transaction by transaction in commit order"
    assert not any("Outbox-Replay" in m["headers"] for m in gap_msgs), "recovered events are events, not replays"
    assert got[len(a) + len(g):] == d, "the events after the runbook are not in commit order"
    m = re.search(r"recovery: published (\d+) rows .* (\d+) more were in it already", relay.logs())
    assert m and int(m.group(1)) == len(g), relay.logs()[-3000:]
    report("recovery: rows published / found in the stream", f"{m.group(1)} / {m.group(2)}", unit="")
    assert_positions_increase(msgs)
    assert relay.running
