/*
 * pgstream.c - the replication connection to PostgreSQL.
 *
 * One connection with replication=database serves both the catalog checks (simple queries
 * are allowed on it) and the CopyBoth stream. Session settings are pinned the way PostgreSQL's
 * own subscriber pins them, so a timestamptz always reads "2026-11-22 17:26:18+00" and a bytea
 * always reads "\x..." whatever the server's defaults.
 *
 * Every PGresult is cleared on every path; only the simple query protocol is used (the
 * extended protocol is refused on replication connections), so literals and identifiers are
 * quoted with libpq's escaping functions.
 *
 * Silent connections. A NAT entry, a load balancer's idle timeout or a partition can leave a
 * connection open with nothing arriving and no FIN; a blocking libpq call then waits for ever.
 * So every connection gets TCP keepalives, tcp_user_timeout and connect_timeout (placed before
 * the user's connection string, so a keyword set there wins), and in the relay (after
 * pgstream_set_receive_timeout) every statement is sent without blocking and waited for with
 * a deadline: one that passes drops the connection (the socket is shut down, so every later
 * call on it fails at once) and the caller's reconnect path takes over. The plain sessions also
 * get statement_timeout, so the server gives up on a statement the relay stopped waiting for.
 * The waits that are long by nature (creating a slot waits for every running transaction, the
 * backfill's FETCHes) keep their tick instead of a deadline. The CopyBoth stream's own silence
 * is the relay's to judge (pgstream_liveness()), like PostgreSQL's wal_receiver_timeout.
 */
#include "outboxd/pgstream.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <libpq-fe.h>

#include "outboxd/log.h"
#include "outboxd/pgoutput.h"
#include "outboxd/util.h"

struct PgStream {
    PGconn *conn;
    char *copybuf; /* the last message from PQgetCopyData, freed on the next read */
    int64_t query_timeout_us; /* 0: statements are waited for without a bound */
    char dropped[160];        /* why the connection was dropped (a deadline passed), or "" */
};

static const char session_options[] = "-c datestyle=ISO -c intervalstyle=postgres "
                                      "-c extra_float_digits=3 -c TimeZone=UTC "
                                      "-c bytea_output=hex";

/* libpq messages end in a newline and may span lines; keep them to one line. */
static void set_pg_error(char *err, size_t errlen, const char *prefix, const char *pgmsg)
{
    char msg[1024];
    snprintf(msg, sizeof(msg), "%s", pgmsg ? pgmsg : "unknown error");
    for (char *p = msg; *p; p++)
        if (*p == '\n' || *p == '\r' || *p == '\t')
            *p = ' ';
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == ' ')
        msg[--n] = '\0';
    snprintf(err, errlen, "%s: %s", prefix, msg);
}

static const char *process_password;
static int64_t receive_timeout_ms;
/* The longest wait for a statement of a plain session in the relay (see connect_mode). */
#define PLAIN_QUERY_MS 10000

void pgstream_set_password(const char *password)
{
    process_password = password;
}

void pgstream_set_receive_timeout(int64_t ms)
{
    receive_timeout_ms = ms > 0 ? ms : 0;
}

/* The connection's error: why outboxd dropped it, or libpq's message. */
static const char *conn_error(const PgStream *s)
{
    return s->dropped[0] ? s->dropped : PQerrorMessage(s->conn);
}

static int connect_mode(PgStream **out, const char *conninfo, bool replication, char *err,
                        size_t errlen)
{
    /*
     * PQconnectdbParams takes the keywords in order and keeps the last value of each; dbname
     * (expanded: the whole connection string) sets everything it names at its place. So the
     * network defaults go before it, where the user's connection string overrides them, and
     * the session settings that fix how values are rendered after it, where nothing does.
     * Keepalives find a peer that vanished while the connection is idle (idle 10 s, then 3
     * probes 5 s apart) and keep NAT entries fresh; tcp_user_timeout ends a connection whose
     * sent data stays unacknowledged (a write that would block for ever otherwise).
     */
    char user_timeout[24], statement[64], options[sizeof(session_options) + 64];
    snprintf(user_timeout, sizeof(user_timeout), "%lld",
             (long long)(receive_timeout_ms ? receive_timeout_ms : 60000));
    snprintf(options, sizeof(options), "%s", session_options);
    /* The plain sessions' queries run between the relay's status updates (the WAL position,
     * bookmarks): they get at most PLAIN_QUERY_MS, so one stuck query cannot hold the updates
     * back until the server's wal_sender_timeout. */
    int64_t query_ms = receive_timeout_ms;
    if (!replication && query_ms > PLAIN_QUERY_MS)
        query_ms = PLAIN_QUERY_MS;
    if (!replication && query_ms) {
        /* Not on the replication connection: START_REPLICATION runs for as long as it streams,
         * and creating a slot waits for every running transaction. */
        snprintf(statement, sizeof(statement), " -c statement_timeout=%lld", (long long)query_ms);
        snprintf(options, sizeof(options), "%s%s", session_options, statement);
    }
    const char *keys[16], *vals[16];
    int n = 0;
    if (!getenv("PGCONNECT_TIMEOUT")) { /* libpq's own variable wins over our default */
        keys[n] = "connect_timeout";
        vals[n++] = "10";
    }
    keys[n] = "keepalives";
    vals[n++] = "1";
    keys[n] = "keepalives_idle";
    vals[n++] = "10";
    keys[n] = "keepalives_interval";
    vals[n++] = "5";
    keys[n] = "keepalives_count";
    vals[n++] = "3";
    keys[n] = "tcp_user_timeout";
    vals[n++] = user_timeout;
    keys[n] = "dbname";
    vals[n++] = conninfo;
    keys[n] = "client_encoding";
    vals[n++] = "UTF8";
    keys[n] = "options";
    vals[n++] = options;
    keys[n] = "fallback_application_name";
    vals[n++] = "outboxd";
    if (replication) {
        keys[n] = "replication";
        vals[n++] = "database";
    }
    if (process_password) {
        keys[n] = "password";
        vals[n++] = process_password;
    }
    keys[n] = vals[n] = NULL;
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(conn) != CONNECTION_OK) {
        const char *msg = PQerrorMessage(conn);
        if (strstr(msg, "must be superuser or replication role") || /* 15 */
            strstr(msg, "permission denied to start WAL sender")) { /* 16 and later */
            const char *user = PQuser(conn);
            snprintf(err, errlen,
                     "role \"%s\" lacks the REPLICATION attribute: run ALTER ROLE %s REPLICATION "
                     "as a superuser, or connect as a role that has it",
                     user ? user : "?", user ? user : "...");
        } else {
            set_pg_error(err, errlen, "could not connect to PostgreSQL", msg);
        }
        PQfinish(conn);
        return PGSTREAM_CHECK_FAILED;
    }
    PgStream *s = xcalloc(1, sizeof(*s));
    s->conn = conn;
    s->query_timeout_us = query_ms * 1000;
    *out = s;
    return 0;
}

