/* test_config.c - the settings table: defaults, environment, flags, errors and --help. */
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "outboxd/config.h"

extern char **environ;

#define CHECK_HAS(hay, needle)                                                                     \
    do {                                                                                           \
        const char *h_ = (hay), *n_ = (needle);                                                    \
        check_count++;                                                                             \
        if (!h_ || !strstr(h_, n_)) {                                                              \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__,        \
                    h_ ? h_ : "(null)", n_);                                                       \
        }                                                                                          \
    } while (0)

#define CHECK_LACKS(hay, needle)                                                                   \
    do {                                                                                           \
        check_count++;                                                                             \
        if (strstr((hay), (needle))) {                                                             \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: \"%s\" contains \"%s\"\n", __FILE__, __LINE__, (hay),         \
                    (needle));                                                                     \
        }                                                                                          \
    } while (0)

static char err[512];

/* Removes every OUTBOXD_* variable, so each test starts from a clean environment. */
static void clear_env(void)
{
    for (;;) {
        char name[256] = "";
        for (char **e = environ; e && *e; e++) {
            if (strncmp(*e, "OUTBOXD_", 8) == 0) {
                size_t n = strcspn(*e, "=");
                if (n < sizeof name) {
                    memcpy(name, *e, n);
                    name[n] = '\0';
                }
                break;
            }
        }
        if (!name[0])
            return;
        unsetenv(name);
    }
}

/* config_init + config_parse of a NULL-terminated argument list; returns config_parse's result.
 * cfg must be deinit'ed by the caller. */
static int parse(Config *cfg, ...)
{
    char *argv[32];
    int argc = 0;
    va_list ap;
    va_start(ap, cfg);
    for (char *a; (a = va_arg(ap, char *)) != NULL && argc < 32;)
        argv[argc++] = a;
    va_end(ap);
    config_init(cfg);
    err[0] = '\0';
    return config_parse(cfg, argc, argv, err, sizeof err);
}

/* parse() expected to fail; returns err for substring checks. */
static const char *parse_fails(Config *cfg, int line, ...)
{
    char *argv[32];
    int argc = 0;
    va_list ap;
    va_start(ap, line);
    for (char *a; (a = va_arg(ap, char *)) != NULL && argc < 32;)
        argv[argc++] = a;
    va_end(ap);
    config_init(cfg);
    strcpy(err, "(no error)");
    int rc = config_parse(cfg, argc, argv, err, sizeof err);
    check_count++;
    if (rc != -1) {
        check_failures++;
        fprintf(stderr, "%s:%d: config_parse succeeded, expected an error\n", __FILE__, line);
    }
    /* one line */
    check_count++;
    if (strchr(err, '\n')) {
        check_failures++;
        fprintf(stderr, "%s:%d: error has a newline: %s\n", __FILE__, line, err);
    }
    config_deinit(cfg);
    return err;
}

#define FAILS(...) parse_fails(&cfg, __LINE__, __VA_ARGS__, (char *)NULL)
#define PG "--pg-url=postgresql://u@h/db"

static void test_defaults(void)
{
    Config cfg;
    config_init(&cfg);
    CHECK(cfg.pg_url == NULL);
    CHECK_STR(cfg.nats_url, "nats://127.0.0.1:4222");
    CHECK_STR(cfg.slot, "outboxd");
    CHECK_STR(cfg.publication, "outboxd");
    CHECK_STR(cfg.t.table, "public.outbox");
    CHECK_STR(cfg.t.subject, "outbox.{aggregate_type}.{event_type}");
    CHECK(cfg.create == true);
    CHECK(cfg.max_inflight == 4096);
    CHECK(cfg.max_inflight_bytes == 16 * 1024 * 1024);
    CHECK(cfg.ack_timeout_ms == 10000);
    CHECK(cfg.status_interval_ms == 10000);
    CHECK(cfg.shutdown_timeout_ms == 5000);
    CHECK(cfg.pg_receive_timeout_ms == 60000);
    CHECK(cfg.nats_ping_interval_ms == 10000);
    CHECK_STR(cfg.slot_recovery, "manual");
    CHECK(cfg.recovery_margin_ms == 600000);
    CHECK_STR(cfg.log_level, "info");
    CHECK_STR(cfg.log_format, "text");
    CHECK(cfg.strict_order == true);
    CHECK_STR(cfg.on_poison, "dead-letter");
    CHECK_STR(cfg.dead_letter_subject, "outbox.dead_letter");
    CHECK_STR(cfg.checkpoint_bucket, "outboxd");
    CHECK(cfg.checkpoint_interval_ms == 1000);
    CHECK(cfg.retry_min_ms == 100 && cfg.retry_max_ms == 10000);
    CHECK_STR(cfg.http_addr, ":9847");
    config_deinit(&cfg);
    CHECK(cfg.slot == NULL && cfg.log_level == NULL);
    config_deinit(&cfg); /* twice is harmless */

    /* Only pg_url is required. */
    CHECK(parse(&cfg, PG, (char *)NULL) == 0);
    CHECK_STR(cfg.pg_url, "postgresql://u@h/db");
    CHECK_STR(cfg.slot, "outboxd");
    config_deinit(&cfg);
}

