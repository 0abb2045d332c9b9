/*
 * wire.h - an event as it goes over the wire to NATS: subject, encoded header block, body.
 *
 * The publisher keeps every event in this form until JetStream acknowledges it, and sends it
 * (again, after a failure) from here. Encoding the headers once, as the bytes NATS carries
 * ("NATS/1.0\r\n", one "Name: value\r\n" line per header, "\r\n"), costs one buffer per event;
 * nats.c's header API builds a hash map with a few allocations per header and encodes it again
 * on every send.
 */
#ifndef OUTBOXD_WIRE_H
#define OUTBOXD_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nats/nats.h>

#include "outboxd/outbox.h"
#include "outboxd/util.h"

/* Most that wire_set_expected() can add to a message: a Nats-Expected-Last-Sequence line with
 * a 20-digit sequence. */
#define WIRE_EXPECTED_ROOM (sizeof(OUTBOX_HDR_EXPECTED_LAST) + 3 + 20)

typedef struct WireMsg {
    Buf buf;             /* subject, NUL, header block, body */
    size_t subject_len;
    size_t hdr_len;      /* the header block, from "NATS/1.0\r\n" to its closing "\r\n" */
    size_t expected_off; /* in the header block: the Nats-Expected-Last-Sequence line, or the
                          * closing "\r\n" when there is none */
    size_t body_len;
} WireMsg;

void wire_init(WireMsg *w);
/* Frees the buffer. */
void wire_deinit(WireMsg *w);
/* Moves the buffer out, leaving w empty and without one: the publisher pools the buffers of
 * acknowledged events for the next ones. */
Buf wire_take_buffer(WireMsg *w);
/* Gives an empty w a buffer (from wire_take_buffer) to encode into. */
void wire_give_buffer(WireMsg *w, Buf b);
/* Bytes w's buffer holds. */
static inline size_t wire_capacity(const WireMsg *w)
{
    return w->buf.cap;
}

/* Encodes ev, with expected (NULL or "" for none) as Nats-Expected-Last-Sequence. Neither the
 * header values of an OutboxEvent (outbox.c escapes them) nor an event id (outbox.c checks it)
 * hold control bytes. */
void wire_encode(WireMsg *w, const OutboxEvent *ev, const char *expected);
/* Replaces the Nats-Expected-Last-Sequence line (NULL or "" removes it). Control bytes in
 * expected, which comes from the stream, become spaces. */
void wire_set_expected(WireMsg *w, const char *expected);

static inline bool wire_empty(const WireMsg *w)
{
    return w->buf.len == 0;
}
static inline const char *wire_subject(const WireMsg *w)
{
    return w->buf.data;
}
/* The header block, hdr_len bytes, and the body after it. */
static inline const char *wire_hdr(const WireMsg *w)
{
    return w->buf.data + w->subject_len + 1;
}
static inline const char *wire_body(const WireMsg *w)
{
    return wire_hdr(w) + w->hdr_len;
}
/* What the server counts against max_payload: header block and body. */
static inline size_t wire_size(const WireMsg *w)
{
    return w->hdr_len + w->body_len;
}
/* Copies the value of header name into out (truncated to outlen); false when absent. */
bool wire_header(const WireMsg *w, const char *name, char *out, size_t outlen);

/* A natsMsg with w's subject, headers and body and the given reply subject. With raw (only
 * when wire_raw_supported()), nats.c takes the header block as it is; otherwise the headers
 * go through nats.c's header API. Free it with wire_msg_free(msg, raw), which also frees, with
 * raw = wire_raw_supported(), any message nobody else holds (one taken from a synchronous
 * subscription): at once, where natsMsg_Destroy() hands it to nats.c's collector thread. */
natsStatus wire_to_msg(const WireMsg *w, const char *reply, bool raw, natsMsg **out);
void wire_msg_free(natsMsg *msg, bool raw);
/* True when this nats.c build can take an encoded header block (outboxd checks it once at
 * start; see wire.c). */
bool wire_raw_supported(void);

/* Publishes w with the reply subject; the message is copied into the connection's buffer. */
natsStatus wire_publish(natsConnection *nc, const WireMsg *w, const char *reply);

/*
 * A batch of messages on their way out: what one wake-up of the relay publishes, written to
 * the socket in one system call when wire_batch_flush() is called (see wire.c for why and
 * how). Without the direct path (wire_batch_check() failed or was not called) every message
 * goes through wire_publish() at once and nats.c's flusher thread writes it.
 */
typedef struct WireBatch {
    Buf frames;   /* HPUB protocol lines with their messages, not yet handed to nats.c */
    size_t count; /* messages in frames */
    bool direct;  /* frames are written into the connection's buffer by outboxd */
} WireBatch;

void wire_batch_init(WireBatch *b);
void wire_batch_deinit(WireBatch *b);
/* Checks once on nc that a message sent the direct way arrives as written (a round trip
 * through the server on subject, which nothing else may subscribe to); sets b->direct. */
bool wire_batch_check(WireBatch *b, natsConnection *nc, const char *subject);
/* Adds w with the reply subject; flushes when the batch grows large. */
natsStatus wire_batch_add(WireBatch *b, natsConnection *nc, const WireMsg *w, const char *reply);
/* Writes every message added since the last flush. Messages that cannot be written (not
 * connected) are dropped: the caller sends again what is not acknowledged. */
natsStatus wire_batch_flush(WireBatch *b, natsConnection *nc);

#endif
