"""Outbox shapes and routing: column mapping (the Debezium preset), payload types byte for byte,
extra headers, envelope bodies, several tables in one slot, per-aggregate subjects, and the
table-less outbox (transactional logical decoding messages)."""

import json
import uuid

import pytest

from harness import subject_token, wait_until


def table_name(ctx, suffix):
    name = f"public.{suffix}_{ctx.tag}"
    ctx.tables.add(name)
    return name


@pytest.mark.timeout(120)
def test_debezium_table_relayed_unchanged_with_the_preset(ctx, pg, js):
    table = table_name(ctx, "outboxevent")
    pg.sql(f"""CREATE TABLE {table} (
                   id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
                   aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb,
                   tenant text, created_at timestamptz NOT NULL DEFAULT now())""")
    ctx.add_stream()
    relay = ctx.start_relay("--columns=debezium", "--subject=outbox.event.{aggregate_type}.{event_type}",
                            "--header=tenant:Tenant-Id", "--column-occurred-at=created_at", table=table)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (id, aggregatetype, aggregateid, type, payload, tenant) VALUES "
                    "(%s, 'Order', 'o-1', 'OrderCreated', '{\"total\": 10}', 'acme'), "
                    "(%s, 'Order', 'o.2', 'OrderPaid', '[1, 2]', NULL), "
                    "(%s, 'Customer', 'c-1', 'CustomerMoved', '\"text\"', 'acme')", ids)
        conn.commit()
    js.wait_count(ctx.stream, 3, 30)
    msgs = js.dump(ctx.stream)
    assert [m["headers"]["Nats-Msg-Id"] for m in msgs] == ids
    assert [m["subject"] for m in msgs] == ["outbox.event.Order.OrderCreated", "outbox.event.Order.OrderPaid",
                                            "outbox.event.Customer.CustomerMoved"]
    assert [m["data"] for m in msgs] == [b'{"total": 10}', b"[1, 2]", b'"text"']
    assert msgs[1]["headers"]["Outbox-Aggregate-Id"] == "o.2"
    assert msgs[0]["headers"]["Outbox-Event-Type"] == "OrderCreated"
    assert msgs[0]["headers"]["Tenant-Id"] == "acme"
    assert "Tenant-Id" not in msgs[1]["headers"], "a NULL column gets no header"
    assert msgs[0]["headers"]["Outbox-Occurred-At"].endswith("Z")
    assert relay.running


@pytest.mark.timeout(120)
def test_a_debezium_table_without_the_preset_is_refused_with_the_fix(ctx, pg, js):
    table = table_name(ctx, "outboxevent")
    pg.sql(f"CREATE TABLE {table} (id uuid PRIMARY KEY, aggregatetype text, aggregateid text, type text, "
           "payload jsonb)")
    ctx.add_stream()
    rc, log = ctx.relay(table=table).run_to_exit(timeout=30)
    assert rc == 3, log
    assert 'has no column "event_id"' in log and "--column-event-id" in log, log


@pytest.mark.timeout(120)
def test_each_payload_type_arrives_byte_for_byte(ctx, pg, js):
    ctx.add_stream()
    kinds = {
        "json": ("json", '{"b": 1,   "a": [true, null]}', b'{"b": 1,   "a": [true, null]}'),
        "jsonb": ("jsonb", '{"b": 1,   "a": [true, null]}', b'{"a": [true, null], "b": 1}'),
        "text": ("text", "plain text \u00e9\n\ttabs", "plain text \u00e9\n\ttabs".encode()),
    }
    tables = {}
    for kind, (sqltype, _, _) in kinds.items():
        t = table_name(ctx, f"outbox_{kind}")
        pg.sql(f"CREATE TABLE {t} (event_id text PRIMARY KEY, aggregate_type text, event_type text, "
               f"payload {sqltype})")
        tables[kind] = t
    t = table_name(ctx, "outbox_bytea")
    pg.sql(f"CREATE TABLE {t} (event_id text PRIMARY KEY, aggregate_type text, event_type text, payload bytea)")
    tables["bytea"] = t
    binary = bytes(range(256)) + b"\x00\x00end"

    conf = ctx.dir / "tables.conf"
    conf.write_text("".join(f"[table {t}]\nsubject = outbox.{kind}.{{event_id}}\n" for kind, t in tables.items()))
    relay = ctx.start_relay(f"--config={conf}", table=None)
    with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
        for kind, (_, value, _) in kinds.items():
            cur.execute(f"INSERT INTO {tables[kind]} VALUES (%s, 'a', 'e', %s)", (f"id-{kind}", value))
        cur.execute(f"INSERT INTO {tables['bytea']} VALUES ('id-bytea', 'a', 'e', %s)", (binary,))
        conn.commit()
    js.wait_count(ctx.stream, 4, 30)
    msgs = {m["headers"]["Nats-Msg-Id"]: m for m in js.dump(ctx.stream)}
    for kind, (_, _, want) in kinds.items():
        assert msgs[f"id-{kind}"]["data"] == want, kind
        assert msgs[f"id-{kind}"]["subject"] == f"outbox.{kind}.id-{kind}"
    assert msgs["id-bytea"]["data"] == binary
    assert relay.running