int pgstream_connect(PgStream **out, const char *conninfo, char *err, size_t errlen)
{
    return connect_mode(out, conninfo, true, err, errlen);
}

int pgstream_connect_plain(PgStream **out, const char *conninfo, char *err, size_t errlen)
{
    return connect_mode(out, conninfo, false, err, errlen);
}

void pgstream_free(PgStream *s)
{
    if (!s)
        return;
    if (s->copybuf)
        PQfreemem(s->copybuf);
    PQfinish(s->conn);
    free(s);
}

int pgstream_socket(const PgStream *s)
{
    return PQsocket(s->conn);
}

static PGresult *exec_waiting(PgStream *s, const char *sql, bool (*tick)(void *), void *arg);

static inline int64_t min_i64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* A tick for the statements that wait by nature (creating a slot waits for every running
 * transaction): no deadline. */
static bool keep_waiting(void *arg)
{
    (void)arg;
    return true;
}

/* Runs sql like PQexec, within the connection's deadline (see the top of the file). */
static PGresult *exec_bounded(PgStream *s, const char *sql)
{
    return exec_waiting(s, sql, NULL, NULL);
}

/* Runs a query that returns tuples. Returns the result or NULL with err set. */
static PGresult *query(PgStream *s, const char *sql, char *err, size_t errlen)
{
    PGresult *res = exec_bounded(s, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        set_pg_error(err, errlen, "could not query PostgreSQL", conn_error(s));
        PQclear(res);
        return NULL;
    }
    return res;
}

/* Reports a failed statement: "what: <server message>" into err and, when sqlstate is given,
 * the error code into it. res stays the caller's. */
static void result_error(PgStream *s, const PGresult *res, const char *what, char *sqlstate,
                         char *err, size_t errlen)
{
    if (sqlstate) {
        const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        snprintf(sqlstate, 6, "%s", code ? code : "");
    }
    set_pg_error(err, errlen, what, conn_error(s));
}

/* Runs a command. Returns 0, or -1 with err set; *sqlstate (if given) gets the error code. */
static int command(PgStream *s, const char *sql, const char *what, char *sqlstate, char *err,
                   size_t errlen)
{
    PGresult *res = exec_bounded(s, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        result_error(s, res, what, sqlstate, err, errlen);
        rc = -1;
    }
    PQclear(res);
    return rc;
}

/*
 * Runs sql like PQexec, but without blocking for more than 200 ms at a time. With tick,
 * tick(arg) is called between the waits (liveness stays reported while the server works), and
 * when it returns false the statement is cancelled (its result is then the server's error).
 * Without tick the connection's deadline applies (none when its query timeout is 0): when it
 * passes, the connection is dropped (its socket shut down; no cancel request: libpq 15's
 * PQcancel connects without a timeout, and a server that does not answer within the deadline
 * is not reachable anyway) and the result is NULL, with the reason in conn_error(). Returns
 * the last result, as PQexec does (NULL only when out of memory or the connection is gone).
 */
static PGresult *exec_waiting(PgStream *s, const char *sql, bool (*tick)(void *), void *arg)
{
    if (s->dropped[0])
        return NULL;
    if (!tick && s->query_timeout_us == 0)
        return PQexec(s->conn, sql);
    int64_t deadline = tick ? INT64_MAX : now_mono_us() + s->query_timeout_us;
    if (!PQsendQuery(s->conn, sql))
        return NULL;
    bool cancelled = false;
    while (PQisBusy(s->conn)) {
        int64_t now = now_mono_us();
        if (now >= deadline) {
            snprintf(s->dropped, sizeof(s->dropped),
                     "PostgreSQL did not answer within %lld ms (a silent connection?); dropped "
                     "the connection",
                     (long long)(s->query_timeout_us / 1000));
            shutdown(PQsocket(s->conn), SHUT_RDWR);
            PQconsumeInput(s->conn);
            for (PGresult *r; (r = PQgetResult(s->conn));)
                PQclear(r);
            return NULL;
        }
        struct pollfd pfd = {.fd = PQsocket(s->conn), .events = POLLIN};
        if (poll_until(&pfd, 1, min_i64(deadline, now + 200000)) < 0 && errno != EINTR)
            break;
        if (!PQconsumeInput(s->conn))
            break;
        if (tick && !cancelled && !tick(arg)) {
            PGcancel *c = PQgetCancel(s->conn);
            char why[256];
            if (c) {
                PQcancel(c, why, sizeof(why));
                PQfreeCancel(c);
            }
            cancelled = true;
        }
    }
    PGresult *last = NULL, *res;
    while ((res = PQgetResult(s->conn))) {
        /* keep the first error, as PQexec does */
        if (last && PQresultStatus(last) == PGRES_FATAL_ERROR) {
            PQclear(res);
            continue;
        }
        PQclear(last);
        last = res;
        /* In COPY state PQgetResult keeps answering with the COPY result: stop there, as
         * PQexec does (START_REPLICATION) */
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_COPY_BOTH || st == PGRES_COPY_IN || st == PGRES_COPY_OUT)
            break;
    }
    return last;
}

int pgstream_identify(PgStream *s, PgSystem *sys, char *err, size_t errlen)
{
    PGresult *res = query(s, "IDENTIFY_SYSTEM", err, errlen);
    if (!res)
        return -1;
    int rc = -1;
    if (PQntuples(res) != 1 || PQnfields(res) < 4) {
        snprintf(err, errlen, "could not identify system: unexpected reply (%d rows, %d fields)",
                 PQntuples(res), PQnfields(res));
        goto done;
    }
    snprintf(sys->system_id, sizeof(sys->system_id), "%s", PQgetvalue(res, 0, 0));
    sys->timeline = (uint32_t)strtoul(PQgetvalue(res, 0, 1), NULL, 10);
    if (!lsn_parse(PQgetvalue(res, 0, 2), &sys->xlogpos)) {
        snprintf(err, errlen, "could not identify system: bad xlogpos \"%s\"",
                 PQgetvalue(res, 0, 2));
        goto done;
    }
    snprintf(sys->dbname, sizeof(sys->dbname), "%s", PQgetvalue(res, 0, 3));
    rc = 0;
done:
    PQclear(res);
    return rc;
}

/* Appends v quoted by libpq's escape (PQescapeLiteral or PQescapeIdentifier); false, with err
 * set, when libpq refuses (invalid encoding). */
