"""The escape hatches: bookmarks and `outboxd rewind` (going back in the WAL), `outboxd replay`
(publishing rows still in the table again) and `outboxd slot ...` (listing, creating, dropping and
skipping forward), with the refusals that keep them from hurting a running relay."""

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import time

import pytest

from harness import clean_env, lsn_int, lsn_text, parse_rfc3339, relay_bin, wait_until

SUMMARY_RE = re.compile(r"replayed (\d+) events \((\d+) duplicates\) in [0-9.]+ s")

POISON_TABLE = """CREATE TABLE {t} (
    event_id text, aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL,
    payload jsonb, occurred_at timestamptz NOT NULL DEFAULT now(), schema_version int NOT NULL DEFAULT 1,
    trace_id text)"""


def outboxd(ctx, *args, timeout=90, slot=None):
    """Runs `outboxd ARGS` with this test's settings; returns the CompletedProcess (text)."""
    wrapper = shlex.split(os.environ.get("OUTBOXD_RELAY_WRAPPER", ""))
    cmd = [*wrapper, str(relay_bin()), *args, f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}",
           f"--slot={slot or ctx.slot}", f"--publication={ctx.publication}", f"--table={ctx.table}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(),
                          stdin=subprocess.DEVNULL)


def check(r, code=0):
    assert r.returncode == code, f"exit {r.returncode}, wanted {code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def bookmarks(pg, slot):
    """The slot's complete bookmarks: [(unix seconds, name, confirmed LSN as int)], oldest first."""
    rows = pg.sql("SELECT slot_name, confirmed_flush_lsn::text FROM pg_replication_slots "
                  "WHERE starts_with(slot_name::text, %s)", slot + "_bm_")
    out = []
    for name, confirmed in rows:
        suffix = name[len(slot) + 4:]
        if suffix.isdigit() and confirmed is not None:  # None: being made right now
            out.append((int(suffix), name, lsn_int(confirmed)))
    return sorted(out)


def settled_counts(relay, want_confirmed):
    """Waits until the relay confirmed want_confirmed; returns (published, duplicates)."""
    def caught_up():
        m = relay.metrics()
        return m["outboxd_confirmed_lsn"] >= want_confirmed and m["outboxd_in_flight_events"] == 0 and m

    m = wait_until(caught_up, 60, f"the relay to confirm {lsn_text(want_confirmed)}",
                   detail=lambda: relay.metrics())
    return int(m["outboxd_events_published_total"]), int(m["outboxd_events_duplicate_total"])


def commit_lsns(js, stream, ids):
    """{event_id: Outbox-Commit-Lsn as int} for the stream's messages with those ids."""
    want = set(ids)
    return {m["headers"]["Nats-Msg-Id"]: lsn_int(m["headers"]["Outbox-Commit-Lsn"])
            for m in js.dump(stream) if m["headers"].get("Nats-Msg-Id") in want}


