/*
 * publisher.c - JetStream publishing with our own ack routing, and recovery from failures.
 *
 * A JetStream publish is a core NATS publish with a reply subject: the stream's leader answers
 * on it with a PubAck ({"stream":"S","seq":N} or {"error":{...}}), or the server answers "no
 * responders" when no stream takes the subject. outboxd publishes each event with the reply
 * subject "<inbox>.<seq>.<attempt>" and one wildcard subscription receives every answer, so an
 * answer finds its ring slot from its own subject in O(1), with no map and no lock.
 *
 * Threads: the relay's thread publishes, and takes in the answers itself in publisher_poll():
 * the subscription is synchronous, so nats.c's reader thread only queues an answer and wakes no
 * other thread for it (an asynchronous subscription hands every answer to a delivery thread,
 * which cost a thread switch per event). The relay does not learn of an answer the moment it
 * arrives: while events are in flight, publisher_next_deadline() is at most ACK_POLL_US away,
 * so the relay looks that often and takes in every answer queued by then in one go. Each answer
 * compare-and-swaps its slot's state word, which packs (seq, attempt, error code, state): an
 * answer for an event whose slot was already reused, or for an earlier attempt, fails the swap
 * and is ignored. nats.c's connection callbacks still run on its thread; they poke an eventfd.
 *
 * Recovery is go-back-N: a timeout does not mean "not stored", and later publishes can succeed
 * while earlier ones fail, so retrying one event alone would reorder the stream. Instead the
 * publisher pauses, waits a backoff (doubling from retry_min to retry_max, full jitter), and
 * sends every unacknowledged event again in sequence order with its Nats-Msg-Id, so JetStream
 * drops what it already holds. With strict order each event also carries
 * Nats-Expected-Last-Msg-Id = the previous event's id: a gap makes every later publish fail
 * until the go-back-N refills it, so the stream can never hold a later event before an earlier
 * one. When the oldest unacknowledged event fails that check although everything before it is
 * stored, someone else wrote to the stream: the chain restarts from the stream's last message.
 */
#include "outboxd/publisher.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/jetstream.h"
#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/puback.h"
#include "outboxd/util.h"
#include "outboxd/wire.h"

enum { ST_INFLIGHT = 0, ST_ACKED = 1, ST_DUPLICATE = 2, ST_FAILED = 3 };

/* Error codes beside JetStream's own err_code values (10000 and up). */
enum { CODE_NONE = 0, CODE_NO_RESPONDERS = 1, CODE_BAD_REPLY = 2 };
/* JetStream err_code values that decide what happens next. */
enum { JS_WRONG_LAST_MSG_ID = 10070, JS_MESSAGE_TOO_LARGE = 10054 };

#define SEQ_BITS 40
#define SEQ_MASK ((UINT64_C(1) << SEQ_BITS) - 1)
/* Room left for a dead letter's headers below max_payload. */
#define DEAD_LETTER_HEADER_ROOM 4096
/* How often the relay takes in acknowledgements while events are in flight. Longer batches
 * more answers per wake-up; it adds up to this much to the commit-to-ack latency. */
#define ACK_POLL_US INT64_C(1000)

static inline uint64_t state_word(uint64_t seq, unsigned attempt, unsigned code, unsigned st)
{
    return ((seq & SEQ_MASK) << 24) | ((uint64_t)(attempt & 0xff) << 16) |
           ((uint64_t)(code & 0x3fff) << 2) | st;
}

static inline unsigned word_state(uint64_t w)
{
    return (unsigned)(w & 3);
}

static inline unsigned word_code(uint64_t w)
{
    return (unsigned)((w >> 2) & 0x3fff);
}

typedef struct Slot {
    _Atomic uint64_t state;
    WireMsg wire;        /* kept until acknowledged, so it can be sent again */
    uint64_t seq;
    unsigned attempt;
    bool dead_letter;    /* not chained into the stream order */
    bool sent;           /* went out at least once (a resend of it is a retry) */
    int64_t sent_at;     /* CLOCK_MONOTONIC µs */
    int64_t commit_time; /* µs since 2000-01-01 */
    size_t bytes;
} Slot;

