/*
 * config.c - the settings table and everything derived from it.
 *
 * settings[] is the one place a setting is described. Its environment variable and flag are
 * derived from the key ("max_inflight" -> OUTBOXD_MAX_INFLIGHT, --max-inflight); its default is
 * text parsed by the same code as user input, so a default can never bypass a bound; --help is
 * printed from it. Adding a setting is adding a Config field and a row.
 *
 * Every value is parsed and checked before it is stored, so after a failed config_parse() cfg
 * still holds a valid value (or NULL) in every field and can be deinit'ed. A setting marked
 * secret (pg_url may carry a password) is never echoed in a message; neither is anything after
 * "=" in an unknown flag or environment variable.
 */
#include "outboxd/config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "outboxd/subject.h"
#include "outboxd/util.h"

extern char **environ;

#define ENV_PREFIX "OUTBOXD_"
#define NAME_MAX_LEN 64 /* longest derived flag or env var name, with room to spare */

#define SEC INT64_C(1000)
#define MIN (60 * SEC)
#define HOUR (60 * MIN)
#define KiB INT64_C(1024)
#define MiB (1024 * KiB)
#define GiB (1024 * MiB)

typedef enum SettingType {
    SET_STRING,
    SET_BOOL,
    SET_INT,
    SET_DURATION, /* stored in milliseconds */
    SET_BYTES,
    SET_CHOICE, /* stored as the table's spelling of the choice */
} SettingType;

/* Checks a string value. On failure writes what was expected ("expected ...") into why. */
typedef bool StringCheck(const char *value, char *why, size_t whylen);

typedef struct Setting {
    const char *key;              /* snake_case */
    SettingType type;
    size_t offset;                /* of the field in Config */
    const char *def;              /* default as user input; NULL: none */
    bool required;                /* config_parse fails without it */
    int64_t min, max;             /* SET_INT, SET_DURATION, SET_BYTES */
    const char *const *choices;   /* SET_CHOICE: NULL-terminated */
    StringCheck *check;           /* SET_STRING: NULL or extra validation */
    const char *placeholder;      /* value name in --help */
    bool secret;                  /* never echo the value */
    bool per_table;               /* a TableConfig field: may appear in [table] sections */
    bool list;                    /* SET_STRING: comma-separated; repeats in one source add up */
    const char *help;             /* one line */
} Setting;

static StringCheck check_nonempty, check_slot, check_name63, check_subject, check_plain_subject,
    check_kv_bucket, check_table, check_column, check_headers, check_consumers;

static const char *const log_levels[] = {"debug", "info", "warn", "error", NULL};
static const char *const log_formats[] = {"text", "json", NULL};
static const char *const poison_actions[] = {"dead-letter", "stop", NULL};
static const char *const recovery_modes[] = {"manual", "auto", NULL};
static const char *const layouts[] = {"outboxd", "debezium", NULL};
static const char *const body_modes[] = {"payload", "envelope", NULL};

const char *const config_role_names[CONFIG_NROLES] = {
    "event_id", "aggregate_type", "aggregate_id",   "event_type",
    "payload",  "occurred_at",    "schema_version", "trace_id",
};

/* Debezium's outbox event router reads these columns; it has no occurred-at, schema version
 * or trace id column of its own. */
static const char *const debezium_columns[CONFIG_NROLES] = {
    "id", "aggregatetype", "aggregateid", "type", "payload", NULL, NULL, NULL,
};

void config_role_flag(int role, char out[CONFIG_ROLE_FLAG_MAX])
{
    snprintf(out, CONFIG_ROLE_FLAG_MAX, "--column-%s", config_role_names[role]);
    for (char *p = out; *p; p++)
        if (*p == '_')
            *p = '-';
}

bool config_header_name_reserved(const char *h, size_t n)
{
    return (n >= 5 && strncasecmp(h, "Nats-", 5) == 0) ||
           (n >= 7 && strncasecmp(h, "Outbox-", 7) == 0);
}

bool config_header_name_ok(const char *h, size_t n)
{
    bool ok = n > 0 && n <= 64;
    for (size_t i = 0; ok && i < n; i++)
        ok = (h[i] >= 'a' && h[i] <= 'z') || (h[i] >= 'A' && h[i] <= 'Z') ||
             (h[i] >= '0' && h[i] <= '9') || h[i] == '-' || h[i] == '_';
    return ok;
}

const char *config_role_column(const TableConfig *tc, int role)
{
    if (tc->column[role])
        return tc->column[role];
    if (tc->columns && strcmp(tc->columns, "debezium") == 0)
        return debezium_columns[role];
    return config_role_names[role];
}

void config_each_header(const TableConfig *tc, void (*fn)(void *arg, const char *column,
                        size_t column_len, const char *header, size_t header_len), void *arg)
{
    for (const char *p = tc->headers; p && *p;) {
        size_t n = strcspn(p, ",");
        const char *colon = memchr(p, ':', n);
        if (colon)
            fn(arg, p, (size_t)(colon - p), colon + 1, n - (size_t)(colon - p) - 1);
        p += n;
        if (*p == ',')
            p++;
    }
}

#define FIELD(f) offsetof(Config, f)