static void test_env_and_flags(void)
{
    Config cfg;
    clear_env();
    setenv("OUTBOXD_PG_URL", "host=/tmp dbname=x", 1);
    setenv("OUTBOXD_SLOT", "from_env", 1);
    setenv("OUTBOXD_MAX_INFLIGHT", "100", 1);
    setenv("OUTBOXD_ACK_TIMEOUT", "2m", 1);
    setenv("OUTBOXD_MAX_INFLIGHT_BYTES", "1MiB", 1);
    setenv("OUTBOXD_CREATE", "no", 1);
    setenv("OUTBOXD_LOG_LEVEL", "WARN", 1);
    CHECK(parse(&cfg, (char *)NULL) == 0);
    CHECK_STR(err, "");
    CHECK_STR(cfg.pg_url, "host=/tmp dbname=x");
    CHECK_STR(cfg.slot, "from_env");
    CHECK(cfg.max_inflight == 100);
    CHECK(cfg.ack_timeout_ms == 120000);
    CHECK(cfg.max_inflight_bytes == 1024 * 1024);
    CHECK(cfg.create == false);
    CHECK_STR(cfg.log_level, "warn"); /* stored in the table's spelling */
    config_deinit(&cfg);

    /* Flags beat the environment; both flag forms; later flags beat earlier ones. */
    CHECK(parse(&cfg, "--slot", "from_flag", "--max-inflight=7", "--ack-timeout", "500ms",
                "--log-format", "json", "--status-interval=1h", "--shutdown-timeout=0",
                "--nats-url", "nats://a:1,nats://b:2", "--table=app.events",
                "--publication", "pub", "--subject", "ev.{type}", "--slot=second",
                "--create", "--pg-receive-timeout=0", "--nats-ping-interval=1500ms",
                (char *)NULL) == 0);
    CHECK_STR(err, "");
    CHECK_STR(cfg.pg_url, "host=/tmp dbname=x");
    CHECK_STR(cfg.slot, "second");
    CHECK(cfg.max_inflight == 7);
    CHECK(cfg.ack_timeout_ms == 500);
    CHECK(cfg.status_interval_ms == 3600000);
    CHECK(cfg.shutdown_timeout_ms == 0);
    CHECK(cfg.pg_receive_timeout_ms == 0); /* 0 turns the receive timeout off */
    CHECK(cfg.nats_ping_interval_ms == 1500);
    CHECK_STR(cfg.log_format, "json");
    CHECK_STR(cfg.nats_url, "nats://a:1,nats://b:2");
    CHECK_STR(cfg.t.table, "app.events");
    CHECK_STR(cfg.publication, "pub");
    CHECK_STR(cfg.t.subject, "ev.{type}");
    CHECK(cfg.create == true);
    config_deinit(&cfg);

    /* An empty environment variable is a value, and checked like one. */
    setenv("OUTBOXD_SLOT", "", 1);
    const char *e = FAILS(PG);
    CHECK_HAS(e, "invalid value '' for --slot (OUTBOXD_SLOT)");
    clear_env();
}