struct Publisher {
    natsConnection *nc;
    natsSubscription *sub;
    jsCtx *js;
    kvStore *kv;
    char kv_bucket[80];
    char inbox[64];
    Slot *ring;
    uint64_t mask;
    uint64_t head; /* oldest unreleased seq */
    uint64_t next; /* next seq to assign */
    int64_t max_inflight;
    int64_t max_bytes;
    int64_t bytes;
    Buf *pool;           /* buffers of acknowledged events, for the next ones */
    size_t npool, pool_bytes;
    int64_t ack_timeout_us;
    bool strict;
    char chain_last[256]; /* Nats-Msg-Id the next chained event expects as the stream's last */
    char *dead_letter_subject;
    char *table;
    char stream[256];
    /* recovery */
    int64_t retry_min_us, retry_max_us;
    bool paused;
    bool reseed;         /* restart the chain from the stream's last message before resending */
    int64_t resume_at;
    unsigned failures;   /* consecutive pauses without progress, for the backoff */
    bool last_was_duplicate; /* the newest released event was acknowledged as a duplicate */
    unsigned seen_epoch;
    atomic_uint conn_epoch; /* incremented by every disconnect */
    atomic_bool connected;
    bool fatal;
    char fatal_msg[512];
    OutboxEvent dlq;     /* scratch for dead letters built from a refused message */
    int wake_fd;
    atomic_bool closing; /* we are closing the connection ourselves */
    atomic_bool closed;  /* nats.c ran the closed callback: no callback of ours runs after it */
    char urls[512];      /* without credentials, for messages */
};

/* ---- small helpers ------------------------------------------------------------------------- */

