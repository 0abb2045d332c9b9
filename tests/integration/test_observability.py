"""What operators see: /metrics counters and gauges, /healthz and /readyz, `outboxd status`,
JSON logs, and no secret anywhere in them."""

import json
import subprocess
import time
import uuid

import pytest

from harness import NatsServer, JetStream, clean_env, lsn_int, random_sizes, relay_bin, wait_until


def scrape(relay):
    return relay.metrics()


@pytest.mark.timeout(120)
def test_counters_match_what_was_published_and_duplicates_are_counted(ctx, pg, js):
    ctx.setup()
    # A batch that is already in the stream (as after a replay): the relay's publishes of it
    # are acknowledged as duplicates.
    w = ctx.writer(seed=51)
    replayed = [w.make_event() for _ in range(25)]
    for e in replayed:
        js.publish("outbox.replayed.before", "{}", msg_id=e["event_id"])
    relay = ctx.start_relay("--status-interval=1s")
    m0 = scrape(relay)
    assert m0["outboxd_events_published_total"] == 0
    assert m0["outboxd_postgres_connected"] == 1 and m0["outboxd_nats_connected"] == 1
    assert any(k.startswith("outboxd_build_info{") for k in m0)

    w.write(random_sizes(500, 1, 20, w.rng))
    w.insert_txn(replayed)
    js.wait_count(ctx.stream, 25 + 500, 60)

    def settled():
        m = scrape(relay)
        return m["outboxd_events_published_total"] + m["outboxd_events_duplicate_total"] == 525

    wait_until(settled, 30, "every acknowledgement to be counted")
    m = scrape(relay)
    assert m["outboxd_events_published_total"] == 500
    assert m["outboxd_events_duplicate_total"] == 25
    assert m["outboxd_in_flight_events"] == 0
    assert m["outboxd_oldest_pending_age_seconds"] == 0
    assert m["outboxd_commit_to_ack_seconds_count"] == 525
    assert m['outboxd_commit_to_ack_seconds_bucket{le="+Inf"}'] == 525
    assert m["outboxd_publish_retries_total"] == 0
    assert all(v == 0 for k, v in m.items() if k.startswith("outboxd_publish_errors_total"))
    assert m["outboxd_last_commit_timestamp_seconds"] > time.time() - 120
    # The confirmed LSN gauge follows what PostgreSQL was told.
    wait_until(lambda: scrape(relay)["outboxd_confirmed_lsn"] == (pg.confirmed_flush(ctx.slot) or -1),
               30, "the confirmed LSN gauge to match the slot")
    wait_until(lambda: scrape(relay)["outboxd_replication_lag_bytes"] < 1024 * 1024, 30,
               "the lag gauge to show the relay caught up")


@pytest.mark.timeout(120)
def test_oldest_pending_age_rises_during_a_broker_outage_and_readiness_follows(ctx, pg, js, nats):
    ctx.setup()
    relay = ctx.start_relay("--ack-timeout=2s", "--retry-max=1s")
    assert relay.http_get("/readyz")[0] == 200
    assert relay.http_get("/healthz")[0] == 200
    w = ctx.writer(seed=53)
    w.write(random_sizes(100, 1, 10, w.rng))
    js.wait_count(ctx.stream, 100, 30)

    nats.stop()
    w.write(random_sizes(50, 1, 10, w.rng))
    wait_until(lambda: relay.http_get("/readyz")[0] == 503, 20, "/readyz to fail without NATS")
    assert relay.http_get("/healthz")[0] == 200, "the relay is alive while the broker is down"
    wait_until(lambda: scrape(relay)["outboxd_oldest_pending_age_seconds"] > 10, 30,
               "the oldest pending age to pass 10 s")
    assert scrape(relay)["outboxd_nats_connected"] == 0

    nats.start()
    js.wait_count(ctx.stream, 150, 60)
    wait_until(lambda: scrape(relay)["outboxd_oldest_pending_age_seconds"] == 0, 30,
               "the oldest pending age to return to 0")
    wait_until(lambda: relay.http_get("/readyz")[0] == 200, 20, "/readyz to recover")
    assert scrape(relay)['outboxd_publish_errors_total{reason="connection"}'] >= 1


