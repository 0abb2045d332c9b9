/*
 * publisher.c - JetStream publishing with our own ack routing.
 *
 * A JetStream publish is a core NATS publish with a reply subject: the stream's leader answers
 * on it with a PubAck ({"stream":"S","seq":N} or {"error":{...}}), or the server answers "no
 * responders" when no stream takes the subject. outboxd publishes each event with the reply
 * subject "<inbox>.<seq>.<attempt>" and one wildcard subscription receives every answer, so an
 * answer finds its ring slot from its own subject in O(1), with no map and no lock.
 *
 * Threads: the relay's thread publishes and polls; nats.c's subscription thread runs on_reply(),
 * which only compare-and-swaps the slot's state word and, when the relay sleeps, pokes an
 * eventfd. The state word packs (seq, attempt, error code, state), so an answer for an event
 * whose slot was already reused, or for an earlier attempt, fails the swap and is ignored.
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

#include "outboxd/log.h"
#include "outboxd/util.h"

enum { ST_INFLIGHT = 0, ST_ACKED = 1, ST_DUPLICATE = 2, ST_FAILED = 3 };

/* Error codes beside JetStream's own err_code values (10000 and up). */
enum { CODE_NONE = 0, CODE_NO_RESPONDERS = 1, CODE_BAD_REPLY = 2 };

#define SEQ_BITS 40
#define SEQ_MASK ((UINT64_C(1) << SEQ_BITS) - 1)

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
    natsMsg *msg;          /* kept until acknowledged, so it can be sent again */
    uint64_t seq;
    unsigned attempt;
    int64_t sent_at;       /* CLOCK_MONOTONIC µs */
    int64_t commit_time;   /* µs since 2000-01-01 */
    size_t bytes;
} Slot;

struct Publisher {
    natsConnection *nc;
    natsSubscription *sub;
    char inbox[64];
    Slot *ring;
    uint64_t mask;
    uint64_t head; /* oldest unreleased seq */
    uint64_t next; /* next seq to assign */
    int64_t max_inflight;
    int64_t max_bytes;
    int64_t bytes;
    int64_t ack_timeout_us;
    uint64_t acked;
    uint64_t duplicates;
    int wake_fd;
    atomic_bool wake_armed;
    atomic_bool closed;
    atomic_bool closing; /* we are closing the connection ourselves */
    char urls[512]; /* without credentials, for messages */
};

/* ---- the reply thread ---------------------------------------------------------------------- */

/* Cheap checks for the common success reply; anything unusual goes through jansson. */
static unsigned classify_reply(natsMsg *msg, unsigned *code)
{
    *code = CODE_NONE;
    if (natsMsg_IsNoResponders(msg)) {
        *code = CODE_NO_RESPONDERS;
        return ST_FAILED;
    }
    const char *data = natsMsg_GetData(msg);
    int len = natsMsg_GetDataLength(msg);
    if (!data || len <= 0) {
        *code = CODE_BAD_REPLY;
        return ST_FAILED;
    }
    if (!memmem(data, (size_t)len, "\"error\"", 7) && memmem(data, (size_t)len, "\"seq\"", 5))
        return memmem(data, (size_t)len, "\"duplicate\":true", 16) ? ST_DUPLICATE : ST_ACKED;

    json_error_t jerr;
    json_t *root = json_loadb(data, (size_t)len, 0, &jerr);
    json_t *e = root ? json_object_get(root, "error") : NULL;
    json_int_t c = 0;
    if (e) {
        c = json_integer_value(json_object_get(e, "err_code"));
        if (c == 0)
            c = json_integer_value(json_object_get(e, "code"));
        log_debug("publish rejected by JetStream: %s (err_code %lld)",
                  json_string_value(json_object_get(e, "description")) ?: "no description",
                  (long long)c);
    }
    json_decref(root);
    *code = c > CODE_BAD_REPLY && c < 0x4000 ? (unsigned)c : CODE_BAD_REPLY;
    return ST_FAILED;
}

