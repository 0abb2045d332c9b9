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

/* What an answer says besides its kind. */
typedef struct PubAckInfo {
    uint64_t seq;         /* the stream sequence stored at (or, for a duplicate, held at) */
    unsigned err_code;    /* for PUBACK_REFUSED: JetStream's err_code (or its code when there is
                           * none), 0 when the answer is not a PubAck at all */
    char description[160]; /* for PUBACK_REFUSED: JetStream's text, "" when none */
} PubAckInfo;

/* Reads an answer's body into *info (always written). */
PubAckKind puback_parse(const char *data, size_t len, PubAckInfo *info);

/* The one-pass reader puback_parse() tries first: PUBACK_STORED or PUBACK_DUPLICATE for the
 * answers nats-server usually sends, with the sequence in *seq; -1 for anything that needs a
 * JSON parser. */
int puback_quick(const char *data, size_t len, uint64_t *seq);

/* Parses the "<seq>.<attempt>" at the end of a reply subject. */
bool puback_reply_subject(const char *subject, uint64_t *seq, unsigned *attempt);

#endif