static bool put_escaped(PgStream *s, Buf *b, const char *v,
                        char *(*escape)(PGconn *, const char *, size_t), char *err,
                        size_t errlen)
{
    char *q = escape(s->conn, v, strlen(v));
    if (!q) {
        set_pg_error(err, errlen, "could not quote a name or value", PQerrorMessage(s->conn));
        return false;
    }
    buf_puts(b, q);
    PQfreemem(q);
    return true;
}

static bool put_literal(PgStream *s, Buf *b, const char *v, char *err, size_t errlen)
{
    return put_escaped(s, b, v, PQescapeLiteral, err, errlen);
}

static bool put_ident(PgStream *s, Buf *b, const char *v, char *err, size_t errlen)
{
    return put_escaped(s, b, v, PQescapeIdentifier, err, errlen);
}

static int check_wal_level(PgStream *s, char *err, size_t errlen)
{
    PGresult *res = query(s, "SHOW wal_level", err, errlen);
    if (!res)
        return -1;
    int rc = 0;
    const char *level = PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "";
    if (strcmp(level, "logical") != 0) {
        snprintf(err, errlen,
                 "wal_level is \"%s\", but outboxd needs \"logical\": set wal_level = logical in "
                 "postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL",
                 level);
        rc = PGSTREAM_CHECK_FAILED;
    }
    PQclear(res);
    return rc;
}

static int check_table(PgStream *s, const PgSetup *setup, size_t t, char *err, size_t errlen)
{
    const char *schema = outbox_mapper_schema(setup->mapper, t);
    const char *table = outbox_mapper_table(setup->mapper, t);
    const char *qualified = outbox_mapper_qualified(setup->mapper, t);
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT a.attname FROM pg_catalog.pg_class c "
                   "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                   "LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
                   "AND NOT a.attisdropped "
                   "WHERE c.relkind IN ('r', 'p') AND n.nspname = ");
    int rc = -1;
    PGresult *res = NULL;
    if (!put_literal(s, &sql, schema, err, errlen))
        goto done;
    buf_puts(&sql, " AND c.relname = ");
    if (!put_literal(s, &sql, table, err, errlen))
        goto done;
    buf_puts(&sql, " ORDER BY a.attnum");
    res = query(s, sql.data, err, errlen);
    if (!res)
        goto done;
    int n = PQntuples(res);
    if (n == 0) {
        snprintf(err, errlen,
                 "outbox table %s does not exist: create it (scripts/outbox.sql has the default "
                 "table) or point --table at yours",
                 qualified);
        rc = PGSTREAM_CHECK_FAILED;
        goto done;
    }
    const char **names = xcalloc((size_t)n, sizeof(char *));
    size_t count = 0;
    for (int i = 0; i < n; i++)
        if (!PQgetisnull(res, i, 0))
            names[count++] = PQgetvalue(res, i, 0);
    rc = outbox_mapper_check_columns(setup->mapper, t, names, count, err, errlen) < 0
             ? PGSTREAM_CHECK_FAILED
             : 0;
    free(names);
done:
    PQclear(res);
    buf_deinit(&sql);
    return rc;
}

/* Appends "schema"."table" of outbox table t. */
static bool put_table(PgStream *s, Buf *sql, const OutboxMapper *m, size_t t, char *err,
                      size_t errlen)
{
    if (!put_ident(s, sql, outbox_mapper_schema(m, t), err, errlen))
        return false;
    buf_putc(sql, '.');
    return put_ident(s, sql, outbox_mapper_table(m, t), err, errlen);
}

/* Creates the publication for every outbox table, inserts only. */
static int create_publication(PgStream *s, const PgSetup *setup, char *err, size_t errlen)
{
    const OutboxMapper *m = setup->mapper;
    Buf sql;
    buf_init(&sql);
    int rc = -1;
    buf_puts(&sql, "CREATE PUBLICATION ");
    if (!put_ident(s, &sql, setup->publication, err, errlen))
        goto done;
    buf_puts(&sql, " FOR TABLE ");
    for (size_t t = 0; t < outbox_mapper_ntables(m); t++) {
        if (t > 0)
            buf_puts(&sql, ", ");
        if (!put_table(s, &sql, m, t, err, errlen))
            goto done;
    }
    /* A partitioned outbox is published under its root's name, the one the relay looks for;
     * without this, inserts would come as the partitions' and match no outbox table. */
    buf_puts(&sql, " WITH (publish = 'insert', publish_via_partition_root = true)");
    if (command(s, sql.data, "could not create publication", NULL, err, errlen) < 0)
        goto done;
    for (size_t t = 0; t < outbox_mapper_ntables(m); t++)
        log_info("created publication \"%s\" for %s (inserts only)", setup->publication,
                 outbox_mapper_qualified(m, t));
    rc = 0;
done:
    buf_deinit(&sql);
    return rc;
}

/* Checks that the publication exists, publishes inserts and covers outbox table t; creates
 * it (for every table) when it is missing and that is allowed. */
static int check_publication(PgStream *s, const PgSetup *setup, size_t t, char *err,
                             size_t errlen)
{
    const char *qualified = outbox_mapper_qualified(setup->mapper, t);
    Buf sql;
    buf_init(&sql);
    int rc = -1;
    PGresult *res = NULL;
    buf_puts(&sql, "SELECT pubinsert, EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t "
                   "WHERE t.pubname = p.pubname AND t.schemaname = ");
    if (!put_literal(s, &sql, outbox_mapper_schema(setup->mapper, t), err, errlen))
        goto done;
    buf_puts(&sql, " AND t.tablename = ");
    if (!put_literal(s, &sql, outbox_mapper_table(setup->mapper, t), err, errlen))
        goto done;
    buf_puts(&sql, ") FROM pg_catalog.pg_publication p WHERE p.pubname = ");
    if (!put_literal(s, &sql, setup->publication, err, errlen))
        goto done;
    res = query(s, sql.data, err, errlen);
    if (!res)
        goto done;

    if (PQntuples(res) == 0) {
        if (!setup->create) {
            snprintf(err, errlen,
                     "publication \"%s\" does not exist: create it with CREATE PUBLICATION %s "
                     "FOR TABLE %s WITH (publish = 'insert'), or run with --create",
                     setup->publication, setup->publication, qualified);
            rc = PGSTREAM_CHECK_FAILED;
            goto done;
        }
        rc = create_publication(s, setup, err, errlen);
        goto done;
    }
    if (strcmp(PQgetvalue(res, 0, 1), "t") != 0) {
        snprintf(err, errlen,
                 "publication \"%s\" does not cover %s: run ALTER PUBLICATION %s ADD TABLE %s",
                 setup->publication, qualified, setup->publication, qualified);
        rc = PGSTREAM_CHECK_FAILED;
        goto done;
    }
    if (strcmp(PQgetvalue(res, 0, 0), "t") != 0) {
        snprintf(err, errlen,
                 "publication \"%s\" does not publish inserts: run ALTER PUBLICATION %s SET "
                 "(publish = 'insert')",
                 setup->publication, setup->publication);
        rc = PGSTREAM_CHECK_FAILED;
        goto done;
    }
    rc = 0;
done:
    PQclear(res);
    buf_deinit(&sql);
    return rc;
}

