/*
 * anchor.c - the skip rule (anchor.h), and why a skip is proven rather than assumed.
 *
 * Every event carries where it comes from: Outbox-Position "<timeline> <commit LSN> <index>"
 * and Outbox-Source "<system id>/<slot>". Events reach the stream in position order, so the
 * newest event of a source that the stream holds (with --strict-order), the last transaction
 * the checkpoint confirmed, and the last event this run saw stored each say "every event up to
 * here is stored". Such a statement is an anchor. Using one blindly is how a relay loses events
 * without a word: an LSN means something only in the WAL history it was written in.
 *
 * The rule:
 *   1. An anchor from another source is never used: another system (a database moved to a new
 *      cluster by dump and restore, blue/green) or another slot (relays sharing a stream) has
 *      positions that say nothing about this one's. The checkpoint is keyed by system and slot.
 *   2. An anchor past the server's WAL (IDENTIFY_SYSTEM's position) is not used: the server
 *      went back (a restore of an older backup or volume snapshot).
 *   3. An anchor on another timeline is used only up to where that timeline forked into the
 *      server's (TIMELINE_HISTORY); past the fork it names transactions this server may not
 *      have, and is cut to the fork, which the server's own history proves.
 *   4. Streaming always starts at the slot's confirmed position: the server's own state, never
 *      past its WAL, and after a restore the slot goes back with the WAL. While the anchor's
 *      transaction is still ahead, events at or before the anchor are skipped *tentatively*
 *      and nothing is confirmed. When the anchor's transaction arrives - same commit LSN, same
 *      commit time to the microsecond - the history is the one the anchor came from, and every
 *      skip was right. If the WAL goes past the anchor's commit LSN without that transaction, or
 *      holds another transaction there, the history is another one (a volume snapshot restored
 *      in place keeps the system id and the timeline: its WAL goes back with no other sign):
 *      the relay drops the session, trusts none of those anchors again in this run, and starts
 *      from the slot once more, publishing every event after it. A false anchor costs events
 *      sent again (JetStream drops those within its duplicate window), never a lost one.
 *   5. An anchor before the slot's position skips nothing: PostgreSQL sends nothing before it.
 *
 * What it covers: a new cluster sharing the stream (1), a restored snapshot of the same
 * cluster (2 when the WAL is shorter, 4 otherwise), relays of other slots or systems writing to
 * the same stream (1), failover to a standby (3), the backfill (its rows carry the slot's
 * position minus one, below every streamed transaction, so an anchor in the backfill never
 * covers a streamed event and one in the stream never covers a backfilled row), a database
 * restart on PostgreSQL 15 that brings the slot back older than what was published (4: the
 * events in between are read again and skipped, proven by their anchor).
 */
#include "outboxd/anchor.h"

#include <stdio.h>
#include <string.h>

#include "outboxd/util.h"

void anchor_source_format(const char *system_id, const char *slot,
                          char out[static ANCHOR_SOURCE_MAX])
{
    snprintf(out, ANCHOR_SOURCE_MAX, "%s/%s", system_id, slot);
}

bool anchor_covers(const Anchor *a, const OutboxPosition *pos)
{
    return pos->timeline == a->pos.timeline && outbox_position_cmp(pos, &a->pos) <= 0;
}

AnchorVerdict anchor_on_begin(const Anchor *a, uint64_t lsn, int64_t commit_time)
{
    if (lsn < a->pos.lsn)
        return ANCHOR_AHEAD;
    if (lsn == a->pos.lsn && commit_time == a->commit_time)
        return ANCHOR_MET;
    return ANCHOR_FALSE;
}

AnchorVerdict anchor_on_keepalive(const Anchor *a, uint64_t wal_end)
{
    /* A transaction committing at a->pos.lsn is sent before the server's position passes its
     * commit record. */
    return wal_end > a->pos.lsn ? ANCHOR_FALSE : ANCHOR_AHEAD;
}

int anchor_from_event(const char *position, const char *commit_time, const char *event_source,
                      const char *replay, const char *source, Anchor *out)
{
    if (!position || replay)
        return 0; /* not an event of a relay's, or a replayed copy: its place says nothing */
    if (event_source && strcmp(event_source, source) != 0)
        return 0;
    Anchor a = {.from = "the stream"};
    int64_t unix_us;
    if (!outbox_position_parse(position, &a.pos) || a.pos.lsn == 0 || !commit_time ||
        !time_parse_rfc3339(commit_time, strlen(commit_time), &unix_us))
        return 0;
    a.commit_time = unix_us - PG_EPOCH_OFFSET_US;
    *out = a;
    return 1;
}
