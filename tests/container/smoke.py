#!/usr/bin/python3
"""tests/container/smoke.py - the outboxd image, run with podman the way deploy/ says to run it
(called by tests/container/check, which sets up podman and builds the image).

A throwaway PostgreSQL 15 (wal_level=logical, TLS with a certificate from a CA this test makes
with openssl) and nats-server -js on loopback (free ports, the integration tests' harness), then,
from the image, every container with --read-only --read-only-tmpfs=false (no writable path at
all, as under Docker's --read-only), --user 10001, --cap-drop ALL, no-new-privileges and the
host's network:

  - what the image holds (podman export of a created container): outboxd, shared libraries, the
    dynamic loader, the CA bundle /etc/ssl/certs/ca-certificates.crt, passwd, group,
    nsswitch.conf, and nothing else: no /bin/sh (and `podman run --entrypoint /bin/sh` fails),
    no package manager; `outboxd --version` lists the libraries it loaded;
  - `outboxd setup --apply` as the database superuser: table, publication, role, stream OUTBOX;
  - `outboxd run` as the role setup made, with compose.yaml's environment, to PostgreSQL by host
    name (localhost: /etc/hosts through glibc's NSS) with sslmode=verify-full against the test
    CA mounted into the container (pg_hba refuses the role without TLS): the image's HEALTHCHECK
    (`outboxd health`) turns healthy (`podman healthcheck run`), /readyz answers 200 "ready"
    (from the host, and through `outboxd health --ready` inside), outbox rows reach the stream;
  - seen from the host (/proc/PID): the relay runs as uid 10001 with no capabilities, and nothing
    can be written into its root filesystem, not even by root;
  - `podman stop` (SIGTERM): exit 0 within --shutdown-timeout;
  - NATS over TLS: a second nats-server that speaks only TLS; `setup --apply` and `status`
    from the image with --nats-tls-ca (the mounted CA file), and a relay that trusts the CA
    through the image's bundle path alone (the test CA mounted as
    /etc/ssl/certs/ca-certificates.crt; no --nats-tls-ca; PostgreSQL with
    sslrootcert=/etc/ssl/certs/ca-certificates.crt): its events reach that server's stream.

Every container is removed by its id at the end, every server stopped by its PID. Prints one line
per check: "PASS name" or "FAIL name: why". Exit 0 unless a check failed.
Usage: smoke.py --image ID --tmp DIR
"""
import argparse
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests"))

import harness as h  # noqa: E402
import checkreport  # noqa: E402
import yaml  # noqa: E402  (Debian's python3-yaml)
from checkreport import report  # noqa: E402

SHUTDOWN_TIMEOUT = 5  # seconds; outboxd's default --shutdown-timeout, set explicitly below
ROWS = 3
BIN = "/usr/local/bin/outboxd"
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CA_IN_CONTAINER = "/certs/ca.crt"
# What the image may hold, path by path (folders aside): anything else fails the content check.
ALLOWED = [
    r"usr/local/bin/outboxd",
    r"etc/(passwd|group|nsswitch\.conf)",
    r"etc/ssl/certs/ca-certificates\.crt",
    r"usr/lib/ssl/cert\.pem",                       # -> the bundle (OpenSSL's default CA file)
    r"lib|lib64",                                   # -> usr/lib, usr/lib64 (Debian's merged /usr)
    r"usr/lib64/ld-linux[^/]*\.so\.\d+",            # the dynamic loader (PT_INTERP)
    r"usr/lib/[a-z0-9_]+-linux-gnu[a-z0-9_]*/(ld-linux[^/]*|lib[^/]+\.so[.0-9]*)",
]
# What podman itself puts into a container's root (mount points, its marker file).
ENGINE = r"(etc/(hosts|hostname|resolv\.conf)|run/\.containerenv|dev|proc|sys|run)(/.*)?"
LIBS = ("libpq", "nats.c", "jansson", "libmicrohttpd", "OpenSSL")


def check(name, ok, detail=""):
    report("PASS" if ok else "FAIL", name, "" if ok else detail)
    return ok


