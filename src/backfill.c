/*
 * backfill.c - publishing the rows that were in the outbox before the slot existed.
 *
 * When outboxd creates its slot, the rows already in the outbox tables are read in the
 * snapshot that matches the slot's starting point and published before anything streamed, so
 * the first start misses nothing and repeats nothing. Each row is decoded as an Insert would be
 * and handled exactly as a streamed one (same mapping, dead letters, window).
 *
 * In commit order: rows are read table after table in commit order (pgstream.h: by each row's
 * commit time where the server keeps it, else by the transaction's start; then the
 * transaction, then the row's place), so a consumer applying events per aggregate sees them as
 * they happened.
 *
 * Resumable: that order is a keyset, and as JetStream acknowledges the rows the checkpoint
 * records the slot's position and snapshot and the last key stored ("backfill" in
 * checkpoint.h), at least every BACKFILL_PUT_ROWS rows or BACKFILL_PUT_US. A relay that finds
 * an unfinished backfill continues after that key, reading only the rows visible in the slot's
 * snapshot (rows committed later come through the WAL).
 * Rows published after the last checkpoint write are found in the stream itself: every
 * backfilled event carries the slot's position minus one as its commit LSN and its ordinal in
 * the backfill as its index (Outbox-Position "<timeline> <slot position - 1> <ordinal>"; a
 * resumed backfill numbers on from the rows stored), so the events after the last recorded
 * key are read back from the stream's end with the relay's one look-back rule
 * (jsapi_own_events_back), and a row whose event id is among them is not published again -
 * exact however long ago it was, whatever the duplicate window. The position lies below every
 * streamed transaction (those commit at or after the slot's position), so the skip rule
 * (anchor.c) never mistakes one for the other.
 *
 * A recovery (recovery.h) is a backfill too: of the rows committed since its cut (the
 * checkpoint's "backfill.since"), each published unless the stream holds its event since the
 * cut less --recovery-margin (read into an audit's stream side before the first row, b->seen).
 *
 * Owned: one relay backfills, the one holding a session advisory lock named after the slot on
 * its replication connection. Another relay that finds the backfill unfinished stands by
 * until the lock is free (PostgreSQL frees it when the owner's session ends, also when it is
 * killed), then takes the backfill over. No relay streams while the checkpoint says a backfill
 * is unfinished: streamed events would overtake rows older than them.
 *
 * Liveness: the slot's creation (which waits for every running transaction) and each FETCH are
 * sent without blocking, and every row, wait and standby turn moves the heartbeat that
 * /healthz reports, with the phase and the rows stored in its body and in the metrics.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/audit.h"
#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/notify.h"
#include "outboxd/recovery.h"
#include "relay_internal.h"

/* A relation id no table has, for rows read with SQL rather than decoded from the WAL. */
#define BACKFILL_RELID UINT32_C(0xFFFFFFFE)
/* The progress is written at least this often (rows acknowledged, or time). A resumed backfill
 * reads back from the stream what came after the last write: at most these rows plus the
 * window, so this bounds its look. */
#define BACKFILL_PUT_ROWS 10000
#define BACKFILL_PUT_US INT64_C(1000000)
/* Acknowledgements are taken in every this many rows (and whenever the window is full). */
#define BACKFILL_POLL_ROWS 256
/* How many messages in a row that are not its events the look-back passes over. */
#define LOOKBACK_FOREIGN 256

/* A row published (or found stored), in order: its key is stored once every event below
 * seq_limit is acknowledged. */
typedef struct Progress {
    uint64_t seq_limit;
    size_t table;
    char key[OUTBOX_MAX_EVENT_ID + 1];
} Progress;

