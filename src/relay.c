/*
 * relay.c - the pipeline, and when an LSN may be confirmed.
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
 * and it never passes an event that failed: after a crash PostgreSQL resends from it.
 *
 * One thread does everything here; only publish acknowledgements arrive on nats.c's thread,
 * and the publisher hides them behind publisher_poll().
 */
#include "outboxd/relay.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/log.h"
#include "outboxd/outbox.h"
#include "outboxd/pgoutput.h"
#include "outboxd/pgstream.h"
#include "outboxd/publisher.h"

/* Messages handled between two looks at acknowledgements and timers. */
#define BATCH 512

typedef struct Mark {
    uint64_t lsn;
    uint64_t seq_limit;
} Mark;

typedef struct Marks {
    Mark *v;
    size_t cap; /* a power of two */
    size_t head, tail;
} Marks;

typedef struct Relay {
    const Config *cfg;
    PgStream *pg;
    Publisher *pub;
    OutboxMapper *mapper;
    PgoMessage *msg; /* decoder scratch (large: reused for every message) */
    OutboxEvent ev;
    Marks marks;
    bool in_txn;
    OutboxTxn txn;
    uint64_t received;  /* newest WAL position received */
    uint64_t confirmed; /* newest position confirmable (and confirmed at the next update) */
    uint64_t reported;  /* flush position last sent */
    int64_t status_interval_us;
    int64_t next_status;
    uint64_t events;
    char err[1024];
} Relay;

static void marks_push(Marks *m, uint64_t lsn, uint64_t seq_limit)
{
    if (m->tail > m->head) {
        Mark *last = &m->v[(m->tail - 1) & (m->cap - 1)];
        if (last->seq_limit == seq_limit) { /* nothing published in between: one mark */
            if (lsn > last->lsn)
                last->lsn = lsn;
            return;
        }
    }
    if (m->tail - m->head == m->cap) {
        size_t ncap = m->cap ? m->cap * 2 : 1024;
        Mark *nv = xmalloc(ncap * sizeof(Mark));
        for (size_t i = m->head; i < m->tail; i++)
            nv[i - m->head] = m->v[i & (m->cap - 1)];
        free(m->v);
        m->tail -= m->head;
        m->head = 0;
        m->v = nv;
        m->cap = ncap;
    }
    m->v[m->tail++ & (m->cap - 1)] = (Mark){lsn, seq_limit};
}

/* Pops every mark that the acknowledged prefix covers; returns the newest such LSN or 0. */
static uint64_t marks_release(Marks *m, uint64_t first_unacked)
{
    uint64_t lsn = 0;
    while (m->head < m->tail) {
        Mark *front = &m->v[m->head & (m->cap - 1)];
        if (front->seq_limit > first_unacked)
            break;
        if (front->lsn > lsn)
            lsn = front->lsn;
        m->head++;
    }
    return lsn;
}

void relay_subject_filter(const char *tmpl, Buf *out)
{
    const char *p = tmpl;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (memchr(p, '{', n))
            buf_putc(out, '*');
        else
            buf_append(out, p, n);
        if (!dot)
            break;
        buf_putc(out, '.');
        p = dot + 1;
    }
}

static int check_columns(void *arg, const char *const *names, size_t n, char *err, size_t errlen)
{
    return outbox_mapper_check_columns(arg, names, n, err, errlen);
}

static int send_status(Relay *r, bool reply)
{
    if (r->received < r->confirmed)
        r->received = r->confirmed;
    if (pgstream_send_status(r->pg, r->received, r->confirmed, reply, r->err, sizeof(r->err)) <
        0) {
        log_error("%s", r->err);
        return -1;
    }
    if (r->confirmed != r->reported)
        log_debug("confirmed " LSN_FMT, LSN_ARGS(r->confirmed));
    r->reported = r->confirmed;
    r->next_status = now_mono_us() + r->status_interval_us;
    return 0;
}

