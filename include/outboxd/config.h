/*
 * config.h - every setting of outboxd, from one table.
 *
 * Each setting has a snake_case key, an OUTBOXD_<KEY> environment variable and a --kebab-case
 * flag, all derived from the key, plus a type, a default, bounds and one line of help. The help
 * text, the README's table and the validation all come from that table (config.c), so they
 * cannot drift apart. Precedence: flag > environment > settings file (--config) > default.
 */
#ifndef OUTBOXD_CONFIG_H
#define OUTBOXD_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* The roles an outbox column can play, in this order; CONFIG_NROLES of them. */
enum {
    ROLE_EVENT_ID,
    ROLE_AGGREGATE_TYPE,
    ROLE_AGGREGATE_ID,
    ROLE_EVENT_TYPE,
    ROLE_PAYLOAD,
    ROLE_OCCURRED_AT,
    ROLE_SCHEMA_VERSION,
    ROLE_TRACE_ID,
    CONFIG_NROLES
};
/* The role names: "event_id", "aggregate_type", ... They are also the column names of the
 * default ("outboxd") layout and the field names of the table-less envelope. */
extern const char *const config_role_names[CONFIG_NROLES];

/* How one outbox table is relayed. NULL fields of a [table ...] section take the top-level
 * value. */
typedef struct TableConfig {
    char *table;   /* "schema.table" or "table" (schema public) */
    char *subject; /* subject template, "{column}" or "{role}" placeholders */
    char *columns; /* the column layout a role falls back on: "outboxd" or "debezium" */
    char *column[CONFIG_NROLES]; /* the column playing each role; NULL: from the layout */
    char *headers; /* extra headers, "column:Header-Name,..." */
    char *body;    /* "payload" or "envelope" (every column as a JSON object) */
} TableConfig;

/* The column playing role in tc (after the layout), or NULL when it has none. */
const char *config_role_column(const TableConfig *tc, int role);

/* The flag that names role's column: "--column-event-id", ... */
#define CONFIG_ROLE_FLAG_MAX 32
void config_role_flag(int role, char out[CONFIG_ROLE_FLAG_MAX]);

/* The rule for the names of headers users add (--header, an envelope's "headers"): 1 to 64
 * letters, digits, '-' and '_' (config_header_name_ok), and not starting with Nats- (JetStream
 * acts on those) or Outbox- (outboxd's own: config_header_name_reserved). */
bool config_header_name_ok(const char *h, size_t n);
bool config_header_name_reserved(const char *h, size_t n);

/* Parses tc->headers; calls fn for each "column:Header-Name" pair. */
void config_each_header(const TableConfig *tc, void (*fn)(void *arg, const char *column,
                        size_t column_len, const char *header, size_t header_len), void *arg);

typedef struct Config {
    char *config_file; /* settings file read before the environment and the flags */
    /* connections */
    char *pg_url;      /* libpq conninfo or URI; required */
    char *nats_url;    /* comma-separated NATS server URLs */
    /* what to relay */
    char *slot;        /* logical replication slot name */
    char *publication; /* publication name */
    TableConfig t;     /* the outbox table, or the defaults of [table] sections */
    TableConfig *tables; /* what is relayed: the [table] sections, or t alone */
    size_t ntables;
    bool messages;       /* relay transactional logical decoding messages too */
    char *message_prefix; /* ... those with this prefix */
    bool create;       /* create the publication, then the slot, when missing */
    bool failover_slot; /* 17+: the slot is a failover slot (standbys keep it in step) */
    /* publishing */
    int64_t max_inflight;       /* events published but not yet acknowledged, at most */
    int64_t max_inflight_bytes; /* bytes of such events, at most */
    int64_t ack_timeout_ms;     /* a publish not acknowledged by then has failed */
    /* replication */
    int64_t status_interval_ms;   /* standby status update period */
    int64_t shutdown_timeout_ms;  /* on SIGTERM, how long to wait for outstanding acks */
    int64_t pg_receive_timeout_ms; /* a connection silent this long is dropped (0: never) */
    /* failures */
    bool strict_order;          /* chain publishes with Nats-Expected-Last-Sequence */
    char *on_poison;            /* "dead-letter" or "stop" */
    char *dead_letter_subject;
    char *checkpoint_bucket;    /* JetStream KV bucket for the durable checkpoint */
    int64_t checkpoint_interval_ms;
    int64_t retry_min_ms;       /* backoff for reconnects and publish retries */
    int64_t retry_max_ms;
    /* replay and the slot */
    int64_t bookmark_every_ms;  /* copy the slot this often (0: no bookmarks) */
    int64_t bookmark_keep_ms;   /* drop bookmarks older than this */
    bool backfill;              /* publish the rows already in the outbox when the slot is made */
    char *slot_recovery;        /* "manual" or "auto": what a lost or missing slot does */
    int64_t recovery_margin_ms; /* how far before its cut a recovery reads */
    /* connection security (secrets come from files or the environment) */
    char *pg_password_file;
    int64_t nats_ping_interval_ms; /* a NATS connection is dead after 2 unanswered pings */
    char *nats_user;
    char *nats_password;
    char *nats_password_file;
    char *nats_token;
    char *nats_token_file;
    char *nats_nkey_seed_file;
    char *nats_creds_file;
    char *nats_tls_ca;
    char *nats_tls_cert;
    char *nats_tls_key;
    char *nats_tls_server_name;
    /* observability */
    char *http_addr;            /* "host:port", ":port" or "off" */
    char *consumers;            /* whose lag to report: "all", "off" or "a,b,c" */
    int64_t consumer_interval_ms; /* how often to read their positions */
    /* logging */
    char *log_level;  /* debug, info, warn, error */
    char *log_format; /* text or json */
} Config;

/* Fills cfg with the defaults. Strings are heap copies owned by cfg. */
void config_init(Config *cfg);

/*
 * Applies the settings file (--config FILE or OUTBOXD_CONFIG: "key = value" lines with the
 * snake_case keys, '#' comments, values optionally in double quotes; "[table NAME]" starts a
 * section of per-table settings for one more outbox table), then the environment
 * (OUTBOXD_*), then the flags in argv[0..argc) over cfg, and validates
 * the result. argv holds options only (the subcommand already removed). "--help" is not handled
 * here. Returns 0 on success; on a bad or missing setting returns -1 and writes one line into
 * err saying which setting is wrong and how to fix it. cfg stays valid to deinit either way.
 */
int config_parse(Config *cfg, int argc, char **argv, char *err, size_t errlen);
/* After config_parse(): cfg->tables holds the [table] sections, or a copy of cfg->t. */

void config_deinit(Config *cfg);

/* Prints the settings table as --help text: flag, env var, default and help for each setting. */
void config_print_help(FILE *out);

/* A subcommand's own option at argv[*i], "--name VALUE" or "--name=VALUE": the value (moving *i
 * past it), or NULL when argv[*i] is not that option. A missing value is reported on stderr
 * and sets *bad. */
const char *config_option_value(int argc, char **argv, int *i, const char *name, bool *bad);

/* Parses durations such as "500ms", "5s", "2m", "1h", or a bare number of milliseconds. */
bool config_parse_duration_ms(const char *s, int64_t *out);
/* Parses sizes such as "512", "64KiB", "8MiB", "1GiB" (also kB/MB/GB as powers of 1000). */
bool config_parse_bytes(const char *s, int64_t *out);
/* Parses true/false, yes/no, on/off, 1/0 (case-insensitive). */
bool config_parse_bool(const char *s, bool *out);

#endif