/* A row's transaction id widened to 64 bits. xmin is a 32-bit xid; its epoch comes from ref
 * (the current snapshot's xmax, which every committed xmin precedes by less than 2^31 unless
 * frozen), so the value is the same whichever snapshot a resumed read takes it from. */
static void put_xid8(Buf *sql, uint64_t ref)
{
    uint64_t base = ref & ~UINT64_C(0xFFFFFFFF);
    buf_printf(sql,
               "(%" PRIu64 " + t.xmin::text::int8 - CASE WHEN %" PRIu64 " + t.xmin::text::int8 > %"
               PRIu64 " THEN 4294967296 ELSE 0 END)",
               base, base, ref);
}

/* The filter of a resumed backfill: rows visible in the slot's snapshot. Frozen rows read xmin
 * 2 (and bootstrap ones 1): they are older than any snapshot. */
static bool put_snapshot_filter(PgStream *s, Buf *sql, const PgBackfill *bf, uint64_t ref,
                                char *err, size_t errlen)
{
    buf_puts(sql, "(t.xmin::text::int8 < 3 OR pg_catalog.pg_visible_in_snapshot(");
    put_xid8(sql, ref);
    buf_puts(sql, "::text::pg_catalog.xid8, ");
    if (!put_literal(s, sql, bf->snapshot, err, errlen))
        return false;
    buf_puts(sql, "::pg_catalog.pg_snapshot))");
    return true;
}

/* Whether table t has column col (a mapped column may be optional); -1 on error. */
static int has_column(PgStream *s, const PgSetup *setup, size_t t, const char *col, char *err,
                      size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "SELECT count(*) FROM pg_catalog.pg_attribute WHERE NOT attisdropped AND "
                   "attnum > 0 AND attrelid = ");
    Buf table;
    buf_init(&table);
    int rc = -1;
    if (put_table(s, &table, setup->mapper, t, err, errlen) &&
        put_literal(s, &sql, table.data, err, errlen)) {
        buf_puts(&sql, "::regclass AND attname = ");
        if (put_literal(s, &sql, col, err, errlen)) {
            PGresult *res = query(s, sql.data, err, errlen);
            if (res)
                rc = strcmp(PQgetvalue(res, 0, 0), "0") != 0;
            PQclear(res);
        }
    }
    buf_deinit(&table);
    buf_deinit(&sql);
    return rc;
}

/* The time that orders table t's rows (the "ts" of the commit-order key): each row's commit
 * time where the server keeps it, else the table's time column (the transaction's start with
 * the default now()), else none. */
static bool put_order_time(PgStream *s, Buf *sql, const PgSetup *setup, size_t t, char *err,
                           size_t errlen)
{
    const char *col = outbox_mapper_role_column(setup->mapper, t, ROLE_OCCURRED_AT);
    int has = col && !setup->backfill->commit_order ? has_column(s, setup, t, col, err, errlen)
                                                    : 0;
    if (has < 0)
        return false;
    if (!has)
        col = NULL;
    if (setup->backfill->commit_order) {
        buf_puts(sql, "pg_catalog.pg_xact_commit_timestamp(t.xmin)");
    } else if (col) {
        buf_puts(sql, "t.");
        if (!put_ident(s, sql, col, err, errlen))
            return false;
        buf_puts(sql, "::timestamptz");
    } else {
        buf_puts(sql, "NULL::timestamptz");
    }
    return true;
}

/* Appends " AND " ... the keyset's "after": the rows whose key (ts, xid, ctid) sorts after
 * the text "<ts>|<xid>|<ctid>" a row of an earlier read carried. */
static bool put_after(PgStream *s, Buf *sql, const char *after, char *err, size_t errlen)
{
    char ts[96], xid[32], ctid[32];
    const char *p1 = strchr(after, '|'), *p2 = p1 ? strchr(p1 + 1, '|') : NULL;
    if (!p1 || !p2 || (size_t)(p1 - after) >= sizeof(ts) || (size_t)(p2 - p1 - 1) >= sizeof(xid) ||
        strlen(p2 + 1) >= sizeof(ctid)) {
        snprintf(err, errlen, "the backfill's keyset position \"%.100s\" is not "
                              "\"<time>|<transaction>|<row>\"", after);
        return false;
    }
    snprintf(ts, sizeof(ts), "%.*s", (int)(p1 - after), after);
    snprintf(xid, sizeof(xid), "%.*s", (int)(p2 - p1 - 1), p1 + 1);
    snprintf(ctid, sizeof(ctid), "%s", p2 + 1);
    buf_puts(sql, " AND (k.ts, k.x, t.ctid) > (");
    if (!put_literal(s, sql, ts, err, errlen))
        return false;
    buf_puts(sql, "::timestamptz, ");
    if (!put_literal(s, sql, xid, err, errlen))
        return false;
    buf_puts(sql, "::int8, ");
    if (!put_literal(s, sql, ctid, err, errlen))
        return false;
    buf_puts(sql, "::tid)");
    return true;
}

/*
 * Reads outbox table t through a cursor, in commit order (the key (ts, xid, ctid): the commit
 * time, or the time column without commit timestamps, then the transaction, then the row's
 * place), in the current transaction: all of it (the new slot's snapshot), or with resumed the
 * rows visible in bf->snapshot; with after only the rows whose key sorts after it; with
 * bf->since only the rows committed since then (see PgBackfill). ref: the current snapshot's
 * xmax, for the transaction ids.
 */
