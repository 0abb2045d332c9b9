/*
 * setup.c - `outboxd setup`: the outbox table, its publication, a least-privilege role for the
 * relay, and the JetStream stream.
 *
 * One plan, two renderings. Each PostgreSQL step is a condition (a SQL boolean expression over
 * the catalogs that says whether the step is done) and the statement that does it. Printing
 * wraps them into an idempotent script (DO blocks that test the condition); --apply evaluates
 * the condition, runs the statement only when needed and says which it did. So the printed
 * script and --apply cannot drift apart, and a second run changes nothing. The stream is one
 * JSON object: printed as the body of $JS.API.STREAM.CREATE.<name> (and as `nats stream add`
 * flags), or sent.
 *
 * The stream's subjects: "<first token>.>" when the subject template starts with a literal
 * token that the dead-letter subject shares ("outbox.>" for the defaults, as in the README's
 * quick start), so a later template under the same prefix needs no change to the stream;
 * otherwise the template's filter ("orders.*") plus the dead-letter subject. Its duplicate
 * window is 2 minutes, or --checkpoint-interval + --ack-timeout + 60 s when that is longer (what
 * the relay needs to drop the events it resends after a crash).
 *
 * The slot is not created here: outboxd creates it on its first start, after checking the
 * publication (a slot made before its publication fails for good). Neither URL is printed; a
 * NATS URL in a message is redacted.
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
#include "outboxd/subject.h"
#include "outboxd/util.h"

/* The columns of scripts/outbox.sql, verbatim: tests/integration/test_setup.py checks that the
 * file and this text agree. */
static const char outbox_columns[] = "    event_id       uuid        PRIMARY KEY,\n"
                                     "    aggregate_type text        NOT NULL,\n"
                                     "    aggregate_id   text        NOT NULL,\n"
                                     "    event_type     text        NOT NULL,\n"
                                     "    payload        jsonb       NOT NULL,\n"
                                     "    occurred_at    timestamptz NOT NULL DEFAULT now(),\n"
                                     "    schema_version int         NOT NULL DEFAULT 1,\n"
                                     "    trace_id       text\n";

#define DEFAULT_DUPLICATE_WINDOW_MS INT64_C(120000)
#define PG_NAME_MAX 63 /* NAMEDATALEN - 1: longer names are truncated, and never found again */

#define SQLSTATE_INSUFFICIENT_PRIVILEGE "42501"
#define SQLSTATE_DUPLICATE_OBJECT "42710"

#define JS_ERR_STREAM_NOT_FOUND 10059
#define JS_ERR_SUBJECTS_OVERLAP 10065

typedef struct Plan {
    const Config *cfg;
    const SetupOptions *opts;
    OutboxMapper *mapper;
    const char *schema, *table, *qualified; /* qualified: schema.table, for messages */
    bool own_schema;                        /* not "public": created when missing */
    char *missing_column;                   /* a template column the default table lacks */

    /* conditions: SQL boolean expressions, true when the step is done */
    char *schema_exists, *table_exists, *pub_exists, *pub_covers, *pub_inserts, *role_exists,
        *role_ready, *has_usage, *has_select;
    /* statements */
    char *create_schema, *create_table, *create_pub, *add_table, *create_role, *alter_role,
        *grant_usage, *grant_select;
    /* quoted for fixes in messages */
    char *q_pub, *q_role, *q_table;

    /* the stream */
    char *filter;   /* what the template can produce, e.g. outbox.*.* */
    json_t *stream; /* the $JS.API.STREAM.CREATE body */
    int64_t duplicate_window_ms;
} Plan;

static char *ident(const char *name)
{
    Buf b;
    buf_init(&b);
    pgstream_quote_ident(&b, name);
    return b.data;
}

static char *literal(const char *s)
{
    Buf b;
    buf_init(&b);
    pgstream_quote_literal(&b, s);
    return b.data;
}


/* True when one of the subjects in the JSON array captures sub. */
static bool subjects_cover(json_t *subjects, const char *sub)
{
    size_t i;
    json_t *v;
    json_array_foreach(subjects, i, v) {
        if (json_is_string(v) && subject_covers(json_string_value(v), sub))
            return true;
    }
    return false;
}