@pytest.mark.timeout(120)
def test_two_tables_with_own_templates_arrive_in_commit_order(ctx, pg, js):
    orders, billing = table_name(ctx, "orders_outbox"), table_name(ctx, "billing_outbox")
    for t in (orders, billing):
        pg.sql(f"CREATE TABLE {t} (event_id text PRIMARY KEY, aggregate_type text, aggregate_id text, "
               "event_type text, payload jsonb, occurred_at timestamptz DEFAULT now())")
    ctx.add_stream()
    conf = ctx.dir / "two.conf"
    conf.write_text(f"# routed per aggregate\n[table {orders}]\nsubject = outbox.orders.{{aggregate_id}}\n"
                    f"[table {billing}]\nsubject = outbox.billing.{{event_type}}\nbody = envelope\n")
    relay = ctx.start_relay(f"--config={conf}", table=None)
    expected = []
    with pg.connect(autocommit=False) as a, pg.connect(autocommit=False) as b:
        ca, cb = a.cursor(), b.cursor()
        for k in range(20):
            # Interleaved statements in two sessions; commit order decides.
            ca.execute(f"INSERT INTO {orders} VALUES (%s, 'order', %s, 'created', '{{}}')", (f"o{k}", f"a.{k % 3}"))
            cb.execute(f"INSERT INTO {billing} VALUES (%s, 'invoice', 'i', %s, '{{\"n\": {k}}}')",
                       (f"b{k}", f"paid{k % 2}"))
            ca.execute(f"INSERT INTO {billing} VALUES (%s, 'invoice', 'i', 'x', '{{}}')", (f"ob{k}",))
            first, second = (b, a) if k % 2 else (a, b)
            first.commit()
            second.commit()
            order = [[f"o{k}", f"ob{k}"], [f"b{k}"]]
            expected += (order[1] + order[0]) if k % 2 else (order[0] + order[1])
    js.wait_count(ctx.stream, len(expected), 60)
    msgs = js.dump(ctx.stream)
    assert [m["headers"]["Nats-Msg-Id"] for m in msgs] == expected
    by_id = {m["headers"]["Nats-Msg-Id"]: m for m in msgs}
    assert by_id["o4"]["subject"] == f"outbox.orders.{subject_token('a.1')}" == "outbox.orders.a%2E1"
    assert by_id["b3"]["subject"] == "outbox.billing.paid1"
    env = json.loads(by_id["b3"]["data"])
    assert env["event_id"] == "b3" and env["payload"] == {"n": 3} and env["aggregate_type"] == "invoice"
    assert "occurred_at" in env
    assert by_id["o3"]["data"] == b"{}", "the orders table sends its payload column"
    assert relay.running


