/*
 * doctor.c - `outboxd doctor`: checks everything outboxd needs, before it runs.
 *
 * Each check is one line, PASS, WARN or FAIL, with its detail and, unless it passed, the fix.
 * PostgreSQL is read over an ordinary connection with the relay's --pg-url, so a role that
 * lacks REPLICATION is reported as such instead of failing to connect; nothing is changed on
 * either server. A check that cannot run (PostgreSQL or NATS unreachable, JetStream off, no
 * stream) is left out: the failure that stopped it says what to fix first. Exit 0 when nothing
 * failed (warnings allowed), else 1.
 */
#include "outboxd/setup.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/jetstream.h"
#include "outboxd/outbox.h"
#include "outboxd/pgstream.h"
#include "outboxd/relay.h"
#include "outboxd/slot.h"
#include "outboxd/subject.h"
#include "outboxd/util.h"

typedef enum Verdict { PASS, WARN, FAIL } Verdict;

static const char *const verdict_names[] = {"PASS", "WARN", "FAIL"};

typedef struct Check {
    const char *name;
    Verdict verdict;
    char *detail;
    char *fix; /* NULL for PASS */
} Check;

#define MAX_CHECKS 24

typedef struct Doctor {
    const Config *cfg;
    Check checks[MAX_CHECKS];
    size_t n;
    /* PostgreSQL */
    PgStream *pg;
    char *user;   /* current_user */
    char *l_slot; /* the slot's name as a SQL literal */
    size_t table;  /* the outbox table being checked */
    char *l_schema, *l_table;
    char *q_table; /* "schema"."table", for fixes */
    OutboxMapper *mapper;
    /* NATS */
    natsConnection *nc;
    char stream[256]; /* the stream capturing the template's subjects, "" when none */
} Doctor;

