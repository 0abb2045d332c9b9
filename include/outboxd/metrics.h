/*
 * metrics.h - the relay's counters and gauges, and their Prometheus text rendering.
 *
 * One Metrics object per process. The relay's thread and nats.c's threads update it with
 * relaxed atomics (no locks on the hot path); the HTTP thread reads it when scraped. Values
 * that are ages are stored as timestamps and turned into ages at scrape time, so a stalled
 * relay still shows a rising oldest pending age.
 */
#ifndef OUTBOXD_METRICS_H
#define OUTBOXD_METRICS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "outboxd/util.h"

/* Why a publish failed: the {reason} label of outboxd_publish_errors_total. */
typedef enum PublishError {
    PUBERR_TIMEOUT,       /* "timeout": no ack within --ack-timeout */
    PUBERR_NO_RESPONDERS, /* "no_responders": no stream took the subject (or it is recovering) */
    PUBERR_REJECTED,      /* "rejected": JetStream answered with an error */
    PUBERR_CONNECTION,    /* "connection": not connected, or the publish call failed */
    PUBERR_STREAM_FULL,   /* "stream_full": the stream is at a limit (messages, bytes) */
    PUBERR_ORDER,         /* "order": the stream's last sequence is not what the order chain
                           * expected (another writer, a restored stream) */
    PUBERR_NO_RESOURCES,  /* "no_resources": JetStream's account or server has no storage or
                           * memory left (10047, 10028, 10002, 10023) */
    PUBERR_COUNT
} PublishError;

/* Why an event went to the dead-letter subject: the {reason} label of
 * outboxd_dead_letter_total. */
typedef enum DeadLetterReason {
    DLR_INVALID_EVENT_ID, /* "invalid_event_id": null or unusable as a Nats-Msg-Id */
    DLR_NULL_PAYLOAD,     /* "null_payload" */
    DLR_TOO_LARGE,        /* "too_large": over the server's max_payload */
    DLR_INVALID_SUBJECT,  /* "invalid_subject" */
    DLR_REJECTED,         /* "rejected": JetStream refused it for good */
    DLR_INVALID_ENVELOPE, /* "invalid_envelope": a message that is not a valid event envelope */
    DLR_NO_STREAM,        /* "no_stream": no stream captures the event's subject */
    DLR_COUNT
} DeadLetterReason;

/* Upper bounds (seconds) of the outboxd_commit_to_ack_seconds histogram buckets; +Inf is
 * implied. */
#define METRICS_LATENCY_BUCKETS 14
extern const double metrics_latency_bounds[METRICS_LATENCY_BUCKETS];

typedef struct Metrics {
    _Atomic uint64_t events_published;  /* acked and stored (duplicates not included) */
    _Atomic uint64_t events_duplicate;  /* acked as duplicate by JetStream */
    _Atomic uint64_t acks_lost;         /* events found stored whose acknowledgement was lost */
    _Atomic uint64_t events_id_reused;  /* first sends acked as duplicate: a row re-used an
                                         * earlier event's event_id, JetStream kept the earlier */
    _Atomic uint64_t events_skipped_stored; /* events the stream held already, not sent again
                                             * after a restart or reconnect */
    _Atomic uint64_t anchors_false; /* anchors the WAL proved false (anchor.c): every event
                                     * after the slot's position was published again */
    _Atomic uint64_t publish_errors[PUBERR_COUNT];
    _Atomic uint64_t publish_retries;   /* events sent again after a failure */
    _Atomic uint64_t messages_refused;  /* non-transactional messages with the events' prefix */
    _Atomic uint64_t dead_letter[DLR_COUNT];
    _Atomic int64_t in_flight;          /* published, not yet acknowledged */
    _Atomic int64_t oldest_pending_unix_us; /* commit time of the oldest unacked event; 0 = none */
    _Atomic uint64_t confirmed_lsn;     /* flush position last reported to PostgreSQL */
    _Atomic uint64_t server_wal_lsn;    /* the server's current WAL position, as last seen */
    _Atomic int64_t last_commit_unix_us; /* commit time of the newest relayed transaction */
    _Atomic uint64_t latency_buckets[METRICS_LATENCY_BUCKETS + 1]; /* last = +Inf */
    _Atomic uint64_t latency_count;
    _Atomic uint64_t latency_sum_us;
    _Atomic int pg_connected;   /* 1 while the replication stream runs */
    _Atomic int nats_connected; /* 1 while connected to NATS */
    _Atomic int standby;        /* 1 while waiting for the slot held by another relay */
    _Atomic int slot_lost;      /* 1 once the slot is found lost (the relay then exits) */
    _Atomic int64_t heartbeat_mono_us; /* the relay loop's last turn (CLOCK_MONOTONIC) */
    _Atomic int backfill_phase;        /* BACKFILL_PHASE_*: what the start-up is doing */
    _Atomic uint64_t backfill_rows;    /* rows of the first-start backfill stored so far */
} Metrics;

/* The start-up's phase, for /healthz and outboxd_backfill_phase. */
enum {
    BACKFILL_PHASE_NONE,     /* no backfill (streaming, or about to) */
    BACKFILL_PHASE_SLOT,     /* creating the slot: waits for running transactions */
    BACKFILL_PHASE_RUNNING,  /* publishing the rows that were there before the slot */
    BACKFILL_PHASE_STANDBY,  /* another relay owns the unfinished backfill */
};

/* The process's metrics. */
extern Metrics metrics;

/* The relay loop took a turn (now: CLOCK_MONOTONIC µs): what /healthz's liveness reads. */
static inline void metrics_beat(int64_t now)
{
    atomic_store_explicit(&metrics.heartbeat_mono_us, now, memory_order_relaxed);
}

void metrics_publish_error(PublishError reason);
void metrics_dead_letter(DeadLetterReason reason);
/* Records one commit-to-ack latency in microseconds. */
void metrics_observe_latency(int64_t us);

const char *metrics_publish_error_name(PublishError reason);
const char *metrics_dead_letter_name(DeadLetterReason reason);

/*
 * Appends the Prometheus text exposition (version 0.0.4) of m to out: HELP and TYPE lines,
 * every metric listed in the README, outboxd_build_info{version="..."} 1. now_unix_us is
 * used to turn stored timestamps into ages.
 */
void metrics_render(const Metrics *m, int64_t now_unix_us, Buf *out);

/* Pieces of the exposition for the other renderers (consumers.c): a family's HELP and TYPE
 * lines; a label value with backslash, double quote and newline escaped; microseconds as
 * decimal seconds ("2.5", "-0.000001"). */
void metrics_family(Buf *out, const char *name, const char *type, const char *help);
void metrics_put_label_value(Buf *out, const char *s);
void metrics_put_seconds(Buf *out, int64_t us);

/* /readyz: the slot is held (streaming), NATS is connected, this relay is not on standby and
 * its slot is not lost. */
bool metrics_ready(const Metrics *m);
/* /healthz: the relay loop turned within the last stale_us microseconds. */
bool metrics_alive(const Metrics *m, int64_t now_mono_us, int64_t stale_us);
/* The /healthz body of a live relay: "ok\n", or what the start-up is doing ("ok: backfill, 1200
 * rows stored\n"). */
void metrics_health_text(const Metrics *m, char *out, size_t outlen);

#endif
