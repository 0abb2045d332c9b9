/*
 * bookmark.c - rolling copies of the relay's slot (see bookmark.h for why and what they cost).
 *
 * Naming: "<slot>_bm_<unix seconds>". The seconds are chosen before the copy as the current
 * second plus two, and a copy that finished later than that is dropped again, so the name is a
 * time by which the bookmark's position had been confirmed: a rewind to any time at or after it
 * never misses a transaction committed then. A name that exists already (two ticks within a
 * second after a clock step) is simply skipped.
 *
 * Each bookmark is a replication slot: old ones are dropped before a new one is made, and no
 * bookmark is made when that would leave fewer than BOOKMARK_FREE_SLOTS slots free, so that a
 * rewind's scratch copy and a second relay always find one.
 *
 * Runs on the relay's thread, over the relay's plain monitoring connection; a tick is two short
 * statements (list and prune, then copy) when a bookmark is due, and nothing otherwise.
 */
#include "outboxd/bookmark.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/log.h"
#include "outboxd/util.h"

struct Bookmarks {
    char *slot;
    int64_t every_us;
    int64_t keep_us;
    int64_t next_at; /* unix µs */
    bool announced;
    bool failing; /* the last attempt failed: later failures are logged at debug level */
};

int bookmark_check_slot(const char *slot, char *err, size_t errlen)
{
    if ((int)strlen(slot) > BOOKMARK_MAX_SLOT) {
        snprintf(err, errlen,
                 "slot name \"%s\" is %zu characters long, too long to name its bookmarks "
                 "(\"%s" BOOKMARK_SUFFIX "<unix seconds>\" must fit in %d): use a slot name of at "
                 "most %d characters, or --bookmark-every=0",
                 slot, strlen(slot), slot, BOOKMARK_MAX_NAME, BOOKMARK_MAX_SLOT);
        return -1;
    }
    return 0;
}

void bookmark_name(const char *slot, int64_t unix_s, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s" BOOKMARK_SUFFIX "%" PRId64, slot, unix_s);
}

bool bookmark_parse(const char *slot, const char *name, int64_t *unix_s)
{
    size_t n = strlen(slot), sn = strlen(BOOKMARK_SUFFIX);
    if (strncmp(name, slot, n) != 0 || strncmp(name + n, BOOKMARK_SUFFIX, sn) != 0)
        return false;
    const char *digits = name + n + sn;
    size_t nd = strlen(digits);
    if (nd == 0 || nd > 12 || strspn(digits, "0123456789") != nd)
        return false;
    *unix_s = strtoll(digits, NULL, 10);
    return true;
}

int bookmarks_new(Bookmarks **out, const char *slot, int64_t every_ms, int64_t keep_ms, char *err,
                  size_t errlen)
{
    if (bookmark_check_slot(slot, err, errlen) < 0)
        return -1;
    Bookmarks *b = xcalloc(1, sizeof(*b));
    b->slot = xstrdup(slot);
    b->every_us = (every_ms > 0 ? every_ms : 1000) * 1000;
    b->keep_us = keep_ms * 1000;
    *out = b;
    return 0;
}

void bookmarks_free(Bookmarks *b)
{
    if (!b)
        return;
    free(b->slot);
    free(b);
}

static void report(Bookmarks *b, const char *err)
{
    if (b->failing)
        log_debug("%s", err);
    else
        log_warn("%s; trying again in %" PRId64 " ms", err, b->every_us / 1000);
    b->failing = true;
}

/* True when a failed statement's SQLSTATE says the connection is gone (none, or class 08). */
static bool connection_lost(const char *sqlstate)
{
    return sqlstate[0] == '\0' || strncmp(sqlstate, "08", 2) == 0;
}

static int drop(PgStream *conn, const char *name, const char *what)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT pg_catalog.pg_drop_replication_slot(");
    pgstream_quote_literal(&sql, name);
    buf_putc(&sql, ')');
    char err[512];
    int rc = pgstream_sql(conn, sql.data, what, NULL, NULL, err, sizeof(err));
    if (rc < 0)
        log_warn("%s (%s)", err, name);
    buf_deinit(&sql);
    return rc;
}

/*
 * Drops the bookmarks of b's slot older than keep and counts the replication slots still free
 * into *free_slots. Returns 0, 1 when the listing failed for another reason than the
 * connection (logged), -1 when the connection looks lost.
 */
