/*
 * consumers.c - consumer lag: how stale each downstream service really is.
 *
 * outboxd's oldest pending age stops at JetStream's acknowledgement; what users see is later,
 * when the service behind a durable consumer (a search indexer, say) has processed the event.
 * JetStream knows each consumer's position and outboxd knows when every event it wrote was
 * committed (its Outbox-Commit-Time header). Joining the two gives, per consumer:
 *
 *   pending events = num_pending (not yet delivered) + num_ack_pending (delivered, not acked)
 *   oldest unprocessed age = now - commit time of the first message after the consumer's ack
 *     floor that matches its filter ($JS.API.STREAM.MSG.GET with next_by_subj); 0 when nothing
 *     is pending. A message outboxd did not write (no such header) counts from its store time.
 *
 * Threads. A watcher thread of its own, with its own NATS connection, refreshes a snapshot
 * every --consumer-interval; /metrics (libmicrohttpd's thread) renders the snapshot under a
 * mutex and never waits on NATS. Not on the relay's thread: a JetStream round trip per consumer
 * would stall publishing and confirming. Not at scrape time: MHD serves all connections from
 * one thread, so a slow or unreachable NATS would hold up /healthz (the liveness probe) too,
 * and every scraper would add its own load on JetStream. Not over the publisher's connection:
 * large consumer lists in its socket would delay PubAcks, and its disconnects pause
 * publishing. The price is one idle TCP connection and a thread that mostly sleeps.
 *
 * Cost per refresh: one CONSUMER.LIST page per 256 consumers (with --consumers=a,b: one
 * CONSUMER.INFO per name, which needs narrower permissions), plus one MSG.GET per consumer
 * whose search start moved while it has something pending; an unchanged ack floor reuses the
 * cached commit time. Every request waits at most 2 s (or the interval, if shorter). When NATS
 * cannot be reached or refuses, the watcher logs once per outage and retries with doubling,
 * jittered delays up to --retry-max (never below the interval). The last snapshot stays up
 * meanwhile: ages are stored as commit times and become ages at scrape time, so a stuck
 * consumer's age keeps rising, and outboxd_consumer_refresh_timestamp_seconds tells how fresh
 * the positions are. A consumer deleted disappears at the next refresh.
 *
 * Traps (nats-server 2.9.10, checked):
 * - A consumer that never acknowledged anything reports ack_floor.stream_seq 0 even when it
 *   starts later in the stream (deliver_policy new, last, by_start_time): searching from
 *   message 1 would report the stream's oldest message. While nothing is delivered and
 *   unacknowledged, delivered.stream_seq bounds what it has seen; otherwise its first message
 *   is found once by bisection on store times from its creation (or opt_start_time) and cached
 *   until its ack floor moves.
 * - MSG.GET answers 404 with err_code 10037 when no message matches (a purge, limits): nothing
 *   is left to process there, and the age is 0.
 * - Ephemeral consumers (no durable_name) come and go with their clients: they are skipped.
 */
#include "outboxd/consumers.h"

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "outboxd/jetstream.h"
#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/outbox.h"

#define REQUEST_TIMEOUT_MS 2000
#define LIST_PAGE 256 /* nats-server's page size for CONSUMER.LIST */

/* ---- pure parts ---- */

static uint64_t get_u64(const json_t *o, const char *key)
{
    json_int_t v = json_integer_value(json_object_get(o, key));
    return v > 0 ? (uint64_t)v : 0;
}

static int64_t get_time(const json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    int64_t us = 0;
    /* Go's zero time "0001-01-01T00:00:00Z" means never. */
    if (!s || !time_parse_rfc3339(s, strlen(s), &us) || us <= 0)
        return 0;
    return us;
}

static void copy_str(char *dst, size_t n, const json_t *v)
{
    snprintf(dst, n, "%s", json_string_value(v) ? json_string_value(v) : "");
}