static void on_reply(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
    Publisher *p = closure;
    /* The subject ends in ".<seq>.<attempt>". */
    const char *subj = natsMsg_GetSubject(msg);
    const char *dot2 = strrchr(subj, '.');
    const char *dot1 = dot2 ? memrchr(subj, '.', (size_t)(dot2 - subj)) : NULL;
    if (dot1) {
        char *end;
        uint64_t seq = strtoull(dot1 + 1, &end, 10);
        unsigned attempt = (unsigned)strtoul(dot2 + 1, NULL, 10);
        if (end == dot2) {
            unsigned code;
            unsigned st = classify_reply(msg, &code);
            Slot *slot = &p->ring[seq & p->mask];
            uint64_t expect = state_word(seq, attempt, 0, ST_INFLIGHT);
            atomic_compare_exchange_strong(&slot->state, &expect,
                                           state_word(seq, attempt, code, st));
            if (atomic_exchange(&p->wake_armed, false)) {
                uint64_t one = 1;
                ssize_t ignored = write(p->wake_fd, &one, sizeof(one));
                (void)ignored;
            }
        }
    }
    natsMsg_Destroy(msg);
}

static void on_disconnected(natsConnection *nc, void *closure)
{
    Publisher *p = closure;
    if (!atomic_load(&p->closing))
        log_warn("disconnected from NATS");
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    log_info("reconnected to NATS");
}

static void on_closed(natsConnection *nc, void *closure)
{
    Publisher *p = closure;
    atomic_store(&p->closed, true);
}

/* ---- set-up -------------------------------------------------------------------------------- */

/* Copies urls without any "user:password@" parts, for messages. */
static void redact_urls(const char *urls, char *out, size_t outlen)
{
    Buf b;
    buf_init(&b);
    const char *p = urls;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        const char *at = memchr(p, '@', n);
        const char *scheme = strstr(p, "://");
        if (at && scheme && scheme < at) {
            buf_append(&b, p, (size_t)(scheme + 3 - p));
            buf_puts(&b, "***@");
            buf_append(&b, at + 1, n - (size_t)(at + 1 - p));
        } else {
            buf_append(&b, p, n);
        }
        if (!end)
            break;
        buf_putc(&b, ',');
        p = end + 1;
    }
    snprintf(out, outlen, "%s", b.data ? b.data : "");
    buf_deinit(&b);
}

static int nats_fail(char *err, size_t errlen, const char *what, natsStatus s)
{
    const char *last = nats_GetLastError(NULL);
    snprintf(err, errlen, "%s: %s%s%s", what, natsStatus_GetText(s),
             last && *last && strcmp(last, natsStatus_GetText(s)) != 0 ? ": " : "",
             last && *last && strcmp(last, natsStatus_GetText(s)) != 0 ? last : "");
    return -1;
}

/* Sends a JetStream API request; returns the parsed JSON reply or NULL with err set. On no
 * responders sets *no_responders. */
static json_t *js_api(Publisher *p, const char *subject, const char *body, bool *no_responders,
                      char *err, size_t errlen)
{
    natsMsg *reply = NULL;
    *no_responders = false;
    natsStatus s = natsConnection_RequestString(&reply, p->nc, subject, body, 5000);
    if (s == NATS_NO_RESPONDERS) {
        *no_responders = true;
        snprintf(err, errlen, "no responders for %s", subject);
        return NULL;
    }
    if (s != NATS_OK) {
        nats_fail(err, errlen, "JetStream request failed", s);
        return NULL;
    }
    json_error_t jerr;
    json_t *root = json_loadb(natsMsg_GetData(reply), (size_t)natsMsg_GetDataLength(reply), 0,
                              &jerr);
    natsMsg_Destroy(reply);
    if (!root)
        snprintf(err, errlen, "JetStream sent an unreadable reply to %s: %s", subject, jerr.text);
    return root;
}