/* xorshift64*: jitter needs no more, and each thread keeps its own state. */
static uint64_t random_u64(void)
{
    static _Thread_local uint64_t x;
    if (x == 0)
        x = (uint64_t)now_mono_us() * UINT64_C(0x9E3779B97F4A7C15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

/* Full jitter: a uniform delay in [0, min(max, base * 2^attempt)]. */
static int64_t backoff_us(int64_t base, int64_t max, unsigned attempt)
{
    int64_t cap = base;
    for (unsigned i = 0; i < attempt && cap < max; i++)
        cap *= 2;
    if (cap > max)
        cap = max;
    return (int64_t)(random_u64() % (uint64_t)(cap + 1));
}

static int nats_fail(char *err, size_t errlen, const char *what, natsStatus s)
{
    const char *last = nats_GetLastError(NULL);
    bool extra = last && *last && strcmp(last, natsStatus_GetText(s)) != 0;
    snprintf(err, errlen, "%s: %s%s%s", what, natsStatus_GetText(s), extra ? ": " : "",
             extra ? last : "");
    return -1;
}

/* ---- answers ---------------------------------------------------------------------- */

static unsigned classify_reply(natsMsg *msg, unsigned *code)
{
    *code = CODE_NONE;
    if (natsMsg_IsNoResponders(msg)) {
        *code = CODE_NO_RESPONDERS;
        return ST_FAILED;
    }
    unsigned err_code;
    switch (puback_parse(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), &err_code)) {
    case PUBACK_STORED:
        return ST_ACKED;
    case PUBACK_DUPLICATE:
        return ST_DUPLICATE;
    default:
        *code = err_code > CODE_BAD_REPLY && err_code < 0x4000 ? err_code : CODE_BAD_REPLY;
        return ST_FAILED;
    }
}

static void take_reply(Publisher *p, natsMsg *msg)
{
    uint64_t seq;
    unsigned attempt;
    if (puback_reply_subject(natsMsg_GetSubject(msg), &seq, &attempt)) {
        unsigned code;
        unsigned st = classify_reply(msg, &code);
        Slot *slot = &p->ring[seq & p->mask];
        uint64_t expect = state_word(seq, attempt, 0, ST_INFLIGHT);
        atomic_compare_exchange_strong(&slot->state, &expect, state_word(seq, attempt, code, st));
    }
    /* Anything else (a checkpoint write's answer) needs no handling. Nobody else holds the
     * answer: free it here rather than wake nats.c's collector thread for each one. */
    wire_msg_free(msg, wire_raw_supported());
}

/* Takes in every answer queued on the subscription. */
static void take_replies(Publisher *p)
{
    int n = 0;
    if (natsSubscription_GetPending(p->sub, &n, NULL) != NATS_OK)
        return;
    for (; n > 0; n--) {
        natsMsg *msg = NULL;
        natsStatus s = natsSubscription_NextMsg(&msg, p->sub, 0);
        if (s == NATS_SLOW_CONSUMER)
            continue; /* cannot happen without pending limits; lost answers time out */
        if (s != NATS_OK)
            break;
        take_reply(p, msg);
    }
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    Publisher *p = closure;
    atomic_store(&p->connected, false);
    atomic_store(&metrics.nats_connected, 0);
    atomic_fetch_add(&p->conn_epoch, 1);
    if (!atomic_load(&p->closing))
        log_warn("disconnected from NATS; reconnecting");
    uint64_t one = 1;
    ssize_t ignored = write(p->wake_fd, &one, sizeof(one));
    (void)ignored;
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    Publisher *p = closure;
    char url[256] = "";
    natsConnection_GetConnectedUrl(nc, url, sizeof(url));
    log_info("reconnected to NATS at %s", url);
    atomic_store(&p->connected, true);
    atomic_store(&metrics.nats_connected, 1);
    uint64_t one = 1;
    ssize_t ignored = write(p->wake_fd, &one, sizeof(one));
    (void)ignored;
}

/* nats.c runs the connection's callbacks one after the other on one thread, and this one last:
 * once it ran, none of them touches the Publisher any more. */
static void on_closed(natsConnection *nc, void *closure)
{
    Publisher *p = closure;
    atomic_store(&p->closed, true);
}

static int64_t reconnect_delay(natsConnection *nc, int attempts, void *closure)
{
    Publisher *p = closure;
    return backoff_us(p->retry_min_us, p->retry_max_us, (unsigned)(attempts > 0 ? attempts - 1 : 0)) /
           1000;
}

/* ---- set-up -------------------------------------------------------------------------------- */

int publisher_new(Publisher **out, const PublisherOptions *opts, char *err, size_t errlen)
{
    Publisher *p = xcalloc(1, sizeof(*p));
    p->wake_fd = -1;
    jsapi_redact_urls(opts->urls, p->urls, sizeof(p->urls));
    outbox_event_init(&p->dlq);
    p->retry_min_us = opts->retry_min_ms * 1000;
    p->retry_max_us = opts->retry_max_ms * 1000;
    p->strict = opts->strict_order;
    p->dead_letter_subject = opts->dead_letter_subject ? xstrdup(opts->dead_letter_subject) : NULL;
    p->table = xstrdup(opts->table ? opts->table : "");
    int rc = -1;
    natsOptions *no = NULL;

    uint64_t cap = 1;
    while ((int64_t)cap < opts->max_inflight)
        cap <<= 1;
    p->ring = xcalloc(cap, sizeof(Slot));
    p->pool = xcalloc(cap, sizeof(Buf));
    p->mask = cap - 1;
    p->head = p->next = 1;
    p->max_inflight = opts->max_inflight;
    p->max_bytes = opts->max_inflight_bytes;
    p->ack_timeout_us = opts->ack_timeout_ms * 1000;
    for (uint64_t i = 0; i < cap; i++)
        atomic_init(&p->ring[i].state, state_word(0, 0, 0, ST_ACKED));
    p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->wake_fd < 0) {
        snprintf(err, errlen, "could not create an eventfd: %s", strerror(errno));
        goto done;
    }

    natsStatus s = natsOptions_Create(&no);
    if (s == NATS_OK && jsapi_apply_security(no, err, errlen) < 0) {
        rc = PUBLISH_CHECK_FAILED;
        goto done;
    }
    if (s == NATS_OK)
        s = jsapi_set_servers(no, opts->urls);
    if (s == NATS_OK)
        s = natsOptions_SetName(no, "outboxd");
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(no, 5000);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(no, -1);
    if (s == NATS_OK)
        s = natsOptions_SetCustomReconnectDelay(no, reconnect_delay, p);
    if (s == NATS_OK) /* while disconnected nothing new is published: a small buffer is enough */
        s = natsOptions_SetReconnectBufSize(no, 8 * 1024 * 1024);
    if (s == NATS_OK)
        s = natsOptions_SetDisconnectedCB(no, on_disconnected, p);
    if (s == NATS_OK)
        s = natsOptions_SetClosedCB(no, on_closed, p);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectedCB(no, on_reconnected, p);
    if (s != NATS_OK) {
        nats_fail(err, errlen, "could not set NATS options", s);
        goto done;
    }
    s = natsConnection_Connect(&p->nc, no);
    if (s != NATS_OK) {
        char why[512];
        nats_fail(why, sizeof(why), "connect", s);
        snprintf(err, errlen,
                 "could not connect to NATS at %s: %s (is nats-server running there? set "
                 "--nats-url)",
                 p->urls, why + strlen("connect: "));
        rc = PUBLISH_CHECK_FAILED;
        goto done;
    }
    atomic_store(&p->connected, true);
    atomic_store(&metrics.nats_connected, 1);

    bool no_responders;
    json_t *info = jsapi_request(p->nc, "$JS.API.INFO", "", &no_responders, err, errlen);
    json_t *jerr = info ? json_object_get(info, "error") : NULL;
    json_int_t jcode = jerr ? json_integer_value(json_object_get(jerr, "err_code")) : 0;
    json_decref(info);
    if (no_responders || jcode == 10039 || jcode == 10076) {
        snprintf(err, errlen,
                 "JetStream is not enabled on the NATS server at %s: start nats-server with -js "
                 "(or a jetstream block in its configuration)",
                 p->urls);
        rc = PUBLISH_CHECK_FAILED;
        goto done;
    }
    if (!info)
        goto done;
    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = 2000; /* checkpoint writes at shutdown must not hold up a stop for long */
    if ((s = natsConnection_JetStream(&p->js, p->nc, &jo)) != NATS_OK) {
        nats_fail(err, errlen, "could not use JetStream", s);
        goto done;
    }

    natsInbox *inbox = NULL;
    if ((s = natsInbox_Create(&inbox)) != NATS_OK) {
        nats_fail(err, errlen, "could not create an inbox", s);
        goto done;
    }
    snprintf(p->inbox, sizeof(p->inbox), "%s", (const char *)inbox);
    natsInbox_Destroy(inbox);

    char wildcard[80];
    snprintf(wildcard, sizeof(wildcard), "%s.>", p->inbox);
    s = natsConnection_SubscribeSync(&p->sub, p->nc, wildcard);
    if (s == NATS_OK) /* acks must never be dropped as a slow consumer */
        s = natsSubscription_SetPendingLimits(p->sub, -1, -1);
    if (s == NATS_OK)
        s = natsConnection_FlushTimeout(p->nc, 5000);
    if (s != NATS_OK) {
        nats_fail(err, errlen, "could not subscribe for publish acknowledgements", s);
        goto done;
    }
    rc = 0;
done:
    natsOptions_Destroy(no);
    if (rc == 0)
        *out = p;
    else
        publisher_free(p);
    return rc;
}

