/*
 * metrics.c - the relay's counters and gauges, and their Prometheus text exposition.
 *
 * Writers (the relay thread, nats.c's threads) update the global `metrics` with relaxed atomic
 * operations: every value is an independent statistic, so no ordering between them is needed
 * and nothing on the hot path takes a lock. The HTTP thread renders a snapshot by loading each
 * value once; a scrape that races an update may see, say, a new published count next to an old
 * in-flight gauge, which is normal for Prometheus. The histogram's _count is the sum of its
 * buckets as loaded, so the +Inf bucket and _count always agree within one scrape.
 *
 * Numbers are printed exactly: integers as integers, and microsecond values (ages, timestamps,
 * the histogram's sum and bucket bounds) as decimal seconds with at most six fraction digits and
 * no trailing zeros ("2.5", "0.0025", "30", "0.000001").
 */
#include "outboxd/metrics.h"

#include <inttypes.h>
#include <stdio.h>

#include "outboxd_version.h"

Metrics metrics;

const double metrics_latency_bounds[METRICS_LATENCY_BUCKETS] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
};

/* The same bounds in microseconds: observing compares integers, rendering prints them
 * exactly. Keep the two tables in step (test_metrics checks it). */
static const int64_t latency_bounds_us[METRICS_LATENCY_BUCKETS] = {
    1000,   2500,   5000,    10000,   25000,   50000,    100000,
    250000, 500000, 1000000, 2500000, 5000000, 10000000, 30000000,
};

static const char *const publish_error_names[PUBERR_COUNT] = {
    [PUBERR_TIMEOUT] = "timeout",
    [PUBERR_NO_RESPONDERS] = "no_responders",
    [PUBERR_REJECTED] = "rejected",
    [PUBERR_CONNECTION] = "connection",
    [PUBERR_STREAM_FULL] = "stream_full",
    [PUBERR_ORDER] = "order",
    [PUBERR_NO_RESOURCES] = "no_resources",
};

static const char *const dead_letter_names[DLR_COUNT] = {
    [DLR_INVALID_EVENT_ID] = "invalid_event_id",
    [DLR_NULL_PAYLOAD] = "null_payload",
    [DLR_TOO_LARGE] = "too_large",
    [DLR_INVALID_SUBJECT] = "invalid_subject",
    [DLR_REJECTED] = "rejected",
    [DLR_INVALID_ENVELOPE] = "invalid_envelope",
    [DLR_NO_STREAM] = "no_stream",
};

#define RELAXED memory_order_relaxed

void metrics_publish_error(PublishError reason)
{
    if ((unsigned)reason < PUBERR_COUNT)
        atomic_fetch_add_explicit(&metrics.publish_errors[reason], 1, RELAXED);
}

void metrics_dead_letter(DeadLetterReason reason)
{
    if ((unsigned)reason < DLR_COUNT)
        atomic_fetch_add_explicit(&metrics.dead_letter[reason], 1, RELAXED);
}

void metrics_observe_latency(int64_t us)
{
    /* The commit time comes from the server's clock: a skewed clock can make it negative. */
    if (us < 0)
        us = 0;
    size_t i = 0;
    while (i < METRICS_LATENCY_BUCKETS && us > latency_bounds_us[i])
        i++;
    atomic_fetch_add_explicit(&metrics.latency_buckets[i], 1, RELAXED);
    atomic_fetch_add_explicit(&metrics.latency_count, 1, RELAXED);
    atomic_fetch_add_explicit(&metrics.latency_sum_us, (uint64_t)us, RELAXED);
}

const char *metrics_publish_error_name(PublishError reason)
{
    return (unsigned)reason < PUBERR_COUNT ? publish_error_names[reason] : "unknown";
}

const char *metrics_dead_letter_name(DeadLetterReason reason)
{
    return (unsigned)reason < DLR_COUNT ? dead_letter_names[reason] : "unknown";
}

/* Rendering */

