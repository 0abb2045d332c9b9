/*
 * publisher.h - publishing events to JetStream with a bounded window of unacknowledged ones,
 * and keeping at it through broker outages.
 *
 * Each published event gets a sequence number (1, 2, 3, ... in publish order) and a slot in a
 * ring, which keeps the event encoded as it goes over the wire (wire.h) until JetStream
 * acknowledges it. The relay learns through publisher_poll() how far the
 * acknowledged prefix reaches: every event with a lower sequence number than first_unacked is
 * stored in the stream. nats.c's reader thread queues the acks; publisher_poll() takes them in
 * on the relay's thread, so handing over an ack wakes no thread.
 *
 * When a publish fails for a reason that can pass (a timeout, a lost connection, no responders
 * while a stream elects a leader, a broken order chain), the publisher pauses: no new events are
 * taken, and after a backoff every unacknowledged event is sent again, oldest first, with the
 * same Nats-Msg-Id (go-back-N); with strict order, events found stored whose acknowledgements
 * were lost count as stored and are not sent again (see publisher.c). An event the stream
 * refuses for good is replaced in place by a dead letter, or reported as fatal when no
 * dead-letter subject is configured.
 *
 * Return codes: 0 success, -1 error (err says what), PUBLISH_CHECK_FAILED for a failed start-up
 * check, PUBLISH_UNPUBLISHABLE for an event that can never be published as it is.
 */
#ifndef OUTBOXD_PUBLISHER_H
#define OUTBOXD_PUBLISHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/checkpoint.h"
#include "outboxd/jetstream.h"
#include "outboxd/outbox.h"

#define PUBLISH_CHECK_FAILED 1
#define PUBLISH_UNPUBLISHABLE 2

typedef struct Publisher Publisher;

typedef struct PublisherOptions {
    const char *urls;           /* comma-separated */
    int64_t max_inflight;       /* events */
    int64_t max_inflight_bytes; /* bytes */
    int64_t ack_timeout_ms;
    bool strict_order;          /* chain publishes with Nats-Expected-Last-Sequence */
    int64_t retry_min_ms;       /* backoff after failures: doubles up to retry_max_ms, */
    int64_t retry_max_ms;       /* with full jitter */
    const char *dead_letter_subject; /* NULL: an unpublishable event is fatal */
    const char *table;               /* "schema.table", for dead letters */
} PublisherOptions;

typedef struct PublisherStatus {
    uint64_t next_seq;      /* the sequence number the next publish gets */
    uint64_t first_unacked; /* every event below it is acknowledged */
    size_t inflight;        /* events published and not yet acknowledged */
    bool paused;            /* waiting to publish again after a failure */
    bool failed;            /* an event can never be published and there is no dead-letter
                             * subject: the relay must stop */
    char failure[1024];     /* which event and why, one line */
} PublisherStatus;

/*
 * Connects to NATS and checks that JetStream answers. Returns 0, or PUBLISH_CHECK_FAILED with
 * "could not connect to NATS ..." or "JetStream is not enabled ..." in err.
 */
int publisher_new(Publisher **out, const PublisherOptions *opts, char *err, size_t errlen);
void publisher_free(Publisher *p);

/*
 * Finds the stream that captures subjects matching filter (e.g. "outbox.*.*") and reads what
 * StreamInfo holds. With strict order the chain of Nats-Expected-Last-Sequence starts from the
 * stream's last message. Also checks that a stream captures the dead-letter subject. Returns
 * 0, or PUBLISH_CHECK_FAILED saying which subject no stream captures.
 */
int publisher_bind_stream(Publisher *p, const char *filter, StreamInfo *info, char *err,
                          size_t errlen);

/* The sequence number the next publish will get. */
uint64_t publisher_next_seq(const Publisher *p);

/* True when one more event fits in the window and publishing is not paused. */
bool publisher_has_room(const Publisher *p);

/*
 * Publishes ev and writes its sequence number into *seq. A dead letter (dead_letter true) is
 * chained like an event with strict order: it stands in its event's place. Returns PUBLISH_UNPUBLISHABLE, without publishing, when
 * ev is larger than the server's max_payload; -1 only for errors outside the event.
 */
int publisher_publish(Publisher *p, const OutboxEvent *ev, bool dead_letter, uint64_t *seq,
                      char *err, size_t errlen);

/* Writes what was published since the last flush to the connection in one go (wire.h's
 * batches). publisher_poll() flushes too; call it before waiting, or events published since
 * the last poll sit unsent until the next one. */
void publisher_flush(Publisher *p);
/* While hold, publisher_flush() and publisher_poll() keep the batch (it still goes out when it
 * grows large); publisher_hold(p, false) flushes. */
void publisher_hold(Publisher *p, bool hold);

/* The largest body a dead letter may carry (the server's max_payload less room for headers). */
size_t publisher_max_body(const Publisher *p);

/*
 * Takes in acknowledgements, releases acknowledged events from the head of the window, and
 * drives recovery: notices failures, pauses, and sends the window again after the backoff.
 * Ends with publisher_flush(). now is CLOCK_MONOTONIC µs.
 */
void publisher_poll(Publisher *p, int64_t now, PublisherStatus *st);

/* The monotonic time (µs) by which publisher_poll() has something to do (a timeout, the end of
 * a backoff, or, while events are in flight, a look at the acknowledgements that arrived: at
 * most a millisecond away), or INT64_MAX. */
int64_t publisher_next_deadline(const Publisher *p);

/* A descriptor that becomes readable when the connection to NATS is lost or comes back (acks
 * do not wake it: see publisher_next_deadline()); call publisher_rearm() after waking. */
int publisher_wake_fd(const Publisher *p);
void publisher_rearm(Publisher *p);

/*
 * Reads the stream's last sequence (taken as the order chain's start when nothing is in
 * flight) and the newest event of source ("<system id>/<slot>") among its last messages
 * (jsapi_own_events_back's look-back). Returns 1 with it in *last, 0 when there is none, -1 on
 * error.
 */
int publisher_stream_position(Publisher *p, const char *source, JsOwnEvent *last, char *err,
                              size_t errlen);

/* ---- the durable checkpoint (a JetStream key-value bucket) ---- */

/* Opens the bucket, creating it (history 1, file storage, replicas) when missing. */
int publisher_checkpoint_open(Publisher *p, const char *bucket, int replicas, char *err,
                              size_t errlen);
/* Reads the checkpoint under key: a zeroed *cp (lsn 0, version 0) when there is none. */
int publisher_checkpoint_get(Publisher *p, const char *key, Checkpoint *cp, char *err,
                             size_t errlen);
/* Stores the checkpoint without waiting (skipped while disconnected); a lost write only means
 * an older checkpoint, never a wrong one. */
void publisher_checkpoint_put_async(Publisher *p, const char *key, const Checkpoint *cp);
/* Stores the checkpoint and waits for JetStream to confirm it. */
int publisher_checkpoint_put(Publisher *p, const char *key, const Checkpoint *cp, char *err,
                             size_t errlen);

#endif
