/*
 * puback.h - reading JetStream's answers to outboxd's publishes.
 *
 * Every event goes out with the reply subject "<inbox>.<seq>.<attempt>"; the stream's leader
 * answers there with a PubAck: {"stream":"S","seq":N} (with "duplicate": true when it already
 * held the Nats-Msg-Id) or an object with "error". Pure code, so the unit tests cover it.
 */
#ifndef OUTBOXD_PUBACK_H
#define OUTBOXD_PUBACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum PubAckKind {
    PUBACK_STORED,    /* the stream stored the event */
    PUBACK_DUPLICATE, /* the stream held it already */
    PUBACK_REFUSED,   /* an error answer, or one outboxd cannot read */
} PubAckKind;

/* Reads an answer's body. For PUBACK_REFUSED, *err_code is JetStream's err_code (or its code
 * when there is none), 0 when the answer is not a PubAck at all. */
PubAckKind puback_parse(const char *data, size_t len, unsigned *err_code);

/* The one-pass reader puback_parse() tries first: PUBACK_STORED or PUBACK_DUPLICATE for the
 * answers nats-server usually sends, -1 for anything that needs a JSON parser. */
int puback_quick(const char *data, size_t len);

/* Parses the "<seq>.<attempt>" at the end of a reply subject. */
bool puback_reply_subject(const char *subject, uint64_t *seq, unsigned *attempt);

#endif
