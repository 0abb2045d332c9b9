"""`outboxd setup` (print the SQL and the stream, or --apply them) and `outboxd doctor` (check
everything outboxd needs). Each test uses its own table, publication, role and stream names, and
drops the roles it made."""

import json
import re
import subprocess

import pytest

from harness import OUTBOX_SQL, PgServer, clean_env, relay_bin

RUN_LIMIT = 30

# The checks of `outboxd doctor`, in order.
DOCTOR_CHECKS = ["postgres", "wal_level", "replication_role", "outbox_table", "publication",
                 "replication_slots", "wal_senders", "max_slot_wal_keep_size", "commit_order", "slot", "failover", "nats",
                 "jetstream", "stream", "dead_letter_stream", "duplicate_window"]
CHECK_LINE = re.compile(r"^(PASS|WARN|FAIL)  (\S+) +(.*)$")


def outboxd(*args, env=None):
    """Runs the binary to its end; returns the CompletedProcess (text)."""
    return subprocess.run([str(relay_bin()), *args], capture_output=True, text=True,
                          timeout=RUN_LIMIT, env=clean_env(env))


def settings(ctx, pg_url=None, nats_url=None):
    return [f"--pg-url={pg_url or ctx.pg.dsn}", f"--nats-url={nats_url or ctx.nats.url}",
            f"--slot={ctx.slot}", f"--publication={ctx.publication}", f"--table={ctx.table}"]


def outbox_sql_columns():
    """The column lines of scripts/outbox.sql's CREATE TABLE."""
    text = OUTBOX_SQL.read_text()
    body = text[text.index("(\n") + 2:text.index("\n);")]
    return body + "\n"


def printed_stream(out):
    """The stream definition from setup's output (JSON in SQL comments)."""
    lines = out.splitlines()
    start = lines.index("--   {")
    end = lines.index("--   }", start)
    return json.loads("\n".join(line[len("--   "):] for line in lines[start:end + 1]))


def check_lines(out):
    """[(result, check, detail)] of doctor's text output, and the fix lines by check."""
    checks, fixes = [], {}
    for line in out.splitlines():
        m = CHECK_LINE.match(line)
        if m:
            checks.append((m.group(1), m.group(2), m.group(3)))
        elif line.startswith("      fix: "):
            fixes[checks[-1][1]] = line[len("      fix: "):]
    return checks, fixes


def stream_names(nats):
    doc = nats.request_json("$JS.API.STREAM.NAMES", b"{}")
    assert doc is not None and "error" not in doc, doc
    return doc.get("streams") or []


@pytest.fixture
def role(ctx, pg):
    """A role name for this test; afterwards its relays are stopped and the role dropped."""
    name = f"relay_{ctx.tag}"
    yield name
    for r in ctx.relays:
        if r.proc is not None:
            r.kill()
    pg.drop_slot(ctx.slot)
    if pg.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", name):
        pg.sql(f'DROP OWNED BY "{name}"')
        pg.sql(f'DROP ROLE "{name}"')
    pg.sql(f"DROP TABLE IF EXISTS {ctx.table}")


def pg_objects(pg, ctx, role):
    """What exists of the table, the publication and the role."""
    schema, table = ctx.table.split(".")
    return {
        "table": pg.scalar("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE n.nspname = %s AND c.relname = %s", schema, table),
        "publication": pg.scalar("SELECT count(*) FROM pg_publication WHERE pubname = %s", ctx.publication),
        "role": pg.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", role),
    }