int publisher_new(Publisher **out, const PublisherOptions *opts, char *err, size_t errlen)
{
    Publisher *p = xcalloc(1, sizeof(*p));
    p->wake_fd = -1;
    redact_urls(opts->urls, p->urls, sizeof(p->urls));
    int rc = -1;
    natsOptions *no = NULL;
    char **servers = NULL;
    int nservers = 0;

    /* The server list: split on commas, trim spaces. */
    char *copy = xstrdup(opts->urls);
    for (char *tok = strtok(copy, ","); tok; tok = strtok(NULL, ",")) {
        while (*tok == ' ')
            tok++;
        if (!*tok)
            continue;
        servers = xrealloc(servers, sizeof(char *) * (size_t)(nservers + 1));
        servers[nservers++] = tok;
    }
    natsStatus s = natsOptions_Create(&no);
    if (s == NATS_OK)
        s = natsOptions_SetServers(no, (const char **)servers, nservers);
    if (s == NATS_OK)
        s = natsOptions_SetName(no, "outboxd");
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(no, 5000);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(no, -1);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectWait(no, 500);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectJitter(no, 500, 1000);
    if (s == NATS_OK)
        s = natsOptions_SetDisconnectedCB(no, on_disconnected, p);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectedCB(no, on_reconnected, p);
    if (s == NATS_OK)
        s = natsOptions_SetClosedCB(no, on_closed, p);
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

    bool no_responders;
    json_t *info = js_api(p, "$JS.API.INFO", "", &no_responders, err, errlen);
    json_t *jerr = info ? json_object_get(info, "error") : NULL;
    if (no_responders || (jerr && (json_integer_value(json_object_get(jerr, "err_code")) == 10039 ||
                                   json_integer_value(json_object_get(jerr, "err_code")) == 10076))) {
        snprintf(err, errlen,
                 "JetStream is not enabled on the NATS server at %s: start nats-server with -js "
                 "(or a jetstream block in its configuration)",
                 p->urls);
        json_decref(info);
        rc = PUBLISH_CHECK_FAILED;
        goto done;
    }
    json_decref(info);
    if (!info)
        goto done;

    natsInbox *inbox = NULL;
    if ((s = natsInbox_Create(&inbox)) != NATS_OK) {
        nats_fail(err, errlen, "could not create an inbox", s);
        goto done;
    }
    snprintf(p->inbox, sizeof(p->inbox), "%s", (const char *)inbox);
    natsInbox_Destroy(inbox);

    uint64_t cap = 1;
    while ((int64_t)cap < opts->max_inflight)
        cap <<= 1;
    p->ring = xcalloc(cap, sizeof(Slot));
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
    atomic_init(&p->wake_armed, true);

    char wildcard[80];
    snprintf(wildcard, sizeof(wildcard), "%s.>", p->inbox);
    s = natsConnection_Subscribe(&p->sub, p->nc, wildcard, on_reply, p);
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
    free(servers);
    free(copy);
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
    if (p->sub) {
        natsSubscription_Unsubscribe(p->sub);
        natsSubscription_Destroy(p->sub);
    }
    if (p->nc) {
        atomic_store(&p->closing, true);
        natsConnection_Close(p->nc);
        natsConnection_Destroy(p->nc);
    }
    if (p->ring) {
        for (uint64_t i = 0; i <= p->mask; i++)
            natsMsg_Destroy(p->ring[i].msg);
        free(p->ring);
    }
    if (p->wake_fd >= 0)
        close(p->wake_fd);
    free(p);
}

int publisher_check_stream(Publisher *p, const char *filter, char *stream, size_t streamlen,
                           char *err, size_t errlen)
{
    json_t *req = json_pack("{s:s}", "subject", filter);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    bool no_responders;
    json_t *reply = js_api(p, "$JS.API.STREAM.NAMES", body, &no_responders, err, errlen);
    free(body);
    if (!reply)
        return -1;
    json_t *names = json_object_get(reply, "streams");
    int rc = 0;
    if (!json_is_array(names) || json_array_size(names) == 0) {
        snprintf(err, errlen,
                 "no JetStream stream captures subjects %s: create one whose subjects cover them "
                 "(for the default template, a stream with subjects \"outbox.>\")",
                 filter);
        rc = PUBLISH_CHECK_FAILED;
    } else {
        snprintf(stream, streamlen, "%s", json_string_value(json_array_get(names, 0)) ?: "?");
    }
    json_decref(reply);
    return rc;
}

/* ---- publishing ---------------------------------------------------------------------------- */

uint64_t publisher_next_seq(const Publisher *p)
{
    return p->next;
}

bool publisher_has_room(const Publisher *p)
{
    int64_t n = (int64_t)(p->next - p->head);
    return n < p->max_inflight && (p->bytes < p->max_bytes || n == 0);
}

static size_t event_size(const OutboxEvent *ev)
{
    /* What goes over the wire: NATS/1.0 line, "Key: value\r\n" per header, blank line, body. */
    size_t n = 12 + ev->body_len;
    for (size_t i = 0; i < ev->nheaders; i++)
        n += strlen(ev->headers[i].name) + 4 + strlen(ev->hvals.data + ev->headers[i].off);
    return n;
}

static natsStatus send_slot(Publisher *p, Slot *slot)
{
    natsStatus s = natsConnection_PublishMsg(p->nc, slot->msg);
    slot->sent_at = now_mono_us();
    return s;
}

