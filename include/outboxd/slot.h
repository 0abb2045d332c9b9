/*
 * slot.h - `outboxd slot list|create|drop|advance`, `outboxd rewind` and `outboxd recover`:
 * administering the relay's replication slot and its bookmarks while the relay is stopped.
 *
 * Every command that changes a slot refuses while a session holds it (a running relay) and,
 * without yes, only prints what it would do and returns 2. Exit codes: 0 done (or nothing to
 * do), 1 refused or failed (the message says why and what to do), 2 a bad option or a plan
 * printed without yes, 3 PostgreSQL or NATS unreachable.
 */
#ifndef OUTBOXD_SLOT_H
#define OUTBOXD_SLOT_H

#include <stdbool.h>
#include <stddef.h>

#include "outboxd/config.h"

typedef enum SlotAction { SLOT_LIST, SLOT_CREATE, SLOT_DROP, SLOT_ADVANCE } SlotAction;

typedef struct SlotOptions {
    SlotAction action;
    bool yes;                /* drop, advance: do it */
    bool json;               /* list: one JSON array */
    bool with_bookmarks;     /* drop: drop the slot's bookmarks too */
    bool bookmarks_only;     /* drop: only the slot's bookmarks (allowed while the relay runs) */
    const char *to;          /* advance: the LSN to move to */
    const char *past_commit; /* advance: a commit LSN C; moves to C+1, skipping that transaction */
} SlotOptions;

/*
 * list: every logical slot of the database (plugin, holder, confirmed LSN, lag, WAL retained,
 * WAL status), marking the relay's slot and bookmarks. create: the publication, then the slot
 * (as the relay does at its first start). drop: the slot (and with with_bookmarks its
 * bookmarks; with bookmarks_only just those). advance: moves the slot forward with
 * pg_replication_slot_advance, printing the range and how many transactions and outbox rows it
 * skips, and writes a database checkpoint so the advance survives a crash.
 */
int slot_run(const Config *cfg, const SlotOptions *opts);

typedef struct RewindOptions {
    const char *to; /* an LSN ("0/16B3748") or a time PostgreSQL reads as timestamptz */
    bool yes;
} RewindOptions;

/*
 * Puts the relay's slot back to a bookmark: the newest one at or before the target (by its
 * time, or by its position for an LSN), advanced so that exactly the transactions committed at
 * or after the target come again; resets the checkpoint to that position. The relay must be
 * stopped.
 */
int rewind_run(const Config *cfg, const RewindOptions *opts);

typedef struct RecoverOptions {
    bool yes;
} RecoverOptions;

/*
 * After the slot was lost, or went missing in a failover: drops a lost slot and records a
 * recovery in the checkpoint (recovery.h), so that the next start makes the slot anew and
 * publishes the rows committed since the last transaction relayed that the stream lacks, in
 * commit order. Refuses while the slot exists and is not lost, or a session holds it.
 */
int recover_run(const Config *cfg, const RecoverOptions *opts);

/*
 * A lost slot (wal_status "lost": PostgreSQL removed WAL the slot still needed, after
 * max_slot_wal_keep_size was exceeded; it can never stream again), in the words that doctor,
 * status and the relay all use: slot_lost_detail says what happened, slot_lost_fix how to
 * recover. Both write one line into out.
 */
void slot_lost_detail(const char *slot, char *out, size_t outlen);
void slot_lost_fix(const char *slot, char *out, size_t outlen);

#endif