static void subjects_join(json_t *subjects, Buf *out)
{
    size_t i;
    json_t *v;
    json_array_foreach(subjects, i, v) {
        if (i)
            buf_puts(out, ", ");
        buf_puts(out, json_is_string(v) ? json_string_value(v) : "?");
    }
    if (!out->data)
        buf_puts(out, "none");
}

static bool valid_stream_name(const char *s)
{
    if (!*s || strlen(s) > 255)
        return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= ' ' || *p == 0x7f || strchr(".*>/\\", *p))
            return false;
    return true;
}

/* ---- the plan -------------------------------------------------------------------------------- */

static json_t *stream_subjects(const Config *cfg, const char *filter)
{
    json_t *subjects = json_array();
    const char *subject = cfg->tables[0].subject;
    size_t first = strcspn(subject, ".");
    if (!memchr(subject, '{', first)) {
        char *prefix = strf("%.*s.>", (int)first, subject);
        if (subject_covers(prefix, filter) && subject_covers(prefix, cfg->dead_letter_subject)) {
            json_array_append_new(subjects, json_string(prefix));
            free(prefix);
            return subjects;
        }
        free(prefix);
    }
    json_array_append_new(subjects, json_string(filter));
    if (!subject_covers(filter, cfg->dead_letter_subject))
        json_array_append_new(subjects, json_string(cfg->dead_letter_subject));
    return subjects;
}

static int plan_init(Plan *p, const Config *cfg, const SetupOptions *opts)
{
    memset(p, 0, sizeof(*p));
    p->cfg = cfg;
    p->opts = opts;
    char err[512];
    if (cfg->ntables > 1) {
        fprintf(stderr, "outboxd: setup makes one outbox table, and the settings list %zu: "
                        "create your tables, then let outboxd create the publication for all of "
                        "them on its first start (--create), or run CREATE PUBLICATION %s FOR "
                        "TABLE <each table> WITH (publish = 'insert')\n",
                cfg->ntables, cfg->publication);
        return -1;
    }
    if (outbox_mapper_from_config(&p->mapper, cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "outboxd: %s\n", err);
        return -1;
    }
    p->schema = outbox_mapper_schema(p->mapper, 0);
    p->table = outbox_mapper_table(p->mapper, 0);
    p->qualified = outbox_mapper_qualified(p->mapper, 0);
    p->own_schema = strcmp(p->schema, "public") != 0;
    const char *too_long = strlen(p->schema) > PG_NAME_MAX    ? p->schema
                           : strlen(p->table) > PG_NAME_MAX   ? p->table
                           : strlen(opts->role) > PG_NAME_MAX ? opts->role
                                                              : NULL;
    if (too_long) {
        fprintf(stderr, "outboxd: name \"%s\" is longer than PostgreSQL's 63 bytes\n", too_long);
        return -1;
    }
    /* setup makes the default table, whose columns are named after the roles: a column that
     * the mapping, the template or --header names otherwise is missing from it. */
    if (outbox_mapper_check_columns(p->mapper, 0, config_role_names, CONFIG_NROLES,
                                    err, sizeof(err)) < 0)
        p->missing_column = xstrdup(err);

    char *qs = ident(p->schema), *qt = ident(p->table), *qp = ident(cfg->publication),
         *qr = ident(opts->role);
    char *ls = literal(p->schema), *lt = literal(p->table), *lp = literal(cfg->publication),
         *lr = literal(opts->role);
    p->q_table = strf("%s.%s", qs, qt);
    char *lq = literal(p->q_table); /* a table name for has_table_privilege(), parsed there */
    p->q_pub = xstrdup(qp);
    p->q_role = xstrdup(qr);

    p->schema_exists =
        strf("EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s)", ls);
    p->table_exists = strf("EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN "
                           "pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE n.nspname = %s AND c.relname = %s)",
                           ls, lt);
    p->pub_exists = strf("EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s)", lp);
    p->pub_covers = strf("EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables WHERE pubname = "
                         "%s AND schemaname = %s AND tablename = %s)",
                         lp, ls, lt);
    p->pub_inserts = strf("EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s "
                          "AND pubinsert)",
                          lp);
    p->role_exists = strf("EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s)", lr);
    p->role_ready = strf("EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s AND "
                         "rolcanlogin AND (rolreplication OR rolsuper))",
                         lr);
    p->has_usage = strf("pg_catalog.has_schema_privilege(%s, %s, 'USAGE')", lr, ls);
    p->has_select = strf("pg_catalog.has_table_privilege(%s, %s, 'SELECT')", lr, lq);

    p->create_schema = strf("CREATE SCHEMA IF NOT EXISTS %s", qs);
    p->create_table = strf("CREATE TABLE IF NOT EXISTS %s (\n%s)", p->q_table, outbox_columns);
    p->create_pub =
        strf("CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert', "
             "publish_via_partition_root = true)",
             qp, p->q_table);
    p->add_table = strf("ALTER PUBLICATION %s ADD TABLE %s", qp, p->q_table);
    p->create_role = strf("CREATE ROLE %s LOGIN REPLICATION", qr);
    p->alter_role = strf("ALTER ROLE %s LOGIN REPLICATION", qr);
    p->grant_usage = strf("GRANT USAGE ON SCHEMA %s TO %s", qs, qr);
    p->grant_select = strf("GRANT SELECT ON TABLE %s TO %s", p->q_table, qr);
    char *quoted[] = {qs, qt, qp, qr, ls, lt, lp, lr, lq};
    for (size_t i = 0; i < ARRAY_SIZE(quoted); i++)
        free(quoted[i]);

    Buf filter;
    buf_init(&filter);
    relay_subject_filter(cfg, &filter);
    p->filter = filter.data;
    int64_t need = cfg->checkpoint_interval_ms + cfg->ack_timeout_ms + 60000;
    p->duplicate_window_ms =
        need > DEFAULT_DUPLICATE_WINDOW_MS ? need : DEFAULT_DUPLICATE_WINDOW_MS;
    p->duplicate_window_ms = (p->duplicate_window_ms + 999) / 1000 * 1000;
    /* Every limit is spelled out: older servers want them all. */
    p->stream =
        json_pack("{s:s, s:o, s:s, s:s, s:i, s:s, s:I, s:i, s:i, s:i, s:i, s:i}", "name",
                  opts->stream, "subjects", stream_subjects(cfg, p->filter), "retention", "limits",
                  "storage", "file", "num_replicas", opts->replicas, "discard", "old",
                  "duplicate_window", (json_int_t)p->duplicate_window_ms * 1000000, "max_msgs", -1,
                  "max_bytes", -1, "max_age", 0, "max_msg_size", -1, "max_consumers", -1);
    return 0;
}