@pytest.mark.timeout(240)
def test_rewind_to_a_time_or_an_lsn_publishes_exactly_what_committed_after_it(ctx, pg, js):
    try:
        ctx.setup()
        probe = ctx.create_probe()
        relay = ctx.start_relay("--bookmark-every=1s", "--bookmark-keep=1h", "--status-interval=500ms")
        relay.wait_for_log("bookmarking slot")
        w = ctx.writer(seed=5)
        burst1 = w.write([3, 1, 4])
        js.wait_count(ctx.stream, len(burst1), 60)
        end1 = pg.probe_transactions(probe, ctx.table)[-1]["end_lsn"]

        # A bookmark whose position is past burst 1; its name says by when that position was taken.
        def bookmark_after_burst1():
            return next(((t, name) for t, name, confirmed in bookmarks(pg, ctx.slot) if confirmed >= end1), None)

        bm_time, bm_name = wait_until(bookmark_after_burst1, 30, "a bookmark taken after burst 1 was confirmed")
        wait_until(lambda: time.time() >= bm_time + 0.01, 5, "the wall clock to pass the bookmark's time")
        target = dt.datetime.now(dt.timezone.utc)

        # Burst 2, with rows deleted again in the transaction that inserted them: the WAL keeps them.
        burst2 = w.write([2, 5])
        gone = [w.make_event() for _ in range(3)]
        w.insert_txn(gone, before_commit=lambda cur: cur.execute(
            f"DELETE FROM {ctx.table} WHERE event_id = ANY(%s::uuid[])", ([e["event_id"] for e in gone],)))
        burst2 += [e["event_id"] for e in gone]
        burst2 += w.write([1])
        assert pg.scalar(f"SELECT count(*) FROM {ctx.table} WHERE event_id = ANY(%s::uuid[])",
                         [e["event_id"] for e in gone]) == 0
        js.wait_count(ctx.stream, len(burst1) + len(burst2), 60)
        assert js.msg_ids(ctx.stream) == burst1 + burst2
        end2 = pg.probe_transactions(probe, ctx.table)[-1]["end_lsn"]
        settled_counts(relay, end2)
        assert relay.stop() == 0

        listed = json.loads(check(outboxd(ctx, "slot", "list", "--json")).stdout)
        marked = [s for s in listed if s["bookmark_of"] == ctx.slot]
        assert bm_name in {s["name"] for s in marked}
        assert [s for s in listed if s["name"] == ctx.slot][0]["relay_slot"] is True

        # Without --yes: the plan, exit 2, nothing changed.
        before = pg.confirmed_flush(ctx.slot)
        plan = check(outboxd(ctx, "rewind", f"--to={target.isoformat()}"), 2)
        assert "would copy the bookmark" in plan.stdout and "--yes" in plan.stdout
        assert pg.confirmed_flush(ctx.slot) == before
        first_commit = min(commit_lsns(js, ctx.stream, burst2).values())
        assert f"commit LSN {lsn_text(first_commit)}" in plan.stdout, plan.stdout

        done = check(outboxd(ctx, "rewind", f"--to={target.isoformat()}", "--yes"))
        assert f"rewound slot \"{ctx.slot}\" to {lsn_text(first_commit)}" in done.stdout, done.stdout
        assert pg.confirmed_flush(ctx.slot) == first_commit
        assert not [s for s in pg.sql("SELECT slot_name FROM pg_replication_slots") if "_rw_" in s[0]]

        # The stream holds burst 2: with --strict-order its last event says so, and nothing is
        # sent again (nothing depends on the duplicate window).
        relay.start()
        assert relay.wait_streaming() == first_commit
        published, duplicates = settled_counts(relay, end2)
        assert (published, duplicates) == (0, 0)
        assert relay.metrics()["outboxd_events_already_stored_total"] == len(burst2)
        assert js.msg_ids(ctx.stream) == burst1 + burst2

        # By LSN: from the commit of burst 2's second transaction on, after the stream lost those
        # events (as if restored from a snapshot taken before them): they are sent again.
        assert relay.stop() == 0
        lsns = commit_lsns(js, ctx.stream, burst2)
        second = sorted(set(lsns.values()))[1]
        again = [e for e in burst2 if lsns[e] >= second]
        for m in js.dump(ctx.stream):
            if m["headers"]["Nats-Msg-Id"] in again:
                js.run("request", "--subject=$JS.API.STREAM.MSG.DELETE." + ctx.stream,
                       f"--data={json.dumps({'seq': m['seq']})}")
        check(outboxd(ctx, "rewind", f"--to={lsn_text(second)}", "--yes"))
        assert pg.confirmed_flush(ctx.slot) == second
        relay.start()
        assert relay.wait_streaming() == second
        published, duplicates = settled_counts(relay, end2)
        # Sent again, every one: JetStream's duplicate map still remembers the deleted messages'
        # ids (a real restore forgets them), so it answers for them as duplicates, and outboxd
        # says that they were not stored.
        assert published + duplicates == len(again)
        assert relay.metrics()["outboxd_events_already_stored_total"] == 0
        assert duplicates == 0 or "was not stored" in relay.logs()

        # Bookmarks hold WAL: they can be dropped alone, also while the relay runs.
        plan = check(outboxd(ctx, "slot", "drop", "--bookmarks-only"), 2)
        assert "would drop" in plan.stdout and "would drop replication slot" not in plan.stdout
        assert relay.stop() == 0
        r = check(outboxd(ctx, "slot", "drop", "--bookmarks-only", "--yes"))
        assert re.search(r"dropped (\d+) of \1 bookmarks", r.stdout), r.stdout
        assert bookmarks(pg, ctx.slot) == [] and pg.slot(ctx.slot) is not None

        # A slot name that leaves no room for the bookmark suffix is refused at start.
        long_slot = "s" * 50
        rc, log = ctx.relay("--bookmark-every=1s", slot=long_slot, name="long").run_to_exit(30)
        assert rc == 2 and "too long to name its bookmarks" in log, log
    finally:
        # Bookmarks are slots too: stop the relay so it makes no more, then let ctx drop them.
        for r in ctx.relays:
            r.kill()
        ctx.slots.update(n for (n,) in pg.sql("SELECT slot_name FROM pg_replication_slots "
                                              "WHERE starts_with(slot_name::text, %s)", ctx.slot + "_"))


