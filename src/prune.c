/*
 * prune.c - `outboxd prune`: deleting old outbox rows without ever deleting one whose event the
 * relay has not confirmed.
 *
 * The relay needs no row after its transaction committed: it reads the INSERT from the WAL. A
 * row is still worth keeping until its event is in JetStream, though, for `outboxd replay`
 * and for a relay that has to backfill again. "In JetStream" is what the slot's
 * confirmed_flush_lsn says: the relay confirms a position only when every event of every
 * transaction whose commit lies before it is acknowledged (relay.c). So prune fences:
 *
 * 1. Fence. One statement, `SELECT xid(pg_snapshot_xmin(pg_current_snapshot())),
 *    pg_current_wal_insert_lsn(), ...`. pg_current_snapshot() is the statement's snapshot S,
 *    taken when the statement starts, before any expression runs, so W, the insert position,
 *    is read after S whatever the order of the select list. Every xid below xmin(S) had ended
 *    when S was taken (that is what a snapshot's xmin means, snapshot.h: "all XID < xmin are
 *    visible to me"; GetSnapshotData takes the oldest xid still in the proc array). A
 *    transaction inserts its commit record before it leaves the proc array
 *    (RecordTransactionCommit, then ProcArrayEndTransaction; also with synchronous_commit off,
 *    and for COMMIT PREPARED), so the commit record of every such transaction that committed
 *    ends at or below W. Rows of a subtransaction carry the subxid, which is larger
 *    than its parent's xid, so a subxid below xmin(S) has a parent that ended too.
 *    W is made exact: when the insert position sits at the start of a page, PostgreSQL reports
 *    it past the page header (checked: after pg_switch_wal() it read 0/3000028 while every
 *    record ended at 0/3000000), but the walsender, and so the relay, only ever reach the end
 *    of the last record. A position right after a page header cannot be the end of a record
 *    (a record that fills its page ends at the boundary), so W is taken back to the boundary
 *    there. Without that, an idle database right after a WAL switch never lets prune pass.
 *
 * 2. Wait until the slot's confirmed_flush_lsn >= W, polling, at most --wait. The relay confirms
 *    keepalive positions while the outbox is idle, so a healthy relay passes W within about
 *    its --status-interval. If it does not, prune deletes nothing and says how far the relay
 *    got. The slot must belong to the connected database: a slot of another database says
 *    nothing about this one's outbox.
 *
 * 3. Delete in batches, each statement its own short transaction:
 *      WITH d AS (DELETE FROM ONLY t WHERE ctid = ANY(ARRAY(
 *          SELECT ctid FROM ONLY t WHERE age(xmin) > age('F'::xid) AND col < 'C'
 *          LIMIT n)) RETURNING 1) SELECT count(*) FROM d
 *    until a batch deletes fewer than n rows. F is xmin(S) as a 32-bit xid (xid(xid8) does
 *    the epoch-stripping the text route bigint % 2^32 would). A row whose xmin precedes F was
 *    inserted (or last updated) by a transaction that ended before S and committed (the DELETE
 *    sees it), hence is confirmed. age() compares modulo 2^32 against one "now" per transaction
 *    (GetStableLatestTransactionId), so the comparison survives xid wraparound. Checked on
 *    PostgreSQL 15: VACUUM FREEZE sets the frozen bits but the xmin column keeps the original
 *    xid, so a frozen row is judged by its real inserting xid; that is the safe reading (a row
 *    committed after S and frozen before the DELETE is still kept), and it is exact while the
 *    inserting xid is less than 2^31 transactions old. A row older than that compares at
 *    random, which is harmless: it committed long before S, so deleting it is safe, and
 *    keeping it only delays it. Only xmin 1 or 2 (bootstrap, frozen before 9.4) gives age()
 *    INT_MAX: always old.
 *    The ctids come from an InitPlan of the same statement, so the same snapshot: each names a
 *    tuple live in that snapshot, which VACUUM or page pruning cannot remove while the
 *    statement runs (its snapshot holds back the horizon), so the line pointer cannot be
 *    reused between the SELECT and the DELETE. A row deleted or updated concurrently after the
 *    snapshot is rechecked by READ COMMITTED (EvalPlanQual): a deleted one is skipped, an
 *    updated one has a new ctid that is not in the array, so it is skipped too. The plan is a
 *    Tid Scan over the array (checked with EXPLAIN). ONLY keeps inheritance children out;
 *    partitioned tables are refused: ctids are unique only within one partition, so ctid =
 *    ANY(...) over a partitioned table could delete unrelated rows (drop old partitions
 *    instead, docs/operations.md).
 *    The cutoff C is now() - --older-than, computed once with the fence, so every batch and a
 *    dry run use the same one. Rows are aged by each table's occurred-at column
 *    (--column-occurred-at); every outbox table is pruned behind the one fence.
 *
 * What the fence does not see: rows that never reach the WAL stream at all, i.e. rows that
 * were in the table before the slot existed. The relay backfills them before it streams, and
 * only then confirms anything past the slot's start, so a fence taken after WAL moved on
 * waits for the backfill too; on a database that wrote no WAL at all since the slot was
 * created, W can equal the slot's starting point while a backfill is still unacknowledged.
 */
