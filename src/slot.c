/*
 * slot.c - `outboxd slot ...`, `outboxd rewind` and `outboxd recover`: the relay's slot and its
 * bookmarks, handled from outside while the relay is stopped.
 *
 * What a slot allows (PostgreSQL 15): it never moves backwards; pg_replication_slot_advance
 * moves it forward, and a transaction whose commit LSN lies below the slot's position is never
 * decoded again; pg_copy_logical_replication_slot makes a second slot at the same position.
 * Going back therefore means starting again from a copy made earlier (a bookmark, see
 * bookmark.h) and moving that copy forward to exactly where the operator asked.
 *
 * Rewind order, so that a failure at any step leaves a state the relay handles: (1) copy the
 * bookmark to a scratch slot and advance the scratch slot to the target; (2) store the target
 * as the checkpoint, which drops the checkpoint's last transaction (it lies past the target:
 * the relay must not skip by it, anchor.h); (3) drop the relay's slot and copy the scratch
 * slot in its place; (4) drop the scratch slot. The relay starts at its slot's position, so
 * until (3) nothing it uses has moved, and a lower checkpoint only means resending.
 *
 * Peeking (pg_logical_slot_peek_binary_changes with pgoutput) decodes without consuming: it
 * finds the commit LSN of the first transaction at or after a time (Begin carries the commit LSN
 * and time), and counts what an advance skips. The filtering runs in the server, so only one
 * row, or two counts, cross the wire.
 */
#include "outboxd/slot.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/bookmark.h"
#include "outboxd/jetstream.h"
#include "outboxd/outbox.h"
#include "outboxd/pgoutput.h"
#include "outboxd/pgstream.h"
#include "outboxd/recovery.h"
#include "outboxd/relay.h"
#include "outboxd/util.h"

/* An advance over more WAL than this is not peeked to count what it skips. */
#define COUNT_LIMIT_BYTES (UINT64_C(1) << 30)

enum { EXIT_REFUSED = 1 };

typedef struct SlotRow {
    char name[64];
    char plugin[64];
    char type[16];
    bool this_db;
    int pid;
    bool has_confirmed;
    uint64_t confirmed;
    uint64_t restart;
    char wal_status[16];
} SlotRow;

typedef struct Slots {
    SlotRow *v;
    int n;
    uint64_t wal;   /* pg_current_wal_lsn() */
    uint64_t flush; /* pg_current_wal_flush_lsn() */
} Slots;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("outboxd: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}


static void unix_rfc3339(int64_t unix_us, char out[static 32])
{
    pg_time_format_rfc3339(unix_us - PG_EPOCH_OFFSET_US, out);
}

/* Reads the slots (only `only` when not NULL) and the server's WAL positions. */
static int read_slots(PgStream *pg, const char *only, Slots *out, char *err, size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT s.slot_name, coalesce(s.plugin, ''), s.slot_type, "
                   "coalesce(s.database = current_database(), false), coalesce(s.active_pid, 0), "
                   "coalesce(s.confirmed_flush_lsn::text, ''), coalesce(s.restart_lsn, '0/0'), "
                   "coalesce(s.wal_status, ''), w.wal, w.flush "
                   "FROM (SELECT pg_catalog.pg_current_wal_lsn() AS wal, "
                   "pg_catalog.pg_current_wal_flush_lsn() AS flush) w "
                   "LEFT JOIN pg_catalog.pg_replication_slots s ON ");
    if (only)
        pgstream_quote_literal(&sql, only);
    else
        buf_puts(&sql, "true");
    if (only)
        buf_puts(&sql, " = s.slot_name");
    buf_puts(&sql, " ORDER BY s.slot_name");
    PgRows *rows = NULL;
    int rc = pgstream_sql(pg, sql.data, "could not read the replication slots", &rows, NULL, err,
                          errlen);
    buf_deinit(&sql);
    if (rc < 0)
        return -1;
    memset(out, 0, sizeof(*out));
    int n = pgrows_count(rows);
    out->v = xcalloc((size_t)(n ? n : 1), sizeof(SlotRow));
    for (int i = 0; i < n; i++) {
        if (i == 0 && (!lsn_parse(pgrows_value(rows, 0, 8), &out->wal) ||
                       !lsn_parse(pgrows_value(rows, 0, 9), &out->flush))) {
            snprintf(err, errlen, "could not read the server's WAL position");
            rc = -1;
            break;
        }
        const char *name = pgrows_value(rows, i, 0);
        if (!name)
            continue; /* no slot at all: only the WAL positions */
        SlotRow *s = &out->v[out->n++];
        snprintf(s->name, sizeof(s->name), "%s", name);
        snprintf(s->plugin, sizeof(s->plugin), "%s", pgrows_value(rows, i, 1));
        snprintf(s->type, sizeof(s->type), "%s", pgrows_value(rows, i, 2));
        s->this_db = pgrows_true(rows, i, 3);
        s->pid = atoi(pgrows_value(rows, i, 4));
        const char *c = pgrows_value(rows, i, 5);
        s->has_confirmed = c[0] && lsn_parse(c, &s->confirmed);
        lsn_parse(pgrows_value(rows, i, 6), &s->restart);
        snprintf(s->wal_status, sizeof(s->wal_status), "%s", pgrows_value(rows, i, 7));
    }
    pgrows_free(rows);
    if (rc < 0) {
        free(out->v);
        out->v = NULL;
    }
    return rc;
}

