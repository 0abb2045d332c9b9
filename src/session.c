/*
 * session.c - the relay's PostgreSQL sessions: connecting and checking, taking the slot or
 * standing by while another relay holds it, where streaming starts, and reconnecting.
 *
 * One relay streams from a slot at a time: PostgreSQL lets one session hold it, so a second
 * relay on the same slot waits as a standby (/readyz 503) and takes over when the slot is
 * released. Streaming starts from the later of the slot's confirmed position, the durable
 * checkpoint and what this process confirmed, never past the server's WAL. After a lost
 * connection the relay lets every published event be acknowledged before it reconnects, so
 * the session that follows starts right after what is stored. A connection the relay dropped
 * because it went silent leaves its walsender holding the slot until the server's
 * wal_sender_timeout; the relay ends that process itself when it can prove it is its own
 * previous session (end_own_session).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/notify.h"
#include "outboxd/slot.h"
#include "relay_internal.h"

/* Full-jitter backoff for reconnects, as for publishing. */
static int64_t reconnect_delay_us(const Config *cfg, unsigned attempt)
{
    int64_t cap = cfg->retry_min_ms * 1000;
    for (unsigned i = 0; i < attempt && cap < cfg->retry_max_ms * 1000; i++)
        cap *= 2;
    if (cap > cfg->retry_max_ms * 1000)
        cap = cfg->retry_max_ms * 1000;
    return (int64_t)((uint64_t)rand() % (uint64_t)(cap + 1));
}

int session_load_checkpoint(Relay *r, Checkpoint *stored)
{
    if (publisher_checkpoint_get(r->pub, r->checkpoint_key, stored, r->err, sizeof(r->err)) < 0)
        return -1;
    r->cp.backfill = stored->backfill;
    if (stored->commit_time > r->cp.commit_time)
        r->cp.commit_time = stored->commit_time;
    return 0;
}

/*
 * The checkpoint says a relay streamed from this system's slot, but the slot is gone: after a
 * failover to a standby that did not have it (PostgreSQL 15 and 16, or 17 without failover
 * slots), a new slot would start at the new primary's current position and every event
 * committed there in between would never be published. Not a decision to take alone.
 */