void publisher_free(Publisher *p)
{
    if (!p)
        return;
    atomic_store(&p->closing, true);
    kvStore_Destroy(p->kv);
    jsCtx_Destroy(p->js);
    if (p->sub) {
        natsSubscription_Unsubscribe(p->sub);
        natsSubscription_Destroy(p->sub);
    }
    if (p->nc) {
        natsConnection_Close(p->nc);
        /* The disconnected and closed callbacks may still be queued: free p after them. */
        for (int i = 0; i < 2000 && !atomic_load(&p->closed); i++)
            nats_Sleep(1);
        natsConnection_Destroy(p->nc);
    }
    if (p->ring) {
        for (uint64_t i = 0; i <= p->mask; i++)
            wire_deinit(&p->ring[i].wire);
        free(p->ring);
    }
    if (p->pool) {
        for (size_t i = 0; i < p->npool; i++)
            buf_deinit(&p->pool[i]);
        free(p->pool);
    }
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    outbox_event_deinit(&p->dlq);
    free(p->dead_letter_subject);
    free(p->table);
    free(p);
}

int publisher_bind_stream(Publisher *p, const char *filter, StreamInfo *info, char *err,
                          size_t errlen)
{
    bool found;
    if (jsapi_find_stream(p->nc, filter, p->stream, sizeof(p->stream), &found, err, errlen) < 0)
        return -1;
    if (!found) {
        snprintf(err, errlen,
                 "no JetStream stream captures subjects %s: create one whose subjects cover them "
                 "(for the default template, a stream with subjects \"outbox.>\")",
                 filter);
        return PUBLISH_CHECK_FAILED;
    }
    if (jsapi_stream_info(p->nc, p->stream, info, err, errlen) < 0)
        return -1;
    snprintf(p->chain_last, sizeof(p->chain_last), "%s", info->last_msg_id);

    if (p->dead_letter_subject) {
        char name[256];
        if (jsapi_find_stream(p->nc, p->dead_letter_subject, name, sizeof(name), &found, err,
                              errlen) < 0)
            return -1;
        if (!found) {
            snprintf(err, errlen,
                     "no JetStream stream captures the dead-letter subject %s: add it to a "
                     "stream's subjects, or set --dead-letter-subject (or --on-poison=stop)",
                     p->dead_letter_subject);
            return PUBLISH_CHECK_FAILED;
        }
    }
    return 0;
}

/* ---- publishing ---------------------------------------------------------------------------- */

uint64_t publisher_next_seq(const Publisher *p)
{
    return p->next;
}

