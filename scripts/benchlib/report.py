"""From the results dict alone: the targets (targets(R) adds R["targets"]) and the text report,
the main table, then live beside its floor, body sizes and the profile."""

import os

from .common import fmt_int


def targets(R):
    d = R["drain"]
    live10 = next((s for s in R.get("live", {}).get("steps", []) if s["target_rate"] == 10000), None)
    p99 = None
    if live10:
        p99 = live10["sub_p99_ms"] if live10["sub_p99_ms"] is not None else live10["hist_p99_ms"]
    R["targets"] = {
        "drain_ratio_ge_0.85": {"value": d["ratio_to_limit_ab"], "ok": d["ratio_to_limit_ab"] >= 0.85},
        "drain_rate_ge_60k": {"value": d["rate"], "ok": d["rate"] >= 60000},
        "live_p99_le_10ms_at_10k": {"value_ms": p99, "hist_p99_ms": live10 and live10["hist_p99_ms"],
                                    "ok": p99 is not None and p99 <= 10 and bool(live10["kept_up"])},
        "live_p99_le_2x_floor_when_kept_up": {
            "value": [s.get("p99_ratio_to_floor") for s in R.get("live", {}).get("steps", []) if s["kept_up"]],
            "ok": bool(R.get("live")) and all(s.get("p99_ratio_to_floor") is not None
                                              and s["p99_ratio_to_floor"] <= 2
                                              for s in R["live"]["steps"] if s["kept_up"])},
        "live_keeps_up_ge_0.5_limit_ab": {"value": R.get("live", {}).get("max_rate_ratio_to_limit_ab"),
                                          "ok": (R.get("live", {}).get("max_rate_ratio_to_limit_ab") or 0) >= 0.5},
        "relay_cpu_le_5s_per_million": {"value": d["relay_cpu_s_per_million"],
                                        "ok": d["relay_cpu_s_per_million"] <= 5},
        "peak_rss_le_32MiB": {"value": d["peak_rss_mib"], "ok": d["peak_rss_mib"] is not None
                              and d["peak_rss_mib"] <= 32, "backlog_events": d["events"]},
    }


