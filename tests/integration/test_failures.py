"""outboxd through failures: relay crashes, broker restarts and leader loss, database restarts,
poison events and a second relay on standby. Each test ends with the stream holding every event
exactly once, in commit order. Recovery times are printed (run with -s to see them)."""

import random
import signal
import time

import pytest

from harness import NatsCluster, JetStream, lsn_text, random_sizes, wait_until
from test_relay import assert_exactly_once_in_order


def report(what, seconds):
    print(f"\nrecovery: {what}: {seconds:.2f} s")


def wait_progress(js, stream, after, timeout, what):
    """Waits until the stream holds more than `after` messages; returns the seconds it took."""
    t0 = time.monotonic()
    js.wait_count(stream, after + 1, timeout, what)
    return time.monotonic() - t0


@pytest.mark.timeout(300)
def test_relay_sigkilled_20_times_during_50k_events(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay()
    w = ctx.writer(seed=31)
    n = 50_000
    w.start_background(random_sizes(n, 1, 40, w.rng), pause=0.0005)
    rng = random.Random(32)
    points = sorted(rng.sample(range(1_000, n - 1_000), 20))
    worst = 0.0
    for k, at in enumerate(points):
        js.wait_count(ctx.stream, at, 120, f"kill point {k + 1} ({at} messages)")
        relay.kill()
        before = js.count(ctx.stream)
        t0 = time.monotonic()
        relay.start()
        relay.wait_streaming(timeout=30)
        if before < n:
            wait_progress(js, ctx.stream, before, 60, "progress after a restart")
            worst = max(worst, time.monotonic() - t0)
    report("relay restart to the next stored event (worst of 20)", worst)
    w.wait(180)
    js.wait_count(ctx.stream, n, 120)
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)


