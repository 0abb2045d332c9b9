/*
 * wire.c - events encoded once as NATS carries them, and handed to nats.c without a header map.
 *
 * nats.c 3.x keeps an outgoing message's headers in a hash map (a few allocations per header)
 * and encodes the map on every publish. A message it received instead keeps its header block
 * as bytes and encodes it by copying them, until someone reads a header. Its natsMsg_create(),
 * exported by libnats but not declared in nats.h, makes such a message from a header block
 * outboxd encoded itself: one allocation per send, and no encoding. Because the function is
 * not part of the documented API, outboxd checks once that a message made this way reads back
 * as written (wire_raw_supported()), and otherwise publishes through the documented header API,
 * which works everywhere, only slower. meson defines OUTBOXD_NATS_RAW when libnats exports the
 * two functions at all.
 *
 * Batches. nats.c writes what is published from its flusher thread: the first publish after a
 * write signals the thread, which then waits a millisecond for more before it writes. On a
 * live outbox that is a millisecond on every event's way and two thread wake-ups per relay
 * wake-up; its only alternative (natsOptions_SetSendAsap) writes every message with a system
 * call of its own, which cost more than it saved. A WireBatch instead gathers the HPUB frames
 * of what one wake-up of the relay publishes and hands them to the connection in one go:
 * under the connection's lock (nats.c's mutexes are recursive), while it is connected, it
 * appends them to the connection's write buffer and writes that buffer out
 * (natsConn_bufferWrite/natsConn_bufferFlush, what nats.c's own publish and flusher call). The
 * flusher is never signalled for them. These four functions are exported by libnats but not
 * declared, like natsMsg_create: meson defines OUTBOXD_NATS_BATCH when they exist, and
 * wire_batch_check() sends one message this way to itself at start and uses the direct path
 * only when it comes back as written. Not connected, a batch is dropped: the publisher sends
 * everything unacknowledged again after a reconnect anyway. nats.c's write deadline
 * (NATS_DEFAULT_LIB_WRITE_DEADLINE, natsOptions_SetWriteDeadline) is not re-armed on this path,
 * so it is not used with a deadline.
 */
#include "outboxd/wire.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/log.h"

#define HDR_LINE "NATS/1.0\r\n"
#define HDR_LINE_LEN (sizeof(HDR_LINE) - 1)
/* Buffers grow to what an event needs, rounded up to this, so that the next event of about the
 * same size fits (buf_reserve's doubling would waste up to half of a large buffer). */
#define WIRE_ROUND 1024

#ifdef OUTBOXD_NATS_RAW
/* libnats's own: a message from subject, reply and buf = header block (hdrLen bytes) + data. */
natsStatus natsMsg_create(natsMsg **newMsg, const char *subject, int subjLen, const char *reply,
                          int replyLen, const char *buf, int bufLen, int hdrLen);
/* Frees a message at once, where natsMsg_Destroy() hands it to nats.c's collector thread. */
void natsMsg_free(void *object);
#endif
#ifdef OUTBOXD_NATS_BATCH
/* libnats's own: the connection's lock (recursive) with a reference, and its write buffer. */
void natsConn_lockAndRetain(natsConnection *nc);
void natsConn_unlockAndRelease(natsConnection *nc);
natsStatus natsConn_bufferWrite(natsConnection *nc, const char *buffer, int len);
natsStatus natsConn_bufferFlush(natsConnection *nc);
#endif
/* A batch writes itself out once it holds this much. */
#define WIRE_BATCH_MAX (64 * 1024)

void wire_init(WireMsg *w)
{
    memset(w, 0, sizeof(*w));
    buf_init(&w->buf);
}

void wire_deinit(WireMsg *w)
{
    buf_deinit(&w->buf);
    wire_init(w);
}

Buf wire_take_buffer(WireMsg *w)
{
    Buf b = w->buf;
    b.len = 0;
    wire_init(w);
    return b;
}

void wire_give_buffer(WireMsg *w, Buf b)
{
    buf_deinit(&w->buf);
    w->buf = b;
    w->buf.len = 0;
}

static char *put(char *p, const char *s, size_t n)
{
    memcpy(p, s, n);
    return p + n;
}

static size_t expected_line_len(const char *expected)
{
    return expected && *expected ? sizeof(OUTBOX_HDR_EXPECTED_LAST) - 1 + 2 + strlen(expected) + 2
                                 : 0;
}