struct BackfillRun {
    PgBackfill read;        /* what pgstream reads the rows with, and what it found */
    size_t relation_table;  /* the table the mapper's backfill relation stands for, +1 */
    bool locked;  /* this relay's session holds the backfill lock */
    bool fresh;   /* the set-up creates the slot and backfills in its snapshot */
    bool resume;  /* backfill_finish continues an interrupted backfill */
    Ring progress;          /* of Progress, in the order published */
    size_t id_table;        /* the table id_col is for, +1 */
    int id_col;             /* the event id's column in its rows */
    uint64_t rows_stored;   /* rows stored (as the checkpoint counts them) */
    uint64_t rows_put;      /* rows_stored at the last checkpoint write */
    int64_t next_put;
    uint64_t since_poll;
    /* a resumed backfill: the event ids (and dead letters) the stream holds after the last key
     * recorded, sorted */
    char **held;
    size_t nheld;
    uint64_t skipped;       /* rows found in the stream, not published again */
    Audit *seen;            /* a recovery: what the stream holds since its cut */
    uint64_t base_rows;     /* rows stored before this run */
    int64_t started_us;
};

static const char lock_name[] = "backfill";

static void lock_key(const Relay *r, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s %s", lock_name, r->cfg->slot);
}

static void beat(void)
{
    metrics_beat(now_mono_us());
}

static void set_phase(int phase)
{
    atomic_store_explicit(&metrics.backfill_phase, phase, memory_order_relaxed);
}

void backfill_free(Relay *r)
{
    BackfillRun *b = r->backfill;
    if (!b)
        return;
    for (size_t i = 0; i < b->nheld; i++)
        free(b->held[i]);
    free(b->held);
    audit_free(b->seen);
    ring_free(&b->progress);
    free(b);
    r->backfill = NULL;
    r->backfilling = false;
}

/* ---- progress ---------------------------------------------------------------------------- */

static void progress_push(BackfillRun *b, uint64_t seq_limit, size_t table, const char *key,
                          size_t keylen)
{
    Progress *p = ring_push(&b->progress, sizeof(Progress));
    p->seq_limit = seq_limit;
    p->table = table;
    if (keylen > OUTBOX_MAX_EVENT_ID)
        keylen = OUTBOX_MAX_EVENT_ID;
    memcpy(p->key, key, keylen);
    p->key[keylen] = '\0';
}

/* Moves the checkpoint's keyset past every row whose events are all acknowledged. */
static void progress_release(Relay *r, uint64_t first_unacked)
{
    BackfillRun *b = r->backfill;
    CheckpointBackfill *c = &r->cp.backfill;
    /* A popped element stays where it is until the next push. */
    const Progress *last = NULL;
    for (const Progress *p; (p = ring_front(&b->progress)) && p->seq_limit <= first_unacked;
         ring_pop(&b->progress)) {
        last = p;
        b->rows_stored++;
    }
    if (!last)
        return;
    snprintf(c->table, sizeof(c->table), "%s", outbox_mapper_qualified(r->mapper, last->table));
    snprintf(c->after, sizeof(c->after), "%s", last->key);
    c->rows = b->rows_stored;
    atomic_store_explicit(&metrics.backfill_rows, b->rows_stored, memory_order_relaxed);
}

/* Takes in acknowledgements and writes the progress when it is due; -1 on failure (logged). */
static int progress_poll(Relay *r, bool force)
{
    BackfillRun *b = r->backfill;
    PublisherStatus st;
    int64_t now = now_mono_us();
    metrics_beat(now);
    if (relay_poll_acks(r, now, &st) < 0)
        return -1;
    progress_release(r, st.first_unacked);
    b->since_poll = 0;
    if (b->rows_stored == b->rows_put ||
        (!force && now < b->next_put && b->rows_stored - b->rows_put < BACKFILL_PUT_ROWS))
        return 0;
    if (relay_checkpoint_put(r) < 0)
        return -1;
    b->rows_put = b->rows_stored;
    b->next_put = now + BACKFILL_PUT_US;
    return 0;
}

/* ---- rows ------------------------------------------------------------------------------------ */