@pytest.mark.timeout(60)
def test_setup_prints_sql_and_stream_and_creates_nothing(ctx, pg, nats, role):
    stream = f"OUTBOX_{ctx.tag.upper()}"
    # Secrets in the URLs never show (printing mode does not even connect).
    pg_url = f"{pg.dsn} password=pg-secret-4711"
    nats_url = f"nats://relay:nats-secret-4712@127.0.0.1:{nats.port}"
    r = outboxd("setup", f"--role={role}", f"--stream={stream}", *settings(ctx, pg_url, nats_url))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pg-secret-4711" not in out + r.stderr and "nats-secret-4712" not in out + r.stderr

    qtable = '"public"."outbox_%s"' % ctx.tag
    assert f"CREATE TABLE IF NOT EXISTS {qtable} (\n" + outbox_sql_columns() + ");" in out, \
        "the table's columns differ from scripts/outbox.sql"
    assert "DO $outboxd$" in out
    assert f"IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = '{ctx.publication}')" in out
    assert f"""CREATE PUBLICATION "{ctx.publication}" FOR TABLE {qtable} WITH (publish = 'insert', publish_via_partition_root = true);""" in out
    assert f'ALTER PUBLICATION "{ctx.publication}" ADD TABLE {qtable};' in out
    assert f"IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{role}')" in out
    assert f'CREATE ROLE "{role}" LOGIN REPLICATION;' in out
    assert f'ALTER ROLE "{role}" PASSWORD' in out  # the comment on setting a password
    assert f'GRANT USAGE ON SCHEMA "public" TO "{role}";' in out
    assert f'GRANT SELECT ON TABLE {qtable} TO "{role}";' in out

    body = printed_stream(out)
    assert body == {"name": stream, "subjects": ["outbox.>"], "retention": "limits", "storage": "file",
                    "num_replicas": 1, "discard": "old", "duplicate_window": 120 * 10 ** 9,
                    "max_msgs": -1, "max_bytes": -1, "max_age": 0, "max_msg_size": -1,
                    "max_consumers": -1}
    assert f"$JS.API.STREAM.CREATE.{stream}" in out
    assert (f"nats stream add {stream} --subjects 'outbox.>' --storage file --replicas 1 "
            "--retention limits --discard old --dupe-window 120s") in out

    assert pg_objects(pg, ctx, role) == {"table": 0, "publication": 0, "role": 0}
    assert stream_names(nats) == []


@pytest.mark.timeout(60)
def test_setup_subjects_follow_the_template(ctx, nats, role):
    # A template and a dead-letter subject without a common literal first token: both listed.
    r = outboxd("setup", f"--role={role}", "--subject=orders.{aggregate_id}-v1",
                "--dead-letter-subject=dlq.outbox", "--checkpoint-interval=5m", *settings(ctx))
    assert r.returncode == 0, r.stderr
    body = printed_stream(r.stdout)
    assert body["subjects"] == ["orders.*", "dlq.outbox"]
    # 5 min checkpoints + 10 s ack timeout + 60 s: the window grows to match.
    assert body["duplicate_window"] == (300 + 10 + 60) * 10 ** 9
    # A template column the default table lacks is called out.
    r = outboxd("setup", f"--role={role}", "--subject=outbox.{tenant}", *settings(ctx))
    assert r.returncode == 0 and '-- WARNING: subject template names column "tenant"' in r.stdout


@pytest.mark.timeout(60)
def test_printed_sql_runs_twice_and_matches_apply(ctx, pg, nats, role):
    out = outboxd("setup", f"--role={role}", *settings(ctx)).stdout
    sql = out[:out.index("-- NATS JetStream")]
    for _ in range(2):  # idempotent
        with pg.connect() as conn, conn.cursor() as cur:
            cur.execute(sql)
        conn.close()
    assert pg_objects(pg, ctx, role) == {"table": 1, "publication": 1, "role": 1}
    # --apply finds every PostgreSQL step done by the script.
    r = outboxd("setup", "--apply", f"--role={role}", f"--stream=S_{ctx.tag}", *settings(ctx))
    assert r.returncode == 0, r.stderr
    pg_lines = [line for line in r.stdout.splitlines() if "stream" not in line and not line.startswith("next:")]
    assert pg_lines and all("already" in line for line in pg_lines), r.stdout


