/*
 * prune.h - `outboxd prune`: deleting old outbox rows, in small batches, never one whose event
 * the relay has not confirmed (see prune.c for why the fence holds).
 */
#ifndef OUTBOXD_PRUNE_H
#define OUTBOXD_PRUNE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/config.h"
#include "outboxd/pgstream.h"

#define PRUNE_DEFAULT_BATCH 1000
#define PRUNE_DEFAULT_WAIT_MS INT64_C(30000)

typedef struct PruneOptions {
    int64_t older_than_ms; /* rows whose time column is older than now minus this */
    int64_t batch;         /* rows per DELETE (one short transaction each) */
    int64_t wait_ms;       /* how long to wait for the relay to confirm the fence */
    bool dry_run;          /* count, delete nothing */
} PruneOptions;

/* The point before which every committed row is confirmed, taken once per run. */
typedef struct PruneFence {
    char xid[16];    /* xmin of the snapshot, as a 32-bit xid: rows with an older xmin qualify */
    uint64_t lsn;    /* the WAL position the slot must have confirmed */
    char cutoff[64]; /* now() minus --older-than, as timestamptz text */
} PruneFence;

typedef struct PruneResult {
    int64_t rows;    /* deleted (or, dry run, that would be) */
    int64_t batches; /* DELETE statements run */
} PruneResult;

/* Parses --older-than: a duration as elsewhere (ms, s, m, h) or whole days ("7d"). */
bool prune_parse_age(const char *s, int64_t *out_ms);

/*
 * Deletes from schema.table, in batches of opts->batch rows, each in its own transaction, the
 * rows inserted before the fence whose time_column is older than fence->cutoff; with dry_run
 * only counts them. The caller has waited for the slot to confirm fence->lsn. Checks first that
 * the table is a plain table, published by publication, with time_column of a timestamp type.
 * Returns 0, or an exit code with a one-line message in err (3: the table is not fit to prune;
 * 1: a statement failed; rows deleted so far stay deleted and are counted in *out).
 */
int prune_table(PgStream *pg, const PruneFence *fence, const char *publication, const char *schema,
                const char *table, const char *time_column, const PruneOptions *opts,
                PruneResult *out, char *err, size_t errlen);

/*
 * The whole command for cfg->table: takes the fence, waits up to opts->wait_ms for
 * cfg->slot's confirmed position to reach it, prunes, prints one summary line. Returns 0,
 * 1 when the relay did not confirm in time (nothing deleted) or a batch failed, 2 on a bad
 * table name, 3 when PostgreSQL, the slot or a fit table is missing.
 */
int prune_run(const Config *cfg, const PruneOptions *opts);

#endif
