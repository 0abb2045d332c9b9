"""`outboxd audit`: the rows committed in a range against the stream, on real servers: a complete
stream, events deleted from it, replays (new ids and same ids), a duplicate stored after the
duplicate window, events stored out of commit order, and a long range (OUTBOXD_AUDIT_ROWS rows,
100000 by default; 1000000 was measured once, see docs/runbooks.md#audit) with its time and
peak memory."""

import datetime as dt
import json
import os
import re
import shlex
import socket
import subprocess
import time
import uuid

import pytest

from conftest import _start_pg
from harness import clean_env, relay_bin

POISON_TABLE = """CREATE TABLE {t} (
    event_id text PRIMARY KEY, aggregate_type text NOT NULL, aggregate_id text NOT NULL,
    event_type text NOT NULL, payload jsonb, occurred_at timestamptz NOT NULL DEFAULT now(),
    schema_version int NOT NULL DEFAULT 1, trace_id text)"""


@pytest.fixture(scope="module")
def pg(root, request):
    """PostgreSQL with track_commit_timestamp on: rows are selected by their commit times."""
    server = _start_pg(root, f"pg-{request.module.__name__}")
    server.sql("ALTER SYSTEM SET track_commit_timestamp = on")
    server.restart()
    yield server
    server.stop()


def audit(ctx, *args, timeout=300, wrap=()):
    """Runs `outboxd audit --json ARGS` with this test's settings: (exit code, report, stderr)."""
    wrapper = shlex.split(os.environ.get("OUTBOXD_RELAY_WRAPPER", ""))
    cmd = [*wrap, *wrapper, str(relay_bin()), "audit", "--json", *args, f"--pg-url={ctx.pg.dsn}",
           f"--nats-url={ctx.nats.url}", f"--slot={ctx.slot}", f"--publication={ctx.publication}",
           f"--table={ctx.table}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(),
                       stdin=subprocess.DEVNULL)
    report = None
    if r.stdout.strip().startswith("{"):
        report = json.loads(r.stdout.strip().splitlines()[-1])
    return r.returncode, report, r.stderr


def audit_text(ctx, *args):
    cmd = [str(relay_bin()), "audit", *args, f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}",
           f"--slot={ctx.slot}", f"--publication={ctx.publication}", f"--table={ctx.table}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env(),
                          stdin=subprocess.DEVNULL)


def replay(ctx, *args):
    cmd = [str(relay_bin()), "replay", *args, f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}",
           f"--slot={ctx.slot}", f"--publication={ctx.publication}", f"--table={ctx.table}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def publish(nats, subject, headers, data=b"{}"):
    """Publishes one message with headers into JetStream over a raw socket; returns the PubAck."""
    s = socket.create_connection(("127.0.0.1", nats.port), timeout=5)
    try:
        f = s.makefile("rb")
        assert f.readline().startswith(b"INFO")
        inbox = f"_INBOX.{uuid.uuid4().hex}"
        hdr = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        hdr = hdr.encode()
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                  + f"SUB {inbox} 1\r\nHPUB {subject} {inbox} {len(hdr)} {len(hdr) + len(data)}\r\n".encode()
                  + hdr + data + b"\r\n")
        while True:
            line = f.readline()
            assert line, "NATS closed the connection"
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG "):
                n = int(line.split()[-1])
                return json.loads(f.read(n + 2)[:n])
            elif line.startswith(b"HMSG "):
                parts = line.split()
                blob = f.read(int(parts[-1]) + 2)[:int(parts[-1])]
                raise AssertionError(f"no ack: {blob!r}")
            elif line.startswith(b"-ERR"):
                raise AssertionError(line.decode())
    finally:
        s.close()


def delete_msg(ctx, seq):
    r = ctx.js.run("request", "--subject=$JS.API.STREAM.MSG.DELETE." + ctx.stream,
                   f"--data={json.dumps({'seq': seq})}")
    assert b'"success":true' in r.stdout.replace(b" ", b""), r.stdout


