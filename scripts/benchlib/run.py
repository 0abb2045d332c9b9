"""One run in order: the description of the machine and the versions, the servers, every slot, the
backlog, limits and drain (--repeat times, with --compare), live and its floor, body sizes,
the profile, the targets. Everything lands in bench.results."""

import datetime as dt
import os
import platform
import subprocess
import time

from . import procfs
from .backlog import fill
from .common import (AGG_TYPES, EVENT_TYPES, MAIN_BODY, PG_CONF, REPO, SIZES, STREAM, TX_SIZES,
                     WINDOW, fmt_int, log)
from .drain import drain
from .limits import run_limits
from .live import floor_step, live_step
from .procfs import proc_meminfo
from .profile import profile
from .report import targets


def run(bench):
    a = bench.a
    n = a.events
    R = bench.results
    R["config"] = {"events": n, "quick": a.quick, "repeat": a.repeat, "body_bytes": MAIN_BODY,
                   "tx_sizes": TX_SIZES,
                   "subjects": [f"outbox.{x}.{y}" for x in AGG_TYPES for y in EVENT_TYPES],
                   "headers": 9, "chain_header": True, "window": WINDOW,
                   "limit_b_mode": "core publish with reply subject <inbox>.<i>, one wildcard "
                                   "subscription for PubAcks, window 4096 (like outboxd)",
                   "postgres_conf": {**PG_CONF, "fsync": "off", "wal_level": "logical"},
                   "relay_flags": "defaults except --create=false (strict order, max-inflight 4096, "
                                  "16MiB)"}
    R["machine"] = machine_info(bench)
    procfs.FOREIGN = procfs.ForeignMeter()
    bench.start_servers()

    # the main backlog: every slot first
    reps = max(1, a.repeat)
    slots = [(bench.new_slot("a"), bench.new_slot("ab"), bench.new_slot("relay")) for _ in range(reps)]
    cmp_slots = [bench.new_slot("cmp") for _ in range(reps)] if a.compare else []
    log(f"writing the backlog: {fmt_int(n)} events of {MAIN_BODY} B")
    R["backlog"] = fill(bench, n, MAIN_BODY)
    endpos = bench.pg.current_lsn()
    log(f"  {R['backlog']['seconds']} s ({fmt_int(R['backlog']['rate'])} ev/s)")
    runs = []
    cmp_runs = []
    for i, (slot_a, slot_ab, slot_r) in enumerate(slots):
        if reps > 1:
            log(f"repeat {i + 1} of {reps}")
        lim = run_limits(bench, n, MAIN_BODY, slot_a, slot_ab, endpos)
        if a.compare:  # the other binary first, so that the last relay stays up for live
            cd = drain(bench, n, cmp_slots[i], "relay-compare", relay_bin=a.compare)
            cd["ratio_to_limit_ab"] = round(cd["rate"] / lim["AB"]["rate"], 3)
            log(f"  compare drain {fmt_int(cd['rate'])} ev/s = {cd['ratio_to_limit_ab']:.2f} x limit A+B")
            cmp_runs.append(cd)
            bench.stop_relay()
            bench.drop_slot(cmp_slots[i])
        dr = drain(bench, n, slot_r, "relay-main")
        dr["ratio_to_limit_ab"] = round(dr["rate"] / lim["AB"]["rate"], 3)
        log(f"  drain {fmt_int(dr['rate'])} ev/s = {dr['ratio_to_limit_ab']:.2f} x limit A+B")
        runs.append((lim, dr))
        if i < reps - 1:  # the last relay stays up for the live phase
            bench.stop_relay()
            bench.drop_slot(slot_r)
    # the repeat with the median drain / limit A+B ratio stands for the run
    order = sorted(range(reps), key=lambda j: runs[j][1]["ratio_to_limit_ab"])
    mid = order[reps // 2] if reps % 2 else order[reps // 2 - 1]
    R["limits"], R["drain"] = runs[mid]
    R["repeats"] = {
        "count": reps, "representative": mid + 1,
        "limit_A": [x["A"]["rate"] for x, _ in runs], "limit_B": [x["B"]["rate"] for x, _ in runs],
        "limit_AB": [x["AB"]["rate"] for x, _ in runs], "drain": [d["rate"] for _, d in runs],
        "ratio_to_limit_ab": [d["ratio_to_limit_ab"] for _, d in runs],
        "relay_cpu_s_per_million": [d["relay_cpu_s_per_million"] for _, d in runs],
        "peak_rss_mib": [d["peak_rss_mib"] for _, d in runs],
        "other_processes_cpu_s": [x["AB"]["other_processes_cpu_s"] + d["other_processes_cpu_s"]
                                  for x, d in runs],
        "runs": [{"limits": x, "drain": d} for x, d in runs] if reps > 1 else None,
    }
    if a.compare:
        R["compare"] = {"relay_bin": a.compare, "representative": cmp_runs[mid],
                        "ratio_to_limit_ab": [d["ratio_to_limit_ab"] for d in cmp_runs],
                        "drain": [d["rate"] for d in cmp_runs],
                        "relay_cpu_s_per_million": [d["relay_cpu_s_per_million"] for d in cmp_runs],
                        "relay_ctx_switches_per_event": [d["relay_ctx_switches_per_event"] for d in cmp_runs],
                        "peak_rss_mib": [d["peak_rss_mib"] for d in cmp_runs], "runs": cmp_runs}
    ab = R["limits"]["AB"]["rate"]
    slot_r = slots[-1][2]

    skip = {x.strip() for x in a.skip.split(',') if x.strip()}
    # live, the relay still running and caught up
    if "live" not in skip:
        live = []
        d_fixed = 8 if a.quick else 20
        d_step = 5 if a.quick else 10
        deadline = a.live_budget
        t_live = time.monotonic()
        for rate in (1000, 10000):
            sub = "outbox.>" if rate <= 2000 else "outbox.order.created"
            live.append({"kind": "fixed", **live_step(bench, rate, d_fixed, MAIN_BODY, sub)})
        best = max((st["write_rate"] for st in live if st["kept_up"]), default=None)
        rate = 20000
        limit_reason = None
        while time.monotonic() - t_live + d_step * 2 + 5 < deadline:
            st = live_step(bench, rate, d_step, MAIN_BODY, "outbox.order.created")
            live.append({"kind": "step", **st})
            if not st["kept_up"]:
                limit_reason = f"the relay fell behind at {fmt_int(st['write_rate'])} ev/s"
                break
            best = max(best or 0, st["write_rate"])
            if not st["writer_reached_target"]:
                limit_reason = (f"the writer reached only {fmt_int(st['write_rate'])} of "
                                f"{fmt_int(rate)} ev/s")
                break
            rate += 10000
        else:
            limit_reason = "time budget for the live steps used up"
        R["live"] = {"steps": live, "max_rate_kept_up": best, "stopped_because": limit_reason,
                     "max_rate_ratio_to_limit_ab": round(best / ab, 3) if best else None,
                     "histogram_resolution": "buckets le 1, 2.5, 5, 10, 25, 50, 100, 250, 500 ms, 1, "
                                             "2.5, 5, 10, 30 s; quantiles linearly interpolated inside",
                     "subscriber": "core NATS subscription in a separate Python process; receive time "
                                   "(time.time() after recv) minus Outbox-Commit-Time, events committed "
                                   "during the step only; 1k/s: every event, else outbox.order.created "
                                   "(1/8 of them)"}
    bench.stop_relay()
    bench.drop_slot(slot_r)
    if "live" not in skip:
        log("floor: every live rate again with PostgreSQL alone and NATS alone, no relay")
        for st in R["live"]["steps"]:
            st["floor"] = floor_step(bench, st["target_rate"], st["duration_s"], st["sub_subject"])
            f99 = st["floor"]["floor_p99_ms"]
            st["p99_ratio_to_floor"] = (round(st["sub_p99_ms"] / f99, 2)
                                        if f99 and st["sub_p99_ms"] is not None else None)

    # body sizes
    def other_cpu(lim, dr):
        return round(sum(lim[k]["other_processes_cpu_s"] for k in ("A", "B", "AB"))
                     + dr["other_processes_cpu_s"], 2)

    sizes = [{"body_bytes": MAIN_BODY, "events": n, "limit_A": R["limits"]["A"]["rate"],
              "limit_B": R["limits"]["B"]["rate"], "limit_AB": ab, "drain": R["drain"]["rate"],
              "relay_cpu_s_per_million": R["drain"]["relay_cpu_s_per_million"],
              "peak_rss_mib": R["drain"]["peak_rss_mib"],
              "other_processes_cpu_s": other_cpu(R["limits"], R["drain"])}]
    for size in (SIZES if "sizes" not in skip else []):
        ns = n // 10 if size >= 16384 else n
        bench.pg.sql("TRUNCATE public.outbox")
        bench.pg.sql("CHECKPOINT")
        sa, sab, sr = bench.new_slot("a"), bench.new_slot("ab"), bench.new_slot("relay")
        log(f"body {size} B: writing {fmt_int(ns)} events")
        written = fill(bench, ns, size)
        endpos = bench.pg.current_lsn()
        lim = run_limits(bench, ns, size, sa, sab, endpos)
        dr = drain(bench, ns, sr, f"relay-{size}")
        bench.stop_relay()
        bench.drop_slot(sr)
        bench.nr.reset_stream(STREAM, "outbox.>")  # free its disk
        sizes.append({"body_bytes": size, "events": ns, "backlog": written, "limits": lim, "drain_detail": dr,
                      "limit_A": lim["A"]["rate"], "limit_B": lim["B"]["rate"], "limit_AB": lim["AB"]["rate"],
                      "drain": dr["rate"], "relay_cpu_s_per_million": dr["relay_cpu_s_per_million"],
                      "peak_rss_mib": dr["peak_rss_mib"], "other_processes_cpu_s": other_cpu(lim, dr)})
        log(f"  drain {fmt_int(dr['rate'])} ev/s, limit A+B {fmt_int(lim['AB']['rate'])} ev/s")
    for s in sizes:
        s["ratio_to_limit_ab"] = round(s["drain"] / s["limit_AB"], 3)
        s["ratio_to_limit_b"] = round(s["drain"] / s["limit_B"], 3)
    R["sizes"] = sizes

    if a.profile:
        log(f"profile: callgrind over the relay draining {fmt_int(a.profile_events)} events")
        R["profile"] = profile(bench, a.profile_events)

    R["total_seconds"] = round(time.monotonic() - bench.t_start, 1)
    R["machine"]["loadavg_end"] = os.getloadavg()
    targets(R)


def first_line(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(b):
    cpu_model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = proc_meminfo("MemTotal")
    git = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    import psycopg2
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu_model": cpu_model,
        "memory_gib": round(mem / 2**30, 1) if mem else None, "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
        "versions": {
            "outboxd": " / ".join((first_line([str(b.relay_bin), "--version"]) or "").splitlines()),
            "postgres": first_line([str(b.pg_bindir / "postgres"), "--version"]),
            "pg_recvlogical": first_line([str(b.pg_bindir / "pg_recvlogical"), "--version"]),
            "nats_server": first_line([b.h.nats_server_bin(), "--version"]),
            "python": platform.python_version(), "psycopg2": psycopg2.__version__.split()[0],
            "git": (git or "?") + ("+dirty" if dirty else ""),
        },
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