@pytest.mark.timeout(60)
def test_odd_names_are_quoted(ctx, pg, nats):
    """Quotes, backslashes and spaces in every name: the script runs, and --apply then finds
    everything in place (its catalog conditions quote the same names as literals)."""
    schema, table = f"odd schema {ctx.tag}", "we'ird\\ \"tbl\""
    role, pub = f"r\"o'le\\{ctx.tag}", f"p'ub \"{ctx.tag}\""
    args = ["--role=" + role, f"--table={schema}.{table}", f"--publication={pub}",
            f"--pg-url={pg.dsn}", f"--nats-url={nats.url}", f"--stream=S_{ctx.tag}"]
    try:
        out = outboxd("setup", *args).stdout
        with pg.connect() as conn, conn.cursor() as cur:
            cur.execute(out[:out.index("-- NATS JetStream")])
        conn.close()
        assert pg.scalar("SELECT count(*) FROM pg_publication_tables WHERE pubname = %s AND "
                         "schemaname = %s AND tablename = %s", pub, schema, table) == 1
        assert pg.sql("SELECT rolcanlogin, rolreplication FROM pg_roles WHERE rolname = %s",
                      role) == [(True, True)]
        r = outboxd("setup", "--apply", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        pg_lines = [line for line in r.stdout.splitlines() if "stream" not in line and not line.startswith("next:")]
        assert len(pg_lines) == 6 and all("already" in line for line in pg_lines), r.stdout
    finally:
        pg.sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        pg.sql(f'DROP PUBLICATION IF EXISTS "{pub.replace(chr(34), chr(34) * 2)}"')
        qrole = '"' + role.replace('"', '""') + '"'
        if pg.scalar("SELECT count(*) FROM pg_roles WHERE rolname = %s", role):
            pg.sql(f"DROP OWNED BY {qrole}")
            pg.sql(f"DROP ROLE {qrole}")


@pytest.mark.timeout(120)
def test_setup_apply_twice_then_the_role_is_enough_to_relay(ctx, pg, nats, js, role):
    stream = f"OUTBOX_{ctx.tag.upper()}"
    args = ["setup", "--apply", f"--role={role}", f"--stream={stream}", *settings(ctx)]
    r = outboxd(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for line in (f"created table {ctx.table}", f'created publication "{ctx.publication}"',
                 f'created role "{role}"', f'granted SELECT on {ctx.table} to "{role}"',
                 f'created stream "{stream}" (subjects outbox.>'):
        assert line in out, out
    # USAGE on public: PUBLIC has it already
    assert f'USAGE on schema "public" already granted to "{role}"' in out

    schema, table = ctx.table.split(".")
    assert pg.sql("SELECT pubinsert, pubupdate, pubdelete FROM pg_publication WHERE pubname = %s",
                  ctx.publication) == [(True, False, False)]
    assert pg.sql("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                  ctx.publication) == [(schema, table)]
    assert pg.sql("SELECT rolcanlogin, rolreplication, rolsuper FROM pg_roles WHERE rolname = %s",
                  role) == [(True, True, False)]
    assert pg.scalar("SELECT has_table_privilege(%s, %s, 'SELECT')", role, ctx.table) is True
    assert pg.scalar("SELECT has_table_privilege(%s, %s, 'INSERT')", role, ctx.table) is False
    info = nats.request_json(f"$JS.API.STREAM.INFO.{stream}")
    cfg = info["config"]
    assert cfg["subjects"] == ["outbox.>"] and cfg["storage"] == "file" and cfg["num_replicas"] == 1
    assert cfg["duplicate_window"] == 120 * 10 ** 9 and cfg["discard"] == "old"

    # The second run changes nothing and says so.
    r = outboxd(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("next:")]
    assert len(lines) == 6 and all("already" in line for line in lines), r.stdout
    assert stream_names(nats) == [stream]

    # A relay connecting as the new role (password set as the printed comment says) streams.
    pg.sql(f"ALTER ROLE \"{role}\" PASSWORD 'relay-pw'")
    ctx.stream = stream
    relay = ctx.start_relay(pg_url=pg.dsn_for(role, "relay-pw"))
    w = ctx.writer(seed=81)
    ids = w.insert_txn(n=1)
    js.wait_count(stream, 1, 30)
    msgs = js.dump(stream)
    assert [m["headers"]["Nats-Msg-Id"] for m in msgs] == ids
    assert msgs[0]["subject"].startswith("outbox.")

    # doctor, as the relay's role, with the relay running: the slot is held.
    r = outboxd("doctor", *settings(ctx, pg_url=pg.dsn_for(role, "relay-pw")))
    checks, _ = check_lines(r.stdout)
    slot = [c for c in checks if c[1] == "slot"]
    assert slot and slot[0][0] == "PASS" and "held by PID" in slot[0][2], r.stdout
    relay.stop()


@pytest.mark.timeout(60)
def test_setup_apply_and_existing_streams(ctx, pg, nats, js, role):
    # A stream of the same name that does not capture the subjects: refused, with the fix.
    js.add_stream("MINE", subjects=("elsewhere.>",))
    r = outboxd("setup", "--apply", f"--role={role}", "--stream=MINE", *settings(ctx))
    assert r.returncode == 1
    assert 'stream "MINE" exists, but its subjects (elsewhere.>) do not capture outbox.*.*' in r.stderr
    assert "nats stream edit MINE" in r.stderr
    # Another stream that already captures everything: used, nothing created.
    js.add_stream("EXISTING", subjects=("outbox.>",))
    r = outboxd("setup", "--apply", f"--role={role}", "--stream=NEW", *settings(ctx))
    assert r.returncode == 0, r.stderr
    assert 'stream "EXISTING" already captures outbox.*.* and outbox.dead_letter' in r.stdout
    assert sorted(stream_names(nats)) == ["EXISTING", "MINE"]


@pytest.mark.timeout(60)
def test_setup_apply_needs_an_administrator(ctx, pg, nats, role):
    pg.sql(f"CREATE TABLE {ctx.table} (event_id uuid PRIMARY KEY, payload jsonb, "
           "aggregate_type text, event_type text)")
    r = outboxd("setup", "--apply", f"--role={role}",
                *settings(ctx, pg_url=pg.dsn_for(PgServer.AUTH_USER, PgServer.AUTH_PASSWORD)))
    assert r.returncode == 1
    assert "must connect as a superuser, or as the owner of" in r.stderr, r.stderr
    assert PgServer.AUTH_PASSWORD not in r.stdout + r.stderr
    # Unreachable NATS with --apply: exit 3 after PostgreSQL is done.
    r = outboxd("setup", "--apply", f"--role={role}",
                *settings(ctx, nats_url="nats://127.0.0.1:1"))
    assert r.returncode == 3 and "could not connect to NATS" in r.stderr


@pytest.mark.timeout(60)
def test_doctor_fails_on_wal_level_replica(ctx, pg_replica, nats):
    r = outboxd("doctor", *settings(ctx, pg_url=pg_replica.dsn))
    assert r.returncode == 1, r.stdout
    checks, fixes = check_lines(r.stdout)
    assert ("FAIL", "wal_level", 'wal_level is "replica", but outboxd needs "logical"') in checks, r.stdout
    assert fixes["wal_level"].startswith("ALTER SYSTEM SET wal_level = logical"), fixes
    assert r.stdout.index("FAIL  wal_level") < r.stdout.index("fix: ALTER SYSTEM SET wal_level")


@pytest.mark.timeout(90)
def test_doctor_passes_after_setup(ctx, pg, nats, role):
    stream = f"OUTBOX_{ctx.tag.upper()}"
    r = outboxd("setup", "--apply", f"--role={role}", f"--stream={stream}", *settings(ctx))
    assert r.returncode == 0, r.stdout + r.stderr
    pg.sql(f"ALTER ROLE \"{role}\" PASSWORD 'relay-pw'")
    nats_url = f"nats://someone:nats-secret-4712@127.0.0.1:{nats.port}"  # no auth there: ignored
    args = settings(ctx, pg_url=pg.dsn_for(role, "relay-pw"), nats_url=nats_url)
    r = outboxd("doctor", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "relay-pw" not in r.stdout + r.stderr and "nats-secret-4712" not in r.stdout + r.stderr
    checks, fixes = check_lines(r.stdout)
    assert [c[1] for c in checks] == DOCTOR_CHECKS, r.stdout
    for result, name, detail in checks:
        # failover: 17+ warns while synchronized_standby_slots is empty (no standby here).
        # commit_order: the test servers run without track_commit_timestamp.
        allowed = ("PASS", "WARN") if name in ("max_slot_wal_keep_size", "commit_order", "slot", "failover") \
            else ("PASS",)
        assert result in allowed, r.stdout
        assert (name in fixes) == (result != "PASS"), r.stdout
    assert dict((c[1], c[0]) for c in checks)["slot"] == "WARN"  # outboxd creates it on first start
    assert "outboxd creates it on its first start" in r.stdout

    r = outboxd("doctor", "--json", *args)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [o["check"] for o in doc] == DOCTOR_CHECKS
    for o in doc:
        assert set(o) == {"check", "result", "detail", "fix"}
        assert (o["fix"] is None) == (o["result"] == "PASS")

    # Something broken: the duplicate window too short for the settings, a missing table.
    r = outboxd("doctor", "--json", "--checkpoint-interval=10m", *args)
    doc = {o["check"]: o for o in json.loads(r.stdout)}
    assert doc["duplicate_window"]["result"] == "WARN" and "--dupe-window 670s" in doc["duplicate_window"]["fix"]
    r = outboxd("doctor", "--json", *settings(ctx, pg_url=pg.dsn_for(role, "relay-pw")) + ["--table=public.nothing_here"])
    assert r.returncode == 1
    doc = {o["check"]: o for o in json.loads(r.stdout)}
    assert doc["outbox_table"]["result"] == "FAIL" and "outboxd setup --apply" in doc["outbox_table"]["fix"]


@pytest.mark.timeout(60)
def test_doctor_reports_unreachable_servers(ctx):
    r = outboxd("doctor", "--json", *settings(
        ctx, pg_url=f"host=127.0.0.1 port=1 user=postgres password=pg-secret-4711 dbname=postgres connect_timeout=5",
        nats_url="nats://u:nats-secret-4712@127.0.0.1:1"))
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert [(o["check"], o["result"]) for o in doc] == [("postgres", "FAIL"), ("nats", "FAIL")]
    assert "pg-secret-4711" not in r.stdout and "nats-secret-4712" not in r.stdout