static int backfill_table(PgStream *s, const PgSetup *setup, size_t t, PgBackfill *bf,
                          const char *after, uint64_t ref, bool resumed, char *err,
                          size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    int rc = -1;
    PGresult *res = NULL;
    if (bf->count_only) {
        buf_puts(&sql, "SELECT count(*) FROM ");
        if (!put_table(s, &sql, setup->mapper, t, err, errlen) ||
            !(res = query(s, sql.data, err, errlen)))
            goto done;
        bf->rows += strtoull(PQgetvalue(res, 0, 0), NULL, 10);
        rc = 0;
        goto done;
    }
    /* The key goes first, as one text; the table's own columns follow. */
    buf_puts(&sql, "DECLARE outboxd_backfill NO SCROLL CURSOR FOR SELECT concat_ws('|', k.ts, "
                   "k.x, t.ctid), t.* FROM ");
    if (!put_table(s, &sql, setup->mapper, t, err, errlen))
        goto done;
    buf_puts(&sql, " t, LATERAL (SELECT coalesce(");
    if (!put_order_time(s, &sql, setup, t, err, errlen))
        goto done;
    buf_puts(&sql, ", '-infinity') AS ts, ");
    put_xid8(&sql, ref);
    buf_puts(&sql, " AS x) k WHERE true");
    if (after && after[0] && !put_after(s, &sql, after, err, errlen))
        goto done;
    if (resumed) {
        buf_puts(&sql, " AND ");
        if (!put_snapshot_filter(s, &sql, bf, ref, err, errlen))
            goto done;
    }
    if (bf->since) {
        /* Recovery: what committed since the cut; without commit times, what started within
         * the margin before it (a transaction commits after it starts). */
        buf_puts(&sql, " AND k.ts >= ");
        if (!put_literal(s, &sql, bf->since, err, errlen))
            goto done;
        buf_printf(&sql, "::timestamptz - interval '%" PRId64 " milliseconds'",
                   bf->commit_order ? 0 : bf->since_margin_ms);
    }
    buf_puts(&sql, " ORDER BY k.ts, k.x, t.ctid");
    if (command(s, sql.data, "could not read the outbox for the backfill", NULL, err, errlen) < 0)
        goto done;
    for (;;) {
        PQclear(res);
        res = exec_waiting(s, "FETCH 1000 FROM outboxd_backfill", bf->tick, bf->arg);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            set_pg_error(err, errlen, "could not read the outbox for the backfill",
                         PQerrorMessage(s->conn));
            goto done;
        }
        int nrows = PQntuples(res), ncols = PQnfields(res) - 1;
        if (nrows == 0)
            break;
        const char *names[PGO_MAX_COLUMNS], *values[PGO_MAX_COLUMNS];
        uint32_t types[PGO_MAX_COLUMNS];
        int lens[PGO_MAX_COLUMNS];
        if (ncols > PGO_MAX_COLUMNS)
            ncols = PGO_MAX_COLUMNS;
        for (int c = 0; c < ncols; c++) {
            names[c] = PQfname(res, c + 1);
            types[c] = (uint32_t)PQftype(res, c + 1);
        }
        for (int r = 0; r < nrows; r++) {
            for (int c = 0; c < ncols; c++) {
                values[c] = PQgetisnull(res, r, c + 1) ? NULL : PQgetvalue(res, r, c + 1);
                lens[c] = PQgetlength(res, r, c + 1);
            }
            if (bf->on_row(bf->arg, t, PQgetvalue(res, r, 0), ncols, names, types, values, lens,
                           err, errlen) < 0)
                goto done;
            bf->rows++;
        }
    }
    rc = command(s, "CLOSE outboxd_backfill", "could not read the outbox for the backfill", NULL,
                 err, errlen);
done:
    PQclear(res);
    buf_deinit(&sql);
    return rc;
}

/* Reads every outbox table, one after the other, in the current transaction: whether the
 * server keeps commit times decides the order (bf->commit_order), the current snapshot's xmax
 * widens transaction ids. */
static int backfill_rows(PgStream *s, const PgSetup *setup, PgBackfill *bf, bool resumed,
                         char *err, size_t errlen)
{
    PGresult *res = query(s, "SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())"
                             "::text, pg_catalog.current_setting('track_commit_timestamp')",
                          err, errlen);
    if (!res)
        return -1;
    uint64_t ref = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
    bf->commit_order = strcmp(PQgetvalue(res, 0, 1), "on") == 0;
    PQclear(res);
    size_t first = resumed ? bf->first_table : 0;
    for (size_t t = first; t < outbox_mapper_ntables(setup->mapper); t++)
        if (backfill_table(s, setup, t, bf, t == first && resumed ? bf->after : NULL, ref,
                           resumed, err, errlen) < 0)
            return -1;
    return 0;
}

/* CREATE_REPLICATION_SLOT ... (SNAPSHOT 'use') must be the first command of a repeatable-read
 * transaction; the rows read in it are exactly those committed before the slot's start. The
 * snapshot is kept (bf->snapshot) so that a resumed backfill reads the same rows. */
static int create_slot_with_backfill(PgStream *s, const PgSetup *setup, const char *create,
                                     char *sqlstate, char *err, size_t errlen)
{
    PgBackfill *bf = setup->backfill;
    if (command(s, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "could not start the backfill transaction", NULL, err, errlen) < 0)
        return -1;
    Buf sql;
    buf_init(&sql);
    buf_printf(&sql, "%s (SNAPSHOT 'use'%s)", create,
               setup->failover && PQserverVersion(s->conn) >= 170000 ? ", FAILOVER" : "");
    PGresult *res = exec_waiting(s, sql.data, bf->tick, bf->arg);
    buf_deinit(&sql);
    int rc = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        result_error(s, res, "could not create replication slot", sqlstate, err, errlen);
        goto done;
    }
    if (PQnfields(res) >= 2)
        lsn_parse(PQgetvalue(res, 0, 1), &bf->position);
    PQclear(res);
    if (!(res = query(s, "SELECT pg_catalog.pg_current_snapshot()::text", err, errlen)))
        goto done;
    if ((size_t)PQgetlength(res, 0, 0) >= sizeof(bf->snapshot)) {
        snprintf(err, errlen, "the slot's snapshot is too long to record (%d bytes: %s)",
                 PQgetlength(res, 0, 0), "too many transactions were running");
        goto done;
    }
    snprintf(bf->snapshot, sizeof(bf->snapshot), "%s", PQgetvalue(res, 0, 0));
    if (bf->on_start && bf->on_start(bf->arg, err, errlen) < 0)
        goto done;
    rc = backfill_rows(s, setup, bf, false, err, errlen);
done:
    PQclear(res);
    char ignored[256];
    command(s, rc == 0 ? "COMMIT" : "ROLLBACK", "could not end the backfill transaction", NULL,
            ignored, sizeof(ignored));
    return rc;
}

int pgstream_read_outbox(PgStream *s, const PgSetup *setup, char *err, size_t errlen)
{
    if (command(s, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                "could not start reading the outbox", NULL, err, errlen) < 0)
        return -1;
    int rc = backfill_rows(s, setup, setup->backfill, true, err, errlen);
    char ignored[256];
    command(s, rc == 0 ? "COMMIT" : "ROLLBACK", "could not end reading the outbox", NULL, ignored,
            sizeof(ignored));
    return rc;
}