bool publisher_has_room(const Publisher *p)
{
    int64_t n = (int64_t)(p->next - p->head);
    return !p->fatal && n < p->max_inflight && (p->bytes < p->max_bytes || n == 0);
}

size_t publisher_max_body(const Publisher *p)
{
    int64_t max = natsConnection_GetMaxPayload(p->nc);
    return max > DEAD_LETTER_HEADER_ROOM ? (size_t)(max - DEAD_LETTER_HEADER_ROOM) : 0;
}

static void pause_publishing(Publisher *p, int64_t now, PublishError kind, const char *why);

/* "<inbox>.<seq>.<attempt>", without printf: it runs for every event. */
static void reply_subject(const Publisher *p, uint64_t seq, unsigned attempt, char *out,
                          size_t outlen)
{
    char digits[24], *d = digits + sizeof(digits);
    *--d = '\0';
    unsigned a = attempt & 0xff;
    do
        *--d = (char)('0' + a % 10);
    while ((a /= 10) != 0);
    *--d = '.';
    do
        *--d = (char)('0' + seq % 10);
    while ((seq /= 10) != 0);
    *--d = '.';
    size_t n = strlen(p->inbox), k = strlen(d);
    if (n + k + 1 > outlen)
        n = outlen - k - 1;
    memcpy(out, p->inbox, n);
    memcpy(out + n, d, k + 1);
}

/* Encodes ev into the slot, in a buffer from the pool when the slot has none. */
static void encode_slot(Publisher *p, Slot *slot, const OutboxEvent *ev, const char *expected)
{
    if (wire_capacity(&slot->wire) == 0 && p->npool > 0) {
        Buf b = p->pool[--p->npool];
        p->pool_bytes -= b.cap;
        wire_give_buffer(&slot->wire, b);
    }
    wire_encode(&slot->wire, ev, expected);
}

/* Lets the slot's message go. Its buffer goes to the pool, last in first out, so the buffers
 * in use stay few and warm, while the pool holds no more than the in-flight byte window:
 * allocating a large buffer for every event costs more than the copy into it (its fresh pages
 * fault in each time), and memory still follows the window, not the backlog. */
static void clear_slot(Publisher *p, Slot *slot)
{
    size_t cap = wire_capacity(&slot->wire);
    if (cap > 0 && p->npool <= p->mask && p->pool_bytes + cap <= (size_t)p->max_bytes) {
        p->pool[p->npool++] = wire_take_buffer(&slot->wire);
        p->pool_bytes += cap;
    } else {
        wire_deinit(&slot->wire);
    }
}

/* Sends the event in slot as the given attempt, unless publishing is paused: then it waits in
 * the window and goes out, in order, when publishing resumes. A failed send leaves the event in
 * flight: it fails by timeout or disconnect and is sent again, never lost. */
static void send_slot(Publisher *p, Slot *slot, unsigned attempt)
{
    slot->attempt = attempt;
    atomic_store(&slot->state, state_word(slot->seq, attempt, 0, ST_INFLIGHT));
    slot->sent_at = now_mono_us();
    if (p->paused)
        return;
    slot->sent = true;
    char reply[96];
    reply_subject(p, slot->seq, attempt, reply, sizeof(reply));
    natsStatus s = wire_publish(p->nc, &slot->wire, reply);
    if (s != NATS_OK)
        log_debug("publish of seq %" PRIu64 " failed at once: %s", slot->seq,
                  natsStatus_GetText(s));
}

int publisher_publish(Publisher *p, const OutboxEvent *ev, bool dead_letter, uint64_t *seq_out,
                      char *err, size_t errlen)
{
    uint64_t seq = p->next;
    Slot *slot = &p->ring[seq & p->mask];
    bool chained = p->strict && !dead_letter;
    encode_slot(p, slot, ev, chained ? p->chain_last : NULL);
    /* A chained event may later expect another, longer id (see reseed_head). */
    size_t size = wire_size(&slot->wire) + (chained ? WIRE_EXPECTED_ROOM : 0);
    int64_t max_payload = natsConnection_GetMaxPayload(p->nc);
    if (max_payload > 0 && (int64_t)size > max_payload) {
        clear_slot(p, slot);
        snprintf(err, errlen,
                 "the event is %zu bytes with its headers, more than the NATS server's "
                 "max_payload of %" PRId64 " bytes",
                 size, max_payload);
        return PUBLISH_UNPUBLISHABLE;
    }
    if (!p->paused && !atomic_load(&p->connected))
        pause_publishing(p, now_mono_us(), PUBERR_CONNECTION, "not connected to NATS");
    if (chained)
        snprintf(p->chain_last, sizeof(p->chain_last), "%s", ev->msg_id);

    slot->seq = seq;
    slot->sent = false;
    slot->dead_letter = dead_letter;
    slot->commit_time = ev->commit_time;
    slot->bytes = size;
    p->next++;
    p->bytes += (int64_t)size;
    send_slot(p, slot, 0);
    *seq_out = seq;
    return 0;
}

