"""First start: rows already in the outbox when outboxd creates its slot are published once
(from the slot's own starting snapshot), and never again."""

import re
import signal
import threading
import time

import pytest

from harness import random_sizes, wait_until


@pytest.mark.timeout(120)
def test_rows_before_the_slot_are_published_once_then_never_again(ctx, pg, js):
    ctx.setup()
    w = ctx.writer(seed=91)
    w.write(random_sizes(500, 1, 20, w.rng))  # before outboxd (and its slot) exist
    relay = ctx.start_relay()
    assert "backfill: published the 500 rows" in relay.logs()
    w.write(random_sizes(100, 1, 20, w.rng))  # after: these come from the WAL
    js.wait_count(ctx.stream, 600, 60)
    msgs = js.dump(ctx.stream)
    ids = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    # Rows older than the slot: each exactly once, all before the streamed ones (their commit
    # order is not recoverable: PostgreSQL does not keep a transaction's rows in order on disk).
    assert len(ids) == 600 and set(ids[:500]) == set(w.event_ids[:500])
    assert ids[500:] == w.event_ids[500:], "events after the slot's start are in commit order"
    first = msgs[0]["headers"]["Outbox-Commit-Lsn"]
    assert first != "0/0", "a backfilled event carries the slot's starting LSN"

    relay.send_signal(signal.SIGTERM)
    assert relay.wait(10) == 0
    again = ctx.start_relay(name="again")
    assert "backfill" not in again.logs()
    w.write([3])
    js.wait_count(ctx.stream, 603, 30)
    ids = js.msg_ids(ctx.stream)
    assert len(ids) == 603 and len(set(ids)) == 603 and ids[600:] == w.event_ids[600:]
    m = again.metrics()
    assert m["outboxd_events_published_total"] == 3 and m["outboxd_events_duplicate_total"] == 0


@pytest.mark.timeout(60)
def test_without_backfill_existing_rows_are_counted_and_skipped(ctx, pg, js):
    ctx.setup()
    w = ctx.writer(seed=92)
    w.write([7, 5])
    relay = ctx.start_relay("--backfill=false")
    assert "backfill off: the 12 rows already in" in relay.logs()
    later = w.insert_txn(n=2)
    js.wait_count(ctx.stream, 2, 30)
    assert js.msg_ids(ctx.stream) == later


# ---- resumable and owned --------------------------------------------------------------------------

def fill(pg, table, n):
    """n rows inserted with SQL (fast, one transaction); returns their event ids."""
    pg.sql(f"INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, payload) "
           "SELECT gen_random_uuid(), 'order', 'o' || i, 'created', jsonb_build_object('i', i) "
           "FROM generate_series(1, %s) AS i", n)
    return {r[0] for r in pg.sql(f"SELECT event_id::text FROM {table}")}


class HealthProbe:
    """A startup + liveness probe with small parameters, polling /healthz like Kubernetes would:
    the first 200 must come within `start` seconds of the relay's start, then every answer must be
    200 (failure threshold 1, period `period`). Records the phases /healthz reported."""

    def __init__(self, relay, start=3.0, period=0.1):
        self.relay, self.start, self.period = relay, start, period
        self.failures, self.bodies, self.checks = [], set(), 0
        self.t0 = time.monotonic()
        self.live = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set() and self.relay.running:
            status, body = self.relay.http_get("/healthz", timeout=1)
            self.checks += 1
            if status == 200:
                self.live = True
                self.bodies.add(body.strip().split(",")[0])
            elif self.live:
                self.failures.append(f"{time.monotonic() - self.t0:.1f}s: {status} {body.strip()}")
            elif time.monotonic() - self.t0 > self.start:
                self.failures.append(f"no 200 within the startup window of {self.start}s "
                                     f"({status} {body.strip()})")
                return
            self._stop.wait(self.period)

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def stored_rows(relay):
    try:
        return relay.metrics().get("outboxd_backfill_rows", 0)
    except AssertionError:
        return 0


def backfill_ids(msgs, position):
    return [m["headers"]["Nats-Msg-Id"] for m in msgs
            if m["headers"].get("Outbox-Commit-Lsn") == position]