/* Takes in acknowledgements; returns -1 when the oldest event failed (logged). */
static int poll_acks(Relay *r, int64_t now)
{
    PublisherStatus st;
    publisher_poll(r->pub, now, &st);
    uint64_t lsn = marks_release(&r->marks, st.first_unacked);
    if (lsn > r->confirmed)
        r->confirmed = lsn;
    if (st.failed) {
        log_error("could not publish %s", st.failure);
        return -1;
    }
    return 0;
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
        return 0;
    case PGO_COMMIT:
        r->in_txn = false;
        if (m->u.commit.end_lsn > r->received)
            r->received = m->u.commit.end_lsn;
        marks_push(&r->marks, m->u.commit.end_lsn, publisher_next_seq(r->pub));
        return 0;
    case PGO_RELATION:
        if (outbox_mapper_relation(r->mapper, m, r->err, sizeof(r->err)) < 0) {
            log_error("the outbox table changed and can no longer be relayed: %s", r->err);
            return -1;
        }
        return 0;
    case PGO_INSERT: {
        if (!outbox_mapper_is_outbox(r->mapper, m->u.insert.relid))
            return 0;
        if (outbox_map_insert(r->mapper, m, &r->txn, &r->ev, r->err, sizeof(r->err)) < 0) {
            log_error("could not relay a row of %s committed at " LSN_FMT
                      ": %s; nothing after it is confirmed",
                      outbox_mapper_qualified(r->mapper), LSN_ARGS(r->txn.commit_lsn), r->err);
            return -1;
        }
        uint64_t seq;
        int rc = publisher_publish(r->pub, &r->ev, &seq, r->err, sizeof(r->err));
        if (rc != 0) {
            log_error("could not publish event %s (commit LSN " LSN_FMT "): %s", r->ev.msg_id,
                      LSN_ARGS(r->txn.commit_lsn), r->err);
            return -1;
        }
        r->events++;
        return 0;
    }
    default: /* updates, deletes, truncates, types, origins, messages: nothing to publish */
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
    if (!r->in_txn)
        marks_push(&r->marks, cm.wal_end, publisher_next_seq(r->pub));
    if (cm.reply_requested)
        *reply = true;
    return 0;
}

static int64_t min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* Waits for the PostgreSQL socket (when want_pg), an acknowledgement or the deadline;
 * *pg_ready tells whether the socket has data. */
