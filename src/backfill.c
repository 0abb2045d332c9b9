/*
 * backfill.c - publishing the rows that were in the outbox before the slot existed.
 *
 * When outboxd creates its slot, the rows already in the outbox tables are read in the
 * snapshot that matches the slot's starting point and published before anything streamed, so
 * the first start misses nothing and repeats nothing. Each row is decoded as an Insert would be
 * and handled exactly as a streamed one (same mapping, dead letters, window).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "relay_internal.h"

/* A relation id no table has, for rows read with SQL rather than decoded from the WAL. */
#define BACKFILL_RELID UINT32_C(0xFFFFFFFE)

/* Waits until the window has room (acknowledgements arriving); -1 on stop or failure. */
static int wait_for_room(Relay *r)
{
    PublisherStatus st;
    while (!publisher_has_room(r->pub)) {
        if (*r->stop || relay_poll_acks(r, now_mono_us(), &st) < 0)
            return -1;
        bool pg_ready;
        relay_wait_for_work(r, false, min64(now_mono_us() + 100000, publisher_next_deadline(r->pub)),
                      &pg_ready);
    }
    return 0;
}

/* One outbox row read by the backfill: decoded as an Insert would be, then handled exactly as
 * a streamed one (same mapping, dead letters, window). */
static int backfill_row(void *arg, size_t table, int ncols, const char *const *names,
                        const uint32_t *types, const char *const *values, const int *lens,
                        char *err, size_t errlen)
{
    Relay *r = arg;
    PgoMessage *m = r->msg;
    /* Backfilled events carry the slot's starting point as their commit LSN. */
    r->txn.commit_lsn = r->backfill.position;
    if (r->backfill_table != table + 1) {
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
        r->backfill_table = table + 1;
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
    return 0;
}

/* The rows of a backfill are published: wait for all to be acknowledged, then clear the
 * backfill from the checkpoint. */
static int finish_backfill(Relay *r, const PgBackfill *bf)
{
    if (relay_drain(r, INT64_MAX, true) != 0 || *r->stop)
        return -1;
    r->cp.backfill.active = false;
    if (relay_checkpoint_put(r) < 0)
        return -1;
    log_info("backfill: published the %" PRIu64 " rows that were in %s before the slot existed",
             bf->rows, r->tables);
    return 0;
}

int backfill_prepare(Relay *r, PgSetup *setup)
{
    const Config *cfg = r->cfg;
    PgBackfill *bf = &r->backfill;
    *bf = (PgBackfill){.on_row = backfill_row, .arg = r, .count_only = !cfg->backfill};
    PgSlotInfo before;
    if (pgstream_slot_info(r->pg, cfg->slot, &before, r->err, sizeof(r->err)) < 0) {
        log_error("%s", r->err);
        return -1;
    }
    bool will_create = !before.exists && cfg->create;
    if (will_create && cfg->backfill) {
        r->cp.backfill = (CheckpointBackfill){.active = true};
        if (relay_checkpoint_put(r) < 0)
            return -1;
    }
    setup->backfill = will_create ? bf : NULL;
    r->txn = (OutboxTxn){.commit_lsn = 0, .commit_time = now_unix_us() - PG_EPOCH_OFFSET_US};
    r->txn_rows = 0;
    return 0;
}

int backfill_finish(Relay *r, PgSetup *setup, bool created)
{
    PgBackfill *bf = &r->backfill;
    if (created && bf->count_only && bf->rows > 0)
        log_info("backfill off: the %" PRIu64 " rows already in %s are not published "
                 "(--backfill=false)",
                 bf->rows, r->tables);
    if (!(created && !bf->count_only) && !(!created && r->cp.backfill.active))
        return 0;
    if (!created) {
        /* A backfill that did not finish (the relay died before every row was acknowledged)
         * is done again from the table: what JetStream holds already is dropped as a
         * duplicate. */
        log_warn("a backfill was interrupted; publishing the rows of %s again (JetStream "
                 "drops those it holds already)",
                 r->tables);
        *bf = (PgBackfill){.on_row = backfill_row, .arg = r};
        setup->backfill = bf;
        if (pgstream_read_outbox(r->pg, setup, r->err, sizeof(r->err)) < 0) {
            log_error("could not backfill: %s", r->err);
            return -1;
        }
    }
    return finish_backfill(r, bf);
}
