"""The live phase: with the relay caught up, a paced writer at one rate and a subscriber measuring
commit to receipt (live_step), then the same rate without the relay, PostgreSQL alone and NATS
alone at once (floor_step). The writer and the subscriber are helper processes of their own:
scripts/bench --_role writer|subscriber runs writer_main or subscriber_main."""

import array
import calendar
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .backlog import insert_sql
from .common import BSTREAM, MAIN_BODY, PUBLICATION, SCRIPT, STREAM, fmt_int, log
from .limits import publish_cmd
from .procfs import CpuMeter, relay_ctx_switches
from .stats import (hist_delta, hist_quantile, histogram, independent_sum, ms, percentile,
                    read_latencies, write_latencies)


def writer_main(a):
    """--_role writer: a paced writer. 1000 transactions/s (fewer below 1000 events/s) of
    rate/1000 rows each, for --duration seconds. Prints "P <unix time> <events>" progress lines
    and a final "R {json}"."""
    import psycopg2
    conn = psycopg2.connect(a.dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute(insert_sql("PREPARE bench_ins(bigint, int) AS ", "$1", "$1 + $2 - 1", a.body_bytes))
    txps = min(1000.0, a.rate)
    rows = max(1, int(round(a.rate / txps)))
    txps = a.rate / rows
    ntx = int(round(a.duration * txps))
    seq = a.seq
    events = 0
    behind_max = 0.0
    t0 = time.monotonic()
    u0 = time.time()
    last_p = 0.0
    print(f"S {u0:.6f}", flush=True)
    for k in range(ntx):
        due = t0 + k / txps
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        else:
            behind_max = max(behind_max, now - due)
        cur.execute("EXECUTE bench_ins(%s, %s)", (seq, rows))
        seq += rows
        events += rows
        now = time.monotonic()
        if now - last_p >= 0.1:
            print(f"P {time.time():.6f} {events}", flush=True)
            last_p = now
        if now - t0 > a.duration * 1.5 + 5:
            break  # far behind: stop, the report says so
    t1 = time.monotonic()
    print(f"P {time.time():.6f} {events}", flush=True)
    print("R " + json.dumps({"events": events, "transactions": k + 1 if ntx else 0, "rows_per_tx": rows,
                             "seconds": round(t1 - t0, 4), "rate": round(events / (t1 - t0), 1),
                             "behind_max_s": round(behind_max, 4), "start_unix": u0,
                             "end_unix": time.time(), "seq_next": seq}), flush=True)
    conn.close()


def subscriber_main(a):
    """--_role subscriber: a core NATS subscription; for each message, receive time minus its
    Outbox-Commit-Time. On SIGTERM writes pairs (commit unix time, latency s) to --out."""
    s = socket.create_connection(("127.0.0.1", a.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    commits, lats = array.array("d"), array.array("d")
    stop = [False]

    def on_term(*_):
        stop[0] = True
    signal.signal(signal.SIGTERM, on_term)
    s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
              + f"SUB {a.subject} 1\r\nPING\r\n".encode())
    buf = b""
    ready = False
    cache = {}
    key = b"Outbox-Commit-Time:"
    s.settimeout(0.2)
    while not stop[0]:
        try:
            data = s.recv(65536)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        now = time.time()
        if not data:
            break
        buf += data
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            if line.startswith(b"HMSG "):
                parts = line.split()
                hlen, tlen = int(parts[-2]), int(parts[-1])
                end = eol + 2 + tlen + 2
                if end > len(buf):
                    break
                hdr = buf[eol + 2:eol + 2 + hlen]
                i = hdr.find(key)
                if i >= 0:
                    v = hdr[i + len(key):hdr.find(b"\r\n", i)].strip().decode()
                    base = v[:19]
                    t = cache.get(base)
                    if t is None:
                        t = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
                        cache[base] = t
                    frac = v[20:-1]
                    ct = t + (int(frac) / 10 ** len(frac) if frac else 0.0)
                    commits.append(ct)
                    lats.append(now - ct)
                pos = end
            elif line.startswith(b"MSG "):
                n = int(line.split()[-1])
                end = eol + 2 + n + 2
                if end > len(buf):
                    break
                pos = end
            else:
                if line.startswith(b"PING"):
                    s.sendall(b"PONG\r\n")
                elif line.startswith(b"PONG") and not ready:
                    ready = True
                    print("ready", flush=True)
                pos = eol + 2
        buf = buf[pos:]
    write_latencies(a.out, commits, lats)


def live_step(bench, rate, duration, body_bytes, sample_subject):
    """One paced step with the relay running and caught up."""
    r = bench.relay
    base = bench.nr.stream_msgs(STREAM)
    m0 = bench.relay_metrics()
    cpu = CpuMeter(bench)
    s0 = cpu.snap([r.pid])
    ctx0 = relay_ctx_switches(r.pid)
    lat_file = bench.tmp / f"lat-{rate}-{time.monotonic_ns()}.bin"
    sub = bench.spawn_ready([sys.executable, str(SCRIPT), "--_role", "subscriber",
                            "--port", str(bench.nats.port), "--subject", sample_subject,
                            "--out", str(lat_file)], "latency subscriber")
    w = bench.spawn([sys.executable, str(SCRIPT), "--_role", "writer",
                    "--dsn", bench.pg.dsn, "--rate", str(rate), "--duration", str(duration),
                    "--body-bytes", str(body_bytes), "--seq", str(bench.seq)],
                   stdout=subprocess.PIPE, env=None)
    written = [0]
    final = {}

    def read_writer():
        for line in w.stdout:
            line = line.decode().strip()
            if line.startswith("P "):
                written[0] = int(line.split()[2])
            elif line.startswith("R "):
                final.update(json.loads(line[2:]))

    th = threading.Thread(target=read_writer, daemon=True)
    th.start()
    samples = []  # (unix time, written, stored, oldest pending age or None)
    t0 = time.monotonic()
    self_cpu0 = time.process_time()
    writer_cpu = None
    k = 0
    while writer_cpu is None:
        time.sleep(0.1)
        k += 1
        pid, status, ru = os.wait4(w.pid, os.WNOHANG)
        if pid == w.pid:
            w.returncode = os.waitstatus_to_exitcode(status)
            writer_cpu = ru.ru_utime + ru.ru_stime
        age = None
        if k % 5 == 0:
            try:
                age = bench.relay_metrics().get("outboxd_oldest_pending_age_seconds")
            except Exception:  # noqa: BLE001 - a slow scrape is not fatal
                pass
        samples.append((time.time(), written[0], bench.nr.stream_msgs(STREAM) - base, age))
        if time.monotonic() - t0 > duration * 2 + 30:
            raise RuntimeError("the writer did not finish")
    th.join(10)
    bench.procs.remove(w)
    if w.returncode != 0 or not final:
        raise RuntimeError(f"writer failed ({w.returncode})")
    bench.seq = final["seq_next"]
    total = final["events"]
    t_end = time.monotonic()
    while samples[-1][2] < total and time.monotonic() - t_end < max(30.0, duration * 2):
        time.sleep(0.02)
        samples.append((time.time(), total, bench.nr.stream_msgs(STREAM) - base, None))
    end_unix = final["end_unix"]
    caught = next((t for t, _, st, _ in samples if st >= total), None)
    catch_up = max(0.0, caught - end_unix) if caught is not None else None
    # events written and not yet in the stream when the writer stopped (interpolated)
    before = [(t, st) for t, _, st, _ in samples if t <= end_unix]
    after = [(t, st) for t, _, st, _ in samples if t > end_unix]
    if before and after:
        (ta, sa), (tb, sb) = before[-1], after[0]
        stored_end = sa + (sb - sa) * (end_unix - ta) / (tb - ta) if tb > ta else sa
    else:
        stored_end = samples[-1][2] if samples else 0
    lag_end = max(0.0, total - stored_end)
    time.sleep(0.3)  # the last acks reach the histogram and the subscriber
    m1 = bench.relay_metrics()
    s1 = cpu.snap([r.pid])
    ctx1 = relay_ctx_switches(r.pid)
    self_cpu = time.process_time() - self_cpu0
    sub.send_signal(signal.SIGTERM)
    _, sub_cpu = bench.reap(sub, timeout=20)
    lat = []
    try:
        lat = read_latencies(lat_file, final["start_unix"], final["end_unix"])
    except OSError:
        pass
    h = hist_delta(histogram(m0), histogram(m1))
    acked = h[-1][1] if h else 0
    # lag (events written and not yet in the stream) over the second half of the writer's run
    mid = final["start_unix"] + (end_unix - final["start_unix"]) / 2
    second = [(t, wr - st) for t, wr, st, _ in samples if mid <= t <= end_unix]
    slope = None
    if len(second) >= 3:
        mt = sum(t for t, _ in second) / len(second)
        ml = sum(v for _, v in second) / len(second)
        den = sum((t - mt) ** 2 for t, _ in second)
        slope = sum((t - mt) * (v - ml) for t, v in second) / den if den else None
    relay_cpu = s1["pids"][r.pid] - s0["pids"][r.pid]
    achieved = final["rate"]
    writer_ok = achieved >= 0.97 * rate
    # kept up: the lag does not grow (slope under 5% of the rate) and the relay was less than
    # one second of events behind when the writer stopped
    kept_up = (catch_up is not None and lag_end <= achieved * 1.0
               and (slope is None or slope <= 0.05 * achieved))
    res = {
        "target_rate": rate, "duration_s": duration, "written": total, "write_rate": achieved,
        "writer_rows_per_tx": final["rows_per_tx"], "writer_behind_max_s": final["behind_max_s"],
        "writer_reached_target": writer_ok,
        "catch_up_s": round(catch_up, 3) if catch_up is not None else None, "kept_up": kept_up,
        "lag_at_writer_end_events": round(lag_end), "lag_at_writer_end_s": round(lag_end / achieved, 3),
        "lag_events_max": max((wr - st for _, wr, st, _ in samples), default=0),
        "lag_slope_events_per_s": round(slope, 1) if slope is not None else None,
        "oldest_pending_age_max_s": max((a for *_, a in samples if a is not None), default=None),
        "histogram_events": acked,
        "hist_p50_ms": ms(hist_quantile(h, 0.5)), "hist_p99_ms": ms(hist_quantile(h, 0.99)),
        "hist_p999_ms": ms(hist_quantile(h, 0.999)),
        "histogram_delta": [[("+Inf" if le == float("inf") else le), c] for le, c in h],
        "sub_subject": sample_subject, "sub_samples": len(lat),
        "sub_p50_ms": ms(percentile(lat, 0.5)), "sub_p99_ms": ms(percentile(lat, 0.99)),
        "sub_p999_ms": ms(percentile(lat, 0.999)), "sub_max_ms": ms(lat[-1] if lat else None),
        "relay_cpu_s": round(relay_cpu, 3),
        "relay_cpu_s_per_million": round(relay_cpu / total * 1e6, 2) if total else None,
        "writer_cpu_s": round(writer_cpu, 2), "subscriber_cpu_s": round(sub_cpu, 2),
        "bench_script_cpu_s": round(self_cpu, 2),
        **CpuMeter.delta(s0, s1),
    }
    res["relay_ctx_switches_per_event"] = round((ctx1 - ctx0) / total, 2) if total else None
    log(f"  {fmt_int(rate)}/s: wrote {fmt_int(achieved)}/s, catch-up "
        f"{res['catch_up_s']} s, p99 hist {res['hist_p99_ms']} ms / sub {res['sub_p99_ms']} ms")
    return res


def floor_step(bench, rate, duration, sample_subject):
    """The floor at one rate (see the top of scripts/bench): PostgreSQL alone (paced writer, bare
    pgoutput consumer) and NATS alone (bench_publish --rate, a subscriber) at once, with no
    relay running."""
    slot = bench.new_slot("floor")
    bench.nr.reset_stream(BSTREAM, "benchb.>")
    me = [sys.executable, str(SCRIPT)]
    pg_out = bench.tmp / f"pgwatch-{rate}-{time.monotonic_ns()}.bin"
    nats_out = bench.tmp / f"natswatch-{rate}-{time.monotonic_ns()}.bin"
    watch = bench.spawn_ready([str(bench.bench_pgwatch), "--dsn", bench.pg.dsn, "--slot", slot,
                              "--publication", PUBLICATION, "--out", str(pg_out)], "pgoutput consumer")
    sub = bench.spawn_ready(me + ["--_role", "subscriber", "--port", str(bench.nats.port),
                                 "--subject", "benchb." + sample_subject.split(".", 1)[1],
                                 "--out", str(nats_out)], "latency subscriber")
    cpu = CpuMeter(bench)
    s0 = cpu.snap()
    w = bench.spawn(me + ["--_role", "writer", "--dsn", bench.pg.dsn, "--rate", str(rate),
                         "--duration", str(duration), "--body-bytes", str(MAIN_BODY), "--seq", str(bench.seq)],
                   stdout=subprocess.PIPE, env=None)
    cmd, _ = publish_cmd(bench, 0, MAIN_BODY)
    pb = bench.spawn([c for c in cmd if not c.startswith("--count=")]
                    + [f"--rate={int(rate)}", f"--duration={int(duration)}"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = w.stdout.read().decode().splitlines()
    rc, writer_cpu = bench.reap(w, timeout=duration * 2 + 30)
    final = next((json.loads(x[2:]) for x in lines if x.startswith("R ")), None)
    if rc != 0 or not final:
        raise RuntimeError(f"writer failed ({rc})")
    bench.seq = final["seq_next"]
    prc, pub_cpu = bench.reap(pb, timeout=duration * 2 + 90)
    pres = json.loads(pb.stdout.read() or b"{}")
    if prc != 0 or "start_unix" not in pres:
        raise RuntimeError(f"bench_publish --rate failed ({prc}): {pres} "
                           f"{pb.stderr.read().decode()[-500:]}")
    time.sleep(0.3)  # the last commits and messages reach the consumers
    s1 = cpu.snap()
    watch.send_signal(signal.SIGTERM)
    _, watch_cpu = bench.reap(watch, timeout=20)
    sub.send_signal(signal.SIGTERM)
    _, sub_cpu = bench.reap(sub, timeout=20)
    pg_lat = read_latencies(pg_out, final["start_unix"], final["end_unix"])
    nats_lat = read_latencies(nats_out, pres["start_unix"], pres["end_unix"])
    bench.drop_slot(slot)
    bench.nr.delete_stream(BSTREAM)
    res = {"target_rate": rate, "duration_s": duration,
           "pg_write_rate": final["rate"], "pg_transactions": len(pg_lat),
           "nats_publish_rate": pres.get("paced_rate"), "nats_samples": len(nats_lat),
           "nats_flush": pres.get("flush"), "nats_behind_max_s": pres.get("behind_max_s"),
           "pg_consumer_cpu_s": round(watch_cpu, 2), "publisher_cpu_s": round(pub_cpu, 2),
           "writer_cpu_s": round(writer_cpu, 2), "subscriber_cpu_s": round(sub_cpu, 2),
           **CpuMeter.delta(s0, s1)}
    for q, k in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
        a, b = percentile(pg_lat, q), percentile(nats_lat, q)
        res[f"pg_{k}_ms"], res[f"nats_{k}_ms"] = ms(a), ms(b)
        res[f"floor_{k}_ms"] = ms(a + b) if a is not None and b is not None else None
    indep = independent_sum(pg_lat, nats_lat)
    for q, k in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
        res[f"floor_indep_{k}_ms"] = ms(percentile(indep, q))
    log(f"  floor {fmt_int(rate)}/s: PG alone p99 {res['pg_p99_ms']} ms, NATS alone p99 "
        f"{res['nats_p99_ms']} ms ({res['nats_flush']}), floor p99 {res['floor_p99_ms']} ms")
    return res
