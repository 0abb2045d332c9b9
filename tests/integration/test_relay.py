"""End-to-end behaviour of `outboxd run`: what reaches JetStream, in which order, exactly once,
and which LSN the relay confirms to PostgreSQL — across rollbacks, crashes, a broker outage and a
clean shutdown. Each test has its own outbox table, slot, publication and nats-server."""

import collections
import datetime as dt
import re
import signal

import psycopg2.errors
import pytest

from harness import (expected_subject, header_value, lsn_int, lsn_text, mixed_sizes, parse_rfc3339, random_sizes,
                     wait_until)

MiB = 1024 * 1024
LSN_RE = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")


def position_key(value):
    """An Outbox-Position ("<timeline> <commit LSN> <index>") as a sortable tuple."""
    tl, lsn, index = value.split(" ")
    hi, lo = lsn.split("/")
    return int(tl), (int(hi, 16) << 32) | int(lo, 16), int(index)


def assert_positions_increase(msgs):
    """Every relayed message carries an Outbox-Position, strictly increasing along the stream,
    whose LSN is its Outbox-Commit-Lsn."""
    last = None
    for m in msgs:
        h = m["headers"]
        if "Outbox-Replay" in h:
            continue
        pos = h.get("Outbox-Position")
        assert pos, f"stream seq {m['seq']}: no Outbox-Position"
        key = position_key(pos)
        assert pos.split(" ")[1] == h.get("Outbox-Commit-Lsn"), f"stream seq {m['seq']}: {pos}"
        assert last is None or key > last, f"stream seq {m['seq']}: position {pos} not after {last}"
        last = key


def assert_exactly_once_in_order(msgs, expected_ids):
    """The stream's Nats-Msg-Ids are exactly expected_ids, in that order, each once, and their
    positions increase."""
    got = [m["headers"].get("Nats-Msg-Id") for m in msgs]
    if got == list(expected_ids):
        assert_positions_increase(msgs)
        return
    counts = collections.Counter(got)
    dups = [i for i, c in counts.items() if c > 1]
    exp = set(expected_ids)
    missing = [i for i in expected_ids if i not in counts]
    extra = [i for i in counts if i not in exp]
    first = next((k for k, (a, b) in enumerate(zip(got, expected_ids)) if a != b), min(len(got), len(expected_ids)))
    raise AssertionError(
        f"stream holds {len(got)} messages, expected {len(expected_ids)}: {len(dups)} duplicated "
        f"(e.g. {dups[:3]}), {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
        f"(e.g. {extra[:3]}); first difference in order at index {first}: "
        f"stream {got[first:first + 3]} vs commit order {list(expected_ids)[first:first + 3]}")


def wait_for_ids(js, stream, ids, timeout, what):
    """Waits until every id in ids is in the stream; returns the dump."""
    want = set(ids)
    state = {"msgs": []}

    def arrived():
        state["msgs"] = js.dump(stream)
        return want <= {m["headers"].get("Nats-Msg-Id") for m in state["msgs"]}

    wait_until(arrived, timeout, what, interval=0.2,
               detail=lambda: f"{len(want - {m['headers'].get('Nats-Msg-Id') for m in state['msgs']})} "
                              f"of {len(want)} still missing")
    return state["msgs"]