void metrics_family(Buf *out, const char *name, const char *type, const char *help)
{
    buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Appends a count of microseconds as decimal seconds: "0", "2.5", "-0.000001". */
static void put_seconds(Buf *out, bool negative, uint64_t us)
{
    uint64_t whole = us / 1000000, frac = us % 1000000;
    buf_printf(out, "%s%" PRIu64, negative && us ? "-" : "", whole);
    if (frac == 0)
        return;
    char digits[8];
    snprintf(digits, sizeof digits, "%06" PRIu64, frac);
    size_t n = 6;
    while (digits[n - 1] == '0')
        n--;
    buf_putc(out, '.');
    buf_append(out, digits, n);
}

void metrics_put_seconds(Buf *out, int64_t us)
{
    /* 0 - (uint64_t)us is the magnitude even for INT64_MIN. */
    put_seconds(out, us < 0, us < 0 ? 0 - (uint64_t)us : (uint64_t)us);
}

void metrics_put_label_value(Buf *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            buf_printf(out, "\\%c", *s);
        else if (*s == '\n')
            buf_puts(out, "\\n");
        else
            buf_putc(out, *s);
    }
}

static uint64_t load_u64(const _Atomic uint64_t *p)
{
    return atomic_load_explicit(p, RELAXED);
}

static int64_t load_i64(const _Atomic int64_t *p)
{
    return atomic_load_explicit(p, RELAXED);
}

static int load_flag(const _Atomic int *p)
{
    return atomic_load_explicit(p, RELAXED) ? 1 : 0;
}

static void counter(Buf *out, const char *name, const char *help, uint64_t v)
{
    metrics_family(out, name, "counter", help);
    buf_printf(out, "%s %" PRIu64 "\n", name, v);
}

static void gauge_int(Buf *out, const char *name, const char *help, int64_t v)
{
    metrics_family(out, name, "gauge", help);
    buf_printf(out, "%s %" PRId64 "\n", name, v);
}

static void gauge_seconds(Buf *out, const char *name, const char *help, int64_t us)
{
    metrics_family(out, name, "gauge", help);
    buf_printf(out, "%s ", name);
    metrics_put_seconds(out, us);
    buf_putc(out, '\n');
}