static void slots_free(Slots *s)
{
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

static const SlotRow *find_slot(const Slots *s, const char *name)
{
    for (int i = 0; i < s->n; i++)
        if (strcmp(s->v[i].name, name) == 0)
            return &s->v[i];
    return NULL;
}

/* WAL the slot holds back from the server's position (none for a slot that lost it). */
static uint64_t retained(const SlotRow *s, uint64_t wal)
{
    return s->restart && wal > s->restart ? wal - s->restart : 0;
}

/* A slot outboxd can use: logical, pgoutput, this database. */
static bool usable_slot(const SlotRow *s, char *err, size_t errlen)
{
    if (strcmp(s->type, "logical") != 0 || strcmp(s->plugin, "pgoutput") != 0) {
        snprintf(err, errlen, "slot \"%s\" is not a logical pgoutput slot (it is %s/%s)", s->name,
                 s->type, s->plugin);
        return false;
    }
    if (!s->this_db) {
        snprintf(err, errlen, "slot \"%s\" belongs to another database: connect to that one",
                 s->name);
        return false;
    }
    return true;
}

static PgStream *connect_plain(const Config *cfg)
{
    PgStream *pg = NULL;
    char err[1024];
    if (pgstream_connect_plain(&pg, cfg->pg_url, err, sizeof(err)) != 0) {
        fail("%s", err);
        return NULL;
    }
    return pg;
}

/* Runs a statement; prints the error and returns -1 when it fails. */
static int run_sql(PgStream *pg, const Buf *sql, const char *what, PgRows **rows)
{
    char err[1024];
    if (pgstream_sql(pg, sql->data, what, rows, NULL, err, sizeof(err)) < 0) {
        fail("%s", err);
        return -1;
    }
    return 0;
}

static void put_call1(Buf *sql, const char *fn, const char *a)
{
    buf_printf(sql, "SELECT pg_catalog.%s(", fn);
    pgstream_quote_literal(sql, a);
    buf_putc(sql, ')');
}

static void put_call2(Buf *sql, const char *fn, const char *a, const char *b)
{
    buf_printf(sql, "SELECT pg_catalog.%s(", fn);
    pgstream_quote_literal(sql, a);
    buf_puts(sql, ", ");
    pgstream_quote_literal(sql, b);
    buf_putc(sql, ')');
}

/* Drops slot name; prints the error and returns -1 when that fails. */
static int drop_slot(PgStream *pg, const char *name)
{
    Buf sql;
    buf_init(&sql);
    put_call1(&sql, "pg_drop_replication_slot", name);
    int rc = run_sql(pg, &sql, "could not drop the replication slot", NULL);
    buf_deinit(&sql);
    return rc;
}

static int copy_slot(PgStream *pg, const char *from, const char *to)
{
    Buf sql;
    buf_init(&sql);
    put_call2(&sql, "pg_copy_logical_replication_slot", from, to);
    int rc = run_sql(pg, &sql, "could not copy the replication slot", NULL);
    buf_deinit(&sql);
    return rc;
}

/* pg_replication_slot_advance(slot, to); the position reached into *reached. */
static int advance_slot(PgStream *pg, const char *slot, uint64_t to, uint64_t *reached)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT end_lsn FROM pg_catalog.pg_replication_slot_advance(");
    pgstream_quote_literal(&sql, slot);
    buf_printf(&sql, ", '" LSN_FMT "')", LSN_ARGS(to));
    PgRows *rows = NULL;
    int rc = run_sql(pg, &sql, "could not advance the replication slot", &rows);
    buf_deinit(&sql);
    if (rc == 0 && (pgrows_count(rows) != 1 || !lsn_parse(pgrows_value(rows, 0, 0), reached))) {
        fail("could not advance the replication slot: unexpected answer");
        rc = -1;
    }
    pgrows_free(rows);
    return rc;
}

/* The FROM item of a peek at slot through pgoutput (protocol 1, the publication) up to upto. */
static void put_peek(Buf *sql, const char *slot, const char *publication, uint64_t upto)
{
    buf_puts(sql, "pg_catalog.pg_logical_slot_peek_binary_changes(");
    pgstream_quote_literal(sql, slot);
    buf_printf(sql, ", '" LSN_FMT "', NULL, 'proto_version', '1', 'publication_names', ",
               LSN_ARGS(upto));
    Buf names;
    buf_init(&names);
    pgstream_quote_ident(&names, publication);
    pgstream_quote_literal(sql, names.data);
    buf_deinit(&names);
    buf_puts(sql, ") AS c");
}



/*
 * The first transaction in slot's stream (decoded up to upto) committed at or after unix_us:
 * *found, and its commit LSN and time. Only transactions that publish something are seen.
 */
static int peek_first_at(PgStream *pg, const char *slot, const char *publication, uint64_t upto,
                         int64_t unix_us, bool *found, uint64_t *commit_lsn, int64_t *commit_time)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT c.data FROM ");
    put_peek(&sql, slot, publication, upto);
    /* 'B' (66): Int64 final_lsn at byte 1, Int64 commit time at byte 9 (1-based: 10). */
    buf_printf(&sql,
               " WHERE get_byte(c.data, 0) = 66 AND ('x' || encode(substring(c.data FROM 10 FOR "
               "8), 'hex'))::bit(64)::bigint >= %" PRId64 " LIMIT 1",
               unix_us - PG_EPOCH_OFFSET_US);
    PgRows *rows = NULL;
    int rc = run_sql(pg, &sql, "could not read the slot's transactions", &rows);
    buf_deinit(&sql);
    *found = false;
    if (rc == 0 && pgrows_count(rows) == 1) {
        Buf bytes;
        buf_init(&bytes);
        PgoMessage *m = xmalloc(sizeof(PgoMessage));
        char err[256];
        const char *hex = pgrows_value(rows, 0, 0);
        if (!hex || !bytea_hex_decode(hex, strlen(hex), &bytes) ||
            pgoutput_decode(bytes.data, bytes.len, m, err, sizeof(err)) < 0 ||
            m->kind != PGO_BEGIN) {
            fail("could not decode the Begin message the slot sent");
            rc = -1;
        } else {
            *found = true;
            *commit_lsn = m->u.begin.final_lsn;
            *commit_time = pg_time_to_unix_us(m->u.begin.commit_time);
        }
        free(m);
        buf_deinit(&bytes);
    }
    pgrows_free(rows);
    return rc;
}

/* How many transactions committed before upto, and outbox rows in them, slot would send. */
static int peek_count(PgStream *pg, const char *slot, const char *publication, uint64_t upto,
                      int64_t *txns, int64_t *rows_out)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT count(*) FILTER (WHERE get_byte(c.data, 0) = 66), "
                   "count(*) FILTER (WHERE get_byte(c.data, 0) = 73) FROM ");
    put_peek(&sql, slot, publication, upto);
    PgRows *rows = NULL;
    int rc = run_sql(pg, &sql, "could not count the transactions to skip", &rows);
    buf_deinit(&sql);
    if (rc == 0) {
        *txns = strtoll(pgrows_value(rows, 0, 0) ?: "0", NULL, 10);
        *rows_out = strtoll(pgrows_value(rows, 0, 1) ?: "0", NULL, 10);
    }
    pgrows_free(rows);
    return rc;
}