def now_iso():
    return dt.datetime.now(dt.timezone.utc).isoformat()


def settle(ctx, n):
    ctx.js.wait_count(ctx.stream, n, 60)


@pytest.mark.timeout(240)
def test_complete_stream_then_deleted_events_and_a_range(ctx, pg, js):
    # A table whose payload may be null: a null payload becomes a dead letter, which stands in
    # for its row.
    pg.sql(POISON_TABLE.format(t=ctx.table))
    ctx.tables.add(ctx.table)
    ctx.add_stream()
    relay = ctx.start_relay("--status-interval=500ms")
    w = ctx.writer(seed=21)
    first = w.write([3, 1, 4])
    with pg.connect() as c, c.cursor() as cur:
        cur.execute(f"INSERT INTO {ctx.table} (event_id, aggregate_type, aggregate_id, event_type, payload) "
                    "VALUES ('poison-1', 'order', '1', 'created', NULL)")
    c.close()
    settle(ctx, 9)
    time.sleep(0.05)
    middle = now_iso()
    time.sleep(0.05)
    second = w.write([2, 5])
    settle(ctx, 16)

    code, rep, err = audit(ctx)
    assert code == 0, (rep, err)
    assert rep["ok"] and rep["range_by"] == "commit_time" and rep["rows"] == 16
    assert rep["missing"]["count"] == 0 and rep["duplicates"]["count"] == 0
    assert rep["out_of_order"]["count"] == 0 and rep["dead_letters"] == 1
    assert rep["unmatched_events"]["count"] == 0 and rep["events_in_range"] == 16
    text = audit_text(ctx)
    assert text.returncode == 0 and "OK: the stream holds each row once, in commit order" in text.stdout, \
        text.stdout + text.stderr
    assert "range and order by commit time" in text.stdout

    # Two events gone from the stream (one of each range), and the dead letter.
    msgs = js.dump(ctx.stream)
    seq = {m["headers"]["Nats-Msg-Id"]: m["seq"] for m in msgs}
    gone = [first[1], second[3]]
    for e in gone + ["dlq-poison-1"]:
        delete_msg(ctx, seq[e])
    code, rep, err = audit(ctx)
    assert code == 1, (rep, err)
    assert rep["missing"]["count"] == 3
    assert sorted(rep["missing"]["first"]) == sorted(gone + ["poison-1"])
    assert rep["out_of_order"]["count"] == 0 and rep["duplicates"]["count"] == 0
    text = audit_text(ctx)
    assert text.returncode == 1 and "missing from the stream: 3" in text.stdout
    assert "PROBLEMS FOUND" in text.stdout

    # A range: rows committed from `middle` on, by their commit times.
    code, rep, err = audit(ctx, f"--since={middle}")
    assert code == 1 and rep["rows"] == 7 and rep["missing"]["first"] == [second[3]], rep
    code, rep, err = audit(ctx, f"--until={middle}")
    assert code == 1 and rep["rows"] == 9 and sorted(rep["missing"]["first"]) == sorted([first[1], "poison-1"])
    code, rep, err = audit(ctx, f"--since={now_iso()}")
    assert code == 0 and rep["rows"] == 0, rep

    # Rows deleted from the table: their events are counted as events without a row.
    pg.sql(f"DELETE FROM {ctx.table} WHERE event_id = ANY(%s)", [first[0], first[2]])
    code, rep, err = audit(ctx)
    assert rep["unmatched_events"]["count"] == 2
    assert {x["event_id"] for x in rep["unmatched_events"]["first"]} == {first[0], first[2]}

    # Without track_commit_timestamp the range goes by occurred_at, and the report says so.
    relay.stop()
    pg.sql("ALTER SYSTEM SET track_commit_timestamp = off")
    pg.restart()
    try:
        code, rep, err = audit(ctx, f"--since={middle}")
        assert code == 1 and rep["range_by"] == "time_column" and rep["time_column"] == "occurred_at"
        assert rep["rows"] == 7 and rep["missing"]["first"] == [second[3]], rep
        text = audit_text(ctx, f"--since={middle}")
        assert "range by the occurred_at column: track_commit_timestamp is off" in text.stdout
    finally:
        pg.sql("ALTER SYSTEM SET track_commit_timestamp = on")
        pg.restart()

    # Bad usage, and servers that cannot be reached.
    assert audit(ctx, "--since=not-a-time")[0] == 2
    assert audit(ctx, "--since=2026-02-01", "--until=2026-01-01")[0] == 2
    r = subprocess.run([str(relay_bin()), "audit", "--pg-url=host=127.0.0.1 port=1 connect_timeout=2",
                        f"--nats-url={ctx.nats.url}", f"--table={ctx.table}"],
                       capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 3, r.stderr
    r = subprocess.run([str(relay_bin()), "audit", f"--pg-url={ctx.pg.dsn}", "--nats-url=nats://127.0.0.1:1",
                        f"--table={ctx.table}"], capture_output=True, text=True, timeout=60, env=clean_env())
    assert r.returncode == 3 and "could not connect to NATS" in r.stderr, r.stderr


@pytest.mark.timeout(240)
def test_replay_copies_are_named_not_duplicates(ctx, pg, js):
    ctx.setup(dupe_window=1)
    relay = ctx.start_relay()
    w = ctx.writer(seed=22)
    ids = w.write([2, 3])
    settle(ctx, 5)

    # New ids: five more messages, each naming its row in Outbox-Event-Id.
    replay(ctx, "--new-ids")
    settle(ctx, 10)
    code, rep, err = audit(ctx)
    assert code == 0, (rep, err)
    assert rep["replay_copies"]["count"] == 5 and rep["duplicates"]["count"] == 0
    assert {x["event_id"] for x in rep["replay_copies"]["first"]} == set(ids)
    assert rep["out_of_order"]["count"] == 0

    # The same ids, after the stream's one-second duplicate window: stored again, as replays.
    time.sleep(1.5)
    replay(ctx)
    settle(ctx, 15)
    code, rep, err = audit(ctx)
    assert code == 0, (rep, err)
    assert rep["replay_copies"]["count"] == 10 and rep["duplicates"]["count"] == 0
    text = audit_text(ctx)
    assert "replay copies (from outboxd replay, not duplicates): 10" in text.stdout, text.stdout

    # The relay's own event lost, its replay copies left: the row is held, and named.
    seq = {m["headers"]["Nats-Msg-Id"]: m["seq"] for m in js.dump(ctx.stream) if "Outbox-Replay" not in m["headers"]}
    delete_msg(ctx, seq[ids[0]])
    code, rep, err = audit(ctx)
    assert code == 0 and rep["replay_only"]["first"] == [ids[0]], rep
    assert relay.running


@pytest.mark.timeout(240)
def test_a_duplicate_stored_after_the_window_is_counted(ctx, pg, js):
    ctx.setup(dupe_window=1)
    ctx.start_relay()
    w = ctx.writer(seed=23)
    ids = w.write([4])
    settle(ctx, 4)
    orig = next(m for m in js.dump(ctx.stream) if m["headers"]["Nats-Msg-Id"] == ids[1])
    time.sleep(1.5)
    # The event stored again as the relay would after a restart past the window: same id, same
    # position. It is a duplicate, and only that (not also an order break).
    headers = {k: v for k, v in orig["headers"].items() if not k.startswith("Nats-Expected")}
    ack = publish(ctx.nats, orig["subject"], headers, orig["data"])
    assert not ack.get("duplicate") and ack["seq"] == 5, ack
    code, rep, err = audit(ctx)
    assert code == 1, (rep, err)
    assert rep["duplicates"]["count"] == 1
    assert rep["duplicates"]["first"] == [{"event_id": ids[1], "seq": 5}]
    assert rep["out_of_order"]["count"] == 0 and rep["missing"]["count"] == 0


@pytest.mark.timeout(240)
def test_events_stored_out_of_commit_order(ctx, pg, js):
    ctx.setup()
    w = ctx.writer(seed=24)
    ids = w.write([1, 1, 1, 1, 1])  # no relay: the stream is written by hand below
    src = "7400000000000000001/outboxd_x"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def put(eid, pos, source=src):
        h = {"Nats-Msg-Id": eid, "Outbox-Position": pos, "Outbox-Commit-Time": stamp}
        if source:
            h["Outbox-Source"] = source
        return publish(ctx.nats, "outbox.order.created", h)

    put(ids[0], "1 0/1000 0")
    put(ids[2], "1 0/3000 0")
    put(ids[1], "1 0/2000 0")             # committed before ids[2], stored after it
    put(ids[3], "1 0/500 0", source="7500000000000000002/other")  # another system: not compared
    put(ids[4], "1 0/4000 0", source=None)  # an older release without Outbox-Source
    code, rep, err = audit(ctx)
    assert code == 1, (rep, err)
    assert rep["missing"]["count"] == 0 and rep["duplicates"]["count"] == 0
    assert rep["out_of_order"]["count"] == 1
    b = rep["out_of_order"]["first"][0]
    assert (b["event_id"], b["seq"], b["position"]) == (ids[1], 3, "1 0/2000 0")
    assert (b["after_event_id"], b["after_seq"], b["after_position"]) == (ids[2], 2, "1 0/3000 0")
    text = audit_text(ctx)
    assert f"{ids[1]} (sequence 3, position 1 0/2000 0) stored after {ids[2]}" in text.stdout, text.stdout


def peak_rss_kib(stderr):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) if m else None