int consumers_parse_info(const json_t *info, const char *stream, ConsumerLag *out)
{
    const json_t *config = json_object_get(info, "config");
    const char *name = json_string_value(json_object_get(info, "name"));
    if (!json_is_object(info) || json_object_get(info, "error") || !json_is_object(config) ||
        !name || !*name)
        return -1;
    memset(out, 0, sizeof(*out));
    const char *sn = json_string_value(json_object_get(info, "stream_name"));
    snprintf(out->stream, sizeof(out->stream), "%s", sn && *sn ? sn : stream);
    snprintf(out->name, sizeof(out->name), "%s", name);
    const char *durable = json_string_value(json_object_get(config, "durable_name"));
    out->durable = durable && *durable;
    copy_str(out->filter, sizeof(out->filter), json_object_get(config, "filter_subject"));
    /* nats-server 2.10 added several filters per consumer. */
    const json_t *filters = json_object_get(config, "filter_subjects");
    size_t i;
    const json_t *f;
    json_array_foreach(filters, i, f) {
        size_t len = strlen(out->filter);
        const char *s = json_string_value(f);
        if (s && *s)
            snprintf(out->filter + len, sizeof(out->filter) - len, "%s%s", len ? " " : "", s);
    }
    copy_str(out->deliver_policy, sizeof(out->deliver_policy),
             json_object_get(config, "deliver_policy"));
    out->opt_start_seq = get_u64(config, "opt_start_seq");
    out->opt_start_time_us = get_time(config, "opt_start_time");
    out->created_us = get_time(info, "created");
    out->num_pending = get_u64(info, "num_pending");
    out->num_ack_pending = get_u64(info, "num_ack_pending");
    out->num_redelivered = get_u64(info, "num_redelivered");
    out->num_waiting = get_u64(info, "num_waiting");
    const json_t *delivered = json_object_get(info, "delivered");
    const json_t *floor = json_object_get(info, "ack_floor");
    out->delivered_stream_seq = get_u64(delivered, "stream_seq");
    out->delivered_consumer_seq = get_u64(delivered, "consumer_seq");
    out->ack_stream_seq = get_u64(floor, "stream_seq");
    out->ack_consumer_seq = get_u64(floor, "consumer_seq");
    out->ack_active_us = get_time(floor, "last_active");
    out->oldest_unix_us = -1;
    return 0;
}

bool consumers_selected(const char *setting, const char *name)
{
    if (strcmp(setting, "all") == 0)
        return true;
    if (strcmp(setting, "off") == 0)
        return false;
    size_t n = strlen(name);
    for (const char *p = setting; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && strncmp(p, name, n) == 0)
            return true;
        p += len + (p[len] == ',');
    }
    return false;
}

uint64_t consumers_search_start(const ConsumerLag *c, int64_t *not_before)
{
    *not_before = 0;
    uint64_t floor = c->ack_stream_seq;
    /* Nothing delivered and unacknowledged: all it was given is processed. */
    if (c->num_ack_pending == 0 && c->delivered_stream_seq > floor)
        floor = c->delivered_stream_seq;
    if (c->ack_consumer_seq > 0 || c->num_ack_pending == 0 || floor > 0)
        return floor + 1;
    /* Never acknowledged, deliveries outstanding: the ack floor (0) says nothing. */
    if (strcmp(c->deliver_policy, "by_start_sequence") == 0 && c->opt_start_seq > 0)
        return c->opt_start_seq;
    if (strcmp(c->deliver_policy, "all") == 0 || c->deliver_policy[0] == '\0')
        return 1;
    *not_before = strcmp(c->deliver_policy, "by_start_time") == 0 && c->opt_start_time_us
                      ? c->opt_start_time_us
                      : c->created_us;
    return *not_before ? 0 : 1;
}

