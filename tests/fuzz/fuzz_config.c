/*
 * fuzz_config - settings parsing from flags and the environment.
 *
 * Input: NUL-separated strings, at most MAX_ARGS. A string starting with '$' sets an environment
 * variable instead: "$PG_URL=postgres://x" sets OUTBOXD_PG_URL (at most MAX_ENV per input, all
 * removed again before the next input; the harness only ever touches OUTBOXD_* names). The rest
 * is argv for config_init/config_parse/config_deinit, and each string also goes through
 * config_parse_duration_ms, config_parse_bytes and config_parse_bool.
 *
 * Checked, from config.h: LeakSanitizer finds nothing (libFuzzer checks each input); a failure
 * gives a non-empty one-line reason; a success holds a pg_url, only values inside the table's
 * bounds, a compilable subject template and a valid dead-letter subject, and parsing the same
 * input twice gives the same Config.
 *
 * Seeds: corpus/fuzz_config (hand-written).
 */
#include <stdbool.h>
#include <string.h>

#include "fuzz.h"
#include "outboxd/config.h"
#include "outboxd/subject.h"

#define MAX_ARGS 32
#define MAX_ENV 8
#define ENV_PREFIX "OUTBOXD_"

extern char **environ;

int LLVMFuzzerInitialize(int *argc, char ***argv);

/* Starts every run from an environment without OUTBOXD_* variables. */
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    for (;;) {
        char **e = environ;
        while (e && *e && strncmp(*e, ENV_PREFIX, strlen(ENV_PREFIX)) != 0)
            e++;
        if (!e || !*e)
            break;
        const char *eq = strchr(*e, '=');
        size_t n = eq ? (size_t)(eq - *e) : strlen(*e);
        char *name = fuzz_strndup(*e, n);
        unsetenv(name);
        free(name);
    }
    return 0;
}

static void check_scalars(const char *s)
{
    int64_t v = -12345;
    if (config_parse_duration_ms(s, &v))
        FUZZ_ASSERT(v >= 0);
    else
        FUZZ_ASSERT(v == -12345);
    v = -12345;
    if (config_parse_bytes(s, &v))
        FUZZ_ASSERT(v >= 0);
    else
        FUZZ_ASSERT(v == -12345);
    bool b = true;
    if (!config_parse_bool(s, &b))
        FUZZ_ASSERT(b == true);
}

static bool in_range(int64_t v, int64_t lo, int64_t hi)
{
    return v >= lo && v <= hi;
}

static bool str_eq(const char *a, const char *b)
{
    return (a == NULL) == (b == NULL) && (!a || strcmp(a, b) == 0);
}

static bool one_of(const char *s, const char *const *choices)
{
    for (; *choices; choices++)
        if (strcmp(s, *choices) == 0)
            return true;
    return false;
}