@pytest.mark.timeout(600)
def test_a_long_range_in_bounded_memory(ctx, pg, js):
    n = int(os.environ.get("OUTBOXD_AUDIT_ROWS", "100000"))
    ctx.setup()
    relay = ctx.start_relay()
    t0 = time.monotonic()
    per_txn = 50000
    with pg.connect() as c, c.cursor() as cur:
        for start in range(0, n, per_txn):
            cur.execute(f"INSERT INTO {ctx.table} (event_id, aggregate_type, aggregate_id, event_type, payload) "
                        "SELECT gen_random_uuid(), 'order', 'agg-' || (i %% 1000), 'created', "
                        "jsonb_build_object('i', i) FROM generate_series(%s, %s) i",
                        (start, min(n, start + per_txn) - 1))
    c.close()
    ctx.js.wait_count(ctx.stream, n, 540)
    fill = time.monotonic() - t0
    relay.stop()

    t1 = time.monotonic()
    code, rep, err = audit(ctx, wrap=("/usr/bin/time", "-v"))
    took = time.monotonic() - t1
    rss = peak_rss_kib(err)
    print(f"\naudit of {n} rows: filled in {fill:.1f} s, audited in {took:.1f} s, "
          f"peak RSS {rss} KiB ({rss / 1024:.1f} MiB)")
    assert code == 0, (rep, err[-2000:])
    assert rep["rows"] == n and rep["messages_read"] == n and rep["missing"]["count"] == 0
    if took > 10:
        assert "audit: " in err  # progress lines on a long range
    # 16 bytes per message and no copy of the table side: far below 100 bytes per row. (Not
    # under AddressSanitizer, whose shadow memory and quarantine are most of the process.)
    if "ASAN_OPTIONS" not in os.environ:
        assert rss is None or rss * 1024 < 40 * 1024 * 1024 + 100 * n, rss

    # One event lost in the middle of the long range is found.
    mid = js.run("request", "--subject=$JS.API.STREAM.MSG.GET." + ctx.stream,
                 f"--data={json.dumps({'seq': n // 2})}").stdout
    delete_msg(ctx, n // 2)
    code, rep, err = audit(ctx)
    assert code == 1 and rep["missing"]["count"] == 1, rep
    assert mid  # the message existed