int64_t consumers_age_us(const ConsumerLag *c, int64_t now_unix_us)
{
    if (c->oldest_unix_us < 0)
        return -1;
    if (c->oldest_unix_us == 0 || now_unix_us <= c->oldest_unix_us)
        return 0;
    return now_unix_us - c->oldest_unix_us;
}

static void labels(Buf *out, const char *metric, const ConsumerLag *c)
{
    buf_printf(out, "%s{stream=\"", metric);
    metrics_put_label_value(out, c->stream);
    buf_puts(out, "\",consumer=\"");
    metrics_put_label_value(out, c->name);
    buf_puts(out, "\"} ");
}

typedef enum Field { F_PENDING, F_ACK_PENDING, F_REDELIVERED, F_WAITING, F_OLDEST, F_LAST_ACK } Field;

static const struct {
    const char *name;
    const char *help;
} families[] = {
    [F_PENDING] = {"outboxd_consumer_pending_events",
                   "events the consumer has not acknowledged: not yet delivered plus delivered "
                   "and unacknowledged"},
    [F_ACK_PENDING] = {"outboxd_consumer_ack_pending_events",
                       "events delivered to the consumer and not acknowledged yet"},
    [F_REDELIVERED] = {"outboxd_consumer_redelivered_events",
                       "unacknowledged events delivered more than once"},
    [F_WAITING] = {"outboxd_consumer_waiting_pulls",
                   "pull requests waiting on the consumer (0 on a pull consumer: no worker is "
                   "fetching)"},
    [F_OLDEST] = {"outboxd_consumer_oldest_unprocessed_age_seconds",
                  "seconds since the commit of the oldest event the consumer has not "
                  "acknowledged; 0 when caught up"},
    [F_LAST_ACK] = {"outboxd_consumer_last_ack_age_seconds",
                    "seconds since the consumer's ack floor last moved"},
};

void consumers_render(const ConsumerLag *v, size_t n, int64_t now_unix_us,
                      int64_t refreshed_unix_us, uint64_t errors, Buf *out)
{
    for (size_t f = 0; f < ARRAY_SIZE(families); f++) {
        metrics_family(out, families[f].name, "gauge", families[f].help);
        for (size_t i = 0; i < n; i++) {
            const ConsumerLag *c = &v[i];
            /* Counts are printed as integers, ages (-1: unknown, no sample) as seconds. */
            uint64_t count = 0;
            int64_t age = -1;
            switch ((Field)f) {
            case F_PENDING:
                count = c->num_pending + c->num_ack_pending;
                break;
            case F_ACK_PENDING:
                count = c->num_ack_pending;
                break;
            case F_REDELIVERED:
                count = c->num_redelivered;
                break;
            case F_WAITING:
                count = c->num_waiting;
                break;
            case F_OLDEST:
                age = consumers_age_us(c, now_unix_us);
                break;
            case F_LAST_ACK:
                if (c->ack_active_us)
                    age = now_unix_us > c->ack_active_us ? now_unix_us - c->ack_active_us : 0;
                break;
            }
            bool is_age = f == F_OLDEST || f == F_LAST_ACK;
            if (is_age && age < 0)
                continue;
            labels(out, families[f].name, c);
            if (is_age)
                metrics_put_seconds(out, age);
            else
                buf_printf(out, "%" PRIu64, count);
            buf_putc(out, '\n');
        }
    }
    metrics_family(out, "outboxd_consumer_refresh_timestamp_seconds", "gauge",
                   "when the consumers' positions were last read, in Unix seconds; 0 when never");
    buf_puts(out, "outboxd_consumer_refresh_timestamp_seconds ");
    metrics_put_seconds(out, refreshed_unix_us);
    buf_putc(out, '\n');
    metrics_family(out, "outboxd_consumer_refresh_errors_total", "counter",
                   "failed attempts to read the consumers' positions");
    buf_printf(out, "outboxd_consumer_refresh_errors_total %" PRIu64 "\n", errors);
}

/* ---- collecting ---- */