/* SELECT fn(arg): arg a literal, or with lock_key the 64-bit key of advisory lock "outboxd
 * <arg>". Returns the result, or NULL with err set. */
static PGresult *select_call(PgStream *s, const char *fn, const char *arg, bool lock_key,
                             char *err, size_t errlen)
{
    Buf sql, label;
    buf_init(&sql);
    buf_init(&label);
    buf_printf(&label, lock_key ? "outboxd %s" : "%s", arg);
    buf_printf(&sql, "SELECT pg_catalog.%s(%s", fn, lock_key ? "pg_catalog.hashtextextended(" : "");
    PGresult *res = NULL;
    if (put_literal(s, &sql, label.data, err, errlen)) {
        buf_puts(&sql, lock_key ? ", 0))" : ")");
        res = query(s, sql.data, err, errlen);
    }
    buf_deinit(&label);
    buf_deinit(&sql);
    return res;
}

int pgstream_try_lock(PgStream *s, const char *name, bool *got, char *err, size_t errlen)
{
    PGresult *res = select_call(s, "pg_try_advisory_lock", name, true, err, errlen);
    if (!res)
        return -1;
    *got = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    return 0;
}

int pgstream_unlock(PgStream *s, const char *name, char *err, size_t errlen)
{
    PGresult *res = select_call(s, "pg_advisory_unlock", name, true, err, errlen);
    PQclear(res);
    return res ? 0 : -1;
}

int pgstream_drop_slot(PgStream *s, const char *slot, char *err, size_t errlen)
{
    PGresult *res = select_call(s, "pg_drop_replication_slot", slot, false, err, errlen);
    PQclear(res);
    return res ? 0 : -1;
}

static int setup_slot(PgStream *s, const PgSetup *setup, bool *created, char *err, size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    int rc = -1;
    PGresult *res = NULL;
    *created = false;
    buf_puts(&sql, "SELECT plugin, slot_type, database = current_database() "
                   "FROM pg_catalog.pg_replication_slots WHERE slot_name = ");
    if (!put_literal(s, &sql, setup->slot, err, errlen))
        goto done;
    res = query(s, sql.data, err, errlen);
    if (!res)
        goto done;
    if (PQntuples(res) == 1) {
        if (strcmp(PQgetvalue(res, 0, 1), "logical") != 0 ||
            strcmp(PQgetvalue(res, 0, 0), "pgoutput") != 0) {
            snprintf(err, errlen,
                     "replication slot \"%s\" exists but is not a logical slot of plugin "
                     "pgoutput (it is %s/%s): choose another --slot",
                     setup->slot, PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 0));
            rc = PGSTREAM_CHECK_FAILED;
        } else if (strcmp(PQgetvalue(res, 0, 2), "t") != 0) {
            snprintf(err, errlen,
                     "replication slot \"%s\" belongs to another database: connect to that "
                     "database or choose another --slot",
                     setup->slot);
            rc = PGSTREAM_CHECK_FAILED;
        } else {
            rc = 0;
        }
        goto done;
    }
    if (!setup->create) {
        snprintf(err, errlen,
                 "replication slot \"%s\" does not exist: create it with SELECT "
                 "pg_create_logical_replication_slot('%s', 'pgoutput'), or run with --create",
                 setup->slot, setup->slot);
        rc = PGSTREAM_CHECK_FAILED;
        goto done;
    }
    buf_reset(&sql);
    buf_puts(&sql, "CREATE_REPLICATION_SLOT ");
    if (!put_ident(s, &sql, setup->slot, err, errlen))
        goto done;
    buf_puts(&sql, " LOGICAL pgoutput");
    log_info("creating replication slot \"%s\"%s (this waits for running transactions to end)",
             setup->slot,
             setup->failover && PQserverVersion(s->conn) >= 170000 ? " as a failover slot" : "");
    char sqlstate[6] = "";
    int made;
    if (setup->backfill) {
        made = create_slot_with_backfill(s, setup, sql.data, sqlstate, err, errlen);
    } else {
        buf_puts(&sql, setup->failover && PQserverVersion(s->conn) >= 170000
                           ? " (SNAPSHOT 'nothing', FAILOVER)"
                           : " (SNAPSHOT 'nothing')");
        PGresult *res2 = exec_waiting(s, sql.data, keep_waiting, NULL);
        made = 0;
        if (PQresultStatus(res2) != PGRES_COMMAND_OK && PQresultStatus(res2) != PGRES_TUPLES_OK) {
            result_error(s, res2, "could not create replication slot", sqlstate, err, errlen);
            made = -1;
        }
        PQclear(res2);
    }
    if (made < 0) {
        if (strcmp(sqlstate, "42710") != 0) /* created meanwhile by another relay: fine */
            goto done;
    } else {
        *created = true;
        log_info("created replication slot \"%s\"", setup->slot);
    }
    rc = 0;
done:
    PQclear(res);
    buf_deinit(&sql);
    return rc;
}

int pgstream_setup(PgStream *s, const PgSetup *setup, bool *created_slot, char *err,
                   size_t errlen)
{
    int rc;
    *created_slot = false;
    if ((rc = check_wal_level(s, err, errlen)) != 0)
        return rc;
    size_t n = outbox_mapper_ntables(setup->mapper);
    for (size_t t = 0; t < n; t++)
        if ((rc = check_table(s, setup, t, err, errlen)) != 0)
            return rc;
    for (size_t t = 0; t < n; t++)
        if ((rc = check_publication(s, setup, t, err, errlen)) != 0)
            return rc;
    return setup_slot(s, setup, created_slot, err, errlen);
}

