/*
 * relay.c - the pipeline, and when an LSN may be confirmed: the bottom of the relay's layers
 * (run.c), holding its state and the primitives the rooms above use.
 *
 * The rule: the relay reports to PostgreSQL as flushed
 *   - the end LSN of a transaction, once JetStream acknowledged every event of it and of every
 *     earlier transaction (confirming its commit LSN instead would make the whole transaction
 *     come again after a restart);
 *   - a keepalive's WAL position received between transactions, once every event received
 *     before it is acknowledged: PostgreSQL sends nothing for transactions that touch no
 *     published table, so without this a quiet outbox in a busy database pins WAL forever.
 * Both are "marks": (lsn, seq_limit), confirmable once every event with a sequence number below
 * seq_limit is acknowledged. Marks are queued in WAL order, so the confirmed LSN only grows,
 * and it never passes an event that is not stored: after a crash PostgreSQL resends from it.
 *
 * PostgreSQL 15 does not write a slot's confirmed position to disk when only that position
 * moved, so after a database restart the slot can come back older than what was published. The
 * confirmed LSN and the last confirmed transaction are therefore also kept in a JetStream
 * key-value bucket (the checkpoint, keyed by system id and slot). Streaming starts at the
 * slot's position all the same; what the checkpoint, the stream or this run know to be stored
 * past it is skipped by the anchor rule (anchor.c), proven when its transaction comes again:
 * until then next_event() skips and nothing is confirmed.
 *
 * Silent connections: a NAT entry, a load balancer's idle timeout or a partition can leave the
 * replication connection open with nothing arriving and no FIN. relay_stream() judges it the way
 * PostgreSQL's walreceiver does with wal_receiver_timeout (--pg-receive-timeout): after half
 * the timeout without a message it asks the server for a reply (a status update with reply
 * requested, which the walsender answers at once), and when nothing arrived by the end (and the
 * request had half the timeout to be answered) it drops the connection and the reconnect path
 * below takes over. While the publish window is full the relay does not read the socket; bytes
 * waiting there count as a live connection. The walsender of the dropped connection may hold
 * the slot until its own wal_sender_timeout; session_acquire_slot ends it when it can prove it
 * is this relay's previous session.
 *
 * Failures: a lost PostgreSQL connection ends the session; the relay lets every published
 * event be acknowledged, reconnects with backoff, and resumes at the slot's position, skipping
 * the events this run saw stored, inside a half-received transaction too. NATS failures are handled
 * inside the publisher (pause, backoff, resend) while this loop keeps PostgreSQL's status
 * updates flowing. A row that can never become an event goes to the dead-letter subject in its
 * place, or stops the relay (--on-poison=stop) without confirming anything past it.
 *
 * One thread does everything here; nats.c's reader thread queues publish acknowledgements, and
 * the publisher takes them in on this thread in publisher_poll(). This thread waits for nothing
 * but its own work: the WAL position for the lag gauge and the bookmarks, synchronous queries,
 * are made by the monitoring thread (monitor.c); the checkpoint is written without waiting for
 * its answer; consumer lag has a thread of its own (consumers.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/notify.h"
#include "relay_internal.h"

static void marks_push(Ring *m, uint64_t lsn, uint64_t seq_limit, int64_t commit_time,
                       uint64_t commit_lsn)
{
    Mark *last = ring_back(m);
    if (last && last->seq_limit == seq_limit) { /* nothing published in between: one mark */
        if (lsn > last->lsn)
            last->lsn = lsn;
        if (commit_time) {
            last->commit_time = commit_time;
            last->commit_lsn = commit_lsn;
        }
        return;
    }
    *(Mark *)ring_push(m, sizeof(Mark)) = (Mark){lsn, seq_limit, commit_time, commit_lsn};
}

/* Pops every mark that the acknowledged prefix covers; returns the newest such LSN or 0, and
 * moves the checkpoint's last confirmed transaction (commit time and LSN) on to the newest
 * among them. */