typedef struct CacheEntry {
    char name[256];
    char filter[1024];
    uint64_t start;     /* the search start of the lookup, 0 for a bisection from not_before */
    int64_t not_before;
    uint64_t seq;       /* what it found */
    int64_t commit_us;
} CacheEntry;

struct ConsumerCache {
    CacheEntry *v;
    size_t n;
};

void consumers_cache_new(ConsumerCache **out)
{
    *out = xcalloc(1, sizeof(ConsumerCache));
}

void consumers_cache_free(ConsumerCache *cache)
{
    if (!cache)
        return;
    free(cache->v);
    free(cache);
}

typedef struct Lookup {
    natsConnection *nc;
    const char *stream;
    int64_t timeout_ms;
    JsStoredMsg msg;
    char err[512];
} Lookup;

/* The first message at or after seq matching any of the space-separated filters (all
 * messages with ""), into l->msg. Returns 0, 1 when none, -1 on an error. */
static int first_matching(Lookup *l, uint64_t seq, const char *filters)
{
    if (!*filters)
        return jsapi_msg_get(l->nc, l->stream, seq, ">", l->timeout_ms, &l->msg, l->err,
                             sizeof(l->err));
    int best = 1;
    uint64_t best_seq = 0;
    int64_t best_time = 0;
    Buf hdrs;
    buf_init(&hdrs);
    char filter[1024];
    for (const char *p = filters; *p;) {
        size_t len = strcspn(p, " ");
        snprintf(filter, sizeof(filter), "%.*s", (int)len, p);
        p += len + (p[len] == ' ');
        int rc = jsapi_msg_get(l->nc, l->stream, seq, filter, l->timeout_ms, &l->msg, l->err,
                               sizeof(l->err));
        if (rc < 0) {
            best = -1;
            break;
        }
        if (rc == 0 && (best == 1 || l->msg.seq < best_seq)) {
            best = 0;
            best_seq = l->msg.seq;
            best_time = l->msg.time_unix_us;
            buf_reset(&hdrs);
            buf_append(&hdrs, l->msg.hdrs.data ? l->msg.hdrs.data : "", l->msg.hdrs.len);
        }
    }
    if (best == 0) {
        l->msg.seq = best_seq;
        l->msg.time_unix_us = best_time;
        buf_reset(&l->msg.hdrs);
        buf_append(&l->msg.hdrs, hdrs.data ? hdrs.data : "", hdrs.len);
    }
    buf_deinit(&hdrs);
    return best;
}

/* The first sequence whose message was stored at or after not_before, by bisection over
 * [1, hi]; hi + 1 when none is. Returns -1 on an error. */
static int64_t first_stored_after(Lookup *l, uint64_t hi, int64_t not_before)
{
    uint64_t lo = 1;
    while (lo <= hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int rc = jsapi_msg_get(l->nc, l->stream, mid, ">", l->timeout_ms, &l->msg, l->err,
                               sizeof(l->err));
        if (rc < 0)
            return -1;
        if (rc == 1 || l->msg.time_unix_us >= not_before) {
            if (mid == 1)
                return 1;
            hi = mid - 1;
        } else {
            lo = l->msg.seq + 1;
        }
    }
    return (int64_t)lo;
}

static CacheEntry *cache_find(ConsumerCache *cache, const char *name)
{
    for (size_t i = 0; cache && i < cache->n; i++)
        if (strcmp(cache->v[i].name, name) == 0)
            return &cache->v[i];
    return NULL;
}

/* Fills c->oldest_unix_us and c->oldest_seq, from the cache when c's search start and filter
 * are those of the cached lookup. */