static int refuse_missing_slot(Relay *r, const Checkpoint *stored)
{
    if (stored->lsn == 0 || stored->backfill.active || !r->cfg->create)
        return 0;
    PgSlotInfo info;
    if (pgstream_slot_info(r->pg, r->cfg->slot, &info, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    if (info.exists)
        return 0;
    /* This run may have confirmed more than the stored checkpoint says (session_load_checkpoint keeps
     * the later commit time): name the latest, so the runbook's replay starts no earlier. */
    uint64_t lsn = stored->lsn > r->confirmed ? stored->lsn : r->confirmed;
    char when[32] = "(unknown)";
    if (r->cp.commit_time)
        pg_time_format_rfc3339(r->cp.commit_time, when);
    log_error("replication slot \"%s\" does not exist, but the checkpoint says outboxd streamed "
              "from it up to " LSN_FMT " (timeline %u, last transaction committed at %s): after a "
              "failover to a standby without the slot, a new slot would skip every event "
              "committed on this server since then. Choose: (1) to publish them, run outboxd "
              "slot create, then outboxd replay --since %s (the rows still in the table; "
              "JetStream drops what it holds inside its duplicate window), then start outboxd; "
              "or (2) to accept the gap, run outboxd slot create and start outboxd. On "
              "PostgreSQL 17 and later, failover slots (--failover-slot, sync_replication_slots "
              "on the standby) keep the slot through a failover: see outboxd doctor",
              r->cfg->slot, LSN_ARGS(lsn), stored->timeline, when, when);
    return SESSION_FATAL;
}

int session_connect(Relay *r)
{
    const Config *cfg = r->cfg;
    int rc = pgstream_connect(&r->pg, cfg->pg_url, r->err, sizeof(r->err));
    if (rc != 0) {
        log_error("%s", r->err);
        return rc;
    }
    PgSystem sys;
    if (pgstream_identify(r->pg, &sys, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        goto fail;
    }
    if (r->have_sys && strcmp(sys.system_id, r->sys.system_id) != 0) {
        log_error("the database at --pg-url is another system now (id %s, was %s): the slot "
                  "and the checkpoint belong to the old one; refusing to continue",
                  sys.system_id, r->sys.system_id);
        rc = PGSTREAM_CHECK_FAILED;
        goto fail;
    }
    if (!r->have_sys)
        log_info("connected to PostgreSQL: system %s, timeline %u, database \"%s\"",
                 sys.system_id, sys.timeline, sys.dbname);
    r->sys = sys;
    r->have_sys = true;
    snprintf(r->checkpoint_key, sizeof(r->checkpoint_key), "%s.%s", sys.system_id, cfg->slot);
    Checkpoint stored;
    if (session_load_checkpoint(r, &stored) < 0) {
        log_error("%s", r->err);
        rc = -1;
        goto fail;
    }
    if ((rc = refuse_missing_slot(r, &stored)) != 0)
        goto fail;

    PgSetup setup = {
        .slot = cfg->slot,
        .publication = cfg->publication,
        .mapper = r->mapper,
        .create = cfg->create,
        .failover = cfg->failover_slot,
    };
    if ((rc = backfill_prepare(r, &setup)) != 0)
        goto fail;
    bool created;
    rc = pgstream_setup(r->pg, &setup, &created, r->err, sizeof(r->err));
    if (rc != 0) {
        log_error("%s", r->err);
        goto fail;
    }
    if ((rc = backfill_finish(r, &setup, created)) != 0)
        goto fail;
    /* Status updates must reach the walsender well within wal_sender_timeout, whatever the
     * configured interval. */
    int64_t wst;
    if (pgstream_wal_sender_timeout_ms(r->pg, &wst, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        rc = -1;
        goto fail;
    }
    r->status_interval_us = cfg->status_interval_ms * 1000;
    if (wst > 0 && r->status_interval_us > wst * 1000 / 3) {
        r->status_interval_us = wst * 1000 / 3;
        log_warn("status interval lowered to %" PRId64 " ms to stay within the server's "
                 "wal_sender_timeout of %" PRId64 " ms",
                 r->status_interval_us / 1000, wst);
    }
    return 0;
fail:
    pgstream_free(r->pg);
    r->pg = NULL;
    return rc ? rc : -1;
}

/*
 * Timelines. A position (an LSN, an event's commit LSN) belongs to the timeline it was reached
 * on. After a failover the server is on a new timeline that shares the old one's history only
 * up to the fork point (TIMELINE_HISTORY): an old position before it means the same on the new
 * timeline; one at or past it may name transactions the new primary never had (an async
 * standby), and the new primary's own transactions after the fork have lower LSNs than it.
 * So an old position is used only up to the fork. Returns 0 with *out = the position on the
 * server's timeline (lsn or the fork point), 1 when tli is not in the server's history (a
 * position outboxd cannot prove safe), -1 on error (err).
 */
static int on_this_timeline(Relay *r, uint32_t tli, uint64_t lsn, uint64_t *out)
{
    if (tli == 0 || tli == r->sys.timeline) {
        *out = lsn;
        return 0;
    }
    uint64_t fork;
    int rc = pgstream_timeline_fork(r->pg, r->sys.timeline, tli, &fork, r->err, sizeof(r->err));
    if (rc == 0)
        *out = lsn < fork ? lsn : fork;
    return rc;
}

/* With --strict-order the stream's last event of outboxd's says exactly which events the
 * stream holds: read it at every start (a standby taking over, a restart, a reconnect), so
 * nothing it holds is sent again however long ago it was stored. */
static void find_stored(Relay *r)
{
    if (r->have_stored && r->stored.timeline != r->sys.timeline) {
        /* This run's own knowledge, from before a failover. */
        uint64_t at;
        if (on_this_timeline(r, r->stored.timeline, r->stored.lsn, &at) != 0 ||
            at < r->stored.lsn)
            r->have_stored = false;
        else
            r->stored.timeline = r->sys.timeline;
    }
    if (!r->cfg->strict_order)
        return;
    OutboxPosition pos;
    uint64_t seq;
    int rc = publisher_stream_position(r->pub, &pos, &seq, r->err, sizeof(r->err));
    if (rc < 0) {
        log_warn("could not read the stream's last event: %s; events after the checkpoint are "
                 "sent again and JetStream drops those inside its duplicate window",
                 r->err);
        return;
    }
    if (rc == 0) {
        if (!r->have_stored)
            log_info("stream \"%s\" holds no event of outboxd's among its last messages; "
                     "resuming from the checkpoint",
                     r->stream.name);
        return;
    }
    if (pos.timeline != r->sys.timeline) {
        uint64_t at;
        int trc = on_this_timeline(r, pos.timeline, pos.lsn, &at);
        if (trc != 0) {
            log_warn("the stream's last event (position %u " LSN_FMT " %u) is from timeline %u, "
                     "which %s: not skipping by it; JetStream's duplicate window drops what it "
                     "holds",
                     pos.timeline, LSN_ARGS(pos.lsn), pos.index, pos.timeline,
                     trc > 0 ? "is not in this server's history" : "could not be looked up");
            return;
        }
        if (at < pos.lsn) {
            /* Events past the fork were published from the old primary: the new one may not
             * have them, and its own transactions after the fork must all go out. */
            log_warn("the stream holds events of timeline %u up to " LSN_FMT ", past the point "
                     "where that timeline forked (" LSN_FMT ") into this server's timeline %u: "
                     "transactions the old primary committed after the fork and published are "
                     "not on this server (see \"Failover\" in the README); every transaction "
                     "of this server after the fork is published",
                     pos.timeline, LSN_ARGS(pos.lsn), LSN_ARGS(at), r->sys.timeline);
            pos = (OutboxPosition){.lsn = at - 1, .index = UINT32_MAX};
        }
        pos.timeline = r->sys.timeline;
    }
    if (!r->have_stored || outbox_position_cmp(&pos, &r->stored) > 0)
        log_info("stream \"%s\" holds every event up to position %u " LSN_FMT " %u (sequence "
                 "%" PRIu64 "): nothing up to it is published again",
                 r->stream.name, pos.timeline, LSN_ARGS(pos.lsn), pos.index, seq);
    relay_stored_at_least(r, &pos);
}

/* Where to start: the later of the slot, the checkpoint and what this process confirmed, each
 * on the server's timeline, never past the server's WAL (a checkpoint from before a restore of
 * an older backup). Returns 0 with *start, or SESSION_FATAL (logged) when the checkpoint's
 * timeline is not in the server's history. */
static int start_position(Relay *r, uint64_t slot_confirmed, uint64_t *start_out)
{
    find_stored(r);
    /* Read again at every start: while this relay stood by, the one that held the slot moved
     * it on (and may have finished a backfill). */
    Checkpoint stored;
    if (session_load_checkpoint(r, &stored) < 0) {
        log_warn("%s; starting from the slot's position", r->err);
        stored.lsn = 0;
    }
    uint64_t checkpoint = stored.lsn;
    if (checkpoint) {
        int rc = on_this_timeline(r, stored.timeline, stored.lsn, &checkpoint);
        if (rc > 0) {
            log_error("checkpoint " LSN_FMT " is from timeline %u, which is not in the history of "
                      "the server's timeline %u (a restore, or a standby of another lineage): "
                      "outboxd cannot tell which of its transactions were published; check the "
                      "server, then remove the checkpoint key %s from bucket \"%s\" to start "
                      "from the slot's position",
                      LSN_ARGS(stored.lsn), stored.timeline, r->sys.timeline, r->checkpoint_key,
                      r->cfg->checkpoint_bucket);
            return SESSION_FATAL;
        }
        if (rc < 0) {
            log_warn("%s; not using the checkpoint", r->err);
            checkpoint = 0;
        } else if (checkpoint < stored.lsn) {
            log_warn("timeline %u forked into the server's timeline %u at " LSN_FMT ", before the "
                     "checkpoint " LSN_FMT ": starting at the fork at the latest, so no "
                     "transaction of this server is skipped",
                     stored.timeline, r->sys.timeline, LSN_ARGS(checkpoint),
                     LSN_ARGS(stored.lsn));
        }
    }
    uint64_t confirmed = 0;
    if (r->confirmed &&
        on_this_timeline(r, r->confirmed_timeline, r->confirmed, &confirmed) != 0)
        confirmed = 0;
    uint64_t start = slot_confirmed;
    const char *from = "the slot";
    if (checkpoint > start && checkpoint <= r->sys.xlogpos) {
        start = checkpoint;
        from = "the checkpoint";
    } else if (checkpoint > r->sys.xlogpos) {
        log_warn("checkpoint " LSN_FMT " is ahead of the server's WAL (" LSN_FMT
                 "): was the database restored from an older backup? ignoring it",
                 LSN_ARGS(checkpoint), LSN_ARGS(r->sys.xlogpos));
    }
    if (confirmed > start && confirmed <= r->sys.xlogpos) {
        start = confirmed;
        from = "this run's confirmed position";
    }
    if (start > slot_confirmed)
        log_info("starting from %s at " LSN_FMT " (the slot is at " LSN_FMT "%s)", from,
                 LSN_ARGS(start), LSN_ARGS(slot_confirmed),
                 pgstream_server_version(r->pg) < 170000
                     ? "; before PostgreSQL 17 a restart can lose a slot's latest position"
                     : "");
    *start_out = start;
    return 0;
}

/* Marks the relay not ready with a lost slot and logs what happened, how to recover and what
 * may be missing from the stream. slot_confirmed: the slot's last confirmed position. */
static void report_slot_lost(Relay *r, uint64_t slot_confirmed)
{
    char detail[512], fix[1024], when[64] = "";
    atomic_store(&metrics.slot_lost, 1);
    atomic_store(&metrics.pg_connected, 0);
    notify_systemd("STATUS=replication slot lost: drop it (outboxd slot drop --yes), then start "
                   "again");
    slot_lost_detail(r->cfg->slot, detail, sizeof(detail));
    slot_lost_fix(r->cfg->slot, fix, sizeof(fix));
    if (r->cp.commit_time) {
        char t[32];
        pg_time_format_rfc3339(r->cp.commit_time, t);
        snprintf(when, sizeof(when), ", last commit at %s", t);
    }
    uint64_t confirmed = r->confirmed > slot_confirmed ? r->confirmed : slot_confirmed;
    log_error("%s", detail);
    log_error("to recover: %s", fix);
    log_error("relayed up to " LSN_FMT "%s: events committed after that whose rows were "
              "deleted from the outbox since are not in the stream",
              LSN_ARGS(confirmed), when);
}

/*
 * The slot is held by server process pid. If that is this relay's own previous session (the
 * same process, started at the same time, on the same system: a connection that went silent,
 * whose walsender keeps the slot until its wal_sender_timeout), ends it. True when it ended and
 * the slot may be free now. A refusal (the role may not signal it) only means waiting.
 */
static bool end_own_session(Relay *r, int pid)
{
    if (pid != r->stream_pid || !r->stream_started[0] ||
        strcmp(r->stream_system, r->sys.system_id) != 0)
        return false;
    log_warn("replication slot \"%s\" is still held by PID %d, this relay's previous session "
             "(its connection went silent; the server would end it only at wal_sender_timeout): "
             "ending it with pg_terminate_backend",
             r->cfg->slot, pid);
    bool ended = false;
    int rc = pgstream_terminate_session(r->pg, pid, r->stream_started, &ended, r->err,
                                        sizeof(r->err));
    r->stream_pid = 0; /* one attempt: it either ended or it cannot be ended by us */
    r->stream_started[0] = '\0';
    if (rc < 0)
        log_warn("could not end it (%s); waiting until PostgreSQL does", r->err);
    else if (!ended)
        log_info("PID %d is gone or did not exit in time; waiting for the slot", pid);
    return rc == 0 && ended;
}

/*
 * Takes the slot: waits as a standby while another session holds it, then starts streaming.
 * Returns 0 when streaming, 1 on stop, -1 when the connection failed.
 */
int session_acquire_slot(Relay *r)
{
    bool standby = false;
    while (!*r->stop) {
        PgSlotInfo info;
        if (pgstream_slot_info(r->pg, r->cfg->slot, &info, r->err, sizeof(r->err)) < 0) {
            log_warn("%s", r->err);
            return -1;
        }
        if (!info.exists) {
            log_error("replication slot \"%s\" disappeared", r->cfg->slot);
            return -1;
        }
        if (strcmp(info.wal_status, "lost") == 0) {
            report_slot_lost(r, info.confirmed);
            return SESSION_SLOT_LOST;
        }
        int rc = 0;
        if (info.active_pid != 0 && end_own_session(r, info.active_pid))
            continue;
        if (info.active_pid == 0) {
            uint64_t start;
            if (start_position(r, info.confirmed, &start) != 0)
                return SESSION_FATAL;
            if (backfill_unfinished(r))
                return -1;
            int pid = 0;
            char started[sizeof(r->stream_started)] = "";
            if (pgstream_session_id(r->pg, &pid, started, sizeof(started), r->err,
                                    sizeof(r->err)) < 0)
                log_debug("%s", r->err); /* only a later take-over is slower without it */
            rc = pgstream_start(r->pg, r->cfg->slot, r->cfg->publication, r->cfg->messages, start,
                                r->err,
                                sizeof(r->err));
            if (rc == 0) {
                if (standby)
                    log_info("took over replication slot \"%s\"", r->cfg->slot);
                atomic_store(&metrics.standby, 0);
                r->received = r->reported = start;
                /* After a failover this run's confirmed position may lie past the fork. */
                if (start > r->confirmed || r->confirmed_timeline != r->sys.timeline)
                    r->confirmed = start;
                r->confirmed_timeline = r->sys.timeline;
                r->checkpointed = r->confirmed;
                r->in_txn = false;
                r->next_status = now_mono_us();
                r->last_received = r->next_status;
                r->reply_asked = 0;
                r->stream_pid = pid;
                snprintf(r->stream_started, sizeof(r->stream_started), "%s", started);
                snprintf(r->stream_system, sizeof(r->stream_system), "%s", r->sys.system_id);
                log_info("streaming from slot \"%s\" at " LSN_FMT " to stream \"%s\"",
                         r->cfg->slot, LSN_ARGS(start), r->stream.name);
                notify_systemd("READY=1\nSTATUS=streaming");
                r->streaming = true;
                r->streaming_since = now_mono_us();
                return 0;
            }
            if (rc == PGSTREAM_SLOT_LOST) { /* invalidated since slot_info looked */
                log_warn("%s", r->err);
                report_slot_lost(r, info.confirmed);
                return SESSION_SLOT_LOST;
            }
            if (rc != PGSTREAM_SLOT_BUSY) {
                log_warn("%s", r->err);
                return -1;
            }
        }
        if (!standby) {
            if (info.active_pid)
                log_info("standby: replication slot \"%s\" is held by PID %d (another relay?); "
                         "taking over when it is released",
                         r->cfg->slot, info.active_pid);
            else
                log_info("standby: replication slot \"%s\" is busy; taking over when it is "
                         "released",
                         r->cfg->slot);
            standby = true;
            atomic_store(&metrics.standby, 1);
            /* Started and healthy: a standby is a successful start for systemd. */
            notify_systemd("READY=1\nSTATUS=standby: another relay holds the slot");
        }
        relay_nap(r, STANDBY_POLL_US);
    }
    return 1;
}

bool session_slot_lost(Relay *r)
{
    /* PostgreSQL terminates the session holding a slot before it marks the slot invalid: while
     * the slot looks "unreserved" (past max_slot_wal_keep_size), look again for a moment. */
    for (int look = 0; look < 10 && !*r->stop; look++) {
        if (look > 0)
            relay_nap(r, 200000);
        PgSlotInfo info;
        if (!r->monitor && pgstream_connect_plain(&r->monitor, r->cfg->pg_url, r->err,
                                                  sizeof(r->err)) != 0)
            return false;
        if (pgstream_slot_info(r->monitor, r->cfg->slot, &info, r->err, sizeof(r->err)) < 0) {
            pgstream_free(r->monitor); /* monitor_wal opens it again */
            r->monitor = NULL;
            return false;
        }
        if (info.exists && strcmp(info.wal_status, "lost") == 0) {
            report_slot_lost(r, info.confirmed);
            return true;
        }
        if (!info.exists || strcmp(info.wal_status, "unreserved") != 0)
            return false;
    }
    return false;
}

/* Reconnects after a lost connection, with backoff. The backoff goes on growing across
 * sessions that fail soon after connecting (see STABLE_SESSION_US). Returns 0, or 1 on stop. */
int session_reconnect(Relay *r)
{
    while (!*r->stop) {
        int64_t delay = reconnect_delay_us(r->cfg, r->reconnect_attempt);
        if (r->reconnect_attempt < 64)
            r->reconnect_attempt++;
        log_info("reconnecting to PostgreSQL in %" PRId64 " ms", delay / 1000);
        relay_nap(r, delay);
        if (*r->stop)
            break;
        int rc = session_connect(r);
        if (rc == 0)
            return 0;
        if ((rc == PGSTREAM_CHECK_FAILED && r->have_sys && strstr(r->err, "another system")) ||
            rc == SESSION_FATAL)
            return -1;
    }
    return 1;
}

/* After a lost connection: let every published event be acknowledged, so the session that
 * follows starts exactly after what is stored. */
void session_end(Relay *r)
{
    if (r->streaming && now_mono_us() - r->streaming_since >= STABLE_SESSION_US)
        r->reconnect_attempt = 0;
    atomic_store(&metrics.pg_connected, 0);
    r->streaming = false;
    pgstream_free(r->pg);
    r->pg = NULL;
    size_t left = relay_drain(r, INT64_MAX, true);
    if (left == 0 && r->have_last_sent && r->last_sent.lsn != 0)
        /* PostgreSQL resends from the confirmed position, a half-received transaction whole:
         * skip what is stored. */
        relay_stored_at_least(r, &r->last_sent);
    r->in_txn = false;
}

