"""outboxd through outages it has to sit out: what waiting costs (CPU while NATS or PostgreSQL
is down), how retries back off when every connect is followed by the same failure, and a slot
PostgreSQL invalidated (max_slot_wal_keep_size), at start and under a running relay.

CPU is read from /proc/<pid>/stat (utime + stime) over a fixed 20 s outage: the outage window is
a measurement period, not a synchronisation. Figures are printed (run with -s to see them)."""

import json
import os
import re
import subprocess
import time

import pytest

from harness import clean_env, random_sizes, relay_bin, wait_until
from test_relay import assert_exactly_once_in_order

OUTAGE_S = 20.0
CPU_LIMIT = 0.02  # of one core, over the outage


def cpu_seconds(pid):
    """utime + stime of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def measure_idle(relay, seconds=OUTAGE_S):
    """The relay's CPU seconds over a fixed window (it must stay up throughout)."""
    c0, t0 = cpu_seconds(relay.pid), time.monotonic()
    time.sleep(seconds)  # the measurement period itself
    c1, t1 = cpu_seconds(relay.pid), time.monotonic()
    assert relay.running, "the relay exited during the outage"
    return c1 - c0, t1 - t0


def report(what, value):
    print(f"\noutage: {what}: {value}")


def outboxd(*args, timeout=30):
    r = subprocess.run([str(relay_bin()), *args], capture_output=True, text=True, timeout=timeout,
                       env=clean_env())
    return r.returncode, r.stdout, r.stderr


def common_args(ctx):
    return [f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}", f"--slot={ctx.slot}",
            f"--publication={ctx.publication}", f"--table={ctx.table}"]


def wal_status(pg, slot):
    return pg.scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", slot)


class SmallWalKeep:
    """max_slot_wal_keep_size = 1MB for the duration (PostgreSQL 15 takes it on reload), and a
    filler table whose writes push the slot past it."""

    def __init__(self, pg, tag):
        self.pg = pg
        self.filler = f"filler_{tag}"

    def __enter__(self):
        self.pg.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        self.pg.sql("SELECT pg_reload_conf()")
        wait_until(lambda: self.pg.scalar("SHOW max_slot_wal_keep_size") == "1MB", 10,
                   "max_slot_wal_keep_size to be reloaded")
        self.pg.sql(f"CREATE TABLE IF NOT EXISTS {self.filler} (x text)")
        return self

    def lose(self, slot, timeout=60):
        """Writes WAL elsewhere and checkpoints until PostgreSQL invalidates slot."""
        def lost():
            if wal_status(self.pg, slot) == "lost":
                return True
            self.pg.sql(f"INSERT INTO {self.filler} SELECT repeat('x', 1000) FROM generate_series(1, 2000)")
            self.pg.sql("SELECT pg_switch_wal()")
            self.pg.sql("CHECKPOINT")
            return wal_status(self.pg, slot) == "lost"

        wait_until(lost, timeout, f"slot {slot} to be lost", interval=0.1,
                   detail=lambda: f"wal_status {wal_status(self.pg, slot)}")

    def __exit__(self, *exc):
        self.pg.sql("ALTER SYSTEM RESET max_slot_wal_keep_size")
        self.pg.sql("SELECT pg_reload_conf()")
        self.pg.sql(f"DROP TABLE IF EXISTS {self.filler}")