def run_status(ctx, *extra):
    args = [str(relay_bin()), "status", f"--pg-url={ctx.pg.dsn}", f"--nats-url={ctx.nats.url}",
            f"--slot={ctx.slot}", f"--table={ctx.table}", *extra]
    r = subprocess.run(args, capture_output=True, text=True, timeout=30, env=clean_env())
    return r.returncode, r.stdout, r.stderr


@pytest.mark.timeout(120)
def test_status_with_a_running_and_a_stopped_relay(ctx, pg, js):
    ctx.setup()
    rc, out, _ = run_status(ctx, "--json")
    assert rc == 1, "a missing slot is unhealthy"
    doc = json.loads(out)
    assert doc["slot"]["exists"] is False and doc["healthy"] is False

    relay = ctx.start_relay("--status-interval=1s")
    w = ctx.writer(seed=55)
    w.write(random_sizes(200, 1, 10, w.rng))
    js.wait_count(ctx.stream, 200, 30)
    wait_until(lambda: (pg.confirmed_flush(ctx.slot) or 0) > 0, 30, "a confirmed position")

    rc, out, _ = run_status(ctx, "--json")
    doc = json.loads(out)
    assert rc == 0, out
    assert doc["slot"]["active"] is True and doc["slot"]["active_pid"] > 0
    assert doc["stream"]["name"] == ctx.stream and doc["stream"]["messages"] == 200
    assert doc["stream"]["duplicate_window_seconds"] == 120
    assert doc["checkpoint"] is not None and lsn_int(doc["checkpoint"]["lsn"]) > 0
    assert lsn_int(doc["slot"]["confirmed_lsn"]) == pg.confirmed_flush(ctx.slot)
    assert isinstance(doc["slot"]["lag_bytes"], int)

    relay.send_signal(2)
    assert relay.wait(10) == 0
    rc, out, _ = run_status(ctx, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["slot"]["active"] is False and doc["slot"]["active_pid"] is None
    rc, text, _ = run_status(ctx)
    assert rc == 0 and "not held by any relay" in text and f'"{ctx.stream}", 200 messages' in text

    # Lag above --max-lag is unhealthy: write elsewhere while no relay runs.
    pg.sql("CREATE TABLE IF NOT EXISTS lag_filler (x text)")
    pg.sql("INSERT INTO lag_filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)")
    rc, out, _ = run_status(ctx, "--json", "--max-lag=1MiB")
    assert rc == 1 and json.loads(out)["healthy"] is False
    rc, _, err = run_status(ctx, "--max-lag=lots")
    assert rc == 2 and "--max-lag" in err


@pytest.mark.timeout(120)
def test_passwords_never_appear_in_logs_metrics_or_status(root, request, pg):
    from conftest import Ctx
    nats_pw = "nats-" + uuid.uuid4().hex
    nats = NatsServer(root.mkdir(f"nats-{request.node.name}"),
                      conf=f'authorization {{ user: relay, password: "{nats_pw}" }}\n').start(wait=False)
    nats_url = f"nats://relay:{nats_pw}@127.0.0.1:{nats.port}"
    wait_until(lambda: JetStream(nats_url).run("info", "--stream=NONE", check=False).returncode == 1
               and "10059" in JetStream(nats_url).run("info", "--stream=NONE", check=False).stderr.decode(),
               30, "nats-server with a password to answer")
    js = JetStream(nats_url)
    ctx = Ctx(root, request, pg, nats, js)
    try:
        ctx.setup()
        pg.sql(f"GRANT SELECT ON {ctx.table} TO authuser")
        pg.sql(f"CREATE PUBLICATION {ctx.publication} FOR TABLE {ctx.table} WITH (publish = 'insert')")
        pg_pw = pg.AUTH_PASSWORD
        pg_url = f"postgresql://authuser:{pg_pw}@127.0.0.1:{pg.port}/postgres"
        relay = ctx.start_relay("--log-format=json", "--log-level=debug", "--status-interval=1s",
                                pg_url=pg_url, nats_url=nats_url)
        w = ctx.writer(seed=57)
        w.write(random_sizes(50, 1, 10, w.rng))
        js.wait_count(ctx.stream, 50, 30)
        status_out = subprocess.run(
            [str(relay_bin()), "status", "--json", f"--pg-url={pg_url}", f"--nats-url={nats_url}",
             f"--slot={ctx.slot}", f"--table={ctx.table}"], capture_output=True, text=True, timeout=30,
            env=clean_env())
        _, metrics_text = relay.http_get("/metrics")
        relay.send_signal(15)
        assert relay.wait(10) == 0
        # A wrong password fails with a message that names neither password.
        bad = ctx.relay(pg_url=pg_url.replace(pg_pw, "wrong-" + pg_pw), nats_url=nats_url,
                        name="bad").start()
        assert bad.wait(20) == 3
        # Everything the relays wrote (the harness's own banner lines carry the command line).
        logs = "\n".join(line for line in (relay.logs(all_runs=True) + bad.logs(all_runs=True)).splitlines()
                         if not line.startswith("==== harness"))
        for line in relay.logs().splitlines():
            if line.startswith("{"):
                json.loads(line)  # every log line is one JSON object
        assert "password authentication failed" in bad.logs()
        for text, where in ((logs, "logs"), (metrics_text, "/metrics"),
                            (status_out.stdout + status_out.stderr, "status output")):
            assert text, f"nothing captured from {where}"
            assert pg_pw not in text, f"the PostgreSQL password shows in {where}"
            assert nats_pw not in text, f"the NATS password shows in {where}"
    finally:
        ctx.cleanup()
        nats.kill()


@pytest.mark.timeout(60)
def test_systemd_is_told_ready_and_stopping(ctx, pg, js):
    import socket
    ctx.setup()
    path = str(ctx.dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    try:
        relay = ctx.start_relay(env={"NOTIFY_SOCKET": path})
        msgs = [sock.recv(4096).decode()]
        assert msgs[0].startswith("READY=1\n") and "STATUS=streaming" in msgs[0], msgs
        relay.send_signal(15)
        assert relay.wait(10) == 0
        msgs.append(sock.recv(4096).decode())
        assert msgs[-1] == "STOPPING=1", msgs
    finally:
        sock.close()


@pytest.mark.timeout(60)
def test_settings_file_with_flags_and_environment_on_top(ctx, pg, js):
    ctx.setup()
    conf = ctx.dir / "outboxd.conf"
    conf.write_text(f"# settings for a test\n"
                    f"pg_url = \"{pg.dsn}\"\n"
                    f"nats_url = {ctx.nats.url}\n"
                    f"slot = wrong_slot_name\n"
                    f"publication = {ctx.publication}\n"
                    f"table = {ctx.table}\n"
                    f"log_format = json\n")
    # The flag wins over the file's slot; the environment wins over the file's log format.
    relay = ctx.relay(f"--config={conf}", f"--slot={ctx.slot}", pg_url=None, nats_url=None, slot=None,
                      publication=None, table=None, env={"OUTBOXD_LOG_FORMAT": "text"}).start()
    relay.wait_streaming(ctx.slot, timeout=30)
    assert " info: streaming from slot" in relay.logs(), "the environment's text log format lost"
    w = ctx.writer(seed=59)
    w.write([3])
    js.wait_count(ctx.stream, 3, 30)
    conf.write_text("sloot = typo\n")
    bad = ctx.relay(f"--config={conf}", name="bad").start()
    assert bad.wait(20) == 2
    assert f"{conf}:1: unknown setting 'sloot'" in bad.logs()
