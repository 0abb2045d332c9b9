"""Figures from samples, no I/O beyond the latency files: the relay's Prometheus text parsed, its
commit-to-ack histogram and quantiles interpolated as Prometheus does, percentiles of sorted
latencies, the floor's independent sum, and the file format of the latency helpers (every commit
time, then every latency, as doubles)."""

import array
import re


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def histogram(m, name="outboxd_commit_to_ack_seconds"):
    """[(upper bound, cumulative count)] from parsed metrics."""
    rx = re.compile(re.escape(name) + r'_bucket\{le="([^"]+)"\}')
    out = []
    for k, v in m.items():
        mm = rx.fullmatch(k)
        if mm:
            le = mm.group(1)
            out.append((float("inf") if le == "+Inf" else float(le), v))
    return sorted(out)


def hist_delta(a, b):
    da = dict(a)
    return [(le, c - da.get(le, 0.0)) for le, c in b]


def hist_quantile(h, q):
    """Prometheus histogram_quantile: linear interpolation inside the bucket (lower bound 0 for
    the first). None when empty; the last finite bound when it falls into +Inf."""
    if not h or h[-1][1] <= 0:
        return None
    total = h[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in h:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return h[-2][0] if len(h) > 1 else None


def percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def ms(v):
    return None if v is None else round(v * 1000, 3)


def independent_sum(a, b, n=200000):
    """Sorted sums of n random pairs (one from a, one from b): the distribution of the sum of
    two independent latencies, for the floor's tighter bound."""
    import random
    if not a or not b:
        return []
    rnd = random.Random(24)
    return sorted(rnd.choice(a) + rnd.choice(b) for _ in range(n))


def write_latencies(path, commits, lats):
    """The file the latency roles leave: every commit time, then every latency (doubles)."""
    with open(path, "wb") as f:
        commits.tofile(f)
        lats.tofile(f)


def read_latencies(path, lo, hi):
    """The latencies (s, sorted) from write_latencies of what committed between lo and hi."""
    raw = array.array("d")
    with open(path, "rb") as f:
        raw.frombytes(f.read())
    half = len(raw) // 2
    return sorted(l for c, l in zip(raw[:half], raw[half:]) if lo <= c <= hi)