static void test_bool_forms(void)
{
    Config cfg;
    clear_env();
    static const struct {
        const char *arg;
        bool want;
    } cases[] = {
        {"--create", true},         {"--no-create", false},    {"--create=false", false},
        {"--create=true", true},    {"--create=no", false},    {"--create=YES", true},
        {"--create=off", false},    {"--create=On", true},     {"--create=0", false},
        {"--create=1", true},       {"--create=FALSE", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        /* start from the opposite value so the flag has to change it */
        setenv("OUTBOXD_CREATE", cases[i].want ? "false" : "true", 1);
        CHECK(parse(&cfg, PG, (char *)cases[i].arg, (char *)NULL) == 0);
        CHECK(cfg.create == cases[i].want);
        config_deinit(&cfg);
    }
    clear_env();

    /* A bool flag never takes the next argument. */
    const char *e = FAILS(PG, "--create", "false");
    CHECK_STR(e, "unexpected argument 'false' (see outboxd --help)");
    e = FAILS(PG, "--create=maybe");
    CHECK_HAS(e, "invalid value 'maybe' for --create (OUTBOXD_CREATE): expected true or false");
    e = FAILS(PG, "--create=");
    CHECK_HAS(e, "invalid value '' for --create");
    e = FAILS(PG, "--no-create=true");
    CHECK_STR(e, "option --no-create takes no value");
    /* --no- only for bools */
    e = FAILS(PG, "--no-slot");
    CHECK_STR(e, "unknown option --no-slot (see outboxd --help)");

    bool b = true;
    CHECK(config_parse_bool("TRUE", &b) && b);
    CHECK(config_parse_bool("Off", &b) && !b);
    CHECK(!config_parse_bool("", &b));
    CHECK(!config_parse_bool("truee", &b));
    CHECK(!config_parse_bool(" true", &b));
    CHECK(!config_parse_bool("2", &b));
    CHECK(!config_parse_bool(NULL, &b));
}

static void test_durations_bytes(void)
{
    int64_t v;
    CHECK(config_parse_duration_ms("500ms", &v) && v == 500);
    CHECK(config_parse_duration_ms("5s", &v) && v == 5000);
    CHECK(config_parse_duration_ms("2m", &v) && v == 120000);
    CHECK(config_parse_duration_ms("1h", &v) && v == 3600000);
    CHECK(config_parse_duration_ms("250", &v) && v == 250);
    CHECK(config_parse_duration_ms("0", &v) && v == 0);
    CHECK(config_parse_duration_ms("0s", &v) && v == 0);
    CHECK(config_parse_duration_ms("007s", &v) && v == 7000);
    CHECK(config_parse_duration_ms("9223372036854775807", &v) && v == INT64_MAX);
    v = 42;
    CHECK(!config_parse_duration_ms("", &v));
    CHECK(!config_parse_duration_ms(NULL, &v));
    CHECK(!config_parse_duration_ms("s", &v));
    CHECK(!config_parse_duration_ms("-1s", &v));
    CHECK(!config_parse_duration_ms("+1s", &v));
    CHECK(!config_parse_duration_ms("1.5s", &v));
    CHECK(!config_parse_duration_ms("10 s", &v));
    CHECK(!config_parse_duration_ms(" 10s", &v));
    CHECK(!config_parse_duration_ms("10s ", &v));
    CHECK(!config_parse_duration_ms("10sec", &v));
    CHECK(!config_parse_duration_ms("10S", &v));
    CHECK(!config_parse_duration_ms("1h30m", &v));
    CHECK(!config_parse_duration_ms("abc", &v));
    CHECK(!config_parse_duration_ms("9223372036854775808", &v));
    CHECK(!config_parse_duration_ms("9223372036854776s", &v)); /* * 1000 overflows */
    CHECK(!config_parse_duration_ms("99999999999999999999999h", &v));
    CHECK(v == 42); /* untouched on failure */

    CHECK(config_parse_bytes("512", &v) && v == 512);
    CHECK(config_parse_bytes("512B", &v) && v == 512);
    CHECK(config_parse_bytes("64KiB", &v) && v == 65536);
    CHECK(config_parse_bytes("8MiB", &v) && v == 8 * 1024 * 1024);
    CHECK(config_parse_bytes("1GiB", &v) && v == 1024 * 1024 * 1024);
    CHECK(config_parse_bytes("2TiB", &v) && v == INT64_C(2) << 40);
    CHECK(config_parse_bytes("1kB", &v) && v == 1000);
    CHECK(config_parse_bytes("3MB", &v) && v == 3000000);
    CHECK(config_parse_bytes("1GB", &v) && v == 1000000000);
    CHECK(config_parse_bytes("16mib", &v) && v == 16 * 1024 * 1024);
    CHECK(config_parse_bytes("0", &v) && v == 0);
    v = 42;
    CHECK(!config_parse_bytes("", &v));
    CHECK(!config_parse_bytes(NULL, &v));
    CHECK(!config_parse_bytes("-1", &v));
    CHECK(!config_parse_bytes("1.5MiB", &v));
    CHECK(!config_parse_bytes("16 MiB", &v));
    CHECK(!config_parse_bytes("16MiBx", &v));
    CHECK(!config_parse_bytes("16Mi", &v));
    CHECK(!config_parse_bytes("16M", &v));
    CHECK(!config_parse_bytes("MiB", &v));
    CHECK(!config_parse_bytes("9223372036854775807KiB", &v));
    CHECK(!config_parse_bytes("99999999999999999999", &v));
    CHECK(v == 42);
}

static void test_value_errors(void)
{
    Config cfg;
    clear_env();
    const char *e;

    e = FAILS(PG, "--ack-timeout", "abc");
    CHECK_STR(e, "invalid value 'abc' for --ack-timeout (OUTBOXD_ACK_TIMEOUT): expected a duration "
                 "such as 500ms, 10s or 2m");
    e = FAILS(PG, "--ack-timeout=1h");
    CHECK_STR(e, "invalid value '1h' for --ack-timeout (OUTBOXD_ACK_TIMEOUT): must be between "
                 "100ms and 10m");
    e = FAILS(PG, "--ack-timeout=99");
    CHECK_HAS(e, "must be between 100ms and 10m");
    e = FAILS(PG, "--status-interval=2h");
    CHECK_HAS(e, "--status-interval (OUTBOXD_STATUS_INTERVAL): must be between 100ms and 1h");
    e = FAILS(PG, "--shutdown-timeout=11m");
    CHECK_HAS(e, "must be between 0s and 10m");
    e = FAILS(PG, "--max-inflight=0");
    CHECK_STR(e, "invalid value '0' for --max-inflight (OUTBOXD_MAX_INFLIGHT): must be between 1 "
                 "and 1048576");
    e = FAILS(PG, "--max-inflight=1048577");
    CHECK_HAS(e, "must be between 1 and 1048576");
    e = FAILS(PG, "--max-inflight=-5");
    CHECK_HAS(e, "invalid value '-5' for --max-inflight (OUTBOXD_MAX_INFLIGHT): expected a whole "
                 "number");
    e = FAILS(PG, "--max-inflight=12k");
    CHECK_HAS(e, "expected a whole number");
    e = FAILS(PG, "--max-inflight=");
    CHECK_HAS(e, "expected a whole number");
    e = FAILS(PG, "--max-inflight-bytes=1KiB");
    CHECK_STR(e, "invalid value '1KiB' for --max-inflight-bytes (OUTBOXD_MAX_INFLIGHT_BYTES): must "
                 "be between 64KiB and 1GiB");
    e = FAILS(PG, "--max-inflight-bytes=lots");
    CHECK_HAS(e, "expected a size such as 512KiB, 16MiB or 1GiB");
    e = FAILS(PG, "--log-level=verbose");
    CHECK_STR(e, "invalid value 'verbose' for --log-level (OUTBOXD_LOG_LEVEL): expected one of "
                 "debug, info, warn, error");
    e = FAILS(PG, "--log-format=xml");
    CHECK_HAS(e, "expected one of text, json");

    /* bounds themselves are accepted */
    CHECK(parse(&cfg, PG, "--ack-timeout=100ms", "--max-inflight=1048576",
                "--max-inflight-bytes=64KiB", "--shutdown-timeout=0s", (char *)NULL) == 0);
    CHECK(cfg.ack_timeout_ms == 100 && cfg.max_inflight == 1048576);
    CHECK(cfg.max_inflight_bytes == 65536 && cfg.shutdown_timeout_ms == 0);
    config_deinit(&cfg);
    CHECK(parse(&cfg, PG, "--ack-timeout=10m", "--max-inflight-bytes=1GiB", (char *)NULL) == 0);
    CHECK(cfg.ack_timeout_ms == 600000 && cfg.max_inflight_bytes == 1073741824);
    config_deinit(&cfg);

    /* the same message from the environment */
    setenv("OUTBOXD_ACK_TIMEOUT", "soon", 1);
    e = FAILS(PG);
    CHECK_HAS(e, "invalid value 'soon' for --ack-timeout (OUTBOXD_ACK_TIMEOUT)");
    clear_env();
}

static void test_string_checks(void)
{
    Config cfg;
    clear_env();
    const char *e;
    char long64[65];
    memset(long64, 'a', 64);
    long64[64] = '\0';
    char flag[80];

    CHECK(parse(&cfg, PG, "--slot=my_slot_2", (char *)NULL) == 0);
    config_deinit(&cfg);
    snprintf(flag, sizeof flag, "--slot=%.63s", long64);
    CHECK(parse(&cfg, PG, flag, (char *)NULL) == 0);
    config_deinit(&cfg);
    snprintf(flag, sizeof flag, "--slot=%s", long64);
    e = FAILS(PG, flag);
    CHECK_HAS(e, "for --slot (OUTBOXD_SLOT): expected 1 to 63 characters of a-z, 0-9 and _");
    e = FAILS(PG, "--slot=My-Slot");
    CHECK_STR(e, "invalid value 'My-Slot' for --slot (OUTBOXD_SLOT): expected 1 to 63 characters "
                 "of a-z, 0-9 and _");
    e = FAILS(PG, "--slot=");
    CHECK_HAS(e, "--slot (OUTBOXD_SLOT)");

    CHECK(parse(&cfg, PG, "--publication=Any Name-ok", (char *)NULL) == 0);
    config_deinit(&cfg);
    snprintf(flag, sizeof flag, "--publication=%s", long64);
    e = FAILS(PG, flag);
    CHECK_HAS(e, "for --publication (OUTBOXD_PUBLICATION): expected a name of 1 to 63 bytes");
    e = FAILS(PG, "--publication=");
    CHECK_HAS(e, "--publication (OUTBOXD_PUBLICATION)");

    e = FAILS(PG, "--table=");
    CHECK_STR(e, "invalid value '' for --table (OUTBOXD_TABLE): expected a non-empty value");
    e = FAILS(PG, "--nats-url=");
    CHECK_HAS(e, "--nats-url (OUTBOXD_NATS_URL)");

    e = FAILS(PG, "--subject=a.{b");
    CHECK_STR(e, "invalid value 'a.{b' for --subject (OUTBOXD_SUBJECT): unclosed '{'");
    e = FAILS(PG, "--subject", "outbox..x");
    CHECK_STR(e, "invalid value 'outbox..x' for --subject (OUTBOXD_SUBJECT): empty token");
    /* An echoed value stays on one line and within reason. */
    e = FAILS(PG, "--slot=a\nb");
    CHECK_HAS(e, "invalid value 'a?b' for --slot");
    char huge[300];
    memset(huge, 'x', sizeof huge - 1);
    huge[sizeof huge - 1] = '\0';
    e = FAILS(PG, "--log-level", huge);
    CHECK_HAS(e, "xxx...' for --log-level (OUTBOXD_LOG_LEVEL): expected one of");

    e = FAILS(PG, "--subject=orders.*");
    CHECK_HAS(e, "--subject (OUTBOXD_SUBJECT): wildcard '*' not allowed");
    clear_env();
}

static void test_argument_errors(void)
{
    Config cfg;
    clear_env();
    const char *e;
    e = FAILS(PG, "--foo");
    CHECK_STR(e, "unknown option --foo (see outboxd --help)");
    e = FAILS(PG, "--foo=bar");
    CHECK_STR(e, "unknown option --foo (see outboxd --help)");
    e = FAILS(PG, "--pg_url=x"); /* flags are kebab-case only */
    CHECK_STR(e, "unknown option --pg_url (see outboxd --help)");
    e = FAILS(PG, "-s");
    CHECK_STR(e, "unknown option -s (see outboxd --help)");
    e = FAILS(PG, "x");
    CHECK_STR(e, "unexpected argument 'x' (see outboxd --help)");
    e = FAILS(PG, "-");
    CHECK_STR(e, "unexpected argument '-' (see outboxd --help)");
    e = FAILS(PG, "--", "y");
    CHECK_STR(e, "unexpected argument 'y' (see outboxd --help)");
    e = FAILS(PG, "--slot");
    CHECK_STR(e, "option --slot needs a value");
    e = FAILS(PG, "--slot", "--create");
    CHECK_STR(e, "option --slot needs a value");
    e = FAILS("--pg-url");
    CHECK_STR(e, "option --pg-url needs a value");

    /* "--" with nothing after it is fine; so is --key=--value */
    CHECK(parse(&cfg, PG, "--table=--x", "--", (char *)NULL) == 0);
    CHECK_STR(cfg.t.table, "--x");
    config_deinit(&cfg);

    e = FAILS("--slot=x");
    CHECK_STR(e, "missing setting: --pg-url or OUTBOXD_PG_URL (the PostgreSQL connection string, "
                 "e.g. postgresql://user@host/db)");

    /* A typo in the environment is an error naming the variable, not its value. */
    setenv("OUTBOXD_SLTO", "secret-ish", 1);
    e = FAILS(PG);
    CHECK_STR(e, "unknown environment variable OUTBOXD_SLTO (see outboxd --help)");
    clear_env();
    setenv("OUTBOXD_", "", 1);
    e = FAILS(PG);
    CHECK_HAS(e, "unknown environment variable OUTBOXD_ ");
    clear_env();
    setenv("OUTBOXD_pg_url", "x", 1); /* names are upper-case */
    e = FAILS(PG);
    CHECK_HAS(e, "unknown environment variable OUTBOXD_pg_url");
    clear_env();
    /* other prefixes are none of our business */
    setenv("OUTBOXDX", "1", 1);
    setenv("XOUTBOXD_SLOT", "1", 1);
    CHECK(parse(&cfg, PG, (char *)NULL) == 0);
    config_deinit(&cfg);
    unsetenv("OUTBOXDX");
    unsetenv("XOUTBOXD_SLOT");
}

static void test_secret_not_echoed(void)
{
    Config cfg;
    clear_env();
    const char *e;
    e = FAILS("--pg-url=");
    CHECK_STR(e, "invalid value for --pg-url (OUTBOXD_PG_URL): expected a non-empty value");
    setenv("OUTBOXD_PG_URL", "", 1);
    e = FAILS("--slot=x");
    CHECK_STR(e, "invalid value for --pg-url (OUTBOXD_PG_URL): expected a non-empty value");
    clear_env();
    /* a password given to a mistyped flag */
    e = FAILS("--pg-uri=postgresql://u:hunter2@h/db");
    CHECK_STR(e, "unknown option --pg-uri (see outboxd --help)");
    CHECK_LACKS(e, "hunter2");
    setenv("OUTBOXD_PG_URI", "postgresql://u:hunter2@h/db", 1);
    e = FAILS("--pg-url=postgresql://u:hunter2@h/db");
    CHECK_LACKS(e, "hunter2");
    clear_env();
    /* other errors after a good pg_url do not mention it */
    e = FAILS("--pg-url=postgresql://u:hunter2@h/db", "--ack-timeout=x");
    CHECK_LACKS(e, "hunter2");
}

/* A failed parse leaves the last good values, and replacing strings does not leak (valgrind). */
static void test_failure_settings(void)
{
    Config cfg;
    CHECK(parse(&cfg, PG, "--on-poison=stop", "--strict-order=false", "--retry-min=1s",
                "--retry-max=1s", "--dead-letter-subject=dlq.events", (char *)NULL) == 0);
    CHECK_STR(cfg.on_poison, "stop");
    CHECK(cfg.strict_order == false);
    CHECK(cfg.retry_min_ms == 1000 && cfg.retry_max_ms == 1000);
    CHECK_STR(cfg.dead_letter_subject, "dlq.events");
    config_deinit(&cfg);

    const char *e = FAILS(PG, "--on-poison=drop");
    CHECK(strstr(e, "--on-poison") && strstr(e, "dead-letter") && strstr(e, "stop"));
    e = FAILS(PG, "--retry-min=5s", "--retry-max=1s");
    CHECK(strstr(e, "--retry-min") && strstr(e, "--retry-max"));
    e = FAILS(PG, "--dead-letter-subject=dlq.>");
    CHECK(strstr(e, "--dead-letter-subject") && strstr(e, "no wildcards"));
    e = FAILS(PG, "--dead-letter-subject=dlq.{event_type}");
    CHECK(strstr(e, "--dead-letter-subject") != NULL);
    e = FAILS(PG, "--checkpoint-bucket=a.b");
    CHECK(strstr(e, "--checkpoint-bucket") && strstr(e, "letters, digits"));
}

/* Writes text to a fresh temporary file; returns its path (static buffer). */
static const char *write_conf(const char *text)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/outboxd-test-conf-XXXXXX");
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    FILE *f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);
    return path;
}