static void plan_deinit(Plan *p)
{
    outbox_mapper_free(p->mapper);
    char *strings[] = {
        p->missing_column, p->schema_exists, p->table_exists, p->pub_exists, p->pub_covers,
        p->pub_inserts,    p->role_exists,   p->role_ready,   p->has_usage,  p->has_select,
        p->create_schema,  p->create_table,  p->create_pub,   p->add_table,  p->create_role,
        p->alter_role,     p->grant_usage,   p->grant_select, p->q_pub,      p->q_role,
        p->q_table,        p->filter,
    };
    for (size_t i = 0; i < ARRAY_SIZE(strings); i++)
        free(strings[i]);
    json_decref(p->stream);
}

static json_t *plan_subjects(const Plan *p)
{
    return json_object_get(p->stream, "subjects");
}

/* ---- printing -------------------------------------------------------------------------------- */

/* Prints a DO block around body, with a dollar-quote tag that body does not contain. */
static void print_do(const char *body)
{
    char tag[32] = "$outboxd$";
    for (int i = 1; strstr(body, tag); i++)
        snprintf(tag, sizeof(tag), "$outboxd%d$", i);
    printf("DO %s\nBEGIN\n%sEND\n%s;\n", tag, body, tag);
}

static void sh_quote(Buf *out, const char *s)
{
    buf_putc(out, '\'');
    for (; *s; s++) {
        if (*s == '\'')
            buf_puts(out, "'\\''");
        else
            buf_putc(out, *s);
    }
    buf_putc(out, '\'');
}