void metrics_render(const Metrics *m, int64_t now_unix_us, Buf *out)
{
    metrics_family(out, "outboxd_build_info", "gauge", "the running outboxd version; always 1");
    buf_puts(out, "outboxd_build_info{version=\"");
    metrics_put_label_value(out, OUTBOXD_VERSION);
    buf_puts(out, "\"} 1\n");

    counter(out, "outboxd_events_published_total",
            "events JetStream acknowledged and stored (duplicates not included)",
            load_u64(&m->events_published));
    counter(out, "outboxd_events_duplicate_total",
            "acknowledgements JetStream flagged as duplicates (dedupe hits)",
            load_u64(&m->events_duplicate));
    counter(out, "outboxd_events_id_reused_total",
            "events whose first publish JetStream acknowledged as a duplicate: their event_id "
            "was used before, and the stream kept the earlier message",
            load_u64(&m->events_id_reused));
    counter(out, "outboxd_events_already_stored_total",
            "events not published again after a restart or reconnect because the stream held "
            "them already (--strict-order)",
            load_u64(&m->events_skipped_stored));
    counter(out, "outboxd_anchors_false_total",
            "positions (from the stream, the checkpoint or this run) that said events were "
            "stored but are not in this database's WAL history (a restore): the events after "
            "the slot's position were published again instead of skipped",
            load_u64(&m->anchors_false));
    counter(out, "outboxd_publish_acks_lost_total",
            "events found in the stream after their acknowledgement was lost (a one-way "
            "partition, a replaced connection), taken as stored instead of sent again "
            "(--strict-order)",
            load_u64(&m->acks_lost));

    metrics_family(out, "outboxd_publish_errors_total", "counter", "failed publishes, by reason");
    for (int r = 0; r < PUBERR_COUNT; r++)
        buf_printf(out, "outboxd_publish_errors_total{reason=\"%s\"} %" PRIu64 "\n",
                   publish_error_names[r], load_u64(&m->publish_errors[r]));

    counter(out, "outboxd_publish_retries_total", "events published again after a failure",
            load_u64(&m->publish_retries));
    counter(out, "outboxd_messages_refused_total",
            "non-transactional logical decoding messages with the events' prefix, not published "
            "because they escape rollback",
            load_u64(&m->messages_refused));

    metrics_family(out, "outboxd_dead_letter_total", "counter",
           "events sent to the dead-letter subject, by reason");
    for (int r = 0; r < DLR_COUNT; r++)
        buf_printf(out, "outboxd_dead_letter_total{reason=\"%s\"} %" PRIu64 "\n",
                   dead_letter_names[r], load_u64(&m->dead_letter[r]));

    gauge_int(out, "outboxd_in_flight_events", "events published and not yet acknowledged",
              load_i64(&m->in_flight));

    int64_t oldest = load_i64(&m->oldest_pending_unix_us);
    int64_t age = 0;
    if (oldest != 0 && now_unix_us > oldest)
        age = now_unix_us - oldest;
    gauge_seconds(out, "outboxd_oldest_pending_age_seconds",
                  "seconds since the commit of the oldest unacknowledged event; 0 when none", age);

    uint64_t confirmed = load_u64(&m->confirmed_lsn);
    uint64_t server = load_u64(&m->server_wal_lsn);
    metrics_family(out, "outboxd_replication_lag_bytes", "gauge",
           "bytes of WAL between the server's current position and the confirmed position");
    buf_printf(out, "outboxd_replication_lag_bytes %" PRIu64 "\n",
               server > confirmed ? server - confirmed : 0);

    metrics_family(out, "outboxd_confirmed_lsn", "gauge",
           "flush position last confirmed to PostgreSQL, as a number");
    buf_printf(out, "outboxd_confirmed_lsn %" PRIu64 "\n", confirmed);

    metrics_family(out, "outboxd_commit_to_ack_seconds", "histogram",
           "time from a transaction's commit to JetStream's acknowledgement of its events");
    uint64_t cumulative = 0;
    for (int i = 0; i <= METRICS_LATENCY_BUCKETS; i++) {
        cumulative += load_u64(&m->latency_buckets[i]);
        buf_puts(out, "outboxd_commit_to_ack_seconds_bucket{le=\"");
        if (i < METRICS_LATENCY_BUCKETS)
            put_seconds(out, false, (uint64_t)latency_bounds_us[i]);
        else
            buf_puts(out, "+Inf");
        buf_printf(out, "\"} %" PRIu64 "\n", cumulative);
    }
    buf_puts(out, "outboxd_commit_to_ack_seconds_sum ");
    put_seconds(out, false, load_u64(&m->latency_sum_us));
    buf_printf(out, "\noutboxd_commit_to_ack_seconds_count %" PRIu64 "\n", cumulative);

    gauge_seconds(out, "outboxd_last_commit_timestamp_seconds",
                  "commit time of the newest relayed transaction, in Unix seconds; 0 when none",
                  load_i64(&m->last_commit_unix_us));

    gauge_int(out, "outboxd_postgres_connected", "1 while the replication stream runs",
              load_flag(&m->pg_connected));
    gauge_int(out, "outboxd_nats_connected", "1 while connected to NATS",
              load_flag(&m->nats_connected));
    gauge_int(out, "outboxd_standby",
              "1 while waiting for the replication slot held by another relay",
              load_flag(&m->standby));
    gauge_int(out, "outboxd_slot_lost",
              "1 once the replication slot is lost (PostgreSQL removed WAL it needed); the relay "
              "then exits 1 and the slot must be dropped",
              load_flag(&m->slot_lost));
    gauge_int(out, "outboxd_backfill_phase",
              "first-start backfill: 0 none, 1 creating the slot, 2 publishing the rows, 3 "
              "waiting while another relay owns it",
              atomic_load_explicit(&m->backfill_phase, memory_order_relaxed));
    gauge_int(out, "outboxd_backfill_rows",
              "rows of the first-start backfill stored so far (kept after it finished)",
              (int64_t)load_u64(&m->backfill_rows));
}

bool metrics_ready(const Metrics *m)
{
    return load_flag(&m->pg_connected) && load_flag(&m->nats_connected) &&
           !load_flag(&m->standby) && !load_flag(&m->slot_lost);
}

bool metrics_alive(const Metrics *m, int64_t now_mono_us, int64_t stale_us)
{
    int64_t beat = load_i64(&m->heartbeat_mono_us);
    return beat != 0 && now_mono_us - beat <= stale_us;
}

void metrics_health_text(const Metrics *m, char *out, size_t outlen)
{
    uint64_t rows = load_u64(&m->backfill_rows);
    switch (atomic_load_explicit(&m->backfill_phase, memory_order_relaxed)) {
    case BACKFILL_PHASE_SLOT:
        snprintf(out, outlen, "ok: creating the replication slot (waiting for running "
                              "transactions)\n");
        break;
    case BACKFILL_PHASE_RUNNING:
        snprintf(out, outlen, "ok: backfill, %" PRIu64 " rows stored\n", rows);
        break;
    case BACKFILL_PHASE_STANDBY:
        snprintf(out, outlen, "ok: standby, another relay owns the unfinished backfill\n");
        break;
    default:
        snprintf(out, outlen, "ok\n");
    }
}