#include "outboxd/prune.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "outboxd/outbox.h"
#include "outboxd/relay.h"
#include "outboxd/util.h"

/* Page header sizes of WAL (SizeOfXLogShortPHD, SizeOfXLogLongPHD): where an insert position
 * at the start of a page or segment is reported. */
#define WAL_SHORT_PAGE_HEADER 24
#define WAL_LONG_PAGE_HEADER 40
#define POLL_MIN_MS 50
#define POLL_MAX_MS 500

bool prune_parse_age(const char *s, int64_t *out_ms)
{
    size_t n = s ? strlen(s) : 0;
    if (n >= 2 && s[n - 1] == 'd') {
        char *end;
        errno = 0;
        long long days = strtoll(s, &end, 10);
        if (errno != 0 || end != s + n - 1 || s[0] < '0' || s[0] > '9' || days > 100000)
            return false;
        *out_ms = days * INT64_C(86400000);
        return true;
    }
    return config_parse_duration_ms(s, out_ms);
}

static void put_table(Buf *b, const char *schema, const char *table)
{
    pgstream_quote_ident(b, schema);
    buf_putc(b, '.');
    pgstream_quote_ident(b, table);
}

/* Checks that schema.table can be pruned by time_column. Returns 0, or 3 with err set. */
static int check_table(PgStream *pg, const char *publication, const char *schema, const char *table,
                       const char *time_column, char *err, size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT c.relkind, "
                   "(SELECT a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype, "
                   "'date'::regtype) FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid "
                   "AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ");
    pgstream_quote_literal(&sql, time_column);
    buf_puts(&sql, "), EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt "
                   "JOIN pg_catalog.pg_publication p ON p.pubname = pt.pubname "
                   "WHERE p.pubinsert AND pt.schemaname = n.nspname "
                   "AND pt.tablename = c.relname AND pt.pubname = ");
    pgstream_quote_literal(&sql, publication);
    buf_puts(&sql, ") FROM pg_catalog.pg_class c "
                   "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ");
    pgstream_quote_literal(&sql, schema);
    buf_puts(&sql, " AND c.relname = ");
    pgstream_quote_literal(&sql, table);
    PgRows *rows = NULL;
    int rc = EXIT_OUTBOXD_CHECK;
    if (pgstream_sql(pg, sql.data, "could not read the outbox table", &rows, NULL, err, errlen) < 0)
        goto done;
    const char *kind = pgrows_value(rows, 0, 0);
    const char *typed = pgrows_value(rows, 0, 1);
    if (!kind) {
        snprintf(err, errlen, "outbox table %s.%s does not exist", schema, table);
    } else if (strcmp(kind, "p") == 0) {
        snprintf(err, errlen,
                 "outbox table %s.%s is partitioned: prune deletes by ctid, which is unique "
                 "only within one partition; drop old partitions instead (docs/operations.md, "
                 "\"Cleaning up the outbox\")",
                 schema, table);
    } else if (strcmp(kind, "r") != 0) {
        snprintf(err, errlen, "%s.%s is not a table (relkind %s)", schema, table, kind);
    } else if (!typed) {
        snprintf(err, errlen,
                 "outbox table %s.%s has no column \"%s\": prune needs a time column to tell "
                 "old rows (timestamptz, timestamp or date)",
                 schema, table, time_column);
    } else if (strcmp(typed, "t") != 0) {
        snprintf(err, errlen,
                 "column \"%s\" of %s.%s is not a timestamptz, timestamp or date: prune needs a "
                 "time column to tell old rows",
                 time_column, schema, table);
    } else if (!pgrows_true(rows, 0, 2)) {
        snprintf(err, errlen,
                 "publication \"%s\" does not publish inserts into %s.%s, so the relay does "
                 "not relay its rows and their confirmation means nothing; prune refuses",
                 publication, schema, table);
    } else {
        rc = 0;
    }
