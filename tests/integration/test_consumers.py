"""Consumer lag: /metrics and `outboxd status` report, per durable consumer of the stream, the
events it has not acknowledged and how long ago the oldest of them was committed; and the
recipe for the consumer side in docs/consumers.md (idempotency per event id) does what it says."""

import json
import subprocess
import time

import pytest

from harness import clean_env, parse_rfc3339, relay_bin, wait_until

PENDING = "outboxd_consumer_pending_events"
ACK_PENDING = "outboxd_consumer_ack_pending_events"
AGE = "outboxd_consumer_oldest_unprocessed_age_seconds"


def key(metric, consumer, stream="OUTBOX"):
    return f'{metric}{{stream="{stream}",consumer="{consumer}"}}'


def add_consumer(js, name, filter=None, deliver="all"):
    args = ["add-consumer", "--stream=OUTBOX", f"--consumer={name}", f"--deliver={deliver}"]
    if filter:
        args.append(f"--filter={filter}")
    js.run(*args)


def fetch(js, name, batch=1, ack=False):
    args = ["fetch", "--stream=OUTBOX", f"--consumer={name}", f"--batch={batch}"]
    if ack:
        args.append("--ack")
    return [json.loads(line) for line in js.run(*args).stdout.splitlines()]


def commit_time(msg):
    return parse_rfc3339(msg["headers"]["Outbox-Commit-Time"]).timestamp()


def wait_metric(relay, name, want, timeout=20):
    """Waits until metric name has value want (None: is absent); returns the last scrape."""
    last = {}

    def ok():
        last.update(m=relay.metrics())
        return last["m"].get(name) == want

    wait_until(ok, timeout, f"{name} to be {want}",
               detail=lambda: f"it is {last['m'].get(name)}; consumer lines: "
                              f"{ {k: v for k, v in last['m'].items() if 'consumer' in k} }")
    return last["m"]


def later_than(seconds):
    """A deadline-bounded poll for the clock, to put a measurable gap between two commits."""
    t = time.time() + seconds
    wait_until(lambda: time.time() >= t, seconds + 5, f"{seconds} s to pass")


@pytest.mark.timeout(120)
def test_a_consumer_that_does_not_acknowledge_shows_pending_and_a_rising_age(ctx, js):
    ctx.setup()
    add_consumer(js, "search")
    relay = ctx.start_relay("--consumer-interval=1s")
    wait_metric(relay, key(PENDING, "search"), 0)
    assert relay.metrics()[key(AGE, "search")] == 0

    ctx.writer(seed=171).insert_txn(n=5)
    js.wait_count(ctx.stream, 5, 30)
    first = js.dump(ctx.stream)[0]
    taken = fetch(js, "search", batch=2)          # delivered, not acknowledged
    assert [m["seq"] for m in taken] == [1, 2]
    m = wait_metric(relay, key(ACK_PENDING, "search"), 2)
    assert m[key(PENDING, "search")] == 5
    age1 = m[key(AGE, "search")]
    assert abs((time.time() - commit_time(first)) - age1) < 3, (age1, first["headers"])
    # Nothing moves: the age keeps rising with the clock, between refreshes too.
    wait_until(lambda: relay.metrics()[key(AGE, "search")] >= age1 + 1.5, 10, "the age to rise")

    # It acknowledges everything: both fall to 0.
    for t in taken:
        js.run("ack", f"--reply={t['reply']}")
    assert len(fetch(js, "search", batch=10, ack=True)) == 3
    m = wait_metric(relay, key(PENDING, "search"), 0)
    assert m[key(AGE, "search")] == 0 and m[key(ACK_PENDING, "search")] == 0
    assert m["outboxd_consumer_refresh_errors_total"] == 0
    assert m["outboxd_consumer_refresh_timestamp_seconds"] > time.time() - 10


