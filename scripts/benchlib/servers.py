"""The run's processes and servers. NatsRaw: a plain NATS connection for JetStream API requests
(create, delete, count a stream). Bench: the state of one run (arguments, temporary folder,
PostgreSQL, nats-server, the relay, every helper process, the next event sequence number and
slot number) and what starts and stops them: every process is started through it and stopped by
PID in close(), also on failure. PostgreSQL and nats-server come from tests/integration/harness.py."""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .common import PG_CONF, PUBLICATION, REPO, STREAM, log
from .stats import parse_metrics

sys.path.insert(0, str(REPO / "tests" / "integration"))  # harness


class NatsRaw:
    """One plain NATS connection for JetStream API requests (no libnats in Python)."""

    def __init__(self, port):
        self.port = port
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.f = self.s.makefile("rb")
        if not self.f.readline().startswith(b"INFO"):
            raise RuntimeError("not a NATS server")
        self.inbox = f"_INBOX.bench{uuid.uuid4().hex[:12]}"
        self.n = 0
        self.s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\n'
                       + f"SUB {self.inbox}.* 1\r\n".encode())

    def request(self, subject, payload=b"", timeout=30.0):
        self.n += 1
        reply = f"{self.inbox}.{self.n}"
        self.s.settimeout(timeout)
        self.s.sendall(f"PUB {subject} {reply} {len(payload)}\r\n".encode() + payload + b"\r\n")
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("NATS connection closed")
            if line.startswith(b"PING"):
                self.s.sendall(b"PONG\r\n")
            elif line.startswith(b"MSG ") or line.startswith(b"HMSG "):
                parts = line.split()
                n = int(parts[-1])
                blob = self.f.read(n + 2)[:n]
                if parts[1].decode() != reply:
                    continue  # an answer to an earlier request that timed out
                if line.startswith(b"HMSG "):
                    hlen = int(parts[-2])
                    hdr, blob = blob[:hlen], blob[hlen:]
                    if b" 503" in hdr.split(b"\r\n", 1)[0]:
                        raise RuntimeError(f"no responders for {subject}")
                return json.loads(blob) if blob else {}
            elif line.startswith(b"-ERR"):
                raise RuntimeError(f"NATS error: {line.decode().strip()}")

    def js(self, subject, obj=None):
        r = self.request(subject, json.dumps(obj).encode() if obj is not None else b"")
        return r

    def create_stream(self, name, subject):
        cfg = {"name": name, "subjects": [subject], "storage": "file", "retention": "limits",
               "duplicate_window": 120 * 10**9, "num_replicas": 1, "discard": "old"}
        r = self.js(f"$JS.API.STREAM.CREATE.{name}", cfg)
        if "error" in r:
            raise RuntimeError(f"stream create {name}: {r['error']}")

    def delete_stream(self, name):
        r = self.js(f"$JS.API.STREAM.DELETE.{name}")
        if "error" in r and r["error"].get("err_code") != 10059:  # 10059: stream not found
            raise RuntimeError(f"stream delete {name}: {r['error']}")

    def reset_stream(self, name, subject):
        self.delete_stream(name)
        self.create_stream(name, subject)

    def stream_msgs(self, name):
        r = self.js(f"$JS.API.STREAM.INFO.{name}")
        if "error" in r:
            raise RuntimeError(f"stream info {name}: {r['error']}")
        return r["state"]["messages"]

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class Bench:
    def __init__(self, args):
        import harness
        self.h = harness
        self.a = args
        self.tmp = Path(tempfile.mkdtemp(prefix="outboxd-bench-", dir="/tmp"))
        os.chmod(self.tmp, 0o755)
        self.pg = None
        self.nats = None
        self.nr = None
        self.relay = None
        self.procs = []  # our own helper processes, stopped by PID in close()
        self.results = {}
        self.seq = 1
        self.slot_n = 0
        self.t_start = time.monotonic()
        self.build = harness.build_dir()
        self.bench_publish = self.build / "tests" / "bench_publish"
        self.bench_pgwatch = self.build / "tests" / "bench_pgwatch"
        self.relay_bin = harness.relay_bin()
        for p in (self.relay_bin, self.bench_publish, self.bench_pgwatch):
            if not os.access(p, os.X_OK):
                raise SystemExit(f"bench: {p} not found: build first (meson setup build && "
                                 "meson compile -C build)")
        self.pg_bindir = harness.pg_bindir()

    # -- processes

    def mkdir(self, name):
        d = self.tmp / name
        d.mkdir(mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
        return d

    def spawn(self, cmd, **kw):
        kw.setdefault("env", self.h.clean_env())
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def spawn_ready(self, cmd, what):
        """Starts one of this script's roles and waits for its "ready" line."""
        p = self.spawn(cmd, stdout=subprocess.PIPE, env=None)
        ready = select.select([p.stdout], [], [], 10)[0]
        if not ready or p.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the {what} did not start")
        return p

    def reap(self, p, timeout=30):
        """Waits for our child p; returns (rc, cpu seconds from its rusage)."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                if p in self.procs:
                    self.procs.remove(p)
                return p.returncode, ru.ru_utime + ru.ru_stime
            if time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"{p.args[0]} did not finish within {timeout:g} s")
            time.sleep(0.002)

    def stop_proc(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
            except ProcessLookupError:
                pass
        if p in self.procs:
            self.procs.remove(p)

    def close(self):
        for p in list(self.procs):
            self.stop_proc(p, signal.SIGKILL if p.poll() is None else signal.SIGTERM, 5)
        if self.relay is not None and self.relay.proc is not None:
            self.relay.kill()
        if self.nr is not None:
            self.nr.close()
        if self.nats is not None and self.nats.proc is not None:
            self.nats.stop()
        if self.pg is not None and self.pg.proc is not None:
            self.pg.stop(mode="immediate")
        if self.a.keep_tmp:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- set-up

    def start_servers(self):
        h = self.h
        log(f"starting PostgreSQL and nats-server in {self.tmp}")
        self.pg = h.PgServer(self.mkdir("pg"), extra_conf=PG_CONF).init().start()
        self.nats = h.NatsServer(self.mkdir("nats")).start()
        self.nr = NatsRaw(self.nats.port)
        h.create_outbox(self.pg)
        self.pg.sql(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE public.outbox WITH (publish = 'insert')")
        self.nr.create_stream(STREAM, "outbox.>")

    def new_slot(self, what):
        self.slot_n += 1
        name = f"bench_{what}_{self.slot_n}"
        self.pg.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", name)
        return name

    def drop_slot(self, name):
        self.pg.drop_slot(name)

    # -- the relay

    def start_relay(self, slot, name, wrapper=None, relay_bin=None):
        h = self.h
        port = h.free_port()
        args = [f"--pg-url={self.pg.dsn}", f"--nats-url={self.nats.url}", f"--slot={slot}",
                f"--publication={PUBLICATION}", "--table=public.outbox", "--create=false",
                f"--http-addr=127.0.0.1:{port}", "--log-level=info"]
        r = h.Relay(self.mkdir("relay"), args, name=name)
        if relay_bin:
            r.bin = relay_bin
        r.http_url = f"http://127.0.0.1:{port}"
        old = os.environ.get("OUTBOXD_RELAY_WRAPPER")
        if wrapper:
            os.environ["OUTBOXD_RELAY_WRAPPER"] = wrapper
        else:
            os.environ.pop("OUTBOXD_RELAY_WRAPPER", None)
        try:
            r.start()
        finally:
            if old is None:
                os.environ.pop("OUTBOXD_RELAY_WRAPPER", None)
            else:
                os.environ["OUTBOXD_RELAY_WRAPPER"] = old
        self.relay = r
        return r

    def stop_relay(self, timeout=30):
        r, self.relay = self.relay, None
        if r is None:
            return None
        rc = r.stop(timeout)
        if rc != 0:
            log(f"relay exited with {rc}; log tail:\n{r.logs()[-1500:]}")
        return rc

    def relay_metrics(self, r=None):
        r = r or self.relay
        status, text = r.http_get("/metrics", timeout=5)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(text)