static void find_oldest(Lookup *l, ConsumerCache *cache, CacheEntry *next, ConsumerLag *c)
{
    memset(next, 0, sizeof(*next));
    snprintf(next->name, sizeof(next->name), "%s", c->name);
    if (c->num_pending + c->num_ack_pending == 0) {
        c->oldest_unix_us = 0;
        return;
    }
    int64_t not_before;
    uint64_t start = consumers_search_start(c, &not_before);
    const CacheEntry *old = cache_find(cache, c->name);
    if (old && old->seq && old->start == start && old->not_before == not_before &&
        strcmp(old->filter, c->filter) == 0) {
        *next = *old;
        c->oldest_seq = old->seq;
        c->oldest_unix_us = old->commit_us;
        return;
    }
    uint64_t from = start;
    if (start == 0) {
        int64_t s = first_stored_after(l, c->delivered_stream_seq, not_before);
        if (s < 0) {
            log_debug("consumer \"%s\": %s", c->name, l->err);
            return;
        }
        from = (uint64_t)s;
    }
    int rc = first_matching(l, from, c->filter);
    if (rc < 0) {
        log_debug("consumer \"%s\": %s", c->name, l->err);
        return;
    }
    if (rc == 1) { /* nothing left to process in the stream */
        c->oldest_unix_us = 0;
        return;
    }
    char text[64];
    int64_t commit = 0;
    if (!jsapi_header_value(l->msg.hdrs.data, OUTBOX_HDR_COMMIT_TIME, text, sizeof(text)) ||
        !time_parse_rfc3339(text, strlen(text), &commit) || commit <= 0)
        commit = l->msg.time_unix_us;
    c->oldest_seq = l->msg.seq;
    c->oldest_unix_us = commit > 0 ? commit : -1;
    if (commit > 0) {
        snprintf(next->filter, sizeof(next->filter), "%s", c->filter);
        next->start = start;
        next->not_before = not_before;
        next->seq = l->msg.seq;
        next->commit_us = commit;
    }
}

/* Appends the consumer described by info to *v when it is durable and selected. */
static void take(const json_t *info, const char *stream, const char *setting, ConsumerLag **v,
                 size_t *n, size_t *cap)
{
    ConsumerLag c;
    if (consumers_parse_info(info, stream, &c) < 0 || !c.durable ||
        !consumers_selected(setting, c.name))
        return;
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        *v = xrealloc(*v, *cap * sizeof(**v));
    }
    (*v)[(*n)++] = c;
}

/* The selected consumers' infos into *v: CONSUMER.LIST pages for "all", else CONSUMER.INFO per
 * name (a missing one is skipped). */
static int read_infos(natsConnection *nc, const char *stream, const char *setting,
                      int64_t timeout_ms, ConsumerLag **v, size_t *n, char *err, size_t errlen)
{
    char subject[600];
    size_t cap = 0;
    bool no_responders;
    if (strcmp(setting, "all") != 0) {
        for (const char *p = setting; *p;) {
            size_t len = strcspn(p, ",");
            snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.INFO.%s.%.*s", stream,
                     (int)len, p);
            p += len + (p[len] == ',');
            json_t *reply =
                jsapi_request_within(nc, subject, "", timeout_ms, &no_responders, err, errlen);
            if (!reply)
                return -1;
            json_t *error = json_object_get(reply, "error");
            if (error && json_integer_value(json_object_get(error, "err_code")) != 10014) {
                snprintf(err, errlen, "could not read consumer info of stream %s: %s", stream,
                         json_string_value(json_object_get(error, "description")) ?: "error");
                json_decref(reply);
                return -1;
            }
            take(reply, stream, setting, v, n, &cap); /* 10014: no such consumer (now) */
            json_decref(reply);
        }
        return 0;
    }
    snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.LIST.%s", stream);
    for (uint64_t offset = 0;;) {
        char body[64];
        snprintf(body, sizeof(body), "{\"offset\":%" PRIu64 "}", offset);
        json_t *reply =
            jsapi_request_within(nc, subject, body, timeout_ms, &no_responders, err, errlen);
        if (!reply)
            return -1;
        json_t *error = json_object_get(reply, "error");
        json_t *list = json_object_get(reply, "consumers");
        if (error || !json_is_array(list)) {
            snprintf(err, errlen, "could not list the consumers of stream %s: %s", stream,
                     error ? json_string_value(json_object_get(error, "description")) ?: "error"
                           : "unexpected reply");
            json_decref(reply);
            return -1;
        }
        size_t i;
        json_t *info;
        json_array_foreach(list, i, info) take(info, stream, setting, v, n, &cap);
        uint64_t total = get_u64(reply, "total");
        size_t got = json_array_size(list);
        offset += got;
        json_decref(reply); /* list goes with it */
        if (got == 0 || offset >= total)
            return 0;
    }
}