/* ---- the checkpoint in JetStream ------------------------------------------------------------ */

typedef struct SlotCheckpoint {
    natsConnection *nc;
    jsCtx *js;
    kvStore *kv; /* NULL when the bucket does not exist (the relay never ran) */
    char key[160];
    Checkpoint cp; /* as read: lsn 0 when there is none */
    uint64_t lsn;  /* cp.lsn */
} SlotCheckpoint;

static void checkpoint_close(SlotCheckpoint *c)
{
    kvStore_Destroy(c->kv);
    jsCtx_Destroy(c->js);
    natsConnection_Destroy(c->nc);
    memset(c, 0, sizeof(*c));
}

/* The system id of the database (IDENTIFY_SYSTEM on a replication connection). */
static int system_id(const Config *cfg, char *out, size_t outlen)
{
    PgStream *rep = NULL;
    PgSystem sys;
    char err[1024];
    int rc = pgstream_connect(&rep, cfg->pg_url, err, sizeof(err));
    if (rc == 0 && pgstream_identify(rep, &sys, err, sizeof(err)) < 0)
        rc = -1;
    pgstream_free(rep);
    if (rc != 0) {
        fail("%s", err);
        return -1;
    }
    snprintf(out, outlen, "%s", sys.system_id);
    return 0;
}

/* Opens the checkpoint of cfg's slot and reads it. Returns 0, or -1 (printed). */
static int checkpoint_open(const Config *cfg, SlotCheckpoint *c)
{
    memset(c, 0, sizeof(*c));
    char sysid[32], err[1024];
    if (system_id(cfg, sysid, sizeof(sysid)) < 0)
        return -1;
    snprintf(c->key, sizeof(c->key), "%s.%s", sysid, cfg->slot);
    c->nc = jsapi_connect_once(cfg->nats_url, err, sizeof(err));
    if (!c->nc) {
        fail("%s", err);
        return -1;
    }
    natsStatus s = natsConnection_JetStream(&c->js, c->nc, NULL);
    if (s == NATS_OK) {
        s = js_KeyValue(&c->kv, c->js, cfg->checkpoint_bucket);
        if (s == NATS_NOT_FOUND) {
            c->kv = NULL;
            return 0;
        }
    }
    if (s != NATS_OK) {
        fail("could not open the checkpoint bucket \"%s\": %s", cfg->checkpoint_bucket,
             natsStatus_GetText(s));
        checkpoint_close(c);
        return -1;
    }
    if (jsapi_checkpoint_read(c->js, cfg->checkpoint_bucket, c->key, &c->cp, err, sizeof(err)) <
        0) {
        fail("%s", err);
        checkpoint_close(c);
        return -1;
    }
    c->lsn = c->cp.lsn;
    return 0;
}

/* Stores lsn as the checkpoint's position, keeping what else it holds. */
static int checkpoint_put(const Config *cfg, SlotCheckpoint *c, uint64_t lsn)
{
    if (!c->kv)
        return 0;
    Checkpoint next = c->cp;
    next.lsn = lsn;
    if (next.commit_lsn >= lsn) /* a transaction past the position is no anchor any more */
        next.commit_lsn = 0;
    snprintf(next.slot, sizeof(next.slot), "%s", cfg->slot);
    Buf value;
    buf_init(&value);
    checkpoint_encode(&next, &value);
    uint64_t rev;
    natsStatus s = kvStore_Put(&rev, c->kv, c->key, value.data, (int)value.len);
    buf_deinit(&value);
    if (s != NATS_OK) {
        char text[18];
        fail("could not store the checkpoint %s under %s in bucket \"%s\": %s",
             lsn_format(lsn, text), c->key, cfg->checkpoint_bucket, natsStatus_GetText(s));
        return -1;
    }
    c->cp = next;
    c->lsn = lsn;
    return 0;
}

/* ---- slot list ---------------------------------------------------------------------------- */

/* For a bookmark ("<slot>_bm_<digits>"): the slot it belongs to, its time, and whether that
 * slot is gone (the bookmark then only holds WAL for nothing). */
static bool bookmark_of(const Slots *all, const char *name, char *base, size_t baselen,
                        int64_t *unix_s, bool *orphan)
{
    const char *p = strstr(name, BOOKMARK_SUFFIX);
    const char *last = NULL;
    for (; p; p = strstr(p + 1, BOOKMARK_SUFFIX))
        last = p;
    size_t n = last ? (size_t)(last - name) : 0;
    if (n == 0 || n >= baselen)
        return false;
    memcpy(base, name, n);
    base[n] = '\0';
    if (!bookmark_parse(base, name, unix_s))
        return false;
    *orphan = find_slot(all, base) == NULL;
    return true;
}

