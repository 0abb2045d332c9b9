"""Limits A, B and A+B: what PostgreSQL can decode and send (pg_recvlogical), what NATS JetStream
can store (tests/tools/bench_publish, the way outboxd publishes), and both at once: the rate of a
relay that cost nothing."""

import json
import os
import subprocess
import time

from .common import BSTREAM, PUBLICATION, WINDOW, WINDOW_BYTES, fmt_int, log
from .procfs import CpuMeter


def recvlogical_cmd(bench, slot, endpos):
    return [str(bench.pg_bindir / "pg_recvlogical"), "-d", bench.pg.dsn, "--slot", slot, "--start",
            "--endpos", bench.h.lsn_text(endpos), "--no-loop", "-o", "proto_version=1",
            "-o", f"publication_names={PUBLICATION}", "-f", "/dev/null", "-s", "10"]


def publish_cmd(bench, n, body_bytes):
    window = max(1, min(WINDOW, WINDOW_BYTES // (body_bytes + 450)))
    return [str(bench.bench_publish), f"--url={bench.nats.url}", f"--stream={BSTREAM}",
            "--subject-prefix=benchb", f"--count={n}", f"--body-bytes={body_bytes}",
            f"--window={window}", "--mode=core", "--chain"], window


def run_limits(bench, n, body_bytes, slot_a, slot_ab, endpos):
    """Limit A, limit B, then both at once. Returns a dict."""
    out = {}
    cpu = CpuMeter(bench)
    # A
    log(f"limit A: pg_recvlogical over {fmt_int(n)} events")
    s0 = cpu.snap()
    t0 = time.monotonic()
    p = bench.spawn(recvlogical_cmd(bench, slot_a, endpos), stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    rc, tool_cpu = bench.reap(p, timeout=600)
    el = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"pg_recvlogical failed ({rc}): {p.stderr.read().decode()[-500:]}")
    time.sleep(0.3)  # the walsender exits and the postmaster reaps it (its CPU joins cutime)
    out["A"] = {"seconds": round(el, 3), "rate": round(n / el, 1), "tool_cpu_s": round(tool_cpu, 2),
                **CpuMeter.delta(s0, cpu.snap())}
    bench.drop_slot(slot_a)
    # B
    log(f"limit B: bench_publish of {fmt_int(n)} messages")
    bench.nr.reset_stream(BSTREAM, "benchb.>")
    cmd, window = publish_cmd(bench, n, body_bytes)
    s0 = cpu.snap()
    t0 = time.monotonic()
    p = bench.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rc, tool_cpu = bench.reap(p, timeout=900)
    el = time.monotonic() - t0
    res = json.loads(p.stdout.read() or b"{}")
    if rc != 0 or res.get("stored") != n:
        raise RuntimeError(f"bench_publish failed ({rc}): {res} {p.stderr.read().decode()[-500:]}")
    out["B"] = {"seconds": round(el, 3), "rate": round(n / el, 1), "tool_cpu_s": round(tool_cpu, 2),
                "window": window, "tool": res, **CpuMeter.delta(s0, cpu.snap())}
    # A+B
    log("limit A+B: both at once")
    bench.nr.reset_stream(BSTREAM, "benchb.>")
    s0 = cpu.snap()
    t0 = time.monotonic()
    pa = bench.spawn(recvlogical_cmd(bench, slot_ab, endpos), stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
    pb = bench.spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ends = {}
    while len(ends) < 2:
        for name, pp in (("A", pa), ("B", pb)):
            if name not in ends:
                pid, status, ru = os.wait4(pp.pid, os.WNOHANG)
                if pid == pp.pid:
                    pp.returncode = os.waitstatus_to_exitcode(status)
                    bench.procs.remove(pp)
                    ends[name] = (time.monotonic() - t0, pp.returncode, ru.ru_utime + ru.ru_stime)
        if time.monotonic() - t0 > 900:
            raise RuntimeError("limit A+B did not finish in 900 s")
        time.sleep(0.002)
    res = json.loads(pb.stdout.read() or b"{}")
    if ends["A"][1] != 0 or ends["B"][1] != 0 or res.get("stored") != n:
        raise RuntimeError(f"limit A+B failed: {ends} {res} {pa.stderr.read().decode()[-300:]}")
    el = max(ends["A"][0], ends["B"][0])
    time.sleep(0.3)
    out["AB"] = {"seconds": round(el, 3), "rate": round(n / el, 1),
                 "A_seconds": round(ends["A"][0], 3), "B_seconds": round(ends["B"][0], 3),
                 "A_rate": round(n / ends["A"][0], 1), "B_rate": round(n / ends["B"][0], 1),
                 "A_tool_cpu_s": round(ends["A"][2], 2), "B_tool_cpu_s": round(ends["B"][2], 2),
                 **CpuMeter.delta(s0, cpu.snap())}
    bench.drop_slot(slot_ab)
    bench.nr.delete_stream(BSTREAM)
    return out