int consumers_collect(natsConnection *nc, const char *stream, const char *setting,
                      int64_t timeout_ms, ConsumerCache *cache, ConsumerLag **out, size_t *n,
                      char *err, size_t errlen)
{
    ConsumerLag *v = NULL;
    size_t count = 0;
    if (read_infos(nc, stream, setting, timeout_ms, &v, &count, err, errlen) < 0) {
        free(v);
        return -1;
    }
    Lookup l = {.nc = nc, .stream = stream, .timeout_ms = timeout_ms};
    buf_init(&l.msg.hdrs);
    CacheEntry *next = count ? xcalloc(count, sizeof(CacheEntry)) : NULL;
    for (size_t i = 0; i < count; i++)
        find_oldest(&l, cache, &next[i], &v[i]);
    buf_deinit(&l.msg.hdrs);
    if (cache) { /* what was not seen this time (deleted consumers) is forgotten */
        free(cache->v);
        cache->v = next;
        cache->n = count;
    } else {
        free(next);
    }
    *out = v;
    *n = count;
    return 0;
}

/* ---- the watcher ---- */

struct ConsumerWatch {
    char *urls;
    char stream[256];
    char *setting;
    int64_t interval_ms, retry_max_ms;
    pthread_t thread;
    pthread_cond_t wake;
    bool stop;          /* under lock */
    natsConnection *nc; /* the thread's; under lock, so that stop can close it */
    ConsumerCache *cache;
    unsigned seed;
    /* The snapshot, under lock. */
    ConsumerLag *snap;
    size_t nsnap;
    int64_t refreshed_us;
    uint64_t errors;
};

/* One watcher per process, like the metrics: the HTTP thread finds it here. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static ConsumerWatch *watching;

/* Sleeps until ms have passed or stop is set. Returns true when stopping. */
static bool wait_ms(ConsumerWatch *w, int64_t ms)
{
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (ms % 1000) * 1000000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&lock);
    while (!w->stop && pthread_cond_timedwait(&w->wake, &lock, &until) == 0)
        ;
    bool stop = w->stop;
    pthread_mutex_unlock(&lock);
    return stop;
}

static void drop_connection(ConsumerWatch *w)
{
    pthread_mutex_lock(&lock);
    natsConnection *nc = w->nc;
    w->nc = NULL;
    pthread_mutex_unlock(&lock);
    natsConnection_Destroy(nc);
}