int publisher_publish(Publisher *p, const OutboxEvent *ev, uint64_t *seq_out, char *err,
                      size_t errlen)
{
    size_t size = event_size(ev);
    int64_t max_payload = natsConnection_GetMaxPayload(p->nc);
    if (max_payload > 0 && (int64_t)size > max_payload) {
        snprintf(err, errlen,
                 "event is %zu bytes with its headers, more than the NATS server's max_payload "
                 "of %" PRId64 " bytes",
                 size, max_payload);
        return PUBLISH_UNPUBLISHABLE;
    }
    uint64_t seq = p->next;
    char reply[96];
    snprintf(reply, sizeof(reply), "%s.%" PRIu64 ".0", p->inbox, seq);
    natsMsg *msg = NULL;
    natsStatus s = natsMsg_Create(&msg, ev->subject.data, reply, ev->body, (int)ev->body_len);
    for (size_t i = 0; s == NATS_OK && i < ev->nheaders; i++)
        s = natsMsgHeader_Set(msg, ev->headers[i].name, ev->hvals.data + ev->headers[i].off);
    if (s != NATS_OK) {
        natsMsg_Destroy(msg);
        return nats_fail(err, errlen, "could not build a message", s);
    }

    Slot *slot = &p->ring[seq & p->mask];
    natsMsg_Destroy(slot->msg);
    slot->msg = msg;
    slot->seq = seq;
    slot->attempt = 0;
    slot->commit_time = ev->commit_time;
    slot->bytes = size;
    atomic_store(&slot->state, state_word(seq, 0, 0, ST_INFLIGHT));
    p->next++;
    p->bytes += (int64_t)size;

    s = send_slot(p, slot);
    if (s != NATS_OK) {
        /* The event stays in the window as in flight: it fails by timeout, never silently. */
        return nats_fail(err, errlen, "could not publish", s);
    }
    *seq_out = seq;
    return 0;
}

static void describe_failure(unsigned code, char *out, size_t outlen)
{
    switch (code) {
    case CODE_NO_RESPONDERS:
        snprintf(out, outlen, "no responders: no stream took the subject, or JetStream is "
                              "recovering");
        break;
    case CODE_BAD_REPLY:
        snprintf(out, outlen, "JetStream sent an unexpected reply");
        break;
    default:
        snprintf(out, outlen, "JetStream rejected the event (err_code %u)", code);
        break;
    }
}

/* Names the event in a failure message: its id, subject and commit LSN. */
static void fail_event(const Slot *slot, PublisherStatus *st, const char *why)
{
    const char *id = NULL, *lsn = NULL;
    natsMsgHeader_Get(slot->msg, OUTBOX_HDR_MSG_ID, &id);
    natsMsgHeader_Get(slot->msg, OUTBOX_HDR_COMMIT_LSN, &lsn);
    st->failed = true;
    st->failed_seq = slot->seq;
    snprintf(st->failure, sizeof(st->failure), "event %s (subject %s, commit LSN %s): %s",
             id ? id : "?", natsMsg_GetSubject(slot->msg), lsn ? lsn : "?", why);
}

void publisher_poll(Publisher *p, int64_t now, PublisherStatus *st)
{
    st->failed = false;
    while (p->head < p->next) {
        Slot *slot = &p->ring[p->head & p->mask];
        uint64_t w = atomic_load(&slot->state);
        unsigned state = word_state(w);
        if (state == ST_INFLIGHT) {
            char why[128];
            if (now - slot->sent_at > p->ack_timeout_us) {
                snprintf(why, sizeof(why), "no acknowledgement from JetStream within %" PRId64 " ms",
                         p->ack_timeout_us / 1000);
                fail_event(slot, st, why);
            } else if (atomic_load(&p->closed)) {
                fail_event(slot, st, "the NATS connection is closed");
            }
            break;
        }
        if (state == ST_FAILED) {
            char why[128];
            describe_failure(word_code(w), why, sizeof(why));
            fail_event(slot, st, why);
            break;
        }
        p->acked++;
        if (state == ST_DUPLICATE)
            p->duplicates++;
        p->bytes -= (int64_t)slot->bytes;
        natsMsg_Destroy(slot->msg);
        slot->msg = NULL;
        p->head++;
    }
    st->next_seq = p->next;
    st->first_unacked = p->head;
    st->inflight = (size_t)(p->next - p->head);
    st->acked = p->acked;
    st->duplicates = p->duplicates;
    st->oldest_commit_time = p->head < p->next ? p->ring[p->head & p->mask].commit_time : 0;
}

int64_t publisher_next_deadline(const Publisher *p)
{
    if (p->head == p->next)
        return INT64_MAX;
    return p->ring[p->head & p->mask].sent_at + p->ack_timeout_us;
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
    atomic_store(&p->wake_armed, true);
}
