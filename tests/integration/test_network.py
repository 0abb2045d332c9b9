"""Silent connections and lost acknowledgements, made with harness.TcpProxy between the relay and
a real server: a connection that stays open while nothing crosses it (a NAT entry or a load
balancer that dropped it, a partition), both ways or from the server to the client only.

Each test prints its figures (run with -s to see them): how long the relay took to notice the
silence and to stream or publish again. Timeouts are small (--pg-receive-timeout=3s,
--nats-ping-interval=1s) so each test takes seconds; the defaults (60 s, 10 s) scale the same way.
"""

import json
import re
import time

import pytest

from harness import random_sizes, wait_until
from test_relay import assert_exactly_once_in_order

RECEIVE_TIMEOUT_S = 3.0


def report(what, value):
    print(f"\nnetwork: {what}: {value}")


def streaming_count(relay):
    return len(re.findall(r"streaming from slot", relay.logs()))


def silent_replication_connection(ctx, pg, js, direction):
    ctx.setup()
    proxy = ctx.proxy(pg.port)
    relay = ctx.start_relay(f"--pg-receive-timeout={RECEIVE_TIMEOUT_S:g}s",
                            pg_url=proxy.dsn(pg))
    w = ctx.writer(seed=71)
    w.write(random_sizes(300, 1, 10, w.rng))
    js.wait_count(ctx.stream, 300, 30, "events before the silence")
    held_by = pg.slot(ctx.slot)["active_pid"]

    proxy.silence(direction)
    t0 = time.monotonic()
    w.start_background(random_sizes(1_500, 1, 10, w.rng), pause=0.004)
    relay.wait_for_log("the replication connection is silent", timeout=RECEIVE_TIMEOUT_S * 3 + 10)
    noticed = time.monotonic() - t0
    wait_until(lambda: streaming_count(relay) >= 2, 30, "the relay to stream again",
               detail=lambda: relay.logs()[-1500:])
    back = time.monotonic() - t0
    w.wait(60)
    js.wait_count(ctx.stream, len(w.event_ids), 60, "every event after the silence")
    report(f"replication connection silent ({direction}): noticed after", f"{noticed:.2f} s")
    report(f"replication connection silent ({direction}): streaming again after", f"{back:.2f} s")
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    assert relay.running and relay.runs == 1
    # Asked for a reply at half the timeout, dropped at the end of it (the last message may
    # have come a little before the silence began).
    assert RECEIVE_TIMEOUT_S / 2 <= noticed <= RECEIVE_TIMEOUT_S * 2 + 3, noticed
    return relay, held_by, back


@pytest.mark.timeout(180)
def test_replication_connection_silent_both_ways_is_dropped_and_its_walsender_ended(ctx, pg, js):
    relay, held_by, back = silent_replication_connection(ctx, pg, js, "both")
    # Nothing reached the server: its walsender kept the slot (until wal_sender_timeout, 60 s
    # here) and the relay ended it, as its own previous session.
    assert f"is still held by PID {held_by}, this relay's previous session" in relay.logs()
    assert back < 20, f"streaming again only after {back:.1f} s"


@pytest.mark.timeout(180)
def test_replication_connection_silent_server_to_client_is_dropped_and_replaced(ctx, pg, js):
    relay, held_by, back = silent_replication_connection(ctx, pg, js, "s2c")
    assert back < 20, f"streaming again only after {back:.1f} s"


