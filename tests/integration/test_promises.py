"""outboxd's promises through what production brings: a quiet spell longer than the stream's
duplicate window followed by a broker restart, a transaction longer than the window cut by a
crash, a subject no stream captures, a stream at its limits, and a row that re-uses an
event_id. Figures (recovery time, retries, duplicates) are printed: run with -s to see them."""

import json
import time

import pytest

from harness import wait_until
from test_relay import assert_exactly_once_in_order


def report(what, value):
    print(f"\nfigure: {what}: {value}")


def stream_request(js, verb, config):
    """A JetStream API call on stream OUTBOX through jstool (create or update)."""
    out = js.run("request", f"--subject=$JS.API.STREAM.{verb}.OUTBOX", f"--data={json.dumps(config)}").stdout
    reply = json.loads(out)
    assert "error" not in reply, reply
    return reply


def stream_config(subjects=("outbox.>",), dupe_window_s=120, **extra):
    cfg = {"name": "OUTBOX", "subjects": list(subjects), "storage": "file", "num_replicas": 1,
           "duplicate_window": int(dupe_window_s * 1e9)}
    cfg.update(extra)
    return cfg


@pytest.mark.timeout(120)
def test_a_quiet_spell_longer_than_the_duplicate_window_then_a_broker_restart(ctx, pg, js, nats):
    # nats-server rebuilds a stream's last message id after a restart only from messages inside
    # the duplicate window: a chain on message ids wedged here for ever.
    ctx.setup(dupe_window=1)
    relay = ctx.start_relay("--ack-timeout=2s", "--retry-max=1s")
    w = ctx.writer(seed=61)
    w.write([5] * 20)
    js.wait_count(ctx.stream, 100, 30)
    time.sleep(1.5)  # the quiet spell itself: the duplicate window (1 s) passes with no event
    nats.restart()
    t0 = time.monotonic()
    w.write([5] * 20)
    js.wait_count(ctx.stream, 200, 30, "events after the broker restart")
    report("broker restart after a quiet spell to all new events stored (s)", round(time.monotonic() - t0, 2))
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    m = relay.metrics()
    assert m['outboxd_publish_errors_total{reason="order"}'] == 0
    assert "did not write" not in relay.logs()
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(240)
def test_a_transaction_longer_than_the_duplicate_window_cut_by_a_crash_is_stored_once(ctx, pg, js):
    # One transaction of 40,000 events, the relay killed when part of it is stored, restarted
    # after the duplicate window passed: JetStream can no longer drop what is sent again, so
    # the relay must resume after the last event the stream holds, inside the transaction.
    ctx.setup(dupe_window=1)
    relay = ctx.start_relay("--max-inflight=8", "--checkpoint-interval=100ms")
    w = ctx.writer(seed=62)
    n = 40_000
    w.insert_txn(n=n)
    js.wait_count(ctx.stream, 5_000, 120, "part of the transaction")
    relay.kill()
    stored = js.count(ctx.stream)
    assert stored < n, "the whole transaction was stored before the kill: nothing was tested"
    time.sleep(1.5)  # the outage: longer than the duplicate window (1 s)
    relay.start()
    relay.wait_streaming(timeout=30)
    js.wait_count(ctx.stream, n, 120)
    msgs = js.dump(ctx.stream)
    report("stored before the kill", stored)
    report("duplicates in the stream", len(msgs) - len({m["headers"]["Nats-Msg-Id"] for m in msgs}))
    assert_exactly_once_in_order(msgs, w.event_ids)
    m = relay.metrics()
    assert m["outboxd_events_already_stored_total"] >= stored - 8 * 2, m["outboxd_events_already_stored_total"]
    assert m["outboxd_events_duplicate_total"] == 0
    assert "nothing up to it is published again" in relay.logs()