@pytest.mark.timeout(150)
def test_backfill_stays_live_and_resumes_exactly_once_after_kill_9(ctx, pg, js):
    ctx.setup()
    n = 40000
    t0 = time.monotonic()
    ids = fill(pg, ctx.table, n)
    print(f"\n{n} rows written before the slot in {time.monotonic() - t0:.1f}s")
    # A window of 8 makes the backfill take seconds, longer than the probe's startup window: the
    # relay takes in acknowledgements once a millisecond, so a third of the rows needs at least
    # 13,333 / 8 ms = 1.7 s however fast the machine.
    relay = ctx.relay("--max-inflight=8")
    relay.start()
    probe = HealthProbe(relay, start=1.0)
    # Kill it once a good part is stored (and the checkpoint written), well before the end.
    wait_until(lambda: stored_rows(relay) >= n // 3, 60, "a third of the backfill to be stored",
               interval=0.1)
    t_kill = time.monotonic() - probe.t0
    probe.stop()
    relay.kill()
    before = js.count(ctx.stream)
    print(f"first run: killed -9 after {t_kill:.1f}s, stream holds {before} events, "
          f"{probe.checks} health checks, phases {sorted(probe.bodies)}")
    assert not probe.failures, probe.failures
    assert t_kill > probe.start, "the backfill outlasted the probe's startup window"
    assert "ok: backfill" in probe.bodies
    assert 0 < before < n

    t1 = time.monotonic()
    relay.start()
    probe = HealthProbe(relay, start=3.0)
    relay.wait_streaming(timeout=90)
    probe.stop()
    log = relay.logs()
    m = re.search(r"resuming the interrupted backfill of \S+ after key \"([^\"]+)\" of \S+ "
                  r"\((\d+) rows stored; (\d+) events found in the stream after it\)", log)
    assert m, log[-3000:]
    m2 = re.search(r"(\d+) in all, resumed after (\d+) stored earlier; this run read (\d+) rows, "
                   r"(\d+) of them found in the stream already", log)
    assert m2, log[-3000:]
    total, earlier, read, found = map(int, m2.groups())
    print(f"second run: resumed after key {m.group(1)} ({earlier} rows checkpointed, "
          f"{m.group(3)} more events found in the stream), read {read} of {n} rows, "
          f"{found} of them already stored; done in {time.monotonic() - t1:.1f}s")
    assert not probe.failures, probe.failures
    assert total == n and read < n and earlier >= n // 4
    assert read == n - earlier, "the second run read only the rows after the checkpoint"

    msgs = js.dump(ctx.stream)
    got = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    dups = len(got) - len(set(got))
    print(f"stream: {len(got)} events, {len(set(got))} distinct, duplicates {dups}")
    assert dups == 0 and set(got) == ids
    assert relay.metrics()["outboxd_events_duplicate_total"] == 0, \
        "nothing was published twice, not even into the duplicate window"
    # Every backfilled row carries the slot's position minus one and its ordinal: the resumed
    # run numbered on where the first stopped.
    positions = [m["headers"]["Outbox-Position"].split(" ") for m in msgs]
    assert len({p[1] for p in positions}) == 1, "the backfill's rows share one commit LSN"
    assert [int(p[2]) for p in positions] == list(range(n)), \
        "a resumed backfill numbers its rows on from where it stopped"

    w = ctx.writer(seed=93)
    w.write([5])
    js.wait_count(ctx.stream, n + 5, 30)
    assert js.msg_ids(ctx.stream)[n:] == w.event_ids