static const Setting settings[] = {
    {.key = "config", .type = SET_STRING, .offset = FIELD(config_file), .def = NULL,
     .check = check_nonempty, .placeholder = "FILE",
     .help = "read settings from FILE (key = value lines); the environment and flags override it"},
    {.key = "pg_url", .type = SET_STRING, .offset = FIELD(pg_url), .def = NULL, .required = true,
     .check = check_nonempty, .placeholder = "URL", .secret = true,
     .help = "PostgreSQL connection string (libpq conninfo or URI); outboxd adds "
             "replication=database"},
    {.key = "nats_url", .type = SET_STRING, .offset = FIELD(nats_url),
     .def = "nats://127.0.0.1:4222", .check = check_nonempty, .placeholder = "URLS",
     .help = "NATS server URLs, comma-separated for a cluster"},
    {.key = "slot", .type = SET_STRING, .offset = FIELD(slot), .def = "outboxd",
     .check = check_slot, .placeholder = "NAME", .help = "logical replication slot to hold"},
    {.key = "publication", .type = SET_STRING, .offset = FIELD(publication), .def = "outboxd",
     .check = check_name63, .placeholder = "NAME",
     .help = "publication that covers the outbox table"},
    {.key = "table", .type = SET_STRING, .offset = FIELD(t.table), .per_table = true,
     .def = "public.outbox",
     .check = check_table, .placeholder = "TABLE",
     .help = "outbox table, as schema.table or table (several: [table NAME] sections in --config)"},
    {.key = "subject", .type = SET_STRING, .offset = FIELD(t.subject), .per_table = true,
     .def = "outbox.{aggregate_type}.{event_type}", .check = check_subject,
     .placeholder = "TEMPLATE",
     .help = "subject template; {column} or {role} is replaced by the row's escaped value"},
    {.key = "columns", .type = SET_CHOICE, .offset = FIELD(t.columns), .per_table = true,
     .def = "outboxd", .choices = layouts, .placeholder = "LAYOUT",
     .help = "column names to expect: outboxd (event_id, payload, ...) or debezium (id, "
             "aggregatetype, aggregateid, type, payload)"},
    {.key = "column_event_id", .type = SET_STRING, .offset = FIELD(t.column[ROLE_EVENT_ID]),
     .per_table = true, .check = check_column, .placeholder = "COLUMN",
     .help = "column holding the event id (Nats-Msg-Id), over what --columns says"},
    {.key = "column_aggregate_type", .type = SET_STRING,
     .offset = FIELD(t.column[ROLE_AGGREGATE_TYPE]), .per_table = true, .check = check_column,
     .placeholder = "COLUMN", .help = "column holding the aggregate type"},
    {.key = "column_aggregate_id", .type = SET_STRING,
     .offset = FIELD(t.column[ROLE_AGGREGATE_ID]), .per_table = true, .check = check_column,
     .placeholder = "COLUMN", .help = "column holding the aggregate id"},
    {.key = "column_event_type", .type = SET_STRING, .offset = FIELD(t.column[ROLE_EVENT_TYPE]),
     .per_table = true, .check = check_column, .placeholder = "COLUMN",
     .help = "column holding the event type"},
    {.key = "column_payload", .type = SET_STRING, .offset = FIELD(t.column[ROLE_PAYLOAD]),
     .per_table = true, .check = check_column, .placeholder = "COLUMN",
     .help = "column holding the message body (jsonb, json, text or bytea)"},
    {.key = "column_occurred_at", .type = SET_STRING,
     .offset = FIELD(t.column[ROLE_OCCURRED_AT]), .per_table = true, .check = check_column,
     .placeholder = "COLUMN", .help = "column holding when the event happened (also read by prune)"},
    {.key = "column_schema_version", .type = SET_STRING,
     .offset = FIELD(t.column[ROLE_SCHEMA_VERSION]), .per_table = true, .check = check_column,
     .placeholder = "COLUMN", .help = "column holding the payload's schema version"},
    {.key = "column_trace_id", .type = SET_STRING, .offset = FIELD(t.column[ROLE_TRACE_ID]),
     .per_table = true, .check = check_column, .placeholder = "COLUMN",
     .help = "column holding a trace id"},
    {.key = "header", .type = SET_STRING, .offset = FIELD(t.headers), .per_table = true,
     .list = true, .check = check_headers, .placeholder = "COLUMN:NAME",
     .help = "also send column COLUMN as header NAME (repeatable, or comma-separated)"},
    {.key = "body", .type = SET_CHOICE, .offset = FIELD(t.body), .per_table = true,
     .def = "payload", .choices = body_modes, .placeholder = "BODY",
     .help = "message body: the payload column, or an envelope (the whole row as JSON)"},
    {.key = "messages", .type = SET_BOOL, .offset = FIELD(messages), .def = "true",
     .placeholder = "BOOL",
     .help = "also relay transactional pg_logical_emit_message events (the table-less outbox)"},
    {.key = "message_prefix", .type = SET_STRING, .offset = FIELD(message_prefix),
     .def = "outbox", .check = check_nonempty, .placeholder = "PREFIX",
     .help = "prefix of the logical decoding messages that are events"},
    {.key = "create", .type = SET_BOOL, .offset = FIELD(create), .def = "true",
     .placeholder = "BOOL", .help = "create the publication, then the slot, when missing"},
    {.key = "failover_slot", .type = SET_BOOL, .offset = FIELD(failover_slot), .def = "true",
     .placeholder = "BOOL",
     .help = "on PostgreSQL 17 and later, create the slot (and keep it, through rewind) as a "
             "failover slot, which standbys with sync_replication_slots keep in step"},
    {.key = "max_inflight", .type = SET_INT, .offset = FIELD(max_inflight), .def = "4096",
     .min = 1, .max = 1048576, .placeholder = "N",
     .help = "events published and not yet acknowledged, at most"},
    {.key = "max_inflight_bytes", .type = SET_BYTES, .offset = FIELD(max_inflight_bytes),
     .def = "16MiB", .min = 64 * KiB, .max = GiB, .placeholder = "BYTES",
     .help = "bytes of unacknowledged events, at most"},
    {.key = "ack_timeout", .type = SET_DURATION, .offset = FIELD(ack_timeout_ms), .def = "10s",
     .min = 100, .max = 10 * MIN, .placeholder = "DURATION",
     .help = "a publish not acknowledged within this time has failed"},
    {.key = "status_interval", .type = SET_DURATION, .offset = FIELD(status_interval_ms),
     .def = "10s", .min = 100, .max = HOUR, .placeholder = "DURATION",
     .help = "how often to send a status update to PostgreSQL"},
    {.key = "pg_receive_timeout", .type = SET_DURATION, .offset = FIELD(pg_receive_timeout_ms),
     .def = "60s", .min = 0, .max = HOUR, .placeholder = "DURATION",
     .help = "drop a PostgreSQL connection that brings nothing for this long (after asking for a "
             "reply at half of it), or a query unanswered for this long, and reconnect; like "
             "PostgreSQL's wal_receiver_timeout (0: never)"},
    {.key = "shutdown_timeout", .type = SET_DURATION, .offset = FIELD(shutdown_timeout_ms),
     .def = "5s", .min = 0, .max = 10 * MIN, .placeholder = "DURATION",
     .help = "on SIGTERM, how long to wait for outstanding acknowledgements"},
    {.key = "strict_order", .type = SET_BOOL, .offset = FIELD(strict_order), .def = "true",
     .placeholder = "BOOL",
     .help = "chain each publish to the stream's last sequence (Nats-Expected-Last-Sequence) so "
             "the stream keeps commit order through failures, and resume exactly after the last "
             "event it holds; needs outboxd to be the stream's only writer"},
    {.key = "on_poison", .type = SET_CHOICE, .offset = FIELD(on_poison), .def = "dead-letter",
     .choices = poison_actions, .placeholder = "ACTION",
     .help = "what to do with an event that can never be published"},
    {.key = "dead_letter_subject", .type = SET_STRING, .offset = FIELD(dead_letter_subject),
     .def = "outbox.dead_letter", .check = check_plain_subject, .placeholder = "SUBJECT",
     .help = "subject for events that can never be published, with headers saying why"},
    {.key = "checkpoint_bucket", .type = SET_STRING, .offset = FIELD(checkpoint_bucket),
     .def = "outboxd", .check = check_kv_bucket, .placeholder = "NAME",
     .help = "JetStream key-value bucket holding the durable checkpoint (the last acknowledged "
             "LSN per database system and slot)"},
    {.key = "checkpoint_interval", .type = SET_DURATION, .offset = FIELD(checkpoint_interval_ms),
     .def = "1s", .min = 100, .max = 10 * MIN, .placeholder = "DURATION",
     .help = "how often to store the checkpoint when it moved"},
    {.key = "retry_min", .type = SET_DURATION, .offset = FIELD(retry_min_ms), .def = "100ms",
     .min = 10, .max = 10 * MIN, .placeholder = "DURATION",
     .help = "first delay before reconnecting or publishing again after a failure"},
    {.key = "retry_max", .type = SET_DURATION, .offset = FIELD(retry_max_ms), .def = "10s",
     .min = 10, .max = HOUR, .placeholder = "DURATION",
     .help = "longest such delay; delays double up to it, with full jitter"},
    {.key = "bookmark_every", .type = SET_DURATION, .offset = FIELD(bookmark_every_ms), .def = "0",
     .min = 0, .max = 24 * HOUR, .placeholder = "DURATION",
     .help = "copy the slot this often as a bookmark that outboxd rewind can return to (0: off)"},
    {.key = "bookmark_keep", .type = SET_DURATION, .offset = FIELD(bookmark_keep_ms), .def = "1h",
     .min = SEC, .max = 30 * 24 * HOUR, .placeholder = "DURATION",
     .help = "drop bookmarks older than this (their WAL stays on disk until then)"},
    {.key = "backfill", .type = SET_BOOL, .offset = FIELD(backfill), .def = "true",
     .placeholder = "BOOL",
     .help = "when outboxd creates the slot, publish the rows already in the outbox once"},
    {.key = "slot_recovery", .type = SET_CHOICE, .offset = FIELD(slot_recovery),
     .def = "manual", .choices = recovery_modes, .placeholder = "MODE",
     .help = "when the slot is lost, or missing after a failover: stop with the runbook "
             "(manual), or recover by itself (auto: a new slot, then the rows committed since "
             "the last relayed transaction that the stream lacks, in commit order)"},
    {.key = "recovery_margin", .type = SET_DURATION, .offset = FIELD(recovery_margin_ms),
     .def = "10m", .min = 0, .max = 7 * 24 * HOUR, .placeholder = "DURATION",
     .help = "a recovery also reads the rows that started this long before its cut, and the "
             "stream this long before it: the longest transaction plus the clocks' skew"},
    {.key = "pg_password_file", .type = SET_STRING, .offset = FIELD(pg_password_file),
     .check = check_nonempty, .placeholder = "FILE",
     .help = "file holding the PostgreSQL password (instead of putting it in --pg-url)"},
    {.key = "nats_ping_interval", .type = SET_DURATION, .offset = FIELD(nats_ping_interval_ms),
     .def = "10s", .min = 100, .max = 10 * MIN, .placeholder = "DURATION",
     .help = "ping NATS this often; after two pings without an answer the connection counts as "
             "dead and is replaced (so within three intervals)"},
    {.key = "nats_user", .type = SET_STRING, .offset = FIELD(nats_user), .check = check_nonempty,
     .placeholder = "NAME", .help = "NATS user name"},
    {.key = "nats_password", .type = SET_STRING, .offset = FIELD(nats_password), .secret = true,
     .check = check_nonempty, .placeholder = "SECRET",
     .help = "NATS password (prefer --nats-password-file or the environment)"},
    {.key = "nats_password_file", .type = SET_STRING, .offset = FIELD(nats_password_file),
     .check = check_nonempty, .placeholder = "FILE", .help = "file holding the NATS password"},
    {.key = "nats_token", .type = SET_STRING, .offset = FIELD(nats_token), .secret = true,
     .check = check_nonempty, .placeholder = "SECRET",
     .help = "NATS token (prefer --nats-token-file or the environment)"},
    {.key = "nats_token_file", .type = SET_STRING, .offset = FIELD(nats_token_file),
     .check = check_nonempty, .placeholder = "FILE", .help = "file holding the NATS token"},
    {.key = "nats_nkey_seed_file", .type = SET_STRING, .offset = FIELD(nats_nkey_seed_file),
     .check = check_nonempty, .placeholder = "FILE", .help = "NKey seed file for NATS"},
    {.key = "nats_creds_file", .type = SET_STRING, .offset = FIELD(nats_creds_file),
     .check = check_nonempty, .placeholder = "FILE",
     .help = "NATS credentials file (user JWT and NKey seed)"},
    {.key = "nats_tls_ca", .type = SET_STRING, .offset = FIELD(nats_tls_ca),
     .check = check_nonempty, .placeholder = "FILE",
     .help = "CA certificates to verify the NATS server with (turns TLS on)"},
    {.key = "nats_tls_cert", .type = SET_STRING, .offset = FIELD(nats_tls_cert),
     .check = check_nonempty, .placeholder = "FILE",
     .help = "client certificate for NATS TLS (with --nats-tls-key)"},
    {.key = "nats_tls_key", .type = SET_STRING, .offset = FIELD(nats_tls_key),
     .check = check_nonempty, .placeholder = "FILE", .help = "client key for NATS TLS"},
    {.key = "nats_tls_server_name", .type = SET_STRING, .offset = FIELD(nats_tls_server_name),
     .check = check_nonempty, .placeholder = "NAME",
     .help = "name the NATS server's certificate must carry, when it is not the URL's host"},
    {.key = "http_addr", .type = SET_STRING, .offset = FIELD(http_addr), .def = ":9847",
     .check = check_nonempty, .placeholder = "ADDR",
     .help = "where to serve /metrics, /healthz and /readyz (host:port, :port, or off)"},
    {.key = "consumers", .type = SET_STRING, .offset = FIELD(consumers), .def = "all",
     .check = check_consumers, .placeholder = "NAMES",
     .help = "durable consumers of the stream whose lag /metrics reports: all, off, or a "
             "comma-separated list of names"},
    {.key = "consumer_interval", .type = SET_DURATION, .offset = FIELD(consumer_interval_ms),
     .def = "5s", .min = SEC, .max = 10 * MIN, .placeholder = "DURATION",
     .help = "how often to read the consumers' positions from JetStream"},
    {.key = "log_level", .type = SET_CHOICE, .offset = FIELD(log_level), .def = "info",
     .choices = log_levels, .placeholder = "LEVEL", .help = "least severe level to log"},
    {.key = "log_format", .type = SET_CHOICE, .offset = FIELD(log_format), .def = "text",
     .choices = log_formats, .placeholder = "FORMAT", .help = "format of log lines"},
};