static int wait_for_work(Relay *r, bool want_pg, int64_t deadline, bool *pg_ready)
{
    struct pollfd fds[2] = {
        {.fd = publisher_wake_fd(r->pub), .events = POLLIN},
        {.fd = pgstream_socket(r->pg), .events = POLLIN},
    };
    int64_t wait = deadline - now_mono_us();
    int timeout = wait <= 0 ? 0 : (int)min64(wait / 1000 + 1, 1000);
    int n = poll(fds, want_pg ? 2 : 1, timeout);
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

/* Streams until stop or failure. Returns 0 on stop, -1 on failure. */
static int stream(Relay *r, volatile sig_atomic_t *stop)
{
    while (!*stop) {
        bool reply = false;
        bool more = false; /* libpq may still hold complete messages */
        for (int i = 0; publisher_has_room(r->pub); i++) {
            if (i == BATCH) {
                more = true;
                break;
            }
            const char *buf;
            size_t len;
            int got = pgstream_read(r->pg, &buf, &len, r->err, sizeof(r->err));
            if (got < 0) {
                log_error("%s", r->err);
                return -1;
            }
            if (got == 0)
                break;
            if (handle_copy(r, buf, len, &reply) < 0)
                return -1;
        }
        int64_t now = now_mono_us();
        if (poll_acks(r, now) < 0)
            return -1;
        if (reply || now >= r->next_status) {
            if (send_status(r, false) < 0)
                return -1;
        }
        if (more)
            continue;
        int64_t deadline = min64(r->next_status, publisher_next_deadline(r->pub));
        bool want_pg = publisher_has_room(r->pub);
        bool pg_ready;
        if (wait_for_work(r, want_pg, deadline, &pg_ready) < 0)
            return -1;
        if (pg_ready && pgstream_consume(r->pg, r->err, sizeof(r->err)) < 0) {
            log_error("%s", r->err);
            return -1;
        }
    }
    return 0;
}

/* On stop: wait a bounded time for outstanding acknowledgements, confirm, end the stream. */
static void drain(Relay *r)
{
    int64_t deadline = now_mono_us() + r->cfg->shutdown_timeout_ms * 1000;
    for (;;) {
        int64_t now = now_mono_us();
        if (poll_acks(r, now) < 0)
            break;
        PublisherStatus st;
        publisher_poll(r->pub, now, &st);
        if (st.inflight == 0)
            break;
        if (now >= deadline) {
            log_warn("%zu events still unacknowledged after %" PRId64
                     " ms; they are sent again at the next start",
                     st.inflight, r->cfg->shutdown_timeout_ms);
            break;
        }
        if (now >= r->next_status)
            send_status(r, false);
        bool pg_ready;
        wait_for_work(r, false, min64(deadline, r->next_status), &pg_ready);
    }
}

int relay_run(const Config *cfg, volatile sig_atomic_t *stop)
{
    Relay r = {.cfg = cfg};
    int code = EXIT_OUTBOXD_FAILURE;
    outbox_event_init(&r.ev);
    r.msg = xmalloc(sizeof(PgoMessage));

    if (outbox_mapper_new(&r.mapper, cfg->table, cfg->subject, r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }

    /* NATS first: its checks change nothing, while the PostgreSQL set-up may create a slot
     * that holds WAL from then on. */
    PublisherOptions po = {
        .urls = cfg->nats_url,
        .max_inflight = cfg->max_inflight,
        .max_inflight_bytes = cfg->max_inflight_bytes,
        .ack_timeout_ms = cfg->ack_timeout_ms,
    };
    int rc = publisher_new(&r.pub, &po, r.err, sizeof(r.err));
    if (rc != 0) {
        log_error("%s", r.err);
        code = rc == PUBLISH_CHECK_FAILED ? EXIT_OUTBOXD_CHECK : EXIT_OUTBOXD_FAILURE;
        goto done;
    }
    Buf filter;
    buf_init(&filter);
    relay_subject_filter(cfg->subject, &filter);
    char stream_name[256];
    rc = publisher_check_stream(r.pub, filter.data, stream_name, sizeof(stream_name), r.err,
                                sizeof(r.err));
    if (rc != 0) {
        log_error("%s", r.err);
        buf_deinit(&filter);
        code = rc == PUBLISH_CHECK_FAILED ? EXIT_OUTBOXD_CHECK : EXIT_OUTBOXD_FAILURE;
        goto done;
    }
    log_info("connected to NATS; stream \"%s\" captures %s", stream_name, filter.data);
    buf_deinit(&filter);

    if ((rc = pgstream_connect(&r.pg, cfg->pg_url, r.err, sizeof(r.err))) != 0) {
        log_error("%s", r.err);
        code = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    PgSystem sys;
    if (pgstream_identify(r.pg, &sys, r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        goto done;
    }
    log_info("connected to PostgreSQL: system %s, timeline %u, database \"%s\"", sys.system_id,
             sys.timeline, sys.dbname);
    PgSetup setup = {
        .slot = cfg->slot,
        .publication = cfg->publication,
        .schema = outbox_mapper_schema(r.mapper),
        .table = outbox_mapper_table(r.mapper),
        .qualified = outbox_mapper_qualified(r.mapper),
        .create = cfg->create,
    };
    bool created;
    rc = pgstream_setup(r.pg, &setup, check_columns, r.mapper, &created, r.err, sizeof(r.err));
    if (rc != 0) {
        log_error("%s", r.err);
        code = rc == PGSTREAM_CHECK_FAILED ? EXIT_OUTBOXD_CHECK : EXIT_OUTBOXD_FAILURE;
        goto done;
    }

    /* Status updates must reach the walsender well within wal_sender_timeout, whatever the
     * configured interval. */
    int64_t wst;
    if (pgstream_wal_sender_timeout_ms(r.pg, &wst, r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        goto done;
    }
    r.status_interval_us = cfg->status_interval_ms * 1000;
    if (wst > 0 && r.status_interval_us > wst * 1000 / 3) {
        r.status_interval_us = wst * 1000 / 3;
        log_warn("status interval lowered to %" PRId64 " ms to stay within the server's "
                 "wal_sender_timeout of %" PRId64 " ms",
                 r.status_interval_us / 1000, wst);
    }

    uint64_t start;
    if (pgstream_slot_confirmed(r.pg, cfg->slot, &start, r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        goto done;
    }
    if (pgstream_start(r.pg, cfg->slot, cfg->publication, start, r.err, sizeof(r.err)) < 0) {
        log_error("%s", r.err);
        goto done;
    }
    r.received = r.confirmed = r.reported = start;
    r.next_status = now_mono_us() + r.status_interval_us;
    log_info("streaming from slot \"%s\" at " LSN_FMT " to stream \"%s\"", cfg->slot,
             LSN_ARGS(start), stream_name);

    int failed = stream(&r, stop);
    if (!failed) {
        log_info("stopping: waiting up to %" PRId64 " ms for outstanding acknowledgements",
                 cfg->shutdown_timeout_ms);
        drain(&r);
    } else {
        poll_acks(&r, now_mono_us());
    }
    if (send_status(&r, false) == 0) {
        if (pgstream_finish(r.pg, r.err, sizeof(r.err)) < 0)
            log_warn("%s", r.err);
    }
    PublisherStatus st;
    publisher_poll(r.pub, now_mono_us(), &st);
    log_info("published %" PRIu64 " events this run (%" PRIu64 " acknowledged as duplicates)",
             st.acked, st.duplicates);
    if (!failed) {
        log_info("shutting down: confirmed " LSN_FMT, LSN_ARGS(r.confirmed));
        code = EXIT_OUTBOXD_OK;
    } else {
        log_error("stopped after a failure: confirmed " LSN_FMT
                  "; a restart resends everything after it",
                  LSN_ARGS(r.confirmed));
    }
done:
    publisher_free(r.pub);
    pgstream_free(r.pg);
    outbox_mapper_free(r.mapper);
    outbox_event_deinit(&r.ev);
    free(r.marks.v);
    free(r.msg);
    return code;
}
