"""The outbox rows the benchmark writes: insert_sql, the INSERT ... SELECT of events with bodies of an
exact size (the backlog and the paced writer both use it), and fill, a backlog of N events in
transactions of 1, 10, 100, 1000 rows written by a server-side procedure."""

import time

from .common import AGG_TYPES, EVENT_TYPES, TX_SIZES


def insert_sql(prefix, lo, hi, body_bytes, pad_expr=None):
    """An INSERT ... SELECT generate_series(lo, hi) of outbox rows whose payload is exactly
    body_bytes long as text: {"pad": "<body_bytes - 32 chars>", "seq": "<10 digits>"}."""
    plen = body_bytes - 32
    assert plen >= 0
    if pad_expr is None:
        pad = ("0123456789abcdef" * (plen // 16 + 1))[:plen]
        pad_expr = f"'{pad}'"
    aggs = ",".join(f"'{x}'" for x in AGG_TYPES)
    evts = ",".join(f"'{x}'" for x in EVENT_TYPES)
    return (f"{prefix}INSERT INTO public.outbox (event_id, aggregate_type, aggregate_id, event_type, "
            f"payload, trace_id) SELECT gen_random_uuid(), (ARRAY[{aggs}])[1 + (i % {len(AGG_TYPES)})], "
            f"'agg-' || (i % 100000), (ARRAY[{evts}])[1 + ((i / {len(AGG_TYPES)}) % {len(EVENT_TYPES)})], "
            f"jsonb_build_object('pad', {pad_expr}, 'seq', lpad(i::text, 10, '0')), md5(i::text) "
            f"FROM generate_series({lo}, {hi}) AS i")


def fill(bench, n, body_bytes):
    """Writes the backlog: n events in transactions of 1, 10, 100, 1000 rows in turn. Bodies
    of > 1 KiB take their pad from 64 random strings, so that TOAST cannot compress them
    away. Returns stats."""
    plen = body_bytes - 32
    pad_expr = None
    if body_bytes > 1024:
        bench.pg.sql("DROP TABLE IF EXISTS bench_pads")
        bench.pg.sql("CREATE UNLOGGED TABLE bench_pads AS SELECT pad_id, "
                    "substr((SELECT string_agg(md5(random()::text || pad_id || j), '') FROM "
                    f"generate_series(1, {plen // 32 + 1}) AS j), 1, {plen}) AS pad "
                    "FROM generate_series(0, 63) AS pad_id")
        pad_expr = "(SELECT pad FROM bench_pads WHERE pad_id = i % 64)"
    sizes = ",".join(str(s) for s in TX_SIZES)
    body = insert_sql("", "start_seq + done", "start_seq + done + n - 1", body_bytes, pad_expr)
    bench.pg.sql(f"""
CREATE OR REPLACE PROCEDURE bench_fill(total bigint, start_seq bigint) LANGUAGE plpgsql AS $$
DECLARE
    sizes int[] := ARRAY[{sizes}];
    k int := 0;
    done bigint := 0;
    n int;
BEGIN
    WHILE done < total LOOP
        n := least(sizes[1 + k % {len(TX_SIZES)}], total - done);
        {body};
        COMMIT;
        done := done + n;
        k := k + 1;
    END LOOP;
END $$""")
    t0 = time.monotonic()
    bench.pg.sql("CALL bench_fill(%s, %s)", n, bench.seq)
    secs = time.monotonic() - t0
    bench.seq += n
    # no checkpoint in the middle of a measurement
    bench.pg.sql("CHECKPOINT")
    ntx = 0
    left, k = n, 0
    while left > 0:
        left -= min(TX_SIZES[k % len(TX_SIZES)], left)
        k += 1
        ntx += 1
    length = bench.pg.scalar("SELECT length(payload::text) FROM public.outbox LIMIT 1")
    return {"events": n, "transactions": ntx, "seconds": round(secs, 3),
            "rate": round(n / secs, 1), "body_bytes": length}