@pytest.mark.timeout(120)
def test_table_less_events_publish_on_commit_only(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay()
    with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
        # Rolled back: nothing may come out.
        cur.execute("SELECT outbox_emit('rb-1', 'cart', 'c1', 'abandoned', '{\"x\": 1}')")
        conn.rollback()
        # A savepoint rolled back inside a committed transaction: its message goes too.
        cur.execute("SELECT outbox_emit('m-1', 'cart', 'c1', 'created', '{\"items\": [1, 2]}', "
                    "headers => '{\"Tenant-Id\": \"acme\"}', trace_id => 'trace-9')")
        cur.execute("SAVEPOINT s")
        cur.execute("SELECT outbox_emit('rb-2', 'cart', 'c1', 'oops', '{}')")
        cur.execute("ROLLBACK TO SAVEPOINT s")
        cur.execute(f"INSERT INTO {ctx.table} (event_id, aggregate_type, aggregate_id, event_type, payload) "
                    "VALUES (%s, 'cart', 'c1', 'row', '{}')", (str(uuid.uuid4()),))
        cur.execute("SELECT pg_logical_emit_message(true, 'outbox', %s)",
                    (json.dumps({"event_id": "m-2", "aggregate_type": "cart", "event_type": "raw",
                                 "payload": {"big": 12345678901234567890123}}),))
        # Another prefix is not ours.
        cur.execute("SELECT pg_logical_emit_message(true, 'audit', '{\"event_id\": \"no\"}')")
        conn.commit()
        # Non-transactional: refused, whatever the transaction does.
        cur.execute("SELECT pg_logical_emit_message(false, 'outbox', '{\"event_id\": \"nt\", \"payload\": 1}')")
        conn.commit()
    js.wait_count(ctx.stream, 3, 30)
    relay.wait_for_log("ignored a non-transactional message", timeout=30)
    msgs = js.dump(ctx.stream)
    ids = [m["headers"]["Nats-Msg-Id"] for m in msgs]
    assert ids[0] == "m-1" and ids[2] == "m-2" and len(ids) == 3, ids
    m1 = msgs[0]
    assert m1["subject"] == "outbox.cart.created"
    assert json.loads(m1["data"]) == {"items": [1, 2]}
    assert m1["headers"]["Tenant-Id"] == "acme" and m1["headers"]["Outbox-Trace-Id"] == "trace-9"
    assert m1["headers"]["Outbox-Aggregate-Id"] == "c1"
    assert m1["headers"]["Outbox-Commit-Lsn"] == msgs[1]["headers"]["Outbox-Commit-Lsn"], "one transaction"
    assert msgs[2]["data"] == b'{"big": 12345678901234567890123}'
    wait_until(lambda: relay.metrics().get("outboxd_messages_refused_total") == 1, 10,
               "the refused message is counted")
    # Nothing else arrives: the next committed event comes right after.
    pg.sql("SELECT outbox_emit('m-3', 'cart', 'c1', 'done', 'null')")
    pg.sql("SELECT outbox_emit('m-4', 'cart', 'c1', 'done', '1')")
    js.wait_count(ctx.stream, 5, 30)
    msgs = js.dump(ctx.stream)
    assert [m["headers"]["Nats-Msg-Id"] for m in msgs][3:] == ["dlq-m-3", "m-4"], "a null payload is a dead letter"
    assert msgs[3]["headers"]["Outbox-Table"] == "message prefix outbox"
    assert msgs[3]["headers"]["Outbox-Dead-Letter-Reason"] == "null_payload"
    assert relay.running


@pytest.mark.timeout(120)
def test_messages_can_be_turned_off(ctx, pg, js):
    ctx.setup()
    relay = ctx.start_relay("--messages=false")
    pg.sql("SELECT outbox_emit('m-1', 'cart', 'c1', 'created', '{}')")
    pg.sql(f"INSERT INTO {ctx.table} (event_id, aggregate_type, aggregate_id, event_type, payload) "
           "VALUES (%s, 'cart', 'c1', 'row', '{}')", str(uuid.uuid4()))
    js.wait_count(ctx.stream, 1, 30)
    msgs = js.dump(ctx.stream)
    assert [m["headers"]["Outbox-Event-Type"] for m in msgs] == ["row"]
    assert relay.running


@pytest.mark.timeout(120)
def test_partitioned_outbox_is_relayed_under_its_root(ctx, pg, js):
    table = table_name(ctx, "outbox_parted")
    pg.sql(f"""CREATE TABLE {table} (event_id text, aggregate_type text, event_type text, payload jsonb,
                   occurred_at timestamptz NOT NULL) PARTITION BY RANGE (occurred_at)""")
    pg.sql(f"CREATE TABLE {table}_2025 PARTITION OF {table} FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    pg.sql(f"CREATE TABLE {table}_2026 PARTITION OF {table} FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    ctx.add_stream()
    relay = ctx.start_relay(table=table)  # it creates the publication
    with pg.connect(autocommit=False) as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES ('p1', 'a', 'old', '1', '2025-06-01'), "
                    "('p2', 'a', 'new', '2', '2026-06-01')")
        conn.commit()
    js.wait_count(ctx.stream, 2, 30)
    assert [m["headers"]["Nats-Msg-Id"] for m in js.dump(ctx.stream)] == ["p1", "p2"]
    assert relay.running
