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
 * arrives: it takes in every answer queued by then at each of its wake-ups (a live relay wakes
 * for every transaction PostgreSQL sends), and while events are in flight
 * publisher_next_deadline() is at most ACK_POLL_US away, so that the last answers are taken in
 * when PostgreSQL goes quiet. Each answer
 * compare-and-swaps its slot's state word, which packs (seq, attempt, error code, state): an
 * answer for an event whose slot was already reused, or for an earlier attempt, fails the swap
 * and is ignored. nats.c's connection callbacks still run on its thread; they poke an eventfd.
 *
 * Recovery is go-back-N: a timeout does not mean "not stored", and later publishes can succeed
 * while earlier ones fail, so retrying one event alone would reorder the stream. Instead the
 * publisher pauses, waits a backoff (doubling from retry_min to retry_max, full jitter), and
 * sends every unacknowledged event again in sequence order with its Nats-Msg-Id, so JetStream
 * drops what it already holds. After the backoff only the oldest event goes out (a probe);
 * the rest follow once it is stored, so a stream that is still full or a broker still
 * electing a leader costs one publish per attempt, not the whole window.
 *
 * The order chain (strict order). Each event carries Nats-Expected-Last-Sequence = the stream
 * sequence the event before it got, so the stream stores it only right behind that one: a gap
 * makes every later publish fail (10071) until the go-back-N refills it, and the stream can
 * never hold a later event before an earlier one. Why sequences and not the previous event's
 * Nats-Msg-Id (Nats-Expected-Last-Msg-Id): nats-server 2.9 rebuilds a stream's last message id
 * after a restart only from messages still inside the duplicate window, so after a quiet spell
 * longer than the window and a broker restart every chained publish was refused for ever; the
 * last sequence is the stream's own state and survives restarts, purges and quiet spells. The
 * expected value is assigned when an event is sent, not when it is encoded: a resend renumbers
 * the window from the last sequence the stream is known to hold. That is learnt from the
 * answers themselves (each PubAck carries its sequence; a duplicate's sequence is a lower
 * bound), and when the stream disagrees its refusal says what its last sequence is ("wrong
 * last sequence: N"). The rule for the head: if it is refused with 10071 while everything
 * before it is stored, nothing of outboxd's is missing, so the chain continues from the
 * stream's sequence: at once after duplicates (a replayed window, a re-used event id), with a
 * warning otherwise (another writer, a stream restored from a snapshot). A chain that keeps
 * breaking without the head getting stored backs off and, after CHAIN_BREAKS_MAX tries, stops
 * the relay with a message naming the cause: the loop can never spin without progress. Dead
 * letters are chained like events: they stand in their event's place in the stream.
 *
 * Lost acknowledgements (strict order). A one-way partition, or a connection that went silent
 * and was replaced, can lose the answers to events JetStream stored. Resending them relies on
 * the duplicate window, and an outage longer than the window stored them twice. So before the
 * chain continues past messages outboxd did not expect (10071 at the head, everything before it
 * stored), the publisher reads them (recognise_stored): each that carries the Nats-Msg-Id of
 * the window's next event, in order (a dead letter's own id when one took the event's place),
 * is that event's acknowledgement at its sequence, however long ago it was stored. Only what is
 * not the window's is another writer's. While the stream cannot be read nothing is resent past
 * those messages: the chain keeps refusing, so nothing is stored twice meanwhile.
 *
 * Refusals. 10077 is the stream's own limits with discard new: a full stream (max_msgs,
 * max_bytes) passes once it has room, so it pauses and probes for as long as it takes and is
 * never a dead letter; but a limit of the event's subject alone (max_msgs_per_subject) may never
 * clear: refused STORE_REFUSALS_MAX times in a row over at least 10 s while the stream showed
 * room below its global limits every time, the event becomes a dead letter
 * (store_refused_for_good). 10047, 10028,
 * 10002 and 10023 are JetStream's account or servers out of storage or memory: transient,
 * reason no_resources. A refusal's text belongs to one attempt of one event, so a dead letter
 * put in an event's place is never read with its event's refusal.
 *
 * An event whose subject no stream captures gets "no responders", or no answer at all once a
 * stream's subjects were narrowed under a running relay, for ever. After NO_STREAM_GRACE_US of
 * that the publisher asks the server which stream captures the subject; if none does, the
 * event becomes a dead letter (reason no_stream) instead of a stall.
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
enum {
    JS_WRONG_LAST_MSG_ID = 10070,
    JS_WRONG_LAST_SEQUENCE = 10071,
    JS_MESSAGE_TOO_LARGE = 10054,
    /* "{err}" of the stream's store: with discard new, "maximum messages exceeded", "maximum
     * bytes exceeded" (a full stream: passes once it has room) or "maximum messages per subject
     * exceeded" (a limit of the event's subject alone, which may never clear): see
     * store_refused_for_good() */
    JS_STREAM_STORE_FAILED = 10077,
    /* JetStream's account or server is out of resources (not the stream's own limits):
     * transient, never poison */
    JS_ACCOUNT_RESOURCES = 10002,  /* resource limits exceeded for account */
    JS_INSUFFICIENT_RESOURCES = 10023,
    JS_MEMORY_EXHAUSTED = 10028,   /* insufficient memory resources available */
    JS_STORAGE_EXHAUSTED = 10047,  /* insufficient storage resources available */
};