@pytest.mark.timeout(120)
def test_consumers_added_or_deleted_while_running_appear_and_disappear(ctx, js):
    ctx.setup()
    relay = ctx.start_relay("--consumer-interval=1s")
    ctx.writer(seed=172).insert_txn(n=3)
    js.wait_count(ctx.stream, 3, 30)
    wait_metric(relay, "outboxd_consumer_refresh_errors_total", 0)
    assert not [k for k in relay.metrics() if k.startswith(PENDING)]

    add_consumer(js, 'billing"x')   # a name that needs escaping in a label value
    add_consumer(js, "audit")
    label = 'billing\\"x'
    m = wait_metric(relay, f'{PENDING}{{stream="OUTBOX",consumer="{label}"}}', 3)
    assert m[key(PENDING, "audit")] == 3
    js.run("delete-consumer", "--stream=OUTBOX", '--consumer=billing"x')
    m = wait_metric(relay, f'{PENDING}{{stream="OUTBOX",consumer="{label}"}}', None)
    assert not [k for k in m if label in k]
    assert m[key(PENDING, "audit")] == 3


@pytest.mark.timeout(120)
def test_a_filtered_consumer_counts_only_its_subjects(ctx, js):
    ctx.setup()
    add_consumer(js, "orders", filter="outbox.order.>")
    add_consumer(js, "everything")
    relay = ctx.start_relay("--consumer-interval=1s")
    w = ctx.writer(seed=173)
    w.insert_txn([w.make_event(aggregate_type="customer", event_type="created") for _ in range(4)])
    js.wait_count(ctx.stream, 4, 30)
    later_than(3)
    w.insert_txn([w.make_event(aggregate_type="order", event_type="created") for _ in range(2)])
    js.wait_count(ctx.stream, 6, 30)
    msgs = js.dump(ctx.stream)
    customer_commit, order_commit = commit_time(msgs[0]), commit_time(msgs[4])
    assert order_commit - customer_commit >= 2.5

    m = wait_metric(relay, key(PENDING, "orders"), 2)
    assert m[key(PENDING, "everything")] == 6
    now = time.time()
    # The oldest unprocessed event of "orders" is the first order, not the stream's first message.
    assert abs(m[key(AGE, "orders")] - (now - order_commit)) < 2, m
    assert abs(m[key(AGE, "everything")] - (now - customer_commit)) < 2, m


@pytest.mark.timeout(120)
def test_a_consumer_starting_later_that_never_acknowledged_is_measured_from_its_own_start(ctx, js):
    # nats-server reports ack floor 0 for a consumer that never acknowledged, also when it
    # started after the stream's first message: message 1 is not its oldest unprocessed.
    ctx.setup()
    relay = ctx.start_relay("--consumer-interval=1s")
    w = ctx.writer(seed=174)
    w.insert_txn(n=3)
    js.wait_count(ctx.stream, 3, 30)
    later_than(3)
    add_consumer(js, "late", deliver="new")
    w.insert_txn(n=2)
    js.wait_count(ctx.stream, 5, 30)
    taken = fetch(js, "late", batch=1)            # seq 4, not acknowledged
    assert [t["seq"] for t in taken] == [4]
    m = wait_metric(relay, key(ACK_PENDING, "late"), 1)
    assert m[key(PENDING, "late")] == 2
    own = commit_time(js.dump(ctx.stream)[3])
    assert abs(m[key(AGE, "late")] - (time.time() - own)) < 2, m


@pytest.mark.timeout(120)
def test_the_consumers_setting_limits_the_list_or_turns_it_off_and_status_shows_them(ctx, js):
    ctx.setup()
    for name in ("search", "billing"):
        add_consumer(js, name)
    ctx.writer(seed=175).insert_txn(n=4)
    listed = ctx.start_relay("--consumer-interval=1s", "--consumers=search,gone")
    js.wait_count(ctx.stream, 4, 30)
    m = wait_metric(listed, key(PENDING, "search"), 4)
    assert key(PENDING, "billing") not in m and not [k for k in m if '"gone"' in k]
    off = ctx.start_relay("--consumers=off", name="off", slot="outboxd_off_" + ctx.tag)
    assert not [k for k in off.metrics() if k.startswith("outboxd_consumer_")]
    assert "consumer" not in off.logs()

    fetch(js, "billing", batch=1)
    cmd = [str(relay_bin()), "status", f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}",
           f"--slot={ctx.slot}", f"--table={ctx.table}", f"--publication={ctx.publication}"]
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=60,
                       env=clean_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    got = {c["name"]: c for c in json.loads(r.stdout)["consumers"]}
    assert set(got) == {"search", "billing"}
    assert got["billing"]["pending_events"] == 4 and got["billing"]["ack_pending_events"] == 1
    assert got["search"]["oldest_unprocessed_age_seconds"] > 0
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert 'consumer:   "billing": 4 pending (1 unacknowledged)' in r.stdout, r.stdout