@pytest.mark.timeout(180)
def test_10k_events_exactly_once_with_row_contents_in_commit_order(ctx, pg, js):
    ctx.setup()
    probe = ctx.create_probe()
    relay = ctx.start_relay()
    w = ctx.writer(seed=1)
    n = 10_000
    w.write(mixed_sizes(n, 1_000, 1, 30, w.rng))
    assert len(w.transactions) == 1_000 and len(w.event_ids) == n

    js.wait_count(ctx.stream, n, 90)
    msgs = js.dump(ctx.stream)
    assert_exactly_once_in_order(msgs, w.event_ids)
    assert relay.running, "the relay stopped"

    # The transactions as PostgreSQL decoded them (commit order, end LSNs) must match the writer's.
    txs = pg.probe_transactions(probe, ctx.table)
    assert [t["event_ids"] for t in txs] == w.transactions, "probe slot disagrees with the writer"
    source = f"{pg.scalar('SELECT system_identifier FROM pg_control_system()')}/{ctx.slot}"
    tx_of = {}
    for k, t in enumerate(txs):
        for e in t["event_ids"]:
            tx_of[e] = k

    rows = w.rows()
    per_tx = collections.defaultdict(set)
    for m in msgs:
        h = m["headers"]
        eid = h["Nats-Msg-Id"]
        row = rows[eid]
        where = f"event {eid} (stream seq {m['seq']})"
        for key, v in h.items():
            assert isinstance(v, str), f"{where}: header {key} appears several times: {v!r}"

        assert m["subject"] == expected_subject(row["aggregate_type"], row["event_type"]), where
        assert m["data"] == row["payload"].encode("utf-8"), f"{where}: body is not payload::text"
        assert len(eid) == 36
        assert h.get("Outbox-Event-Type") == header_value(row["event_type"]), where
        assert h.get("Outbox-Aggregate-Type") == header_value(row["aggregate_type"]), where
        assert h.get("Outbox-Aggregate-Id") == header_value(row["aggregate_id"]), where
        assert h.get("Outbox-Schema-Version") == str(row["schema_version"]) == "1", where
        occurred = parse_rfc3339(h.get("Outbox-Occurred-At", ""))
        assert occurred == row["occurred_at"], f"{where}: Outbox-Occurred-At {h.get('Outbox-Occurred-At')}"
        if row["trace_id"] is None:
            assert "Outbox-Trace-Id" not in h, f"{where}: Outbox-Trace-Id set for a NULL trace_id"
        else:
            assert h.get("Outbox-Trace-Id") == header_value(row["trace_id"]), where
        known = {"Outbox-Event-Type", "Outbox-Aggregate-Type", "Outbox-Aggregate-Id", "Outbox-Occurred-At",
                 "Outbox-Schema-Version", "Outbox-Trace-Id", "Outbox-Commit-Lsn", "Outbox-Commit-Time",
                     "Outbox-Position", "Outbox-Source"}
        unknown = {k for k in h if k.startswith("Outbox-")} - known
        assert not unknown, f"{where}: unexpected headers {unknown}"
        assert h.get("Outbox-Source") == source, f"{where}: Outbox-Source {h.get('Outbox-Source')}"

        lsn = h.get("Outbox-Commit-Lsn", "")
        assert LSN_RE.fullmatch(lsn), f"{where}: Outbox-Commit-Lsn {lsn!r} is not X/X upper-case hex"
        commit_time = parse_rfc3339(h.get("Outbox-Commit-Time", ""))
        assert row["occurred_at"] <= commit_time < row["occurred_at"] + dt.timedelta(minutes=5), \
            f"{where}: Outbox-Commit-Time {h.get('Outbox-Commit-Time')} vs occurred_at {row['occurred_at']}"
        per_tx[tx_of[eid]].add((lsn, h["Outbox-Commit-Time"]))

    # One commit LSN and time per transaction; the LSN lies within the transaction's commit record
    # (after the previous transaction's end, at most this one's end: commit_lsn or end_lsn both fit).
    prev_end = 0
    for k, t in enumerate(txs):
        vals = per_tx[k]
        assert len(vals) == 1, f"transaction {k} (xid {t['xid']}) has several commit LSN/time headers: {vals}"
        (lsn, _), = vals
        assert prev_end <= lsn_int(lsn) <= t["end_lsn"], \
            f"transaction {k}: Outbox-Commit-Lsn {lsn} outside [{lsn_text(prev_end)}, {lsn_text(t['end_lsn'])}]"
        prev_end = t["end_lsn"]