@pytest.mark.timeout(300)
def test_nats_killed_and_restarted_twice_relay_keeps_running(ctx, pg, js, nats):
    ctx.setup()
    relay = ctx.start_relay("--ack-timeout=2s", "--retry-max=1s")
    w = ctx.writer(seed=33)
    n = 50_000
    w.start_background(random_sizes(n, 1, 40, w.rng), pause=0.0005)
    for k, at in enumerate((n // 4, n // 2)):
        js.wait_count(ctx.stream, at, 120, f"outage {k + 1} point")
        nats.kill()
        relay.wait_for_log("disconnected from NATS", timeout=20)
        nats.start()
        before = js.count(ctx.stream)
        t0 = time.monotonic()
        if before < n:
            wait_progress(js, ctx.stream, before, 60, "progress after the broker restart")
        report(f"broker restart {k + 1} to the next stored event", time.monotonic() - t0)
    w.wait(180)
    js.wait_count(ctx.stream, n, 120)
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    assert relay.running and relay.runs == 1, "the relay was restarted"


@pytest.mark.timeout(240)
def test_without_strict_order_a_broker_restart_still_loses_and_repeats_nothing(ctx, pg, js, nats):
    ctx.setup()
    relay = ctx.start_relay("--strict-order=false", "--ack-timeout=2s", "--retry-max=1s")
    w = ctx.writer(seed=34)
    n = 20_000
    w.start_background(random_sizes(n, 1, 40, w.rng), pause=0.0005)
    js.wait_count(ctx.stream, n // 3, 120)
    nats.kill()
    relay.wait_for_log("disconnected from NATS", timeout=20)
    nats.start()
    w.wait(180)
    js.wait_count(ctx.stream, n, 120)
    ids = js.msg_ids(ctx.stream)
    assert len(ids) == n and set(ids) == set(w.event_ids), "events lost or stored twice"
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(300)
def test_postgres_restarted_during_load_and_idle_republishes_nothing(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay("--status-interval=1s", "--checkpoint-interval=200ms")
    w = ctx.writer(seed=35)
    for k in range(2):
        # A backlog for the relay to work through while the database goes away under it.
        w.write(random_sizes(15_000, 1, 40, w.rng))
        target = len(w.event_ids)
        js.wait_count(ctx.stream, target - 12_000, 60, f"burst {k + 1} under way")
        pg.sql("CHECKPOINT")
        t0 = time.monotonic()
        pg.restart("fast")
        w.reconnect()
        js.wait_count(ctx.stream, target, 120, f"burst {k + 1} after the restart")
        report(f"database restart {k + 1} (during load) to the burst complete", time.monotonic() - t0)

    # Idle after a burst: everything confirmed, then the database restarts.
    w.write(random_sizes(2_000, 1, 40, w.rng))
    js.wait_count(ctx.stream, len(w.event_ids), 60)
    wait_until(lambda: relay.metrics()["outboxd_in_flight_events"] == 0, 30, "nothing in flight")
    pg.sql("CHECKPOINT")
    pg.restart("fast")
    w.reconnect()
    marker = w.insert_txn(n=1)
    t0 = time.monotonic()
    js.wait_count(ctx.stream, len(w.event_ids), 60, "the marker after the idle restart")
    report("database restart (idle) to the next event stored", time.monotonic() - t0)

    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    m = relay.metrics()
    assert m["outboxd_events_duplicate_total"] == 0, \
        f"{m['outboxd_events_duplicate_total']:.0f} events were published again after a database restart"
    assert m["outboxd_events_published_total"] == len(w.event_ids)
    assert relay.running and relay.runs == 1
    assert marker[0] == w.event_ids[-1]


@pytest.fixture
def cluster(root, request):
    c = NatsCluster(root.mkdir(f"cluster-{request.node.name}")).start()
    yield c
    c.kill()


@pytest.mark.timeout(300)
def test_stream_leader_killed_in_a_three_node_cluster(root, request, pg, cluster):
    from conftest import Ctx
    js = JetStream(cluster.url)
    ctx = Ctx(root, request, pg, cluster, js)
    try:
        ctx.create_table()
        def added():
            try:
                js.add_stream(ctx.stream, replicas=3)
                return True
            except AssertionError:  # "no suitable peers" until every node joined the meta group
                return False

        wait_until(added, 60, "an R3 stream to be placed on the cluster", interval=0.5)
        wait_until(lambda: cluster.stream_leader(ctx.stream), 30, "a stream leader")
        relay = ctx.start_relay("--ack-timeout=2s", "--retry-max=1s")
        w = ctx.writer(seed=37)
        n = 30_000
        w.start_background(random_sizes(n, 1, 40, w.rng), pause=0.0005)
        js.wait_count(ctx.stream, n // 3, 120)
        leader = cluster.stream_leader(ctx.stream)
        cluster.node(leader).kill()
        survivors = [x for x in cluster.nodes if x.name != leader]
        js_alive = JetStream(",".join(x.url for x in survivors))
        t0 = time.monotonic()
        # Progress: the survivors elect a leader and the stream grows past what it held.
        wait_until(lambda: cluster.stream_leader(ctx.stream) not in (None, leader), 60,
                   "a new stream leader")
        before = js_alive.wait_count(ctx.stream, 0, 60, "the stream to answer again")
        if before < n:
            wait_progress(js_alive, ctx.stream, before, 90, "progress after the leader was killed")
        report("stream leader killed to the next stored event", time.monotonic() - t0)
        w.wait(180)
        js_alive.wait_count(ctx.stream, n, 120)
        assert_exactly_once_in_order(js_alive.dump(ctx.stream), w.event_ids)
        assert relay.running and relay.runs == 1
    finally:
        ctx.cleanup()


@pytest.mark.timeout(240)
def test_two_relays_on_one_slot_standby_takes_over(ctx, pg, js):
    ctx.setup()
    active = ctx.start_relay()
    standby = ctx.relay(name="standby").start()
    standby.wait_for_log("standby: replication slot", timeout=30)
    status, _ = standby.http_get("/readyz")
    assert status == 503, f"a standby answered /readyz with {status}"
    assert active.http_get("/readyz")[0] == 200

    w = ctx.writer(seed=39)
    n = 20_000
    w.start_background(random_sizes(n, 1, 40, w.rng), pause=0.0005)
    js.wait_count(ctx.stream, n // 3, 120)
    active.kill()
    t0 = time.monotonic()
    standby.wait_for_log("took over replication slot", timeout=30)
    report("active relay killed to standby streaming", time.monotonic() - t0)
    wait_until(lambda: standby.http_get("/readyz")[0] == 200, 10, "the new active relay to be ready")
    w.wait(180)
    js.wait_count(ctx.stream, n, 120)
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)


POISON_TABLE = """CREATE TABLE {t} (
    event_id text, aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,
    payload jsonb, occurred_at timestamptz NOT NULL DEFAULT now(), schema_version int NOT NULL DEFAULT 1,
    trace_id text)"""


@pytest.mark.timeout(240)
def test_poison_events_go_to_the_dead_letter_subject_or_stop_the_relay(root, request, pg):
    from conftest import Ctx
    from harness import NatsServer
    # A broker that takes at most 64 KiB per message, and a stream that stores at most 16 KiB:
    # one event fails at the publish call, another only when the stream refuses it.
    nats = NatsServer(root.mkdir(f"nats-{request.node.name}"), conf="max_payload: 65536\n").start()
    js = JetStream(nats.url)
    ctx = Ctx(root, request, pg, nats, js)
    try:
        pg.sql(POISON_TABLE.format(t=ctx.table))
        ctx.tables.add(ctx.table)
        js.add_stream(ctx.stream, max_msg_size=16 * 1024)
        probe = ctx.create_probe()
        relay = ctx.start_relay("--ack-timeout=2s", "--retry-max=500ms")
        w = ctx.writer(seed=41)
        conn = w.conn

        def row(event_id, payload='{"n": 1}', aggregate_type="order"):
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {ctx.table} (event_id, aggregate_type, aggregate_id, event_type, "
                            "payload) VALUES (%s, %s, '1', 'created', %s)", (event_id, aggregate_type, payload))

        good = [f"good-{i}" for i in range(6)]
        big = '{"pad": "' + "x" * 100_000 + '"}'
        medium = '{"pad": "' + "y" * 20_000 + '"}'
        row(good[0])
        row(None)                           # invalid_event_id (null)
        row("has space")                    # invalid_event_id
        row(good[1])
        conn.commit()
        row("null-payload", payload=None)   # null_payload
        row("too-big", payload=big)         # too_large: over max_payload
        row(good[2])
        conn.commit()
        row("stream-refuses", payload=medium)  # too_large: the stream's max_msg_size (10054)
        row("long-subject", aggregate_type="a" * 3000)  # invalid_subject
        row(good[3])
        conn.commit()
        row(good[4])
        row(good[5])
        conn.commit()

        wait_until(lambda: set(good) <= set(js.msg_ids(ctx.stream)), 60, "the good events")
        msgs = js.dump(ctx.stream)
        events = [m for m in msgs if m["subject"] != "outbox.dead_letter"]
        dead = [m for m in msgs if m["subject"] == "outbox.dead_letter"]
        assert [m["headers"]["Nats-Msg-Id"] for m in events] == good
        reasons = {m["headers"].get("Outbox-Event-Id", "(null)"): m["headers"]["Outbox-Dead-Letter-Reason"]
                   for m in dead}
        assert reasons == {"(null)": "invalid_event_id", "has space": "invalid_event_id",
                           "null-payload": "null_payload", "too-big": "too_large",
                           "stream-refuses": "too_large", "long-subject": "invalid_subject"}, reasons
        for m in dead:
            h = m["headers"]
            assert h["Outbox-Table"] == ctx.table and h["Outbox-Commit-Lsn"] and h["Outbox-Dead-Letter-Detail"]
            assert h["Outbox-Original-Subject"].startswith("outbox.")
        by_id = {m["headers"].get("Outbox-Event-Id"): m for m in dead}
        assert by_id["has space"]["data"] == b'{"n": 1}', "a small body travels with its dead letter"
        assert b'"reason":"too_large"' in by_id["too-big"]["data"], "a large body is replaced by a pointer"
        assert len(by_id["too-big"]["data"]) < 1000
        m = relay.metrics()
        assert m['outboxd_dead_letter_total{reason="invalid_event_id"}'] == 2
        assert m['outboxd_dead_letter_total{reason="null_payload"}'] == 1
        assert m['outboxd_dead_letter_total{reason="too_large"}'] == 2
        assert m['outboxd_dead_letter_total{reason="invalid_subject"}'] == 1
        # Dead letters take their event's place in the order chain: it never broke for them.
        assert m['outboxd_publish_errors_total{reason="order"}'] == 0
        assert "did not write" not in relay.logs()
        # JetStream's own words travel with the refusal.
        assert "maximum message size exceeded" in relay.logs().lower() or \
            "message size exceeds maximum allowed" in relay.logs().lower(), relay.logs()[-3000:]

        # With --on-poison=stop the relay stops at the row, confirming nothing past it...
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(10) == 0
        stopper = ctx.relay("--on-poison=stop", name="stopper").start()
        stopper.wait_streaming(timeout=30)
        row(None)
        conn.commit()
        bad_tx = len(pg.probe_transactions(probe, ctx.table)) - 1
        row("after-the-poison")
        conn.commit()
        assert stopper.wait(30) == 1
        log = stopper.logs()
        assert "event_id is null" in log and "--on-poison=stop" in log, log[-2000:]
        txs = pg.probe_transactions(probe, ctx.table)
        assert pg.confirmed_flush(ctx.slot) < txs[bad_tx]["end_lsn"], "confirmed past the poison row"
        assert "after-the-poison" not in js.msg_ids(ctx.stream)
        # ... and a restart with dead-lettering moves past it.
        relay.start()
        wait_until(lambda: "after-the-poison" in js.msg_ids(ctx.stream), 30, "the event after the poison")
        dead_after = [m for m in js.dump(ctx.stream) if m["subject"] == "outbox.dead_letter"]
        assert len(dead_after) == len(dead) + 1
    finally:
        ctx.cleanup()
        nats.kill()
