#!/usr/bin/python3
"""tests/container/smoke.py - the outboxd image, run with podman the way deploy/ says to run it
(called by tests/container/check, which sets up podman and builds the image).

A throwaway PostgreSQL 15 (wal_level=logical) and nats-server -js on loopback (free ports, the
integration tests' harness), then, from the image, every container with --read-only
--read-only-tmpfs=false (no writable path at all, as under Docker's --read-only), --user 10001,
--cap-drop ALL, no-new-privileges and the host's network:

  - `outboxd setup --apply` as the database superuser: table, publication, role, stream OUTBOX;
  - `outboxd run` as the role setup made, with compose.yaml's environment: the image's
    HEALTHCHECK turns healthy (`podman healthcheck run`), /readyz answers 200 "ready" (from the
    host, and through `outboxd-healthcheck /readyz` inside), outbox rows reach the stream;
  - inside the running container nothing can be written, not even by uid 0 or in /tmp, and the
    process has no capabilities;
  - `podman stop` (SIGTERM): exit 0 within --shutdown-timeout.

Every container is removed by its id at the end, every server stopped by its PID. Prints one line
per check: "PASS name" or "FAIL name: why". Exit 0 unless a check failed.
Usage: smoke.py --image ID --tmp DIR
"""
import argparse
import json
import os
import subprocess
import sys
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


def check(name, ok, detail=""):
    report("PASS" if ok else "FAIL", name, "" if ok else detail)
    return ok


def podman(*args, timeout=60):
    """(exit code, output) of a podman command; without the lines podman 4.3 logs on every
    container start when no systemd runs the healthcheck timers (podman healthcheck run works)."""
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
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

    def _run(self, extra, env, argv, timeout):
        cidfile = self.tmp / f"cid.{len(self.ids)}"
        envargs = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        try:
            rc, out = podman("run", "--cidfile", str(cidfile), *extra, *self.LOCKED, *envargs,
                             self.image, *argv, timeout=timeout)
        finally:
            if cidfile.exists() and cidfile.read_text().strip():
                self.ids.append(cidfile.read_text().strip())
        return rc, out

    def once(self, env, argv, timeout=60):
        """Runs the image to its end; (exit code, output)."""
        return self._run([], env, argv, timeout)

    def start(self, env, argv=()):
        """Starts the image in the background; its id."""
        rc, out = self._run(["--detach"], env, list(argv), 60)
        if rc != 0 or not self.ids:
            raise AssertionError(f"podman run --detach: exit {rc}: {out}")
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--tmp", required=True)
    a = ap.parse_args()

    tmp = Path(a.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)
    for d in ("pg", "nats"):
        (tmp / d).mkdir(mode=0o755, exist_ok=True)

    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    compose_env = dict(compose["services"]["outboxd"]["environment"])

    pg = nats = None
    ctr = Containers(a.image, tmp)
    try:
        pg = h.PgServer(tmp / "pg", wal_level="logical").init().start()
        nats = h.NatsServer(tmp / "nats").start()

        rc, out = ctr.once({}, ["--version"])
        if not check(f"the image runs `{(out.splitlines() or ['outboxd --version'])[0]}` "
                     "(its runtime libraries are all there)",
                     rc == 0 and out.startswith("outboxd "), f"exit {rc}: {out}"):
            return

        rc, out = ctr.once({}, ["setup", "--apply", "--pg-url", pg.url, "--nats-url", nats.url])
        stream = nats.request_json("$JS.API.STREAM.INFO.OUTBOX") or {}
        role = pg.sql("SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = 'outboxd'")
        if not check("setup --apply from the image: table, publication, role outboxd, stream OUTBOX",
                     rc == 0 and "error" not in stream and role == [(True, False)],
                     f"exit {rc}: {out}; stream {stream.get('error')}; role {role}"):
            return

        http_port = h.free_port()
        env = dict(compose_env)
        env.update(OUTBOXD_PG_URL=f"postgresql://outboxd@127.0.0.1:{pg.port}/postgres",
                   OUTBOXD_NATS_URL=nats.url, OUTBOXD_HTTP_ADDR=f"127.0.0.1:{http_port}",
                   OUTBOXD_SHUTDOWN_TIMEOUT=f"{SHUTDOWN_TIMEOUT}s")
        cid = ctr.start(env)

        def logs():
            return podman("logs", "--tail", "20", cid)[1]

        def healthy():
            if state(cid)[0] != "running":
                raise AssertionError(f"the container is {state(cid)}: {logs()}")
            return podman("healthcheck", "run", cid)[0] == 0

        try:
            h.wait_until(healthy, 60, "podman healthcheck run to pass", interval=0.3)
            rc, out = podman("healthcheck", "run", cid)
            check("`podman healthcheck run` (the image's HEALTHCHECK, /healthz): healthy",
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
        rc, out = podman("exec", cid, "outboxd-healthcheck", "/readyz")
        check("outboxd-healthcheck /readyz inside the container: 200", rc == 0 and "200" in out,
              f"exit {rc}: {out}")

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

        # A write that only a read-only root filesystem stops: uid 0 owns /, so without the
        # capabilities it still may write there; /tmp is world-writable.
        rc0, out0 = podman("exec", "--user", "0", cid, "touch", "/written-by-root")
        rc1, out1 = podman("exec", cid, "touch", "/tmp/written")
        check("root filesystem is read-only: writes to / (as uid 0) and /tmp fail with EROFS",
              rc0 != 0 and rc1 != 0 and "Read-only file system" in out0 and "Read-only file system" in out1,
              f"/: exit {rc0} {out0!r}; /tmp: exit {rc1} {out1!r}")
        rc, out = podman("exec", cid, "sh", "-c", "id -u; grep -E '^Cap(Eff|Bnd)' /proc/1/status")
        lines = out.split()
        check("the relay runs as uid 10001 with no capabilities",
              rc == 0 and lines[:1] == ["10001"] and lines.count("0000000000000000") == 2,
              f"exit {rc}: {out}")

        t0 = time.monotonic()
        rc, out = podman("stop", "--time", "15", cid, timeout=60)
        took = time.monotonic() - t0
        st = state(cid)
        check(f"podman stop (SIGTERM): exit 0 in {took:.1f}s (--shutdown-timeout {SHUTDOWN_TIMEOUT}s)",
              rc == 0 and st == ["exited", "0"] and took <= SHUTDOWN_TIMEOUT,
              f"stop exit {rc} {out}; state {st} after {took:.1f}s; {logs()}")
    except Exception as e:  # noqa: BLE001 - report, then clean up
        report("FAIL", "container smoke test", f"{type(e).__name__}: {e}")
    finally:
        ctr.remove_all()
        for server in (nats, pg):
            if server is not None:
                server.stop()


if __name__ == "__main__":
    checkreport.run(main)