/* ---- value checks for strings ---- */

static bool check_nonempty(const char *value, char *why, size_t whylen)
{
    if (value[0] != '\0')
        return true;
    snprintf(why, whylen, "expected a non-empty value");
    return false;
}

/* PostgreSQL's rule for replication slot names (ReplicationSlotValidateName). */
static bool check_slot(const char *value, char *why, size_t whylen)
{
    size_t n = strlen(value);
    bool ok = n >= 1 && n <= 63;
    for (size_t i = 0; ok && i < n; i++) {
        char c = value[i];
        ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
    }
    if (!ok)
        snprintf(why, whylen, "expected 1 to 63 characters of a-z, 0-9 and _");
    return ok;
}

/* NAMEDATALEN - 1: PostgreSQL would silently truncate a longer name. */
static bool check_name63(const char *value, char *why, size_t whylen)
{
    size_t n = strlen(value);
    if (n >= 1 && n <= 63)
        return true;
    snprintf(why, whylen, "expected a name of 1 to 63 bytes");
    return false;
}

static bool check_subject(const char *value, char *why, size_t whylen)
{
    SubjectTemplate *t;
    char msg[512];
    if (subject_template_new(&t, value, msg, sizeof msg) == 0) {
        subject_template_free(t);
        return true;
    }
    /* The message repeats the template ("subject template '...': reason"), which the caller
     * already echoes: keep only the reason. */
    static const char head[] = "subject template '";
    size_t hlen = strlen(head), vlen = strlen(value), skip = 0;
    if (strncmp(msg, head, hlen) == 0 && strlen(msg) >= hlen + vlen + 3 &&
        strncmp(msg + hlen, value, vlen) == 0 && strncmp(msg + hlen + vlen, "': ", 3) == 0)
        skip = hlen + vlen + 3;
    snprintf(why, whylen, "%s", msg + skip);
    return false;
}

