"""--profile: callgrind over the relay draining a backlog of its own, and its top functions by
their own and by inclusive instructions."""

import os
import re
import shutil
import subprocess

from .backlog import fill
from .common import MAIN_BODY, log
from .drain import drain


def profile(bench, n=50000):
    if not shutil.which("valgrind") or not shutil.which("callgrind_annotate"):
        log("no valgrind: skipping the profile")
        return {"skipped": "valgrind not installed"}
    bench.pg.sql("TRUNCATE public.outbox")
    slot = bench.new_slot("profile")
    fill(bench, n, MAIN_BODY)
    out = bench.tmp / "callgrind.out"
    res = drain(bench, n, slot, "relay-callgrind", timeout=1200,
                     wrapper=f"valgrind --tool=callgrind --callgrind-out-file={out}")
    bench.stop_relay(120)
    bench.drop_slot(slot)
    ann = subprocess.run(["callgrind_annotate", "--inclusive=no", str(out)], capture_output=True,
                         text=True).stdout
    ann_incl = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)], capture_output=True,
                              text=True).stdout
    total = None
    mt = re.search(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS", ann, re.M)
    if mt:
        total = int(mt.group(1).replace(",", ""))

    def top(text, k):
        rows = []
        for line in text.splitlines():
            mm = re.match(r"^\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(\S.*)$", line)
            if mm and "PROGRAM TOTALS" not in line:
                rows.append({"ir": int(mm.group(1).replace(",", "")), "pct": float(mm.group(2)),
                             "function": short_fn(mm.group(3).strip()), "raw": mm.group(3).strip()})
            if len(rows) >= k:
                break
        return rows

    return {"events": n, "total_ir": total, "ir_per_event": round(total / n) if total else None,
            "seconds_under_callgrind": res["seconds"], "top_self": top(ann, 15),
            "top_inclusive": top(ann_incl, 25)}


def short_fn(text):
    """'./malloc/./malloc/malloc.c:_int_free [/usr/lib/.../libc.so.6]' -> '_int_free (libc.so.6)';
    'build/../src/outbox.c:outbox_map_insert [...]' -> 'outbox_map_insert (outbox.c)'."""
    mm = re.match(r"^(.*?):(\S+)(?:\s+\[(.*)\])?$", text)
    if not mm:
        return text
    src, fn, obj = mm.group(1), mm.group(2), mm.group(3) or ""
    if "/src/" in src or "/tests/" in src:
        return f"{fn} ({os.path.basename(src)})"
    return f"{fn} ({os.path.basename(obj) or os.path.basename(src)})"