/* Writes the Nats-Expected-Last-Sequence line; with clean, control bytes become spaces. */
static char *put_expected(char *p, const char *expected, bool clean)
{
    if (!expected || !*expected)
        return p;
    p = put(p, OUTBOX_HDR_EXPECTED_LAST ": ", sizeof(OUTBOX_HDR_EXPECTED_LAST) - 1 + 2);
    if (!clean)
        return put(put(p, expected, strlen(expected)), "\r\n", 2);
    for (; *expected; expected++)
        *p++ = (unsigned char)*expected < 0x20 || *expected == 0x7f ? ' ' : *expected;
    return put(p, "\r\n", 2);
}

void wire_encode(WireMsg *w, const OutboxEvent *ev, const char *expected)
{
    /* hvals.len covers every value (and a NUL each); names and separators come on top. */
    size_t need = ev->subject.len + 1 + HDR_LINE_LEN + ev->hvals.len + expected_line_len(expected) +
                  2 + ev->body_len;
    size_t name_len[OUTBOX_MAX_HEADERS];
    for (size_t i = 0; i < ev->nheaders; i++) {
        name_len[i] = strlen(ev->headers[i].name);
        need += name_len[i] + 4;
    }
    Buf *b = &w->buf;
    b->len = 0;
    if (need + 1 > b->cap) {
        b->cap = (need + 1 + WIRE_ROUND - 1) / WIRE_ROUND * WIRE_ROUND;
        free(b->data); /* nothing in it to keep: no realloc copy */
        b->data = xmalloc(b->cap);
    }

    char *start = b->data, *p = start;
    p = put(p, ev->subject.data, ev->subject.len);
    *p++ = '\0';
    w->subject_len = ev->subject.len;
    char *hdr = p;
    p = put(p, HDR_LINE, HDR_LINE_LEN);
    for (size_t i = 0; i < ev->nheaders; i++) {
        p = put(p, ev->headers[i].name, name_len[i]);
        p = put(p, ": ", 2);
        p = put(p, ev->hvals.data + ev->headers[i].off, ev->headers[i].len);
        p = put(p, "\r\n", 2);
    }
    w->expected_off = (size_t)(p - hdr);
    p = put_expected(p, expected, false); /* an event id: checked when it was mapped */
    p = put(p, "\r\n", 2);
    w->hdr_len = (size_t)(p - hdr);
    if (ev->body_len)
        p = put(p, ev->body, ev->body_len);
    w->body_len = ev->body_len;
    b->len = (size_t)(p - start);
    b->data[b->len] = '\0';
}

void wire_set_expected(WireMsg *w, const char *expected)
{
    size_t old_len = w->hdr_len - 2 - w->expected_off;
    size_t new_len = expected_line_len(expected);
    if (new_len > old_len)
        buf_reserve(&w->buf, new_len - old_len);
    char *hdr = w->buf.data + w->subject_len + 1;
    /* Move the closing CRLF and the body, then write the new line in front of them. */
    char *tail = hdr + w->expected_off + old_len;
    memmove(hdr + w->expected_off + new_len, tail, 2 + w->body_len);
    put_expected(hdr + w->expected_off, expected, true);
    w->hdr_len = w->hdr_len - old_len + new_len;
    w->buf.len = w->subject_len + 1 + w->hdr_len + w->body_len;
    w->buf.data[w->buf.len] = '\0';
}

/* One "Name: value" line of the header block. */
typedef struct HeaderLine {
    const char *name, *value;
    size_t name_len, value_len;
} HeaderLine;

/* Steps through the header lines after "NATS/1.0\r\n"; *pos starts at NULL. False after the
 * last one. */
static bool next_header(const WireMsg *w, const char **pos, HeaderLine *h)
{
    const char *p = *pos ? *pos : wire_hdr(w) + HDR_LINE_LEN;
    const char *end = wire_hdr(w) + w->hdr_len - 2;
    while (p < end) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol)
            eol = end;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        const char *line = p;
        p = eol + 2;
        if (colon && eol - colon >= 2) {
            *h = (HeaderLine){.name = line, .name_len = (size_t)(colon - line), .value = colon + 2,
                              .value_len = (size_t)(eol - colon - 2)};
            *pos = p;
            return true;
        }
    }
    *pos = p;
    return false;
}

bool wire_header(const WireMsg *w, const char *name, char *out, size_t outlen)
{
    size_t nlen = strlen(name);
    const char *pos = NULL;
    HeaderLine h;
    while (next_header(w, &pos, &h)) {
        if (h.name_len != nlen || memcmp(h.name, name, nlen) != 0)
            continue;
        if (outlen) {
            size_t n = h.value_len < outlen ? h.value_len : outlen - 1;
            memcpy(out, h.value, n);
            out[n] = '\0';
        }
        return true;
    }
    return false;
}

