"""Connection security against real servers: PostgreSQL over TLS with a CA and a client
certificate made here, the password from a file; NATS over TLS with a client certificate and a
server name, user and password from a file, a token from the environment, an NKey seed; and the
relay running with exactly the NATS permissions docs/security.md lists."""

import base64
import json
import os
import shutil
import subprocess

import pytest

from conftest import Ctx, _start_pg
from harness import NatsServer, clean_env, random_sizes, relay_bin, tcp_open, wait_until


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_cert(d, name, ca, cn, san=None, client=False):
    """A key and a certificate signed by ca (None: self-signed CA)."""
    ext = d / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE" if ca else "basicConstraints=critical,CA:TRUE",
             "keyUsage=critical,digitalSignature,keyEncipherment" if ca else
             "keyUsage=critical,keyCertSign,cRLSign"]
    if san:
        lines.append(f"subjectAltName={san}")
    if ca:
        lines.append("extendedKeyUsage=" + ("clientAuth" if client else "serverAuth"))
    ext.write_text("\n".join(lines) + "\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", f"/CN={cn}",
            "-out", f"{name}.csr", cwd=d)
    if ca:
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", ext.name, cwd=d)
    else:
        openssl("x509", "-req", "-in", f"{name}.csr", "-signkey", f"{name}.key", "-days", "2",
                "-out", f"{name}.crt", "-extfile", ext.name, cwd=d)
    os.chmod(d / f"{name}.key", 0o600)


@pytest.fixture(scope="module")
def certs(root):
    d = root.mkdir("certs")
    make_cert(d, "ca", None, "outboxd test CA")
    make_cert(d, "pg", "ca", "127.0.0.1", san="IP:127.0.0.1")
    make_cert(d, "nats", "ca", "nats.test", san="DNS:nats.test")
    make_cert(d, "client", "ca", "certuser", client=True)
    make_cert(d, "otherca", None, "some other CA")
    return d


@pytest.fixture(scope="module")
def pg_tls(root, certs):
    d = root.mkdir("pg-tls-files")
    for f in ("pg.crt", "pg.key", "ca.crt"):
        shutil.copy(certs / f, d / f)
        os.chmod(d / f, 0o600)
        if os.geteuid() == 0:
            shutil.chown(d / f, "postgres", "postgres")
    server = _start_pg(root, "pg-tls", extra_conf={
        "ssl": "on", "ssl_cert_file": f"'{d / 'pg.crt'}'", "ssl_key_file": f"'{d / 'pg.key'}'",
        "ssl_ca_file": f"'{d / 'ca.crt'}'"},
        hba_first=["hostssl all certuser 127.0.0.1/32 cert", "host all certuser 127.0.0.1/32 reject"])
    yield server
    server.stop()


def least_privilege_role(pg, ctx, role):
    pg.sql(f"CREATE ROLE {role} LOGIN REPLICATION")
    pg.sql(f"GRANT SELECT ON {ctx.table} TO {role}")
    pg.sql(f"CREATE PUBLICATION {ctx.publication} FOR TABLE {ctx.table} WITH (publish = 'insert')")