def insert_rows(pg, table, rows):
    """Inserts (event_id, aggregate_id, event_type, occurred_at, payload) rows in one transaction."""
    conn = pg.connect(autocommit=False)
    try:
        with conn.cursor() as cur:
            for eid, agg, etype, at, payload in rows:
                cur.execute(f"INSERT INTO {table} (event_id, aggregate_type, aggregate_id, event_type, "
                            "occurred_at, payload) VALUES (%s, 'order', %s, %s, %s, %s)",
                            (eid, agg, etype, at, json.dumps(payload)))
        conn.commit()
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_replay_from_the_table_by_time_and_aggregate(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay()
    w = ctx.writer(seed=9)
    base = dt.datetime(2026, 1, 2, 3, 0, tzinfo=dt.timezone.utc)
    rows = []
    for i in range(12):
        eid = w.make_event()["event_id"]
        rows.append((eid, "agg-A" if i % 3 == 0 else f"agg-{i}", "shipped" if i % 2 else "created",
                     base + dt.timedelta(minutes=i), {"i": i, "x": "\u00fc"}))
    insert_rows(pg, ctx.table, rows[:6])
    insert_rows(pg, ctx.table, rows[6:])
    js.wait_count(ctx.stream, 12, 60)
    original = {m["headers"]["Nats-Msg-Id"]: m for m in js.dump(ctx.stream)}
    since, until = (base + dt.timedelta(minutes=3)).isoformat(), (base + dt.timedelta(minutes=8)).isoformat()

    # --dry-run counts and publishes nothing.
    r = check(outboxd(ctx, "replay", f"--since={since}", f"--until={until}", "--dry-run"))
    assert "would replay 5 events" in r.stdout, r.stdout
    r = check(outboxd(ctx, "replay", "--aggregate-id=agg-A", "--event-type=created", "--dry-run"))
    assert "would replay 2 events" in r.stdout, r.stdout  # rows 0 and 6

    # Default ids: every event is still in the duplicate window, so the stream gains nothing.
    r = check(outboxd(ctx, "replay", f"--since={since}", f"--until={until}"))
    m = SUMMARY_RE.search(r.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (5, 5), r.stdout
    assert "--new-ids" in r.stdout  # the hint that everything was dropped as a duplicate
    assert js.count(ctx.stream) == 12

    # --new-ids: the stream gains exactly the aggregate's rows, in occurred_at order, marked.
    started = time.time()
    r = check(outboxd(ctx, "replay", "--aggregate-id=agg-A", "--new-ids", "--rate=100"))
    agg = [r_[0] for r_ in rows if r_[1] == "agg-A"]
    m = SUMMARY_RE.search(r.stdout)
    assert m and (int(m.group(1)), int(m.group(2))) == (len(agg), 0), r.stdout
    msgs = js.dump(ctx.stream)
    assert len(msgs) == 12 + len(agg)
    new = msgs[12:]
    assert [x["headers"]["Outbox-Event-Id"] for x in new] == agg
    for x, eid in zip(new, agg):
        h, orig = x["headers"], original[eid]
        mid = re.fullmatch(re.escape(eid) + r":replay:(\d+)", h["Nats-Msg-Id"])
        assert mid and abs(int(mid.group(1)) - started) < 60, h["Nats-Msg-Id"]
        assert abs(parse_rfc3339(h["Outbox-Replay"]).timestamp() - started) < 60
        assert x["subject"] == orig["subject"] and x["data"] == orig["data"]
        for k in ("Outbox-Event-Type", "Outbox-Aggregate-Id", "Outbox-Occurred-At"):
            assert h[k] == orig["headers"][k]
    # --rate: 12 events at 10/s take more than a second.
    t0 = time.monotonic()
    r = check(outboxd(ctx, "replay", "--rate=10"))
    assert SUMMARY_RE.search(r.stdout).group(1) == "12" and time.monotonic() - t0 >= 1.1

    # A bad time is a usage error.
    r = check(outboxd(ctx, "replay", "--since=yesterday-ish"), 2)
    assert "invalid --since" in r.stderr and "invalid input syntax" in r.stderr, r.stderr

    # The running relay keeps going: its order chain continues after the foreign messages.
    after = w.insert_txn(n=2)
    wait_until(lambda: set(after) <= set(js.msg_ids(ctx.stream)), 30, "the events written after the replay")
    assert js.msg_ids(ctx.stream)[-2:] == after
    assert relay.running
    assert "did not write" in relay.logs()


@pytest.mark.timeout(180)
def test_slot_advance_past_a_poison_event(ctx, pg, js):
    pg.sql(POISON_TABLE.format(t=ctx.table))
    ctx.tables.add(ctx.table)
    ctx.add_stream()
    probe = ctx.create_probe()
    relay = ctx.start_relay("--on-poison=stop", "--status-interval=500ms")
    conn = pg.connect(autocommit=False)

    def row(event_id):
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {ctx.table} (event_id, aggregate_type, aggregate_id, event_type, payload) "
                        "VALUES (%s, 'order', '1', 'created', '{\"n\": 1}')", (event_id,))
        conn.commit()

    row("good-1")
    wait_until(lambda: js.msg_ids(ctx.stream) == ["good-1"], 30, "the first event")
    # The relay stops at once on the poison row: let it confirm good-1 first, so that skipping
    # everything up to the poison row's commit skips only the poison row's transaction.
    end1 = pg.probe_transactions(probe, ctx.table)[-1]["end_lsn"]
    wait_until(lambda: pg.confirmed_flush(ctx.slot) >= end1, 30, "the first event to be confirmed")
    row(None)
    row("good-2")
    assert relay.wait(30) == 1
    m = re.search(r"transaction committed at ([0-9A-F]+/[0-9A-F]+)", relay.logs())
    assert m, relay.logs()[-2000:]
    commit = m.group(1)

    plan = check(outboxd(ctx, "slot", "advance", f"--past-commit={commit}"), 2)
    assert "1 transaction with 1 outbox row" in plan.stdout, plan.stdout
    assert lsn_text(lsn_int(commit) + 1) in plan.stdout
    done = check(outboxd(ctx, "slot", "advance", f"--past-commit={commit}", "--yes"))
    assert f"to {lsn_text(lsn_int(commit) + 1)}" in done.stdout, done.stdout
    assert pg.confirmed_flush(ctx.slot) == lsn_int(commit) + 1

    again = ctx.relay("--on-poison=stop", name="after-advance").start()
    again.wait_streaming()
    wait_until(lambda: "good-2" in js.msg_ids(ctx.stream), 30, "the event after the poison")
    assert js.msg_ids(ctx.stream) == ["good-1", "good-2"]
    assert again.running


@pytest.mark.timeout(180)
def test_slot_list_create_drop_and_refusals(ctx, pg, js):
    ctx.setup()
    r = check(outboxd(ctx, "slot", "create"))
    assert f'created publication "{ctx.publication}"' in r.stdout
    assert f'created replication slot "{ctx.slot}"' in r.stdout
    assert pg.slot(ctx.slot)["plugin"] == "pgoutput"
    r = check(outboxd(ctx, "slot", "create"))
    assert "already there" in r.stdout and "created" not in r.stdout
    r = check(outboxd(ctx, "slot", "list"))
    line = next(x for x in r.stdout.splitlines() if x.startswith(ctx.slot + " "))
    assert "pgoutput" in line and "the relay's slot" in line

    relay = ctx.start_relay()
    pid = wait_until(lambda: pg.slot(ctx.slot)["active_pid"], 10, "the slot to be held")
    r = check(outboxd(ctx, "slot", "list"))
    assert f"PID {pid}" in r.stdout
    for args in (("slot", "drop", "--yes"), ("slot", "advance", "--to=FF/0", "--yes"),
                 ("rewind", "--to=0/1", "--yes")):
        r = check(outboxd(ctx, *args), 1)
        assert f"held by PID {pid}" in r.stderr, (args, r.stderr)
    assert pg.slot(ctx.slot) is not None
    w = ctx.writer(seed=3)
    ids = w.insert_txn(n=2)
    wait_until(lambda: js.msg_ids(ctx.stream) == ids, 30, "events while the commands were refused")
    assert relay.stop() == 0

    confirmed = pg.confirmed_flush(ctx.slot)
    r = check(outboxd(ctx, "slot", "advance", "--to=0/1", "--yes"), 1)
    assert "cannot move backwards" in r.stderr
    r = check(outboxd(ctx, "slot", "advance", f"--to={lsn_text(confirmed)}"))
    assert "nothing to skip" in r.stdout
    r = check(outboxd(ctx, "rewind", "--to=0/1", "--yes"), 1)
    assert "no bookmark" in r.stderr
    assert pg.confirmed_flush(ctx.slot) == confirmed

    check(outboxd(ctx, "slot"), 2)
    check(outboxd(ctx, "slot", "advance", "--yes"), 2)
    check(outboxd(ctx, "slot", "advance", "--to=nonsense"), 2)
    check(outboxd(ctx, "rewind"), 2)
    r = check(outboxd(ctx, "rewind", "--to=not a time"), 2)
    assert "invalid time" in r.stderr
    r = check(outboxd(ctx, "slot", "create", "--bookmark-every=1s", slot="b" * 50), 2)
    assert "too long" in r.stderr

    r = check(outboxd(ctx, "slot", "drop"), 2)
    assert "would drop" in r.stdout and pg.slot(ctx.slot) is not None
    r = check(outboxd(ctx, "slot", "drop", "--yes"))
    assert f'dropped replication slot "{ctx.slot}"' in r.stdout
    assert pg.slot(ctx.slot) is None
    r = check(outboxd(ctx, "slot", "drop", "--yes"), 1)
    assert "does not exist" in r.stderr