/* After this many breaks of the order chain in a row without the head getting stored, the
 * relay stops: something keeps writing to the stream. */
#define CHAIN_BREAKS_MAX 8
/* After this many refusals of the head with 10077 in a row, each while the stream had room
 * below its own limits, over at least STORE_REFUSALS_SPAN_US, the refusal is for the event
 * itself: a dead letter. */
#define STORE_REFUSALS_MAX 5
#define STORE_REFUSALS_SPAN_US INT64_C(10000000)
/* A search for the window's own events in the stream (lost acknowledgements) reads at most the
 * window and this many other messages, within LOST_ACK_SCAN_US. */
#define LOST_ACK_FOREIGN_MAX 64
#define LOST_ACK_SCAN_US INT64_C(10000000)
/* How long the head may get "no responders" before the publisher asks whether any stream
 * captures its subject. */
#define NO_STREAM_GRACE_US INT64_C(10000000)

#define SEQ_BITS 40
#define SEQ_MASK ((UINT64_C(1) << SEQ_BITS) - 1)
/* Room left for a dead letter's headers below max_payload. */
#define DEAD_LETTER_HEADER_ROOM 4096
/* The longest the relay goes without taking in acknowledgements while events are in flight.
 * Every wake-up takes them in anyway; this one is for when nothing else wakes the relay. At
 * 1 ms it was a second wake-up for nearly every transaction of a live outbox (1000 commits a
 * second come about every millisecond), and wake-ups are what a live relay spends its CPU on;
 * 5 ms is still far below anything that waits for acknowledgements (the status interval, the
 * ack timeout), and adds at most that to the commit-to-ack histogram of a quiet outbox. */
#define ACK_POLL_US INT64_C(5000)

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
    bool dead_letter;
    bool chained;        /* carries Nats-Expected-Last-Sequence */
    bool sent;           /* went out at least once (a resend of it is a retry) */
    bool resent;         /* went out more than once */
    uint64_t expected;   /* the Nats-Expected-Last-Sequence it carries */
    uint64_t stream_seq; /* from its PubAck: where the stream stored (or holds) it */
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
    uint64_t stream_last; /* the stream's last sequence as far as outboxd knows */
    uint64_t expect_next; /* the Nats-Expected-Last-Sequence of the next chained send */
    unsigned chain_breaks; /* 10071s at the head in a row without progress */
    char *dead_letter_subject;
    char *table;
    char stream[256];
    /* recovery */
    int64_t retry_min_us, retry_max_us;
    bool paused;
    bool probing;        /* after a pause: only the head went out; the rest follows its ack */
    int64_t resume_at;
    int64_t no_resp_since; /* when the head first got "no responders" (0: it did not) */
    uint64_t no_resp_seq;
    uint64_t err_seq;      /* the event (and attempt) whose refusal err_text describes: a */
    unsigned err_attempt;  /* later attempt (a dead letter in its place) has its own */
    char err_text[160];    /* JetStream's description of that refusal */
    uint64_t refusal_seq;  /* the head refused with 10077 while the stream had room: */
    unsigned refusal_attempt; /* which attempt was counted last, */
    unsigned refusals;     /* and how many times in a row, */
    int64_t refusals_since; /* since when */
    unsigned failures;   /* consecutive pauses without progress, for the backoff */
    bool last_was_duplicate; /* the newest released event was acknowledged as a duplicate */
    unsigned seen_epoch;
    atomic_uint conn_epoch; /* incremented by every disconnect */
    atomic_bool connected;
    bool fatal;
    char fatal_msg[1024];
    OutboxEvent dlq;     /* scratch for dead letters built from a refused message */
    WireBatch batch;     /* sent since the last publisher_flush() (wire.h) */
    bool hold;           /* publisher_hold() */
    int wake_fd;
    atomic_bool closing; /* we are closing the connection ourselves */
    atomic_bool closed;  /* nats.c ran the closed callback: no callback of ours runs after it */
    char urls[512];      /* without credentials, for messages */
};

/* ---- small helpers ------------------------------------------------------------------------- */