/* A table name as PostgreSQL stores it: any text but control bytes, at most schema.table. */
static bool check_table(const char *value, char *why, size_t whylen)
{
    for (const char *p = value; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            snprintf(why, whylen, "expected schema.table or table, without control characters");
            return false;
        }
    }
    return check_nonempty(value, why, whylen);
}

/* A column name as PostgreSQL stores it: 1 to 63 bytes without control bytes or commas. */
static bool check_column(const char *value, char *why, size_t whylen)
{
    size_t n = strlen(value);
    bool ok = n >= 1 && n <= 63;
    for (size_t i = 0; ok && i < n; i++)
        ok = (unsigned char)value[i] >= 0x20 && value[i] != 0x7f && value[i] != ',';
    if (!ok)
        snprintf(why, whylen, "expected a column name of 1 to 63 bytes");
    return ok;
}

/* "column:Header-Name" pairs, comma-separated, each name as config_header_name_ok() wants. */
static bool check_headers(const char *value, char *why, size_t whylen)
{
    for (const char *p = value;;) {
        size_t n = strcspn(p, ",");
        const char *colon = memchr(p, ':', n);
        char column[64];
        size_t clen = colon ? (size_t)(colon - p) : 0;
        const char *h = colon ? colon + 1 : NULL;
        size_t hlen = colon ? n - clen - 1 : 0;
        bool ok = colon && clen > 0 && clen < sizeof column && config_header_name_ok(h, hlen);
        if (ok) {
            memcpy(column, p, clen);
            column[clen] = '\0';
            ok = check_column(column, why, whylen);
        }
        if (!ok) {
            snprintf(why, whylen, "expected COLUMN:Header-Name pairs such as tenant_id:Tenant-Id "
                                  "(header names: letters, digits, '-' and '_')");
            return false;
        }
        if (config_header_name_reserved(h, hlen)) {
            snprintf(why, whylen, "header names starting with Nats- or Outbox- are reserved: "
                                  "choose another name for column %s", column);
            return false;
        }
        p += n;
        if (*p == '\0')
            return true;
        p++;
    }
}

/* A concrete subject (no template, no wildcards). */
static bool check_plain_subject(const char *value, char *why, size_t whylen)
{
    if (!subject_is_valid(value, strlen(value)) || strchr(value, '{') || strchr(value, '}')) {
        snprintf(why, whylen, "expected a subject such as outbox.dead_letter (tokens separated "
                              "by '.', no wildcards or placeholders)");
        return false;
    }
    return true;
}

/* JetStream key-value bucket names: letters, digits, '-' and '_'. */
static bool check_kv_bucket(const char *value, char *why, size_t whylen)
{
    size_t n = strlen(value);
    bool ok = n > 0 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        char c = value[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             c == '-' || c == '_';
    }
    if (!ok)
        snprintf(why, whylen, "expected 1 to 64 letters, digits, '-' or '_'");
    return ok;
}

/* "all", "off", or consumer names as JetStream allows them (no spaces, '.', '*', '>' or path
 * separators), comma-separated. */
static bool check_consumers(const char *value, char *why, size_t whylen)
{
    if (strcmp(value, "all") == 0 || strcmp(value, "off") == 0)
        return true;
    for (const char *p = value;;) {
        size_t n = strcspn(p, ",");
        bool ok = n > 0 && n <= 255 && !(n == 3 && (strncmp(p, "all", 3) == 0 ||
                                                     strncmp(p, "off", 3) == 0));
        for (size_t i = 0; ok && i < n; i++)
            ok = (unsigned char)p[i] > 0x20 && p[i] != 0x7f && !strchr(".*>/\\", p[i]);
        if (!ok) {
            snprintf(why, whylen, "expected all, off, or consumer names separated by commas "
                                  "(no spaces, '.', '*', '>', '/' or '\\')");
            return false;
        }
        p += n;
        if (*p == '\0')
            return true;
        p++;
    }
}