/* Waits until the window has room (acknowledgements arriving); -1 on stop or failure. */
static int wait_for_room(Relay *r)
{
    while (!publisher_has_room(r->pub)) {
        if (*r->stop || progress_poll(r, false) < 0)
            return -1;
        if (publisher_has_room(r->pub))
            break; /* the acknowledgements just taken made room: no sleep */
        bool pg_ready;
        relay_wait_for_work(r, false, min64(now_mono_us() + 100000, publisher_next_deadline(r->pub)),
                      &pg_ready);
    }
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* True when the stream holds the event of this row already (or its dead letter: "dlq-<id>",
 * or for a row without a usable id "dlq-<lsn>-<ordinal>", which the ordinals numbered on from
 * the rows stored make the same as when it was published). */
static bool held(const BackfillRun *b, const char *key, size_t keylen, uint64_t lsn,
                 uint32_t ordinal)
{
    if (b->nheld == 0 || keylen > OUTBOX_MAX_EVENT_ID)
        return false;
    char id[OUTBOX_MAX_EVENT_ID + 5] = "dlq-";
    if (key) {
        memcpy(id + 4, key, keylen);
        id[4 + keylen] = '\0';
        const char *k = id + 4;
        if (bsearch(&k, b->held, b->nheld, sizeof(char *), cmp_str))
            return true;
    }
    char unkeyed[64];
    snprintf(unkeyed, sizeof(unkeyed), "dlq-%X-%X-%u", LSN_ARGS(lsn), ordinal);
    return bsearch(&(const char *){unkeyed}, b->held, b->nheld, sizeof(char *), cmp_str) ||
           (key && bsearch(&(const char *){id}, b->held, b->nheld, sizeof(char *), cmp_str));
}

/* One outbox row read by the backfill: decoded as an Insert would be, then handled exactly as
 * a streamed one (same mapping, dead letters, window). */
static int backfill_row(void *arg, size_t table, const char *key, int ncols,
                        const char *const *names, const uint32_t *types,
                        const char *const *values, const int *lens, char *err, size_t errlen)
{
    Relay *r = arg;
    BackfillRun *b = r->backfill;
    PgoMessage *m = r->msg;
    /* Backfilled events carry the slot's starting point minus one as their commit LSN: they
     * committed before it, and every streamed transaction commits at or after it. */
    r->txn.commit_lsn = r->backfill->read.position - 1;
    r->txn.timeline = r->sys.timeline;
    if (r->backfill->relation_table != table + 1) {
        m->kind = PGO_RELATION;
        m->u.relation.relid = BACKFILL_RELID;
        m->u.relation.nspname = outbox_mapper_schema(r->mapper, table);
        m->u.relation.relname = outbox_mapper_table(r->mapper, table);
        m->u.relation.ncols = (uint16_t)ncols;
        for (int c = 0; c < ncols; c++) {
            m->cols[c].name = names[c];
            m->cols[c].type_oid = types[c];
        }
        if (outbox_mapper_relation(r->mapper, m, err, errlen) < 0)
            return -1;
        r->backfill->relation_table = table + 1;
    }
    if (b->id_table != table + 1) {
        const char *col = outbox_mapper_role_column(r->mapper, table, ROLE_EVENT_ID);
        b->id_col = -1;
        for (int c = 0; col && c < ncols; c++)
            if (strcmp(names[c], col) == 0)
                b->id_col = c;
        b->id_table = table + 1;
    }
    const char *id = b->id_col >= 0 ? values[b->id_col] : NULL;
    size_t idlen = id ? (size_t)lens[b->id_col] : 0;
    if (++b->since_poll >= BACKFILL_POLL_ROWS && progress_poll(r, false) < 0) {
        snprintf(err, errlen, "the backfill was interrupted");
        return -1;
    }
    if (held(b, id, idlen, r->backfill->read.position - 1, r->txn_rows) ||
        (b->seen && id && audit_row(b->seen, id, idlen, true) != AUDIT_ROW_MISSING)) {
        /* Published before the relay that ran this backfill stopped, after its last
         * checkpoint write: stored already. */
        b->skipped++;
        r->txn_rows++;
        progress_push(b, publisher_next_seq(r->pub), table, key, strlen(key));
        return 0;
    }
    if (wait_for_room(r) < 0) {
        snprintf(err, errlen, "the backfill was interrupted");
        return -1;
    }
    m->kind = PGO_INSERT;
    m->u.insert.relid = BACKFILL_RELID;
    m->u.insert.ncols = (uint16_t)ncols;
    for (int c = 0; c < ncols; c++) {
        m->values[c].kind = values[c] ? 't' : 'n';
        m->values[c].data = values[c];
        m->values[c].len = values[c] ? (uint32_t)lens[c] : 0;
    }
    if (relay_handle_insert(r, m) < 0) {
        snprintf(err, errlen, "the backfill stopped at a row that cannot be published");
        return -1;
    }
    progress_push(b, publisher_next_seq(r->pub), table, key, strlen(key));
    return 0;
}

/* While PostgreSQL works (the slot's creation, a FETCH): liveness, acknowledgements, stop. */
static bool backfill_tick(void *arg)
{
    Relay *r = arg;
    if (r->backfill && r->backfilling)
        progress_poll(r, false);
    else
        beat();
    return !*r->stop;
}

static int load_seen(Relay *r);

/* The slot exists: record its position and snapshot before the first row is published, so
 * that whoever continues this backfill reads the same rows. */
static int backfill_started(void *arg, char *err, size_t errlen)
{
    Relay *r = arg;
    PgBackfill *bf = &r->backfill->read;
    if (bf->count_only)
        return 0;
    CheckpointBackfill *c = &r->cp.backfill;
    char since[sizeof(c->since)];
    snprintf(since, sizeof(since), "%s", c->since);
    *c = (CheckpointBackfill){.active = true, .position = bf->position};
    snprintf(c->snapshot, sizeof(c->snapshot), "%s", bf->snapshot);
    snprintf(c->since, sizeof(c->since), "%s", since);
    if (relay_checkpoint_put(r) < 0) {
        snprintf(err, errlen, "could not record the backfill's snapshot in the checkpoint");
        return -1;
    }
    if (c->since[0])
        log_info("recovery: slot \"%s\" starts at " LSN_FMT "; publishing the rows of %s "
                 "committed since %s that the stream lacks",
                 r->cfg->slot, LSN_ARGS(bf->position), r->tables, c->since);
    else
        log_info("backfill: slot \"%s\" starts at " LSN_FMT " (snapshot %.60s); publishing the "
                 "rows of %s that are older",
                 r->cfg->slot, LSN_ARGS(bf->position), bf->snapshot, r->tables);
    if (c->since[0] && load_seen(r) < 0) {
        snprintf(err, errlen, "could not read what the stream holds since the recovery's cut");
        return -1;
    }
    set_phase(BACKFILL_PHASE_RUNNING);
    r->backfilling = true;
    r->backfill->started_us = now_mono_us();
    r->backfill->next_put = now_mono_us() + BACKFILL_PUT_US;
    return 0;
}

/* ---- ownership --------------------------------------------------------------------------------- */

/* Re-reads the checkpoint's backfill state (another relay may have moved it on). */
static int reload(Relay *r)
{
    Checkpoint saved;
    if (relay_load_checkpoint(r, &saved) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    return 0;
}

/* Takes the backfill lock, standing by while another relay holds it. -1 on stop or failure. */
static int take_lock(Relay *r)
{
    char name[160];
    lock_key(r, name, sizeof(name));
    bool standby = false;
    while (!*r->stop) {
        bool got;
        if (pgstream_try_lock(r->pg, name, &got, r->err, sizeof(r->err)) < 0) {
            log_error("%s", r->err);
            return -1;
        }
        if (got) {
            r->backfill->locked = true;
            if (standby) {
                atomic_store(&metrics.standby, 0);
                set_phase(BACKFILL_PHASE_NONE);
                log_info("backfill: the relay that owned it is gone; this relay owns it now");
            }
            return 0;
        }
        if (!standby) {
            log_info("standby: another relay owns the backfill of slot \"%s\"; waiting, and "
                     "taking it over if that relay stops",
                     r->cfg->slot);
            standby = true;
            atomic_store(&metrics.standby, 1);
            set_phase(BACKFILL_PHASE_STANDBY);
            notify_systemd("READY=1\nSTATUS=standby: another relay owns the backfill");
        }
        relay_nap(r, STANDBY_POLL_US);
    }
    return -1;
}

static int unlock(Relay *r)
{
    char name[160];
    lock_key(r, name, sizeof(name));
    if (!r->backfill->locked)
        return 0;
    r->backfill->locked = false;
    if (pgstream_unlock(r->pg, name, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    return 0;
}

/* A recovery reads only what committed since its cut, whatever --backfill says. */
static void set_since(Relay *r)
{
    PgBackfill *bf = &r->backfill->read;
    const CheckpointBackfill *c = &r->cp.backfill;
    bf->since = c->since[0] ? c->since : NULL;
    bf->since_margin_ms = r->cfg->recovery_margin_ms;
    if (bf->since)
        bf->count_only = false;
}

/* Reads what the stream holds since the recovery's cut less the margin into b->seen. */
static int load_seen(Relay *r)
{
    BackfillRun *b = r->backfill;
    int64_t cut;
    if (!time_parse_rfc3339(r->cp.backfill.since, strlen(r->cp.backfill.since), &cut)) {
        log_error("recovery: the checkpoint's cut \"%s\" is not a time", r->cp.backfill.since);
        return -1;
    }
    natsConnection *nc = jsapi_connect_once(r->cfg->nats_url, r->err, sizeof(r->err));
    if (!nc) {
        log_error("recovery: %s", r->err);
        return -1;
    }
    StreamInfo info;
    int rc = jsapi_stream_info(nc, r->stream.name, &info, r->err, sizeof(r->err));
    if (rc == 0) {
        audit_new(&b->seen, &(AuditRange){.since = INT64_MIN, .until = INT64_MAX});
        rc = audit_read_stream(b->seen, nc, r->stream.name, cut - r->cfg->recovery_margin_ms * 1000,
                               info.last_seq, NULL, NULL, r->err, sizeof(r->err));
    }
    natsConnection_Destroy(nc);
    if (rc < 0) {
        log_error("recovery: %s", r->err);
        return -1;
    }
    audit_stream_done(b->seen);
    log_info("recovery: stream \"%s\" holds %" PRIu64 " messages since %s less %" PRId64 " s",
             r->stream.name, audit_report(b->seen)->messages, r->cp.backfill.since,
             r->cfg->recovery_margin_ms / 1000);
    return 0;
}

int backfill_recover(Relay *r, const char *why)
{
    natsConnection *nc = jsapi_connect_once(r->cfg->nats_url, r->err, sizeof(r->err));
    if (!nc) {
        log_error("recovery: %s", r->err);
        return -1;
    }
    RecoveryCut cut;
    int rc = recovery_cut(nc, r->stream.name, r->source, &r->cp, &cut, r->err, sizeof(r->err));
    natsConnection_Destroy(nc);
    if (rc < 0) {
        log_error("recovery: %s", r->err);
        return -1;
    }
    if (rc == 0) {
        log_error("recovery: %s, but neither the stream nor the checkpoint names a transaction "
                  "this relay published: nothing says where to start; run outboxd slot drop "
                  "--yes, then start outboxd for a full backfill",
                  why);
        return -1;
    }
    recovery_plan(&r->cp, &cut);
    if (relay_checkpoint_put(r) < 0)
        return -1;
    log_warn("recovery (--slot-recovery=auto): %s; the last transaction relayed committed at %s "
             "(%s): making a new slot and publishing the rows committed since then that the "
             "stream lacks, in commit order",
             why, r->cp.backfill.since, cut.from);
    return 0;
}

/* Records a new backfill as unfinished before its slot exists: if the relay dies after
 * creating the slot, the next one still knows the rows before it are owed. */
static int begin_fresh(Relay *r, PgSetup *setup)
{
    char since[sizeof(r->cp.backfill.since)];
    snprintf(since, sizeof(since), "%s", r->cp.backfill.since);
    r->cp.backfill = (CheckpointBackfill){.active = true};
    snprintf(r->cp.backfill.since, sizeof(r->cp.backfill.since), "%s", since);
    set_since(r);
    if (relay_checkpoint_put(r) < 0)
        return -1;
    r->backfill->fresh = true;
    setup->backfill = &r->backfill->read;
    set_phase(BACKFILL_PHASE_SLOT);
    return 0;
}

int backfill_prepare(Relay *r, PgSetup *setup)
{
    const Config *cfg = r->cfg;
    backfill_free(r);
    r->backfill = xcalloc(1, sizeof(BackfillRun));
    PgBackfill *bf = &r->backfill->read;
    *bf = (PgBackfill){.on_row = backfill_row,
                       .tick = backfill_tick,
                       .on_start = backfill_started,
                       .arg = r,
                       .count_only = !cfg->backfill};
    setup->backfill = NULL;
    r->txn = (OutboxTxn){.commit_lsn = 0, .commit_time = now_unix_us() - PG_EPOCH_OFFSET_US};
    r->txn_rows = 0;

    /* The slot first, then the checkpoint: an owner records its backfill before it creates
     * the slot, so a slot seen here has its backfill in the checkpoint read after. */
    PgSlotInfo slot;
    if (pgstream_slot_info(r->pg, cfg->slot, &slot, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    if (reload(r) < 0)
        return -1;
    bool owed = r->cp.backfill.active;
    if (!owed && (slot.exists || !cfg->create))
        return 0;
    if (!owed && !cfg->backfill) {
        setup->backfill = bf; /* counts the rows it skips */
        return 0;
    }
    /* A backfill is owed or may be: only the lock's holder decides and runs it. */
    if (take_lock(r) < 0)
        return -1;
    if (pgstream_slot_info(r->pg, cfg->slot, &slot, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    if (reload(r) < 0)
        return -1;
    CheckpointBackfill *c = &r->cp.backfill;
    if (!c->active) {
        if (!slot.exists && cfg->create && cfg->backfill)
            return begin_fresh(r, setup); /* first start: no other relay got here first */
        if (!slot.exists && cfg->create)
            setup->backfill = bf; /* counts the rows it skips */
        return unlock(r); /* or finished by the relay this one waited for */
    }
    if (!slot.exists) {
        if (!cfg->create)
            return unlock(r); /* the set-up reports the missing slot */
        if (c->since[0])
            log_info("recovery: making slot \"%s\" anew, then publishing the rows committed "
                     "since %s that the stream lacks",
                     cfg->slot, c->since);
        else
            log_warn("backfill: the slot of the unfinished backfill (%" PRIu64 " rows stored) "
                     "is gone; backfilling again in a new slot's snapshot (rows the stream holds "
                     "already are dropped as duplicates only within its duplicate window)",
                     c->rows);
        return begin_fresh(r, setup);
    }
    if (c->snapshot[0] == '\0') {
        /* The slot was created but its snapshot never recorded (the relay died in between, or
         * an older outboxd made it). No relay streamed from it (none streams past an
         * unfinished backfill), so a new slot loses nothing. */
        if (slot.active_pid) {
            log_error("backfill: replication slot \"%s\" is in use by PID %d while the "
                      "checkpoint says its backfill has not begun; stop that session",
                      cfg->slot, slot.active_pid);
            return -1;
        }
        log_warn("backfill: replication slot \"%s\" was created but its snapshot was not "
                 "recorded; creating it again to backfill in a known snapshot",
                 cfg->slot);
        if (pgstream_drop_slot(r->pg, cfg->slot, r->err, sizeof(r->err)) < 0) {
            log_error("%s", r->err);
            return -1;
        }
        return begin_fresh(r, setup);
    }
    r->backfill->resume = true;
    set_since(r);
    return 0;
}

/* ---- resuming ---------------------------------------------------------------------------------- */

/* What read_held() looks for, and what it found. */
typedef struct HeldSearch {
    BackfillRun *b;
    const CheckpointBackfill *c;
    uint32_t timeline;
    size_t cap;
    uint64_t bound;   /* more than a run can have published after a checkpoint write */
    bool bounded;     /* the bound was reached */
} HeldSearch;

static bool held_event(void *arg, const JsOwnEvent *ev)
{
    HeldSearch *h = arg;
    BackfillRun *b = h->b;
    /* Ordinals below the rows stored were recorded; events of another position are not this
     * backfill's (a backfill lies before every streamed event). */
    if (ev->anchor.pos.lsn != h->c->position - 1 || ev->anchor.pos.timeline != h->timeline ||
        ev->anchor.pos.index < h->c->rows)
        return false;
    if (b->nheld == h->bound) {
        h->bounded = true;
        return false;
    }
    if ((b->nheld & 255) == 0)
        beat();
    if (ev->id[0]) {
        if (b->nheld == h->cap) {
            h->cap = h->cap ? h->cap * 2 : 256;
            b->held = xrealloc(b->held, h->cap * sizeof(char *));
        }
        b->held[b->nheld++] = xstrdup(ev->id);
    }
    return true;
}

/*
 * Reads back, from the stream's end, the backfilled events published after the rows the
 * checkpoint counts as stored (ordinals from c->rows on), into b->held, with the relay's one
 * look-back rule: other messages (replayed copies, other writers) are passed over.
 */
static int read_held(Relay *r)
{
    BackfillRun *b = r->backfill;
    natsConnection *nc = jsapi_connect_once(r->cfg->nats_url, r->err, sizeof(r->err));
    if (!nc) {
        log_error("backfill: %s", r->err);
        return -1;
    }
    StreamInfo info;
    int rc = -1;
    HeldSearch h = {.b = b,
                    .c = &r->cp.backfill,
                    .timeline = r->sys.timeline,
                    .bound = 4 * (BACKFILL_PUT_ROWS + (uint64_t)r->cfg->max_inflight)};
    if (jsapi_stream_info(nc, r->stream.name, &info, r->err, sizeof(r->err)) < 0 ||
        jsapi_own_events_back(nc, r->stream.name, info.last_seq, r->source, LOOKBACK_FOREIGN,
                              held_event, &h, r->err, sizeof(r->err)) < 0)
        goto done;
    if (h.bounded)
        log_warn("backfill: found %" PRIu64 " events of the backfill in stream \"%s\" after "
                 "its checkpoint, more than a run publishes between two checkpoint writes; rows "
                 "before them that the stream holds are dropped as duplicates only within its "
                 "duplicate window",
                 h.bound, r->stream.name);
    qsort(b->held, b->nheld, sizeof(char *), cmp_str);
    rc = 0;
done:
    if (rc < 0)
        log_error("backfill: %s", r->err);
    natsConnection_Destroy(nc);
    return rc;
}

/* Continues the backfill the checkpoint describes, after its last key, in its snapshot. */
static int resume(Relay *r, PgSetup *setup)
{
    BackfillRun *b = r->backfill;
    PgBackfill *bf = &r->backfill->read;
    const CheckpointBackfill *c = &r->cp.backfill;
    size_t first = 0;
    if (c->table[0]) {
        size_t n = outbox_mapper_ntables(r->mapper);
        while (first < n && strcmp(outbox_mapper_qualified(r->mapper, first), c->table) != 0)
            first++;
        if (first == n) {
            log_error("backfill: the checkpoint's backfill stands in table %s, which is not an "
                      "outbox table of this relay (%s): run it with the tables it started with",
                      c->table, r->tables);
            return -1;
        }
    }
    b->base_rows = b->rows_stored = b->rows_put = c->rows;
    r->txn_rows = (uint32_t)c->rows; /* ordinals number on from the rows stored */
    atomic_store_explicit(&metrics.backfill_rows, b->rows_stored, memory_order_relaxed);
    set_phase(BACKFILL_PHASE_RUNNING);
    if (read_held(r) < 0 || (c->since[0] && load_seen(r) < 0))
        return -1;
    /* bf->after points into r->cp, which the progress moves on: read it from a copy. */
    char after[sizeof(c->after)];
    snprintf(after, sizeof(after), "%s", c->after);
    if (after[0] && !strchr(after, '|')) {
        /* An earlier release's keyset (by event id): the order changed, start the table over;
         * what the stream holds after the checkpoint is still found there. */
        log_warn("backfill: the checkpoint's keyset position \"%s\" is an event id (an earlier "
                 "outboxd's backfill order): reading %s again from its first row; rows stored "
                 "before the checkpoint are dropped as duplicates only within the duplicate "
                 "window",
                 after, c->table);
        after[0] = '\0';
    }
    if (after[0])
        log_info("backfill: resuming the interrupted backfill of %s after key \"%s\" of %s (%"
                 PRIu64 " rows stored; %zu events found in the stream after it), in the "
                 "snapshot of slot \"%s\" at " LSN_FMT,
                 r->tables, after, c->table, c->rows, b->nheld, r->cfg->slot,
                 LSN_ARGS(c->position));
    else
        log_info("backfill: resuming the interrupted backfill of %s from its start (%zu events "
                 "found in the stream already), in the snapshot of slot \"%s\" at " LSN_FMT,
                 r->tables, b->nheld, r->cfg->slot, LSN_ARGS(c->position));
    bf->position = c->position;
    snprintf(bf->snapshot, sizeof(bf->snapshot), "%s", c->snapshot);
    bf->first_table = first;
    setup->backfill = bf;
    r->backfilling = true;
    b->started_us = now_mono_us();
    b->next_put = now_mono_us() + BACKFILL_PUT_US;
    bf->after = after;
    int rc = pgstream_read_outbox(r->pg, setup, r->err, sizeof(r->err));
    bf->after = NULL;
    if (rc < 0) {
        log_error("could not backfill: %s", r->err);
        return -1;
    }
    return 0;
}

/* ---- finishing --------------------------------------------------------------------------------- */

/* Every row is published: wait for all to be acknowledged, then clear the backfill from the
 * checkpoint and release the lock. */
static int finish_backfill(Relay *r)
{
    BackfillRun *b = r->backfill;
    const PgBackfill *bf = &r->backfill->read;
    if (relay_drain(r, INT64_MAX, true) != 0 || *r->stop)
        return -1;
    if (progress_poll(r, true) < 0)
        return -1;
    r->cp.backfill.active = false;
    if (relay_checkpoint_put(r) < 0)
        return -1;
    r->backfilling = false;
    double secs = (double)(now_mono_us() - b->started_us) / 1e6;
    if (r->cp.backfill.since[0])
        log_info("recovery: published %" PRIu64 " rows of %s committed since %s that the "
                 "stream lacked; %" PRIu64 " more were in it already; rows deleted from the "
                 "outbox since then cannot be recovered, in %.1f s",
                 b->rows_stored - b->skipped - b->base_rows, r->tables, r->cp.backfill.since,
                 b->skipped, secs);
    else if (b->resume)
        log_info("backfill: published the rows that were in %s before the slot existed: "
                 "%" PRIu64 " in all, resumed after %" PRIu64 " stored earlier; this run read "
                 "%" PRIu64 " rows, %" PRIu64 " of them found in the stream already, in %.1f s",
                 r->tables, b->rows_stored, b->base_rows, bf->rows, b->skipped, secs);
    else
        log_info("backfill: published the %" PRIu64 " rows that were in %s before the slot "
                 "existed, in %.1f s",
                 bf->rows, r->tables, secs);
    if (bf->commit_order)
        log_info("backfill: the rows went out in commit order (track_commit_timestamp is on)");
    else
        log_info("backfill: the rows went out in the order of their transactions' start "
                 "(occurred_at), then transaction id: commit order for each writer's "
                 "transactions, not between concurrent ones; turn track_commit_timestamp on "
                 "for exact commit order");
    atomic_store_explicit(&metrics.backfill_rows, b->rows_stored, memory_order_relaxed);
    set_phase(BACKFILL_PHASE_NONE);
    return unlock(r);
}

int backfill_finish(Relay *r, PgSetup *setup, bool created)
{
    PgBackfill *bf = &r->backfill->read;
    BackfillRun *b = r->backfill;
    int rc = 0;
    if (created && bf->count_only && bf->rows > 0)
        log_info("backfill off: the %" PRIu64 " rows already in %s are not published "
                 "(--backfill=false)",
                 bf->rows, r->tables);
    if (b->fresh && !created) {
        /* Cannot happen while every backfilling relay takes the lock; refuse to guess. */
        log_error("backfill: replication slot \"%s\" was created by someone else while this "
                  "relay owned its backfill",
                  r->cfg->slot);
        rc = -1;
    } else if (b->resume) {
        rc = resume(r, setup) < 0 ? -1 : finish_backfill(r);
    } else if (b->fresh) {
        rc = finish_backfill(r);
    }
    set_phase(BACKFILL_PHASE_NONE);
    backfill_free(r);
    return rc;
}

bool backfill_unfinished(Relay *r)
{
    if (!r->cp.backfill.active)
        return false;
    log_warn("the checkpoint says the backfill of slot \"%s\" is unfinished: not streaming "
             "before it is done; connecting again to take it over",
             r->cfg->slot);
    return true;
}
