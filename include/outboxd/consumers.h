/*
 * consumers.h - consumer lag: how far each durable consumer of the stream outboxd publishes to
 * is behind, in events and in seconds since the commit of the oldest event it has not
 * acknowledged. A watcher thread with its own NATS connection keeps a snapshot that /metrics
 * renders; `outboxd status` collects once. See consumers.c for the design.
 */
#ifndef OUTBOXD_CONSUMERS_H
#define OUTBOXD_CONSUMERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/config.h"
#include "outboxd/util.h"

/* One consumer's position, from its JetStream consumer info, and its lag. */
typedef struct ConsumerLag {
    char stream[256];
    char name[256];
    bool durable;              /* has a durable_name: ephemeral consumers are not reported */
    char filter[1024];         /* filter_subject, or filter_subjects joined by spaces; "" all */
    char deliver_policy[32];   /* "all", "new", "by_start_sequence", ... */
    uint64_t opt_start_seq;    /* by_start_sequence */
    int64_t opt_start_time_us; /* by_start_time; 0 otherwise */
    int64_t created_us;
    uint64_t num_pending;      /* matching messages not yet delivered */
    uint64_t num_ack_pending;  /* delivered, not acknowledged */
    uint64_t num_redelivered;  /* pending messages delivered more than once */
    uint64_t num_waiting;      /* pull requests waiting (a pull consumer with 0 has no worker) */
    uint64_t delivered_stream_seq, delivered_consumer_seq;
    uint64_t ack_stream_seq, ack_consumer_seq; /* the ack floor */
    int64_t ack_active_us;     /* when the ack floor last moved; 0 when unknown */
    /* Filled by consumers_collect(): */
    int64_t oldest_unix_us;    /* commit time of the oldest unacknowledged event; 0 when caught
                                  up; -1 when it could not be read */
    uint64_t oldest_seq;       /* its stream sequence; 0 when none */
} ConsumerLag;

/*
 * Fills out from one consumer info object (a $JS.API.CONSUMER.INFO reply or an element of a
 * CONSUMER.LIST reply's "consumers"), with stream as the stream's name when the object has no
 * "stream_name". Returns 0, or -1 when info is not a consumer info (an error reply, no name).
 */
int consumers_parse_info(const json_t *info, const char *stream, ConsumerLag *out);

/* Whether the --consumers setting ("all", "off" or "a,b,c") selects consumer name. */
bool consumers_selected(const char *setting, const char *name);

/*
 * Where the search for c's oldest unprocessed message starts. Returns the first stream
 * sequence that can hold it (messages up to it minus one are all processed), or 0 when that is
 * unknown from the info alone: the consumer never acknowledged anything, has deliveries
 * outstanding, and started after the stream's first message (deliver_policy new, last, ...).
 * Then *not_before is the earliest store time its messages can have (its creation, or
 * opt_start_time).
 */
uint64_t consumers_search_start(const ConsumerLag *c, int64_t *not_before);

/* now - c's oldest unprocessed commit time, in microseconds: 0 when caught up (or when a
 * clock skew would make it negative), -1 when unknown. */
int64_t consumers_age_us(const ConsumerLag *c, int64_t now_unix_us);

/*
 * Appends the outboxd_consumer_* families for v[0..n) to out (Prometheus text format), with
 * ages at now_unix_us. refreshed_unix_us: when v was read (0: never); errors: failed refreshes.
 */
void consumers_render(const ConsumerLag *v, size_t n, int64_t now_unix_us,
                      int64_t refreshed_unix_us, uint64_t errors, Buf *out);

/* What consumers_collect() remembers between calls: per consumer, the search start and filter
 * of its last lookup and the commit time found, so that an unchanged ack floor costs no
 * message fetch. */
typedef struct ConsumerCache ConsumerCache;
void consumers_cache_new(ConsumerCache **out);
void consumers_cache_free(ConsumerCache *cache);

/*
 * Reads the consumers of stream that setting selects (durable ones only) and their lag, into a
 * new array *out of *n (caller frees; written only on success). Requests wait at most
 * timeout_ms each. cache may be NULL. Returns 0 (a consumer whose oldest message could not be
 * read has oldest_unix_us -1), or -1 with "could not ..." in err when the consumers could not
 * be listed.
 */
int consumers_collect(natsConnection *nc, const char *stream, const char *setting,
                      int64_t timeout_ms, ConsumerCache *cache, ConsumerLag **out, size_t *n,
                      char *err, size_t errlen);

/* The watcher: a thread refreshing the lag of the selected consumers of stream every
 * cfg->consumer_interval_ms over its own connection to cfg->nats_url, for /metrics. */
typedef struct ConsumerWatch ConsumerWatch;

/* Starts the watcher, unless cfg->consumers is "off" (then *out stays NULL). Logs what it
 * does; a failure to start is logged and leaves *out NULL: the relay runs on without it. */
void consumers_start(ConsumerWatch **out, const Config *cfg, const char *stream);

/* Stops the watcher within about a second (an outstanding request is cut short) and frees it.
 * Accepts NULL. */
void consumers_stop(ConsumerWatch *w);

/* Appends the running watcher's families to out (nothing when none runs). Called by the HTTP
 * thread for /metrics; never waits on NATS. */
void consumers_render_metrics(Buf *out, int64_t now_unix_us);

#endif