def report(R):
    m = R["machine"]
    v = m["versions"]
    L = R["limits"]
    d = R["drain"]
    ab = L["AB"]["rate"]
    n = R["config"]["events"]
    out = []
    p = out.append
    p("")
    p(f"outboxd benchmark: {fmt_int(n)}-event backlog, {R['config']['body_bytes']} B bodies, "
      f"{len(R['config']['subjects'])} subjects, 10 headers + Nats-Expected-Last-Sequence; "
      f"transactions of {'/'.join(map(str, R['config']['tx_sizes']))} rows")
    p(f"machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}, "
      f"load {m['loadavg_start'][0]:.2f} at start; {m['date_utc']}")
    p(f"versions: {v['outboxd']}; {v['postgres']}; {v['nats_server']}; git {v['git']}")
    p("")
    b = R["backlog"]
    p(f"{'backlog write (PL/pgSQL)':34} {fmt_int(b['events']):>10} ev {b['seconds']:8.2f} s "
      f"{fmt_int(b['rate']):>9} ev/s   ({fmt_int(b['transactions'])} transactions)")
    def oth(x):
        return f"   [other processes {x['other_processes_cpu_s']:.1f} CPU-s]" if x.get("other_processes_cpu_s", 0) >= 0.5 else ""
    p(f"{'limit A   pg_recvlogical':34} {fmt_int(n):>10} ev {L['A']['seconds']:8.2f} s "
      f"{fmt_int(L['A']['rate']):>9} ev/s{oth(L['A'])}")
    p(f"{'limit B   bench_publish (core)':34} {fmt_int(n):>10} ev {L['B']['seconds']:8.2f} s "
      f"{fmt_int(L['B']['rate']):>9} ev/s{oth(L['B'])}")
    p(f"{'limit A+B (both at once)':34} {fmt_int(n):>10} ev {L['AB']['seconds']:8.2f} s "
      f"{fmt_int(ab):>9} ev/s   (A {L['AB']['A_seconds']:.2f} s, B {L['AB']['B_seconds']:.2f} s){oth(L['AB'])}")
    p(f"{'outboxd drain':34} {fmt_int(n):>10} ev {d['seconds']:8.2f} s "
      f"{fmt_int(d['rate']):>9} ev/s = {d['ratio_to_limit_ab']:.2f} x limit A+B   (target >= 0.85 and >= 60,000)"
      f"{oth(d)}")
    p(f"{'':34} = {d['rate'] / L['B']['rate']:.2f} x limit B, {d['rate'] / L['A']['rate']:.2f} x limit A")
    rp = R.get("repeats") or {}
    if rp.get("count", 1) > 1:
        p(f"{'  repeats (shown: the median one)':34} drain/A+B "
          + ", ".join(f"{x:.2f}" for x in rp["ratio_to_limit_ab"])
          + "; drain " + ", ".join(fmt_int(x) for x in rp["drain"])
          + "; A+B " + ", ".join(fmt_int(x) for x in rp["limit_AB"]) + " ev/s")
    if "compare" in R:
        c = R["compare"]
        p(f"{'  compare: ' + os.path.basename(c['relay_bin']):34} drain/A+B "
          + ", ".join(f"{x:.2f}" for x in c["ratio_to_limit_ab"])
          + "; CPU s/M " + ", ".join(f"{x:.2f}" for x in c["relay_cpu_s_per_million"])
          + "; cs/ev " + ", ".join(f"{x:.3f}" for x in c["relay_ctx_switches_per_event"])
          + "; RSS MiB " + ", ".join(f"{x:.1f}" for x in c["peak_rss_mib"]))
        p(f"{'  this build, same repeats':34} drain/A+B "
          + ", ".join(f"{x:.2f}" for x in rp.get("ratio_to_limit_ab", [d["ratio_to_limit_ab"]]))
          + "; CPU s/M " + ", ".join(f"{x:.2f}" for x in rp.get("relay_cpu_s_per_million", [d["relay_cpu_s_per_million"]]))
          + "; cs/ev " + ", ".join(f"{r['drain']['relay_ctx_switches_per_event']:.3f}" for r in (rp.get("runs") or [{"drain": d}]))
          + "; RSS MiB " + ", ".join(f"{x:.1f}" for x in rp.get("peak_rss_mib", [d["peak_rss_mib"]])))
    p(f"{'  start-up (to streaming)':34} {d['startup_s']} s")
    p(f"{'  relay CPU':34} {d['relay_cpu_s_per_million']:.2f} s per million events "
      f"({d['relay_cpu_s']:.2f} s; target <= 5)")
    p(f"{'  peak RSS (VmHWM)':34} {d['peak_rss_mib']:.1f} MiB   (target <= 32 with a 1M backlog)")
    p(f"{'  CPU during limit A+B':34} pg_recvlogical {L['AB']['A_tool_cpu_s']:.1f} s, bench_publish "
      f"{L['AB']['B_tool_cpu_s']:.1f} s, PostgreSQL {L['AB']['postgres_cpu_s']:.1f} s, nats-server "
      f"{L['AB']['nats_server_cpu_s']:.1f} s (limit A+B pays for two client processes: a relay can beat it)")
    p(f"{'  CPU during the drain':34} relay {d['relay_cpu_s']:.1f} s, PostgreSQL {d['postgres_cpu_s']:.1f} s "
      f"(walsender {d['walsender_cpu_s']} s), nats-server {d['nats_server_cpu_s']:.1f} s, other processes "
      f"{d['other_processes_cpu_s']:.1f} s; {d['relay_ctx_switches_per_event']} relay context switches/event")
    if d.get("relay_threads"):
        p(f"{'  relay threads (main first)':34} "
          + ", ".join(f"{t['cpu_s']:.2f} s/{t['ctx_switches_per_event']:.3f} cs/ev" for t in d["relay_threads"]))
    if "live" in R:
        live_report(R, p)
    sizes_report(R, p)
    profile_report(R, p)
    p("")
    p("targets:")
    for k, t in R["targets"].items():
        val = t.get("value", t.get("value_ms"))
        p(f"  {k:32} {'PASS' if t['ok'] else 'MISS'}  ({val})")
    p(f"\ntotal run time {R['total_seconds']:.0f} s")
    return "\n".join(out)


