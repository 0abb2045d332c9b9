"""Positions that name their source (anchor.c): what the stream, the checkpoint and a run say is
stored is used only when it comes from this database system and slot and is proven by the WAL.

- A database moved to a new cluster (dump and restore, blue/green) behind the same slot name and
  stream: its first events are published, not skipped for the old cluster's positions.
- A volume snapshot of the same cluster restored in place (same system id and timeline, the WAL
  goes back and then on with other transactions): every event of the new history is published.
- The address swapped to another system under a running relay: exit 1, both system ids named,
  nothing made or read there.
- A first start with concurrent writers: backfilled rows and streamed transactions never share a
  position (a transaction may commit in the very record after the slot's consistent point).

Each test has its own PostgreSQL servers (stopped by PID afterwards) and nats-server; figures are
printed (run with -s to see them).
"""

import subprocess
import time

import pytest

from harness import OutboxWriter, lsn_int, lsn_text, random_sizes
from test_relay import assert_exactly_once_in_order, assert_positions_increase, position_key


def report(what, value):
    print(f"\npositions: {what}: {value}")


def same_names(ctx, like):
    """Gives ctx the table, slot, publication and stream names of another test world."""
    ctx.table, ctx.slot, ctx.publication, ctx.stream = like.table, like.slot, like.publication, like.stream
    ctx.slots, ctx.publications = {like.slot}, {like.publication}


def system_id(pg):
    return str(pg.scalar("SELECT system_identifier FROM pg_control_system()"))


def push_wal(pg, segments):
    """Moves the server's WAL on by about `segments` segments of 16 MiB."""
    pg.sql("CREATE TABLE IF NOT EXISTS wal_filler (x int)")
    for _ in range(segments):
        pg.sql("INSERT INTO wal_filler VALUES (1)")
        pg.sql("SELECT pg_switch_wal()")


@pytest.mark.timeout(180)
def test_a_database_moved_to_a_new_cluster_publishes_its_first_events(servers, js):
    a = servers("a")
    a.setup()
    push_wal(a.pg, 4)  # cluster A's positions lie well past anything B writes first
    relay = a.start_relay()
    wa = a.writer(seed=201)
    wa.write(random_sizes(100, 1, 5, wa.rng))
    js.wait_count(a.stream, 100, 60)
    assert relay.stop() == 0
    last_a = position_key(js.dump(a.stream)[-1]["headers"]["Outbox-Position"])

    # The database moves: a new cluster, the same slot name, table and stream.
    b = servers("b")
    same_names(b, a)
    b.create_table()
    relay_b = b.start_relay()
    wb = b.writer(seed=202)
    wb.write(random_sizes(100, 1, 5, wb.rng))
    js.wait_count(b.stream, 200, 60)
    msgs = js.dump(b.stream)
    first_b = position_key(msgs[100]["headers"]["Outbox-Position"])
    report("cluster A's last position / cluster B's first", f"{last_a} / {first_b}")
    report("events of B in the stream", f"{len(msgs) - 100} of 100")
    assert first_b < last_a, "B's positions do not overlap A's: nothing was tested"
    assert [m["headers"]["Nats-Msg-Id"] for m in msgs] == wa.event_ids + wb.event_ids
    assert_positions_increase(msgs[:100])  # each cluster's events in its own commit order
    assert_positions_increase(msgs[100:])
    sources = {m["headers"].get("Outbox-Source") for m in msgs}
    assert sources == {f"{system_id(a.pg)}/{a.slot}", f"{system_id(b.pg)}/{b.slot}"}, sources
    assert relay_b.metrics()["outboxd_events_already_stored_total"] == 0
    assert "holds no event of this relay's" in relay_b.logs()


def copy_datadir(pg, src, dst):
    subprocess.run(["rm", "-rf", str(dst)], check=True)
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