@pytest.mark.timeout(60)
def test_start_refuses_a_stream_that_captures_only_some_subjects(ctx, pg, js):
    # A stream on outbox.order.* overlaps outbox.*.* but does not capture it: the first
    # invoice event would find no stream.
    ctx.create_table()
    js.add_stream(ctx.stream, subjects=("outbox.order.*", "outbox.dead_letter"))
    relay = ctx.relay().start()
    assert relay.wait(30) == 3
    log = relay.logs()
    assert "captures only some of the subjects outbox.*.* can be" in log, log[-2000:]


@pytest.mark.timeout(120)
def test_a_subject_no_stream_captures_becomes_a_dead_letter(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay("--ack-timeout=2s", "--retry-min=100ms", "--retry-max=1s")
    # The stream is narrowed while the relay runs: invoices no longer have a stream.
    stream_request(js, "UPDATE", stream_config(("outbox.order.>", "outbox.dead_letter")))
    w = ctx.writer(seed=63)
    t0 = time.monotonic()
    w.insert_txn([w.make_event(aggregate_type="invoice"), w.make_event(aggregate_type="order")])
    wait_until(lambda: js.count(ctx.stream) == 2, 60, "the dead letter and the order event")
    report("an event without a stream to its dead letter (s)", round(time.monotonic() - t0, 1))
    msgs = js.dump(ctx.stream)
    assert msgs[0]["subject"] == "outbox.dead_letter"
    assert msgs[0]["headers"]["Outbox-Dead-Letter-Reason"] == "no_stream"
    assert msgs[0]["headers"]["Outbox-Event-Id"] == w.event_ids[0]
    assert msgs[1]["headers"]["Nats-Msg-Id"] == w.event_ids[1]
    m = relay.metrics()
    assert m['outboxd_dead_letter_total{reason="no_stream"}'] == 1
    assert "no stream captures subject outbox.invoice." in relay.logs()


@pytest.mark.timeout(120)
def test_a_full_stream_is_a_transient_reason_and_the_window_waits_behind_a_probe(ctx, pg, js):
    ctx.create_table()
    stream_request(js, "CREATE", stream_config(max_msgs=100, discard="new"))
    relay = ctx.start_relay("--ack-timeout=2s", "--retry-min=100ms", "--retry-max=500ms")
    w = ctx.writer(seed=64)
    w.write([10] * 30)
    relay.wait_for_log("maximum messages exceeded", timeout=30)
    js.wait_count(ctx.stream, 100, 30)
    hold = 5.0
    before = relay.metrics()["outboxd_publish_retries_total"]
    time.sleep(hold)  # the stream stays full for this long: a measurement period
    retries = relay.metrics()["outboxd_publish_retries_total"] - before
    report(f"resends while the stream was full for {hold:.0f} s (200 events waiting)", int(retries))
    assert retries <= 30, f"{retries} resends: the window is resent instead of probed"
    m = relay.metrics()
    assert m['outboxd_publish_errors_total{reason="stream_full"}'] >= 1
    assert m['outboxd_publish_errors_total{reason="rejected"}'] == 0
    assert sum(v for k, v in m.items() if k.startswith("outboxd_dead_letter_total")) == 0
    assert "the stream is full" in relay.logs()
    stream_request(js, "UPDATE", stream_config(max_msgs=-1, discard="new"))
    js.wait_count(ctx.stream, 300, 60, "the rest once the stream has room")
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)


@pytest.mark.timeout(60)
def test_a_reused_event_id_is_a_warning_and_a_counter(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay()
    w = ctx.writer(seed=65)
    first = w.insert_txn(n=3)
    js.wait_count(ctx.stream, 3, 30)
    pg.sql(f"ALTER TABLE {ctx.table} DROP CONSTRAINT IF EXISTS {ctx.table.split('.')[1]}_pkey")
    again = w.make_event(event_id=first[1])
    later = w.insert_txn([again, w.make_event()])
    js.wait_count(ctx.stream, 4, 30)
    relay.wait_for_log("re-used an event_id", timeout=10)
    assert f"event {first[1]}" in relay.logs()
    wait_until(lambda: relay.metrics()["outboxd_events_id_reused_total"] == 1, 10, "the counter")
    assert js.msg_ids(ctx.stream) == first + [later[1]]