/* ---- number parsing ---- */

/* Parses the leading decimal digits of s into *out; returns the end, or NULL on no digits or
 * overflow. */
static const char *parse_digits(const char *s, int64_t *out)
{
    int64_t v = 0;
    const char *p = s;
    for (; *p >= '0' && *p <= '9'; p++) {
        int d = *p - '0';
        if (v > (INT64_MAX - d) / 10)
            return NULL;
        v = v * 10 + d;
    }
    if (p == s)
        return NULL;
    *out = v;
    return p;
}

/* A non-negative decimal integer, digits only. */
static bool parse_int(const char *s, int64_t *out)
{
    int64_t v = 0;
    const char *end = parse_digits(s, &v);
    if (!end || *end != '\0')
        return false;
    *out = v;
    return true;
}

typedef struct Unit {
    const char *name;
    int64_t factor;
} Unit;

/* Parses "<digits><unit>" with unit one of units (compared case-sensitively unless nocase);
 * no unit means a factor of 1. */
static bool parse_with_unit(const char *s, const Unit *units, size_t nunits, bool nocase,
                            int64_t *out)
{
    int64_t v = 0;
    const char *end = s ? parse_digits(s, &v) : NULL;
    if (!end)
        return false;
    int64_t factor = 1;
    if (*end != '\0') {
        size_t i;
        for (i = 0; i < nunits; i++)
            if (nocase ? strcasecmp(end, units[i].name) == 0 : strcmp(end, units[i].name) == 0)
                break;
        if (i == nunits)
            return false;
        factor = units[i].factor;
    }
    if (v > INT64_MAX / factor)
        return false;
    *out = v * factor;
    return true;
}

const char *config_option_value(int argc, char **argv, int *i, const char *name, bool *bad)
{
    size_t n = strlen(name);
    const char *a = argv[*i];
    if (strncmp(a, name, n) != 0 || (a[n] != '=' && a[n] != '\0'))
        return NULL;
    if (a[n] == '=')
        return a + n + 1;
    if (*i + 1 == argc) {
        fprintf(stderr, "outboxd: option %s needs a value\n", name);
        *bad = true;
        return NULL;
    }
    return argv[++*i];
}

bool config_parse_duration_ms(const char *s, int64_t *out)
{
    static const Unit units[] = {{"ms", 1}, {"s", SEC}, {"m", MIN}, {"h", HOUR}};
    return parse_with_unit(s, units, ARRAY_SIZE(units), false, out);
}

bool config_parse_bytes(const char *s, int64_t *out)
{
    static const Unit units[] = {
        {"B", 1},
        {"KiB", KiB},
        {"MiB", MiB},
        {"GiB", GiB},
        {"TiB", 1024 * GiB},
        {"kB", 1000},
        {"MB", 1000 * 1000},
        {"GB", 1000 * 1000 * 1000},
        {"TB", INT64_C(1000) * 1000 * 1000 * 1000},
    };
    return parse_with_unit(s, units, ARRAY_SIZE(units), true, out);
}

bool config_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    if (!s)
        return false;
    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

/* ---- names derived from the key ---- */

static void flag_name(const Setting *s, char out[NAME_MAX_LEN])
{
    size_t i = 0;
    out[i++] = '-';
    out[i++] = '-';
    for (const char *k = s->key; *k && i < NAME_MAX_LEN - 1; k++)
        out[i++] = *k == '_' ? '-' : *k;
    out[i] = '\0';
}

static void env_name(const Setting *s, char out[NAME_MAX_LEN])
{
    size_t i = strlen(ENV_PREFIX);
    memcpy(out, ENV_PREFIX, i);
    for (const char *k = s->key; *k && i < NAME_MAX_LEN - 1; k++)
        out[i++] = (*k >= 'a' && *k <= 'z') ? (char)(*k - 'a' + 'A') : *k;
    out[i] = '\0';
}

/* The setting whose flag is "--" + name[0..len), or NULL. */
static const Setting *find_by_flag(const char *name, size_t len)
{
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        char flag[NAME_MAX_LEN];
        flag_name(&settings[i], flag);
        if (strlen(flag + 2) == len && memcmp(flag + 2, name, len) == 0)
            return &settings[i];
    }
    return NULL;
}

/* The setting whose environment variable is name[0..len), or NULL. */
static const Setting *find_by_env(const char *name, size_t len)
{
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        char env[NAME_MAX_LEN];
        env_name(&settings[i], env);
        if (strlen(env) == len && memcmp(env, name, len) == 0)
            return &settings[i];
    }
    return NULL;
}

/* ---- formatting ---- */

static void format_duration(int64_t ms, char *out, size_t n)
{
    if (ms == 0)
        snprintf(out, n, "0s");
    else if (ms % HOUR == 0)
        snprintf(out, n, "%lldh", (long long)(ms / HOUR));
    else if (ms % MIN == 0)
        snprintf(out, n, "%lldm", (long long)(ms / MIN));
    else if (ms % SEC == 0)
        snprintf(out, n, "%llds", (long long)(ms / SEC));
    else
        snprintf(out, n, "%lldms", (long long)ms);
}

static void format_bytes(int64_t b, char *out, size_t n)
{
    if (b != 0 && b % GiB == 0)
        snprintf(out, n, "%lldGiB", (long long)(b / GiB));
    else if (b != 0 && b % MiB == 0)
        snprintf(out, n, "%lldMiB", (long long)(b / MiB));
    else if (b != 0 && b % KiB == 0)
        snprintf(out, n, "%lldKiB", (long long)(b / KiB));
    else
        snprintf(out, n, "%lld", (long long)b);
}

static void format_number(const Setting *s, int64_t v, char *out, size_t n)
{
    if (s->type == SET_DURATION)
        format_duration(v, out, n);
    else if (s->type == SET_BYTES)
        format_bytes(v, out, n);
    else
        snprintf(out, n, "%lld", (long long)v);
}

static void join_choices(const Setting *s, char *out, size_t n)
{
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; s->choices[i] && used < n; i++) {
        int w = snprintf(out + used, n - used, "%s%s", i ? ", " : "", s->choices[i]);
        if (w < 0)
            break;
        used += (size_t)w;
    }
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    text_one_line(err); /* names and values quoted from the user may hold anything */
}

