/*
 * replay.c - `outboxd replay`: the rows still in the outbox table, published again.
 *
 * The WAL is the relay's queue, and it is gone once confirmed; the table may still hold the
 * rows (until the application deletes them). replay reads them over an ordinary connection in
 * one REPEATABLE READ snapshot, through a cursor (memory stays bounded by one fetch and the
 * publish window), and sends each through the relay's own mapping: a Relation message is made
 * from the table's catalog columns (names and type OIDs) and an Insert message from each row's
 * text values, which a session pinned like the relay's renders exactly as pgoutput does. What a
 * replayed event cannot carry is said in its headers: Outbox-Commit-Lsn is 0/0 (a row does not
 * know its transaction's LSN) and Outbox-Commit-Time is the replay's time, as is
 * Outbox-Replay.
 *
 * Publishing goes through the Publisher (window, ack timeout, go-back-N after failures) without
 * order chaining, so acknowledgements are real and a broker hiccup only delays the replay. A
 * running relay is another writer of the stream then: with strict order its chain notices the
 * foreign messages and continues from the stream's last one (publisher.c).
 */
#include "outboxd/replay.h"

#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/outbox.h"
#include "outboxd/pgoutput.h"
#include "outboxd/pgstream.h"
#include "outboxd/publisher.h"
#include "outboxd/relay.h"
#include "outboxd/util.h"

#define FETCH_ROWS 1000
#define PROGRESS_US INT64_C(200000)
/* Rows that cannot become events are named one by one up to this many. */
#define MAX_NAMED_SKIPS 20

typedef struct Replay {
    const Config *cfg;
    const ReplayOptions *opts;
    PgStream *pg;
    OutboxMapper *mapper;
    Publisher *pub;
    PgoMessage *msg; /* the Relation, then each Insert */
    OutboxEvent ev;
    Buf sql;
    Buf where;
    size_t table;   /* the outbox table being replayed */
    uint32_t relid;
    int ncols;
    char **colnames;
    const char *col[CONFIG_NROLES]; /* the table's column for each role, NULL when none */
    int64_t total;      /* rows to replay, in the tables opened so far */
    int64_t table_rows; /* ... in the current table */
    int64_t sent;
    int64_t skipped;
    int64_t started_us; /* unix */
    int64_t started_mono;
    char stamp[32]; /* RFC 3339 of started_us */
    int64_t next_progress;
    bool tty;
    bool failed;
    char err[1024];
} Replay;

static void fail(Replay *r, const char *msg)
{
    if (r->tty)
        fputc('\n', stderr);
    fprintf(stderr, "outboxd: %s\n", msg);
}

static uint64_t acked(void)
{
    return atomic_load(&metrics.events_published) + atomic_load(&metrics.events_duplicate);
}