/* Prints text with every line prefixed (as SQL comments). */
static void print_prefixed(const char *prefix, const char *text)
{
    while (*text) {
        size_t n = strcspn(text, "\n");
        printf("%s%.*s\n", prefix, (int)n, text);
        text += n;
        if (*text)
            text++;
    }
}

static void print_stream(const Plan *p)
{
    const SetupOptions *o = p->opts;
    Buf subj;
    buf_init(&subj);
    subjects_join(plan_subjects(p), &subj);
    printf(
        "\n-- NATS JetStream: the stream. `outboxd setup --apply` creates it. By hand, send this "
        "JSON to\n-- $JS.API.STREAM.CREATE.%s, or save it as stream.json and run `nats stream "
        "add --config stream.json`:\n",
        o->stream);
    printf("-- Its subjects (%s) capture the template's %s and the dead-letter subject %s.\n",
           subj.data, p->filter, p->cfg->dead_letter_subject);
    printf("-- The duplicate window (%" PRId64 " s) must outlast --checkpoint-interval + "
           "--ack-timeout + 60 s,\n-- so that events resent after a crash are dropped as "
           "duplicates. No limits are set: add\n-- max_age or max_bytes to bound the stream.\n",
           p->duplicate_window_ms / 1000);
    char *json = json_dumps(p->stream, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    print_prefixed("--   ", json ? json : "{}");
    free(json);

    Buf cmd;
    buf_init(&cmd);
    buf_printf(&cmd, "nats stream add %s", o->stream);
    size_t i;
    json_t *v;
    json_array_foreach(plan_subjects(p), i, v) {
        buf_puts(&cmd, " --subjects ");
        sh_quote(&cmd, json_string_value(v));
    }
    buf_printf(&cmd,
               " --storage file --replicas %d --retention limits --discard old --dupe-window "
               "%" PRId64 "s --defaults",
               o->replicas, p->duplicate_window_ms / 1000);
    printf("-- or with the NATS CLI:\n--   %s\n", cmd.data);
    buf_deinit(&cmd);
    buf_deinit(&subj);
}

/* A copy of s fit for a one-line SQL comment: a line break in a name must not end it. */
static char *comment_text(const char *s)
{
    char *c = xstrdup(s);
    text_one_line(c);
    return c;
}

static void print_script(const Plan *p)
{
    char *table = comment_text(p->qualified), *pub = comment_text(p->cfg->publication),
         *role = comment_text(p->opts->role), *q_role = comment_text(p->q_role);
    printf(
        "-- outboxd setup: the outbox table %s, publication \"%s\" and role \"%s\".\n"
        "-- Idempotent: running it again changes nothing. Run it as a superuser, or as the "
        "owner of\n-- the table with CREATEROLE, e.g. `outboxd setup ... | psql \"$ADMIN_URL\"`. "
        "outboxd creates its\n-- replication slot itself on its first start.\n\n",
        table, pub, role);
    printf("BEGIN;\n\n");
    if (p->own_schema)
        printf("%s;\n\n", p->create_schema);
    printf("-- The outbox table (as scripts/outbox.sql).\n");
    if (p->missing_column) {
        char *why = comment_text(p->missing_column);
        printf("-- WARNING: %s: add that column to the table below.\n", why);
        free(why);
    }
    printf("%s;\n\n", p->create_table);

    Buf b;
    buf_init(&b);
    printf("-- The publication outboxd reads: inserts into the outbox, nothing else.\n");
    buf_printf(&b,
               "    IF NOT %s THEN\n        %s;\n    ELSIF NOT %s THEN\n        %s;\n"
               "    ELSIF NOT %s THEN\n        RAISE EXCEPTION 'the publication exists but does "
               "not publish inserts'\n            USING HINT = ",
               p->pub_exists, p->create_pub, p->pub_covers, p->add_table, p->pub_inserts);
    char *hint = strf("ALTER PUBLICATION %s SET (publish = 'insert')", p->q_pub);
    pgstream_quote_literal(&b, hint);
    free(hint);
    buf_puts(&b, ";\n    END IF;\n");
    print_do(b.data);

    buf_reset(&b);
    printf("\n-- The role outboxd connects as: LOGIN REPLICATION, and SELECT on the outbox only.\n"
           "-- It gets no password here: set one with ALTER ROLE %s PASSWORD '...', or use\n"
           "-- certificate authentication. In pg_hba.conf its connection (replication=database) "
           "matches\n-- ordinary database lines, not the \"replication\" keyword.\n",
           q_role);
    buf_printf(&b,
               "    IF NOT %s THEN\n        %s;\n    ELSIF NOT %s THEN\n        %s;\n"
               "    END IF;\n",
               p->role_exists, p->create_role, p->role_ready, p->alter_role);
    print_do(b.data);
    buf_deinit(&b);
    printf("\n%s;\n%s;\n\nCOMMIT;\n", p->grant_usage, p->grant_select);
    print_stream(p);
    free(table);
    free(pub);
    free(role);
    free(q_role);
}

/* ---- applying: PostgreSQL -------------------------------------------------------------------- */

typedef struct Apply {
    Plan *plan;
    PgStream *pg;
    char err[1024];
    char sqlstate[6];
} Apply;

/* Evaluates n conditions in one query into done[]. */
static int conditions(Apply *a, const char *const *conds, size_t n, bool *done)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT ");
    for (size_t i = 0; i < n; i++)
        buf_printf(&sql, "%s%s", i ? ", " : "", conds[i]);
    PgRows *rows = NULL;
    int rc = pgstream_sql(a->pg, sql.data, "could not read the catalog", &rows, a->sqlstate, a->err,
                          sizeof(a->err));
    buf_deinit(&sql);
    if (rc < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        done[i] = pgrows_true(rows, 0, (int)i);
    pgrows_free(rows);
    return 0;
}

/* Runs a statement. Returns 1 when it ran, 0 when it found the object created meanwhile (by a
 * concurrent setup), -1 on failure. */
static int run(Apply *a, const char *sql, const char *what)
{
    if (pgstream_sql(a->pg, sql, what, NULL, a->sqlstate, a->err, sizeof(a->err)) == 0)
        return 1;
    return strcmp(a->sqlstate, SQLSTATE_DUPLICATE_OBJECT) == 0 ? 0 : -1;
}

static int apply_table(Apply *a)
{
    Plan *p = a->plan;
    bool done[2];
    const char *conds[] = {p->schema_exists, p->table_exists};
    if (conditions(a, conds, 2, done) < 0)
        return -1;
    if (p->own_schema) {
        if (done[0])
            printf("schema \"%s\" already there\n", p->schema);
        else if (run(a, p->create_schema, "could not create the schema") < 0)
            return -1;
        else
            printf("created schema \"%s\"\n", p->schema);
    }
    if (done[1]) {
        printf("table %s already there\n", p->qualified);
    } else {
        if (run(a, p->create_table, "could not create the outbox table") < 0)
            return -1;
        printf("created table %s\n", p->qualified);
    }

    /* An existing table must still serve: event_id, payload and the template's columns. */
    char *ls = literal(p->schema), *lt = literal(p->table);
    char *sql = strf("SELECT a.attname FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c "
                     "ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = "
                     "c.relnamespace WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 "
                     "AND NOT a.attisdropped ORDER BY a.attnum",
                     ls, lt);
    free(ls);
    free(lt);
    PgRows *rows = NULL;
    int rc = pgstream_sql(a->pg, sql, "could not read the outbox table's columns", &rows,
                          a->sqlstate, a->err, sizeof(a->err));
    free(sql);
    if (rc < 0)
        return -1;
    int n = pgrows_count(rows);
    const char **names = xcalloc((size_t)n + 1, sizeof(char *));
    for (int i = 0; i < n; i++)
        names[i] = pgrows_value(rows, i, 0);
    char why[512];
    if (outbox_mapper_check_columns(p->mapper, 0, names, (size_t)n, why, sizeof(why)) < 0) {
        snprintf(a->err, sizeof(a->err),
                 "%s: add the column (scripts/outbox.sql has the default table), or change "
                 "--table or --subject",
                 why);
        rc = -1;
    }
    free(names);
    pgrows_free(rows);
    return rc;
}

static int apply_publication(Apply *a)
{
    Plan *p = a->plan;
    const char *pub = p->cfg->publication;
    bool done[3];
    const char *conds[] = {p->pub_exists, p->pub_covers, p->pub_inserts};
    if (conditions(a, conds, 3, done) < 0)
        return -1;
    int rc;
    if (!done[0]) {
        if ((rc = run(a, p->create_pub, "could not create the publication")) < 0)
            return -1;
        if (rc > 0)
            printf("created publication \"%s\" for %s (inserts only)\n", pub, p->qualified);
        else
            printf("publication \"%s\" already there\n", pub);
        return 0;
    }
    if (!done[1]) {
        if (run(a, p->add_table, "could not add the outbox table to the publication") < 0)
            return -1;
        printf("added %s to publication \"%s\"\n", p->qualified, pub);
    }
    if (!done[2]) {
        snprintf(a->err, sizeof(a->err),
                 "publication \"%s\" does not publish inserts: run ALTER PUBLICATION %s SET "
                 "(publish = 'insert'), or choose another --publication",
                 pub, p->q_pub);
        return -1;
    }
    if (done[1])
        printf("publication \"%s\" already there (publishes inserts of %s)\n", pub, p->qualified);
    return 0;
}

static int apply_role(Apply *a)
{
    Plan *p = a->plan;
    const char *role = p->opts->role;
    bool done[2];
    const char *conds[] = {p->role_exists, p->role_ready};
    if (conditions(a, conds, 2, done) < 0)
        return -1;
    int rc;
    if (!done[0]) {
        if ((rc = run(a, p->create_role, "could not create the role")) < 0)
            return -1;
        if (rc > 0)
            printf("created role \"%s\" (LOGIN REPLICATION, no password yet)\n", role);
        else
            printf("role \"%s\" already there\n", role);
    } else if (!done[1]) {
        if (run(a, p->alter_role, "could not alter the role") < 0)
            return -1;
        printf("gave role \"%s\" LOGIN REPLICATION\n", role);
    } else {
        printf("role \"%s\" already there\n", role);
    }

    const char *grants[] = {p->has_usage, p->has_select};
    if (conditions(a, grants, 2, done) < 0)
        return -1;
    if (done[0]) {
        printf("USAGE on schema \"%s\" already granted to \"%s\"\n", p->schema, role);
    } else {
        if (run(a, p->grant_usage, "could not grant USAGE on the schema") < 0)
            return -1;
        printf("granted USAGE on schema \"%s\" to \"%s\"\n", p->schema, role);
    }
    if (done[1]) {
        printf("SELECT on %s already granted to \"%s\"\n", p->qualified, role);
    } else {
        if (run(a, p->grant_select, "could not grant SELECT on the outbox table") < 0)
            return -1;
        printf("granted SELECT on %s to \"%s\"\n", p->qualified, role);
    }
    return 0;
}

static int apply_postgres(Plan *p)
{
    Apply a = {.plan = p};
    int rc = pgstream_connect_plain(&a.pg, p->cfg->pg_url, a.err, sizeof(a.err));
    if (rc != 0) {
        fprintf(stderr, "outboxd: %s\n", a.err);
        return EXIT_OUTBOXD_CHECK;
    }
    rc = EXIT_OUTBOXD_OK;
    if (apply_table(&a) < 0 || apply_publication(&a) < 0 || apply_role(&a) < 0) {
        if (strcmp(a.sqlstate, SQLSTATE_INSUFFICIENT_PRIVILEGE) == 0)
            fprintf(stderr,
                    "outboxd: %s\noutboxd: setup --apply creates a table, a publication, a role "
                    "and grants: --pg-url must connect as a superuser, or as the owner of %s with "
                    "CREATEROLE\n",
                    a.err, p->qualified);
        else
            fprintf(stderr, "outboxd: %s\n", a.err);
        rc = EXIT_OUTBOXD_FAILURE;
    }
    pgstream_free(a.pg);
    return rc;
}

/* ---- applying: the stream -------------------------------------------------------------------- */

/* Connects to NATS; on failure prints why and returns NULL. */
static natsConnection *nats_connect(const Config *cfg)
{
    char err[1024];
    natsConnection *nc = jsapi_connect_once(cfg->nats_url, err, sizeof(err));
    if (!nc)
        fprintf(stderr, "outboxd: %s\n", err);
    return nc;
}

/* The JetStream API error in a reply: its err_code (0 when none) and description. */
static int js_error(json_t *reply, char *desc, size_t desclen)
{
    json_t *e = json_object_get(reply, "error");
    if (!e)
        return 0;
    const char *d = json_string_value(json_object_get(e, "description"));
    snprintf(desc, desclen, "%s", d ? d : "unknown error");
    int code = (int)json_integer_value(json_object_get(e, "err_code"));
    return code ? code : -1;
}

/* Reports on an existing stream: fine when its subjects capture what outboxd publishes. */
static int existing_stream(const Plan *p, const char *name, json_t *config, bool ours)
{
    json_t *subjects = json_object_get(config, "subjects");
    Buf have;
    buf_init(&have);
    subjects_join(subjects, &have);
    /* The dead-letter subject matters only when events are dead-lettered. */
    bool dlq = strcmp(p->cfg->on_poison, "dead-letter") == 0;
    const char *missing = !subjects_cover(subjects, p->filter) ? p->filter
                          : dlq && !subjects_cover(subjects, p->cfg->dead_letter_subject)
                              ? p->cfg->dead_letter_subject
                              : NULL;
    int rc = EXIT_OUTBOXD_OK;
    if (missing) {
        Buf want;
        buf_init(&want);
        subjects_join(plan_subjects(p), &want);
        fprintf(stderr,
                "outboxd: stream \"%s\" exists, but its subjects (%s) do not capture %s: add "
                "the subjects (%s) to it (nats stream edit %s --subjects ...), or choose "
                "another --stream\n",
                name, have.data, missing, want.data, name);
        buf_deinit(&want);
        rc = EXIT_OUTBOXD_FAILURE;
    } else if (ours) {
        printf("stream \"%s\" already there (subjects %s)\n", name, have.data);
    } else {
        printf("stream \"%s\" already captures %s%s%s (subjects %s): not creating \"%s\"\n", name,
               p->filter, dlq ? " and " : "", dlq ? p->cfg->dead_letter_subject : "", have.data,
               p->opts->stream);
    }
    int64_t window = json_integer_value(json_object_get(config, "duplicate_window")) / 1000000;
    int64_t need = p->cfg->checkpoint_interval_ms + p->cfg->ack_timeout_ms + 60000;
    if (rc == EXIT_OUTBOXD_OK && window < need)
        printf("note: stream \"%s\" drops duplicates within %" PRId64 " s only; outboxd needs "
               "%" PRId64 " s (--checkpoint-interval + --ack-timeout + 60 s): raise it with nats "
               "stream edit %s --dupe-window %" PRId64 "s\n",
               name, window / 1000, (need + 999) / 1000, name, (need + 999) / 1000);
    buf_deinit(&have);
    return rc;
}

/* When another stream holds the subjects: is it one that serves? */
static int overlapping_stream(const Plan *p, natsConnection *nc, const char *desc)
{
    char name[256], err[512];
    bool found = false;
    if (jsapi_find_stream(nc, p->filter, name, sizeof(name), &found, err, sizeof(err)) < 0 ||
        !found)
        goto fail;
    char subject[320];
    snprintf(subject, sizeof(subject), "$JS.API.STREAM.INFO.%s", name);
    bool no_responders;
    json_t *info = jsapi_request(nc, subject, "", &no_responders, err, sizeof(err));
    if (!info)
        goto fail;
    int rc = existing_stream(p, name, json_object_get(info, "config"), false);
    json_decref(info);
    return rc;
fail:
    fprintf(stderr,
            "outboxd: could not create stream \"%s\": %s: another stream captures some of its "
            "subjects; change that stream, or --subject and --dead-letter-subject\n",
            p->opts->stream, desc);
    return EXIT_OUTBOXD_FAILURE;
}

static int apply_stream(const Plan *p)
{
    const char *name = p->opts->stream;
    natsConnection *nc = nats_connect(p->cfg);
    if (!nc)
        return EXIT_OUTBOXD_CHECK;
    int rc = EXIT_OUTBOXD_FAILURE;
    char subject[320], err[512], desc[512];
    bool no_responders;
    json_t *reply = NULL;
    char *body = NULL;

    snprintf(subject, sizeof(subject), "$JS.API.STREAM.INFO.%s", name);
    reply = jsapi_request(nc, subject, "", &no_responders, err, sizeof(err));
    if (!reply) {
        if (no_responders) {
            fprintf(stderr, "outboxd: JetStream is not enabled on this NATS server: start "
                            "nats-server with -js (or a jetstream block in its configuration)\n");
            rc = EXIT_OUTBOXD_CHECK;
        } else {
            fprintf(stderr, "outboxd: %s\n", err);
        }
        goto done;
    }
    int code = js_error(reply, desc, sizeof(desc));
    if (code == 0) {
        rc = existing_stream(p, name, json_object_get(reply, "config"), true);
        goto done;
    }
    if (code != JS_ERR_STREAM_NOT_FOUND) {
        fprintf(stderr, "outboxd: could not read stream \"%s\": %s\n", name, desc);
        goto done;
    }
    json_decref(reply);

    body = json_dumps(p->stream, JSON_COMPACT | JSON_PRESERVE_ORDER);
    snprintf(subject, sizeof(subject), "$JS.API.STREAM.CREATE.%s", name);
    reply = jsapi_request(nc, subject, body, &no_responders, err, sizeof(err));
    if (!reply) {
        fprintf(stderr, "outboxd: could not create stream \"%s\": %s\n", name, err);
        goto done;
    }
    code = js_error(reply, desc, sizeof(desc));
    if (code == JS_ERR_SUBJECTS_OVERLAP) {
        rc = overlapping_stream(p, nc, desc);
    } else if (code != 0) {
        fprintf(stderr, "outboxd: could not create stream \"%s\": %s\n", name, desc);
    } else {
        Buf subj;
        buf_init(&subj);
        subjects_join(plan_subjects(p), &subj);
        printf("created stream \"%s\" (subjects %s; file storage, %d replica%s, duplicate "
               "window %" PRId64 " s)\n",
               name, subj.data, p->opts->replicas, p->opts->replicas == 1 ? "" : "s",
               p->duplicate_window_ms / 1000);
        buf_deinit(&subj);
        rc = EXIT_OUTBOXD_OK;
    }
done:
    free(body);
    json_decref(reply);
    natsConnection_Destroy(nc);
    return rc;
}

int setup_run(const Config *cfg, const SetupOptions *opts)
{
    if (!opts->role[0]) {
        fprintf(stderr, "outboxd: --role needs a name\n");
        return EXIT_OUTBOXD_USAGE;
    }
    if (!valid_stream_name(opts->stream)) {
        fprintf(stderr,
                "outboxd: invalid stream name \"%s\": no spaces, '.', '*', '>', '/' or "
                "'\\' (at most 255 bytes)\n",
                opts->stream);
        return EXIT_OUTBOXD_USAGE;
    }
    if (opts->replicas < 1 || opts->replicas > 5) {
        fprintf(stderr, "outboxd: --stream-replicas must be 1 to 5 (3 on a 3-node cluster)\n");
        return EXIT_OUTBOXD_USAGE;
    }
    Plan plan;
    if (plan_init(&plan, cfg, opts) < 0) {
        plan_deinit(&plan);
        return EXIT_OUTBOXD_USAGE;
    }
    int rc = EXIT_OUTBOXD_OK;
    if (!opts->apply) {
        print_script(&plan);
    } else {
        rc = apply_postgres(&plan);
        if (rc == EXIT_OUTBOXD_OK)
            rc = apply_stream(&plan);
        if (rc == EXIT_OUTBOXD_OK)
            printf("next: give role \"%s\" a password (ALTER ROLE %s PASSWORD '...') or use "
                   "certificate authentication, and run outboxd with --pg-url connecting as "
                   "\"%s\"; it makes its replication slot \"%s\" on its first start\n",
                   opts->role, plan.q_role, opts->role, cfg->slot);
    }
    plan_deinit(&plan);
    fflush(stdout);
    return rc;
}