def live_report(R, p):
    def q3(a, b, c):
        return "/".join("-" if x is None else f"{x:.2f}" for x in (a, b, c))
    p("")
    p("live (relay caught up; writer: 1000 tx/s of rate/1000 rows, own process), commit to receipt by a core")
    p("NATS subscriber, beside the floor (PostgreSQL alone + NATS alone at the same rate, no relay):")
    p(f"  {'target':>8} {'written':>9} {'kept up':>8} {'behind':>7}  {'outboxd p50/p99/p99.9':>22}"
      f"  {'PG alone p99':>12} {'NATS alone p99':>14}  {'floor p50/p99/p99.9':>20} {'x floor':>7}"
      f"  {'ack p99':>7} {'CPU s/M':>7} {'cs/ev':>5} {'other':>5}")
    for s in R["live"]["steps"]:
        f = s.get("floor") or {}
        ku = "yes" if s["kept_up"] else "NO"
        if not s["writer_reached_target"]:
            ku += "*"
        ratio = s.get("p99_ratio_to_floor")
        p(f"  {fmt_int(s['target_rate']):>8} {fmt_int(s['write_rate']):>9} {ku:>8} "
          f"{format(s['lag_at_writer_end_s'], '.2f') + ' s':>7}  "
          f"{q3(s['sub_p50_ms'], s['sub_p99_ms'], s['sub_p999_ms']):>22}  "
          f"{'-' if f.get('pg_p99_ms') is None else format(f['pg_p99_ms'], '.2f'):>12} "
          f"{'-' if f.get('nats_p99_ms') is None else format(f['nats_p99_ms'], '.2f'):>14}  "
          f"{q3(f.get('floor_p50_ms'), f.get('floor_p99_ms'), f.get('floor_p999_ms')):>20} "
          f"{'-' if ratio is None else format(ratio, '.2f'):>7}  "
          f"{'-' if s['hist_p99_ms'] is None else format(s['hist_p99_ms'], '.1f'):>7} "
          f"{s['relay_cpu_s_per_million'] or 0:>7.2f} "
          f"{s['relay_ctx_switches_per_event'] or 0:>5.2f} {s['other_processes_cpu_s']:>5.1f}")
    lv = R["live"]
    if lv["max_rate_kept_up"]:
        p(f"  highest rate kept up: {fmt_int(lv['max_rate_kept_up'])} ev/s = "
          f"{lv['max_rate_ratio_to_limit_ab']:.2f} x limit A+B (stopped: {lv['stopped_because']})")
    else:
        p(f"  highest rate kept up: below 10,000 ev/s ({lv['stopped_because']})")
    p("  ms throughout. outboxd: receive time - Outbox-Commit-Time at a subscriber of every event (1k/s) or of")
    p("  outbox.order.created (1/8 of them). PG alone: a bare pgoutput consumer, commit to receipt of each")
    p("  Commit. NATS alone: bench_publish --rate, the same messages in one write per millisecond's burst,")
    p("  publish to receipt. floor = PG alone + NATS alone at each quantile, both run at once; x floor =")
    p("  outboxd's p99 / the floor's p99. ack p99: commit to PubAck, the relay's histogram (buckets 1, 2.5,")
    p("  5, 10, 25 ms..., interpolated). kept up: the lag did not grow over the step's second half and was")
    p("  under 1 s of events when the writer stopped (behind: that lag). * the writer missed the target rate.")
    p("  CPU s/M: relay CPU seconds per million events; cs/ev: relay context switches per event; other: CPU-s")
    p("  of processes outside this benchmark during the step (the machine is shared).")


def sizes_report(R, p):
    p("")
    p("body sizes (drain and limits on a fresh backlog each; 16 KiB with N/10 events):")
    p(f"  {'body':>7} {'events':>10} {'limit A':>10} {'limit B':>10} {'limit A+B':>10} {'outboxd':>10}"
      f" {'x A+B':>6} {'x B':>6} {'CPU s/M':>8} {'RSS MiB':>8} {'other':>6}")
    for s in R["sizes"]:
        p(f"  {s['body_bytes']:>5} B {fmt_int(s['events']):>10} {fmt_int(s['limit_A']):>10} "
          f"{fmt_int(s['limit_B']):>10} {fmt_int(s['limit_AB']):>10} {fmt_int(s['drain']):>10} "
          f"{s['ratio_to_limit_ab']:>6.2f} {s['ratio_to_limit_b']:>6.2f} {s['relay_cpu_s_per_million']:>8.2f} "
          f"{s['peak_rss_mib']:>8.1f} {s.get('other_processes_cpu_s', 0):>6.1f}")
    p("  (rates in events/s; other: CPU-s of processes outside the benchmark during that row's limits and drain)")


def profile_report(R, p):
    if "profile" in R and R["profile"].get("top_self"):
        pr = R["profile"]
        p("")
        p(f"profile: callgrind, relay draining {fmt_int(pr['events'])} events: {fmt_int(pr['total_ir'])} "
          f"instructions, {fmt_int(pr['ir_per_event'])} per event; top functions by own instructions:")
        for r in pr["top_self"]:
            p(f"  {r['pct']:5.1f}%  {fmt_int(r['ir']):>14}  {r['function']}")