done:
    pgrows_free(rows);
    buf_deinit(&sql);
    return rc;
}

/* Appends the rows-to-prune condition: inserted before the fence, older than the cutoff. */
static void put_condition(Buf *b, const PruneFence *fence, const char *time_column)
{
    buf_puts(b, " WHERE pg_catalog.age(xmin) > pg_catalog.age(");
    pgstream_quote_literal(b, fence->xid);
    buf_puts(b, "::xid) AND ");
    pgstream_quote_ident(b, time_column);
    buf_puts(b, " < ");
    pgstream_quote_literal(b, fence->cutoff);
    buf_puts(b, "::timestamptz");
}

int prune_table(PgStream *pg, const PruneFence *fence, const char *publication, const char *schema,
                const char *table, const char *time_column, const PruneOptions *opts,
                PruneResult *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    int rc = check_table(pg, publication, schema, table, time_column, err, errlen);
    if (rc != 0)
        return rc;
    Buf sql;
    buf_init(&sql);
    if (opts->dry_run) {
        buf_puts(&sql, "SELECT count(*) FROM ONLY ");
        put_table(&sql, schema, table);
    } else {
        buf_puts(&sql, "WITH d AS (DELETE FROM ONLY ");
        put_table(&sql, schema, table);
        buf_puts(&sql, " WHERE ctid = ANY(ARRAY(SELECT ctid FROM ONLY ");
        put_table(&sql, schema, table);
    }
    put_condition(&sql, fence, time_column);
    if (!opts->dry_run)
        buf_printf(&sql, " LIMIT %" PRId64 ")) RETURNING 1) SELECT count(*) FROM d", opts->batch);
    for (;;) {
        PgRows *rows = NULL;
        if (pgstream_sql(pg, sql.data,
                         opts->dry_run ? "could not count the rows to prune"
                                       : "could not delete old outbox rows",
                         &rows, NULL, err, errlen) < 0) {
            rc = EXIT_OUTBOXD_FAILURE;
            break;
        }
        int64_t n = strtoll(pgrows_value(rows, 0, 0) ? pgrows_value(rows, 0, 0) : "0", NULL, 10);
        pgrows_free(rows);
        out->rows += n;
        if (opts->dry_run)
            break;
        out->batches++;
        if (n < opts->batch)
            break;
    }
    buf_deinit(&sql);
    return rc;
}