/* The error of a parse with a settings file holding text (and --pg-url). */
static const char *conf_error(Config *cfg, const char *text, int line)
{
    const char *path = write_conf(text);
    char flag[128];
    snprintf(flag, sizeof flag, "--config=%s", path);
    const char *e = parse_fails(cfg, line, flag, PG, (char *)NULL);
    unlink(path);
    return e;
}

static void test_kubernetes_service_variables_are_not_typos(void)
{
    Config cfg;
    const char *k8s[] = {"OUTBOXD_SERVICE_HOST", "OUTBOXD_SERVICE_PORT", "OUTBOXD_PORT",
                         "OUTBOXD_PORT_9847_TCP", "OUTBOXD_PORT_9847_TCP_ADDR",
                         "OUTBOXD_METRICS_SERVICE_PORT_HTTP", "OUTBOXD_METRICS_PORT_9847_TCP_PROTO"};
    for (size_t i = 0; i < sizeof(k8s) / sizeof(k8s[0]); i++) {
        setenv(k8s[i], "tcp://10.0.0.1:9847", 1);
        CHECK(parse(&cfg, PG, (char *)NULL) == 0);
        config_deinit(&cfg);
        unsetenv(k8s[i]);
    }
    const char *typos[] = {"OUTBOXD_PORTS", "OUTBOXD_NATS_PORT_X", "OUTBOXD_SLTO"};
    for (size_t i = 0; i < sizeof(typos) / sizeof(typos[0]); i++) {
        setenv(typos[i], "x", 1);
        const char *e = FAILS(PG);
        CHECK(strstr(e, typos[i]) != NULL);
        unsetenv(typos[i]);
    }
}

