/*
 * publisher.h - publishing events to JetStream with a bounded window of unacknowledged ones.
 *
 * Each published event gets a sequence number (1, 2, 3, ... in publish order) and a slot in a
 * ring until JetStream acknowledges it. The relay learns through publisher_poll() how far the
 * acknowledged prefix reaches: every event with a lower sequence number than first_unacked is
 * stored in the stream. Acks are delivered on nats.c's thread; the ring slot's atomic state word
 * is all that thread touches, so publishing never takes a lock.
 *
 * Return codes: 0 success, -1 error (err says what), PUBLISH_CHECK_FAILED for a failed start-up
 * check, PUBLISH_UNPUBLISHABLE for an event that can never be published as it is (too large).
 */
#ifndef OUTBOXD_PUBLISHER_H
#define OUTBOXD_PUBLISHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/outbox.h"

#define PUBLISH_CHECK_FAILED 1
#define PUBLISH_UNPUBLISHABLE 2

typedef struct Publisher Publisher;

typedef struct PublisherOptions {
    const char *urls;           /* comma-separated */
    int64_t max_inflight;       /* events */
    int64_t max_inflight_bytes; /* bytes */
    int64_t ack_timeout_ms;
} PublisherOptions;

typedef struct PublisherStatus {
    uint64_t next_seq;      /* the sequence number the next publish gets */
    uint64_t first_unacked; /* every event below it is acknowledged */
    size_t inflight;        /* events published and not yet acknowledged */
    uint64_t acked;         /* acknowledgements so far, duplicates included */
    uint64_t duplicates;    /* acknowledgements flagged duplicate by JetStream */
    int64_t oldest_commit_time; /* commit time (µs since 2000) of the oldest unacked, or 0 */
    bool failed;            /* the oldest unacknowledged event failed or timed out */
    uint64_t failed_seq;
    char failure[512];      /* which event and why, one line */
} PublisherStatus;

/*
 * Connects to NATS and checks that JetStream answers. Returns 0, or PUBLISH_CHECK_FAILED with
 * "could not connect to NATS ..." or "JetStream is not enabled ..." in err.
 */
int publisher_new(Publisher **out, const PublisherOptions *opts, char *err, size_t errlen);
void publisher_free(Publisher *p);

/*
 * Checks that some stream captures subjects matching filter (e.g. "outbox.*.*"); writes the
 * first such stream's name into stream. Returns 0, or PUBLISH_CHECK_FAILED.
 */
int publisher_check_stream(Publisher *p, const char *filter, char *stream, size_t streamlen,
                           char *err, size_t errlen);

/* The sequence number the next publish will get. */
uint64_t publisher_next_seq(const Publisher *p);

/* True when one more event fits in the window. */
bool publisher_has_room(const Publisher *p);

/* Publishes ev and writes its sequence number into *seq. */
int publisher_publish(Publisher *p, const OutboxEvent *ev, uint64_t *seq, char *err,
                      size_t errlen);

/*
 * Releases acknowledged events from the head of the window and reports progress. Detects a
 * failed or timed-out oldest event (st->failed). now is CLOCK_MONOTONIC µs.
 */
void publisher_poll(Publisher *p, int64_t now, PublisherStatus *st);

/* The monotonic time (µs) at which the oldest unacknowledged event times out, or INT64_MAX. */
int64_t publisher_next_deadline(const Publisher *p);

/* A descriptor that becomes readable when acknowledgements arrived; call publisher_rearm()
 * after waking (before polling) to be woken again. */
int publisher_wake_fd(const Publisher *p);
void publisher_rearm(Publisher *p);

#endif
