#!/usr/bin/python3
"""tests/deploy/smoke.py - what deploy/ claims, tried on real processes (called by tests/deploy/check).

A throwaway PostgreSQL 15 (wal_level=logical) and nats-server -js, set up the way
deploy/compose.yaml sets them up: scripts/outbox.sql, then deploy/postgres-init.sql (the
least-privilege role and the publication), then the OUTBOX stream on outbox.> with a 2-minute
duplicate window. Then two relays with compose's environment, as the role `outboxd`:

  - the first streams: `outboxd health` (the image's HEALTHCHECK) says 200 on /healthz and, with
    --ready, on /readyz; an outbox row
    reaches the stream, the checkpoint bucket KV_outboxd exists;
  - the second is a standby: /healthz 200 but /readyz 503 "standby" (why deploy/kubernetes probes
    readiness on /healthz);
  - SIGTERM to the first: exit 0 well within the 15s stop timeouts; the standby takes over.
  - with --strace FILE: the second relay runs under strace -f -c, and every system call it made
    must pass deploy/outboxd.service's SystemCallFilter.
  - sd_notify (Type=notify): READY=1 and STOPPING=1 through NOTIFY_SOCKET; skipped while
    outboxd sends nothing.
  - --config: the first relay reads deploy/outboxd.conf.example (its URLs overridden by the
    environment); skipped while `outboxd --help` does not mention --config.

Prints one line per check: "PASS name", "FAIL name: why" or "SKIP name: why". Exit 0 unless a
check failed. Usage: smoke.py --bin OUTBOXD --jstool JSTOOL --tmp DIR [--strace]
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests"))

import checkreport  # noqa: E402
import yaml  # noqa: E402  (Debian's python3-yaml)
from checkreport import report  # noqa: E402


def clean_env(extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OUTBOXD_", "PG", "NOTIFY_SOCKET", "HEALTHCHECK_"))}
    env["LC_ALL"] = "C.UTF-8"
    env.update({k: str(v) for k, v in extra.items()})
    return env


OUTBOXD = None   # the binary under test (--bin)


def healthcheck(addr, path):
    """(exit code, output) of `outboxd health` (--ready for /readyz) against the listener on
    addr, given as the relay's own setting OUTBOXD_HTTP_ADDR."""
    argv = [OUTBOXD, "health"] + (["--ready"] if path == "/readyz" else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=15,
                       env=clean_env({"OUTBOXD_HTTP_ADDR": addr}))
    return r.returncode, (r.stdout + r.stderr).strip()


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records what arrives."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            for line in data.decode("utf-8", "replace").splitlines():
                self.messages.append((time.monotonic(), line))

    def first(self, key):
        for t, line in self.messages:
            if line.startswith(key + "="):
                return t, line
        return None

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


class Daemon:
    """One outboxd process (optionally under strace); output to a log file."""

    def __init__(self, name, argv, env, logdir, strace_out=None):
        self.name = name
        self.logfile = Path(logdir) / f"{name}.log"
        self.argv = argv
        if strace_out:
            self.argv = ["strace", "-f", "-qq", "-c", "-o", str(strace_out), *argv]
        self.traced = bool(strace_out)
        self.env = env
        self.proc = None

    def start(self):
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=clean_env(self.env))
        return self

    def pid(self):
        """outboxd's own PID (under strace: strace's child)."""
        if not self.traced:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            except OSError:
                kids = []
            if kids:
                return int(kids[0])
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: strace started no child")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout):
        """SIGTERM to outboxd; (exit code, seconds) or (None, timeout) if it did not exit."""
        t0 = time.monotonic()
        os.kill(self.pid(), signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None, timeout
        return rc, time.monotonic() - t0

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self):
        try:
            return self.logfile.read_text(errors="replace")[-1500:]
        except OSError:
            return "<no log>"