static void test_settings_file(void)
{
    Config cfg;
    const char *path = write_conf("# outboxd settings\n"
                                  "\n"
                                  "  slot = from_file  \n"
                                  "nats_url = nats://file:4222\n"
                                  "publication = \"pub \\\"quoted\\\"\"\n"
                                  "ack_timeout = 3s\n"
                                  "create = false\n");
    char flag[128];
    snprintf(flag, sizeof flag, "--config=%s", path);
    /* file > default */
    CHECK(parse(&cfg, PG, flag, (char *)NULL) == 0);
    CHECK_STR(cfg.slot, "from_file");
    CHECK_STR(cfg.nats_url, "nats://file:4222");
    CHECK_STR(cfg.publication, "pub \"quoted\"");
    CHECK(cfg.ack_timeout_ms == 3000 && cfg.create == false);
    CHECK_STR(cfg.config_file, path);
    config_deinit(&cfg);
    /* env > file, flag > env */
    setenv("OUTBOXD_SLOT", "from_env", 1);
    setenv("OUTBOXD_ACK_TIMEOUT", "4s", 1);
    CHECK(parse(&cfg, PG, flag, "--slot=from_flag", (char *)NULL) == 0);
    CHECK_STR(cfg.slot, "from_flag");
    CHECK(cfg.ack_timeout_ms == 4000);
    CHECK_STR(cfg.nats_url, "nats://file:4222");
    config_deinit(&cfg);
    unsetenv("OUTBOXD_SLOT");
    unsetenv("OUTBOXD_ACK_TIMEOUT");
    /* OUTBOXD_CONFIG names the file too */
    setenv("OUTBOXD_CONFIG", path, 1);
    CHECK(parse(&cfg, PG, (char *)NULL) == 0);
    CHECK_STR(cfg.slot, "from_file");
    config_deinit(&cfg);
    unsetenv("OUTBOXD_CONFIG");
    unlink(path);

    /* errors name the file and the line, and never echo a secret */
    path = write_conf("slot = ok\nsloot = typo\n");
    snprintf(flag, sizeof flag, "--config=%s", path);
    const char *e = FAILS(flag, PG);
    CHECK(strstr(e, ":2: unknown setting 'sloot'") != NULL);
    unlink(path);
    e = conf_error(&cfg, "ack_timeout = soon\n", __LINE__);
    CHECK(strstr(e, ":1: invalid value 'soon' for --ack-timeout") != NULL);
    path = write_conf("pg_url = \"postgresql://u:hunter2@h/db\n");
    snprintf(flag, sizeof flag, "--config=%s", path);
    e = FAILS(flag);
    CHECK(strstr(e, "unbalanced quote") != NULL && strstr(e, "hunter2") == NULL);
    unlink(path);
    e = conf_error(&cfg, "just words\n", __LINE__);
    CHECK(strstr(e, ":1: expected key = value") != NULL);
    e = FAILS("--config=/nonexistent/outboxd.conf", PG);
    CHECK(strstr(e, "could not read settings file /nonexistent/outboxd.conf") != NULL);
}