/* Takes the fence (see the top of this file). */
static int take_fence(PgStream *pg, int64_t older_than_ms, PruneFence *fence, char *err,
                      size_t errlen)
{
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT pg_catalog.xid(pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())),"
             " pg_catalog.pg_current_wal_insert_lsn(),"
             " pg_catalog.current_setting('wal_block_size'),"
             " (SELECT setting FROM pg_catalog.pg_settings WHERE name = 'wal_segment_size'),"
             " pg_catalog.now() - %" PRId64 " * interval '1 millisecond'",
             older_than_ms);
    PgRows *rows = NULL;
    if (pgstream_sql(pg, sql, "could not take the prune fence", &rows, NULL, err, errlen) < 0)
        return -1;
    const char *xid = pgrows_value(rows, 0, 0), *cutoff = pgrows_value(rows, 0, 4);
    uint64_t w = 0;
    long long block = strtoll(pgrows_value(rows, 0, 2) ? pgrows_value(rows, 0, 2) : "0", NULL, 10);
    long long segment =
        strtoll(pgrows_value(rows, 0, 3) ? pgrows_value(rows, 0, 3) : "0", NULL, 10);
    int rc = 0;
    if (!xid || !cutoff || !lsn_parse(pgrows_value(rows, 0, 1), &w) || block <= 0 || segment <= 0) {
        snprintf(err, errlen, "could not read the prune fence");
        rc = -1;
    } else {
        snprintf(fence->xid, sizeof(fence->xid), "%s", xid);
        snprintf(fence->cutoff, sizeof(fence->cutoff), "%s", cutoff);
        if (w % (uint64_t)segment == WAL_LONG_PAGE_HEADER)
            w -= WAL_LONG_PAGE_HEADER;
        else if (w % (uint64_t)block == WAL_SHORT_PAGE_HEADER)
            w -= WAL_SHORT_PAGE_HEADER;
        fence->lsn = w;
    }
    pgrows_free(rows);
    return rc;
}