@pytest.mark.timeout(240)
def test_nats_down_20s_with_events_pending_costs_no_cpu_and_loses_nothing(ctx, pg, js, nats):
    ctx.setup()
    relay = ctx.start_relay("--ack-timeout=2s", "--retry-max=1s")
    w = ctx.writer(seed=41)
    n = 6_000
    w.start_background(random_sizes(n, 1, 10, w.rng), pause=0.02)
    js.wait_count(ctx.stream, 300, 60, "events flowing before the outage")
    nats.stop()
    relay.wait_for_log("disconnected from NATS", timeout=20)
    # Backoff over (--retry-max=1s) well before the window ends: the known zero-timeout poll
    # would show here.
    cpu, span = measure_idle(relay)
    assert w.busy, "the writer finished during the outage: make it write longer"
    report("NATS down, relay CPU", f"{cpu:.2f} s in {span:.1f} s ({100 * cpu / span:.2f}% of a core)")
    assert relay.metrics()["outboxd_in_flight_events"] > 0, "nothing was pending during the outage"
    nats.start()
    t0 = time.monotonic()
    before = js.count(ctx.stream)
    js.wait_count(ctx.stream, before + 1, 60, "progress after NATS is back")
    report("NATS back to the next stored event", f"{time.monotonic() - t0:.2f} s")
    assert cpu < CPU_LIMIT * span, f"the relay used {cpu:.2f} s of CPU in a {span:.0f} s NATS outage"
    w.wait(180)
    js.wait_count(ctx.stream, n, 120)
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(240)
def test_postgres_down_20s_costs_no_cpu_and_catches_up(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay("--retry-max=4s")
    w = ctx.writer(seed=42)
    w.write(random_sizes(2_000, 1, 20, w.rng))
    js.wait_count(ctx.stream, 1_000, 60, "events flowing before the outage")
    pg.stop("fast")
    relay.wait_for_log("lost the replication connection", timeout=20)
    start = len(re.findall("reconnecting to PostgreSQL in", relay.logs()))
    cpu, span = measure_idle(relay)
    report("PostgreSQL down, relay CPU", f"{cpu:.2f} s in {span:.1f} s ({100 * cpu / span:.2f}% of a core)")
    attempts = len(re.findall("reconnecting to PostgreSQL in", relay.logs())) - start
    report("PostgreSQL down, reconnect attempts", attempts)
    pg.start()
    t0 = time.monotonic()
    w.reconnect()
    w.write(random_sizes(1_000, 1, 20, w.rng))
    js.wait_count(ctx.stream, len(w.event_ids), 60, "the backlog after PostgreSQL is back")
    report("PostgreSQL back to every event stored", f"{time.monotonic() - t0:.2f} s")
    assert cpu < CPU_LIMIT * span, f"the relay used {cpu:.2f} s of CPU in a {span:.0f} s database outage"
    # Full jitter up to --retry-max=4s: about 2 s apart on average once the backoff is grown.
    assert attempts <= 25, f"{attempts} reconnect attempts in a {span:.0f} s outage"
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(240)
def test_a_lost_slot_stops_the_relay_with_the_runbook_and_status_says_so(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay()
    w = ctx.writer(seed=43)
    w.write(random_sizes(200, 1, 10, w.rng))
    js.wait_count(ctx.stream, len(w.event_ids), 60)
    assert relay.stop() == 0
    with SmallWalKeep(pg, ctx.tag) as keep:
        keep.lose(ctx.slot)

        t0 = time.monotonic()
        rc, log = relay.run_to_exit(timeout=30)
        took = time.monotonic() - t0
        report("lost slot at start to exit", f"{took:.2f} s, exit code {rc}")
        assert rc == 1, f"exit code {rc}; log:\n{log[-3000:]}"
        assert took < 10
        assert f'replication slot \\"{ctx.slot}\\" is lost' in log or f'replication slot "{ctx.slot}" is lost' in log
        assert "outboxd slot drop" in log and "rows were deleted" in log
        assert "reconnecting to PostgreSQL" not in log, "the relay retried a lost slot"

        rc, out, _ = outboxd("status", *common_args(ctx))
        assert rc == 1, f"status exit code {rc}:\n{out}"
        assert "status:     slot lost" in out and "WAL retained" not in out, out
        rc, out, _ = outboxd("status", "--json", *common_args(ctx))
        doc = json.loads(out)
        assert rc == 1 and doc["slot"]["lost"] is True and doc["slot"]["wal_retained_bytes"] == 0
        assert doc["healthy"] is False and doc["status"].startswith("slot lost")
        rc, out, _ = outboxd("doctor", *common_args(ctx))
        assert rc == 1 and f'slot "{ctx.slot}" is lost' in out and "outboxd slot drop" in out, out

        # The runbook: drop the slot, start again; the relay makes a new one and goes on.
        rc, out, err = outboxd("slot", "drop", "--yes", *common_args(ctx))
        assert rc == 0, out + err
    relay.start()
    relay.wait_streaming(timeout=30)
    new = w.insert_txn(n=3)
    js.wait_count(ctx.stream, len(w.event_ids), 60, "events after the slot was recreated")
    assert set(new) <= set(js.msg_ids(ctx.stream))


@pytest.mark.timeout(240)
def test_slot_lost_under_a_running_relay_during_a_nats_outage(ctx, pg, js, nats):
    ctx.setup()
    relay = ctx.start_relay("--status-interval=1s", "--shutdown-timeout=5s", "--retry-max=1s")
    w = ctx.writer(seed=44)
    w.write(random_sizes(200, 1, 10, w.rng))
    js.wait_count(ctx.stream, len(w.event_ids), 60)
    nats.stop()
    relay.wait_for_log("disconnected from NATS", timeout=20)
    w.write(random_sizes(100, 1, 10, w.rng))  # pending: the slot cannot move past them
    wait_until(lambda: relay.metrics()["outboxd_in_flight_events"] > 0, 20, "events in flight")
    with SmallWalKeep(pg, ctx.tag) as keep:
        keep.lose(ctx.slot)
        t0 = time.monotonic()
        seen = {}

        def not_ready_slot_lost():
            status, body = relay.http_get("/readyz", timeout=2)
            seen["readyz"] = (status, body)
            return status == 503 and "slot lost" in body

        wait_until(not_ready_slot_lost, 20, "/readyz to say slot lost",
                   detail=lambda: f"last answer {seen.get('readyz')}")
        assert relay.metrics()["outboxd_slot_lost"] == 1
        rc = relay.wait(30)
        report("slot lost under a running relay to exit", f"{time.monotonic() - t0:.2f} s, exit code {rc}")
        log = relay.logs()
        assert rc == 1, log[-3000:]
        assert "outboxd slot drop" in log
        attempts = len(re.findall("reconnecting to PostgreSQL in", log))
        assert attempts <= 2, f"{attempts} reconnects to a lost slot"


@pytest.mark.timeout(240)
def test_a_failure_after_every_connect_backs_off(ctx, pg, js):
    """A publication dropped and made again: every session connects, passes the checks, starts
    streaming, and fails on the first change (the slot decodes it with the catalog of its
    time, which has no such publication). The retries must slow down, not spin."""
    ctx.setup()
    relay = ctx.start_relay("--retry-max=4s")
    w = ctx.writer(seed=45)
    w.write(random_sizes(50, 1, 10, w.rng))
    js.wait_count(ctx.stream, len(w.event_ids), 60)
    pg.sql(f'DROP PUBLICATION "{ctx.publication}"')
    w.write(random_sizes(10, 1, 3, w.rng))
    relay.wait_for_log("reconnecting to PostgreSQL in", timeout=30)
    start = len(re.findall("reconnecting to PostgreSQL in", relay.logs()))
    cpu, span = measure_idle(relay)
    delays = [int(x) for x in re.findall(r"reconnecting to PostgreSQL in (\d+) ms", relay.logs())]
    attempts = len(delays) - start
    report("failing START loop", f"{attempts} attempts in {span:.0f} s, CPU {cpu:.2f} s; delays (ms) {delays[:16]}")
    # Full jitter up to 4 s: about 2 s apart once grown (without the fix: ~15 a second).
    assert attempts <= 20, f"{attempts} reconnects in {span:.0f} s: the backoff restarts after each connect"
    assert max(delays) >= 1000, f"the backoff never grew: {delays}"
    assert cpu < CPU_LIMIT * span


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["manual", "auto"])
def test_a_lost_slot_is_recovered_in_commit_order_with_nothing_twice(servers, js, mode):
    """Events committed while no relay ran are gone from the WAL with the lost slot; older ones
    are in the stream, past its duplicate window. The recovery (`outboxd recover --yes`, or
    --slot-recovery=auto) publishes exactly the first, in commit order."""
    ctx = servers(f"recover-{mode}", extra_conf={"track_commit_timestamp": "on"})
    ctx.setup(dupe_window=1)
    relay = ctx.start_relay()
    w = ctx.writer(seed=45)
    w.write(random_sizes(100, 1, 5, w.rng))
    js.wait_count(ctx.stream, 100, 60)
    assert relay.stop() == 0
    t_published = time.monotonic()
    # Committed while no relay runs, by four writers at once, with random ids.
    writers = [ctx.writer(seed=450 + k) for k in range(4)]
    for wk in writers:
        wk.start_background(random_sizes(25, 1, 3, wk.rng))
    for wk in writers:
        wk.wait(60)
    unrelayed = [e for wk in writers for e in wk.event_ids]
    with SmallWalKeep(ctx.pg, ctx.tag) as keep:
        keep.lose(ctx.slot)
        # The older events must lie outside the duplicate window (1 s): nothing but the
        # recovery's own reading of the stream may keep them from being stored twice.
        time.sleep(max(0.0, 1.5 - (time.monotonic() - t_published)))
        t0 = time.monotonic()
        if mode == "manual":
            rc, out, err = outboxd("recover", *common_args(ctx))
            assert rc == 2 and "lost" in out and "run again with --yes" in out, out + err
            assert ctx.pg.slot(ctx.slot) is not None, "the plan changed something"
            rc, out, err = outboxd("recover", "--yes", *common_args(ctx))
            assert rc == 0, out + err
            print("\n" + out.strip())
            relay.start()
        else:
            relay = ctx.relay("--slot-recovery=auto").start()
        js.wait_count(ctx.stream, 100 + len(unrelayed), 60, "the recovered events")
        relay.wait_streaming(timeout=60)
    report(f"lost slot, recovery ({mode}) to the last recovered event", f"{time.monotonic() - t0:.2f} s")
    msgs = js.dump(ctx.stream)
    got = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} events stored twice"
    assert got[:100] == w.event_ids and set(got[100:]) == set(unrelayed)
    commit = dict(ctx.pg.sql(f"SELECT event_id::text, pg_xact_commit_timestamp(xmin) FROM {ctx.table}"))
    times = [commit[e] for e in got[100:]]
    assert times == sorted(times), "the recovered events are not in commit order"
    for wk in writers:  # each writer's transactions in its order (rows inside one: by place)
        txn_of = {e: k for k, tx in enumerate(wk.transactions) for e in tx}
        mine = [txn_of[e] for e in got[100:] if e in txn_of]
        assert mine == sorted(mine), "a writer's transactions are out of its order"
    log = relay.logs()
    m = re.search(r"recovery: published (\d+) rows .* (\d+) more were in it already", log)
    assert m and int(m.group(1)) == len(unrelayed), log[-3000:]
    report(f"recovery ({mode}): rows published / found in the stream", f"{m.group(1)} / {m.group(2)}")
    if mode == "auto":
        assert "recovery (--slot-recovery=auto)" in log
    # The stream goes on, and the audit finds every row once, in order.
    new = w.insert_txn(n=3)
    js.wait_count(ctx.stream, len(got) + 3, 30, "events after the recovery")
    assert js.msg_ids(ctx.stream)[-3:] == new
    rc, out, err = outboxd("audit", *common_args(ctx))
    assert rc == 0, out + err