static void test_failed_parse_keeps_cfg(void)
{
    Config cfg;
    clear_env();
    config_init(&cfg);
    char *argv[] = {"--slot=good", "--slot=good2", "--max-inflight=9", "--slot=Bad!"};
    CHECK(config_parse(&cfg, 4, argv, err, sizeof err) == -1);
    CHECK_STR(cfg.slot, "good2");
    CHECK(cfg.max_inflight == 9);
    config_deinit(&cfg);

    /* a tiny or absent error buffer */
    config_init(&cfg);
    char small[10];
    char *argv2[] = {"--bogus"};
    CHECK(config_parse(&cfg, 1, argv2, small, sizeof small) == -1);
    CHECK(strlen(small) == sizeof small - 1);
    CHECK(config_parse(&cfg, 1, argv2, NULL, 0) == -1);
    config_deinit(&cfg);
}

static void test_help(void)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    CHECK(f != NULL);
    if (!f)
        return;
    config_print_help(f);
    fclose(f);

    static const char *const flags[] = {
        "--pg-url URL ",       "--nats-url URLS ",         "--slot NAME ",
        "--publication NAME ", "--table TABLE ",           "--subject TEMPLATE ",
        "--create[=BOOL] ",    "--max-inflight N ",        "--max-inflight-bytes BYTES ",
        "--ack-timeout DURATION ", "--status-interval DURATION ", "--shutdown-timeout DURATION ",
        "--log-level LEVEL ",  "--log-format FORMAT ",
    };
    static const char *const envs[] = {
        "env: OUTBOXD_PG_URL\n",           "env: OUTBOXD_NATS_URL\n",
        "env: OUTBOXD_SLOT\n",             "env: OUTBOXD_PUBLICATION\n",
        "env: OUTBOXD_TABLE\n",            "env: OUTBOXD_SUBJECT\n",
        "env: OUTBOXD_CREATE\n",           "env: OUTBOXD_MAX_INFLIGHT\n",
        "env: OUTBOXD_MAX_INFLIGHT_BYTES\n", "env: OUTBOXD_ACK_TIMEOUT\n",
        "env: OUTBOXD_STATUS_INTERVAL\n",  "env: OUTBOXD_SHUTDOWN_TIMEOUT\n",
        "env: OUTBOXD_LOG_LEVEL\n",        "env: OUTBOXD_LOG_FORMAT\n",
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        CHECK_HAS(text, flags[i]);
    for (size_t i = 0; i < sizeof envs / sizeof envs[0]; i++)
        CHECK_HAS(text, envs[i]);
    CHECK_HAS(text, "(default: nats://127.0.0.1:4222)");
    CHECK_HAS(text, "(default: 16MiB)");
    CHECK_HAS(text, "(default: outbox.{aggregate_type}.{event_type})");
    CHECK_HAS(text, "outboxd adds replication=database (required)");
    CHECK_HAS(text, "(one of debug, info, warn, error; default: info)");

    /* two lines per setting, help columns aligned */
    int lines = 0;
    long col = -1;
    int nflags = 0;
    bool aligned = true;
    for (char *line = text; line && *line;) {
        char *nl = strchr(line, '\n');
        if (strncmp(line, "  --", 4) == 0) {
            char *gap = strstr(line, "   ");
            char *help = gap;
            while (help && *help == ' ')
                help++;
            long c = help ? (long)(help - line) : -1;
            if (col < 0)
                col = c;
            aligned = aligned && c == col;
        }
        lines++;
        if (strncmp(line, "  --", 4) == 0)
            nflags++;
        line = nl ? nl + 1 : NULL;
    }
    CHECK(nflags >= 20);
    CHECK(lines == 2 * nflags); /* a flag line and an env line per setting */
    CHECK(aligned);
    free(text);
}