@pytest.mark.timeout(240)
def test_a_restored_volume_snapshot_publishes_every_event_of_the_new_history(servers, js):
    ctx = servers("snap")
    pg = ctx.pg
    ctx.setup()
    relay = ctx.start_relay("--checkpoint-interval=100ms")
    w0 = ctx.writer(seed=211)
    w0.write(random_sizes(20, 1, 3, w0.rng))
    js.wait_count(ctx.stream, 20, 60)
    assert relay.stop() == 0
    w0.close()

    # The volume snapshot, taken with the database stopped.
    pg.stop()
    snapshot = pg.dir / "snapshot"
    copy_datadir(pg, pg.datadir, snapshot)
    pg.start()

    # The history that the restore loses: published, then gone from the database.
    relay.start()
    relay.wait_streaming()
    lost = OutboxWriter(pg, ctx.table, seed=212)
    lost.write(random_sizes(100, 1, 3, lost.rng))
    js.wait_count(ctx.stream, 120, 60)
    assert relay.stop() == 0
    lost.close()
    lost_last = js.dump(ctx.stream)[-1]["headers"]["Outbox-Position"]
    pg.stop()
    copy_datadir(pg, snapshot, pg.datadir)
    pg.start()

    # The new history: the same system id and timeline, other transactions at the same LSNs.
    new = OutboxWriter(pg, ctx.table, seed=213)
    ctx.writers.append(new)
    new.write(random_sizes(300, 1, 3, new.rng))
    report("the stream's last position / the restored server's WAL",
           f"{lost_last} / {lsn_text(pg.current_lsn())}")
    assert lsn_int(lost_last.split(" ")[1]) < pg.current_lsn(), \
        "the new history does not reach the lost one's last position: rule 2 alone decides"
    t0 = time.monotonic()
    relay.start()
    js.wait_count(ctx.stream, 420, 60)
    msgs = js.dump(ctx.stream)
    report("new history published after the restart", f"{time.monotonic() - t0:.2f} s")
    got = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    assert got[:20] == w0.event_ids and got[20:120] == lost.event_ids
    assert_exactly_once_in_order(msgs[120:], new.event_ids)
    m = relay.metrics()
    report("anchors proven false", m["outboxd_anchors_false_total"])
    assert m["outboxd_anchors_false_total"] >= 1
    assert "is not the history that position came from" in relay.logs()


@pytest.mark.timeout(120)
def test_the_address_leading_to_another_system_stops_the_relay(servers, js):
    a = servers("a")
    a.setup()
    relay = a.start_relay("--retry-min=100ms", "--retry-max=500ms")
    w = a.writer(seed=221)
    w.write([3, 3])
    js.wait_count(a.stream, 6, 30)
    old = system_id(a.pg)
    a.pg.stop()
    # Another cluster answers at the same address.
    b = servers("b", port=a.pg.port)
    t0 = time.monotonic()
    rc = relay.wait(30)
    log = relay.logs()
    report("another system at the address to the relay's exit", f"{time.monotonic() - t0:.2f} s")
    assert rc == 1, f"exit code {rc}; log:\n{log[-3000:]}"
    assert f"system id {system_id(b.pg)}" in log and f"from system {old}" in log, log[-3000:]
    assert b.pg.slot(a.slot) is None, "the relay made a slot on the other system"
    assert not b.pg.sql("SELECT 1 FROM pg_publication WHERE pubname = %s", a.publication), \
        "the relay made a publication on the other system"


@pytest.mark.timeout(180)
def test_backfilled_rows_and_streamed_transactions_never_share_a_position(servers, js):
    ctx = servers("bf")
    ctx.setup()
    before = ctx.writer(seed=231)
    before.write(random_sizes(2000, 1, 20, before.rng))
    # Writers commit while the slot is created and the backfill runs: the first streamed
    # transactions commit right after the slot's consistent point.
    writers = [ctx.writer(seed=232 + k) for k in range(4)]
    for w in writers:
        w.start_background(random_sizes(400, 1, 3, w.rng), pause=0.002)
    relay = ctx.relay().start()
    for w in writers:
        w.wait(120)
    total = len(before.event_ids) + sum(len(w.event_ids) for w in writers)
    js.wait_count(ctx.stream, total, 90)
    relay.wait_streaming()
    msgs = js.dump(ctx.stream)
    got = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    expected = set(before.event_ids).union(*(w.event_ids for w in writers))
    assert len(got) == len(set(got)) == total and set(got) == expected
    assert_positions_increase(msgs)
    slot_start = lsn_int(msgs[0]["headers"]["Outbox-Commit-Lsn"]) + 1
    backfilled = [m for m in msgs if lsn_int(m["headers"]["Outbox-Commit-Lsn"]) == slot_start - 1]
    streamed = [m for m in msgs if lsn_int(m["headers"]["Outbox-Commit-Lsn"]) >= slot_start]
    at_start = sum(1 for m in streamed if lsn_int(m["headers"]["Outbox-Commit-Lsn"]) == slot_start)
    report("backfilled / streamed / streamed at the slot's position",
           f"{len(backfilled)} / {len(streamed)} / {at_start}")
    assert len(backfilled) + len(streamed) == total
    assert len(backfilled) >= len(before.event_ids) and streamed, "nothing streamed: nothing was tested"
    assert [position_key(m["headers"]["Outbox-Position"])[2] for m in backfilled] == \
        list(range(len(backfilled)))