/* Through the documented API: every header line becomes a natsMsgHeader_Add(). */
static natsStatus to_msg_portable(const WireMsg *w, const char *reply, natsMsg **out)
{
    natsMsg *msg = NULL;
    natsStatus s = natsMsg_Create(&msg, wire_subject(w), reply, wire_body(w), (int)w->body_len);
    const char *pos = NULL;
    HeaderLine h;
    Buf name, value;
    buf_init(&name);
    buf_init(&value);
    while (s == NATS_OK && next_header(w, &pos, &h)) {
        buf_reset(&name);
        buf_append(&name, h.name, h.name_len);
        buf_reset(&value);
        buf_append(&value, h.value, h.value_len);
        s = natsMsgHeader_Add(msg, name.data, value.data);
    }
    buf_deinit(&name);
    buf_deinit(&value);
    if (s != NATS_OK) {
        natsMsg_Destroy(msg);
        return s;
    }
    *out = msg;
    return NATS_OK;
}

natsStatus wire_to_msg(const WireMsg *w, const char *reply, bool raw, natsMsg **out)
{
#ifdef OUTBOXD_NATS_RAW
    if (raw)
        return natsMsg_create(out, wire_subject(w), (int)w->subject_len, reply,
                              reply ? (int)strlen(reply) : 0, wire_hdr(w),
                              (int)(w->hdr_len + w->body_len), (int)w->hdr_len);
#else
    (void)raw;
#endif
    return to_msg_portable(w, reply, out);
}

void wire_msg_free(natsMsg *msg, bool raw)
{
#ifdef OUTBOXD_NATS_RAW
    if (raw) {
        natsMsg_free(msg);
        return;
    }
#endif
    natsMsg_Destroy(msg);
}

static bool raw_ok;
static pthread_once_t raw_once = PTHREAD_ONCE_INIT;

/* A message made from an encoded block must read back with the same subject, reply, headers
 * and body through the documented API. */
static void check_raw(void)
{
#ifdef OUTBOXD_NATS_RAW
    OutboxEvent ev;
    outbox_event_init(&ev);
    buf_puts(&ev.subject, "outboxd.check");
    outbox_event_add_header(&ev, OUTBOX_HDR_MSG_ID, "id-1", 4);
    ev.body = "{}";
    ev.body_len = 2;
    WireMsg w;
    wire_init(&w);
    wire_encode(&w, &ev, "id-0");
    natsMsg *msg = NULL;
    const char *id = NULL, *last = NULL;
    if (wire_to_msg(&w, "_INBOX.check", true, &msg) == NATS_OK) {
        raw_ok = strcmp(natsMsg_GetSubject(msg), "outboxd.check") == 0 &&
                 natsMsg_GetReply(msg) && strcmp(natsMsg_GetReply(msg), "_INBOX.check") == 0 &&
                 natsMsg_GetDataLength(msg) == 2 && memcmp(natsMsg_GetData(msg), "{}", 2) == 0 &&
                 natsMsgHeader_Get(msg, OUTBOX_HDR_MSG_ID, &id) == NATS_OK && id &&
                 strcmp(id, "id-1") == 0 &&
                 natsMsgHeader_Get(msg, OUTBOX_HDR_EXPECTED_LAST, &last) == NATS_OK && last &&
                 strcmp(last, "id-0") == 0;
        natsMsg_free(msg);
    }
    wire_deinit(&w);
    outbox_event_deinit(&ev);
    if (!raw_ok)
        log_info("this libnats does not take encoded header blocks as outboxd expects; "
                 "publishing through its header API instead (slower)");
#endif
}

bool wire_raw_supported(void)
{
    pthread_once(&raw_once, check_raw);
    return raw_ok;
}

natsStatus wire_publish(natsConnection *nc, const WireMsg *w, const char *reply)
{
    bool raw = wire_raw_supported();
    natsMsg *msg = NULL;
    natsStatus s = wire_to_msg(w, reply, raw, &msg);
    if (s != NATS_OK)
        return s;
    s = natsConnection_PublishMsg(nc, msg);
    wire_msg_free(msg, raw);
    return s;
}

/* ---- batches ---------------------------------------------------------------------------- */

void wire_batch_init(WireBatch *b)
{
    memset(b, 0, sizeof(*b));
    buf_init(&b->frames);
}