/* Column roles, extra headers and [table] sections. */
static void test_tables(void)
{
    Config cfg;
    /* One table from the top level; --header repeats add up, a later source replaces. */
    CHECK(parse(&cfg, PG, "--columns=debezium", "--column-occurred-at=created_at",
                "--header=tenant:Tenant-Id", "--header", "region:Region", (char *)NULL) == 0);
    CHECK(cfg.ntables == 1);
    CHECK_STR(cfg.tables[0].table, "public.outbox");
    CHECK_STR(cfg.tables[0].headers, "tenant:Tenant-Id,region:Region");
    CHECK_STR(config_role_column(&cfg.tables[0], ROLE_EVENT_ID), "id");
    CHECK_STR(config_role_column(&cfg.tables[0], ROLE_AGGREGATE_TYPE), "aggregatetype");
    CHECK_STR(config_role_column(&cfg.tables[0], ROLE_OCCURRED_AT), "created_at");
    CHECK(config_role_column(&cfg.tables[0], ROLE_TRACE_ID) == NULL);
    CHECK(cfg.messages && strcmp(cfg.message_prefix, "outbox") == 0);
    config_deinit(&cfg);
    CHECK(parse(&cfg, PG, (char *)NULL) == 0);
    CHECK_STR(config_role_column(&cfg.tables[0], ROLE_EVENT_ID), "event_id");
    CHECK_STR(cfg.tables[0].body, "payload");
    config_deinit(&cfg);

    const char *e = FAILS(PG, "--header=tenant");
    CHECK(strstr(e, "COLUMN:Header-Name") != NULL);
    e = FAILS(PG, "--header=x:Nats-Expected-Stream");
    CHECK(strstr(e, "reserved") != NULL);
    e = FAILS(PG, "--columns=kafka");
    CHECK(strstr(e, "outboxd, debezium") != NULL);
    e = FAILS(PG, "--body=xml");
    CHECK(strstr(e, "payload, envelope") != NULL);

    /* Sections: each table inherits the top-level per-table values it does not set. */
    const char *path = write_conf("subject = \"all.{event_type}\"\n"
                                  "header = tenant:Tenant-Id\n"
                                  "[table orders_outbox]\n"
                                  "subject = orders.{aggregate_id}\n"
                                  "[table \"billing.outbox\"]\n"
                                  "columns = debezium\n"
                                  "body = envelope\n"
                                  "header = a:A\n"
                                  "header = b:B\n");
    char flag[128];
    snprintf(flag, sizeof flag, "--config=%s", path);
    CHECK(parse(&cfg, PG, flag, (char *)NULL) == 0);
    CHECK(cfg.ntables == 2);
    CHECK_STR(cfg.tables[0].table, "orders_outbox");
    CHECK_STR(cfg.tables[0].subject, "orders.{aggregate_id}");
    CHECK_STR(cfg.tables[0].headers, "tenant:Tenant-Id");
    CHECK_STR(cfg.tables[0].columns, "outboxd");
    CHECK_STR(cfg.tables[1].table, "billing.outbox");
    CHECK_STR(cfg.tables[1].subject, "all.{event_type}");
    CHECK_STR(cfg.tables[1].headers, "a:A,b:B");
    CHECK_STR(cfg.tables[1].body, "envelope");
    CHECK_STR(config_role_column(&cfg.tables[1], ROLE_EVENT_ID), "id");
    config_deinit(&cfg);
    /* --table next to sections is a contradiction */
    e = FAILS(flag, PG, "--table=x");
    CHECK(strstr(e, "[table] sections") != NULL);
    unlink(path);

    e = conf_error(&cfg, "[table a]\nslot = s\n", __LINE__);
    CHECK(strstr(e, ":2: slot is not a per-table setting") != NULL);
    e = conf_error(&cfg, "[table a]\n[table public.a]\n", __LINE__);
    CHECK(strstr(e, ":2: table public.a has a section already") != NULL);
    e = conf_error(&cfg, "[tables a]\n", __LINE__);
    CHECK(strstr(e, ":1: expected a section header") != NULL);
}

int main(void)
{
    clear_env();
    test_defaults();
    test_failure_settings();
    test_settings_file();
    test_tables();
    test_kubernetes_service_variables_are_not_typos();
    test_env_and_flags();
    test_bool_forms();
    test_durations_bytes();
    test_value_errors();
    test_string_checks();
    test_argument_errors();
    test_secret_not_echoed();
    test_failed_parse_keeps_cfg();
    test_help();
    clear_env();
    return check_report("test_config");
}