@pytest.mark.timeout(120)
def test_rollbacks_and_other_statements_publish_nothing(ctx, pg, js):
    ctx.setup()
    other = ctx.create_table(f"public.other_{ctx.tag}")
    ctx.start_relay()
    w = ctx.writer(seed=2)
    conn = w.conn
    expected = []

    expected += w.insert_txn(n=3)

    # A rolled-back transaction.
    with conn.cursor() as cur:
        w.insert_rows(cur, [w.make_event() for _ in range(5)])
    conn.rollback()

    # A transaction that fails and is rolled back.
    with conn.cursor() as cur:
        ev = w.make_event()
        w.insert_rows(cur, [ev])
        with pytest.raises(psycopg2.errors.UniqueViolation):
            w.insert_rows(cur, [dict(ev)])  # same primary key
    conn.rollback()

    # Rolled-back savepoints inside committed transactions; a released savepoint is kept.
    keep1, lost, keep2, keep3, lost2 = (w.make_event() for _ in range(5))
    with conn.cursor() as cur:
        w.insert_rows(cur, [keep1])
        cur.execute("SAVEPOINT a")
        w.insert_rows(cur, [lost, w.make_event()])
        cur.execute("ROLLBACK TO SAVEPOINT a")
        w.insert_rows(cur, [keep2])
        cur.execute("SAVEPOINT b")
        w.insert_rows(cur, [keep3])
        cur.execute("SAVEPOINT c")
        w.insert_rows(cur, [lost2])
        cur.execute("ROLLBACK TO SAVEPOINT c")
        cur.execute("RELEASE SAVEPOINT b")
    conn.commit()
    expected += [keep1["event_id"], keep2["event_id"], keep3["event_id"]]

    # UPDATE, DELETE and TRUNCATE on the outbox; inserts into another table.
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {ctx.table} SET payload = '{{\"updated\": true}}', event_type = 'changed'")
    conn.commit()
    with conn.cursor() as cur:
        cur.execute(f"DELETE FROM {ctx.table} WHERE event_id = %s", (keep1["event_id"],))
    conn.commit()
    other_writer = ctx.writer(other, seed=22)
    other_writer.insert_txn(n=10)
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {ctx.table}")
    conn.commit()
    with conn.cursor() as cur:
        cur.execute(f"UPDATE {other} SET event_type = 'x'")
    conn.commit()

    # An insert deleted again in the same transaction was still committed: it is published.
    gone = w.make_event()
    with conn.cursor() as cur:
        w.insert_rows(cur, [gone])
        cur.execute(f"DELETE FROM {ctx.table} WHERE event_id = %s", (gone["event_id"],))
    conn.commit()
    expected.append(gone["event_id"])

    # Mixed: the outbox and the other table in one committed transaction.
    mixed = w.make_event()
    with conn.cursor() as cur:
        other_writer.insert_rows(cur, [w.make_event()])
        w.insert_rows(cur, [mixed])
    conn.commit()
    expected.append(mixed["event_id"])

    marker = w.insert_txn(n=1)
    expected += marker

    msgs = wait_for_ids(js, ctx.stream, marker, 60, "the marker event")
    assert_exactly_once_in_order(msgs, expected)


@pytest.mark.timeout(120)
def test_idle_outbox_does_not_hold_back_wal(ctx, pg, js):
    ctx.setup()
    filler = f"public.filler_{ctx.tag}"
    ctx.tables.add(filler)
    pg.sql(f"CREATE TABLE {filler} (id bigserial PRIMARY KEY, pad text)")
    relay = ctx.start_relay("--status-interval=1s")
    start = pg.current_lsn()
    # ~50 MB of WAL from a table outside the publication, in ten transactions.
    for _ in range(10):
        pg.sql(f"INSERT INTO {filler} (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 5000) g")
    written = pg.current_lsn() - start
    assert written >= 45 * MiB, f"only {written} bytes of WAL written"

    state = {}

    def caught_up():
        target = pg.current_lsn()
        cf = pg.confirmed_flush(ctx.slot)
        state.update(target=target, cf=cf)
        return cf is not None and target - cf <= MiB

    wait_until(caught_up, 60, "the slot's confirmed_flush_lsn to come within 1 MB of pg_current_wal_lsn()",
               interval=0.25,
               detail=lambda: f"confirmed_flush_lsn {lsn_text(state['cf'] or 0)}, "
                              f"current {lsn_text(state['target'])}, "
                              f"behind by {(state['target'] - (state['cf'] or 0)) / MiB:.1f} MB")
    assert relay.running
    pg.sql(f"DROP TABLE {filler}")


