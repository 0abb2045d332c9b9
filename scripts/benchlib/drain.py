"""The drain: outboxd on its own slot relaying a backlog into a fresh stream, timed until the stream
holds every event; the relay's CPU, peak RSS, threads and context switches, the walsender's CPU,
the relay's own counters."""

import time

from .common import STREAM, fmt_int, log
from .procfs import CpuMeter, proc_cpu, proc_status, relay_ctx_switches, relay_threads


def walsender_pid(bench, slot):
    s = bench.pg.slot(slot)
    return s["active_pid"] if s and s["active"] else None


def drain(bench, n, slot, name, timeout=900, wrapper=None, relay_bin=None):
    """Starts the relay on slot (a fresh stream) and waits until the stream holds n messages."""
    log(f"outboxd drain of {fmt_int(n)} events" + (" under " + wrapper.split()[0] if wrapper else "")
        + (f" ({relay_bin})" if relay_bin else ""))
    bench.nr.reset_stream(STREAM, "outbox.>")
    cpu = CpuMeter(bench)
    s0 = cpu.snap()
    t0 = time.monotonic()
    r = bench.start_relay(slot, name, wrapper, relay_bin)
    streaming_at = None
    wal_pid = None
    wal_cpu0 = None
    count = 0
    interval = 0.02 if not wrapper else 0.5
    while True:
        if not r.running:
            raise RuntimeError(f"relay exited with {r.proc.returncode}:\n{r.logs()[-2000:]}")
        if streaming_at is None and "streaming from slot" in r.logs():
            streaming_at = time.monotonic() - t0
        if wal_pid is None:
            wal_pid = walsender_pid(bench, slot)
            if wal_pid:
                wal_cpu0 = proc_cpu(wal_pid)  # ~0 right after it started
        count = bench.nr.stream_msgs(STREAM)
        if count >= n:
            break
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the stream holds {count} of {n} after {timeout} s")
        time.sleep(interval)
    el = time.monotonic() - t0
    relay_cpu = proc_cpu(r.pid)
    hwm = proc_status(r.pid, "VmHWM")
    ctx = relay_ctx_switches(r.pid)
    threads = relay_threads(r.pid)
    wal_cpu = proc_cpu(wal_pid) if wal_pid else None
    s1 = cpu.snap()
    m = bench.relay_metrics(r) if not wrapper else {}
    res = {"events": n, "seconds": round(el, 3), "rate": round(n / el, 1),
           "startup_s": round(streaming_at, 3) if streaming_at else None,
           "relay_cpu_s": round(relay_cpu, 3),
           "relay_cpu_s_per_million": round(relay_cpu / n * 1e6, 2),
           "relay_ctx_switches_per_event": round(ctx / n, 3),
           "relay_threads": [{"cpu_s": t["cpu_s"], "ctx_switches_per_event": round(t["ctx"] / n, 3)}
                             for t in threads],
           "peak_rss_bytes": hwm, "peak_rss_mib": round(hwm / 2**20, 2) if hwm else None,
           "walsender_cpu_s": round(wal_cpu - (wal_cpu0 or 0), 2) if wal_cpu is not None else None,
           **CpuMeter.delta(s0, s1)}
    if m:
        res["published_total"] = m.get("outboxd_events_published_total")
        res["duplicates_total"] = m.get("outboxd_events_duplicate_total")
        res["dead_letters"] = sum(v for k, v in m.items() if k.startswith("outboxd_dead_letter_total"))
        res["publish_errors"] = sum(v for k, v in m.items() if k.startswith("outboxd_publish_errors_total"))
    final = bench.nr.stream_msgs(STREAM)
    res["stream_messages"] = final
    if final != n:
        raise RuntimeError(f"the stream holds {final} messages, expected {n}")
    return res