@pytest.mark.timeout(180)
def test_nats_connection_silent_both_ways_then_one_way_is_replaced(ctx, pg, js, nats):
    ctx.setup()
    proxy = ctx.proxy(nats.port)
    relay = ctx.start_relay("--nats-ping-interval=1s", nats_url=proxy.url)
    w = ctx.writer(seed=72)
    w.start_background(random_sizes(4_000, 1, 10, w.rng), pause=0.01)
    for direction in ("both", "s2c"):
        before = js.count(ctx.stream)
        js.wait_count(ctx.stream, before + 200, 30, "events flowing before the silence")
        reconnects = relay.logs().count("reconnected to NATS")
        proxy.silence(direction)
        t0 = time.monotonic()
        wait_until(lambda: relay.logs().count("reconnected to NATS") > reconnects, 20,
                   f"the relay to replace the NATS connection silent {direction}",
                   detail=lambda: relay.logs()[-1500:])
        replaced = time.monotonic() - t0
        at = js.count(ctx.stream)
        js.wait_count(ctx.stream, at + 100, 30, "events flowing after the silence")
        flowing = time.monotonic() - t0
        report(f"NATS connection silent ({direction}): replaced after", f"{replaced:.2f} s")
        report(f"NATS connection silent ({direction}): events stored again after", f"{flowing:.2f} s")
        # Two unanswered pings a second apart, then the reconnect's backoff.
        assert replaced < 6, f"the silent NATS connection was replaced only after {replaced:.1f} s"
    w.wait(120)
    js.wait_count(ctx.stream, len(w.event_ids), 60, "every event")
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(180)
def test_acks_lost_for_longer_than_the_duplicate_window_store_nothing_twice(ctx, pg, js, nats):
    ctx.setup(dupe_window=1)
    proxy = ctx.proxy(nats.port)
    # Pings 3 s apart: the silence lasts well past the 1 s duplicate window before nats.c gives
    # the connection up; the acknowledgement timeout is longer still.
    relay = ctx.start_relay("--nats-ping-interval=3s", "--ack-timeout=30s", nats_url=proxy.url)
    w = ctx.writer(seed=73)
    w.write(random_sizes(50, 1, 5, w.rng))
    js.wait_count(ctx.stream, 50, 30, "events before the silence")
    reconnects = relay.logs().count("reconnected to NATS")
    proxy.silence("s2c")
    t0 = time.monotonic()
    w.write(random_sizes(600, 1, 10, w.rng))
    # JetStream stores them; their acknowledgements do not come back.
    js.wait_count(ctx.stream, len(w.event_ids), 30, "the stream to store the events sent")
    stored = time.monotonic() - t0
    wait_until(lambda: relay.logs().count("reconnected to NATS") > reconnects, 30,
               "the relay to replace the silent connection", detail=lambda: relay.logs()[-1500:])
    replaced = time.monotonic() - t0
    w.write(random_sizes(100, 1, 10, w.rng))
    js.wait_count(ctx.stream, len(w.event_ids), 30, "the events after the silence")
    time.sleep(1.5)  # a measurement period: anything sent twice would be stored by now
    msgs = js.dump(ctx.stream)
    ids = [msg["headers"].get("Nats-Msg-Id") for msg in msgs]
    duplicates = len(ids) - len(set(ids))
    m = re.search(r"already holds (\d+) events of the window", relay.logs())
    recognised = int(m.group(1)) if m else 0
    report("acks lost: stored by the broker after", f"{stored:.2f} s")
    report("acks lost: connection replaced after", f"{replaced:.2f} s (duplicate window 1 s)")
    report("acks lost: events found stored instead of sent again", recognised)
    report("acks lost: duplicates in the stream", duplicates)
    assert replaced > 1.5, "the connection was replaced inside the duplicate window: not the case under test"
    assert duplicates == 0
    assert recognised > 0
    assert_exactly_once_in_order(msgs, w.event_ids)
    assert relay.metrics()["outboxd_publish_acks_lost_total"] == recognised
    assert relay.running and relay.runs == 1


@pytest.mark.timeout(120)
def test_a_subject_at_its_own_limit_becomes_a_dead_letter_while_the_stream_has_room(ctx, pg, js, nats):
    """Not a network failure but the same rule family: a refusal that cannot pass (a per-subject
    limit with discard new) must not stall the relay for ever, and is told from a full stream
    by the stream's state."""
    ctx.create_table()
    config = {"name": ctx.stream, "subjects": ["outbox.>"], "storage": "file", "num_replicas": 1,
              "max_msgs_per_subject": 1, "discard": "new", "discard_new_per_subject": True,
              "max_msgs": -1, "max_bytes": -1, "duplicate_window": 120 * 10 ** 9}
    reply = nats.request_json(f"$JS.API.STREAM.CREATE.{ctx.stream}", json.dumps(config).encode())
    assert reply and "error" not in reply, reply
    relay = ctx.start_relay()
    w = ctx.writer(seed=74)
    first = w.insert_txn([w.make_event(aggregate_type="order", event_type="created")])
    refused = w.insert_txn([w.make_event(aggregate_type="order", event_type="created")])
    after = w.insert_txn([w.make_event(aggregate_type="invoice", event_type="paid")])
    t0 = time.monotonic()
    wait_until(lambda: after[0] in js.msg_ids(ctx.stream), 60, "the event behind the refused one",
               detail=lambda: relay.logs()[-1500:])
    report("a subject at its own limit: dead-lettered and past it after", f"{time.monotonic() - t0:.2f} s")
    msgs = js.dump(ctx.stream)
    ids = [m["headers"].get("Nats-Msg-Id") for m in msgs]
    assert ids == [first[0], f"dlq-{refused[0]}", after[0]], ids
    dl = msgs[1]["headers"]
    assert dl.get("Outbox-Dead-Letter-Reason") == "rejected"
    assert "per subject" in dl.get("Outbox-Dead-Letter-Detail", ""), dl
    assert "while it had room below its own limits" in relay.logs()
    assert relay.running