static int slot_list(const Config *cfg, PgStream *pg, bool as_json)
{
    Slots all;
    char err[1024];
    if (read_slots(pg, NULL, &all, err, sizeof(err)) < 0) {
        fail("%s", err);
        return EXIT_OUTBOXD_CHECK;
    }
    json_t *arr = as_json ? json_array() : NULL;
    int shown = 0;
    if (!as_json)
        printf("%-40s %-10s %-10s %-12s %-10s %-10s %-10s %s\n", "SLOT", "PLUGIN", "HELD BY",
               "CONFIRMED", "LAG", "RETAINED", "WAL", "NOTE");
    for (int i = 0; i < all.n; i++) {
        const SlotRow *s = &all.v[i];
        if (strcmp(s->type, "logical") != 0 || !s->this_db)
            continue;
        shown++;
        char base[64], note[256] = "", when[32], lsn[18], lag[32], kept[32];
        int64_t t;
        bool orphan = false;
        bool is_bm = bookmark_of(&all, s->name, base, sizeof(base), &t, &orphan);
        if (strcmp(s->name, cfg->slot) == 0) {
            snprintf(note, sizeof(note), "the relay's slot");
        } else if (is_bm) {
            unix_rfc3339(t * 1000000, when);
            snprintf(note, sizeof(note), "bookmark of \"%s\", position as of %s%s", base, when,
                     orphan ? " (that slot is gone: this only holds WAL)" : "");
        }
        uint64_t lagb = s->has_confirmed && all.wal > s->confirmed ? all.wal - s->confirmed : 0;
        uint64_t keptb = retained(s, all.wal);
        if (as_json) {
            json_t *o = json_object();
            json_object_set_new(o, "name", json_string(s->name));
            json_object_set_new(o, "plugin", json_string(s->plugin));
            json_object_set_new(o, "active_pid", s->pid ? json_integer(s->pid) : json_null());
            json_object_set_new(o, "confirmed_lsn",
                                s->has_confirmed ? json_string(lsn_format(s->confirmed, lsn))
                                                 : json_null());
            json_object_set_new(o, "lag_bytes", json_integer((json_int_t)lagb));
            json_object_set_new(o, "wal_retained_bytes", json_integer((json_int_t)keptb));
            json_object_set_new(o, "wal_status", json_string(s->wal_status));
            json_object_set_new(o, "relay_slot", json_boolean(strcmp(s->name, cfg->slot) == 0));
            json_object_set_new(o, "bookmark_of", is_bm ? json_string(base) : json_null());
            if (is_bm) {
                unix_rfc3339(t * 1000000, when);
                json_object_set_new(o, "bookmark_time", json_string(when));
                json_object_set_new(o, "bookmark_orphaned", json_boolean(orphan));
            }
            json_array_append_new(arr, o);
            continue;
        }
        char held[24] = "-";
        if (s->pid)
            snprintf(held, sizeof(held), "PID %d", s->pid);
        format_bytes_human(lagb, lag, sizeof(lag));
        format_bytes_human(keptb, kept, sizeof(kept));
        printf("%-40s %-10s %-10s %-12s %-10s %-10s %-10s %s\n", s->name, s->plugin, held,
               s->has_confirmed ? lsn_format(s->confirmed, lsn) : "-", lag, kept,
               s->wal_status[0] ? s->wal_status : "-", note);
    }
    if (as_json) {
        char *text = json_dumps(arr, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", text ? text : "[]");
        free(text);
        json_decref(arr);
    } else if (shown == 0) {
        printf("(no logical replication slots in this database)\n");
    }
    slots_free(&all);
    return 0;
}

/* ---- slot create ---------------------------------------------------------------------------- */

static int slot_create(const Config *cfg, PgStream *pg)
{
    char err[1024];
    OutboxMapper *mapper = NULL;
    PgStream *rep = NULL;
    PgRows *rows = NULL;
    int code = EXIT_REFUSED;
    if (cfg->bookmark_every_ms > 0 && bookmark_check_slot(cfg->slot, err, sizeof(err)) < 0) {
        fail("%s", err);
        return EXIT_OUTBOXD_USAGE;
    }
    if (outbox_mapper_from_config(&mapper, cfg, err, sizeof(err)) < 0) {
        fail("%s", err);
        return EXIT_OUTBOXD_USAGE;
    }
    char tables[512];
    outbox_mapper_describe_tables(mapper, tables, sizeof(tables));
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = ");
    pgstream_quote_literal(&sql, cfg->publication);
    buf_puts(&sql, ")");
    if (run_sql(pg, &sql, "could not read the publications", &rows) < 0)
        goto done;
    bool had_publication = pgrows_true(rows, 0, 0);
    int rc = pgstream_connect(&rep, cfg->pg_url, err, sizeof(err));
    if (rc != 0) {
        fail("%s", err);
        code = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    PgSetup setup = {
        .slot = cfg->slot,
        .publication = cfg->publication,
        .mapper = mapper,
        .create = true,
        .failover = cfg->failover_slot,
    };
    bool created = false;
    rc = pgstream_setup(rep, &setup, &created, err, sizeof(err));
    if (rc != 0) {
        fail("%s", err);
        code = rc == PGSTREAM_CHECK_FAILED ? EXIT_OUTBOXD_CHECK : EXIT_REFUSED;
        goto done;
    }
    if (had_publication)
        printf("publication \"%s\" already there (covers %s)\n", cfg->publication, tables);
    else
        printf("created publication \"%s\" for %s (inserts only)\n", cfg->publication, tables);
    Slots one;
    char lsn[18] = "?";
    if (read_slots(pg, cfg->slot, &one, err, sizeof(err)) == 0) {
        if (one.n == 1 && one.v[0].has_confirmed)
            lsn_format(one.v[0].confirmed, lsn);
        slots_free(&one);
    }
    if (created)
        printf("created replication slot \"%s\" at %s: the relay publishes every transaction "
               "committed after it\n",
               cfg->slot, lsn);
    else
        printf("replication slot \"%s\" already there (at %s)\n", cfg->slot, lsn);
    code = 0;
done:
    pgrows_free(rows);
    buf_deinit(&sql);
    pgstream_free(rep);
    outbox_mapper_free(mapper);
    return code;
}

/* ---- a lost slot ---------------------------------------------------------------------------- */

void slot_lost_detail(const char *slot, char *out, size_t outlen)
{
    snprintf(out, outlen,
             "replication slot \"%s\" is lost: PostgreSQL removed WAL it still needed "
             "(wal_status lost; the slot fell further behind than max_slot_wal_keep_size), so it "
             "can never stream again",
             slot);
}

void slot_lost_fix(const char *slot, char *out, size_t outlen)
{
    snprintf(out, outlen,
             "run outboxd recover --slot=%s --yes (same --pg-url), then start outboxd: it makes "
             "a new slot and publishes the rows committed since the last relayed transaction "
             "that the stream lacks, in commit order, nothing twice (--slot-recovery=auto does "
             "this by itself; outboxd slot drop --yes instead starts afresh with a full "
             "backfill); events committed since then whose rows were deleted were not relayed "
             "and must be recovered from the application; raise max_slot_wal_keep_size or alert "
             "on outboxd_replication_lag_bytes so it does not happen again",
             slot);
}

/* ---- slot drop ------------------------------------------------------------------------------ */

/* The slot was dropped on purpose: its checkpoint goes too, so the next relay starts afresh (a
 * new slot, a backfill) instead of refusing a slot that its checkpoint says should exist. */
static void forget_checkpoint(const Config *cfg)
{
    SlotCheckpoint ck;
    if (checkpoint_open(cfg, &ck) < 0) {
        fail("the checkpoint of slot \"%s\" is left in bucket \"%s\": remove its key by hand "
             "(<system id>.%s) before starting outboxd, or it refuses the missing slot",
             cfg->slot, cfg->checkpoint_bucket, cfg->slot);
        return;
    }
    if (ck.kv && ck.cp.lsn != 0) {
        natsStatus st = kvStore_Delete(ck.kv, ck.key);
        if (st == NATS_OK)
            printf("removed checkpoint %s from bucket \"%s\": the next relay starts afresh\n",
                   ck.key, cfg->checkpoint_bucket);
        else
            fail("could not remove checkpoint %s from bucket \"%s\": %s", ck.key,
                 cfg->checkpoint_bucket, natsStatus_GetText(st));
    }
    checkpoint_close(&ck);
}

/* The bookmarks of slot in all, oldest first (all is sorted by name, and the names by time). */
static int bookmarks_in(const Slots *all, const char *slot, const SlotRow **out, int max)
{
    int n = 0;
    for (int i = 0; i < all->n && n < max; i++) {
        int64_t t;
        if (bookmark_parse(slot, all->v[i].name, &t))
            out[n++] = &all->v[i];
    }
    return n;
}

/* Refuses (printing why) when a session holds the slot. */
static bool refuse_active(const SlotRow *s, const char *doing)
{
    if (!s->pid)
        return false;
    fail("replication slot \"%s\" is held by PID %d (a running relay?): stop it before %s", s->name,
         s->pid, doing);
    return true;
}

#define MAX_BOOKMARKS 4096

static int slot_drop(const Config *cfg, PgStream *pg, const SlotOptions *opts)
{
    Slots all;
    char err[1024], lsn[18], kept[32];
    if (read_slots(pg, NULL, &all, err, sizeof(err)) < 0) {
        fail("%s", err);
        return EXIT_OUTBOXD_CHECK;
    }
    bool the_slot = !opts->bookmarks_only;
    bool the_bookmarks = opts->with_bookmarks || opts->bookmarks_only;
    int code = EXIT_REFUSED;
    const SlotRow **bms = xcalloc(MAX_BOOKMARKS, sizeof(*bms));
    int nbm = bookmarks_in(&all, cfg->slot, bms, MAX_BOOKMARKS);
    const SlotRow *s = the_slot ? find_slot(&all, cfg->slot) : NULL;
    if (the_slot && !s && !(the_bookmarks && nbm > 0)) {
        fail("replication slot \"%s\" does not exist", cfg->slot);
        goto done;
    }
    if (!the_slot && nbm == 0) {
        printf("slot \"%s\" has no bookmarks\n", cfg->slot);
        code = 0;
        goto done;
    }
    if (s && refuse_active(s, "dropping the slot"))
        goto done;
    if (!opts->yes) {
        if (s) {
            format_bytes_human(retained(s, all.wal), kept, sizeof(kept));
            printf("would drop replication slot \"%s\" (confirmed %s, holding %s of WAL)\n",
                   s->name, s->has_confirmed ? lsn_format(s->confirmed, lsn) : "-", kept);
            printf("a relay started afterwards creates a new slot at the server's WAL position "
                   "then: transactions committed in between are never published\n");
        }
        if (nbm > 0) {
            format_bytes_human(retained(bms[0], all.wal), kept, sizeof(kept));
            printf("%s %d bookmark%s of \"%s\" (%s ... %s, the oldest holding %s of WAL)%s\n",
                   the_bookmarks ? "would drop" : "would keep", nbm, nbm == 1 ? "" : "s", cfg->slot,
                   bms[0]->name, bms[nbm - 1]->name, kept,
                   the_bookmarks ? "" : ": they hold WAL until dropped (add --with-bookmarks)");
        }
        printf("run again with --yes to do it\n");
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    if (s) {
        if (drop_slot(pg, s->name) < 0)
            goto done;
        printf("dropped replication slot \"%s\" (it was at %s)\n", s->name,
               s->has_confirmed ? lsn_format(s->confirmed, lsn) : "-");
        forget_checkpoint(cfg);
    }
    int dropped = 0;
    for (int i = 0; the_bookmarks && i < nbm; i++) {
        if (bms[i]->pid) {
            fail("bookmark \"%s\" is held by PID %d; left in place", bms[i]->name, bms[i]->pid);
            continue;
        }
        if (drop_slot(pg, bms[i]->name) == 0)
            dropped++;
    }
    if (the_bookmarks)
        printf("dropped %d of %d bookmark%s of \"%s\"\n", dropped, nbm, nbm == 1 ? "" : "s",
               cfg->slot);
    else if (nbm > 0)
        printf("kept %d bookmark%s of \"%s\": they hold WAL until dropped (outboxd slot drop "
               "--bookmarks-only --yes)\n",
               nbm, nbm == 1 ? "" : "s", cfg->slot);
    code = dropped == (the_bookmarks ? nbm : 0) ? 0 : EXIT_REFUSED;
done:
    free(bms);
    slots_free(&all);
    return code;
}

/* ---- slot advance --------------------------------------------------------------------------- */

static int slot_advance(const Config *cfg, PgStream *pg, const SlotOptions *opts)
{
    uint64_t target;
    const char *arg = opts->to ? opts->to : opts->past_commit;
    if ((opts->to != NULL) == (opts->past_commit != NULL)) {
        fail("slot advance needs either --to LSN or --past-commit LSN");
        return EXIT_OUTBOXD_USAGE;
    }
    if (!lsn_parse(arg, &target)) {
        fail("invalid LSN '%s': expected the form 0/16B3748", arg);
        return EXIT_OUTBOXD_USAGE;
    }
    if (opts->past_commit)
        target++; /* a transaction whose commit LSN is below the slot's position never comes */
    Slots one;
    char err[1024], a[18], b[18], range[32];
    if (read_slots(pg, cfg->slot, &one, err, sizeof(err)) < 0) {
        fail("%s", err);
        return EXIT_OUTBOXD_CHECK;
    }
    int code = EXIT_REFUSED;
    const SlotRow *s = one.n == 1 ? &one.v[0] : NULL;
    if (!s) {
        fail("replication slot \"%s\" does not exist", cfg->slot);
        goto done;
    }
    if (!usable_slot(s, err, sizeof(err))) {
        fail("%s", err);
        goto done;
    }
    if (refuse_active(s, "advancing it"))
        goto done;
    lsn_format(s->confirmed, a);
    lsn_format(target, b);
    if (target < s->confirmed) {
        fail("slot \"%s\" is at %s, past %s: a slot cannot move backwards (outboxd rewind goes "
             "back to a bookmark)",
             s->name, a, b);
        goto done;
    }
    if (target == s->confirmed) {
        printf("slot \"%s\" is at %s already: nothing to skip\n", s->name, a);
        code = 0;
        goto done;
    }
    if (target > one.flush) {
        char f[18];
        fail("%s is past the server's flushed WAL (%s): nothing can be skipped there yet", b,
             lsn_format(one.flush, f));
        goto done;
    }
    format_bytes_human(target - s->confirmed, range, sizeof(range));
    int64_t txns = -1, rows = -1;
    if (target - s->confirmed <= COUNT_LIMIT_BYTES &&
        peek_count(pg, s->name, cfg->publication, target, &txns, &rows) < 0)
        goto done;
    char counted[160];
    if (txns >= 0)
        snprintf(counted, sizeof(counted),
                 "%" PRId64 " transaction%s with %" PRId64 " outbox row%s", txns,
                 txns == 1 ? "" : "s", rows, rows == 1 ? "" : "s");
    else
        snprintf(counted, sizeof(counted), "(not counted: more than 1 GiB of WAL)");
    if (!opts->yes) {
        printf("would advance slot \"%s\" from %s to %s (%s of WAL), skipping %s: they are "
               "never published\n",
               s->name, a, b, range, counted);
        printf("run again with --yes to do it\n");
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    uint64_t reached;
    if (advance_slot(pg, s->name, target, &reached) < 0)
        goto done;
    printf("advanced slot \"%s\" from %s to %s, skipped %s\n", s->name, a, lsn_format(reached, b),
           counted);
    /* PostgreSQL writes a slot's advanced position to disk only at its next checkpoint, and
     * the relay starts at the slot's position: make the advance durable now. */
    char why[512];
    if (pgstream_sql(pg, "CHECKPOINT", "could not write a database checkpoint", NULL, NULL, why,
                     sizeof(why)) == 0)
        printf("wrote a database checkpoint: the advance survives a crash of the database\n");
    else
        fail("%s (it needs the pg_checkpoint role or a superuser); until the server's next "
             "checkpoint, a crash of the database brings the skipped transactions back: run "
             "CHECKPOINT as a superuser now",
             why);
    code = 0;
done:
    slots_free(&one);
    return code;
}

int slot_run(const Config *cfg, const SlotOptions *opts)
{
    PgStream *pg = connect_plain(cfg);
    if (!pg)
        return EXIT_OUTBOXD_CHECK;
    int code;
    switch (opts->action) {
    case SLOT_LIST:
        code = slot_list(cfg, pg, opts->json);
        break;
    case SLOT_CREATE:
        code = slot_create(cfg, pg);
        break;
    case SLOT_DROP:
        code = slot_drop(cfg, pg, opts);
        break;
    default:
        code = slot_advance(cfg, pg, opts);
        break;
    }
    pgstream_free(pg);
    return code;
}

/* ---- rewind --------------------------------------------------------------------------------- */

/* Reads text as a timestamptz in the server (times without a zone are UTC). */
static int parse_time(PgStream *pg, const char *text, int64_t *unix_us)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT (extract(epoch FROM ");
    pgstream_quote_literal(&sql, text);
    buf_puts(&sql, "::timestamptz) * 1000000)::bigint");
    PgRows *rows = NULL;
    char err[1024];
    int rc = pgstream_sql(pg, sql.data, "invalid time", &rows, NULL, err, sizeof(err));
    buf_deinit(&sql);
    if (rc < 0) {
        char *context = strstr(err, " LINE ");
        if (context)
            *context = '\0'; /* the query text adds nothing */
        fail("%s (give an LSN such as 0/16B3748 or a time such as 2026-11-22T17:26:18Z)", err);
    } else {
        *unix_us = strtoll(pgrows_value(rows, 0, 0) ?: "0", NULL, 10);
    }
    pgrows_free(rows);
    return rc;
}

typedef struct Plan {
    const SlotRow *slot; /* NULL when the relay's slot is gone */
    const SlotRow *bookmark;
    int64_t bookmark_s;
    uint64_t position;   /* where the relay would start now: max(slot, checkpoint) */
    uint64_t target;     /* the new position */
    bool found;          /* TIME: a transaction at or after it */
    int64_t commit_time; /* its commit time (unix µs) */
} Plan;

int rewind_run(const Config *cfg, const RewindOptions *opts)
{
    uint64_t to_lsn = 0;
    int64_t to_us = 0;
    bool by_lsn = lsn_parse(opts->to, &to_lsn);
    char err[1024], a[18], b[18], c[18], when[32], tmp[96];
    SlotCheckpoint ck = {0};
    Slots all = {0};
    Plan plan = {0};
    int code = EXIT_REFUSED;
    PgStream *pg = connect_plain(cfg);
    if (!pg)
        return EXIT_OUTBOXD_CHECK;
    if (!by_lsn && parse_time(pg, opts->to, &to_us) < 0) {
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    if (bookmark_check_slot(cfg->slot, err, sizeof(err)) < 0) {
        fail("%s", err);
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    if (read_slots(pg, NULL, &all, err, sizeof(err)) < 0) {
        fail("%s", err);
        code = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    plan.slot = find_slot(&all, cfg->slot);
    if (plan.slot && !usable_slot(plan.slot, err, sizeof(err))) {
        fail("%s", err);
        goto done;
    }
    if (plan.slot && refuse_active(plan.slot, "rewinding"))
        goto done;

    /* The newest bookmark at or before the target. */
    for (int i = 0; i < all.n; i++) {
        int64_t t;
        const SlotRow *s = &all.v[i];
        if (!bookmark_parse(cfg->slot, s->name, &t) || strcmp(s->type, "logical") != 0 ||
            !s->this_db || !s->has_confirmed)
            continue;
        bool before = by_lsn ? s->confirmed <= to_lsn : t * 1000000 <= to_us;
        if (before && (!plan.bookmark || t > plan.bookmark_s)) {
            plan.bookmark = s;
            plan.bookmark_s = t;
        }
    }
    if (!plan.bookmark) {
        if (by_lsn)
            fail("no bookmark of slot \"%s\" is at or before %s: nothing to rewind to (see "
                 "outboxd slot list; bookmarks are made with --bookmark-every)",
                 cfg->slot, opts->to);
        else
            fail("no bookmark of slot \"%s\" was taken at or before %s: nothing to rewind to "
                 "(see outboxd slot list; bookmarks are made with --bookmark-every)",
                 cfg->slot, opts->to);
        goto done;
    }
    unix_rfc3339(plan.bookmark_s * 1000000, when);
    if (strcmp(plan.bookmark->wal_status, "lost") == 0) {
        fail("bookmark \"%s\" (%s) has lost the WAL it needs (max_slot_wal_keep_size): it cannot "
             "be used; the events of that time can only be replayed from the table (outboxd "
             "replay)",
             plan.bookmark->name, when);
        goto done;
    }
    if (plan.bookmark->pid) {
        fail("bookmark \"%s\" is held by PID %d", plan.bookmark->name, plan.bookmark->pid);
        goto done;
    }

    /* Where the relay would start now: the later of the slot and the checkpoint. */
    if (checkpoint_open(cfg, &ck) < 0) {
        code = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    plan.position = plan.slot ? plan.slot->confirmed : 0;
    if (ck.lsn > plan.position && ck.lsn <= all.wal)
        plan.position = ck.lsn;

    if (by_lsn) {
        plan.target = to_lsn;
    } else {
        /* Decoded up to the WAL flushed before the peek: whatever commits later comes anyway. */
        plan.target = all.flush;
        if (peek_first_at(pg, plan.bookmark->name, cfg->publication, all.flush, to_us, &plan.found,
                          &plan.target, &plan.commit_time) < 0)
            goto done;
        if (!plan.found)
            plan.target = all.flush;
    }

    printf("slot \"%s\": %s", cfg->slot,
           plan.slot ? "" : "missing (it is made again from the bookmark)");
    if (plan.slot)
        printf("confirmed %s", lsn_format(plan.slot->confirmed, a));
    if (ck.kv)
        printf(", checkpoint %s", ck.lsn ? lsn_format(ck.lsn, b) : "none");
    printf("\nbookmark %s: position %s as of %s%s\n", plan.bookmark->name,
           lsn_format(plan.bookmark->confirmed, a), when,
           strcmp(plan.bookmark->wal_status, "unreserved") == 0
               ? " (WAL status unreserved: it is about to be lost)"
               : "");
    if (!by_lsn) {
        char t1[32], t2[32];
        unix_rfc3339(to_us, t1);
        if (plan.found) {
            unix_rfc3339(plan.commit_time, t2);
            printf("first transaction committed at or after %s: commit LSN %s at %s\n", t1,
                   lsn_format(plan.target, a), t2);
        } else {
            printf("no transaction committed at or after %s up to %s\n", t1,
                   lsn_format(plan.target, a));
        }
    }
    if (plan.slot && plan.target >= plan.position) {
        printf("the relay is at %s, not after %s: nothing to rewind%s\n",
               lsn_format(plan.position, a), lsn_format(plan.target, b),
               plan.target > plan.position ? " (outboxd slot advance skips forward)" : "");
        code = 0;
        goto done;
    }
    lsn_format(plan.target, b);
    if (!opts->yes) {
        printf("would copy the bookmark, advance the copy to %s, store checkpoint %s (bucket "
               "\"%s\"), drop slot \"%s\" and put the copy in its place\n",
               b, b, cfg->checkpoint_bucket, cfg->slot);
        printf("the relay would then publish again every transaction committed at or after %s; "
               "JetStream drops, as duplicates, those still in its duplicate window\n",
               b);
        printf("run again with --yes to do it (with the relay stopped)\n");
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }

    /* (1) a scratch copy of the bookmark, moved to the target */
    snprintf(tmp, sizeof(tmp), "%s_rw_%" PRId64, cfg->slot, now_unix_us() / 1000000);
    if (copy_slot(pg, plan.bookmark->name, tmp) < 0)
        goto done;
    uint64_t reached = plan.bookmark->confirmed;
    if (plan.target > plan.bookmark->confirmed &&
        advance_slot(pg, tmp, plan.target, &reached) < 0) {
        drop_slot(pg, tmp);
        goto done;
    }
    if (reached != plan.target) {
        fail("the copy of the bookmark reached %s instead of %s; nothing was changed",
             lsn_format(reached, a), b);
        drop_slot(pg, tmp);
        goto done;
    }
    /* (2) the checkpoint: the relay starts at the later of it and the slot */
    if (checkpoint_put(cfg, &ck, plan.target) < 0) {
        fail("nothing was changed");
        drop_slot(pg, tmp);
        goto done;
    }
    /* (3) the scratch copy in the place of the relay's slot */
    if (plan.slot && drop_slot(pg, cfg->slot) < 0) {
        fail("the relay's slot is unchanged (the checkpoint was lowered to %s: a relay started "
             "now resends from its slot, JetStream drops what it holds)",
             b);
        drop_slot(pg, tmp);
        goto done;
    }
    if (copy_slot(pg, tmp, cfg->slot) < 0) {
        fail("slot \"%s\" is dropped and its replacement is slot \"%s\": finish by hand with "
             "SELECT pg_copy_logical_replication_slot('%s', '%s'), then drop \"%s\"",
             cfg->slot, tmp, tmp, cfg->slot, tmp);
        goto done;
    }
    /* A copy is never a failover slot: make it one again, or a failover loses it. */
    if (cfg->failover_slot && pgstream_server_version(pg) >= 170000) {
        PgStream *rep = NULL;
        char ferr[512];
        if (pgstream_connect(&rep, cfg->pg_url, ferr, sizeof(ferr)) != 0 ||
            pgstream_set_failover(rep, cfg->slot, ferr, sizeof(ferr)) < 0)
            fail("slot \"%s\" is rewound, but is not a failover slot: %s (run "
                 "ALTER_REPLICATION_SLOT \"%s\" (FAILOVER true) on a replication connection)",
                 cfg->slot, ferr, cfg->slot);
        else
            printf("slot \"%s\" is a failover slot\n", cfg->slot);
        pgstream_free(rep);
    }
    /* (4) */
    if (drop_slot(pg, tmp) < 0)
        fail("drop the scratch slot \"%s\" by hand: it holds WAL", tmp);
    printf("rewound slot \"%s\" to %s from bookmark %s%s%s\n", cfg->slot, b, plan.bookmark->name,
           plan.slot ? ", was at " : "", plan.slot ? lsn_format(plan.position, c) : "");
    if (ck.kv)
        printf("stored checkpoint %s under %s in bucket \"%s\"\n", b, ck.key,
               cfg->checkpoint_bucket);
    printf("start the relay: it publishes again every transaction committed at or after %s\n", b);
    code = 0;
done:
    checkpoint_close(&ck);
    slots_free(&all);
    pgstream_free(pg);
    return code;
}

/* ---- recover ------------------------------------------------------------------------------- */

int recover_run(const Config *cfg, const RecoverOptions *opts)
{
    PgStream *pg = connect_plain(cfg);
    if (!pg)
        return EXIT_OUTBOXD_CHECK;
    SlotCheckpoint ck;
    int code = EXIT_OUTBOXD_FAILURE;
    char err[1024], stream[256];
    if (checkpoint_open(cfg, &ck) < 0) {
        pgstream_free(pg);
        return EXIT_OUTBOXD_CHECK;
    }
    PgSlotInfo slot;
    if (pgstream_slot_info(pg, cfg->slot, &slot, err, sizeof(err)) < 0) {
        fail("%s", err);
        goto done;
    }
    bool lost = slot.exists && strcmp(slot.wal_status, "lost") == 0;
    if (slot.exists && !lost) {
        fail("replication slot \"%s\" exists and is not lost (wal_status %s): the relay resumes "
             "from it, there is nothing to recover",
             cfg->slot, slot.wal_status[0] ? slot.wal_status : "unknown");
        goto done;
    }
    if (lost && slot.active_pid) {
        fail("replication slot \"%s\" is lost but still held by PID %d: stop that session (the "
             "relay) first",
             cfg->slot, slot.active_pid);
        goto done;
    }
    if (!ck.kv) {
        fail("there is no checkpoint bucket \"%s\": outboxd never relayed to this NATS; start "
             "outboxd instead (a new slot backfills the rows in the outbox)",
             cfg->checkpoint_bucket);
        goto done;
    }
    Buf filter;
    buf_init(&filter);
    relay_subject_filter(cfg, &filter);
    bool found = false;
    int rc = jsapi_find_stream(ck.nc, filter.data, stream, sizeof(stream), &found, err,
                               sizeof(err));
    if (rc == 0 && !found)
        snprintf(err, sizeof(err), "no JetStream stream captures %s", filter.data);
    buf_deinit(&filter);
    if (rc < 0 || !found) {
        fail("%s", err);
        code = EXIT_OUTBOXD_CHECK;
        goto done;
    }
    /* The checkpoint's key is "<system id>.<slot>"; the events' source "<system id>/<slot>". */
    char source[ANCHOR_SOURCE_MAX];
    snprintf(source, sizeof(source), "%.*s/%s", (int)strcspn(ck.key, "."), ck.key, cfg->slot);
    RecoveryCut cut;
    rc = recovery_cut(ck.nc, stream, source, &ck.cp, &cut, err, sizeof(err));
    if (rc < 0) {
        fail("%s", err);
        goto done;
    }
    if (rc == 0) {
        fail("neither stream %s nor the checkpoint names a transaction relayed from slot \"%s\": "
             "nothing says where a recovery would start; drop the slot (outboxd slot drop "
             "--yes) and start outboxd for a full backfill",
             stream, cfg->slot);
        goto done;
    }
    char when[32];
    pg_time_format_rfc3339(cut.commit_time, when);
    printf("slot \"%s\": %s\n", cfg->slot,
           lost ? "lost (wal_status lost: PostgreSQL removed WAL it still needed)"
                : "missing (after a failover to a standby without it, or dropped)");
    printf("last transaction relayed: committed at %s (%s)\n", when, cut.from);
    printf("%s: %srecord a recovery from then in the checkpoint (bucket \"%s\", key %s); the "
           "next start of outboxd makes slot \"%s\" anew and publishes the rows committed since "
           "%s that stream %s lacks (read from the stream, not the duplicate window), in commit "
           "order; rows deleted from the outbox since then cannot be recovered\n",
           opts->yes ? "doing" : "would", lost ? "drop the lost slot, then " : "",
           cfg->checkpoint_bucket, ck.key, cfg->slot, when, stream);
    if (!opts->yes) {
        printf("run again with --yes to do it\n");
        code = EXIT_OUTBOXD_USAGE;
        goto done;
    }
    if (lost && pgstream_drop_slot(pg, cfg->slot, err, sizeof(err)) < 0) {
        fail("%s", err);
        goto done;
    }
    recovery_plan(&ck.cp, &cut);
    if (checkpoint_put(cfg, &ck, ck.cp.lsn) < 0)
        goto done;
    printf("recorded: start outboxd now; it logs \"recovery: published N rows ...\" when done\n");
    code = EXIT_OUTBOXD_OK;
done:
    checkpoint_close(&ck);
    pgstream_free(pg);
    return code;
}