int pgstream_slot_info(PgStream *s, const char *slot, PgSlotInfo *info, char *err,
                       size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    int rc = -1;
    PGresult *res = NULL;
    buf_puts(&sql, "SELECT coalesce(active_pid, 0), coalesce(confirmed_flush_lsn, '0/0'), "
                   "coalesce(restart_lsn, '0/0'), pg_catalog.pg_current_wal_lsn(), "
                   "coalesce(wal_status, ''), coalesce(plugin, ''), "
                   "coalesce(database = pg_catalog.current_database(), false) "
                   "FROM pg_catalog.pg_replication_slots WHERE slot_name = ");
    if (!put_literal(s, &sql, slot, err, errlen))
        goto done;
    res = query(s, sql.data, err, errlen);
    if (!res)
        goto done;
    memset(info, 0, sizeof(*info));
    if (PQntuples(res) == 1) {
        info->exists = true;
        info->active_pid = atoi(PQgetvalue(res, 0, 0));
        snprintf(info->wal_status, sizeof(info->wal_status), "%s", PQgetvalue(res, 0, 4));
        snprintf(info->plugin, sizeof(info->plugin), "%s", PQgetvalue(res, 0, 5));
        info->this_db = strcmp(PQgetvalue(res, 0, 6), "t") == 0;
        if (!lsn_parse(PQgetvalue(res, 0, 1), &info->confirmed) ||
            !lsn_parse(PQgetvalue(res, 0, 2), &info->restart) ||
            !lsn_parse(PQgetvalue(res, 0, 3), &info->wal)) {
            snprintf(err, errlen, "could not read the position of slot \"%s\"", slot);
            goto done;
        }
    }
    rc = 0;
done:
    PQclear(res);
    buf_deinit(&sql);
    return rc;
}

int pgstream_wal_lsn(PgStream *s, uint64_t *out, char *err, size_t errlen)
{
    PGresult *res = query(s, "SELECT pg_catalog.pg_current_wal_lsn()", err, errlen);
    if (!res)
        return -1;
    int rc = 0;
    if (PQntuples(res) != 1 || !lsn_parse(PQgetvalue(res, 0, 0), out)) {
        snprintf(err, errlen, "could not read the server's WAL position");
        rc = -1;
    }
    PQclear(res);
    return rc;
}

int pgstream_wal_sender_timeout_ms(PgStream *s, int64_t *out, char *err, size_t errlen)
{
    PGresult *res = query(s, "SELECT setting::bigint FROM pg_catalog.pg_settings "
                             "WHERE name = 'wal_sender_timeout'", err, errlen);
    if (!res)
        return -1;
    *out = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, 0), NULL, 10) : 60000;
    PQclear(res);
    return 0;
}

/* Appends s with every quote character doubled. */
static void put_doubled(Buf *b, const char *s, char quote)
{
    for (; *s; s++) {
        if (*s == quote)
            buf_putc(b, quote);
        buf_putc(b, *s);
    }
}

int pgstream_start(PgStream *s, const char *slot, const char *publication, bool messages,
                   uint64_t start_lsn, char *err, size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "START_REPLICATION SLOT ");
    int rc = -1;
    if (!put_ident(s, &sql, slot, err, errlen))
        goto done;
    /* publication_names is a string literal holding a list of quoted identifiers. */
    buf_printf(&sql, " LOGICAL " LSN_FMT " (proto_version '1', publication_names '\"",
               LSN_ARGS(start_lsn));
    Buf ident;
    buf_init(&ident);
    put_doubled(&ident, publication, '"');
    put_doubled(&sql, ident.data, '\'');
    buf_deinit(&ident);
    buf_puts(&sql, messages ? "\"', messages 'true')" : "\"')");

    PGresult *res = exec_bounded(s, sql.data);
    if (PQresultStatus(res) != PGRES_COPY_BOTH) {
        const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        set_pg_error(err, errlen, "could not start replication", conn_error(s));
        const char *detail = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
        if (code && strcmp(code, "55006") == 0) /* object_in_use: the slot is active */
            rc = PGSTREAM_SLOT_BUSY;
        /* object_not_in_prerequisite_state, "This slot has been invalidated because ..." */
        else if (code && strcmp(code, "55000") == 0 && detail && strstr(detail, "invalidated"))
            rc = PGSTREAM_SLOT_LOST;
        PQclear(res);
        goto done;
    }
    PQclear(res);
    rc = 0;
done:
    buf_deinit(&sql);
    return rc;
}

/* After the copy stream ended: the final result carries the server's error, if any. */
static int stream_ended(PgStream *s, char *err, size_t errlen)
{
    PGresult *res = PQgetResult(s->conn);
    if (res && PQresultStatus(res) != PGRES_COMMAND_OK)
        set_pg_error(err, errlen, "replication stream failed", PQresultErrorMessage(res));
    else
        snprintf(err, errlen, "replication stream ended: the server closed it");
    while (res) {
        PQclear(res);
        res = PQgetResult(s->conn);
    }
    return -1;
}

int pgstream_read(PgStream *s, const char **buf, size_t *len, char *err, size_t errlen)
{
    if (s->copybuf) {
        PQfreemem(s->copybuf);
        s->copybuf = NULL;
    }
    char *data = NULL;
    int n = PQgetCopyData(s->conn, &data, 1);
    if (n > 0) {
        s->copybuf = data;
        *buf = data;
        *len = (size_t)n;
        return 1;
    }
    if (n == 0)
        return 0;
    if (n == -1)
        return stream_ended(s, err, errlen);
    set_pg_error(err, errlen, "could not read from the replication stream",
                 PQerrorMessage(s->conn));
    return -1;
}

int pgstream_consume(PgStream *s, char *err, size_t errlen)
{
    if (!PQconsumeInput(s->conn)) {
        set_pg_error(err, errlen, "lost the connection to PostgreSQL", PQerrorMessage(s->conn));
        return -1;
    }
    return 0;
}

bool pgstream_readable(const PgStream *s)
{
    struct pollfd pfd = {.fd = PQsocket(s->conn), .events = POLLIN};
    return pfd.fd >= 0 && poll(&pfd, 1, 0) > 0;
}

PgLiveness pgstream_liveness(int64_t now, int64_t last_received, int64_t asked, int64_t timeout)
{
    if (timeout <= 0 || now - last_received < timeout / 2)
        return PG_LIVE;
    if (asked < last_received)
        return PG_ASK_REPLY;
    if (now - last_received >= timeout && now - asked >= timeout / 2)
        return PG_SILENT;
    return PG_LIVE;
}

int64_t pgstream_liveness_deadline(int64_t last_received, int64_t asked, int64_t timeout)
{
    if (timeout <= 0)
        return INT64_MAX;
    if (asked < last_received)
        return last_received + timeout / 2;
    int64_t a = last_received + timeout, b = asked + timeout / 2;
    return a > b ? a : b;
}

int pgstream_session_id(PgStream *s, int *pid, char *started, size_t startedlen, char *err,
                        size_t errlen)
{
    PGresult *res = query(s, "SELECT backend_start::text FROM pg_catalog.pg_stat_activity "
                             "WHERE pid = pg_catalog.pg_backend_pid()",
                          err, errlen);
    if (!res)
        return -1;
    int rc = -1;
    if (PQntuples(res) == 1 && !PQgetisnull(res, 0, 0)) {
        *pid = PQbackendPID(s->conn);
        snprintf(started, startedlen, "%s", PQgetvalue(res, 0, 0));
        rc = 0;
    } else {
        snprintf(err, errlen, "could not read this session's start from pg_stat_activity");
    }
    PQclear(res);
    return rc;
}

