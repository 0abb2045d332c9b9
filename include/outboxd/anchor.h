/*
 * anchor.h - the skip rule: which events the stream holds already, proven before it is used.
 *
 * PostgreSQL resends from the slot's confirmed position, which can lie before events that are
 * stored (after a kill, a database restart on PostgreSQL 15, a reconnect inside a long
 * transaction). The relay skips those by an anchor: a transaction (commit LSN and commit time
 * on a timeline) and an index in it, such that every event at or before that position is
 * stored. An anchor says where it came from; see anchor.c for why a skip by it is proven, not
 * assumed, and what it covers. Pure: no I/O.
 */
#ifndef OUTBOXD_ANCHOR_H
#define OUTBOXD_ANCHOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/outbox.h"

/* "<system id>/<slot>": the Outbox-Source of every event a relay publishes. */
#define ANCHOR_SOURCE_MAX 128

typedef struct Anchor {
    OutboxPosition pos;  /* every event at or before it is stored */
    int64_t commit_time; /* µs since 2000-01-01 of the transaction at pos.lsn: what proves
                          * the anchor when that transaction comes again; 0 for an anchor
                          * nothing can meet (the fork point of a timeline, proven by the
                          * server's own history) */
    const char *from;    /* "the stream", "the checkpoint", "this run": for messages */
} Anchor;

/* What the WAL says of an anchor that is being proven. */
typedef enum AnchorVerdict {
    ANCHOR_AHEAD,  /* the anchor's transaction is still to come */
    ANCHOR_MET,    /* this is the anchor's transaction: the skip is proven */
    ANCHOR_FALSE,  /* the WAL went past the anchor's position without its transaction, or
                    * holds another transaction there: this server's history is not the one
                    * the anchor came from */
} AnchorVerdict;

/* Formats the source of a relay's events: "<system id>/<slot>". */
void anchor_source_format(const char *system_id, const char *slot,
                          char out[static ANCHOR_SOURCE_MAX]);

/* Whether an event at pos (on the anchor's timeline) is stored by the anchor's word. */
bool anchor_covers(const Anchor *a, const OutboxPosition *pos);

/* A transaction begins whose commit LSN is lsn and commit time commit_time. */
AnchorVerdict anchor_on_begin(const Anchor *a, uint64_t lsn, int64_t commit_time);

/* Outside a transaction, the server says every transaction that commits before wal_end was
 * sent (a keepalive's position). */
AnchorVerdict anchor_on_keepalive(const Anchor *a, uint64_t wal_end);

/*
 * Reads an event's anchor out of the values of its headers (NULL when absent): Outbox-Position,
 * Outbox-Commit-Time, Outbox-Source and Outbox-Replay. Returns 1 when the message is an event
 * of the relay whose source is `source` (an event without Outbox-Source, written before outboxd
 * named its sources, counts: its anchor is proven like any other before it is used), 0 when it
 * is not (no position, a replayed copy, another source or a malformed value).
 */
int anchor_from_event(const char *position, const char *commit_time, const char *event_source,
                      const char *replay, const char *source, Anchor *out);

#endif