/* Records a check; returns it so that the caller can add the fix. */
static Check *report(Doctor *d, const char *name, Verdict v, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static Check *report(Doctor *d, const char *name, Verdict v, const char *fmt, ...)
{
    if (d->n == MAX_CHECKS)
        abort(); /* a programming error: raise MAX_CHECKS */
    Check *c = &d->checks[d->n++];
    va_list ap;
    va_start(ap, fmt);
    c->name = name;
    c->verdict = v;
    c->detail = vstrf(fmt, ap);
    text_one_line(c->detail); /* one line per check, whatever a name holds */
    c->fix = NULL;
    va_end(ap);
    return c;
}

static void fix(Check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void fix(Check *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    free(c->fix);
    c->fix = vstrf(fmt, ap);
    text_one_line(c->fix);
    va_end(ap);
}

static char *quoted(const char *s, bool ident)
{
    Buf b;
    buf_init(&b);
    if (ident)
        pgstream_quote_ident(&b, s);
    else
        pgstream_quote_literal(&b, s);
    return b.data;
}

/* Runs a catalog query that must return one row. On failure records check name as FAIL and
 * returns NULL. */
static PgRows *query_row(Doctor *d, const char *name, const char *sql)
{
    PgRows *rows = NULL;
    char err[1024];
    if (pgstream_sql(d->pg, sql, "could not query PostgreSQL", &rows, NULL, err, sizeof(err)) < 0) {
        fix(report(d, name, FAIL, "%s", err),
            "make sure --pg-url names the right database and a role that may read pg_catalog");
        return NULL;
    }
    if (pgrows_count(rows) < 1) {
        fix(report(d, name, FAIL, "PostgreSQL returned no row for this check"),
            "make sure --pg-url names the right database");
        pgrows_free(rows);
        return NULL;
    }
    return rows;
}

static const char *val(const PgRows *r, int col)
{
    const char *v = pgrows_value(r, 0, col);
    return v ? v : "";
}

static int ival(const PgRows *r, int col)
{
    return atoi(val(r, col));
}

/* ---- PostgreSQL ------------------------------------------------------------------------------ */

static void check_reachable(Doctor *d)
{
    char err[1024];
    if (pgstream_connect_plain(&d->pg, d->cfg->pg_url, err, sizeof(err)) != 0) {
        d->pg = NULL;
        fix(report(d, "postgres", FAIL, "%s", err),
            "check --pg-url (host, port, database, user, password) and that pg_hba.conf admits "
            "this role from here");
        return;
    }
    PgRows *r = query_row(d, "postgres",
                          "SELECT current_setting('server_version'), current_database(), "
                          "current_user");
    if (!r) {
        pgstream_free(d->pg);
        d->pg = NULL;
        return;
    }
    d->user = xstrdup(val(r, 2));
    report(d, "postgres", PASS, "PostgreSQL %s, database \"%s\", role \"%s\"", val(r, 0), val(r, 1),
           d->user);
    pgrows_free(r);
}

static void check_wal_level(Doctor *d)
{
    PgRows *r = query_row(d, "wal_level", "SELECT current_setting('wal_level')");
    if (!r)
        return;
    if (strcmp(val(r, 0), "logical") == 0)
        report(d, "wal_level", PASS, "logical");
    else
        fix(report(d, "wal_level", FAIL, "wal_level is \"%s\", but outboxd needs \"logical\"",
                   val(r, 0)),
            "ALTER SYSTEM SET wal_level = logical (or set it in postgresql.conf), then restart "
            "PostgreSQL");
    pgrows_free(r);
}

static void check_role(Doctor *d)
{
    PgRows *r = query_row(d, "replication_role",
                          "SELECT rolreplication, rolsuper FROM pg_catalog.pg_roles "
                          "WHERE rolname = current_user");
    if (!r)
        return;
    char *q = quoted(d->user, true);
    if (pgrows_true(r, 0, 1))
        report(d, "replication_role", PASS,
               "role \"%s\" is a superuser (LOGIN REPLICATION and SELECT on the outbox are "
               "enough: see outboxd setup)",
               d->user);
    else if (pgrows_true(r, 0, 0))
        report(d, "replication_role", PASS, "role \"%s\" has REPLICATION", d->user);
    else
        fix(report(d, "replication_role", FAIL, "role \"%s\" lacks the REPLICATION attribute",
                   d->user),
            "ALTER ROLE %s REPLICATION (as a superuser), or connect as the role outboxd setup "
            "--apply creates",
            q);
    free(q);
    pgrows_free(r);
}

/* The table exists and has event_id, payload and every column the template names. */
static void check_table(Doctor *d)
{
    const char *qualified = outbox_mapper_qualified(d->mapper, d->table);
    char *sql = strf("SELECT a.attname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                     "ON n.oid = c.relnamespace LEFT JOIN pg_catalog.pg_attribute a ON "
                     "a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped WHERE "
                     "c.relkind IN ('r', 'p') AND n.nspname = %s AND c.relname = %s "
                     "ORDER BY a.attnum",
                     d->l_schema, d->l_table);
    PgRows *rows = NULL;
    char err[1024];
    int rc = pgstream_sql(d->pg, sql, "could not query PostgreSQL", &rows, NULL, err, sizeof(err));
    free(sql);
    if (rc < 0) {
        fix(report(d, "outbox_table", FAIL, "%s", err),
            "make sure --pg-url names the right database and a role that may read pg_catalog");
        return;
    }
    int n = pgrows_count(rows);
    if (n == 0) {
        fix(report(d, "outbox_table", FAIL, "table %s does not exist", qualified),
            "outboxd setup --apply creates it (or psql -f scripts/outbox.sql), or point --table "
            "at your outbox table");
        pgrows_free(rows);
        return;
    }
    const char **names = xcalloc((size_t)n + 1, sizeof(char *));
    size_t count = 0;
    for (int i = 0; i < n; i++)
        if (pgrows_value(rows, i, 0))
            names[count++] = pgrows_value(rows, i, 0);
    if (outbox_mapper_check_columns(d->mapper, d->table, names, count, err, sizeof(err)) < 0)
        fix(report(d, "outbox_table", FAIL, "%s", err),
            "add the column (scripts/outbox.sql has the default table), or change --table, "
            "--columns, --column-* or --subject");
    else
        report(d, "outbox_table", PASS,
               "%s has the event id and payload columns and those --subject and --header read",
               qualified);
    free(names);
    pgrows_free(rows);
}

static void check_publication(Doctor *d)
{
    const Config *cfg = d->cfg;
    const char *qualified = outbox_mapper_qualified(d->mapper, d->table);
    char *lp = quoted(cfg->publication, false), *qp = quoted(cfg->publication, true);
    /* exists, publishes inserts, covers the table, could we create it */
    char *sql = strf(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s), "
        "EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s AND pubinsert), "
        "EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = %s AND "
        "schemaname = %s AND tablename = %s), "
        "(SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) OR "
        "(EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = "
        "c.relnamespace WHERE n.nspname = %s AND c.relname = %s AND "
        "pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE')) AND "
        "pg_catalog.has_database_privilege(current_database(), 'CREATE'))",
        lp, lp, lp, d->l_schema, d->l_table, d->l_schema, d->l_table);
    PgRows *r = query_row(d, "publication", sql);
    free(sql);
    if (!r)
        goto done;
    bool exists = pgrows_true(r, 0, 0), inserts = pgrows_true(r, 0, 1),
         covers = pgrows_true(r, 0, 2), can_create = pgrows_true(r, 0, 3);
    if (!exists && cfg->create && can_create) {
        fix(report(d, "publication", WARN,
                   "publication \"%s\" does not exist; outboxd creates it on its first start "
                   "(--create)",
                   cfg->publication),
            "nothing to do, or create it now with outboxd setup --apply");
    } else if (!exists) {
        fix(report(d, "publication", FAIL, "publication \"%s\" does not exist%s", cfg->publication,
                   cfg->create ? ", and this role cannot create it (it does not own the table)"
                               : " (and --create is off)"),
            "run outboxd setup --apply as the table's owner, or CREATE PUBLICATION %s FOR TABLE "
            "%s WITH (publish = 'insert')",
            qp, d->q_table);
    } else if (!covers) {
        fix(report(d, "publication", FAIL, "publication \"%s\" does not cover %s", cfg->publication,
                   qualified),
            "ALTER PUBLICATION %s ADD TABLE %s (as the table's owner)", qp, d->q_table);
    } else if (!inserts) {
        fix(report(d, "publication", FAIL, "publication \"%s\" does not publish inserts",
                   cfg->publication),
            "ALTER PUBLICATION %s SET (publish = 'insert')", qp);
    } else {
        report(d, "publication", PASS, "publication \"%s\" publishes inserts into %s",
               cfg->publication, qualified);
    }
    pgrows_free(r);
done:
    free(lp);
    free(qp);
}

static void check_slots_free(Doctor *d)
{
    char *sql = strf("SELECT current_setting('max_replication_slots')::int, "
                     "(SELECT count(*) FROM pg_catalog.pg_replication_slots)::int, "
                     "EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = %s)",
                     d->l_slot);
    PgRows *r = query_row(d, "replication_slots", sql);
    free(sql);
    if (!r)
        return;
    int max = ival(r, 0), used = ival(r, 1);
    bool ours = pgrows_true(r, 0, 2);
    const char *slot = d->cfg->slot;
    if (max == 0)
        fix(report(d, "replication_slots", FAIL, "max_replication_slots is 0: no slot can exist"),
            "set max_replication_slots (e.g. 10) in postgresql.conf and restart PostgreSQL");
    else if (used >= max && !ours)
        fix(report(d, "replication_slots", WARN,
                   "all %d replication slots are in use and slot \"%s\" does not exist yet: "
                   "outboxd cannot create it",
                   max, slot),
            "raise max_replication_slots (restart needed), or drop a slot nobody uses with "
            "SELECT pg_drop_replication_slot('name')");
    else
        report(d, "replication_slots", PASS, "%d of %d in use%s", used, max,
               ours ? ", outboxd's among them" : "");
    pgrows_free(r);
}

static void check_wal_senders(Doctor *d)
{
    PgRows *r = query_row(d, "wal_senders",
                          "SELECT current_setting('max_wal_senders')::int, (SELECT count(*) FROM "
                          "pg_catalog.pg_stat_activity WHERE backend_type = 'walsender')::int");
    if (!r)
        return;
    int max = ival(r, 0), busy = ival(r, 1);
    if (max == 0)
        fix(report(d, "wal_senders", FAIL,
                   "max_wal_senders is 0: no replication connection "
                   "is possible"),
            "set max_wal_senders (e.g. 10) in postgresql.conf and restart PostgreSQL");
    else if (busy >= max)
        fix(report(d, "wal_senders", WARN,
                   "all %d WAL senders are busy: another relay (a restart, a standby) cannot "
                   "connect",
                   max),
            "raise max_wal_senders (restart needed)");
    else
        report(d, "wal_senders", PASS, "%d of %d busy", busy, max);
    pgrows_free(r);
}

static void check_wal_keep(Doctor *d)
{
    PgRows *r =
        query_row(d, "max_slot_wal_keep_size", "SELECT current_setting('max_slot_wal_keep_size')");
    if (!r)
        return;
    if (strcmp(val(r, 0), "-1") == 0)
        fix(report(d, "max_slot_wal_keep_size", WARN,
                   "-1 (unlimited): a slot nobody reads from keeps all WAL until the disk is "
                   "full"),
            "set it (ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT "
            "pg_reload_conf()), and alert on outboxd_replication_lag_bytes");
    else
        report(d, "max_slot_wal_keep_size", PASS,
               "%s: a slot further behind loses its WAL instead of filling the disk", val(r, 0));
    pgrows_free(r);
}

/* Whether rows read from the table (a backfill, a recovery) can go out in exact commit order. */
static void check_commit_order(Doctor *d)
{
    PgRows *r = query_row(d, "commit_order", "SELECT current_setting('track_commit_timestamp')");
    if (!r)
        return;
    if (strcmp(val(r, 0), "on") == 0)
        report(d, "commit_order", PASS,
               "track_commit_timestamp is on: rows read from the table (backfill, recovery) go "
               "out by their commit time");
    else
        fix(report(d, "commit_order", WARN,
                   "track_commit_timestamp is off: rows read from the table (backfill, "
                   "recovery) go out by their transaction's start (occurred_at), commit order "
                   "only for each writer's transactions"),
            "ALTER SYSTEM SET track_commit_timestamp = on, then restart PostgreSQL (it keeps "
            "each transaction's commit time from then on)");
    pgrows_free(r);
}

static void check_slot(Doctor *d)
{
    const char *slot = d->cfg->slot;
    char *sql = strf("SELECT slot_type, coalesce(plugin, ''), database = current_database(), "
                     "coalesce(active_pid, 0), coalesce(wal_status, '') "
                     "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                     d->l_slot);
    PgRows *r = NULL;
    char err[1024];
    int rc = pgstream_sql(d->pg, sql, "could not query PostgreSQL", &r, NULL, err, sizeof(err));
    free(sql);
    if (rc < 0) {
        fix(report(d, "slot", FAIL, "%s", err),
            "make sure --pg-url names the right database and a role that may read pg_catalog");
        return;
    }
    if (pgrows_count(r) == 0) {
        if (d->cfg->create)
            fix(report(d, "slot", WARN,
                       "slot \"%s\" does not exist yet: outboxd creates it on its first start",
                       slot),
                "nothing to do: start outboxd (it creates the slot after the publication)");
        else
            fix(report(d, "slot", FAIL, "slot \"%s\" does not exist (and --create is off)", slot),
                "SELECT pg_create_logical_replication_slot('%s', 'pgoutput') once the "
                "publication exists, or run with --create",
                slot);
    } else if (strcmp(val(r, 0), "logical") != 0 || strcmp(val(r, 1), "pgoutput") != 0) {
        fix(report(d, "slot", FAIL, "slot \"%s\" is a %s slot of plugin \"%s\", not pgoutput", slot,
                   val(r, 0), val(r, 1)),
            "choose another --slot");
    } else if (!pgrows_true(r, 0, 2)) {
        fix(report(d, "slot", FAIL, "slot \"%s\" belongs to another database", slot),
            "connect to that database, or choose another --slot");
    } else if (strcmp(val(r, 4), "lost") == 0) {
        char detail[512], how[1024];
        slot_lost_detail(slot, detail, sizeof(detail));
        slot_lost_fix(slot, how, sizeof(how));
        fix(report(d, "slot", FAIL, "%s", detail), "%s", how);
    } else {
        int pid = ival(r, 3);
        bool unreserved = strcmp(val(r, 4), "unreserved") == 0;
        char held[64];
        if (pid)
            snprintf(held, sizeof(held), "held by PID %d", pid);
        else
            snprintf(held, sizeof(held), "not held by any relay");
        Check *c = report(d, "slot", unreserved ? WARN : PASS, "slot \"%s\" (pgoutput), %s%s", slot,
                          held, unreserved ? ", about to lose WAL (wal_status unreserved)" : "");
        if (unreserved)
            fix(c, "let outboxd catch up now, or raise max_slot_wal_keep_size");
    }
    pgrows_free(r);
}

/* What a failover needs: on 17+, a failover slot synchronised to a standby, and the primary
 * holding logical walsenders back until the standby has flushed (synchronized_standby_slots);
 * before 17 there are no failover slots and a failover loses the slot (outboxd then stops
 * with the runbook rather than skip events). */
static void check_failover(Doctor *d)
{
    PgRows *r = query_row(d, "failover",
                          "SELECT current_setting('server_version_num')::int, pg_is_in_recovery()");
    if (!r)
        return;
    int version = ival(r, 0);
    bool standby = pgrows_true(r, 0, 1);
    pgrows_free(r);
    if (version < 170000) {
        report(d, "failover", PASS,
               "PostgreSQL %d has no failover slots: after a failover to a standby the slot is "
               "missing, and outboxd stops with the choices instead of skipping events "
               "(docs/operations.md, \"Failover\")",
               version / 10000);
        return;
    }
    if (standby) {
        r = query_row(d, "failover",
                      "SELECT current_setting('sync_replication_slots'), "
                      "current_setting('hot_standby_feedback'), "
                      "current_setting('primary_slot_name')");
        if (!r)
            return;
        bool ok = strcmp(val(r, 0), "on") == 0 && strcmp(val(r, 1), "on") == 0 && *val(r, 2);
        Check *c = report(d, "failover", ok ? PASS : WARN,
                          "standby: sync_replication_slots %s, hot_standby_feedback %s, "
                          "primary_slot_name \"%s\"",
                          val(r, 0), val(r, 1), val(r, 2));
        if (!ok)
            fix(c, "set sync_replication_slots = on, hot_standby_feedback = on, a "
                   "primary_slot_name and dbname in primary_conninfo on this standby, so that it "
                   "keeps outboxd's failover slot");
        pgrows_free(r);
        return;
    }
    char *sql = strf("SELECT coalesce((SELECT failover FROM pg_catalog.pg_replication_slots "
                     "WHERE slot_name = %s), true), "
                     "current_setting('synchronized_standby_slots'), "
                     "(SELECT count(*) FROM pg_catalog.pg_replication_slots "
                     "WHERE slot_type = 'physical' AND active)",
                     d->l_slot);
    r = query_row(d, "failover", sql);
    free(sql);
    if (!r)
        return;
    bool failover = pgrows_true(r, 0, 0); /* true also when the slot is still to be created */
    const char *sync_slots = val(r, 1);
    int standbys = ival(r, 2);
    if (!failover && d->cfg->failover_slot) {
        fix(report(d, "failover", WARN,
                   "slot \"%s\" is not a failover slot: a failover to a standby loses it",
                   d->cfg->slot),
            "on a replication connection run ALTER_REPLICATION_SLOT \"%s\" (FAILOVER true), or "
            "drop the slot before outboxd's first start so it creates a failover slot",
            d->cfg->slot);
    } else if (!*sync_slots) {
        fix(report(d, "failover", WARN,
                   "synchronized_standby_slots is empty: a standby may lag behind what outboxd "
                   "published, and after a failover to it those events are in the stream but "
                   "not in the new primary"),
            "ALTER SYSTEM SET synchronized_standby_slots = '<the standby's physical slot>'; "
            "SELECT pg_reload_conf(); on the standby set sync_replication_slots = on and "
            "hot_standby_feedback = on");
    } else {
        Check *c = report(d, "failover", standbys > 0 ? PASS : WARN,
                          "failover slot, synchronized_standby_slots = '%s', %d standby%s "
                          "streaming from a physical slot",
                          sync_slots, standbys, standbys == 1 ? "" : "s");
        if (standbys == 0)
            fix(c, "start the standby named in synchronized_standby_slots: until it confirms, "
                   "the primary holds outboxd's events back");
    }
    pgrows_free(r);
}

/* Points the table checks at outbox table i. */
static void select_table(Doctor *d, size_t i)
{
    free(d->l_schema);
    free(d->l_table);
    free(d->q_table);
    d->table = i;
    d->l_schema = quoted(outbox_mapper_schema(d->mapper, i), false);
    d->l_table = quoted(outbox_mapper_table(d->mapper, i), false);
    char *qs = quoted(outbox_mapper_schema(d->mapper, i), true);
    char *qt = quoted(outbox_mapper_table(d->mapper, i), true);
    d->q_table = strf("%s.%s", qs, qt);
    free(qs);
    free(qt);
}

static void check_postgres(Doctor *d)
{
    check_reachable(d);
    if (!d->pg)
        return;
    check_wal_level(d);
    check_role(d);
    for (size_t i = 0; i < outbox_mapper_ntables(d->mapper); i++) {
        select_table(d, i);
        check_table(d);
        check_publication(d);
    }
    check_slots_free(d);
    check_wal_senders(d);
    check_wal_keep(d);
    check_commit_order(d);
    check_slot(d);
    check_failover(d);
}

/* ---- NATS ------------------------------------------------------------------------------------ */

static bool check_nats_reachable(Doctor *d)
{
    char urls[1024];
    d->nc = jsapi_connect_once(d->cfg->nats_url, urls, sizeof(urls));
    if (!d->nc) {
        fix(report(d, "nats", FAIL, "%s", urls),
            "check --nats-url and that nats-server runs and admits this client");
        return false;
    }
    char url[1024] = "";
    natsConnection_GetConnectedUrl(d->nc, url, sizeof(url));
    jsapi_redact_urls(url, urls, sizeof(urls));
    report(d, "nats", PASS, "connected to %s", urls);
    return true;
}

static bool check_jetstream(Doctor *d)
{
    char err[512];
    bool no_responders;
    json_t *info = jsapi_request(d->nc, "$JS.API.INFO", "", &no_responders, err, sizeof(err));
    if (!info) {
        if (no_responders)
            fix(report(d, "jetstream", FAIL, "JetStream is not enabled on this server"),
                "start nats-server with -js (or a jetstream block in its configuration)");
        else
            fix(report(d, "jetstream", FAIL, "%s", err), "check that nats-server runs JetStream");
        return false;
    }
    json_t *e = json_object_get(info, "error");
    bool ok = e == NULL;
    if (!ok)
        fix(report(d, "jetstream", FAIL, "JetStream: %s",
                   json_string_value(json_object_get(e, "description")) ?: "unknown error"),
            "enable JetStream for this account");
    else {
        json_int_t n = json_integer_value(json_object_get(info, "streams"));
        report(d, "jetstream", PASS, "enabled (%" JSON_INTEGER_FORMAT " stream%s)", n,
               n == 1 ? "" : "s");
    }
    json_decref(info);
    return ok;
}


static void check_stream(Doctor *d)
{
    Buf filter;
    buf_init(&filter);
    relay_subject_filter(d->cfg, &filter);
    char err[512];
    bool found = false;
    if (jsapi_find_stream(d->nc, filter.data, d->stream, sizeof(d->stream), &found, err,
                          sizeof(err)) < 0) {
        fix(report(d, "stream", FAIL, "%s", err), "check that JetStream answers");
        goto done;
    }
    if (!found) {
        d->stream[0] = '\0';
        fix(report(d, "stream", FAIL, "no stream captures %s", filter.data),
            "outboxd setup --apply creates one (outboxd setup prints its definition)");
        goto done;
    }
    /* A stream that captures only part of the subjects leaves the rest without a home. */
    char subject[320];
    snprintf(subject, sizeof(subject), "$JS.API.STREAM.INFO.%s", d->stream);
    bool no_responders;
    json_t *info = jsapi_request(d->nc, subject, "", &no_responders, err, sizeof(err));
    json_t *subjects = json_object_get(json_object_get(info, "config"), "subjects");
    bool covers = false;
    Buf have;
    buf_init(&have);
    size_t i;
    json_t *v;
    json_array_foreach(subjects, i, v) {
        const char *s = json_string_value(v);
        if (!s)
            continue;
        covers = covers || subject_covers(s, filter.data);
        buf_printf(&have, "%s%s", have.len ? ", " : "", s);
    }
    if (covers)
        report(d, "stream", PASS, "stream \"%s\" captures %s (subjects %s)", d->stream, filter.data,
               have.data);
    else
        fix(report(d, "stream", WARN,
                   "stream \"%s\" captures only part of %s (subjects %s): events on the other "
                   "subjects have no stream",
                   d->stream, filter.data, have.data ? have.data : "?"),
            "add %s to the stream's subjects (nats stream edit %s --subjects ...)", filter.data,
            d->stream);
    buf_deinit(&have);
    json_decref(info);
done:
    buf_deinit(&filter);
}

static void check_dead_letter(Doctor *d)
{
    const char *dlq = d->cfg->dead_letter_subject;
    if (strcmp(d->cfg->on_poison, "dead-letter") != 0) {
        report(d, "dead_letter_stream", PASS, "not used (--on-poison=%s)", d->cfg->on_poison);
        return;
    }
    char name[256], err[512];
    bool found = false;
    if (jsapi_find_stream(d->nc, dlq, name, sizeof(name), &found, err, sizeof(err)) < 0)
        fix(report(d, "dead_letter_stream", FAIL, "%s", err), "check that JetStream answers");
    else if (!found)
        fix(report(d, "dead_letter_stream", FAIL, "no stream captures the dead-letter subject %s",
                   dlq),
            "add %s to a stream's subjects (outboxd setup --apply makes a stream that captures "
            "it), or set --dead-letter-subject, or --on-poison=stop",
            dlq);
    else
        report(d, "dead_letter_stream", PASS, "stream \"%s\" captures %s", name, dlq);
}

static void check_duplicate_window(Doctor *d)
{
    if (!d->stream[0])
        return;
    StreamInfo info;
    char err[512];
    if (jsapi_stream_info(d->nc, d->stream, &info, err, sizeof(err)) < 0) {
        fix(report(d, "duplicate_window", FAIL, "%s", err), "check that JetStream answers");
        return;
    }
    int64_t need = d->cfg->checkpoint_interval_ms + d->cfg->ack_timeout_ms + 60000;
    int64_t need_s = (need + 999) / 1000;
    if (info.duplicate_window_ms >= need)
        report(d, "duplicate_window", PASS,
               "stream \"%s\" drops duplicates within %" PRId64 " s (outboxd needs %" PRId64 " s)",
               d->stream, info.duplicate_window_ms / 1000, need_s);
    else
        fix(report(d, "duplicate_window", WARN,
                   "stream \"%s\" drops duplicates within %" PRId64 " s only, less than "
                   "--checkpoint-interval + --ack-timeout + 60 s = %" PRId64 " s: events resent "
                   "after a crash can be stored twice",
                   d->stream, info.duplicate_window_ms / 1000, need_s),
            "raise it: nats stream edit %s --dupe-window %" PRId64 "s", d->stream, need_s);
}

static void check_nats(Doctor *d)
{
    if (!check_nats_reachable(d) || !check_jetstream(d))
        return;
    check_stream(d);
    check_dead_letter(d);
    check_duplicate_window(d);
}

/* ---- output ---------------------------------------------------------------------------------- */

static void print_text(const Doctor *d)
{
    size_t width = 0, count[3] = {0, 0, 0};
    for (size_t i = 0; i < d->n; i++)
        if (strlen(d->checks[i].name) > width)
            width = strlen(d->checks[i].name);
    for (size_t i = 0; i < d->n; i++) {
        const Check *c = &d->checks[i];
        count[c->verdict]++;
        printf("%s  %-*s  %s\n", verdict_names[c->verdict], (int)width, c->name, c->detail);
        if (c->fix)
            printf("      fix: %s\n", c->fix);
    }
    printf("%zu passed, %zu warning%s, %zu failed\n", count[PASS], count[WARN],
           count[WARN] == 1 ? "" : "s", count[FAIL]);
}

static void print_json(const Doctor *d)
{
    json_t *a = json_array();
    for (size_t i = 0; i < d->n; i++) {
        const Check *c = &d->checks[i];
        json_array_append_new(a, json_pack("{s:s, s:s, s:s, s:o}", "check", c->name, "result",
                                           verdict_names[c->verdict], "detail", c->detail, "fix",
                                           c->fix ? json_string(c->fix) : json_null()));
    }
    char *text = json_dumps(a, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    printf("%s\n", text ? text : "[]");
    free(text);
    json_decref(a);
}

int doctor_run(const Config *cfg, bool as_json)
{
    Doctor d;
    memset(&d, 0, sizeof(d));
    d.cfg = cfg;
    char err[512];
    if (outbox_mapper_from_config(&d.mapper, cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "outboxd: %s\n", err);
        return EXIT_OUTBOXD_USAGE;
    }
    d.l_slot = quoted(cfg->slot, false);

    check_postgres(&d);
    check_nats(&d);

    if (as_json)
        print_json(&d);
    else
        print_text(&d);
    fflush(stdout);

    int code = EXIT_OUTBOXD_OK;
    for (size_t i = 0; i < d.n; i++) {
        if (d.checks[i].verdict == FAIL)
            code = EXIT_OUTBOXD_FAILURE;
        free(d.checks[i].detail);
        free(d.checks[i].fix);
    }
    pgstream_free(d.pg);
    natsConnection_Destroy(d.nc);
    outbox_mapper_free(d.mapper);
    free(d.user);
    free(d.l_slot);
    free(d.l_schema);
    free(d.l_table);
    free(d.q_table);
    return code;
}