int pgstream_terminate_session(PgStream *s, int pid, const char *started, bool *ended,
                               char *err, size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    buf_printf(&sql, "SELECT pg_catalog.pg_terminate_backend(pid, 2000) FROM "
                     "pg_catalog.pg_stat_activity WHERE pid = %d AND backend_start::text = ",
               pid);
    int rc = -1;
    PGresult *res = NULL;
    if (put_literal(s, &sql, started, err, errlen) && (res = query(s, sql.data, err, errlen))) {
        *ended = PQntuples(res) == 1 && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
        rc = 0;
    }
    PQclear(res);
    buf_deinit(&sql);
    return rc;
}

int pgstream_send_status(PgStream *s, uint64_t write_lsn, uint64_t flush_lsn, bool reply,
                         char *err, size_t errlen)
{
    char msg[34];
    pgcopy_encode_status(msg, write_lsn, flush_lsn, flush_lsn, now_unix_us(), reply);
    if (PQputCopyData(s->conn, msg, sizeof(msg)) <= 0 || PQflush(s->conn) < 0) {
        set_pg_error(err, errlen, "could not send a status update to PostgreSQL",
                     PQerrorMessage(s->conn));
        return -1;
    }
    return 0;
}

int pgstream_finish(PgStream *s, char *err, size_t errlen)
{
    if (PQputCopyEnd(s->conn, NULL) <= 0 || PQflush(s->conn) < 0) {
        set_pg_error(err, errlen, "could not end the replication stream",
                     PQerrorMessage(s->conn));
        return -1;
    }
    /* Drain what the server still sends until it acknowledges the end, within a bound. */
    int64_t deadline = now_mono_us() + 2000000;
    for (;;) {
        const char *buf;
        size_t len;
        int r = pgstream_read(s, &buf, &len, err, errlen);
        if (r < 0) {
            /* -1 after CopyDone is the normal end: the final result says whether it was clean */
            return strncmp(err, "replication stream ended", 24) == 0 ? 0 : -1;
        }
        if (r > 0)
            continue;
        int64_t left = deadline - now_mono_us();
        if (left <= 0) {
            snprintf(err, errlen, "PostgreSQL did not confirm the end of the stream in time");
            return -1;
        }
        struct pollfd pfd = {.fd = PQsocket(s->conn), .events = POLLIN};
        if (poll_until(&pfd, 1, deadline) < 0 && errno != EINTR) {
            snprintf(err, errlen, "could not wait for PostgreSQL: %s", strerror(errno));
            return -1;
        }
        if (pgstream_consume(s, err, errlen) < 0)
            return -1;
    }
}

/* ---- plain SQL, for `outboxd setup` and `outboxd doctor` ------------------------------------- */

void pgstream_quote_ident(Buf *out, const char *name)
{
    buf_putc(out, '"');
    put_doubled(out, name, '"');
    buf_putc(out, '"');
}

void pgstream_quote_literal(Buf *out, const char *s)
{
    bool backslash = strchr(s, '\\') != NULL;
    if (backslash)
        buf_putc(out, 'E');
    buf_putc(out, '\'');
    for (; *s; s++) {
        if (*s == '\'' || (backslash && *s == '\\'))
            buf_putc(out, *s);
        buf_putc(out, *s);
    }
    buf_putc(out, '\'');
}

struct PgRows {
    PGresult *res;
};

static void drop_notice(void *arg, const char *message)
{
    (void)arg;
    (void)message;
}

int pgstream_sql(PgStream *s, const char *sql, const char *what, PgRows **out, char sqlstate[6],
                 char *err, size_t errlen)
{
    PQsetNoticeProcessor(s->conn, drop_notice, NULL);
    PGresult *res = exec_bounded(s, sql);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        result_error(s, res, what, sqlstate, err, errlen);
        PQclear(res);
        return -1;
    }
    if (sqlstate)
        sqlstate[0] = '\0';
    if (!out) {
        PQclear(res);
        return 0;
    }
    PgRows *r = xmalloc(sizeof(*r));
    r->res = res;
    *out = r;
    return 0;
}

int pgrows_count(const PgRows *r)
{
    return PQresultStatus(r->res) == PGRES_TUPLES_OK ? PQntuples(r->res) : 0;
}

const char *pgrows_value(const PgRows *r, int row, int col)
{
    if (row < 0 || row >= pgrows_count(r) || col < 0 || col >= PQnfields(r->res) ||
        PQgetisnull(r->res, row, col))
        return NULL;
    return PQgetvalue(r->res, row, col);
}

bool pgrows_true(const PgRows *r, int row, int col)
{
    const char *v = pgrows_value(r, row, col);
    return v && strcmp(v, "t") == 0;
}

void pgrows_free(PgRows *r)
{
    if (!r)
        return;
    PQclear(r->res);
    free(r);
}

int pgstream_server_version(const PgStream *s)
{
    return PQserverVersion(s->conn);
}

int pgstream_set_failover(PgStream *s, const char *slot, char *err, size_t errlen)
{
    Buf sql;
    buf_init(&sql);
    buf_puts(&sql, "ALTER_REPLICATION_SLOT ");
    int rc = -1;
    if (put_ident(s, &sql, slot, err, errlen)) {
        buf_puts(&sql, " (FAILOVER true)");
        rc = command(s, sql.data, "could not make the slot a failover slot", NULL, err, errlen);
    }
    buf_deinit(&sql);
    return rc < 0 ? -1 : 0;
}

int pgstream_timeline_fork(PgStream *s, uint32_t cur_tli, uint32_t old_tli, uint64_t *fork,
                           char *err, size_t errlen)
{
    if (old_tli >= cur_tli)
        return 1;
    char sql[64];
    snprintf(sql, sizeof(sql), "TIMELINE_HISTORY %u", cur_tli);
    PGresult *res = query(s, sql, err, errlen);
    if (!res)
        return -1;
    /* The file: one line per earlier timeline, "<tli>\t<switch point>\t<reason>". */
    int rc = 1;
    const char *p = PQnfields(res) >= 2 ? PQgetvalue(res, 0, 1) : "";
    while (*p) {
        unsigned long tli;
        char lsn[24];
        if (sscanf(p, "%lu %23s", &tli, lsn) == 2 && tli == old_tli && lsn_parse(lsn, fork)) {
            rc = 0;
            break;
        }
        p += strcspn(p, "\n");
        p += *p == '\n';
    }
    PQclear(res);
    return rc;
}
