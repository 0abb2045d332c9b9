"""What every part of the benchmark shares: where the repository is, what the benchmark writes
(aggregate and event types, so subjects; transaction and body sizes), the names of the
publication and the streams, outboxd's window defaults, the test server's PostgreSQL settings,
and the two print helpers (log lines to stderr, integers with thousands separators)."""

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench"  # the entry point; the helper processes run it again (--_role)

AGG_TYPES = ["order", "customer", "invoice", "payment"]  # same as tests/tools/bench_publish.c
EVENT_TYPES = ["created", "updated"]
TX_SIZES = [1, 10, 100, 1000]
MAIN_BODY = 200
SIZES = [100, 1024, 16384]
WINDOW = 4096                 # outboxd --max-inflight default
WINDOW_BYTES = 16 * 1024 * 1024  # outboxd --max-inflight-bytes default
PUBLICATION = "outboxd"
STREAM = "OUTBOX"             # outboxd's stream, subjects outbox.>
BSTREAM = "BENCHB"            # bench_publish's stream, subjects benchb.>
PG_CONF = {
    "shared_buffers": "'256MB'",
    "max_wal_size": "'8GB'",
    "checkpoint_timeout": "'30min'",
    "autovacuum": "off",
    "wal_sender_timeout": "'60s'",
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_int(n):
    return f"{int(round(n)):,}"