static int nats_fail(char *err, size_t errlen, const char *what, natsStatus s)
{
    const char *last = nats_GetLastError(NULL);
    bool extra = last && *last && strcmp(last, natsStatus_GetText(s)) != 0;
    snprintf(err, errlen, "%s: %s%s%s", what, natsStatus_GetText(s), extra ? ": " : "",
             extra ? last : "");
    return -1;
}

/* ---- answers ---------------------------------------------------------------------- */

static unsigned classify_reply(natsMsg *msg, unsigned *code, PubAckInfo *info)
{
    *code = CODE_NONE;
    info->seq = 0;
    info->description[0] = '\0';
    if (natsMsg_IsNoResponders(msg)) {
        *code = CODE_NO_RESPONDERS;
        return ST_FAILED;
    }
    switch (puback_parse(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), info)) {
    case PUBACK_STORED:
        return ST_ACKED;
    case PUBACK_DUPLICATE:
        return ST_DUPLICATE;
    default:
        *code = info->err_code > CODE_BAD_REPLY && info->err_code < 0x4000 ? info->err_code
                                                                           : CODE_BAD_REPLY;
        return ST_FAILED;
    }
}

static void take_reply(Publisher *p, natsMsg *msg)
{
    uint64_t seq;
    unsigned attempt;
    if (puback_reply_subject(natsMsg_GetSubject(msg), &seq, &attempt)) {
        unsigned code;
        PubAckInfo info;
        unsigned st = classify_reply(msg, &code, &info);
        Slot *slot = &p->ring[seq & p->mask];
        uint64_t expect = state_word(seq, attempt, 0, ST_INFLIGHT);
        /* Answers are taken on the relay's thread: the slot's other fields are ours. */
        if (atomic_compare_exchange_strong(&slot->state, &expect,
                                           state_word(seq, attempt, code, st))) {
            slot->stream_seq = info.seq;
            /* The oldest refusal's text: the head's is the one to report. */
            if (st == ST_FAILED && info.description[0] &&
                (p->err_seq < p->head || seq <= p->err_seq)) {
                p->err_seq = seq;
                p->err_attempt = attempt;
                snprintf(p->err_text, sizeof(p->err_text), "%s", info.description);
            }
        }
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
    return backoff_jitter_us(p->retry_min_us, p->retry_max_us, (unsigned)(attempts > 0 ? attempts - 1 : 0)) /
           1000;
}

/* ---- set-up -------------------------------------------------------------------------------- */

int publisher_new(Publisher **out, const PublisherOptions *opts, char *err, size_t errlen)
{
    Publisher *p = xcalloc(1, sizeof(*p));
    p->wake_fd = -1;
    wire_batch_init(&p->batch);
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
    /* A silent connection (a NAT entry or load balancer that dropped it, a partition) gets no
     * FIN: only unanswered pings reveal it. It is then replaced like a lost one. */
    if (s == NATS_OK)
        s = natsOptions_SetPingInterval(no, jsapi_ping_interval());
    if (s == NATS_OK)
        s = natsOptions_SetMaxPingsOut(no, NATS_MAX_PINGS_OUT);
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
    char check[96];
    snprintf(check, sizeof(check), "%s.batch", p->inbox);
    if (!wire_batch_check(&p->batch, p->nc, check))
        log_info("this libnats does not take outboxd's batches of messages; publishing each "
                 "through nats.c's flusher thread instead (about a millisecond later)");
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
    wire_batch_deinit(&p->batch);
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
    p->stream_last = p->expect_next = info->last_seq;
    /* Coverage: the stream must capture every subject a template can produce, not merely
     * overlap them (a stream on "outbox.order.*" overlaps "outbox.*.*"), or the first event
     * of another kind would find no stream. */
    for (const char *f = filter; *f;) {
        size_t n = strcspn(f, " ");
        char one[1024];
        snprintf(one, sizeof(one), "%.*s", (int)n, f);
        f += n + (f[n] == ' ');
        if (!jsapi_stream_covers(info, one)) {
            snprintf(err, errlen,
                     "stream \"%s\" (subjects %s) captures only some of the subjects %s can be: "
                     "add a subject that covers all of them (such as \"%.*s>\"), or events of "
                     "the other kinds would find no stream",
                     info->name, info->subjects, one, (int)strcspn(one, "*>"), one);
            return PUBLISH_CHECK_FAILED;
        }
    }

    /* With strict order dead letters are chained into the events' stream: they stand in their
     * event's place. */
    if (p->dead_letter_subject && p->strict && !jsapi_stream_covers(info, p->dead_letter_subject)) {
        snprintf(err, errlen,
                 "stream \"%s\" (subjects %s) does not capture the dead-letter subject %s: with "
                 "--strict-order dead letters take their event's place in the same stream; add "
                 "the subject to it, or set --dead-letter-subject",
                 info->name, info->subjects, p->dead_letter_subject);
        return PUBLISH_CHECK_FAILED;
    }
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
    return !p->fatal && !p->probing && n < p->max_inflight &&
           (p->bytes < p->max_bytes || n == 0);
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

/* A sequence as text, for Nats-Expected-Last-Sequence. */
static void seq_text(uint64_t v, char out[static 24])
{
    char *d = out + 23;
    *d = '\0';
    do
        *--d = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    memmove(out, d, (size_t)(out + 24 - d));
}

/* Encodes ev into the slot, in a buffer from the pool when the slot has none; a chained event
 * expects the given sequence (send_slot corrects it when the window was renumbered). */
static void encode_slot(Publisher *p, Slot *slot, const OutboxEvent *ev, bool chained,
                        uint64_t expect)
{
    if (wire_capacity(&slot->wire) == 0 && p->npool > 0) {
        Buf b = p->pool[--p->npool];
        p->pool_bytes -= b.cap;
        wire_give_buffer(&slot->wire, b);
    }
    char expected[24];
    seq_text(expect, expected);
    wire_encode(&slot->wire, ev, chained ? expected : NULL);
    slot->chained = chained;
    slot->expected = expect;
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
static void send_slot(Publisher *p, Slot *slot, unsigned attempt, bool in_order)
{
    slot->attempt = attempt;
    atomic_store(&slot->state, state_word(slot->seq, attempt, 0, ST_INFLIGHT));
    slot->sent_at = now_mono_us();
    if (p->paused)
        return;
    if (slot->chained && in_order) {
        if (slot->expected != p->expect_next) {
            char expected[24];
            seq_text(p->expect_next, expected);
            wire_set_expected(&slot->wire, expected);
            slot->expected = p->expect_next;
        }
        p->expect_next++;
    }
    slot->resent = slot->sent;
    slot->sent = true;
    char reply[96];
    reply_subject(p, slot->seq, attempt, reply, sizeof(reply));
    natsStatus s = wire_batch_add(&p->batch, p->nc, &slot->wire, reply);
    if (s != NATS_OK)
        log_debug("publish of seq %" PRIu64 " failed at once: %s", slot->seq,
                  natsStatus_GetText(s));
}

int publisher_publish(Publisher *p, const OutboxEvent *ev, bool dead_letter, uint64_t *seq_out,
                      char *err, size_t errlen)
{
    uint64_t seq = p->next;
    Slot *slot = &p->ring[seq & p->mask];
    bool chained = p->strict;
    encode_slot(p, slot, ev, chained, p->expect_next);
    /* A chained event may later expect a longer sequence (a resend renumbers). */
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
    slot->seq = seq;
    slot->sent = slot->resent = false;
    slot->dead_letter = dead_letter;
    slot->commit_time = ev->commit_time;
    slot->bytes = size;
    p->next++;
    p->bytes += (int64_t)size;
    send_slot(p, slot, 0, true);
    *seq_out = seq;
    return 0;
}

/* ---- failures and recovery ------------------------------------------------------------------ */

static PublishError error_kind(unsigned code)
{
    switch (code) {
    case CODE_NO_RESPONDERS:
        return PUBERR_NO_RESPONDERS;
    case JS_STREAM_STORE_FAILED:
        return PUBERR_STREAM_FULL;
    case JS_ACCOUNT_RESOURCES:
    case JS_INSUFFICIENT_RESOURCES:
    case JS_MEMORY_EXHAUSTED:
    case JS_STORAGE_EXHAUSTED:
        return PUBERR_NO_RESOURCES;
    case JS_WRONG_LAST_SEQUENCE:
    case JS_WRONG_LAST_MSG_ID:
        return PUBERR_ORDER;
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
    case JS_WRONG_LAST_SEQUENCE:
        snprintf(out, outlen, "the stream's last message is not the previous event (err_code "
                              "10071)");
        break;
    case JS_STREAM_STORE_FAILED:
        snprintf(out, outlen, "the stream is full, or the event's subject at its limit "
                              "(err_code %u): raise its limits (max_msgs, max_bytes, "
                              "max_msgs_per_subject), or let consumers catch up on a work-queue "
                              "stream",
                 code);
        break;
    case JS_ACCOUNT_RESOURCES:
    case JS_INSUFFICIENT_RESOURCES:
    case JS_MEMORY_EXHAUSTED:
    case JS_STORAGE_EXHAUSTED:
        snprintf(out, outlen, "JetStream has no storage or memory left for the stream's account "
                              "or on its servers (err_code %u): free storage, or raise the "
                              "account's or the server's JetStream limits (max_file_store, "
                              "max_memory_store)",
                 code);
        break;
    default:
        snprintf(out, outlen, "JetStream refused the event (err_code %u)", code);
        break;
    }
}

/* Whether err_text is the refusal of this very attempt of the slot: a dead letter put in its
 * event's place (a later attempt) must not be read with its event's refusal. */
static bool has_err_text(const Publisher *p, const Slot *slot)
{
    return p->err_text[0] && p->err_seq == slot->seq && p->err_attempt == (slot->attempt & 0xff);
}

/* describe_code() with JetStream's own text when the head's refusal carried one. */
static void describe_refusal(const Publisher *p, const Slot *slot, unsigned code, char *out,
                             size_t outlen)
{
    char why[300];
    describe_code(code, why, sizeof(why));
    if (has_err_text(p, slot))
        snprintf(out, outlen, "%.299s: \"%.159s\"", why, p->err_text);
    else
        snprintf(out, outlen, "%s", why);
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
    int64_t delay = backoff_jitter_us(p->retry_min_us, p->retry_max_us, p->failures);
    p->failures++;
    p->paused = true;
    p->probing = false;
    p->resume_at = now + delay;
    log_warn("publishing paused: %s; events wait in the window (%" PRIu64 " now) and are sent "
             "again in order in %" PRId64 " ms%s",
             why, p->next - p->head, delay / 1000,
             atomic_load(&p->connected) ? "" : " once NATS is reachable");
}

/* The event at the head can never be stored as it is: replace it by a dead letter (reason
 * no_stream for a subject no stream captures), or stop. */
static void refuse_head(Publisher *p, Slot *slot, unsigned code)
{
    char event[256], why[512];
    EventName name;
    describe_event(&slot->wire, &name, event, sizeof(event));
    if (code == CODE_NO_RESPONDERS)
        snprintf(why, sizeof(why), "no stream captures subject %.200s",
                 wire_subject(&slot->wire));
    else
        describe_refusal(p, slot, code, why, sizeof(why));
    if (!p->dead_letter_subject || slot->dead_letter) {
        p->fatal = true;
        snprintf(p->fatal_msg, sizeof(p->fatal_msg), "%s: %s", event, why);
        return;
    }
    uint64_t lsn = 0;
    if (name.has_lsn)
        lsn_parse(name.lsn, &lsn);
    char position[OUTBOX_POSITION_MAX];
    bool has_position = wire_header(&slot->wire, OUTBOX_HDR_POSITION, position, sizeof(position));
    char source[ANCHOR_SOURCE_MAX];
    bool has_source = wire_header(&slot->wire, OUTBOX_HDR_SOURCE, source, sizeof(source));
    DeadLetterReason reason = code == JS_MESSAGE_TOO_LARGE ? DLR_TOO_LARGE
                              : code == CODE_NO_RESPONDERS ? DLR_NO_STREAM
                                                           : DLR_REJECTED;
    DeadLetter dl = {
        .reason = metrics_dead_letter_name(reason),
        .position = has_position ? position : NULL,
        .source = has_source ? source : NULL,
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
    metrics_dead_letter(reason);
    log_warn("dead-lettered %s to %s: %s", event, p->dead_letter_subject, why);
    /* In the event's place: the events behind it keep their numbers. The event's refusal
     * stays with it: the dead letter is a new attempt with answers of its own. */
    encode_slot(p, slot, &p->dlq, p->strict, slot->expected);
    slot->dead_letter = true;
    p->err_text[0] = '\0';
    send_slot(p, slot, slot->attempt + 1, false);
}

/* The head has had no answer (a timeout) or "no responders" since no_resp_since: once that
 * lasted NO_STREAM_GRACE_US, asks the server whether any stream captures its subject. True
 * when none does: no retry can ever store it. While one does (a leader election, a cluster
 * without quorum), it asks again after another grace period. */
static bool subject_without_stream(Publisher *p, Slot *slot, int64_t now)
{
    if (slot->dead_letter)
        return false;
    if (p->no_resp_seq != slot->seq || p->no_resp_since == 0) {
        p->no_resp_seq = slot->seq;
        p->no_resp_since = now;
        return false;
    }
    if (now - p->no_resp_since < NO_STREAM_GRACE_US || !atomic_load(&p->connected))
        return false;
    p->no_resp_since = now;
    char name[256], err[256];
    bool found = true;
    return jsapi_find_stream(p->nc, wire_subject(&slot->wire), name, sizeof(name), &found, err,
                             sizeof(err)) == 0 &&
           !found;
}

/*
 * The head was refused with 10077: the stream's own limits (discard new). A full stream
 * (max_msgs, max_bytes) passes once consumers or age make room, and must never lose an event
 * to the dead-letter subject; a limit of the event's subject alone (max_msgs_per_subject) may
 * never clear, and would stall every event behind it for ever. The rule: the refusal is for
 * good when the head was refused STORE_REFUSALS_MAX times in a row (one count per attempt,
 * each after a backoff), over at least STORE_REFUSALS_SPAN_US, and every time the stream's
 * state showed room below its global limits for it. A refusal while the stream is at them (or
 * when its state cannot be read) starts the count afresh: a stream that consumers keep just
 * below its limits cannot pass for one that has room by a few lucky reads.
 */
static bool store_refused_for_good(Publisher *p, Slot *slot, int64_t now)
{
    if (slot->dead_letter)
        return false; /* its dead letter refused as well: the usual stall and its message */
    if (p->refusal_seq != slot->seq) {
        p->refusal_seq = slot->seq;
        p->refusals = 0;
    } else if (p->refusal_attempt == slot->attempt) {
        return false; /* this attempt was counted */
    }
    p->refusal_attempt = slot->attempt;
    StreamInfo info;
    char err[256];
    if (jsapi_stream_info(p->nc, p->stream, &info, err, sizeof(err)) < 0 ||
        jsapi_stream_at_limits(&info, slot->bytes)) {
        p->refusals = 0;
        return false;
    }
    if (p->refusals++ == 0)
        p->refusals_since = now;
    if (p->refusals < STORE_REFUSALS_MAX || now - p->refusals_since < STORE_REFUSALS_SPAN_US)
        return false;
    char event[256];
    EventName name;
    describe_event(&slot->wire, &name, event, sizeof(event));
    log_warn("stream %s refused %s %u times in a row while it had room below its own limits "
             "(%" PRIu64 " messages, %" PRIu64 " bytes): a limit of the event's subject "
             "(max_msgs_per_subject) that may never clear, not a full stream",
             p->stream, event, p->refusals, info.messages, info.bytes);
    return true;
}

/* Reads N from JetStream's "wrong last sequence: N". */
static bool wrong_sequence_of(const Publisher *p, const Slot *slot, uint64_t *last)
{
    const char *n = has_err_text(p, slot) ? strstr(p->err_text, "sequence: ") : NULL;
    if (!n)
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(n + strlen("sequence: "), &end, 10);
    if (errno || end == n + strlen("sequence: "))
        return false;
    *last = v;
    return true;
}

/* With strict order: asks the stream for its last sequence (when its refusal did not say). */
static bool stream_last_seq(Publisher *p, uint64_t *last)
{
    StreamInfo info;
    char err[256];
    if (jsapi_stream_info(p->nc, p->stream, &info, err, sizeof(err)) < 0) {
        log_warn("could not read stream %s to continue the order chain: %s", p->stream, err);
        return false;
    }
    *last = info.last_seq;
    return true;
}

/* Whether the message the stream holds with Nats-Msg-Id id is the slot's: the event, or the
 * dead letter that took its place (its own Nats-Msg-Id is in the slot then). */
static bool slot_is(const Slot *slot, const char *id)
{
    char mine[OUTBOX_MAX_EVENT_ID + 16];
    return wire_header(&slot->wire, OUTBOX_HDR_MSG_ID, mine, sizeof(mine)) &&
           strcmp(mine, id) == 0;
}

/*
 * Lost acknowledgements. The head was refused with 10071 while everything before it is stored,
 * and the stream's last sequence (last) is past the one outboxd knows: what lies in between may
 * be the window's own events, stored while their acknowledgements were lost (a one-way
 * partition, a connection that went silent and was replaced). Reads those messages and takes
 * each that carries the Nats-Msg-Id of the window's next event (head, head+1, ..., in order) as
 * that event's acknowledgement at its sequence. With the chain the window's events can only
 * be stored one right behind the other, so once one matched, the first message that does not
 * ends the run; before the first match other messages are skipped (another writer, a replayed
 * copy). Reads at most the window plus LOST_ACK_FOREIGN_MAX messages. Returns how many events
 * were recognised (their slots are acknowledged now), or -1 when the stream could not be read
 * (err): then nothing may be resent past those messages, since they may be the window's.
 */
static int64_t recognise_stored(Publisher *p, uint64_t last, uint64_t *first_seq, char *err,
                                size_t errlen)
{
    uint64_t limit = p->stream_last + (p->next - p->head) + LOST_ACK_FOREIGN_MAX;
    if (limit > last)
        limit = last;
    JsStoredMsg m = {0};
    buf_init(&m.hdrs);
    int64_t found = 0;
    uint64_t want = p->head;
    int64_t deadline = now_mono_us() + LOST_ACK_SCAN_US;
    for (uint64_t at = p->stream_last + 1; at <= limit && want < p->next; at++) {
        if (now_mono_us() > deadline) {
            snprintf(err, errlen, "reading messages %" PRIu64 " to %" PRIu64 " took longer than "
                     "%" PRId64 " s", p->stream_last + 1, limit, LOST_ACK_SCAN_US / 1000000);
            found = -1;
            break;
        }
        int rc = jsapi_msg_get(p->nc, p->stream, at, NULL, 2000, &m, err, errlen);
        if (rc < 0) {
            found = -1;
            break;
        }
        char id[OUTBOX_MAX_EVENT_ID + 16];
        Slot *slot = &p->ring[want & p->mask];
        if (rc == 0 && jsapi_header_value(m.hdrs.data, OUTBOX_HDR_MSG_ID, id, sizeof(id)) &&
            slot->sent && slot_is(slot, id)) {
            if (found == 0)
                *first_seq = at;
            /* Stored at this sequence: acknowledged, as if its PubAck had arrived. */
            slot->stream_seq = at;
            atomic_store(&slot->state, state_word(slot->seq, slot->attempt, 0, ST_ACKED));
            want++;
            found++;
        } else if (found > 0) {
            break; /* the window's run ended */
        }
    }
    buf_deinit(&m.hdrs);
    return found;
}

/* The head was refused with 10071 while everything before it is released: the stream's last
 * sequence is not the one outboxd knew. Takes the window's own events stored meanwhile as
 * acknowledged (recognise_stored); otherwise continues the chain from the stream's, or stops
 * when it keeps breaking without progress. */
static void continue_chain(Publisher *p, Slot *slot, int64_t now)
{
    uint64_t last;
    if (!wrong_sequence_of(p, slot, &last) && !stream_last_seq(p, &last)) {
        pause_publishing(p, now, PUBERR_ORDER, "the order chain broke and the stream's last "
                                               "sequence could not be read");
        return;
    }
    if (last > p->stream_last) {
        char err[256];
        uint64_t first = 0;
        int64_t found = recognise_stored(p, last, &first, err, sizeof(err));
        if (found < 0) {
            char why[640];
            snprintf(why, sizeof(why), "the order chain broke and stream %.200s could not be "
                     "read to tell outboxd's own events from others: %.255s", p->stream, err);
            pause_publishing(p, now, PUBERR_ORDER, why);
            return;
        }
        if (found > 0) {
            atomic_fetch_add_explicit(&metrics.acks_lost, (uint64_t)found, memory_order_relaxed);
            log_warn("stream %s already holds %" PRId64 " events of the window at sequences %"
                     PRIu64 " to %" PRIu64 " whose acknowledgements were lost; they count as "
                     "stored and are not sent again",
                     p->stream, found, first, first + (uint64_t)found - 1);
            /* The broker answers: the rest of the window goes out at once, behind them. */
            p->failures = 0;
            p->paused = true;
            p->probing = false;
            p->resume_at = now;
            return;
        }
    }
    if (++p->chain_breaks > CHAIN_BREAKS_MAX) {
        p->fatal = true;
        snprintf(p->fatal_msg, sizeof(p->fatal_msg),
                 "the order chain of stream %s broke %u times in a row without progress (its "
                 "last sequence moves under outboxd: another writer?); with --strict-order "
                 "outboxd must be the stream's only writer: stop the other writer, or run with "
                 "--strict-order=false",
                 p->stream, CHAIN_BREAKS_MAX);
        return;
    }
    bool after_duplicates = p->last_was_duplicate || last == p->stream_last;
    if (!after_duplicates)
        log_warn("stream %s holds messages outboxd did not write (its last sequence is %" PRIu64
                 ", outboxd's last event is at %" PRIu64 "); the order chain continues from "
                 "there",
                 p->stream, last, p->stream_last);
    else
        log_debug("continuing the order chain of stream %s from sequence %" PRIu64, p->stream,
                  last);
    p->stream_last = last;
    if (p->chain_breaks == 1 || after_duplicates) {
        /* The first time, or a known cause: resend at once. */
        p->paused = true;
        p->probing = false;
        p->resume_at = now;
    } else {
        char why[320];
        snprintf(why, sizeof(why), "the order chain of stream %s broke again", p->stream);
        pause_publishing(p, now, PUBERR_ORDER, why);
    }
}

/* Sends the unacknowledged events again, oldest first: only the head when probing. The chain
 * is renumbered from the stream's last sequence as outboxd knows it; events stored out of an
 * earlier attempt keep their place in it. */
static void resend_window(Publisher *p, bool probe)
{
    uint64_t count = 0, retries = 0;
    p->expect_next = p->stream_last;
    for (uint64_t seq = p->head; seq < p->next; seq++) {
        Slot *slot = &p->ring[seq & p->mask];
        unsigned st = word_state(atomic_load(&slot->state));
        if (st == ST_ACKED || st == ST_DUPLICATE) {
            if (st == ST_ACKED && slot->stream_seq > p->expect_next)
                p->expect_next = slot->stream_seq;
            continue;
        }
        retries += slot->sent;
        send_slot(p, slot, slot->attempt + 1, true);
        count++;
        if (probe)
            break;
    }
    p->probing = probe && count > 0;
    atomic_fetch_add_explicit(&metrics.publish_retries, retries, memory_order_relaxed);
    if (probe)
        log_debug("publishing resumed: probing with the oldest event");
    else
        log_info("publishing resumed: sent %" PRIu64 " events (%" PRIu64 " of them again)", count,
                 retries);
}

static void release(Publisher *p, Slot *slot, unsigned state, int64_t now_unix)
{
    p->last_was_duplicate = state == ST_DUPLICATE;
    /* A stored event is the stream's last; a duplicate's sequence is only a lower bound. */
    if (state == ST_ACKED || slot->stream_seq > p->stream_last)
        p->stream_last = slot->stream_seq;
    if (state == ST_DUPLICATE && p->strict && !slot->resent && !slot->dead_letter) {
        /* Sent once, answered as a duplicate: with the exact resume of --strict-order nothing
         * is sent twice, so the stream holds another message with this Nats-Msg-Id. */
        char event[256];
        EventName name;
        describe_event(&slot->wire, &name, event, sizeof(event));
        atomic_fetch_add_explicit(&metrics.events_id_reused, 1, memory_order_relaxed);
        log_warn("%s was not stored: JetStream holds, or remembers within its duplicate window, "
                 "a message with the same Nats-Msg-Id (stream sequence %" PRIu64 "): a row "
                 "re-used an event_id, or that message was deleted from the stream",
                 event, slot->stream_seq);
    }
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

void publisher_hold(Publisher *p, bool hold)
{
    p->hold = hold;
    if (!hold)
        publisher_flush(p);
}

void publisher_flush(Publisher *p)
{
    if (p->hold)
        return;
    natsStatus s = wire_batch_flush(&p->batch, p->nc);
    if (s != NATS_OK)
        log_debug("could not write published events: %s (sent again after the reconnect)",
                  natsStatus_GetText(s));
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
            p->chain_breaks = 0;
            p->no_resp_since = 0;
            if (p->probing) { /* the probe got through: the rest of the window follows */
                p->probing = false;
                resend_window(p, false);
            }
            continue;
        }
        if (state == ST_INFLIGHT) {
            if (!p->paused && now - slot->sent_at > p->ack_timeout_us) {
                if (subject_without_stream(p, slot, now)) {
                    refuse_head(p, slot, CODE_NO_RESPONDERS);
                    break;
                }
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
        if (p->paused)
            break;
        if (code == JS_WRONG_LAST_SEQUENCE && slot->chained) {
            /* Everything before the head is stored: no gap of outboxd's. */
            continue_chain(p, slot, now);
            break;
        }
        if (code == CODE_NO_RESPONDERS && subject_without_stream(p, slot, now)) {
            refuse_head(p, slot, code);
            break;
        }
        if (code == JS_STREAM_STORE_FAILED && store_refused_for_good(p, slot, now)) {
            refuse_head(p, slot, code);
            break;
        }
        char event[256], why[512], line[800];
        EventName name;
        describe_event(&slot->wire, &name, event, sizeof(event));
        describe_refusal(p, slot, code, why, sizeof(why));
        snprintf(line, sizeof(line), "%s: %s", event, why);
        pause_publishing(p, now, error_kind(code), line);
        break;
    }

    if (p->paused && !p->fatal && now >= p->resume_at && atomic_load(&p->connected)) {
        /* A resend after a chain break goes out whole (the stream answered at once); after a
         * failure, the head first. */
        bool probe = p->failures > 0;
        p->paused = false;
        resend_window(p, probe);
    }
    publisher_flush(p); /* what the caller published since the last poll, and the resends */

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

/* How many messages in a row that are not its events publisher_stream_position() passes over
 * (replayed copies, say) before it gives up. */
#define POSITION_LOOKBACK 256

int publisher_stream_position(Publisher *p, const char *source, JsOwnEvent *last, char *err,
                              size_t errlen)
{
    StreamInfo info;
    if (jsapi_stream_info(p->nc, p->stream, &info, err, errlen) < 0)
        return -1;
    if (p->head == p->next)
        p->stream_last = p->expect_next = info.last_seq;
    if (info.messages == 0)
        return 0;
    return jsapi_last_own_event(p->nc, p->stream, info.last_seq, source, POSITION_LOOKBACK, last,
                                err, errlen);
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