@pytest.mark.timeout(240)
def test_sigkill_five_times_during_a_burst_loses_and_duplicates_nothing(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay()
    w = ctx.writer(seed=4)
    n = 20_000
    w.start_background(random_sizes(n, 1, 30, w.rng), pause=0.002)
    kills = []
    for k in range(1, 6):
        js.wait_count(ctx.stream, k * n // 6, 90, f"{k}/6 of the events before kill {k}")
        relay.kill()
        kills.append((js.count(ctx.stream), w.busy))
        relay.start()
        relay.wait_streaming(timeout=30)
    w.wait(120)
    assert len(w.event_ids) == n

    js.wait_count(ctx.stream, n, 120)
    msgs = js.dump(ctx.stream)
    assert_exactly_once_in_order(msgs, w.event_ids)
    assert {m["headers"]["Nats-Msg-Id"] for m in msgs} == set(w.event_ids)
    print(f"kills at (stream count, writer busy): {kills}")


@pytest.mark.timeout(180)
def test_broker_down_relay_stays_up_confirms_nothing_unpublished_then_catches_up(ctx, pg, js, nats):
    ctx.setup()
    probe = ctx.create_probe()
    relay = ctx.start_relay("--ack-timeout=2s", "--status-interval=1s", "--retry-max=1s")
    w = ctx.writer(seed=5)
    w.write(random_sizes(500, 1, 30, w.rng))
    js.wait_count(ctx.stream, 500, 60)

    nats.stop()
    first_unpublished = w.insert_txn(n=5)
    w.write(random_sizes(300, 1, 30, w.rng))

    # The relay stays up and keeps its replication connection alive: its status updates keep
    # arriving at the walsender while the broker is gone.
    def reply_time():
        rows = pg.sql("SELECT extract(epoch FROM reply_time) FROM pg_stat_replication "
                      "WHERE application_name = 'outboxd'")
        return float(rows[0][0]) if rows and rows[0][0] is not None else 0.0

    t0 = reply_time()
    wait_until(lambda: reply_time() >= t0 + 3, 30, "three seconds of status updates during the outage")
    assert relay.running, "the relay stopped during the broker outage"
    cf = pg.confirmed_flush(ctx.slot)
    # The first transaction written while the broker was down ends at end_lsn; confirming that
    # far (or further) would tell PostgreSQL its events were delivered.
    txs = pg.probe_transactions(probe, ctx.table)
    k = [t["event_ids"] for t in txs].index(first_unpublished)
    assert cf is not None and cf < txs[k]["end_lsn"], \
        f"confirmed_flush_lsn {lsn_text(cf or 0)} reaches into the unpublished transaction " \
        f"ending at {lsn_text(txs[k]['end_lsn'])}"
    # ... while everything published before the outage is confirmed.
    assert cf >= txs[k - 1]["end_lsn"], \
        f"confirmed_flush_lsn {lsn_text(cf or 0)} is behind the last published transaction"

    nats.start()
    total = len(w.event_ids)
    js.wait_count(ctx.stream, total, 90)
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)
    assert relay.running and relay.runs == 1, "the relay was restarted"
    wait_until(lambda: (pg.confirmed_flush(ctx.slot) or 0) >= txs[-1]["end_lsn"], 30,
               "the slot to confirm the last transaction after the outage")


@pytest.mark.timeout(180)
def test_sigterm_during_a_burst_confirms_exactly_what_was_acked(ctx, pg, js):
    ctx.setup()
    probe = ctx.create_probe()
    relay = ctx.start_relay()
    w = ctx.writer(seed=6)
    n = 20_000
    w.start_background(random_sizes(n, 1, 30, w.rng), pause=0.001)
    js.wait_count(ctx.stream, n // 3, 90)

    relay.send_signal(signal.SIGTERM)
    rc = relay.wait(5)
    assert rc == 0, f"relay exited with {rc} after SIGTERM"
    m = re.search(r"shutting down: confirmed ([0-9A-Fa-f]+/[0-9A-Fa-f]+)", relay.logs())
    assert m, "no 'shutting down: confirmed X/X' in the log"
    logged = lsn_int(m.group(1))

    w.wait(120)
    cf = pg.confirmed_flush(ctx.slot)
    txs = pg.probe_transactions(probe, ctx.table)
    assert [t["event_ids"] for t in txs] == w.transactions, "probe slot disagrees with the writer"
    in_stream = set(js.msg_ids(ctx.stream))
    t_last = -1
    for k, t in enumerate(txs):
        if not all(e in in_stream for e in t["event_ids"]):
            break
        t_last = k
    assert t_last >= 0, "not even the first transaction reached the stream"
    print(f"{len(in_stream)} events in the stream; transaction {t_last} of {len(txs)} is the last complete one, "
          f"ends at {lsn_text(txs[t_last]['end_lsn'])}; confirmed_flush_lsn {lsn_text(cf)}; logged {lsn_text(logged)}")
    assert txs[t_last]["end_lsn"] <= cf, \
        (f"confirmed_flush_lsn {lsn_text(cf)} is before the end {lsn_text(txs[t_last]['end_lsn'])} "
         f"of transaction {t_last}, the last one completely in the stream")
    if t_last + 1 < len(txs):
        assert cf < txs[t_last + 1]["end_lsn"], \
            (f"confirmed_flush_lsn {lsn_text(cf)} reaches the end {lsn_text(txs[t_last + 1]['end_lsn'])} "
             f"of transaction {t_last + 1}, which is not completely in the stream")
    assert logged == cf, f"logged {lsn_text(logged)} but the slot says {lsn_text(cf)}"
    pg.drop_slot(probe)

    relay.start()
    relay.wait_streaming(timeout=30)
    js.wait_count(ctx.stream, n, 120)
    assert_exactly_once_in_order(js.dump(ctx.stream), w.event_ids)


@pytest.mark.timeout(300)
def test_mixed_workload_with_a_dead_letter_then_a_clean_stop(ctx, pg, js):
    """The run scripts/test also repeats under valgrind (OUTBOXD_RELAY_WRAPPER): events, a
    dead letter, acknowledgements, a checkpoint, then SIGTERM and exit 0 with nothing leaked."""
    ctx.setup()
    relay = ctx.start_relay("--status-interval=1s", "--checkpoint-interval=200ms", timeout=120)
    w = ctx.writer(seed=8)
    w.write(random_sizes(2_000, 1, 30, w.rng))
    big = w.make_event(payload='{"pad": "' + "x" * 2_000_000 + '"}')  # over max_payload
    w.insert_txn([big])
    after = w.insert_txn(n=3)
    wait_for_ids(js, ctx.stream, after, 120, "the events after the dead letter")
    msgs = js.dump(ctx.stream)
    assert [m["headers"]["Nats-Msg-Id"] for m in msgs if m["subject"] != "outbox.dead_letter"] == \
        [e for e in w.event_ids if e != big["event_id"]]
    dead = [m for m in msgs if m["subject"] == "outbox.dead_letter"]
    assert len(dead) == 1 and dead[0]["headers"]["Outbox-Dead-Letter-Reason"] == "too_large"
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(120) == 0, relay.logs()[-3000:]