/* Returns 0 when the slot exists here, else 3 with err set. */
static int check_slot(const PgSlotInfo *st, const char *slot, char *err, size_t errlen)
{
    if (!st->exists) {
        snprintf(err, errlen,
                 "replication slot \"%s\" does not exist: nothing confirms which outbox rows "
                 "were relayed, so prune deletes nothing (check --slot; outboxd status)",
                 slot);
        return EXIT_OUTBOXD_CHECK;
    }
    if (!st->this_db) {
        snprintf(err, errlen,
                 "replication slot \"%s\" belongs to another database: it says nothing about "
                 "this database's outbox (check --pg-url and --slot)",
                 slot);
        return EXIT_OUTBOXD_CHECK;
    }
    return 0;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Polls the slot until it confirmed fence->lsn or wait_ms passed. Returns 0, 1 (not in time)
 * or 3 (the slot went away), with err set. */
static int wait_confirmed(PgStream *pg, const char *slot, const PruneFence *fence, int64_t wait_ms,
                          char *err, size_t errlen)
{
    int64_t deadline = now_mono_us() + wait_ms * 1000;
    int64_t pause = POLL_MIN_MS;
    PgSlotInfo st;
    for (;;) {
        if (pgstream_slot_info(pg, slot, &st, err, errlen) < 0)
            return EXIT_OUTBOXD_FAILURE;
        int rc = check_slot(&st, slot, err, errlen);
        if (rc != 0)
            return rc;
        if (st.confirmed >= fence->lsn) /* 0: never confirmed */
            return 0;
        int64_t left_ms = (deadline - now_mono_us()) / 1000;
        if (left_ms <= 0)
            break;
        sleep_ms(pause < left_ms ? pause : left_ms);
        pause = pause * 2 > POLL_MAX_MS ? POLL_MAX_MS : pause * 2;
    }
    char got[18] = "nothing", need[18];
    if (st.confirmed != 0)
        lsn_format(st.confirmed, got);
    lsn_format(fence->lsn, need);
    snprintf(err, errlen,
             "the relay has confirmed slot \"%s\" only up to %s, prune needs %s (the WAL "
             "position when it started); deleted nothing. %s Check with `outboxd status`, "
             "or give it longer with --wait",
             slot, got, need,
             st.active_pid ? "Is the relay keeping up and is NATS reachable?"
                           : "No relay streams from the slot: is it running?");
    return EXIT_OUTBOXD_FAILURE;
}

static void describe_age(int64_t ms, char *out, size_t outlen)
{
    if (ms > 0 && ms % 86400000 == 0)
        snprintf(out, outlen, "%" PRId64 "d", ms / 86400000);
    else if (ms > 0 && ms % 3600000 == 0)
        snprintf(out, outlen, "%" PRId64 "h", ms / 3600000);
    else if (ms > 0 && ms % 60000 == 0)
        snprintf(out, outlen, "%" PRId64 "m", ms / 60000);
    else if (ms % 1000 == 0)
        snprintf(out, outlen, "%" PRId64 "s", ms / 1000);
    else
        snprintf(out, outlen, "%" PRId64 "ms", ms);
}

/* The column outbox table t is aged by: its occurred-at column. */
static const char *time_column(const OutboxMapper *m, size_t t, char *err, size_t errlen)
{
    const char *col = outbox_mapper_role_column(m, t, ROLE_OCCURRED_AT);
    if (!col) {
        char flag[CONFIG_ROLE_FLAG_MAX];
        config_role_flag(ROLE_OCCURRED_AT, flag);
        snprintf(err, errlen,
                 "prune ages rows by their occurred-at column, and %s has none: name a "
                 "timestamptz column with %s",
                 outbox_mapper_qualified(m, t), flag);
    }
    return col;
}

int prune_run(const Config *cfg, const PruneOptions *opts)
{
    char err[1024];
    OutboxMapper *m = NULL;
    PgStream *pg = NULL;
    int code;
    if (outbox_mapper_from_config(&m, cfg, err, sizeof(err)) < 0) {
        code = EXIT_OUTBOXD_USAGE;
        goto fail;
    }
    size_t n = outbox_mapper_ntables(m);
    for (size_t t = 0; t < n; t++) {
        if (!time_column(m, t, err, sizeof(err))) {
            code = EXIT_OUTBOXD_USAGE;
            goto fail;
        }
    }
    if (pgstream_connect_plain(&pg, cfg->pg_url, err, sizeof(err)) != 0) {
        code = EXIT_OUTBOXD_CHECK;
        goto fail;
    }
    /* The slot and the tables first: without them there is nothing to wait for. */
    PgSlotInfo st;
    if (pgstream_slot_info(pg, cfg->slot, &st, err, sizeof(err)) < 0) {
        code = EXIT_OUTBOXD_FAILURE;
        goto fail;
    }
    if ((code = check_slot(&st, cfg->slot, err, sizeof(err))) != 0)
        goto fail;
    for (size_t t = 0; t < n; t++)
        if ((code = check_table(pg, cfg->publication, outbox_mapper_schema(m, t),
                                outbox_mapper_table(m, t), time_column(m, t, err, sizeof(err)),
                                err, sizeof(err))) != 0)
            goto fail;

    /* One fence for every table: they share the slot. */
    int64_t started = now_mono_us();
    PruneFence fence;
    if (take_fence(pg, opts->older_than_ms, &fence, err, sizeof(err)) < 0) {
        code = EXIT_OUTBOXD_FAILURE;
        goto fail;
    }
    if ((code = wait_confirmed(pg, cfg->slot, &fence, opts->wait_ms, err, sizeof(err))) != 0)
        goto fail;

    char age[32], lsn[18];
    describe_age(opts->older_than_ms, age, sizeof(age));
    lsn_format(fence.lsn, lsn);
    for (size_t t = 0; t < n; t++) {
        const char *schema = outbox_mapper_schema(m, t), *table = outbox_mapper_table(m, t);
        const char *column = time_column(m, t, err, sizeof(err));
        PruneResult res;
        code = prune_table(pg, &fence, cfg->publication, schema, table, column, opts, &res, err,
                           sizeof(err));
        double secs = (double)(now_mono_us() - started) / 1e6;
        if (code == 0 && opts->dry_run)
            printf("would delete %" PRId64
                   " rows from %s.%s (%s older than %s; slot confirmed past %s);"
                   " dry run, deleted nothing (%.1f s)\n",
                   res.rows, schema, table, column, age, lsn, secs);
        else if (res.batches > 0)
            printf("deleted %" PRId64 " rows from %s.%s in %" PRId64 " batch%s of at most %" PRId64
                   " in %.1f s (%s older than %s; slot confirmed past %s)\n",
                   res.rows, schema, table, res.batches, res.batches == 1 ? "" : "es",
                   opts->batch, secs, column, age, lsn);
        if (code != 0)
            goto fail;
    }
    goto done;
fail:
    text_one_line(err);
    fprintf(stderr, "outboxd: %s\n", err);
done:
    pgstream_free(pg);
    outbox_mapper_free(m);
    return code;
}