@pytest.mark.timeout(150)
def test_two_replicas_one_backfills_the_other_takes_it_over_exactly_once(ctx, pg, js):
    ctx.setup()
    n = 40000
    ids = fill(pg, ctx.table, n)
    a = ctx.relay("--max-inflight=64", name="a")
    b = ctx.relay("--max-inflight=64", name="b")
    t0 = time.monotonic()
    a.start()
    b.start()
    # One owns the backfill, the other stands by (and says so on /healthz).
    wait_until(lambda: "standby: another relay owns the backfill" in a.logs() + b.logs(), 30,
               "one relay to stand by for the backfill")
    owner, other = (a, b) if "standby: another relay owns" in b.logs() else (b, a)
    assert other.http_get("/healthz")[1].startswith("ok: standby")
    # Rows committed while the backfill runs come through the WAL, after every backfilled one.
    w = ctx.writer(seed=94)
    w.write([3, 2])
    wait_until(lambda: stored_rows(owner) >= n // 4, 60, "a quarter of the backfill", interval=0.1)
    assert "streaming from slot" not in a.logs() + b.logs(), "nobody streams before the backfill"
    owner.kill()
    t_kill = time.monotonic() - t0
    w.write([4])
    other.wait_streaming(timeout=90)
    log = other.logs()
    assert "this relay owns it now" in log and "resuming the interrupted backfill" in log, log[-3000:]
    m = re.search(r"(\d+) in all, resumed after (\d+) stored earlier; this run read (\d+) rows", log)
    assert m, log[-3000:]
    total, earlier, read = map(int, m.groups())
    js.wait_count(ctx.stream, n + 9, 30)
    msgs = js.dump(ctx.stream)
    got = [x["headers"]["Nats-Msg-Id"] for x in msgs]
    position = msgs[0]["headers"]["Outbox-Commit-Lsn"]
    back = backfill_ids(msgs, position)
    print(f"\nowner killed -9 after {t_kill:.1f}s; the standby resumed after {earlier} rows, read "
          f"{read}; done {time.monotonic() - t0:.1f}s after the start; stream: {len(got)} events, "
          f"duplicates {len(got) - len(set(got))}")
    assert len(got) == len(set(got)) == n + 9 and total == n
    assert set(back) == ids and got[:n] == back, "every backfilled row before any streamed one"
    assert got[n:] == w.event_ids, "rows committed during the backfill follow it, in commit order"


def order_breaks(msgs, groups):
    """How often the stream goes back in the order of groups (a list of id lists: transactions
    in commit order, or one writer's transactions): the count of events whose group comes
    before the previous event's, among the events of those groups."""
    where = {e: k for k, g in enumerate(groups) for e in g}
    breaks, last = 0, -1
    for m in msgs:
        k = where.get(m["headers"]["Nats-Msg-Id"])
        if k is None:
            continue
        if k < last:
            breaks += 1
        last = max(last, k)
    return breaks


@pytest.mark.timeout(180)
@pytest.mark.parametrize("commit_times", ["on", "off"])
def test_rows_of_concurrent_writers_are_backfilled_in_commit_order(servers, js, commit_times):
    ctx = servers(f"order-{commit_times}", extra_conf={"track_commit_timestamp": commit_times})
    ctx.setup()
    probe = ctx.create_probe()
    writers = [ctx.writer(seed=300 + k) for k in range(8)]
    for w in writers:  # random (v4) event ids: their order says nothing
        w.start_background(random_sizes(300, 1, 4, w.rng))
    for w in writers:
        w.wait(120)
    txs = [t["event_ids"] for t in ctx.pg.probe_transactions(probe, ctx.table)]
    total = sum(len(t) for t in txs)
    relay = ctx.relay().start()
    js.wait_count(ctx.stream, total, 90)
    relay.wait_streaming()
    msgs = js.dump(ctx.stream)
    got = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    assert len(got) == len(set(got)) == total
    across = order_breaks(msgs, txs)
    per_writer = sum(order_breaks(msgs, w.transactions) for w in writers)
    print(f"\nbackfill, track_commit_timestamp {commit_times}: {len(txs)} transactions of 8 "
          f"concurrent writers, {total} rows; events out of commit order: {across}, out of their "
          f"writer's order: {per_writer}")
    assert per_writer == 0, "each writer's transactions go out in its commit order"
    if commit_times == "on":
        # A commit time is taken just before the commit record is written: transactions that
        # commit at the same moment, neither seeing the other, may swap against the WAL; every
        # transaction that saw or waited for another's commit comes after it.
        assert across <= total // 50, f"{across} events out of commit order with commit times"
    assert "the rows went out in commit order" in relay.logs() if commit_times == "on" else \
        "turn track_commit_timestamp on" in relay.logs()
