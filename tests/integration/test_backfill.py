"""First start: rows already in the outbox when outboxd creates its slot are published once
(from the slot's own starting snapshot), and never again."""

import signal

import pytest

from harness import random_sizes


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