static void *watch_main(void *arg)
{
    ConsumerWatch *w = arg;
    int64_t timeout = w->interval_ms < REQUEST_TIMEOUT_MS ? w->interval_ms : REQUEST_TIMEOUT_MS;
    int64_t backoff = w->interval_ms;
    bool failing = false;
    char err[1024];
    for (;;) {
        int rc = -1;
        if (!w->nc) {
            natsConnection *nc = jsapi_connect_once(w->urls, err, sizeof(err));
            pthread_mutex_lock(&lock);
            bool stop = w->stop;
            if (!stop)
                w->nc = nc;
            pthread_mutex_unlock(&lock);
            if (stop) {
                natsConnection_Destroy(nc);
                break;
            }
        }
        ConsumerLag *v = NULL;
        size_t n = 0;
        if (w->nc)
            rc = consumers_collect(w->nc, w->stream, w->setting, timeout, w->cache, &v, &n, err,
                                   sizeof(err));
        pthread_mutex_lock(&lock);
        if (rc == 0) {
            free(w->snap);
            w->snap = v;
            w->nsnap = n;
            w->refreshed_us = now_unix_us();
        } else {
            w->errors++;
        }
        bool stop = w->stop;
        pthread_mutex_unlock(&lock);
        if (stop)
            break;
        int64_t delay = w->interval_ms;
        if (rc == 0) {
            if (failing)
                log_info("reading the consumers of stream \"%s\" again", w->stream);
            failing = false;
            backoff = w->interval_ms;
        } else {
            if (!failing)
                log_warn("%s; consumer lag is not refreshed until this works (retrying; "
                         "--consumers=off turns it off)",
                         err);
            failing = true;
            if (w->nc && natsConnection_Status(w->nc) != NATS_CONN_STATUS_CONNECTED)
                drop_connection(w);
            /* Full jitter over the upper half, doubling up to --retry-max. */
            delay = backoff / 2 + (int64_t)(rand_r(&w->seed) % (unsigned)(backoff / 2 + 1));
            int64_t cap = w->retry_max_ms > w->interval_ms ? w->retry_max_ms : w->interval_ms;
            backoff = backoff * 2 > cap ? cap : backoff * 2;
        }
        if (wait_ms(w, delay))
            break;
    }
    drop_connection(w);
    return NULL;
}

void consumers_start(ConsumerWatch **out, const Config *cfg, const char *stream)
{
    *out = NULL;
    if (strcmp(cfg->consumers, "off") == 0)
        return;
    ConsumerWatch *w = xcalloc(1, sizeof(*w));
    w->urls = xstrdup(cfg->nats_url);
    snprintf(w->stream, sizeof(w->stream), "%s", stream);
    w->setting = xstrdup(cfg->consumers);
    w->interval_ms = cfg->consumer_interval_ms;
    w->retry_max_ms = cfg->retry_max_ms;
    w->seed = (unsigned)now_unix_us();
    consumers_cache_new(&w->cache);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&w->wake, &attr);
    pthread_condattr_destroy(&attr);

    pthread_mutex_lock(&lock);
    bool taken = watching != NULL;
    if (!taken)
        watching = w;
    pthread_mutex_unlock(&lock);
    /* Signals go to the relay's thread: start this one with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = taken ? -1 : pthread_create(&w->thread, NULL, watch_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        log_warn("could not start reading consumer lag: %s",
                 taken ? "already running" : "no thread");
        if (!taken) {
            pthread_mutex_lock(&lock);
            watching = NULL;
            pthread_mutex_unlock(&lock);
        }
        pthread_cond_destroy(&w->wake);
        consumers_cache_free(w->cache);
        free(w->setting);
        free(w->urls);
        free(w);
        return;
    }
    log_info("reporting the lag of %s consumers of stream \"%s\" every %" PRId64 " ms",
             strcmp(cfg->consumers, "all") == 0 ? "the durable" : "the listed", stream,
             cfg->consumer_interval_ms);
    *out = w;
}

void consumers_stop(ConsumerWatch *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&lock);
    if (watching == w)
        watching = NULL;
    w->stop = true;
    if (w->nc)
        natsConnection_Close(w->nc); /* cuts an outstanding request short */
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&lock);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->wake);
    consumers_cache_free(w->cache);
    free(w->snap);
    free(w->setting);
    free(w->urls);
    free(w);
}

void consumers_render_metrics(Buf *out, int64_t now_unix_us)
{
    pthread_mutex_lock(&lock);
    if (watching)
        consumers_render(watching->snap, watching->nsnap, now_unix_us, watching->refreshed_us,
                         watching->errors, out);
    pthread_mutex_unlock(&lock);
}