static void check_config(const Config *c)
{
    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    static const char *const formats[] = {"text", "json", NULL};
    static const char *const poison[] = {"dead-letter", "stop", NULL};

    FUZZ_ASSERT(c->pg_url && c->pg_url[0] != '\0');
    FUZZ_ASSERT(c->nats_url && c->nats_url[0] != '\0');
    FUZZ_ASSERT(c->slot && in_range((int64_t)strlen(c->slot), 1, 63));
    for (const char *p = c->slot; *p; p++)
        FUZZ_ASSERT((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_');
    FUZZ_ASSERT(c->publication && in_range((int64_t)strlen(c->publication), 1, 63));
    FUZZ_ASSERT(c->ntables >= 1);
    for (size_t i = 0; i < c->ntables; i++) {
        const TableConfig *tc = &c->tables[i];
        FUZZ_ASSERT(tc->table && tc->table[0] != '\0');
        FUZZ_ASSERT(tc->subject && tc->columns && tc->body);
        SubjectTemplate *t;
        char err[256];
        FUZZ_ASSERT(subject_template_new(&t, tc->subject, err, sizeof err) == 0);
        subject_template_free(t);
        FUZZ_ASSERT(config_role_column(tc, ROLE_EVENT_ID) && config_role_column(tc, ROLE_PAYLOAD));
    }
    FUZZ_ASSERT(c->dead_letter_subject &&
                subject_is_valid(c->dead_letter_subject, strlen(c->dead_letter_subject)));
    FUZZ_ASSERT(c->checkpoint_bucket && in_range((int64_t)strlen(c->checkpoint_bucket), 1, 64));
    FUZZ_ASSERT(c->http_addr && c->http_addr[0] != '\0');
    FUZZ_ASSERT(c->on_poison && one_of(c->on_poison, poison));
    FUZZ_ASSERT(c->log_level && one_of(c->log_level, levels));
    FUZZ_ASSERT(c->log_format && one_of(c->log_format, formats));
    FUZZ_ASSERT(in_range(c->max_inflight, 1, 1048576));
    FUZZ_ASSERT(in_range(c->max_inflight_bytes, 64 * 1024, 1024 * 1024 * 1024));
    FUZZ_ASSERT(in_range(c->ack_timeout_ms, 100, 10 * 60000));
    FUZZ_ASSERT(in_range(c->status_interval_ms, 100, 3600000));
    FUZZ_ASSERT(in_range(c->shutdown_timeout_ms, 0, 10 * 60000));
    FUZZ_ASSERT(in_range(c->checkpoint_interval_ms, 100, 10 * 60000));
    FUZZ_ASSERT(in_range(c->retry_min_ms, 10, 10 * 60000));
    FUZZ_ASSERT(in_range(c->retry_max_ms, 10, 3600000));
    FUZZ_ASSERT(c->retry_min_ms <= c->retry_max_ms);
}

static bool same_config(const Config *a, const Config *b)
{
    return str_eq(a->pg_url, b->pg_url) && str_eq(a->nats_url, b->nats_url) &&
           str_eq(a->slot, b->slot) && str_eq(a->publication, b->publication) &&
           str_eq(a->t.table, b->t.table) && str_eq(a->t.subject, b->t.subject) &&
           str_eq(a->t.headers, b->t.headers) && a->ntables == b->ntables &&
           a->create == b->create && a->max_inflight == b->max_inflight &&
           a->max_inflight_bytes == b->max_inflight_bytes &&
           a->ack_timeout_ms == b->ack_timeout_ms &&
           a->status_interval_ms == b->status_interval_ms &&
           a->shutdown_timeout_ms == b->shutdown_timeout_ms &&
           a->strict_order == b->strict_order && str_eq(a->on_poison, b->on_poison) &&
           str_eq(a->dead_letter_subject, b->dead_letter_subject) &&
           str_eq(a->checkpoint_bucket, b->checkpoint_bucket) &&
           a->checkpoint_interval_ms == b->checkpoint_interval_ms &&
           a->retry_min_ms == b->retry_min_ms && a->retry_max_ms == b->retry_max_ms &&
           str_eq(a->http_addr, b->http_addr) && str_eq(a->log_level, b->log_level) &&
           str_eq(a->log_format, b->log_format);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *argv[MAX_ARGS + 1];
    int argc = 0;
    char *env[MAX_ENV];
    char *env_names[MAX_ENV];
    int nenv = 0;

    const uint8_t *p = data, *end = data + size;
    while (p < end && argc < MAX_ARGS) {
        const uint8_t *z = memchr(p, '\0', (size_t)(end - p));
        size_t n = z ? (size_t)(z - p) : (size_t)(end - p);
        if (n > 0 && p[0] == '$') {
            const uint8_t *eq = memchr(p, '=', n);
            if (eq && nenv < MAX_ENV) {
                size_t plen = strlen(ENV_PREFIX), klen = (size_t)(eq - p) - 1;
                char *s = malloc(plen + n); /* "OUTBOXD_" + "key=value" + NUL */
                if (!s)
                    abort();
                memcpy(s, ENV_PREFIX, plen);
                memcpy(s + plen, p + 1, n - 1);
                s[plen + n - 1] = '\0';
                env_names[nenv] = fuzz_strndup(s, plen + klen);
                env[nenv++] = s;
                putenv(s);
            }
        } else {
            char *a = fuzz_strndup(p, n);
            argv[argc++] = a;
            check_scalars(a);
        }
        p += n + 1;
    }
    argv[argc] = NULL;

    Config cfg;
    char err[512];
    err[0] = '\0';
    config_init(&cfg);
    int rc = config_parse(&cfg, argc, argv, err, sizeof err);
    if (rc == 0) {
        check_config(&cfg);
        Config again;
        config_init(&again);
        FUZZ_ASSERT(config_parse(&again, argc, argv, err, sizeof err) == 0);
        FUZZ_ASSERT(same_config(&cfg, &again));
        config_deinit(&again);
    } else {
        FUZZ_ASSERT(rc == -1);
        size_t n = strlen(err);
        FUZZ_ASSERT(n > 0 && fuzz_one_line(err, n));
    }
    config_deinit(&cfg);

    for (int i = 0; i < nenv; i++) {
        unsetenv(env_names[i]);
        free(env_names[i]);
    }
    for (int i = 0; i < nenv; i++)
        free(env[i]);
    for (int i = 0; i < argc; i++)
        free(argv[i]);
    return 0;
}