/* Reads the table's columns and teaches the mapper the table, as a Relation message would. */
static int learn_table(Replay *r)
{
    Buf *sql = &r->sql;
    buf_reset(sql);
    buf_puts(sql, "SELECT c.oid, a.attname, a.atttypid FROM pg_catalog.pg_class c "
                  "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                  "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid "
                  "AND a.attnum > 0 AND NOT a.attisdropped "
                  "WHERE c.relkind IN ('r', 'p') AND n.nspname = ");
    pgstream_quote_literal(sql, outbox_mapper_schema(r->mapper, r->table));
    buf_puts(sql, " AND c.relname = ");
    pgstream_quote_literal(sql, outbox_mapper_table(r->mapper, r->table));
    buf_puts(sql, " ORDER BY a.attnum");
    PgRows *rows = NULL;
    if (pgstream_sql(r->pg, sql->data, "could not read the outbox table's columns", &rows, NULL,
                     r->err, sizeof(r->err)) < 0)
        return EXIT_OUTBOXD_CHECK;
    int n = pgrows_count(rows);
    int rc = 0;
    if (n == 0 || n > PGO_MAX_COLUMNS) {
        snprintf(r->err, sizeof(r->err), "outbox table %s does not exist",
                 outbox_mapper_qualified(r->mapper, r->table));
        rc = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    PgoMessage *m = r->msg;
    memset(m, 0, offsetof(PgoMessage, cols));
    r->colnames = xcalloc((size_t)n, sizeof(char *));
    r->ncols = n;
    r->relid = (uint32_t)strtoul(pgrows_value(rows, 0, 0), NULL, 10);
    m->kind = PGO_RELATION;
    m->u.relation.relid = r->relid;
    m->u.relation.nspname = outbox_mapper_schema(r->mapper, r->table);
    m->u.relation.relname = outbox_mapper_table(r->mapper, r->table);
    m->u.relation.replident = 'd';
    m->u.relation.ncols = (uint16_t)n;
    for (int i = 0; i < n; i++) {
        r->colnames[i] = xstrdup(pgrows_value(rows, i, 1));
        m->cols[i] = (PgoColumn){
            .flags = 0,
            .name = r->colnames[i],
            .type_oid = (uint32_t)strtoul(pgrows_value(rows, i, 2), NULL, 10),
            .typmod = -1,
        };
        for (int k = 0; k < CONFIG_NROLES; k++) {
            const char *c = outbox_mapper_role_column(r->mapper, r->table, k);
            if (c && strcmp(r->colnames[i], c) == 0)
                r->col[k] = r->colnames[i];
        }
    }
    if (outbox_mapper_relation(r->mapper, m, r->err, sizeof(r->err)) < 0)
        rc = EXIT_OUTBOXD_CHECK;
done:
    pgrows_free(rows);
    return rc;
}

/* The WHERE clause of the filters into r->where. Returns 0, or 2 naming a missing column. */
static int build_filter(Replay *r)
{
    const ReplayOptions *o = r->opts;
    struct {
        const char *value;
        int role;
        const char *op;
    } f[] = {
        {o->since, ROLE_OCCURRED_AT, " >= "},
        {o->until, ROLE_OCCURRED_AT, " < "},
        {o->aggregate_id, ROLE_AGGREGATE_ID, " = "},
        {o->event_type, ROLE_EVENT_TYPE, " = "},
    };
    buf_reset(&r->where);
    for (size_t i = 0; i < ARRAY_SIZE(f); i++) {
        if (!f[i].value)
            continue;
        if (!r->col[f[i].role]) {
            char flag[CONFIG_ROLE_FLAG_MAX];
            config_role_flag(f[i].role, flag);
            snprintf(r->err, sizeof(r->err),
                     "outbox table %s has no %s column to filter on (%s names it)",
                     outbox_mapper_qualified(r->mapper, r->table), config_role_names[f[i].role],
                     flag);
            return EXIT_OUTBOXD_USAGE;
        }
        buf_puts(&r->where, r->where.len ? " AND " : " WHERE ");
        pgstream_quote_ident(&r->where, r->col[f[i].role]);
        buf_puts(&r->where, f[i].op);
        pgstream_quote_literal(&r->where, f[i].value);
        if (f[i].role == ROLE_OCCURRED_AT)
            buf_puts(&r->where, "::timestamptz");
    }
    return 0;
}

static void put_table(Replay *r, Buf *b)
{
    pgstream_quote_ident(b, outbox_mapper_schema(r->mapper, r->table));
    buf_putc(b, '.');
    pgstream_quote_ident(b, outbox_mapper_table(r->mapper, r->table));
}

/* Reads --since and --until as timestamptz, so that a bad one is named as such. */
static int check_times(Replay *r)
{
    const char *flags[] = {"--since", "--until"};
    const char *values[] = {r->opts->since, r->opts->until};
    for (size_t i = 0; i < ARRAY_SIZE(values); i++) {
        if (!values[i])
            continue;
        buf_reset(&r->sql);
        buf_puts(&r->sql, "SELECT ");
        pgstream_quote_literal(&r->sql, values[i]);
        buf_puts(&r->sql, "::timestamptz");
        char what[64], sqlstate[6] = "";
        snprintf(what, sizeof(what), "invalid %s", flags[i]);
        if (pgstream_sql(r->pg, r->sql.data, what, NULL, sqlstate, r->err, sizeof(r->err)) < 0) {
            char *context = strstr(r->err, " LINE ");
            if (context)
                *context = '\0'; /* the query text adds nothing */
            return strncmp(sqlstate, "22", 2) == 0 ? EXIT_OUTBOXD_USAGE : EXIT_OUTBOXD_FAILURE;
        }
    }
    return 0;
}

/* Opens the snapshot, counts the rows and declares the cursor over them. */
static int open_rows(Replay *r)
{
    Buf *sql = &r->sql;
    char sqlstate[6] = "";
    PgRows *rows = NULL;
    buf_reset(sql);
    buf_puts(sql, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SELECT count(*) FROM ");
    put_table(r, sql);
    buf_puts(sql, r->where.data ? r->where.data : "");
    if (pgstream_sql(r->pg, sql->data, "could not select the outbox rows", &rows, sqlstate, r->err,
                     sizeof(r->err)) < 0)
        return strncmp(sqlstate, "22", 2) == 0 ? EXIT_OUTBOXD_USAGE : EXIT_OUTBOXD_FAILURE;
    r->table_rows = strtoll(pgrows_value(rows, 0, 0) ?: "0", NULL, 10);
    r->total += r->table_rows;
    pgrows_free(rows);

    buf_reset(sql);
    buf_puts(sql, "DECLARE outboxd_replay NO SCROLL CURSOR FOR SELECT ");
    for (int i = 0; i < r->ncols; i++) {
        if (i)
            buf_puts(sql, ", ");
        pgstream_quote_ident(sql, r->colnames[i]);
    }
    buf_puts(sql, " FROM ");
    put_table(r, sql);
    buf_puts(sql, r->where.data ? r->where.data : "");
    buf_puts(sql, " ORDER BY ");
    if (r->col[ROLE_OCCURRED_AT]) {
        pgstream_quote_ident(sql, r->col[ROLE_OCCURRED_AT]);
        buf_puts(sql, ", ");
    }
    pgstream_quote_ident(sql, r->col[ROLE_EVENT_ID]);
    if (pgstream_sql(r->pg, sql->data, "could not select the outbox rows", NULL, NULL, r->err,
                     sizeof(r->err)) < 0)
        return EXIT_OUTBOXD_FAILURE;
    return 0;
}

/* Reads table r->table's columns, checks the filters and opens a snapshot and a cursor over
 * its rows. */
static int open_table(Replay *r)
{
    int code;
    if ((code = learn_table(r)) != 0 || (code = build_filter(r)) != 0 ||
        (code = check_times(r)) != 0 || (code = open_rows(r)) != 0)
        return code;
    return 0;
}

/* Ends the table's snapshot and forgets its columns. */
static void close_table(Replay *r)
{
    char err[256];
    if (r->pg)
        pgstream_sql(r->pg, "ROLLBACK", "could not end the snapshot", NULL, NULL, err,
                     sizeof(err));
    for (int i = 0; i < r->ncols; i++)
        free(r->colnames[i]);
    free(r->colnames);
    r->colnames = NULL;
    r->ncols = 0;
    memset(r->col, 0, sizeof(r->col));
}

static void progress(Replay *r, bool force)
{
    int64_t now = now_mono_us();
    if (!r->tty || (!force && now < r->next_progress))
        return;
    r->next_progress = now + PROGRESS_US;
    fprintf(stderr,
            "\rreplaying: %" PRIu64 " of %" PRId64 " events acknowledged (%" PRIu64
            " duplicates)   ",
            acked(), r->total, (uint64_t)atomic_load(&metrics.events_duplicate));
    fflush(stderr);
}

/* Takes in acknowledgements, waiting at most until `until` (monotonic µs) for one. */
static int pump(Replay *r, int64_t until, PublisherStatus *st)
{
    int64_t now = now_mono_us();
    publisher_poll(r->pub, now, st);
    if (st->failed) {
        snprintf(r->err, sizeof(r->err), "could not publish %.900s; stopping", st->failure);
        r->failed = true;
        return -1;
    }
    progress(r, false);
    if (st->inflight == 0 && until == INT64_MAX)
        return 0; /* nothing to wait for */
    int64_t deadline = until;
    int64_t next = publisher_next_deadline(r->pub);
    if (next < deadline)
        deadline = next;
    if (r->tty && r->next_progress < deadline)
        deadline = r->next_progress;
    if (deadline <= now)
        return 0;
    struct pollfd pfd = {.fd = publisher_wake_fd(r->pub), .events = POLLIN};
    if (poll_until(&pfd, 1, deadline) > 0)
        publisher_rearm(r->pub);
    return 0;
}

/* The replay's headers on a mapped event: Outbox-Replay and, with new ids, the new
 * Nats-Msg-Id and the event id it stands for. */
static void mark_replay(Replay *r, OutboxEvent *ev)
{
    char event_id[OUTBOX_MAX_EVENT_ID + 1];
    snprintf(event_id, sizeof(event_id), "%s", ev->msg_id);
    outbox_event_add_header(ev, OUTBOX_HDR_REPLAY, r->stamp, strlen(r->stamp));
    if (r->opts->new_ids) {
        char id[OUTBOX_MAX_EVENT_ID + 48];
        snprintf(id, sizeof(id), "%s:replay:%" PRId64, event_id, r->started_us / 1000000);
        outbox_event_add_header(ev, OUTBOX_HDR_EVENT_ID, event_id, strlen(event_id));
        ev->msg_id = outbox_event_set_header(ev, OUTBOX_HDR_MSG_ID, id, strlen(id));
    }
}

/* Maps and publishes one fetched row. Returns -1 when replaying must stop. */
static int publish_row(Replay *r, const PgRows *rows, int row, PublisherStatus *st)
{
    PgoMessage *m = r->msg;
    m->kind = PGO_INSERT;
    m->u.insert.relid = r->relid;
    m->u.insert.ncols = (uint16_t)r->ncols;
    for (int i = 0; i < r->ncols; i++) {
        const char *v = pgrows_value(rows, row, i);
        m->values[i] = v ? (PgoValue){.kind = 't', .data = v, .len = (uint32_t)strlen(v)}
                         : (PgoValue){.kind = 'n', .data = NULL, .len = 0};
    }
    OutboxTxn txn = {.commit_lsn = 0, .commit_time = r->started_us - PG_EPOCH_OFFSET_US};
    char why[512];
    OutboxReject rej = outbox_map_insert(r->mapper, m, &txn, &r->ev, why, sizeof(why));
    if (rej != OUTBOX_OK) {
        if (r->skipped++ < MAX_NAMED_SKIPS) {
            DeadLetter dl;
            outbox_describe_row(r->mapper, m, &txn, 0, &dl);
            char msg[1024];
            snprintf(msg, sizeof(msg), "skipped row with event id %.*s: %s",
                     dl.event_id ? (int)(dl.event_id_len > 64 ? 64 : dl.event_id_len) : 4,
                     dl.event_id ? dl.event_id : "null", why);
            text_one_line(msg);
            fail(r, msg);
        }
        return 0;
    }
    mark_replay(r, &r->ev);

    /* At most --rate events per second, and never more than the window holds. */
    int64_t due = r->opts->rate > 0 ? r->started_mono + r->sent * 1000000 / r->opts->rate : 0;
    while (!publisher_has_room(r->pub) || now_mono_us() < due) {
        if (pump(r, publisher_has_room(r->pub) ? due : INT64_MAX, st) < 0)
            return -1;
    }
    uint64_t seq;
    int rc = publisher_publish(r->pub, &r->ev, false, &seq, why, sizeof(why));
    if (rc == PUBLISH_UNPUBLISHABLE) {
        if (r->skipped++ < MAX_NAMED_SKIPS) {
            char msg[1024];
            snprintf(msg, sizeof(msg), "skipped event %s: %s", r->ev.msg_id, why);
            fail(r, msg);
        }
        return 0;
    }
    if (rc != 0) {
        snprintf(r->err, sizeof(r->err), "could not publish event %s: %s", r->ev.msg_id, why);
        r->failed = true;
        return -1;
    }
    r->sent++;
    return 0;
}

static int publish_all(Replay *r)
{
    PublisherStatus st;
    for (;;) {
        PgRows *rows = NULL;
        char fetch[64];
        snprintf(fetch, sizeof(fetch), "FETCH %d FROM outboxd_replay", FETCH_ROWS);
        if (pgstream_sql(r->pg, fetch, "could not fetch the outbox rows", &rows, NULL, r->err,
                         sizeof(r->err)) < 0)
            return -1;
        int n = pgrows_count(rows);
        int rc = 0;
        for (int i = 0; i < n && rc == 0; i++)
            rc = publish_row(r, rows, i, &st);
        pgrows_free(rows);
        if (rc < 0)
            return -1;
        if (n < FETCH_ROWS)
            break;
        if (pump(r, 0, &st) < 0)
            return -1;
    }
    /* Everything published: wait for the last acknowledgements. */
    for (;;) {
        if (pump(r, INT64_MAX, &st) < 0)
            return -1;
        if (st.inflight == 0)
            return 0;
    }
}

static void describe_filter(const ReplayOptions *o, char *out, size_t outlen)
{
    Buf b;
    buf_init(&b);
    if (o->since || o->until)
        buf_printf(&b, "occurred_at in [%s, %s)", o->since ? o->since : "-inf",
                   o->until ? o->until : "+inf");
    if (o->aggregate_id)
        buf_printf(&b, "%saggregate_id = %s", b.len ? ", " : "", o->aggregate_id);
    if (o->event_type)
        buf_printf(&b, "%sevent_type = %s", b.len ? ", " : "", o->event_type);
    snprintf(out, outlen, "%s", b.len ? b.data : "every row");
    text_one_line(out);
    buf_deinit(&b);
}

int replay_run(const Config *cfg, const ReplayOptions *opts)
{
    Replay r = {.cfg = cfg, .opts = opts, .tty = isatty(STDERR_FILENO) == 1};
    int code = EXIT_OUTBOXD_FAILURE;
    outbox_event_init(&r.ev);
    buf_init(&r.sql);
    buf_init(&r.where);
    r.msg = xmalloc(sizeof(PgoMessage));
    char filter[512];
    describe_filter(opts, filter, sizeof(filter));

    if (outbox_mapper_from_config(&r.mapper, cfg, r.err, sizeof(r.err)) < 0) {
        code = EXIT_OUTBOXD_USAGE;
        goto fail;
    }
    char tables[512];
    outbox_mapper_describe_tables(r.mapper, tables, sizeof(tables));
    if (pgstream_connect_plain(&r.pg, cfg->pg_url, r.err, sizeof(r.err)) != 0) {
        code = EXIT_OUTBOXD_CHECK;
        goto fail;
    }
    if (opts->dry_run) {
        for (r.table = 0; r.table < outbox_mapper_ntables(r.mapper); r.table++) {
            if ((code = open_table(&r)) != 0)
                goto fail;
            printf("would replay %" PRId64 " events (%s) from %s\n", r.table_rows, filter,
                   outbox_mapper_qualified(r.mapper, r.table));
            close_table(&r);
        }
        code = 0;
        goto done;
    }

    PublisherOptions po = {
        .urls = cfg->nats_url,
        .max_inflight = cfg->max_inflight,
        .max_inflight_bytes = cfg->max_inflight_bytes,
        .ack_timeout_ms = cfg->ack_timeout_ms,
        .strict_order = false,
        .retry_min_ms = cfg->retry_min_ms,
        .retry_max_ms = cfg->retry_max_ms,
        .dead_letter_subject = NULL,
        .table = tables,
    };
    int rc = publisher_new(&r.pub, &po, r.err, sizeof(r.err));
    if (rc == 0) {
        Buf f;
        buf_init(&f);
        relay_subject_filter(cfg, &f);
        StreamInfo info;
        rc = publisher_bind_stream(r.pub, f.data, &info, r.err, sizeof(r.err));
        buf_deinit(&f);
    }
    if (rc != 0) {
        code = rc == PUBLISH_CHECK_FAILED ? EXIT_OUTBOXD_CHECK : EXIT_OUTBOXD_FAILURE;
        goto fail;
    }

    r.started_us = now_unix_us();
    r.started_mono = now_mono_us();
    pg_time_format_rfc3339(r.started_us - PG_EPOCH_OFFSET_US, r.stamp);
    uint64_t dup0 = atomic_load(&metrics.events_duplicate), acked0 = acked();
    /* One table after the other, each in a snapshot of its own. */
    for (r.table = 0, rc = 0; rc == 0 && r.table < outbox_mapper_ntables(r.mapper); r.table++) {
        if ((code = open_table(&r)) != 0)
            goto fail;
        rc = publish_all(&r);
        close_table(&r);
    }
    progress(&r, true);
    if (r.tty)
        fputc('\n', stderr);
    uint64_t n = acked() - acked0, dups = atomic_load(&metrics.events_duplicate) - dup0;
    double secs = (double)(now_mono_us() - r.started_mono) / 1e6;
    printf("replayed %" PRIu64 " events (%" PRIu64 " duplicates) in %.1f s\n", n, dups, secs);
    if (rc < 0) {
        code = EXIT_OUTBOXD_FAILURE;
        printf("stopped early: %" PRId64 " of %" PRId64 " rows were not replayed\n",
               r.total - (int64_t)n - r.skipped, r.total);
        goto fail;
    }
    if (r.skipped > 0) {
        printf("skipped %" PRId64 " row%s that cannot become events\n", r.skipped,
               r.skipped == 1 ? "" : "s");
        code = EXIT_OUTBOXD_FAILURE;
        goto done;
    }
    if (n > 0 && dups == n && !opts->new_ids)
        printf("every event was still in the stream's duplicate window and was dropped by "
               "JetStream; --new-ids publishes them as new messages\n");
    code = 0;
    goto done;
fail:
    fail(&r, r.err);
done:
    close_table(&r);
    publisher_free(r.pub);
    pgstream_free(r.pg);
    outbox_mapper_free(r.mapper);
    outbox_event_deinit(&r.ev);
    buf_deinit(&r.sql);
    buf_deinit(&r.where);
    free(r.msg);
    return code;
}