def podman(*args, timeout=60, raw=False):
    """(exit code, output) of a podman command; without the lines podman 4.3 logs on every
    container start when no systemd runs the healthcheck timers (podman healthcheck run works)."""
    r = subprocess.run(["podman", *args], capture_output=True, text=not raw, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if raw:
        return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")
    out = "\n".join(line for line in (r.stdout + r.stderr).splitlines()
                    if "systemd connection" not in line and "healthcheck timer" not in line)
    return r.returncode, out.strip()


class Containers:
    """Containers started from the image, each known by its id (from --cidfile)."""

    LOCKED = ["--network", "host", "--read-only", "--read-only-tmpfs=false", "--user", "10001",
              "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]

    def __init__(self, image, tmp):
        self.image = image
        self.tmp = Path(tmp)
        self.ids = []

    def _cidfile(self):
        return self.tmp / f"cid.{len(self.ids)}.{uuid.uuid4().hex[:8]}"

    def _keep(self, cidfile):
        if cidfile.exists() and cidfile.read_text().strip():
            self.ids.append(cidfile.read_text().strip())

    def _run(self, extra, env, argv, timeout, mounts=()):
        cidfile = self._cidfile()
        envargs = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        vols = [a for host, inside in mounts for a in ("--volume", f"{host}:{inside}:ro")]
        try:
            rc, out = podman("run", "--cidfile", str(cidfile), *extra, *self.LOCKED, *envargs,
                             *vols, self.image, *argv, timeout=timeout)
        finally:
            self._keep(cidfile)
        return rc, out

    def once(self, env, argv, timeout=60, mounts=(), extra=()):
        """Runs the image to its end; (exit code, output)."""
        return self._run(list(extra), env, argv, timeout, mounts)

    def start(self, env, argv=(), mounts=()):
        """Starts the image in the background; its id."""
        n = len(self.ids)
        rc, out = self._run(["--detach"], env, list(argv), 60, mounts)
        if rc != 0 or len(self.ids) == n:
            raise AssertionError(f"podman run --detach: exit {rc}: {out}")
        return self.ids[-1]

    def create(self):
        """A container made from the image and never started; its id."""
        cidfile = self._cidfile()
        try:
            rc, out = podman("create", "--cidfile", str(cidfile), self.image)
        finally:
            self._keep(cidfile)
        if rc != 0:
            raise AssertionError(f"podman create: exit {rc}: {out}")
        return self.ids[-1]

    def remove_all(self):
        for cid in self.ids:
            podman("rm", "--force", "--time", "2", cid, timeout=60)


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
            return r.status, r.read().decode("utf-8", "replace").strip()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace").strip()
    except OSError as e:
        return None, str(e)


def state(cid):
    rc, out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", cid)
    return out.split() if rc == 0 else ["gone", "?"]


def make_certs(d):
    """A throwaway CA and a server certificate for localhost and 127.0.0.1 (PostgreSQL and
    NATS), as tests/integration/test_security.py makes them."""
    d.mkdir(mode=0o755, exist_ok=True)

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    (d / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\n"
                              "keyUsage=critical,keyCertSign,cRLSign\n")
    (d / "server.ext").write_text("basicConstraints=CA:FALSE\n"
                                  "keyUsage=critical,digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth\n"
                                  "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-subj", "/CN=outboxd container test CA", "-out", "ca.csr")
    openssl("x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "2",
            "-out", "ca.crt", "-extfile", "ca.ext")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-subj", "/CN=localhost", "-out", "server.csr")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "server.ext")
    os.chmod(d / "ca.crt", 0o644)      # mounted into the container, read by uid 10001
    # PostgreSQL wants its own copy of the key, owned by it, 0600.
    pgd = d / "pg"
    pgd.mkdir(mode=0o755, exist_ok=True)
    for f in ("server.crt", "server.key"):
        shutil.copy(d / f, pgd / f)
        os.chmod(pgd / f, 0o600)
        if os.geteuid() == 0:
            shutil.chown(pgd / f, "postgres", "postgres")
    return d


def image_contents(ctr):
    """Checks what the image holds, from `podman export` of a container never started."""
    cid = ctr.create()
    rc, data, err = podman("export", cid, raw=True, timeout=120)
    if not check("podman export of a container made from the image", rc == 0, f"exit {rc}: {err}"):
        return
    files, links, other = {}, {}, []
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            name = m.name.lstrip("./").rstrip("/")
            if not name or m.isdir():
                continue
            if m.issym() or m.islnk():
                links[name] = m.linkname
            elif m.isfile():
                files[name] = m.size
            else:
                other.append(name)
    allowed = re.compile("(" + "|".join(ALLOWED) + ")")
    unexpected = sorted(p for p in list(files) + list(links) + other
                        if not allowed.fullmatch(p) and not re.fullmatch(ENGINE, p))
    libs = sorted(p for p in files if re.search(r"\.so[.0-9]*$", p))
    shells = sorted(p for p in list(files) + list(links)
                    if re.search(r"(^|/)(s?bin)/(sh|bash|dash|busybox|ash)$", p))
    pkg = sorted(p for p in list(files) + list(links)
                 if re.search(r"(^|/)(apt|apt-get|dpkg|rpm|microdnf|apk)$", p))
    size = sum(files.values())
    check(f"image holds only outboxd, {len(libs)} shared libraries and the loader, the CA bundle, "
          f"passwd, group, nsswitch.conf: {len(files)} files, {size / 1e6:.1f} MB",
          not unexpected and "usr/local/bin/outboxd" in files,
          f"unexpected: {unexpected[:30]}")
    check("no shell and no package manager in the image (no /bin/sh, bash, busybox, apt, dpkg)",
          not shells and not pkg and "bin/sh" not in links and "usr/bin/sh" not in files,
          f"shells {shells}, package managers {pkg}")
    bundle = files.get(BUNDLE.lstrip("/"), 0)
    check(f"{BUNDLE} in the image ({bundle // 1000} kB, Debian's ca-certificates), "
          "and /usr/lib/ssl/cert.pem points to it",
          bundle > 50000 and links.get("usr/lib/ssl/cert.pem") == BUNDLE,
          f"bundle {bundle} bytes; cert.pem -> {links.get('usr/lib/ssl/cert.pem')}")
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        def text(name):
            for cand in (name, "./" + name):
                try:
                    return t.extractfile(cand).read().decode()
                except KeyError:
                    continue
            return ""
        passwd, group, nss = text("etc/passwd"), text("etc/group"), text("etc/nsswitch.conf")
    check("/etc/passwd and /etc/group name user and group 10001 (outboxd); nsswitch.conf has "
          "hosts: files dns",
          re.search(r"^outboxd:x:10001:10001:", passwd, re.M) and
          re.search(r"^outboxd:x:10001:", group, re.M) and
          re.search(r"^hosts:\s+files dns\s*$", nss, re.M),
          f"passwd {passwd!r}; group {group!r}; nsswitch.conf {nss!r}")

    rc, out = ctr.once({}, ["-c", "echo a shell ran"], extra=["--entrypoint", "/bin/sh"])
    check("`podman run --entrypoint /bin/sh` fails: there is no shell to run",
          rc != 0 and "a shell ran" not in out, f"exit {rc}: {out}")


def host_view(cid):
    """Checks the running relay from the host, through /proc: uid, capabilities, read-only root."""
    rc, out = podman("inspect", "--format", "{{.State.Pid}}", cid)
    pid = out.strip()
    if not check("the relay's PID from podman inspect", rc == 0 and pid.isdigit() and pid != "0",
                 f"exit {rc}: {out}"):
        return
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uids = fields.get("Uid", "").split()
    caps = {k: fields.get(k, "").strip() for k in ("CapEff", "CapPrm", "CapBnd")}
    check("the relay runs as uid 10001 with no capabilities (seen from the host, /proc/PID/status)",
          set(uids) == {"10001"} and set(caps.values()) == {"0000000000000000"},
          f"Uid {uids}; {caps}")
    # Root on the host writes through the container's own mount, which is read-only.
    results = {}
    for path in ("written-by-root", "etc/written-by-root"):
        try:
            with open(f"/proc/{pid}/root/{path}", "w") as f:
                f.write("x")
            results[path] = "written"
            os.unlink(f"/proc/{pid}/root/{path}")
        except OSError as e:
            results[path] = errno.errorcode.get(e.errno, str(e.errno))
    check("root filesystem is read-only: writes to / and /etc fail with EROFS, even as root",
          set(results.values()) == {"EROFS"}, str(results))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--tmp", required=True)
    a = ap.parse_args()

    tmp = Path(a.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)
    for d in ("pg", "nats", "nats-tls"):
        (tmp / d).mkdir(mode=0o755, exist_ok=True)

    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    compose_env = dict(compose["services"]["outboxd"]["environment"])

    pg = nats = nats_tls = None
    ctr = Containers(a.image, tmp)
    try:
        certs = make_certs(tmp / "certs")
        ca = certs / "ca.crt"
        # TLS on, and the relay's role refused without it; the superuser may still come in plain.
        pg = h.PgServer(tmp / "pg", wal_level="logical", extra_conf={
            "ssl": "on", "ssl_cert_file": f"'{certs / 'pg' / 'server.crt'}'",
            "ssl_key_file": f"'{certs / 'pg' / 'server.key'}'"},
            hba_first=["hostnossl all outboxd 127.0.0.1/32 reject"]).init().start()
        nats = h.NatsServer(tmp / "nats").start()

        rc, out = ctr.once({}, ["--version"])
        lines = out.splitlines()
        listed = {w.split()[0] for w in lines[1:] if w.strip()}
        if not check(f"the image runs `outboxd --version`: {' / '.join(' '.join(l.split()) for l in lines)}",
                     rc == 0 and out.startswith("outboxd ") and set(LIBS) <= listed,
                     f"exit {rc}: {out!r}; want lines for {', '.join(LIBS)}"):
            return

        image_contents(ctr)

        rc, out = ctr.once({}, ["setup", "--apply", "--pg-url", pg.url, "--nats-url", nats.url])
        stream = nats.request_json("$JS.API.STREAM.INFO.OUTBOX") or {}
        role = pg.sql("SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = 'outboxd'")
        if not check("setup --apply from the image: table, publication, role outboxd, stream OUTBOX",
                     rc == 0 and "error" not in stream and role == [(True, False)],
                     f"exit {rc}: {out}; stream {stream.get('error')}; role {role}"):
            return

        http_port = h.free_port()
        env = dict(compose_env)
        env.update(OUTBOXD_PG_URL=f"postgresql://outboxd@localhost:{pg.port}/postgres"
                                  f"?sslmode=verify-full&sslrootcert={CA_IN_CONTAINER}",
                   OUTBOXD_NATS_URL=nats.url, OUTBOXD_HTTP_ADDR=f"127.0.0.1:{http_port}",
                   OUTBOXD_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT}s")
        cid = ctr.start(env, mounts=[(ca, CA_IN_CONTAINER)])

        def logs():
            return podman("logs", "--tail", "20", cid)[1]

        def healthy():
            if state(cid)[0] != "running":
                raise AssertionError(f"the container is {state(cid)}: {logs()}")
            return podman("healthcheck", "run", cid)[0] == 0

        try:
            h.wait_until(healthy, 60, "podman healthcheck run to pass", interval=0.3)
            rc, out = podman("healthcheck", "run", cid)
            check("`podman healthcheck run` (the image's HEALTHCHECK, `outboxd health`): healthy",
                  rc == 0 and "unhealthy" not in out, f"exit {rc}: {out}")
        except AssertionError as e:
            report("FAIL", "the relay container turns healthy", e)
            return

        def ready():
            r = http_get(http_port, "/readyz")
            return r if r[0] == 200 else None

        code, body = h.wait_until(ready, 30, "/readyz to answer 200", interval=0.2,
                                  detail=lambda: http_get(http_port, "/readyz"))
        check("/readyz from the host: 200 ready", code == 200 and "ready" in body, f"{code} {body!r}")
        # By name, as deploy/README.md and docs/deployment.md write it: the engine gives the
        # container a default PATH.
        rc, out = podman("exec", cid, "outboxd", "health", "--ready")
        check(f"`podman exec CONTAINER outboxd health --ready`: exit 0, {out!r}",
              rc == 0 and out == "200 /readyz: ready", f"exit {rc}: {out}")

        ssl = pg.sql("SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                     "WHERE a.usename = 'outboxd'")
        check(f"the relay reaches PostgreSQL by host name with sslmode=verify-full and the mounted "
              f"CA: {len(ssl)} connection(s), {sorted({str(v) for _, v in ssl})}",
              ssl and all(s for s, _ in ssl), f"pg_stat_ssl {ssl}")

        for n in range(ROWS):
            pg.sql("INSERT INTO public.outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                   "VALUES (%s, 'order', %s, 'created', '{\"n\": 1}')", str(uuid.uuid4()), str(n))

        def stored():
            info = nats.request_json("$JS.API.STREAM.INFO.OUTBOX") or {}
            return info.get("state", {}).get("messages", 0) >= ROWS

        try:
            h.wait_until(stored, 30, f"{ROWS} messages in stream OUTBOX", interval=0.2)
            msg = nats.request_json("$JS.API.STREAM.MSG.GET.OUTBOX", json.dumps({"seq": 1}).encode())
            subject = ((msg or {}).get("message") or {}).get("subject")
            check(f"{ROWS} outbox rows reach stream OUTBOX, subject outbox.order.created",
                  subject == "outbox.order.created", f"first message {msg}")
        except AssertionError as e:
            report("FAIL", "outbox rows reach stream OUTBOX", f"{e}; {logs()}")

        host_view(cid)

        t0 = time.monotonic()
        rc, out = podman("stop", "--time", "15", cid, timeout=60)
        took = time.monotonic() - t0
        st = state(cid)
        check(f"podman stop (SIGTERM): exit 0 in {took:.1f}s (--shutdown-timeout {SHUTDOWN_TIMEOUT}s)",
              rc == 0 and st == ["exited", "0"] and took <= SHUTDOWN_TIMEOUT,
              f"stop exit {rc} {out}; state {st} after {took:.1f}s; {logs()}")

        # ---- NATS over TLS, and the image's CA bundle path
        nats_tls = h.NatsServer(tmp / "nats-tls", conf=f"""tls {{
  cert_file: "{certs / 'server.crt'}"
  key_file: "{certs / 'server.key'}"
  timeout: 5
}}
""").start(wait=False)
        h.wait_until(lambda: h.tcp_open(nats_tls.port), 30, "the TLS nats-server to listen")
        tls_url = f"tls://localhost:{nats_tls.port}"
        admin = ["--pg-url", f"postgresql://postgres@localhost:{pg.port}/postgres?sslmode=verify-full"
                 f"&sslrootcert={CA_IN_CONTAINER}", "--nats-url", tls_url,
                 "--nats-tls-ca", CA_IN_CONTAINER]
        mounts = [(ca, CA_IN_CONTAINER)]

        def setup_ok():
            rc, out = ctr.once({}, ["setup", "--apply", *admin], mounts=mounts)
            if rc == 0:
                return True
            if "could not connect" in out or "no servers" in out.lower():
                return False   # still starting
            raise AssertionError(f"exit {rc}: {out}")

        try:
            h.wait_until(setup_ok, 30, "setup --apply over TLS", interval=0.5)
            report("PASS", "setup --apply from the image over TLS: PostgreSQL verify-full, NATS "
                           "tls:// with --nats-tls-ca (the mounted CA file)")
        except AssertionError as e:
            report("FAIL", "setup --apply from the image over TLS", e)
            return

        # The test CA as the image's bundle: PostgreSQL told to use the bundle, NATS with no CA
        # setting at all (OpenSSL's default verify paths: /usr/lib/ssl/cert.pem -> the bundle).
        env2 = dict(compose_env)
        env2.update(OUTBOXD_PG_URL=f"postgresql://outboxd@localhost:{pg.port}/postgres"
                                   f"?sslmode=verify-full&sslrootcert={BUNDLE}",
                    OUTBOXD_NATS_URL=tls_url, OUTBOXD_SLOT="outboxd_tls",
                    OUTBOXD_HTTP_ADDR=f"127.0.0.1:{h.free_port()}",
                    OUTBOXD_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT}s")
        cid2 = ctr.start(env2, mounts=[(ca, BUNDLE)])
        for n in range(ROWS):
            pg.sql("INSERT INTO public.outbox (event_id, aggregate_type, aggregate_id, event_type, payload) "
                   "VALUES (%s, 'order', %s, 'created', '{\"n\": 2}')", str(uuid.uuid4()), str(n))

        def tls_stored():
            if state(cid2)[0] != "running":
                raise AssertionError(f"the relay is {state(cid2)}: {podman('logs', '--tail', '20', cid2)[1]}")
            rc, out = ctr.once({}, ["status", "--json", "--slot", "outboxd_tls", *admin],
                               mounts=mounts)
            try:
                doc = json.loads(out[out.index("{"):])
            except ValueError:
                return False
            n = (doc.get("stream") or {}).get("messages", 0)
            return n if n >= ROWS else False

        try:
            n = h.wait_until(tls_stored, 60, "events in the TLS server's stream (outboxd status)",
                             interval=1.0)
            rc, out = podman("exec", cid2, BIN, "health", "--ready")
            check(f"a relay trusting the CA through {BUNDLE} alone (NATS without --nats-tls-ca): "
                  f"{n} events in the TLS server's stream (`outboxd status` over TLS), {out!r}",
                  rc == 0, f"health --ready: exit {rc}: {out}")
        except AssertionError as e:
            report("FAIL", f"a relay trusting the CA through {BUNDLE}", e)
        rc, out = podman("stop", "--time", "15", cid2, timeout=60)
        check("the TLS relay stops with exit 0", state(cid2) == ["exited", "0"],
              f"{state(cid2)}: {podman('logs', '--tail', '20', cid2)[1]}")
    except Exception as e:  # noqa: BLE001 - report, then clean up
        report("FAIL", "container smoke test", f"{type(e).__name__}: {e}")
    finally:
        ctr.remove_all()
        for server in (nats_tls, nats, pg):
            if server is not None:
                server.stop()


if __name__ == "__main__":
    checkreport.run(main)