/* Copies value for an error message: control bytes become '?' (the message stays one line)
 * and a long value is cut with "...". */
static void quote_value(const char *value, char *out, size_t n)
{
    size_t len = strlen(value), i = 0;
    bool cut = len > n - 1;
    size_t keep = cut ? n - 4 : len;
    for (; i < keep; i++)
        out[i] = ((unsigned char)value[i] < 0x20 || value[i] == 0x7f) ? '?' : value[i];
    if (cut) {
        memcpy(out + i, "...", 3);
        i += 3;
    }
    out[i] = '\0';
}

/* ---- applying a value ---- */

/* Where a value goes: a Config, or (for a [table] section) one TableConfig of it. */
typedef struct Target {
    Config *cfg;
    TableConfig *tc; /* NULL: cfg itself */
    bool append;     /* a list setting adds to what this source gave before */
} Target;

/* The field of setting s in the target. */
static void *field_ptr(const Target *t, const Setting *s)
{
    if (t->tc && s->per_table)
        return (char *)t->tc + (s->offset - offsetof(Config, t));
    return (char *)t->cfg + s->offset;
}

static void store_string(const Target *t, const Setting *s, const char *value)
{
    char **field = field_ptr(t, s);
    char *copy = t->append && s->list && *field ? strf("%s,%s", *field, value) : xstrdup(value);
    free(*field);
    *field = copy;
}

/*
 * Parses value for setting s and stores it in cfg. On a bad value returns -1 with a message
 * naming the flag and the environment variable; cfg is unchanged then.
 */
static int apply(const Target *t, const Setting *s, const char *value, char *err, size_t errlen)
{
    char why[256];
    why[0] = '\0';
    void *field = field_ptr(t, s);

    switch (s->type) {
    case SET_STRING:
        if (s->check && !s->check(value, why, sizeof why))
            goto bad;
        store_string(t, s, value);
        return 0;
    case SET_BOOL: {
        bool b;
        if (!config_parse_bool(value, &b)) {
            snprintf(why, sizeof why, "expected true or false (or yes/no, on/off, 1/0)");
            goto bad;
        }
        *(bool *)field = b;
        return 0;
    }
    case SET_INT:
    case SET_DURATION:
    case SET_BYTES: {
        int64_t v;
        bool ok = s->type == SET_DURATION ? config_parse_duration_ms(value, &v)
                  : s->type == SET_BYTES  ? config_parse_bytes(value, &v)
                                          : parse_int(value, &v);
        if (!ok) {
            snprintf(why, sizeof why, "%s",
                     s->type == SET_DURATION ? "expected a duration such as 500ms, 10s or 2m"
                     : s->type == SET_BYTES  ? "expected a size such as 512KiB, 16MiB or 1GiB"
                                             : "expected a whole number");
            goto bad;
        }
        if (v < s->min || v > s->max) {
            char lo[32], hi[32];
            format_number(s, s->min, lo, sizeof lo);
            format_number(s, s->max, hi, sizeof hi);
            snprintf(why, sizeof why, "must be between %s and %s", lo, hi);
            goto bad;
        }
        *(int64_t *)field = v;
        return 0;
    }
    case SET_CHOICE: {
        for (size_t i = 0; s->choices[i]; i++) {
            if (strcasecmp(value, s->choices[i]) == 0) {
                store_string(t, s, s->choices[i]);
                return 0;
            }
        }
        char list[128];
        join_choices(s, list, sizeof list);
        snprintf(why, sizeof why, "expected one of %s", list);
        goto bad;
    }
    }

bad:;
    char flag[NAME_MAX_LEN], env[NAME_MAX_LEN];
    flag_name(s, flag);
    env_name(s, env);
    if (s->secret) {
        set_err(err, errlen, "invalid value for %s (%s): %s", flag, env, why);
    } else {
        char shown[128];
        quote_value(value, shown, sizeof shown);
        set_err(err, errlen, "invalid value '%s' for %s (%s): %s", shown, flag, env, why);
    }
    return -1;
}

/* ---- public ---- */

void config_init(Config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    Target t = {.cfg = cfg};
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        const Setting *s = &settings[i];
        if (!s->def)
            continue;
        char err[512];
        if (apply(&t, s, s->def, err, sizeof err) < 0) {
            /* A bad default is a bug in the table above, found by the first test run. */
            fprintf(stderr, "outboxd: bad default: %s\n", err);
            abort();
        }
    }
}

static void table_config_deinit(TableConfig *tc)
{
    Target t = {.tc = tc};
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        if (!settings[i].per_table)
            continue;
        char **field = field_ptr(&t, &settings[i]);
        free(*field);
        *field = NULL;
    }
}

void config_deinit(Config *cfg)
{
    for (size_t i = 0; i < cfg->ntables; i++)
        table_config_deinit(&cfg->tables[i]);
    free(cfg->tables);
    cfg->tables = NULL;
    cfg->ntables = 0;
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        const Setting *s = &settings[i];
        if (s->type == SET_STRING || s->type == SET_CHOICE) {
            char **field = (char **)((char *)cfg + s->offset);
            free(*field);
            *field = NULL;
        }
    }
}

/* Fails on an OUTBOXD_* variable that names no setting, most likely a typo. */
/* Kubernetes gives every pod variables for each Service in its namespace: a Service named
 * "outboxd-metrics" brings OUTBOXD_METRICS_SERVICE_HOST, OUTBOXD_METRICS_PORT,
 * OUTBOXD_METRICS_PORT_9847_TCP_ADDR and so on. Those shapes are not settings and not typos. */
static bool service_link_variable(const char *name, size_t len)
{
    char buf[NAME_MAX_LEN * 4];
    if (len >= sizeof(buf))
        return false;
    memcpy(buf, name, len);
    buf[len] = '\0';
    if (strstr(buf, "_SERVICE_HOST") || strstr(buf, "_SERVICE_PORT"))
        return true;
    char *port = strstr(buf + strlen(ENV_PREFIX) - 1, "_PORT");
    for (; port; port = strstr(port + 1, "_PORT")) {
        const char *p = port + 5;
        if (*p == '\0')
            return true; /* X_PORT=tcp://... */
        if (*p++ != '_' || *p < '0' || *p > '9')
            continue;
        while (*p >= '0' && *p <= '9')
            p++;
        if (strncmp(p, "_TCP", 4) == 0 || strncmp(p, "_UDP", 4) == 0 ||
            strncmp(p, "_SCTP", 5) == 0)
            return true; /* X_PORT_9847_TCP[_ADDR|_PORT|_PROTO] */
    }
    return false;
}