static uint64_t marks_release(Ring *m, uint64_t first_unacked, Checkpoint *cp)
{
    uint64_t lsn = 0;
    for (Mark *front; (front = ring_front(m)) && front->seq_limit <= first_unacked; ring_pop(m)) {
        if (front->lsn > lsn)
            lsn = front->lsn;
        if (front->commit_lsn && front->commit_lsn >= cp->commit_lsn) {
            cp->commit_time = front->commit_time;
            cp->commit_lsn = front->commit_lsn;
        }
    }
    return lsn;
}

/* ---- confirming ------------------------------------------------------------------------------ */

int relay_send_status(Relay *r, bool reply)
{
    if (r->received < r->confirmed)
        r->received = r->confirmed;
    if (pgstream_send_status(r->pg, r->received, r->confirmed, reply, r->err, sizeof(r->err)) <
        0) {
        log_warn("%s", r->err);
        return -1;
    }
    if (r->confirmed != r->reported)
        log_debug("confirmed " LSN_FMT, LSN_ARGS(r->confirmed));
    r->reported = r->confirmed;
    atomic_store_explicit(&metrics.confirmed_lsn, r->confirmed, memory_order_relaxed);
    r->next_status = now_mono_us() + r->status_interval_us;
    return 0;
}

int relay_load_checkpoint(Relay *r, Checkpoint *saved)
{
    if (publisher_checkpoint_get(r->pub, r->checkpoint_key, saved, r->err, sizeof(r->err)) < 0)
        return -1;
    r->cp.backfill = saved->backfill;
    if (saved->commit_time > r->cp.commit_time) {
        r->cp.commit_time = saved->commit_time;
        r->cp.commit_lsn = saved->commit_lsn;
    }
    return 0;
}

/* The checkpoint as it stands now: the confirmed position, where and when it was reached. */
static const Checkpoint *current_checkpoint(Relay *r)
{
    Checkpoint *c = &r->cp;
    c->lsn = r->confirmed;
    c->timeline = r->confirmed_timeline; /* the one confirmed was reached on */
    snprintf(c->system, sizeof(c->system), "%s", r->sys.system_id);
    snprintf(c->slot, sizeof(c->slot), "%s", r->cfg->slot);
    return c;
}