void wire_batch_deinit(WireBatch *b)
{
    buf_deinit(&b->frames);
    wire_batch_init(b);
}

static char *put_uint(char *p, size_t v)
{
    char digits[24], *d = digits + sizeof(digits);
    do
        *--d = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    return put(p, d, (size_t)(digits + sizeof(digits) - d));
}

/* "HPUB <subject> <reply> <header bytes> <total bytes>\r\n<headers><body>\r\n" */
static void append_frame(Buf *out, const WireMsg *w, const char *reply)
{
    size_t rlen = reply ? strlen(reply) : 0;
    buf_reserve(out, 5 + w->subject_len + 1 + rlen + 1 + 48 + w->hdr_len + w->body_len + 2);
    char *p = out->data + out->len;
    p = put(p, "HPUB ", 5);
    p = put(p, wire_subject(w), w->subject_len);
    *p++ = ' ';
    if (rlen) {
        p = put(p, reply, rlen);
        *p++ = ' ';
    }
    p = put_uint(p, w->hdr_len);
    *p++ = ' ';
    p = put_uint(p, w->hdr_len + w->body_len);
    p = put(p, "\r\n", 2);
    p = put(p, wire_hdr(w), w->hdr_len + w->body_len);
    p = put(p, "\r\n", 2);
    out->len = (size_t)(p - out->data);
}

natsStatus wire_batch_flush(WireBatch *b, natsConnection *nc)
{
    if (b->count == 0)
        return NATS_OK;
    natsStatus s = NATS_NOT_YET_CONNECTED;
#ifdef OUTBOXD_NATS_BATCH
    natsConn_lockAndRetain(nc);
    if (natsConnection_Status(nc) == NATS_CONN_STATUS_CONNECTED) {
        s = natsConn_bufferWrite(nc, b->frames.data, (int)b->frames.len);
        if (s == NATS_OK)
            s = natsConn_bufferFlush(nc);
    }
    natsConn_unlockAndRelease(nc);
#else
    (void)nc;
#endif
    b->frames.len = 0;
    b->count = 0;
    return s;
}

natsStatus wire_batch_add(WireBatch *b, natsConnection *nc, const WireMsg *w, const char *reply)
{
    if (!b->direct)
        return wire_publish(nc, w, reply);
    append_frame(&b->frames, w, reply);
    b->count++;
    return b->frames.len >= WIRE_BATCH_MAX ? wire_batch_flush(b, nc) : NATS_OK;
}

bool wire_batch_check(WireBatch *b, natsConnection *nc, const char *subject)
{
    b->direct = false;
#ifdef OUTBOXD_NATS_BATCH
    OutboxEvent ev;
    outbox_event_init(&ev);
    buf_puts(&ev.subject, subject);
    outbox_event_add_header(&ev, OUTBOX_HDR_MSG_ID, "batch-check", 11);
    ev.body = "{\"batch\":1}";
    ev.body_len = strlen(ev.body);
    WireMsg w;
    wire_init(&w);
    wire_encode(&w, &ev, NULL);
    natsSubscription *sub = NULL;
    natsMsg *msg = NULL;
    natsStatus s = natsConnection_SubscribeSync(&sub, nc, subject);
    if (s == NATS_OK)
        s = natsConnection_FlushTimeout(nc, 5000);
    if (s == NATS_OK) {
        b->direct = true;
        append_frame(&b->frames, &w, subject);
        b->count++;
        s = wire_batch_flush(b, nc);
        b->direct = false;
    }
    if (s == NATS_OK)
        s = natsSubscription_NextMsg(&msg, sub, 5000);
    if (s == NATS_OK) {
        const char *id = NULL;
        b->direct = strcmp(natsMsg_GetSubject(msg), subject) == 0 && natsMsg_GetReply(msg) &&
                    strcmp(natsMsg_GetReply(msg), subject) == 0 &&
                    natsMsg_GetDataLength(msg) == (int)ev.body_len &&
                    memcmp(natsMsg_GetData(msg), ev.body, ev.body_len) == 0 &&
                    natsMsgHeader_Get(msg, OUTBOX_HDR_MSG_ID, &id) == NATS_OK && id &&
                    strcmp(id, "batch-check") == 0;
    }
    natsMsg_Destroy(msg);
    if (sub) {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
    }
    wire_deinit(&w);
    outbox_event_deinit(&ev);
#else
    (void)nc;
    (void)subject;
#endif
    return b->direct;
}
