/*
 * session.c - the relay's PostgreSQL sessions: connecting and checking, taking the slot or
 * standing by while another relay holds it, where streaming starts, and reconnecting.
 *
 * One relay streams from a slot at a time: PostgreSQL lets one session hold it, so a second
 * relay on the same slot waits as a standby (/readyz 503) and takes over when the slot is
 * released. Streaming starts at the slot's confirmed position, the server's own; what the
 * stream, the durable checkpoint and this run know to be stored past it is skipped by the
 * anchor rule (anchor.c), proven when the anchor's transaction comes again. After a lost
 * connection the relay lets every published event be acknowledged before it reconnects, so
 * this run's own anchor is exact. A connection that leads to another database system (the
 * address now names another cluster) stops the relay: its slot and checkpoint belong to the
 * old one. A connection the relay dropped because it went silent leaves its walsender holding
 * the slot until the server's wal_sender_timeout; the relay ends that process itself when it
 * can prove it is its own previous session (end_own_session).
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

/*
 * The checkpoint says a relay streamed from this system's slot, but the slot is gone: after a
 * failover to a standby that did not have it (PostgreSQL 15 and 16, or 17 without failover
 * slots), a new slot would start at the new primary's current position and every event
 * committed there in between would never be published. Not a decision to take alone.
 */