int relay_checkpoint_put(Relay *r)
{
    if (publisher_checkpoint_put(r->pub, r->checkpoint_key, current_checkpoint(r), r->err,
                                 sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    return 0;
}

static void checkpoint_async(Relay *r, int64_t now)
{
    if (r->confirmed > r->checkpointed && now >= r->next_checkpoint) {
        publisher_checkpoint_put_async(r->pub, r->checkpoint_key, current_checkpoint(r));
        r->checkpointed = r->confirmed;
        r->next_checkpoint = now + r->cfg->checkpoint_interval_ms * 1000;
    }
}

/* Takes in acknowledgements; returns -1 when an event can never be published and the relay
 * must stop (logged). */
int relay_poll_acks(Relay *r, int64_t now, PublisherStatus *st)
{
    publisher_poll(r->pub, now, st);
    uint64_t lsn = marks_release(&r->marks, st->first_unacked, &r->cp);
    if (lsn > r->confirmed)
        r->confirmed = lsn;
    if (st->failed) {
        log_error("could not publish %s; stopping, nothing after it is confirmed", st->failure);
        return -1;
    }
    return 0;
}

/* ---- rows -------------------------------------------------------------------------------------- */

static const char *const reject_reasons[] = {
    [OUTBOX_INVALID_EVENT_ID] = "invalid_event_id",
    [OUTBOX_NULL_PAYLOAD] = "null_payload",
    [OUTBOX_INVALID_SUBJECT] = "invalid_subject",
    [OUTBOX_INVALID_ENVELOPE] = "invalid_envelope",
};
static const DeadLetterReason reject_metric[] = {
    [OUTBOX_INVALID_EVENT_ID] = DLR_INVALID_EVENT_ID,
    [OUTBOX_NULL_PAYLOAD] = DLR_NULL_PAYLOAD,
    [OUTBOX_INVALID_SUBJECT] = DLR_INVALID_SUBJECT,
    [OUTBOX_INVALID_ENVELOPE] = DLR_INVALID_ENVELOPE,
};

/* A row that can never be published: dead-letter it in its place, or stop. */
static int poison(Relay *r, DeadLetter *dl, DeadLetterReason metric)
{
    char id[80];
    snprintf(id, sizeof(id), "%.*s", dl->event_id ? (int)min64((int64_t)dl->event_id_len, 64) : 4,
             dl->event_id ? dl->event_id : "null");
    if (strcmp(r->cfg->on_poison, "stop") == 0) {
        log_error("could not relay event %s (row %u of the transaction committed at " LSN_FMT
                  " in %s): %s; stopping as --on-poison=stop asks, nothing after it is confirmed",
                  id, dl->index, LSN_ARGS(dl->commit_lsn), dl->table, dl->detail);
        return -1;
    }
    dl->source = r->source;
    outbox_dead_letter(&r->dlq, r->cfg->dead_letter_subject, dl, publisher_max_body(r->pub));
    uint64_t seq;
    if (publisher_publish(r->pub, &r->dlq, true, &seq, r->err, sizeof(r->err)) != 0) {
        log_error("could not dead-letter event %s: %s", id, r->err);
        return -1;
    }
    metrics_dead_letter(metric);
    log_warn("dead-lettered event %s (row %u of the transaction committed at " LSN_FMT
             " in %s) to %s: %s",
             id, dl->index, LSN_ARGS(dl->commit_lsn), dl->table, r->cfg->dead_letter_subject,
             dl->detail);
    return 0;
}

/* Fills a dead letter from the row or message an event came from. */
typedef void Describe(OutboxMapper *m, const PgoMessage *msg, const OutboxTxn *txn,
                      uint32_t index, DeadLetter *dl);

/* Publishes r->ev, mapped from m, the index-th event of its transaction; a rejected mapping
 * or an event the server can never take goes to poison(). */
static int publish_event(Relay *r, OutboxReject rej, const PgoMessage *m, Describe *describe,
                         uint32_t index)
{
    if (rej == OUTBOX_UNKNOWN_RELATION) {
        log_error("%s", r->err);
        return -1;
    }
    DeadLetter dl;
    if (rej != OUTBOX_OK) {
        describe(r->mapper, m, &r->txn, index, &dl);
        dl.timeline = r->txn.timeline;
        dl.reason = reject_reasons[rej];
        dl.detail = r->err;
        return poison(r, &dl, reject_metric[rej]);
    }
    uint64_t seq;
    int rc = publisher_publish(r->pub, &r->ev, false, &seq, r->err, sizeof(r->err));
    if (rc == PUBLISH_UNPUBLISHABLE) {
        describe(r->mapper, m, &r->txn, index, &dl);
        dl = (DeadLetter){
            .reason = "too_large",
            .detail = r->err,
            .table = dl.table,
            .event_id = r->ev.msg_id,
            .event_id_len = strlen(r->ev.msg_id),
            .subject = r->ev.subject.data,
            .body = r->ev.body,
            .body_len = r->ev.body_len,
            .commit_lsn = r->txn.commit_lsn,
            .commit_time = r->txn.commit_time,
            .index = index,
            .timeline = r->txn.timeline,
        };
        return poison(r, &dl, DLR_TOO_LARGE);
    }
    if (rc != 0) {
        log_error("could not publish event %s (commit LSN " LSN_FMT "): %s", r->ev.msg_id,
                  LSN_ARGS(r->txn.commit_lsn), r->err);
        return -1;
    }
    return 0;
}

void relay_stored_at_least(Relay *r, const Anchor *a)
{
    if (!r->have_run_stored || r->run_stored.pos.timeline != a->pos.timeline ||
        outbox_position_cmp(&a->pos, &r->run_stored.pos) > 0)
        r->run_stored = *a;
    r->run_stored.from = "this run";
    r->have_run_stored = true;
}

/* The position of the next event in its transaction; false when the stream holds it already
 * (skip it): PostgreSQL resends from the slot's position, which can lie before events that
 * are stored — inside a transaction too. The anchor (anchor.h) says which. */
static bool next_event(Relay *r, uint32_t *index)
{
    *index = r->txn_rows++;
    r->txn.index = *index;
    OutboxPosition pos = {.timeline = r->txn.timeline, .lsn = r->txn.commit_lsn, .index = *index};
    if (r->have_anchor && !r->backfilling && anchor_covers(&r->anchor, &pos)) {
        atomic_fetch_add_explicit(&metrics.events_skipped_stored, 1, memory_order_relaxed);
        return false;
    }
    r->last_sent = (Anchor){.pos = pos, .commit_time = r->txn.commit_time};
    r->have_last_sent = true;
    return true;
}

/* The anchor is false: the WAL is another history than the one it came from. */
static int anchor_false(Relay *r, const char *how)
{
    char t[32];
    pg_time_format_rfc3339(r->anchor.commit_time, t);
    log_warn("%s said every event up to position %u " LSN_FMT " %u (a transaction committed at "
             "%s) is stored, but %s: this database's WAL is not the history that position came "
             "from (restored from a backup or snapshot?). Trusting no such position again in "
             "this run: every event after the slot's position " LSN_FMT " is published (JetStream "
             "drops those it holds within its duplicate window)",
             r->anchor.from, r->anchor.pos.timeline, LSN_ARGS(r->anchor.pos.lsn),
             r->anchor.pos.index, t, how, LSN_ARGS(r->confirmed));
    atomic_fetch_add_explicit(&metrics.anchors_false, 1, memory_order_relaxed);
    return -2;
}

int relay_handle_insert(Relay *r, const PgoMessage *m)
{
    uint32_t index;
    if (!outbox_mapper_is_outbox(r->mapper, m->u.insert.relid) || !next_event(r, &index))
        return 0;
    OutboxReject rej = outbox_map_insert(r->mapper, m, &r->txn, &r->ev, r->err, sizeof(r->err));
    return publish_event(r, rej, m, outbox_describe_row, index);
}

/* A logical decoding message: a table-less event when it carries the events' prefix. */
static int handle_message(Relay *r, const PgoMessage *m)
{
    if (!outbox_mapper_wants_message(r->mapper, m))
        return 0;
    if (!(m->u.message.flags & 1) || !r->in_txn) {
        /* pg_logical_emit_message(false, ...) is written at once, even by a transaction that
         * rolls back later: publishing it could publish an event that never happened. */
        atomic_fetch_add_explicit(&metrics.messages_refused, 1, memory_order_relaxed);
        log_warn("ignored a non-transactional message with prefix \"%s\" at " LSN_FMT
                 ": it escapes rollback, so it is never published; emit events with "
                 "pg_logical_emit_message(true, ...) or outbox_emit()",
                 m->u.message.prefix, LSN_ARGS(m->u.message.lsn));
        return 0;
    }
    uint32_t index;
    if (!next_event(r, &index))
        return 0;
    OutboxReject rej = outbox_map_message(r->mapper, m, &r->txn, &r->ev, r->err, sizeof(r->err));
    return publish_event(r, rej, m, outbox_describe_message, index);
}

static int handle_xlogdata(Relay *r, const PgCopyMsg *cm)
{
    if (cm->wal_start > r->received)
        r->received = cm->wal_start;
    PgoMessage *m = r->msg;
    if (pgoutput_decode(cm->data, cm->len, m, r->err, sizeof(r->err)) < 0) {
        log_error("could not decode the replication message at " LSN_FMT ": %s",
                  LSN_ARGS(cm->wal_start), r->err);
        return -1;
    }
    switch (m->kind) {
    case PGO_BEGIN:
        r->in_txn = true;
        r->txn.commit_lsn = m->u.begin.final_lsn;
        r->txn.commit_time = m->u.begin.commit_time;
        r->txn.timeline = r->sys.timeline;
        r->txn_rows = 0;
        if (r->proving) {
            AnchorVerdict v = anchor_on_begin(&r->anchor, m->u.begin.final_lsn,
                                              m->u.begin.commit_time);
            if (v == ANCHOR_FALSE) {
                char how[160], t[32];
                pg_time_format_rfc3339(m->u.begin.commit_time, t);
                snprintf(how, sizeof(how), "the WAL holds a transaction committed at " LSN_FMT
                         " (at %s) and not that one", LSN_ARGS(m->u.begin.final_lsn), t);
                return anchor_false(r, how);
            }
            if (v == ANCHOR_MET) {
                r->proving = false;
                log_info("met the transaction at " LSN_FMT " that %s ends with: the events "
                         "before it were stored, as skipped",
                         LSN_ARGS(r->anchor.pos.lsn), r->anchor.from);
            }
        }
        return 0;
    case PGO_COMMIT:
        r->in_txn = false;
        if (m->u.commit.end_lsn > r->received)
            r->received = m->u.commit.end_lsn;
        if (r->proving) /* confirm nothing a skip that is not yet proven covers */
            return 0;
        marks_push(&r->marks, m->u.commit.end_lsn, publisher_next_seq(r->pub),
                   m->u.commit.commit_time, m->u.commit.commit_lsn);
        atomic_store_explicit(&metrics.last_commit_unix_us,
                              pg_time_to_unix_us(m->u.commit.commit_time), memory_order_relaxed);
        return 0;
    case PGO_RELATION:
        if (outbox_mapper_relation(r->mapper, m, r->err, sizeof(r->err)) < 0) {
            log_error("the outbox table changed and can no longer be relayed: %s", r->err);
            return -1;
        }
        return 0;
    case PGO_INSERT:
        return relay_handle_insert(r, m);
    case PGO_MESSAGE:
        return handle_message(r, m);
    default: /* updates, deletes, truncates, types, origins: nothing to publish */
        return 0;
    }
}

static int handle_copy(Relay *r, const char *buf, size_t len, bool *reply)
{
    PgCopyMsg cm;
    if (pgcopy_decode(buf, len, &cm, r->err, sizeof(r->err)) < 0) {
        log_error("could not decode the replication stream: %s", r->err);
        return -1;
    }
    if (cm.kind == PG_COPY_XLOGDATA)
        return handle_xlogdata(r, &cm);
    /* A keepalive: everything before its position was received. Between transactions that
     * position is confirmable once the events before it are acknowledged. */
    if (cm.wal_end > r->received)
        r->received = cm.wal_end;
    if (cm.wal_end > atomic_load_explicit(&metrics.server_wal_lsn, memory_order_relaxed))
        atomic_store_explicit(&metrics.server_wal_lsn, cm.wal_end, memory_order_relaxed);
    if (r->proving && !r->in_txn &&
        anchor_on_keepalive(&r->anchor, cm.wal_end) == ANCHOR_FALSE) {
        char how[96];
        snprintf(how, sizeof(how), "the server's WAL went past it to " LSN_FMT " without it",
                 LSN_ARGS(cm.wal_end));
        return anchor_false(r, how);
    }
    if (!r->in_txn && !r->proving)
        marks_push(&r->marks, cm.wal_end, publisher_next_seq(r->pub), 0, 0);
    if (cm.reply_requested)
        *reply = true;
    return 0;
}

/* ---- the loop ---------------------------------------------------------------------------------- */

/* Waits for the PostgreSQL socket (when want_pg), a change of the NATS connection or the
 * deadline (publisher_next_deadline() brings it close while acknowledgements are due);
 * *pg_ready tells whether the socket has data. */
int relay_wait_for_work(Relay *r, bool want_pg, int64_t deadline, bool *pg_ready)
{
    publisher_flush(r->pub); /* nothing published waits while this thread sleeps */
    struct pollfd fds[2] = {
        {.fd = publisher_wake_fd(r->pub), .events = POLLIN},
        {.fd = want_pg ? pgstream_socket(r->pg) : -1, .events = POLLIN},
    };
    int n = poll_until(fds, want_pg ? 2 : 1, deadline);
    *pg_ready = false;
    if (n < 0) {
        if (errno == EINTR)
            return 0;
        log_error("could not wait for events: %s", strerror(errno));
        return -1;
    }
    if (fds[0].revents)
        publisher_rearm(r->pub);
    *pg_ready = want_pg && fds[1].revents != 0;
    return 0;
}

static void summary(Relay *r, int64_t now, const PublisherStatus *st)
{
    if (now < r->next_summary)
        return;
    uint64_t published = atomic_load(&metrics.events_published);
    uint64_t n = published - r->summary_events;
    int64_t oldest = atomic_load(&metrics.oldest_pending_unix_us);
    double age = oldest ? (double)(now_unix_us() - oldest) / 1e6 : 0;
    uint64_t server = atomic_load(&metrics.server_wal_lsn);
    log_info("relayed %" PRIu64 " events in the last %" PRId64 " s (%.0f/s); confirmed " LSN_FMT
             ", lag %" PRIu64 " bytes, oldest pending %.1f s, %zu in flight%s",
             n, SUMMARY_US / 1000000, (double)n * 1e6 / SUMMARY_US, LSN_ARGS(r->confirmed),
             server > r->confirmed ? server - r->confirmed : 0, age, st->inflight,
             st->paused ? ", publishing paused" : "");
    r->summary_events = published;
    r->next_summary = now + SUMMARY_US;
}

/* Judges whether the replication connection went silent (see the top of the file); -1 when it
 * did, or the reply request could not be sent (logged). */
static int check_silence(Relay *r, int64_t now)
{
    int64_t timeout = r->cfg->pg_receive_timeout_ms * 1000;
    switch (pgstream_liveness(now, r->last_received, r->reply_asked, timeout)) {
    case PG_LIVE:
        return 0;
    case PG_ASK_REPLY:
        r->reply_asked = now;
        log_debug("nothing from PostgreSQL for %" PRId64 " ms: asking for a reply",
                  (now - r->last_received) / 1000);
        return relay_send_status(r, true);
    case PG_SILENT:
        break;
    }
    if (pgstream_readable(r->pg)) { /* bytes wait unread (the window is full): alive */
        r->last_received = now;
        return 0;
    }
    log_warn("nothing from PostgreSQL for %" PRId64 " ms, not even the reply asked for %" PRId64
             " ms ago: the replication connection is silent (a NAT entry or load balancer "
             "that dropped it, or a network partition); dropping it (--pg-receive-timeout)",
             (now - r->last_received) / 1000, (now - r->reply_asked) / 1000);
    /* The monitoring session most likely went the same way: open it afresh when needed. */
    pgstream_free(r->monitor);
    r->monitor = NULL;
    return -1;
}

/*
 * Streams until stop, a lost connection or a fatal failure.
 *
 * Wake-ups are what a live relay spends its CPU on (each costs a pair of context switches, and
 * on a virtual machine these are dear), and what it writes to NATS costs nats-server one wake-up
 * and the relay's reader thread one more for the answers. PostgreSQL's walsender sends every
 * change of a transaction with a send() of its own, so the rows of one transaction arrive in
 * several pieces and woke the relay for each: eight wake-ups for a transaction of ten rows. When
 * a read ends inside a transaction and the socket holds nothing more yet, the relay now sleeps
 * TXN_HOLD_US without watching the socket and then reads everything that came meanwhile (while
 * the socket has data, as in a backlog or a large transaction, it reads on without sleeping),
 * and the transaction's events are held
 * back (publisher_hold) until its Commit, or until TXN_HOLD_US passed without more data, and go
 * to NATS in one write: they all committed at the same moment, and the rest of the transaction
 * follows within microseconds. A transaction costs two wake-ups, whatever its size.
 */
StreamEnd relay_stream(Relay *r)
{
    PublisherStatus st;
    int64_t last_data = 0; /* when PostgreSQL last sent something */
    while (!*r->stop) {
        bool reply = false;
        bool more = false;    /* stopped at BATCH: libpq may still hold complete messages */
        bool drained = false; /* libpq holds no complete message: the socket may be read */
        int i = 0;
        for (; publisher_has_room(r->pub); i++) {
            if (i == BATCH) {
                more = true;
                break;
            }
            const char *buf;
            size_t len;
            int got = pgstream_read(r->pg, &buf, &len, r->err, sizeof(r->err));
            if (got < 0) {
                log_warn("%s", r->err);
                return STREAM_PG_LOST;
            }
            if (got == 0) {
                drained = true;
                break;
            }
            int rc = handle_copy(r, buf, len, &reply);
            if (rc < 0)
                return rc == -2 ? STREAM_ANCHOR_FALSE : STREAM_FATAL;
        }
        int64_t now = now_mono_us();
        if (i > 0) /* i messages were read */
            last_data = r->last_received = now;
        bool hold = r->in_txn && now - last_data < TXN_HOLD_US && publisher_has_room(r->pub);
        publisher_hold(r->pub, hold);
        metrics_beat(now);
        if (relay_poll_acks(r, now, &st) < 0)
            return STREAM_FATAL;
        if (reply || now >= r->next_status) {
            if (relay_send_status(r, false) < 0)
                return STREAM_PG_LOST;
        }
        if (check_silence(r, now) < 0)
            return STREAM_PG_LOST;
        checkpoint_async(r, now);
        summary(r, now, &st);
        if (more)
            continue;
        bool want_pg = publisher_has_room(r->pub);
        /* Room came back while libpq still holds complete messages (the window was full): read
         * those first. Reading the socket now would make libpq grow its buffer to hold both,
         * doubling it again and again over a long backlog. */
        if (want_pg && !drained)
            continue;
        if (want_pg && hold && i > 0) {
            /* The read ended inside a transaction: take what the socket holds already (a
             * backlog, a large transaction) before sleeping for the rest. */
            if (pgstream_consume(r->pg, r->err, sizeof(r->err)) < 0) {
                log_warn("%s", r->err);
                return STREAM_PG_LOST;
            }
            continue;
        }
        int64_t deadline = min64(r->next_status, publisher_next_deadline(r->pub));
        deadline = min64(deadline, pgstream_liveness_deadline(r->last_received, r->reply_asked,
                                                              r->cfg->pg_receive_timeout_ms * 1000));
        /* Holding a transaction: sleep without the socket, so that the pieces the walsender
         * sends meanwhile wake nobody, then read all of them at once. */
        if (hold)
            deadline = min64(deadline, last_data + TXN_HOLD_US);
        bool pg_ready;
        if (relay_wait_for_work(r, want_pg && !hold, deadline, &pg_ready) < 0)
            return STREAM_FATAL;
        if ((pg_ready || (want_pg && hold)) && pgstream_consume(r->pg, r->err, sizeof(r->err)) < 0) {
            log_warn("%s", r->err);
            return STREAM_PG_LOST;
        }
    }
    return STREAM_STOPPED;
}

/*
 * Waits until every published event is acknowledged (or, with a deadline, until then), keeping
 * status updates flowing when a stream is open. Returns the number still in flight.
 */
size_t relay_drain(Relay *r, int64_t deadline, bool until_stop)
{
    PublisherStatus st;
    for (;;) {
        int64_t now = now_mono_us();
        metrics_beat(now);
        if (relay_poll_acks(r, now, &st) < 0 || st.inflight == 0 || now >= deadline)
            return st.inflight;
        if (until_stop && *r->stop)
            return st.inflight;
        if (r->streaming && now >= r->next_status)
            relay_send_status(r, false);
        bool pg_ready;
        int64_t next = min64(deadline, publisher_next_deadline(r->pub));
        if (r->streaming)
            next = min64(next, r->next_status);
        relay_wait_for_work(r, false, next, &pg_ready);
    }
}

/* Sleeps up to us, waking early for a stop request. */
void relay_nap(Relay *r, int64_t us)
{
    int64_t until = now_mono_us() + us;
    while (!*r->stop && now_mono_us() < until) {
        bool pg_ready;
        PublisherStatus st;
        metrics_beat(now_mono_us());
        relay_poll_acks(r, now_mono_us(), &st);
        relay_wait_for_work(r, false, min64(until, publisher_next_deadline(r->pub)), &pg_ready);
    }
}