/* ---- failures and recovery ------------------------------------------------------------------ */

static PublishError error_kind(unsigned code)
{
    switch (code) {
    case CODE_NO_RESPONDERS:
        return PUBERR_NO_RESPONDERS;
    case CODE_BAD_REPLY:
        return PUBERR_REJECTED;
    default:
        return PUBERR_REJECTED;
    }
}

static void describe_code(unsigned code, char *out, size_t outlen)
{
    switch (code) {
    case CODE_NO_RESPONDERS:
        snprintf(out, outlen, "no responders (no stream took the subject, or the stream is "
                              "electing a leader)");
        break;
    case CODE_BAD_REPLY:
        snprintf(out, outlen, "JetStream sent an unexpected reply");
        break;
    case JS_WRONG_LAST_MSG_ID:
        snprintf(out, outlen, "the stream's last message is not the previous event (err_code "
                              "10070)");
        break;
    default:
        snprintf(out, outlen, "JetStream refused the event (err_code %u)", code);
        break;
    }
}

/* An event's id and commit LSN, read from its headers. */
typedef struct EventName {
    char id[OUTBOX_MAX_EVENT_ID + 1], lsn[32];
    bool has_id, has_lsn;
} EventName;

/* Names the event in a message: its id, subject and commit LSN, which it leaves in *name. */
static void describe_event(const WireMsg *w, EventName *name, char *out, size_t outlen)
{
    name->has_id = wire_header(w, OUTBOX_HDR_MSG_ID, name->id, sizeof(name->id));
    name->has_lsn = wire_header(w, OUTBOX_HDR_COMMIT_LSN, name->lsn, sizeof(name->lsn));
    /* Shortened to fit one log line; the subject and id identify the event well before. */
    snprintf(out, outlen, "event %.80s (subject %.120s, commit LSN %.17s)",
             name->has_id ? name->id : "?", wire_subject(w), name->has_lsn ? name->lsn : "?");
}

static void pause_publishing(Publisher *p, int64_t now, PublishError kind, const char *why)
{
    if (p->paused)
        return;
    metrics_publish_error(kind);
    int64_t delay = backoff_us(p->retry_min_us, p->retry_max_us, p->failures);
    p->failures++;
    p->paused = true;
    p->resume_at = now + delay;
    log_warn("publishing paused: %s; events wait in the window (%" PRIu64 " now) and are sent "
             "again in order in %" PRId64 " ms%s",
             why, p->next - p->head, delay / 1000,
             atomic_load(&p->connected) ? "" : " once NATS is reachable");
}

/* The event at the head can never be stored as it is: replace it by a dead letter, or stop. */
static void refuse_head(Publisher *p, Slot *slot, unsigned code)
{
    char event[256], why[128];
    EventName name;
    describe_event(&slot->wire, &name, event, sizeof(event));
    describe_code(code, why, sizeof(why));
    if (!p->dead_letter_subject || slot->dead_letter) {
        p->fatal = true;
        snprintf(p->fatal_msg, sizeof(p->fatal_msg), "%s: %s", event, why);
        return;
    }
    uint64_t lsn = 0;
    if (name.has_lsn)
        lsn_parse(name.lsn, &lsn);
    DeadLetter dl = {
        .reason = code == JS_MESSAGE_TOO_LARGE ? "too_large" : "rejected",
        .detail = why,
        .event_id = name.has_id ? name.id : NULL,
        .event_id_len = name.has_id ? strlen(name.id) : 0,
        .table = p->table,
        .subject = wire_subject(&slot->wire),
        .commit_lsn = lsn,
        .commit_time = slot->commit_time,
        .index = (uint32_t)slot->seq,
    };
    outbox_dead_letter(&p->dlq, p->dead_letter_subject, &dl, 0);
    metrics_dead_letter(code == JS_MESSAGE_TOO_LARGE ? DLR_TOO_LARGE : DLR_REJECTED);
    log_warn("dead-lettered %s to %s: %s", event, p->dead_letter_subject, why);
    encode_slot(p, slot, &p->dlq, NULL);
    slot->dead_letter = true;
    send_slot(p, slot, slot->attempt + 1);
}