static int prune(Bookmarks *b, PgStream *conn, int64_t now, int *free_slots)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT f.free, s.slot_name, coalesce(s.active_pid, 0) "
                   "FROM (SELECT current_setting('max_replication_slots')::int - count(*) AS free "
                   "FROM pg_catalog.pg_replication_slots) f "
                   "LEFT JOIN pg_catalog.pg_replication_slots s "
                   "ON starts_with(s.slot_name::text, ");
    Buf prefix;
    buf_init(&prefix);
    buf_printf(&prefix, "%s" BOOKMARK_SUFFIX, b->slot);
    pgstream_quote_literal(&sql, prefix.data);
    buf_deinit(&prefix);
    buf_puts(&sql, ") ORDER BY s.slot_name");
    PgRows *rows = NULL;
    char err[512];
    char sqlstate[6] = "";
    int rc = pgstream_sql(conn, sql.data, "could not list the bookmarks", &rows, sqlstate, err,
                          sizeof(err));
    buf_deinit(&sql);
    if (rc < 0) {
        report(b, err);
        return connection_lost(sqlstate) ? -1 : 1;
    }
    *free_slots = atoi(pgrows_value(rows, 0, 0) ?: "0");
    for (int i = 0; i < pgrows_count(rows); i++) {
        const char *name = pgrows_value(rows, i, 1);
        const char *pid = pgrows_value(rows, i, 2);
        int64_t t;
        if (!name || !bookmark_parse(b->slot, name, &t) || t * 1000000 + b->keep_us >= now)
            continue;
        if (pid && strcmp(pid, "0") != 0)
            continue; /* someone reads it (a rewind in progress): next time */
        if (drop(conn, name, "could not drop an old bookmark") == 0) {
            log_debug("dropped bookmark %s", name);
            (*free_slots)++;
        }
    }
    pgrows_free(rows);
    return 0;
}

int bookmark_tick(Bookmarks *b, PgStream *conn, int64_t now)
{
    if (now < b->next_at || !conn)
        return 0;
    b->next_at = now + b->every_us;

    int free_slots = 0;
    int rc = prune(b, conn, now, &free_slots);
    if (rc != 0)
        return rc < 0 ? -1 : 0;
    if (free_slots - 1 < BOOKMARK_FREE_SLOTS) {
        char err[512];
        snprintf(err, sizeof(err),
                 "not bookmarking slot \"%s\": %d replication slot%s free, and bookmarks leave "
                 "%d for a rewind and a second relay (raise max_replication_slots, or make "
                 "--bookmark-keep / --bookmark-every smaller)",
                 b->slot, free_slots, free_slots == 1 ? "" : "s", BOOKMARK_FREE_SLOTS);
        report(b, err);
        return 0;
    }

    int64_t when = now / 1000000 + 2;
    char name[96];
    bookmark_name(b->slot, when, name, sizeof(name));
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT pg_catalog.pg_copy_logical_replication_slot(");
    pgstream_quote_literal(&sql, b->slot);
    buf_puts(&sql, ", ");
    pgstream_quote_literal(&sql, name);
    buf_putc(&sql, ')');
    char sqlstate[6] = "", err[512];
    rc = pgstream_sql(conn, sql.data, "could not bookmark the slot", NULL, sqlstate, err,
                      sizeof(err));
    buf_deinit(&sql);
    if (rc < 0 && strcmp(sqlstate, "42710") == 0)
        return 0; /* this second's bookmark exists already */
    if (rc < 0) {
        report(b, err);
        return connection_lost(sqlstate) ? -1 : 0;
    }
    if (now_unix_us() > when * 1000000) {
        /* The copy took so long that its name would claim an earlier position than it has. */
        drop(conn, name, "could not drop a late bookmark");
        log_warn("bookmark %s took more than a second to make and was dropped again", name);
        return 0;
    }
    if (!b->announced)
        log_info("bookmarking slot \"%s\" every %" PRId64 " ms as %s" BOOKMARK_SUFFIX
                 "<unix seconds>, keeping each for %" PRId64 " s (first: %s)",
                 b->slot, b->every_us / 1000, b->slot, b->keep_us / 1000000, name);
    else if (b->failing)
        log_info("bookmarking slot \"%s\" works again (%s)", b->slot, name);
    else
        log_debug("bookmarked slot \"%s\" as %s", b->slot, name);
    b->announced = true;
    b->failing = false;
    return 0;
}