static int refuse_missing_slot(Relay *r, const Checkpoint *saved)
{
    if (saved->lsn == 0 || saved->backfill.active || !r->cfg->create)
        return 0;
    PgSlotInfo info;
    if (pgstream_slot_info(r->pg, r->cfg->slot, &info, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    if (info.exists)
        return 0;
    /* This run may have confirmed more than the stored checkpoint says (relay_load_checkpoint keeps
     * the later commit time): name the latest, so the runbook's recovery starts no earlier. */
    uint64_t lsn = saved->lsn > r->confirmed ? saved->lsn : r->confirmed;
    if (r->cfg->slot_recovery[0] == 'a') {
        char why[256];
        snprintf(why, sizeof(why), "replication slot \"%s\" does not exist on this server, but "
                 "the checkpoint says outboxd streamed from it up to " LSN_FMT " (a failover to a "
                 "standby without the slot)", r->cfg->slot, LSN_ARGS(lsn));
        return backfill_recover(r, why) == 0 ? 0 : SESSION_FATAL;
    }
    char when[32] = "(unknown)";
    if (r->cp.commit_time)
        pg_time_format_rfc3339(r->cp.commit_time, when);
    log_error("replication slot \"%s\" does not exist, but the checkpoint says outboxd streamed "
              "from it up to " LSN_FMT " (timeline %u, last transaction committed at %s): after a "
              "failover to a standby without the slot, a new slot would skip every event "
              "committed on this server since then. Choose: (1) to publish them, run outboxd "
              "recover --yes, then start outboxd: it makes the slot and publishes the rows "
              "committed since then that the stream lacks, in commit order, nothing twice (or "
              "run with --slot-recovery=auto to do that by itself); or (2) to accept the gap, "
              "run outboxd slot create and start outboxd. On PostgreSQL 17 and later, failover "
              "slots (--failover-slot, sync_replication_slots on the standby) keep the slot "
              "through a failover: see outboxd doctor",
              r->cfg->slot, LSN_ARGS(lsn), saved->timeline, when);
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
        /* Nothing is read from it and no slot made there: its positions say nothing of the
         * events this run relayed. */
        log_error("the database at --pg-url is another system now: system id %s, while this "
                  "relay streamed from system %s (a failover to a server that is not a standby "
                  "of it, or the address now leads to another cluster). Stopping: the slot and "
                  "the checkpoint belong to system %s. Check where --pg-url leads; to relay from "
                  "the new system, start outboxd again (it makes its own slot there)",
                  sys.system_id, r->sys.system_id, r->sys.system_id);
        rc = SESSION_FATAL;
        goto fail;
    }
    if (!r->have_sys)
        log_info("connected to PostgreSQL: system %s, timeline %u, database \"%s\"",
                 sys.system_id, sys.timeline, sys.dbname);
    r->sys = sys;
    r->have_sys = true;
    snprintf(r->checkpoint_key, sizeof(r->checkpoint_key), "%s.%s", sys.system_id, cfg->slot);
    anchor_source_format(sys.system_id, cfg->slot, r->source);
    outbox_mapper_set_source(r->mapper, r->source);
    Checkpoint saved;
    if (relay_load_checkpoint(r, &saved) < 0) {
        log_error("%s", r->err);
        rc = -1;
        goto fail;
    }
    if ((rc = refuse_missing_slot(r, &saved)) != 0)
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

/* Takes a as the anchor when it says more than the one chosen so far and the anchor rule
 * (anchor.c) lets it: on the server's timeline (cut to the fork when it is past it), within
 * the server's WAL, and not before start (then it skips nothing). */
static void consider_anchor(Relay *r, Anchor a, uint64_t start)
{
    if (a.pos.timeline != r->sys.timeline) {
        uint64_t at;
        int rc = on_this_timeline(r, a.pos.timeline, a.pos.lsn, &at);
        if (rc != 0) {
            log_warn("%s says events up to position %u " LSN_FMT " %u are stored, on timeline "
                     "%u, which %s: not skipping by it",
                     a.from, a.pos.timeline, LSN_ARGS(a.pos.lsn), a.pos.index, a.pos.timeline,
                     rc > 0 ? "is not in this server's history" : "could not be looked up");
            return;
        }
        if (at < a.pos.lsn || (at == a.pos.lsn && a.pos.index == UINT32_MAX)) {
            /* Events past the fork were published from the old primary: the new one may not
             * have them, and its own transactions after the fork must all go out. Up to the
             * fork, the server's history proves the anchor. */
            log_warn("%s holds events of timeline %u up to " LSN_FMT ", past the point where "
                     "that timeline forked (" LSN_FMT ") into this server's timeline %u: "
                     "transactions the old primary committed after the fork and published are "
                     "not on this server (see \"Failover\" in docs/operations.md); every transaction of "
                     "this server after the fork is published",
                     a.from, a.pos.timeline, LSN_ARGS(a.pos.lsn), LSN_ARGS(at), r->sys.timeline);
            a.pos = (OutboxPosition){.lsn = at - 1, .index = UINT32_MAX};
            a.commit_time = 0;
        }
        a.pos.timeline = r->sys.timeline;
    }
    if (a.pos.lsn > r->sys.xlogpos) {
        log_warn("%s says events up to position %u " LSN_FMT " %u are stored, past the end of "
                 "this server's WAL (" LSN_FMT "): was the database restored from an older "
                 "backup or snapshot? not skipping by it",
                 a.from, a.pos.timeline, LSN_ARGS(a.pos.lsn), a.pos.index,
                 LSN_ARGS(r->sys.xlogpos));
        return;
    }
    if (a.pos.lsn < start)
        return; /* PostgreSQL sends nothing it covers */
    if (!r->have_anchor || outbox_position_cmp(&a.pos, &r->anchor.pos) > 0) {
        r->anchor = a;
        r->have_anchor = true;
    }
}

/*
 * Chooses what to skip from where streaming starts (the slot's position): the newest of this
 * run's own anchor, the checkpoint's last confirmed transaction and, with --strict-order, the
 * stream's newest event of this relay's (read at every start: a standby taking over, a
 * restart, a reconnect), each as anchor.c's rule lets it. After an anchor proved false in this
 * run only this run's own are used.
 */
static void choose_anchor(Relay *r, const Checkpoint *saved, uint64_t start)
{
    r->have_anchor = r->proving = false;
    if (r->have_run_stored)
        consider_anchor(r, r->run_stored, start);
    if (r->distrust)
        goto chosen;
    /* Its last transaction lies before its position, unless the position was moved back
     * since (outboxd rewind): then it is no anchor. */
    if (saved->commit_lsn && saved->commit_time && saved->commit_lsn < saved->lsn)
        consider_anchor(r,
                        (Anchor){.pos = {.timeline = saved->timeline,
                                         .lsn = saved->commit_lsn,
                                         .index = UINT32_MAX},
                                 .commit_time = saved->commit_time,
                                 .from = "the checkpoint"},
                        start);
    if (!r->cfg->strict_order)
        goto chosen;
    JsOwnEvent last;
    int rc = publisher_stream_position(r->pub, r->source, &last, r->err, sizeof(r->err));
    if (rc < 0)
        log_warn("could not read the stream's last event: %s; events after the slot's position "
                 "that are not proven stored otherwise are sent again, and JetStream drops those "
                 "inside its duplicate window",
                 r->err);
    else if (rc == 0)
        log_info("stream \"%s\" holds no event of this relay's (source %s) among its last "
                 "messages",
                 r->stream.name, r->source);
    else
        consider_anchor(r, last.anchor, start);
chosen:
    if (!r->have_anchor)
        return;
    r->proving = r->anchor.commit_time != 0;
    char t[32] = "";
    if (r->anchor.commit_time)
        pg_time_format_rfc3339(r->anchor.commit_time, t);
    log_info("%s holds every event up to position %u " LSN_FMT " %u: nothing up to it is "
             "published again%s%s%s",
             r->anchor.from, r->anchor.pos.timeline, LSN_ARGS(r->anchor.pos.lsn),
             r->anchor.pos.index,
             r->proving ? " once its transaction (committed at " : " (proven by the server's "
                                                                   "timeline history)",
             t, r->proving ? ") is met in the WAL; until then nothing is confirmed" : "");
}

void session_distrust_anchors(Relay *r)
{
    r->distrust = true;
    r->have_anchor = r->proving = false;
    r->have_run_stored = r->have_last_sent = false;
    /* The checkpoint must not name the false transaction to the next start either. */
    r->cp.commit_lsn = 0;
    relay_checkpoint_put(r);
}

/* Where to start: the slot's confirmed position, the server's own (anchor.c, rule 4); what is
 * stored past it is skipped by the anchor choose_anchor() takes. */
static void start_position(Relay *r, uint64_t slot_confirmed)
{
    /* Read again at every start: while this relay stood by, the one that held the slot moved
     * it on (and may have finished a backfill). */
    Checkpoint saved;
    if (relay_load_checkpoint(r, &saved) < 0) {
        log_warn("%s; not using the checkpoint", r->err);
        memset(&saved, 0, sizeof(saved));
    }
    choose_anchor(r, &saved, slot_confirmed);
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
            uint64_t start = info.confirmed;
            start_position(r, start);
            if (backfill_unfinished(r))
                return SESSION_BACKFILL_UNFINISHED;
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
                /* Only what the server holds: what this run confirmed before may lie past a
                 * fork, or in a history the server no longer has. */
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

int session_recover_lost(Relay *r)
{
    if (r->cfg->slot_recovery[0] != 'a')
        return -1;
    /* PostgreSQL ends the session holding a slot it invalidates: wait for that, then drop it. */
    for (int tries = 0; !*r->stop; tries++) {
        PgStream *pg = r->pg ? r->pg : r->monitor;
        if (!pg && pgstream_connect_plain(&r->monitor, r->cfg->pg_url, r->err,
                                          sizeof(r->err)) != 0) {
            log_error("recovery: %s", r->err);
            return -1;
        }
        pg = r->pg ? r->pg : r->monitor;
        if (pgstream_drop_slot(pg, r->cfg->slot, r->err, sizeof(r->err)) == 0)
            break;
        if (tries == 20) {
            log_error("recovery: could not drop the lost slot: %s", r->err);
            return -1;
        }
        relay_nap(r, 250000);
    }
    if (*r->stop || backfill_recover(r, "the replication slot is lost") < 0)
        return -1;
    atomic_store(&metrics.slot_lost, 0);
    return 0;
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
            pgstream_free(r->monitor); /* opened again when next needed */
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
        int64_t delay = backoff_jitter_us(r->cfg->retry_min_ms * 1000, r->cfg->retry_max_ms * 1000,
                                          r->reconnect_attempt);
        if (r->reconnect_attempt < 64)
            r->reconnect_attempt++;
        log_info("reconnecting to PostgreSQL in %" PRId64 " ms", delay / 1000);
        relay_nap(r, delay);
        if (*r->stop)
            break;
        int rc = session_connect(r);
        if (rc == 0)
            return 0;
        if (rc == SESSION_FATAL)
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
    if (left == 0 && r->have_last_sent && r->last_sent.pos.lsn != 0)
        /* PostgreSQL resends from the slot's position, a half-received transaction whole:
         * skip what is stored. */
        relay_stored_at_least(r, &r->last_sent);
    r->in_txn = false;
}