static int check_unknown_env(char *err, size_t errlen)
{
    size_t plen = strlen(ENV_PREFIX);
    for (char **e = environ; e && *e; e++) {
        if (strncmp(*e, ENV_PREFIX, plen) != 0)
            continue;
        const char *eq = strchr(*e, '=');
        size_t len = eq ? (size_t)(eq - *e) : strlen(*e);
        if (!find_by_env(*e, len) && !service_link_variable(*e, len)) {
            set_err(err, errlen, "unknown environment variable %.*s (see outboxd --help)",
                    (int)len, *e);
            return -1;
        }
    }
    return 0;
}

/* Strips spaces and tabs at both ends, in place. */
static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

/* A value in double quotes loses them; inside, \" and \\ stand for " and \. */
static bool unquote(char *v)
{
    size_t n = strlen(v);
    if (n == 0 || v[0] != '"')
        return true;
    if (n < 2 || v[n - 1] != '"')
        return false;
    char *w = v;
    for (size_t i = 1; i < n - 1; i++) {
        if (v[i] == '\\' && i + 1 < n - 1 && (v[i + 1] == '"' || v[i + 1] == '\\'))
            i++;
        *w++ = v[i];
    }
    *w = '\0';
    return true;
}

/* Fills the unset per-table fields of dst with copies of src's. */
static void table_config_inherit(TableConfig *dst, const TableConfig *src)
{
    Target d = {.tc = dst}, f = {.tc = (TableConfig *)src};
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        if (!settings[i].per_table)
            continue;
        char **to = field_ptr(&d, &settings[i]);
        char *const *from = field_ptr(&f, &settings[i]);
        if (!*to && *from)
            *to = xstrdup(*from);
    }
}

/* "schema.table" for a table setting, so that "orders" and "public.orders" compare equal. */
static void qualified_name(const char *table, char *out, size_t n)
{
    snprintf(out, n, "%s%s", strchr(table, '.') ? "" : "public.", table);
}

/* Starts a [table NAME] section: a new entry in cfg->tables. */
static int begin_section(Config *cfg, char *text, const char *path, int lineno, char *err,
                         size_t errlen)
{
    size_t n = strlen(text);
    char *name = NULL;
    if (n > 7 && strncmp(text, "[table", 6) == 0 && (text[6] == ' ' || text[6] == '\t') &&
        text[n - 1] == ']') {
        text[n - 1] = '\0';
        name = trim(text + 6);
    }
    char why[256];
    if (!name || !unquote(name) || !check_table(name, why, sizeof why)) {
        set_err(err, errlen, "%s:%d: expected a section header such as [table public.orders_outbox]",
                path, lineno);
        return -1;
    }
    char q[512], other[512];
    qualified_name(name, q, sizeof q);
    for (size_t i = 0; i < cfg->ntables; i++) {
        qualified_name(cfg->tables[i].table, other, sizeof other);
        if (strcmp(q, other) == 0) {
            set_err(err, errlen, "%s:%d: table %s has a section already", path, lineno, q);
            return -1;
        }
    }
    cfg->tables = xrealloc(cfg->tables, (cfg->ntables + 1) * sizeof(*cfg->tables));
    TableConfig *tc = &cfg->tables[cfg->ntables++];
    memset(tc, 0, sizeof(*tc));
    tc->table = xstrdup(name);
    return 0;
}

/* Applies a settings file: top-level lines to cfg, lines after "[table NAME]" to that table.
 * given[i] tells whether settings[i] appeared at the top level. Errors name the file and line. */
static int apply_file(Config *cfg, const char *path, bool *given, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        set_err(err, errlen, "could not read settings file %s: %s", path, strerror(errno));
        return -1;
    }
    char line[8192];
    int rc = 0;
    bool in_section = false;
    bool section_given[ARRAY_SIZE(settings)];
    for (int lineno = 1; rc == 0 && fgets(line, sizeof(line), f); lineno++) {
        if (!strchr(line, '\n') && !feof(f)) {
            set_err(err, errlen, "%s:%d: line longer than %zu bytes", path, lineno,
                    sizeof(line) - 1);
            rc = -1;
            break;
        }
        line[strcspn(line, "\n")] = '\0';
        char *text = trim(line);
        if (*text == '\0' || *text == '#')
            continue;
        if (*text == '[') {
            rc = begin_section(cfg, text, path, lineno, err, errlen);
            in_section = true;
            memset(section_given, 0, sizeof section_given);
            continue;
        }
        char *eq = strchr(text, '=');
        if (!eq) {
            set_err(err, errlen, "%s:%d: expected key = value", path, lineno);
            rc = -1;
            break;
        }
        *eq = '\0';
        char *key = trim(text), *value = trim(eq + 1);
        size_t idx = ARRAY_SIZE(settings);
        for (size_t i = 0; i < ARRAY_SIZE(settings); i++)
            if (strcmp(settings[i].key, key) == 0)
                idx = i;
        const Setting *s = idx < ARRAY_SIZE(settings) ? &settings[idx] : NULL;
        Target t = {.cfg = cfg};
        if (!s || strcmp(key, "config") == 0) {
            set_err(err, errlen, "%s:%d: unknown setting '%s' (keys are the snake_case names, "
                                 "e.g. nats_url; see outboxd --help)",
                    path, lineno, key);
            rc = -1;
            continue;
        }
        if (in_section && (!s->per_table || strcmp(key, "table") == 0)) {
            set_err(err, errlen, "%s:%d: %s is not a per-table setting: move it above the first "
                                 "[table] section (per table: subject, columns, column_*, "
                                 "header, body)",
                    path, lineno, key);
            rc = -1;
            continue;
        }
        if (in_section) {
            t.tc = &cfg->tables[cfg->ntables - 1];
            t.append = section_given[idx];
            section_given[idx] = true;
        } else {
            t.append = given[idx];
            given[idx] = true;
        }
        char why[1024];
        if (!unquote(value)) {
            set_err(err, errlen, "%s:%d: unbalanced quote in the value of %s", path, lineno, key);
            rc = -1;
        } else if (apply(&t, s, value, why, sizeof(why)) < 0) {
            set_err(err, errlen, "%s:%d: %s", path, lineno, why);
            rc = -1;
        }
    }
    fclose(f);
    return rc;
}