def wait_for(fn, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def allowed_syscalls():
    """System calls deploy/outboxd.service lets through: its SystemCallFilter= lines, with
    systemd's own group table (systemd-analyze syscall-filter) expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                         check=True).stdout
    groups, cur = {}, None
    for raw in out.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not raw.startswith(" ") and line.startswith("@"):
            cur = groups.setdefault(line, set())
        elif cur is not None:
            cur.add(line)

    def expand(name, seen=()):
        if not name.startswith("@"):
            return {name}
        s = set()
        for m in groups.get(name, ()):
            if m not in seen:
                s |= expand(m, seen + (name,))
        return s

    allow, deny = None, set()
    for raw in (DEPLOY / "outboxd.service").read_text().splitlines():
        if not raw.startswith("SystemCallFilter="):
            continue
        val = raw.split("=", 1)[1].strip()
        names = val.lstrip("~").split()
        items = set().union(*(expand(n) for n in names)) if names else set()
        if val.startswith("~"):
            deny |= items
        else:
            allow = items if allow is None else allow | items
    if allow is None:
        return None
    return allow - deny


def traced_syscalls(path):
    names = set()
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if not parts or not parts[0][0].isdigit():
            continue
        name = parts[-1]
        if name not in ("total",):
            names.add(name)
    return names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--jstool", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--strace", action="store_true")
    a = ap.parse_args()
    global OUTBOXD
    OUTBOXD = a.bin

    os.environ["OUTBOXD_JSTOOL"] = a.jstool
    import harness as h  # noqa: E402

    tmp = Path(a.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)
    (tmp / "pg").mkdir(mode=0o755, exist_ok=True)
    (tmp / "nats").mkdir(mode=0o755, exist_ok=True)

    help_text = subprocess.run([a.bin, "--help"], capture_output=True, text=True).stdout
    has_config = "--config" in help_text

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose_env = dict(compose["services"]["outboxd"]["environment"])

    pg = nats = None
    relays = []
    notify = None
    try:
        pg = h.PgServer(tmp / "pg", wal_level="logical").init().start()
        nats = h.NatsServer(tmp / "nats").start()

        # The database side, as compose's init scripts do it; twice, to show it can be re-run.
        try:
            for _ in range(2):
                pg.sql((REPO / "scripts" / "outbox.sql").read_text())
                pg.sql((DEPLOY / "postgres-init.sql").read_text())
            attrs = pg.sql("SELECT rolreplication, rolsuper, rolcreatedb FROM pg_roles "
                           "WHERE rolname = 'outboxd'")
            assert attrs == [(True, False, False)], f"role attributes {attrs}"
            report("PASS", "postgres-init.sql creates role outboxd (REPLICATION, no superuser) and the publication")
        except Exception as e:  # noqa: BLE001
            report("FAIL", "postgres-init.sql", e)
            return

        js = h.JetStream(nats.url)
        js.add_stream("OUTBOX", subjects=("outbox.>",), dupe_window=120, storage="file")

        pg_url = f"postgresql://outboxd:outboxd@127.0.0.1:{pg.port}/postgres"
        port_a, port_b = h.free_port(), h.free_port()

        def env_for(port):
            env = dict(compose_env)
            env["OUTBOXD_PG_URL"] = pg_url
            env["OUTBOXD_NATS_URL"] = nats.url
            env["OUTBOXD_HTTP_ADDR"] = f"127.0.0.1:{port}"
            return env

        argv_a = [a.bin, "run"]
        if has_config:
            argv_a += ["--config", str(DEPLOY / "outboxd.conf.example")]
        env_a = env_for(port_a)
        notify = NotifySocket(tmp / "notify.sock")
        env_a["NOTIFY_SOCKET"] = notify.path
        relay_a = Daemon("relay-a", argv_a, env_a, tmp).start()
        relays.append(relay_a)
        addr_a, addr_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"

        ready = wait_for(lambda: not relay_a.alive() or healthcheck(addr_a, "/readyz")[0] == 0, 60)
        if not relay_a.alive() or not ready:
            report("FAIL", "relay with compose's environment, as role outboxd, streams",
                   f"exit {relay_a.proc.poll()}: {relay_a.log_tail()}")
            return
        report("PASS", "relay with compose's environment (" + ", ".join(sorted(compose_env)) +
               "), as role outboxd, streams")
        if has_config:
            report("PASS", "relay reads deploy/outboxd.conf.example (--config)")
        else:
            report("SKIP", "outboxd.conf.example through --config", "outboxd has no --config yet")

        rc_h, out_h = healthcheck(addr_a, "/healthz")
        rc_r, out_r = healthcheck(addr_a, "/readyz")
        if rc_h == 0 and rc_r == 0 and "200" in out_h and "ready" in out_r:
            report("PASS", "outboxd health: /healthz and (--ready) /readyz 200 on the streaming relay")
        else:
            report("FAIL", "outboxd health on the streaming relay", f"{rc_h} {out_h!r}; {rc_r} {out_r!r}")

        def insert(n):
            pg.sql("INSERT INTO public.outbox (event_id, aggregate_type, aggregate_id, event_type, "
                   "payload) VALUES (%s, 'order', %s, 'created', '{\"n\": 1}')", str(uuid.uuid4()), str(n))

        insert(1)
        try:
            js.wait_count("OUTBOX", 1, 30)
            subjects = [m["subject"] for m in js.dump("OUTBOX")]
            assert subjects == ["outbox.order.created"], subjects
            report("PASS", "an outbox row reaches stream OUTBOX (outbox.>) as outbox.order.created")
        except AssertionError as e:
            report("FAIL", "an outbox row reaches stream OUTBOX", e)

        kv = wait_for(lambda: (nats.request_json("$JS.API.STREAM.INFO.KV_outboxd") or {}), 10)
        if kv and "error" not in kv:
            report("PASS", "outboxd created its checkpoint bucket (KV_outboxd)")
        else:
            report("FAIL", "checkpoint bucket KV_outboxd", kv)

        strace_out = tmp / "strace.txt" if a.strace else None
        relay_b = Daemon("relay-b", [a.bin, "run"], env_for(port_b), tmp, strace_out).start()
        relays.append(relay_b)
        standby = wait_for(lambda: not relay_b.alive() or (
            healthcheck(addr_b, "/healthz")[0] == 0 and "standby" in healthcheck(addr_b, "/readyz")[1]), 60)
        rc_h, out_h = healthcheck(addr_b, "/healthz")
        rc_r, out_r = healthcheck(addr_b, "/readyz")
        if relay_b.alive() and standby and rc_h == 0 and rc_r != 0 and "503" in out_r:
            report("PASS", "second replica is a standby: /healthz 200 (probes), /readyz 503 standby")
        else:
            report("FAIL", "second replica as a standby",
                   f"healthz {rc_h} {out_h!r}; readyz {rc_r} {out_r!r}; {relay_b.log_tail()}")

        try:
            status = Path(f"/proc/{relay_a.pid()}/status").read_text()
            hwm_kib = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))
            report("PASS" if hwm_kib < 64 * 1024 else "FAIL",
                   f"peak memory of the streaming relay {hwm_kib / 1024:.1f} MiB (Kubernetes limit 64Mi)")
        except (OSError, AttributeError) as e:
            report("FAIL", "peak memory of the streaming relay", e)

        rc, took = relay_a.terminate(15)
        if rc == 0:
            report("PASS", f"SIGTERM: the streaming relay exits 0 in {took:.1f}s (stop timeouts: 15s)")
        else:
            report("FAIL", "SIGTERM to the streaming relay", f"exit {rc} after {took:.1f}s: {relay_a.log_tail()}")

        took_over = wait_for(lambda: not relay_b.alive() or healthcheck(addr_b, "/readyz")[0] == 0, 30)
        if relay_b.alive() and took_over:
            insert(2)
            try:
                js.wait_count("OUTBOX", 2, 30)
                report("PASS", "the standby takes over the slot and relays the next row")
            except AssertionError as e:
                report("FAIL", "the standby relays after taking over", e)
        else:
            report("FAIL", "the standby takes over", relay_b.log_tail())

        rc, took = relay_b.terminate(15)
        if rc != 0:
            report("FAIL", "SIGTERM to the second relay", f"exit {rc}: {relay_b.log_tail()}")

        # sd_notify, for Type=notify in deploy/outboxd.service.
        time.sleep(0.3)
        notify.close()
        got_ready, got_stopping = notify.first("READY"), notify.first("STOPPING")
        if not notify.messages:
            report("SKIP", "sd_notify READY=1/STOPPING=1 (Type=notify)", "outboxd sends nothing to NOTIFY_SOCKET yet")
        elif got_ready and got_stopping and got_ready[0] <= got_stopping[0]:
            report("PASS", "sd_notify: READY=1 while streaming, then STOPPING=1 on SIGTERM")
        else:
            report("FAIL", "sd_notify", f"received {[m for _, m in notify.messages]}")

        if strace_out:
            allow = allowed_syscalls()
            used = traced_syscalls(strace_out) if strace_out.exists() else set()
            if allow is None or not used:
                report("FAIL", "system calls vs SystemCallFilter", "no filter in the unit or no strace output")
            else:
                outside = sorted(used - allow)
                if outside:
                    report("FAIL", "system calls vs deploy/outboxd.service SystemCallFilter",
                           f"outside the filter (EPERM under systemd): {', '.join(outside)}")
                else:
                    report("PASS", f"all {len(used)} system calls of a standby-to-active run pass "
                           "outboxd.service's SystemCallFilter")
    except Exception as e:  # noqa: BLE001 - report, then clean up
        report("FAIL", "smoke test", f"{type(e).__name__}: {e}")
    finally:
        for r in relays:
            r.kill()
        if notify is not None:
            notify.close()
        if nats is not None:
            nats.stop()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    checkreport.run(main)
