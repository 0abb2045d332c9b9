/*
 * recovery.h - publishing what the stream lacks after the slot was lost, or went missing in a
 * failover, in commit order and nothing twice.
 *
 * A lost slot (PostgreSQL removed WAL it still needed) or a slot missing on a promoted standby
 * cannot say which transactions committed after the last one relayed: their WAL is gone, or
 * on another server. The outbox table still holds their rows (unless they were deleted). A
 * recovery therefore
 *   1. takes its cut: the commit time of the last transaction relayed - the newer of the
 *      stream's last event of this relay's source and the checkpoint's last confirmed
 *      transaction (recovery_cut);
 *   2. makes a new slot and reads, in its snapshot, only the rows committed since the cut (by
 *      commit time with track_commit_timestamp, else by the time column less the margin),
 *      in commit order, as a backfill does (backfill.c, checkpoint "backfill.since");
 *   3. publishes each row unless the stream holds its event since the cut less the margin
 *      (read from the stream itself, by event id, with the audit's comparison: audit.h) -
 *      nothing twice whatever the duplicate window - and counts what it published and what
 *      it found there. Rows deleted from the outbox since the cut are out of its reach.
 * `outboxd recover` prepares it from outside (drops the lost slot, records the cut in the
 * checkpoint); with --slot-recovery=auto the relay does the same by itself.
 */
#ifndef OUTBOXD_RECOVERY_H
#define OUTBOXD_RECOVERY_H

#include <stdint.h>

#include <nats/nats.h>

#include "outboxd/checkpoint.h"

/* Where a recovery starts. */
typedef struct RecoveryCut {
    int64_t commit_time; /* µs since 2000-01-01 of the last transaction relayed */
    const char *from;    /* "the stream's last event", "the checkpoint" */
} RecoveryCut;

/*
 * The cut from the newest event of source ("<system id>/<slot>") in stream and the checkpoint
 * cp. Returns 1 with *cut, 0 when neither knows a relayed transaction (then only a full
 * backfill can help), -1 with the reason in err.
 */
int recovery_cut(natsConnection *nc, const char *stream, const char *source,
                 const Checkpoint *cp, RecoveryCut *cut, char *err, size_t errlen);

/* Records a recovery from cut as the checkpoint's unfinished backfill: the next relay (or this
 * one) makes the slot and publishes the rows committed since then. */
void recovery_plan(Checkpoint *cp, const RecoveryCut *cut);

#endif