def outboxd(*args, env=None, timeout=60):
    return subprocess.run([str(relay_bin()), *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(env), stdin=subprocess.DEVNULL)


@pytest.mark.timeout(120)
def test_postgres_tls_with_verify_full_and_a_client_certificate(root, request, pg_tls, certs, nats, js):
    ctx = Ctx(root, request, pg_tls, nats, js)
    try:
        ctx.setup()
        least_privilege_role(pg_tls, ctx, "certuser")
        url = (f"host=127.0.0.1 port={pg_tls.port} dbname=postgres user=certuser sslmode=verify-full "
               f"sslrootcert={certs / 'ca.crt'} sslcert={certs / 'client.crt'} sslkey={certs / 'client.key'}")
        relay = ctx.start_relay(pg_url=url)
        ctx.writer(seed=81).write([5])
        js.wait_count(ctx.stream, 5, 30)
        ssl = pg_tls.sql("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                         "WHERE a.usename = 'certuser' AND a.backend_type = 'walsender'")
        assert ssl and ssl[0][0] is True, "the replication connection is not encrypted"
        relay.send_signal(15)
        assert relay.wait(10) == 0
        # A server certificate from another CA is refused, with libpq's reason.
        bad = ctx.relay(pg_url=url.replace(str(certs / "ca.crt"), str(certs / "otherca.crt")),
                        name="wrong-ca").start()
        assert bad.wait(20) == 3
        assert "could not connect to PostgreSQL" in bad.logs() and "certificate" in bad.logs()
    finally:
        ctx.cleanup()
        pg_tls.sql("DROP OWNED BY certuser")
        pg_tls.sql("DROP ROLE certuser")


@pytest.mark.timeout(120)
def test_postgres_password_from_a_file(ctx, pg, js):
    ctx.setup()
    pg.sql(f"GRANT SELECT ON {ctx.table} TO {pg.AUTH_USER}")
    pg.sql(f"CREATE PUBLICATION {ctx.publication} FOR TABLE {ctx.table} WITH (publish = 'insert')")
    pwfile = ctx.dir / "pg-password"
    pwfile.write_text(pg.AUTH_PASSWORD + "\n")
    os.chmod(pwfile, 0o600)
    url = f"host=127.0.0.1 port={pg.port} dbname=postgres user={pg.AUTH_USER}"
    ctx.start_relay(f"--pg-password-file={pwfile}", pg_url=url)
    ctx.writer(seed=82).write([3])
    js.wait_count(ctx.stream, 3, 30)
    missing = ctx.relay("--pg-password-file=/nonexistent/pw", pg_url=url, name="missing").start()
    assert missing.wait(20) == 2
    assert "could not read --pg-password-file /nonexistent/pw" in missing.logs()


def nats_with(root, request, conf):
    server = NatsServer(root.mkdir(f"nats-{request.node.name}"), conf=conf).start(wait=False)
    wait_until(lambda: tcp_open(server.port), 30, "nats-server to listen")
    return server


def run_with_nats(root, request, pg, server, nats_args, env=None):
    """Sets up table and stream through outboxd itself (jstool has no TLS or auth), relays a few
    events, and checks them with outboxd status."""
    from harness import JetStream
    ctx = Ctx(root, request, pg, server, JetStream(server.url))
    try:
        ctx.create_table()
        common = [f"--pg-url={pg.dsn}", f"--nats-url={server.url}", f"--table={ctx.table}",
                  f"--slot={ctx.slot}", f"--publication={ctx.publication}", *nats_args]

        def setup_ok():
            r = outboxd("setup", "--apply", *common, env=env)
            if r.returncode == 0:
                return True
            if "could not connect" in r.stdout + r.stderr:
                return False  # the server is still starting
            raise AssertionError(f"outboxd setup --apply failed: {r.stdout}{r.stderr}")

        wait_until(setup_ok, 30, "outboxd setup --apply over the secured connection")
        relay = ctx.relay(*nats_args, env=env).start()
        relay.wait_streaming(timeout=30)
        ctx.writer(seed=83).write([4])

        def count():
            r = outboxd("status", "--json", *common, env=env)
            doc = json.loads(r.stdout)
            return (doc.get("stream") or {}).get("messages", 0) >= 4

        wait_until(count, 30, "the events in the stream (outboxd status)")
        relay.send_signal(15)
        assert relay.wait(10) == 0
        return ctx
    finally:
        ctx.cleanup()


@pytest.mark.timeout(120)
def test_nats_tls_with_client_certificate_and_server_name(root, request, pg, certs):
    server = nats_with(root, request, f"""tls {{
  cert_file: "{certs / 'nats.crt'}"
  key_file: "{certs / 'nats.key'}"
  ca_file: "{certs / 'ca.crt'}"
  verify: true
}}
""")
    try:
        tls = [f"--nats-tls-ca={certs / 'ca.crt'}", f"--nats-tls-cert={certs / 'client.crt'}",
               f"--nats-tls-key={certs / 'client.key'}", "--nats-tls-server-name=nats.test"]
        run_with_nats(root, request, pg, server, tls)
        # Without the client certificate the server refuses us, and we say so.
        r = outboxd("status", f"--pg-url={pg.dsn}", f"--nats-url={server.url}", *tls[:1], tls[3])
        assert "could not connect to NATS" in r.stdout + r.stderr
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_nats_user_and_password_from_a_file(root, request, pg):
    server = nats_with(root, request, 'authorization { user: relay, password: "s3cret-pw" }\n')
    try:
        pw = root.mkdir(f"pw-{request.node.name}") / "nats-password"
        pw.write_text("s3cret-pw\n")
        run_with_nats(root, request, pg, server, ["--nats-user=relay", f"--nats-password-file={pw}"])
    finally:
        server.kill()


@pytest.mark.timeout(120)
def test_nats_token_from_the_environment(root, request, pg):
    server = nats_with(root, request, 'authorization { token: "t0ken-value" }\n')
    try:
        run_with_nats(root, request, pg, server, [], env={"OUTBOXD_NATS_TOKEN": "t0ken-value"})
    finally:
        server.kill()


def nkey(prefix_byte):
    """An NKey pair of any kind: (seed "S?...", public key, Ed25519 private key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def crc16(data):
        crc = 0
        for b in data:
            crc ^= b << 8
            for _ in range(8):
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        return crc

    def encode(raw):
        crc = crc16(raw)
        return base64.b32encode(raw + bytes([crc & 0xFF, crc >> 8])).decode().rstrip("=")

    raw_seed = os.urandom(32)
    key = Ed25519PrivateKey.from_private_bytes(raw_seed)
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    seed_prefix = 18 << 3
    seed = encode(bytes([seed_prefix | prefix_byte >> 5, (prefix_byte & 31) << 3]) + raw_seed)
    return seed, encode(bytes([prefix_byte]) + pub), key


def nkey_pair():
    """A user NKey: (seed "SU...", public "U...")."""
    seed, public, _ = nkey(20 << 3)
    return seed, public


@pytest.mark.timeout(120)
def test_nats_nkey_seed_file(root, request, pg):
    seed, public = nkey_pair()
    server = nats_with(root, request, f"authorization {{ users: [ {{ nkey: {public} }} ] }}\n")
    try:
        f = root.mkdir(f"nkey-{request.node.name}") / "user.nk"
        f.write_text(seed + "\n")
        os.chmod(f, 0o600)
        run_with_nats(root, request, pg, server, [f"--nats-nkey-seed-file={f}"])
    finally:
        server.kill()


# What docs/security.md tells operators to grant the relay's NATS user, word for word
# (tests/docs/check.py checks that the guide shows it as it is here): publish to the outbox and
# dead-letter subjects, the checkpoint bucket, and the JetStream API calls outboxd makes;
# subscribe to its inboxes.
RELAY_PERMISSIONS = """
publish: { allow: [ "outbox.>", "$KV.outboxd.>",
  "$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.OUTBOX", "$JS.API.STREAM.MSG.GET.OUTBOX",
  "$JS.API.CONSUMER.LIST.OUTBOX", "$JS.API.CONSUMER.INFO.OUTBOX.>",
  "$JS.API.STREAM.INFO.KV_outboxd", "$JS.API.STREAM.CREATE.KV_outboxd",
  "$JS.API.DIRECT.GET.KV_outboxd.>", "$JS.API.STREAM.MSG.GET.KV_outboxd" ] }
subscribe: { allow: [ "_INBOX.>" ] }
"""


NO_OUTBOX_PUBLISH = RELAY_PERMISSIONS.replace('"outbox.>", ', "")


@pytest.mark.timeout(120)
def test_relay_runs_with_only_the_documented_nats_permissions(root, request, pg):
    conf = ("jetstream: enabled\naccounts: { APP: { jetstream: enabled, users: [\n"
            "  { user: admin, password: admin }\n"
            f"  {{ user: relay, password: relay, permissions: {{ {RELAY_PERMISSIONS} }} }}\n"
            f"  {{ user: nopub, password: nopub, permissions: {{ {NO_OUTBOX_PUBLISH} }} }}\n"
            "] } }\n")
    server = nats_with(root, request, conf)
    try:
        from harness import JetStream
        admin = f"nats://admin:admin@127.0.0.1:{server.port}"
        wait_until(lambda: JetStream(admin).run("add-stream", "--name=OUTBOX", "--subjects=outbox.>",
                                                check=False).returncode == 0, 30, "the stream")
        ctx = Ctx(root, request, pg, server, JetStream(admin))
        try:
            ctx.create_table()
            relay = ctx.start_relay("--checkpoint-interval=200ms", "--status-interval=1s",
                                    nats_url=f"nats://relay:relay@127.0.0.1:{server.port}")
            ctx.writer(seed=84).write([5])
            ctx.js.wait_count(ctx.stream, 5, 30)
            # Consumer lag is read under the same permissions.
            wait_until(lambda: relay.metrics()["outboxd_consumer_refresh_timestamp_seconds"] > 0, 30,
                       "the consumers to be read")
            assert relay.metrics()["outboxd_consumer_refresh_errors_total"] == 0
            relay.send_signal(15)
            assert relay.wait(10) == 0
            log = relay.logs()
            assert "Permissions Violation" not in log and "permission" not in log.lower(), log[-2000:]
            # The checkpoint was written under those permissions, and a restart reads it.
            again = ctx.start_relay(nats_url=f"nats://relay:relay@127.0.0.1:{server.port}", name="again")
            assert "could not read the checkpoint" not in again.logs()
            again.send_signal(15)
            assert again.wait(10) == 0
            # The control: without publish rights on outbox.> nothing gets through, so the
            # permissions above are really enforced (and really enough).
            denied = ctx.start_relay("--ack-timeout=1s", name="denied",
                                     nats_url=f"nats://nopub:nopub@127.0.0.1:{server.port}")
            ctx.writer(seed=85).write([1])
            wait_until(lambda: denied.metrics()['outboxd_publish_errors_total{reason="timeout"}'] >= 1,
                       30, "publishes to fail without the permission")
            assert ctx.js.count(ctx.stream) == 5
        finally:
            ctx.cleanup()
    finally:
        server.kill()


def jwt(signer, issuer_pub, subject_pub, name, nats_claims):
    """A NATS JWT (ed25519-nkey) for subject, signed by the issuer's key."""
    import hashlib
    import time as _time

    def b64(data):
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    claims = {"iat": int(_time.time()), "iss": issuer_pub, "name": name, "sub": subject_pub,
              "nats": nats_claims}
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = signer.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{b64(sig)}"


@pytest.mark.timeout(120)
def test_nats_credentials_file_with_a_user_jwt(root, request, pg):
    op_seed, op_pub, op_key = nkey(14 << 3)      # operator "O..."
    _, acc_pub, acc_key = nkey(0)                # account "A..."
    user_seed, user_pub, _ = nkey(20 << 3)       # user "U..."
    op_jwt = jwt(op_key, op_pub, op_pub, "test operator", {"type": "operator", "version": 2})
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                 "wildcards": True, "conn": -1, "leaf": -1,
                 "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    acc_jwt = jwt(op_key, op_pub, acc_pub, "app",
                  {"type": "account", "version": 2, "limits": unlimited})
    _, sys_pub, _ = nkey(0)                      # the system account JetStream needs
    sys_jwt = jwt(op_key, op_pub, sys_pub, "SYS", {"type": "account", "version": 2})
    user_jwt = jwt(acc_key, acc_pub, user_pub, "relay",
                   {"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1,
                    "payload": -1})
    d = root.mkdir(f"creds-{request.node.name}")
    creds = d / "relay.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n" + user_jwt + "\n------END NATS USER JWT------\n\n"
                     "-----BEGIN USER NKEY SEED-----\n" + user_seed + "\n------END USER NKEY SEED------\n")
    os.chmod(creds, 0o600)
    server = nats_with(root, request, f"operator: {op_jwt}\nsystem_account: {sys_pub}\n"
                                      f"resolver: MEMORY\n"
                                      f"resolver_preload: {{ {acc_pub}: {acc_jwt}, {sys_pub}: {sys_jwt} }}\n")
    try:
        run_with_nats(root, request, pg, server, [f"--nats-creds-file={creds}"])
    finally:
        server.kill()