# docs/consumers.md's recipe for the consumer side, word for word (tests/docs/check.py checks that
# the guide shows RECIPE_TABLE as it is here): a processed-events table written in
# the same transaction as the effect, keyed by Outbox-Event-Id when present (copies made by
# `outboxd replay --new-ids`), else Nats-Msg-Id.
RECIPE_TABLE = """CREATE TABLE processed_events (
    consumer     text        NOT NULL,
    event_id     text        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
)"""
RECIPE_CLAIM = """INSERT INTO processed_events (consumer, event_id) VALUES (%s, %s)
ON CONFLICT DO NOTHING"""


def recipe_handle(conn, consumer, msg, effect):
    """Applies effect(cursor, msg) at most once per event; returns whether it ran."""
    h = msg["headers"]
    event_id = h.get("Outbox-Event-Id") or h["Nats-Msg-Id"]
    with conn:                                   # one transaction: claim and effect together
        with conn.cursor() as cur:
            cur.execute(RECIPE_CLAIM, (consumer, event_id))
            if cur.rowcount == 0:
                return False                     # processed before: only acknowledge again
            effect(cur, msg)
            return True


@pytest.mark.timeout(180)
def test_the_readme_consumer_recipe_applies_each_event_once(ctx, pg, js):
    ctx.setup()
    pg.sql("DROP TABLE IF EXISTS processed_events, search_docs")
    pg.sql(RECIPE_TABLE)
    pg.sql("CREATE TABLE search_docs (event_id text, aggregate_id text, indexed_at timestamptz DEFAULT now())")
    add_consumer(js, "search")
    relay = ctx.start_relay("--consumer-interval=1s")
    w = ctx.writer(seed=176)
    events = [w.make_event(aggregate_id=f"recipe-{i}") for i in range(3)]
    w.insert_txn(events)
    js.wait_count(ctx.stream, 3, 30)
    conn = pg.connect(autocommit=False)

    def index(cur, msg):
        cur.execute("INSERT INTO search_docs (event_id, aggregate_id) VALUES (%s, %s)",
                    (msg["headers"].get("Outbox-Event-Id") or msg["headers"]["Nats-Msg-Id"],
                     msg["headers"]["Outbox-Aggregate-Id"]))

    def consume(n):
        ran = []
        while len(ran) < n:
            got = fetch(js, "search", batch=n - len(ran))
            for m in got:
                ran.append(recipe_handle(conn, "search", m, index))
                js.run("ack", f"--reply={m['reply']}")   # after the commit, never before
        return ran

    try:
        # First delivery, but the acknowledgement is lost (the worker crashed after COMMIT):
        # JetStream delivers the event again and the recipe skips it.
        first = fetch(js, "search", batch=1)[0]
        assert recipe_handle(conn, "search", first, index) is True
        js.run("ack", f"--reply={first['reply']}", "--nak")
        assert sorted(consume(3)) == [False, True, True]
        # A replayed copy with a new Nats-Msg-Id still carries the event's id: skipped too.
        r = subprocess.run([str(relay_bin()), "replay", "--aggregate-id=recipe-1", "--new-ids",
                            f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}", f"--slot={ctx.slot}",
                            f"--publication={ctx.publication}", f"--table={ctx.table}"],
                           capture_output=True, text=True, timeout=60, env=clean_env(),
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        js.wait_count(ctx.stream, 4, 30)
        copy = js.dump(ctx.stream)[3]["headers"]
        assert copy["Nats-Msg-Id"] != events[1]["event_id"] and copy["Outbox-Event-Id"] == events[1]["event_id"]
        assert consume(1) == [False]
        rows = pg.sql("SELECT event_id, count(*) FROM search_docs GROUP BY event_id ORDER BY 1")
        assert rows == sorted((e["event_id"], 1) for e in events)
        assert pg.scalar("SELECT count(*) FROM processed_events") == 3
        # And the consumer shows as caught up.
        wait_metric(relay, key(PENDING, "search"), 0)
    finally:
        conn.close()
        pg.sql("DROP TABLE IF EXISTS processed_events, search_docs")
