/*
 * recovery.c - the cut a recovery starts from (recovery.h); the rest of a recovery is a
 * backfill restricted to what committed since it (backfill.c).
 */
#include "outboxd/recovery.h"

#include <stdio.h>
#include <string.h>

#include "outboxd/jetstream.h"
#include "outboxd/util.h"

/* How many messages in a row that are not its events the look-back passes over. */
#define CUT_LOOKBACK 256

int recovery_cut(natsConnection *nc, const char *stream, const char *source,
                 const Checkpoint *cp, RecoveryCut *cut, char *err, size_t errlen)
{
    *cut = (RecoveryCut){0};
    if (cp->commit_time) {
        cut->commit_time = cp->commit_time;
        cut->from = "the checkpoint";
    }
    StreamInfo info;
    if (jsapi_stream_info(nc, stream, &info, err, errlen) < 0)
        return -1;
    JsOwnEvent last;
    int rc = info.messages ? jsapi_last_own_event(nc, stream, info.last_seq, source, CUT_LOOKBACK,
                                                  &last, err, errlen)
                           : 0;
    if (rc < 0)
        return -1;
    if (rc == 1 && last.anchor.commit_time > cut->commit_time) {
        cut->commit_time = last.anchor.commit_time;
        cut->from = "the stream's last event";
    }
    return cut->commit_time != 0;
}

void recovery_plan(Checkpoint *cp, const RecoveryCut *cut)
{
    cp->backfill = (CheckpointBackfill){.active = true};
    pg_time_format_rfc3339(cut->commit_time, cp->backfill.since);
}