/* With strict order: the next resend of the head expects the stream's current last message. */
static void reseed_head(Publisher *p, Slot *slot)
{
    StreamInfo info;
    char err[256];
    if (jsapi_stream_info(p->nc, p->stream, &info, err, sizeof(err)) < 0) {
        log_warn("could not read stream %s to restart the order chain: %s", p->stream, err);
        return;
    }
    wire_set_expected(&slot->wire, info.last_msg_id);
    if (p->last_was_duplicate)
        log_info("continuing the order chain of stream %s after duplicates, from its last "
                 "message \"%s\"",
                 p->stream, info.last_msg_id);
    else
        log_warn("stream %s has messages outboxd did not write (last id \"%s\"); the order chain "
                 "continues from there",
                 p->stream, info.last_msg_id);
    p->reseed = false;
}

/* Sends every unacknowledged event again, oldest first. */
static void resend_window(Publisher *p)
{
    uint64_t count = 0, retries = 0;
    for (uint64_t seq = p->head; seq < p->next; seq++) {
        Slot *slot = &p->ring[seq & p->mask];
        unsigned st = word_state(atomic_load(&slot->state));
        if (st == ST_ACKED || st == ST_DUPLICATE)
            continue;
        if (seq == p->head && p->reseed && !slot->dead_letter)
            reseed_head(p, slot);
        retries += slot->sent;
        send_slot(p, slot, slot->attempt + 1);
        count++;
    }
    atomic_fetch_add_explicit(&metrics.publish_retries, retries, memory_order_relaxed);
    log_info("publishing resumed: sent %" PRIu64 " events (%" PRIu64 " of them again)", count,
             retries);
}

static void release(Publisher *p, Slot *slot, unsigned state, int64_t now_unix)
{
    p->last_was_duplicate = state == ST_DUPLICATE;
    if (!slot->dead_letter) {
        if (state == ST_DUPLICATE)
            atomic_fetch_add_explicit(&metrics.events_duplicate, 1, memory_order_relaxed);
        else
            atomic_fetch_add_explicit(&metrics.events_published, 1, memory_order_relaxed);
        metrics_observe_latency(now_unix - pg_time_to_unix_us(slot->commit_time));
    }
    p->bytes -= (int64_t)slot->bytes;
    clear_slot(p, slot);
}

void publisher_poll(Publisher *p, int64_t now, PublisherStatus *st)
{
    /* A disconnect loses the answers to everything in flight: send it all again. */
    unsigned epoch = atomic_load(&p->conn_epoch);
    if (epoch != p->seen_epoch) {
        p->seen_epoch = epoch;
        if (p->head < p->next)
            pause_publishing(p, now, PUBERR_CONNECTION, "lost the connection to NATS");
    }

    take_replies(p);
    int64_t now_unix = now_unix_us();
    while (p->head < p->next && !p->fatal) {
        Slot *slot = &p->ring[p->head & p->mask];
        uint64_t w = atomic_load(&slot->state);
        unsigned state = word_state(w);
        if (state == ST_ACKED || state == ST_DUPLICATE) {
            release(p, slot, state, now_unix);
            p->head++;
            p->failures = 0;
            continue;
        }
        if (state == ST_INFLIGHT) {
            if (!p->paused && now - slot->sent_at > p->ack_timeout_us) {
                char why[128];
                snprintf(why, sizeof(why), "no acknowledgement within %" PRId64 " ms",
                         p->ack_timeout_us / 1000);
                pause_publishing(p, now, PUBERR_TIMEOUT, why);
            }
            break;
        }
        /* ST_FAILED */
        unsigned code = word_code(w);
        if (code == JS_MESSAGE_TOO_LARGE) {
            refuse_head(p, slot, code);
            break;
        }
        if (!p->paused && code == JS_WRONG_LAST_MSG_ID && p->strict && p->last_was_duplicate) {
            /* The events before were already in the stream (a replay, a restart), so the stream's
             * last message is some later one: not a failure, the chain just continues from it. */
            p->reseed = true;
            p->paused = true;
            p->resume_at = now;
            log_debug("the events before %" PRIu64 " were duplicates; continuing the order chain "
                      "from the stream's last message",
                      p->head);
        } else if (!p->paused) {
            char event[256], why[128], line[400];
            EventName name;
            describe_event(&slot->wire, &name, event, sizeof(event));
            describe_code(code, why, sizeof(why));
            snprintf(line, sizeof(line), "%s: %s", event, why);
            if (code == JS_WRONG_LAST_MSG_ID && p->strict)
                p->reseed = true; /* everything before the head is stored: no gap of ours */
            pause_publishing(p, now, error_kind(code), line);
        }
        break;
    }

    if (p->paused && !p->fatal && now >= p->resume_at && atomic_load(&p->connected)) {
        p->paused = false;
        resend_window(p);
    }

    st->next_seq = p->next;
    st->first_unacked = p->head;
    st->inflight = (size_t)(p->next - p->head);
    st->paused = p->paused;
    st->failed = p->fatal;
    snprintf(st->failure, sizeof(st->failure), "%s", p->fatal ? p->fatal_msg : "");
    atomic_store_explicit(&metrics.in_flight, (int64_t)st->inflight, memory_order_relaxed);
    atomic_store_explicit(&metrics.oldest_pending_unix_us,
                          p->head < p->next
                              ? pg_time_to_unix_us(p->ring[p->head & p->mask].commit_time)
                              : 0,
                          memory_order_relaxed);
}