static size_t setting_index(const char *key)
{
    size_t i = 0;
    while (i < ARRAY_SIZE(settings) && strcmp(settings[i].key, key) != 0)
        i++;
    return i;
}

/* Fills cfg->tables: the [table] sections with the top-level per-table values as defaults, or
 * the top-level table alone. */
static int resolve_tables(Config *cfg, bool table_given, char *err, size_t errlen)
{
    if (cfg->ntables > 0 && table_given) {
        set_err(err, errlen, "the settings file lists tables in [table] sections, so --table "
                             "(OUTBOXD_TABLE, table =) has no meaning: drop it or add a section");
        return -1;
    }
    if (cfg->ntables == 0) {
        cfg->tables = xcalloc(1, sizeof(*cfg->tables));
        cfg->ntables = 1;
    }
    for (size_t i = 0; i < cfg->ntables; i++)
        table_config_inherit(&cfg->tables[i], &cfg->t);
    return 0;
}

/* The settings file named by --config (last one wins) or else OUTBOXD_CONFIG, or NULL. */
static const char *config_path(int argc, char **argv)
{
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "--config=", 9) == 0)
            path = argv[i] + 9;
        else if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            path = argv[i + 1];
    }
    return path ? path : getenv(ENV_PREFIX "CONFIG");
}

int config_parse(Config *cfg, int argc, char **argv, char *err, size_t errlen)
{
    if (check_unknown_env(err, errlen) < 0)
        return -1;
    bool given[ARRAY_SIZE(settings)] = {false}, flag_given[ARRAY_SIZE(settings)] = {false};
    const char *file = config_path(argc, argv);
    if (file && *file && apply_file(cfg, file, given, err, errlen) < 0)
        return -1;

    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        char env[NAME_MAX_LEN];
        env_name(&settings[i], env);
        const char *value = getenv(env);
        Target t = {.cfg = cfg};
        if (value && apply(&t, &settings[i], value, err, errlen) < 0)
            return -1;
        given[i] |= value != NULL;
    }

    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            /* Only options are taken; anything after "--" is a stray argument. */
            if (i + 1 < argc) {
                set_err(err, errlen, "unexpected argument '%s' (see outboxd --help)", argv[i + 1]);
                return -1;
            }
            break;
        }
        if (arg[0] != '-' || arg[1] == '\0') {
            set_err(err, errlen, "unexpected argument '%s' (see outboxd --help)", arg);
            return -1;
        }
        if (arg[1] != '-') {
            set_err(err, errlen, "unknown option %s (see outboxd --help)", arg);
            return -1;
        }

        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const char *value = eq ? eq + 1 : NULL;

        const Setting *s = find_by_flag(name, len);
        bool negated = false;
        if (!s && len > 3 && strncmp(name, "no-", 3) == 0) {
            const Setting *b = find_by_flag(name + 3, len - 3);
            if (b && b->type == SET_BOOL) {
                s = b;
                negated = true;
            }
        }
        if (!s) {
            /* Only the name: what follows "=" may be a password given to a mistyped flag. */
            set_err(err, errlen, "unknown option --%.*s (see outboxd --help)", (int)len, name);
            return -1;
        }

        if (negated) {
            if (value) {
                set_err(err, errlen, "option --%.*s takes no value", (int)len, name);
                return -1;
            }
            value = "false";
        } else if (s->type == SET_BOOL) {
            if (!value)
                value = "true"; /* a bool flag never takes the next argument */
        } else if (!value) {
            /* "--slot --create" is a forgotten value, not a slot named "--create"; a value
             * that starts with "--" can still be given as --slot=--x. */
            if (i + 1 >= argc || strncmp(argv[i + 1], "--", 2) == 0) {
                set_err(err, errlen, "option --%.*s needs a value", (int)len, name);
                return -1;
            }
            value = argv[++i];
        }
        size_t idx = (size_t)(s - settings);
        Target t = {.cfg = cfg, .append = flag_given[idx]};
        if (apply(&t, s, value, err, errlen) < 0)
            return -1;
        flag_given[idx] = given[idx] = true;
    }

    if (resolve_tables(cfg, given[setting_index("table")], err, errlen) < 0)
        return -1;
    if (!cfg->pg_url) {
        set_err(err, errlen,
                "missing setting: --pg-url or OUTBOXD_PG_URL (the PostgreSQL connection string, "
                "e.g. postgresql://user@host/db)");
        return -1;
    }
    if (!cfg->nats_tls_cert != !cfg->nats_tls_key) {
        set_err(err, errlen, "--nats-tls-cert and --nats-tls-key go together: set both or neither");
        return -1;
    }
    if ((cfg->nats_password && cfg->nats_password_file) ||
        (cfg->nats_token && cfg->nats_token_file)) {
        set_err(err, errlen, "set the NATS password or token either directly or from a file, "
                             "not both");
        return -1;
    }
    if (cfg->retry_min_ms > cfg->retry_max_ms) {
        set_err(err, errlen,
                "--retry-min (OUTBOXD_RETRY_MIN) must not be longer than --retry-max "
                "(OUTBOXD_RETRY_MAX)");
        return -1;
    }
    return 0;
}

/* "--flag VALUE", or "--flag[=BOOL]" for a bool. */
static void usage_left(const Setting *s, char *out, size_t n)
{
    char flag[NAME_MAX_LEN];
    flag_name(s, flag);
    if (s->type == SET_BOOL)
        snprintf(out, n, "%s[=%s]", flag, s->placeholder);
    else
        snprintf(out, n, "%s %s", flag, s->placeholder);
}

void config_print_help(FILE *out)
{
    int width = 0;
    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        char left[128];
        usage_left(&settings[i], left, sizeof left);
        if ((int)strlen(left) > width)
            width = (int)strlen(left);
    }

    for (size_t i = 0; i < ARRAY_SIZE(settings); i++) {
        const Setting *s = &settings[i];
        char left[128], env[NAME_MAX_LEN], list[128];
        usage_left(s, left, sizeof left);
        env_name(s, env);
        fprintf(out, "  %-*s   %s (", width, left, s->help);
        if (s->type == SET_CHOICE) {
            join_choices(s, list, sizeof list);
            fprintf(out, "one of %s; ", list);
        }
        if (s->def)
            fprintf(out, "default: %s)\n", s->def);
        else
            fprintf(out, "%s)\n", s->required ? "required" : "no default");
        fprintf(out, "      env: %s\n", env);
    }
}