int64_t publisher_next_deadline(const Publisher *p)
{
    /* Paused and disconnected: nothing can be resent before the connection is back, and the
     * wake fd reports that. resume_at lies in the past once the backoff ran out, and returning
     * it would make the caller poll without sleeping for the whole outage. */
    if (p->paused && !atomic_load(&p->connected))
        return INT64_MAX;
    if (p->head == p->next)
        return p->paused ? p->resume_at : INT64_MAX;
    int64_t due = p->paused ? p->resume_at
                            : p->ring[p->head & p->mask].sent_at + p->ack_timeout_us;
    /* Answers are queued without waking anyone: look again soon while they may arrive. */
    if (atomic_load(&p->connected)) {
        int64_t look = now_mono_us() + ACK_POLL_US;
        if (look < due)
            due = look;
    }
    return due;
}

int publisher_wake_fd(const Publisher *p)
{
    return p->wake_fd;
}

void publisher_rearm(Publisher *p)
{
    uint64_t v;
    ssize_t ignored = read(p->wake_fd, &v, sizeof(v));
    (void)ignored;
}

/* ---- the durable checkpoint ------------------------------------------------------------------ */

int publisher_checkpoint_open(Publisher *p, const char *bucket, int replicas, char *err,
                              size_t errlen)
{
    snprintf(p->kv_bucket, sizeof(p->kv_bucket), "%s", bucket);
    natsStatus s = js_KeyValue(&p->kv, p->js, bucket);
    if (s == NATS_NOT_FOUND) {
        kvConfig kc;
        kvConfig_Init(&kc);
        kc.Bucket = bucket;
        kc.Description = "outboxd checkpoints: the progress of each relay, per system and slot";
        kc.History = 1;
        kc.Replicas = replicas;
        kc.StorageType = js_FileStorage;
        s = js_CreateKeyValue(&p->kv, p->js, &kc);
        if (s == NATS_OK)
            log_info("created key-value bucket \"%s\" for checkpoints (%d replicas)", bucket,
                     replicas);
    }
    if (s != NATS_OK) {
        char what[160];
        snprintf(what, sizeof(what), "could not open the checkpoint bucket \"%s\"", bucket);
        return nats_fail(err, errlen, what, s);
    }
    return 0;
}

int publisher_checkpoint_get(Publisher *p, const char *key, Checkpoint *cp, char *err,
                             size_t errlen)
{
    return jsapi_checkpoint_read(p->js, p->kv_bucket, key, cp, err, errlen);
}

void publisher_checkpoint_put_async(Publisher *p, const char *key, const Checkpoint *cp)
{
    if (!atomic_load(&p->connected))
        return;
    char subject[256], reply[96];
    snprintf(subject, sizeof(subject), "$KV.%s.%s", p->kv_bucket, key);
    snprintf(reply, sizeof(reply), "%s.checkpoint", p->inbox);
    Buf value;
    buf_init(&value);
    checkpoint_encode(cp, &value);
    natsConnection_PublishRequest(p->nc, subject, reply, value.data, (int)value.len);
    buf_deinit(&value);
}

int publisher_checkpoint_put(Publisher *p, const char *key, const Checkpoint *cp, char *err,
                             size_t errlen)
{
    Buf value;
    buf_init(&value);
    checkpoint_encode(cp, &value);
    uint64_t rev;
    natsStatus s = kvStore_Put(&rev, p->kv, key, value.data, (int)value.len);
    buf_deinit(&value);
    if (s != NATS_OK)
        return nats_fail(err, errlen, "could not store the checkpoint", s);
    return 0;
}
