/*
 * main.c - outboxd's command line: subcommands, settings, signals.
 *
 *   outboxd [run] [settings]                    relay committed outbox inserts (the default)
 *   outboxd status [--json] [--max-lag BYTES] [settings]
 *   outboxd setup [--apply] [--role NAME] [--stream NAME] [--stream-replicas N] [settings]
 *   outboxd doctor [--json] [settings]
 *   outboxd replay [--since TIME] [--until TIME] [--aggregate-id ID] [--event-type T]
 *                  [--new-ids] [--dry-run] [--rate N] [settings]
 *   outboxd slot list [--json] | create | advance (--to LSN | --past-commit LSN) [--yes]
 *                | drop [--with-bookmarks | --bookmarks-only] [--yes]   [settings]
 *   outboxd rewind --to TIME|LSN [--yes] [settings]
 *   outboxd recover [--yes] [settings]
 *   outboxd prune --older-than AGE [--batch N] [--wait DURATION] [--dry-run] [settings]
 *   outboxd audit [--since TIME] [--until TIME] [--json] [--wait DURATION] [settings]
 *   outboxd health [--ready] [--timeout DURATION] [settings]
 *   outboxd --help | --version
 *
 * Signal handlers only set a flag; the relay's loop notices it within one wait.
 */
#include <jansson.h>
#include <libpq-fe.h>
#include <microhttpd.h>
#include <nats/nats.h>
#include <openssl/crypto.h>
#include <openssl/opensslv.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outboxd/audit.h"
#include "outboxd/config.h"
#include "outboxd/health.h"
#include "outboxd/jetstream.h"
#include "outboxd/log.h"
#include "outboxd/pgstream.h"
#include "outboxd/prune.h"
#include "outboxd/relay.h"
#include "outboxd/replay.h"
#include "outboxd/setup.h"
#include "outboxd/slot.h"
#include "outboxd/status.h"
#include "outboxd_version.h"

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void usage(FILE *out)
{
    fprintf(out, "outboxd %s - relays committed outbox rows from PostgreSQL's WAL to NATS "
                 "JetStream\n\n"
                 "Usage:\n"
                 "  outboxd [run] [settings]   run the relay (the default command)\n"
                 "  outboxd status [--json] [--max-lag BYTES] [settings]\n"
                 "                             the slot, checkpoint and stream, whether or not a\n"
                 "                             relay runs; exit 1 when the slot is missing or\n"
                 "                             its lag exceeds --max-lag\n"
                 "  outboxd setup [--apply] [--role NAME] [--stream NAME] [--stream-replicas N]\n"
                 "                [settings]\n"
                 "                             print (or run) the idempotent set-up: table,\n"
                 "                             publication, least-privilege role, stream\n"
                 "  outboxd doctor [--json] [settings]\n"
                 "                             check everything outboxd needs; exit 1 on a\n"
                 "                             failed check\n"
                 "  outboxd replay [--since TIME] [--until TIME] [--aggregate-id ID]\n"
                 "                 [--event-type T] [--new-ids] [--dry-run] [--rate N] [settings]\n"
                 "                             publish the outbox rows still in the table again\n"
                 "                             (occurred_at in [since, until)); --new-ids gives\n"
                 "                             them new message ids so the stream stores them\n"
                 "                             again; the relay may keep running\n"
                 "  outboxd slot list [--json] [settings]\n"
                 "                             the database's logical slots and bookmarks\n"
                 "  outboxd slot create [settings]\n"
                 "                             the publication, then the slot\n"
                 "  outboxd slot drop [--with-bookmarks | --bookmarks-only] [--yes] [settings]\n"
                 "                             drop the relay's slot and its checkpoint (the relay\n"
                 "                             must be stopped), its bookmarks too, or only its\n"
                 "                             bookmarks\n"
                 "  outboxd slot advance (--to LSN | --past-commit LSN) [--yes] [settings]\n"
                 "                             skip forward; --past-commit C skips the\n"
                 "                             transaction committed at C (a poison event)\n"
                 "  outboxd rewind --to TIME|LSN [--yes] [settings]\n"
                 "                             put the slot back to a bookmark so that the\n"
                 "                             transactions committed at or after the target are\n"
                 "                             published again (the relay must be stopped)\n"
                 "  outboxd recover [--yes] [settings]\n"
                 "                             after a lost slot, or one missing after a\n"
                 "                             failover: the next start publishes the rows\n"
                 "                             committed since the last relayed transaction\n"
                 "                             that the stream lacks, in commit order\n"
                 "  outboxd prune --older-than AGE [--batch N] [--wait DURATION] [--dry-run]\n"
                 "                [settings]\n"
                 "                             delete outbox rows whose occurred_at is older\n"
                 "                             than AGE (30s, 12h, 7d) in batches of N (1000),\n"
                 "                             only rows the relay has confirmed: waits up to\n"
                 "                             --wait (30s) for the slot, else deletes nothing\n"
                 "  outboxd audit [--since TIME] [--until TIME] [--json] [--wait DURATION]\n"
                 "                [settings]\n"
                 "                             compare the rows committed in [since, until) with\n"
                 "                             the stream: rows missing, events stored twice\n"
                 "                             (replay copies apart), events out of commit\n"
                 "                             order; changes nothing; exit 1 on any of them\n"
                 "  outboxd health [--ready] [--timeout DURATION] [settings]\n"
                 "                             ask the running relay's HTTP listener (--http-addr;\n"
                 "                             a wildcard address on the loopback address) for\n"
                 "                             /healthz, or /readyz with --ready, within --timeout\n"
                 "                             (3s); print the answer, exit 0 on 200, 1 otherwise:\n"
                 "                             a probe for images without a shell or curl\n"
                 "  outboxd --help             this text\n"
                 "  outboxd --version          versions of outboxd and its libraries\n\n"
                 "Settings (flag > environment > settings file > default):\n",
            OUTBOXD_VERSION);
    config_print_help(out);
    fprintf(out, "\nExit codes: 0 stopped cleanly, 1 runtime failure (a restart resends from "
                 "the confirmed LSN),\n2 bad setting, 3 a start-up check failed (the message "
                 "says what to fix).\n");
}

/* outboxd's version, then the libraries it runs with, as loaded (not as built against). */
static void version(void)
{
    int pq = PQlibVersion();
    printf("outboxd %s\n", OUTBOXD_VERSION);
    printf("  libpq          %d.%d\n", pq / 10000, pq % 10000);
    printf("  nats.c         %s\n", nats_GetVersion());
    printf("  jansson        %s\n", jansson_version_str());
    printf("  libmicrohttpd  %s\n", MHD_get_version());
#if OPENSSL_VERSION_MAJOR >= 3
    printf("  OpenSSL        %s\n", OpenSSL_version(OPENSSL_VERSION_STRING));
#else
    printf("  OpenSSL        %s\n", OpenSSL_version(OPENSSL_VERSION));
#endif
}

/* Secrets read from files, kept for the life of the process. */
static char pg_password[1024], nats_password[1024], nats_token[4096];

/* Reads the secret in path (one line; a final newline is not part of it) into out. */
static bool read_secret(const char *flag, const char *path, char *out, size_t outlen)
{
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(out, 1, outlen - 1, f) : 0;
    bool ok = f && !ferror(f) && feof(f) && n > 0;
    if (f)
        fclose(f);
    if (!ok) {
        fprintf(stderr, "outboxd: could not read %s %s: %s\n", flag, path,
                !f ? "cannot open it" : n == 0 ? "it is empty" : "it is too long");
        return false;
    }
    out[n] = '\0';
    out[strcspn(out, "\r\n")] = '\0';
    return true;
}

/* Hands the connection secrets and TLS settings to the modules that connect. */
static bool load_security(const Config *cfg)
{
    if (cfg->pg_password_file) {
        if (!read_secret("--pg-password-file", cfg->pg_password_file, pg_password,
                         sizeof(pg_password)))
            return false;
        pgstream_set_password(pg_password);
    }
    NatsSecurity sec = {
        .user = cfg->nats_user,
        .password = cfg->nats_password,
        .token = cfg->nats_token,
        .nkey_seed_file = cfg->nats_nkey_seed_file,
        .creds_file = cfg->nats_creds_file,
        .tls_ca = cfg->nats_tls_ca,
        .tls_cert = cfg->nats_tls_cert,
        .tls_key = cfg->nats_tls_key,
        .tls_server_name = cfg->nats_tls_server_name,
    };
    if (cfg->nats_password_file) {
        if (!read_secret("--nats-password-file", cfg->nats_password_file, nats_password,
                         sizeof(nats_password)))
            return false;
        sec.password = nats_password;
    }
    if (cfg->nats_token_file) {
        if (!read_secret("--nats-token-file", cfg->nats_token_file, nats_token,
                         sizeof(nats_token)))
            return false;
        sec.token = nats_token;
    }
    jsapi_set_security(&sec);
    jsapi_set_ping_interval(cfg->nats_ping_interval_ms);
    return true;
}

/* Loads the settings from the environment and argv; prints the error and returns false. */
static bool load_config(Config *cfg, int argc, char **argv)
{
    config_init(cfg);
    char err[1024];
    if (config_parse(cfg, argc, argv, err, sizeof(err)) < 0) {
        fprintf(stderr, "outboxd: %s\n", err);
        return false;
    }
    if (!load_security(cfg))
        return false;
    LogLevel level = LOG_INFO;
    log_level_parse(cfg->log_level, &level);
    log_setup(level, strcmp(cfg->log_format, "json") == 0);
    return true;
}

static int cmd_run(int argc, char **argv)
{
    Config cfg;
    if (!load_config(&cfg, argc, argv)) {
        config_deinit(&cfg);
        return EXIT_OUTBOXD_USAGE;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    log_info("outboxd %s starting", OUTBOXD_VERSION);
    int code = relay_run(&cfg, &stop_requested);
    config_deinit(&cfg);
    nats_Close();
    return code;
}

/* Runs a command over the settings; its own options are already taken out of argv. */
static int with_config(int argc, char **argv, int (*fn)(const Config *, void *), void *arg)
{
    Config cfg;
    if (!load_config(&cfg, argc, argv)) {
        config_deinit(&cfg);
        return EXIT_OUTBOXD_USAGE;
    }
    log_setup(LOG_WARN, false); /* these commands speak through their output, not the log */
    int code = fn(&cfg, arg);
    config_deinit(&cfg);
    nats_Close();
    return code;
}

typedef struct StatusArgs {
    bool json;
    int64_t max_lag;
} StatusArgs;

static int run_status(const Config *cfg, void *arg)
{
    StatusArgs *a = arg;
    return status_run(cfg, a->json, a->max_lag);
}

static int cmd_status(int argc, char **argv)
{
    StatusArgs a = {.json = false, .max_lag = -1};
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *lag;
        if (strcmp(argv[i], "--json") == 0) {
            a.json = true;
        } else if ((lag = config_option_value(argc, argv, &i, "--max-lag", &bad))) {
            if (!config_parse_bytes(lag, &a.max_lag)) {
                fprintf(stderr, "outboxd: invalid value '%s' for --max-lag: expected bytes such "
                                "as 64MiB or 1GiB\n",
                        lag);
                return EXIT_OUTBOXD_USAGE;
            }
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    return with_config(nrest, rest, run_status, &a);
}

static int run_setup(const Config *cfg, void *arg)
{
    return setup_run(cfg, arg);
}

static int cmd_setup(int argc, char **argv)
{
    SetupOptions opts = {.apply = false, .role = "outboxd", .stream = "OUTBOX", .replicas = 1};
    char *rest[argc + 2];
    int nrest = 0;
    /* Printing connects to nothing, so --pg-url may be left out: a placeholder goes first,
     * where any --pg-url given overrides it. --apply leaves it out and needs the real one. */
    char placeholder[] = "--pg-url=postgresql:///unused";
    rest[nrest++] = placeholder;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--apply") == 0) {
            opts.apply = true;
        } else if ((v = config_option_value(argc, argv, &i, "--role", &bad))) {
            opts.role = v;
        } else if ((v = config_option_value(argc, argv, &i, "--stream-replicas", &bad))) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*v == '\0' || *end != '\0' || n < 1 || n > 5) {
                fprintf(stderr, "outboxd: invalid value '%s' for --stream-replicas: expected 1 "
                                "to 5\n",
                        v);
                return EXIT_OUTBOXD_USAGE;
            }
            opts.replicas = (int)n;
        } else if ((v = config_option_value(argc, argv, &i, "--stream", &bad))) {
            opts.stream = v;
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    if (opts.apply)
        return with_config(nrest - 1, rest + 1, run_setup, &opts);
    return with_config(nrest, rest, run_setup, &opts);
}

static int run_doctor(const Config *cfg, void *arg)
{
    return doctor_run(cfg, *(bool *)arg);
}

static int cmd_doctor(int argc, char **argv)
{
    bool json = false;
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0)
            json = true;
        else
            rest[nrest++] = argv[i];
    }
    rest[nrest] = NULL;
    return with_config(nrest, rest, run_doctor, &json);
}

static int run_replay(const Config *cfg, void *arg)
{
    return replay_run(cfg, arg);
}

static int cmd_replay(int argc, char **argv)
{
    ReplayOptions opts = {0};
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--new-ids") == 0) {
            opts.new_ids = true;
        } else if (strcmp(argv[i], "--dry-run") == 0) {
            opts.dry_run = true;
        } else if ((v = config_option_value(argc, argv, &i, "--since", &bad))) {
            opts.since = v;
        } else if ((v = config_option_value(argc, argv, &i, "--until", &bad))) {
            opts.until = v;
        } else if ((v = config_option_value(argc, argv, &i, "--aggregate-id", &bad))) {
            opts.aggregate_id = v;
        } else if ((v = config_option_value(argc, argv, &i, "--event-type", &bad))) {
            opts.event_type = v;
        } else if ((v = config_option_value(argc, argv, &i, "--rate", &bad))) {
            char *end;
            long long n = strtoll(v, &end, 10);
            if (*v == '\0' || *end != '\0' || n < 1) {
                fprintf(stderr, "outboxd: invalid value '%s' for --rate: expected events per "
                                "second, at least 1\n",
                        v);
                return EXIT_OUTBOXD_USAGE;
            }
            opts.rate = n;
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    return with_config(nrest, rest, run_replay, &opts);
}

static int run_slot(const Config *cfg, void *arg)
{
    return slot_run(cfg, arg);
}

static int cmd_slot(int argc, char **argv)
{
    static const char *const actions[] = {"list", "create", "drop", "advance"}; /* SlotAction */
    SlotOptions opts = {0};
    size_t a = 0;
    while (a < ARRAY_SIZE(actions) && !(argc > 0 && strcmp(argv[0], actions[a]) == 0))
        a++;
    if (a == ARRAY_SIZE(actions)) {
        fprintf(stderr, "outboxd: slot needs an action: list, create, drop or advance (see "
                        "outboxd --help)\n");
        return EXIT_OUTBOXD_USAGE;
    }
    opts.action = (SlotAction)a;
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 1; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--yes") == 0 && (opts.action == SLOT_DROP ||
                                               opts.action == SLOT_ADVANCE)) {
            opts.yes = true;
        } else if (strcmp(argv[i], "--json") == 0 && opts.action == SLOT_LIST) {
            opts.json = true;
        } else if (strcmp(argv[i], "--with-bookmarks") == 0 && opts.action == SLOT_DROP) {
            opts.with_bookmarks = true;
        } else if (strcmp(argv[i], "--bookmarks-only") == 0 && opts.action == SLOT_DROP) {
            opts.bookmarks_only = true;
        } else if (opts.action == SLOT_ADVANCE &&
                   (v = config_option_value(argc, argv, &i, "--to", &bad))) {
            opts.to = v;
        } else if (opts.action == SLOT_ADVANCE &&
                   (v = config_option_value(argc, argv, &i, "--past-commit", &bad))) {
            opts.past_commit = v;
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    return with_config(nrest, rest, run_slot, &opts);
}

static int run_rewind(const Config *cfg, void *arg)
{
    return rewind_run(cfg, arg);
}

static int cmd_rewind(int argc, char **argv)
{
    RewindOptions opts = {0};
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--yes") == 0) {
            opts.yes = true;
        } else if ((v = config_option_value(argc, argv, &i, "--to", &bad))) {
            opts.to = v;
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    if (!opts.to || !*opts.to) {
        fprintf(stderr, "outboxd: rewind needs --to TIME or --to LSN\n");
        return EXIT_OUTBOXD_USAGE;
    }
    return with_config(nrest, rest, run_rewind, &opts);
}

static int run_recover(const Config *cfg, void *arg)
{
    return recover_run(cfg, arg);
}

static int cmd_recover(int argc, char **argv)
{
    RecoverOptions opts = {0};
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--yes") == 0)
            opts.yes = true;
        else
            rest[nrest++] = argv[i];
    }
    rest[nrest] = NULL;
    return with_config(nrest, rest, run_recover, &opts);
}

static int run_prune(const Config *cfg, void *arg)
{
    return prune_run(cfg, arg);
}

static int cmd_prune(int argc, char **argv)
{
    PruneOptions opts = {.older_than_ms = -1, .batch = PRUNE_DEFAULT_BATCH,
                         .wait_ms = PRUNE_DEFAULT_WAIT_MS};
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--dry-run") == 0) {
            opts.dry_run = true;
        } else if ((v = config_option_value(argc, argv, &i, "--older-than", &bad))) {
            if (!prune_parse_age(v, &opts.older_than_ms)) {
                fprintf(stderr, "outboxd: invalid value '%s' for --older-than: expected an age "
                                "such as 90s, 12h or 7d\n",
                        v);
                return EXIT_OUTBOXD_USAGE;
            }
        } else if ((v = config_option_value(argc, argv, &i, "--wait", &bad))) {
            if (!config_parse_duration_ms(v, &opts.wait_ms)) {
                fprintf(stderr, "outboxd: invalid value '%s' for --wait: expected a duration "
                                "such as 500ms, 10s or 2m\n",
                        v);
                return EXIT_OUTBOXD_USAGE;
            }
        } else if ((v = config_option_value(argc, argv, &i, "--batch", &bad))) {
            char *end;
            long long n = strtoll(v, &end, 10);
            if (*v == '\0' || *end != '\0' || n < 1 || n > 1000000) {
                fprintf(stderr, "outboxd: invalid value '%s' for --batch: expected rows per "
                                "batch, 1 to 1000000\n",
                        v);
                return EXIT_OUTBOXD_USAGE;
            }
            opts.batch = n;
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    if (opts.older_than_ms < 0) {
        fprintf(stderr, "outboxd: prune needs --older-than AGE (e.g. 7d)\n");
        return EXIT_OUTBOXD_USAGE;
    }
    return with_config(nrest, rest, run_prune, &opts);
}

static int run_audit(const Config *cfg, void *arg)
{
    return audit_run(cfg, arg);
}

static int cmd_audit(int argc, char **argv)
{
    AuditOptions opts = {.wait_ms = 10000};
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--json") == 0) {
            opts.json = true;
        } else if ((v = config_option_value(argc, argv, &i, "--since", &bad))) {
            opts.since = v;
        } else if ((v = config_option_value(argc, argv, &i, "--until", &bad))) {
            opts.until = v;
        } else if ((v = config_option_value(argc, argv, &i, "--wait", &bad))) {
            if (!config_parse_duration_ms(v, &opts.wait_ms)) {
                fprintf(stderr, "outboxd: invalid value '%s' for --wait: expected a duration "
                                "such as 500ms, 10s or 2m\n",
                        v);
                return EXIT_OUTBOXD_USAGE;
            }
        } else if (bad) {
            return EXIT_OUTBOXD_USAGE;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;
    return with_config(nrest, rest, run_audit, &opts);
}

int main(int argc, char **argv)
{
    /* Before libpq or nats.c initialise OpenSSL: no OpenSSL cleanup at exit. nats.c (3.x, up
     * to its issue #904) frees libssl's compression-method stack in its own exit handler, and
     * OpenSSL's handler then freed it again: a crash at exit (SIGSEGV instead of the exit code)
     * whenever PostgreSQL and NATS both used TLS. The process is ending; nothing is lost. */
    OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, NULL);
    const char *cmd = argc > 1 ? argv[1] : NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return EXIT_OUTBOXD_OK;
        }
        if (strcmp(argv[i], "--version") == 0) {
            version();
            return EXIT_OUTBOXD_OK;
        }
    }
    if (cmd && strcmp(cmd, "run") == 0)
        return cmd_run(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "status") == 0)
        return cmd_status(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "setup") == 0)
        return cmd_setup(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "doctor") == 0)
        return cmd_doctor(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "replay") == 0)
        return cmd_replay(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "slot") == 0)
        return cmd_slot(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "rewind") == 0)
        return cmd_rewind(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "recover") == 0)
        return cmd_recover(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "prune") == 0)
        return cmd_prune(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "audit") == 0)
        return cmd_audit(argc - 2, argv + 2);
    if (cmd && strcmp(cmd, "health") == 0)
        return health_main(argc - 2, argv + 2);
    if (!cmd || strncmp(cmd, "-", 1) == 0)
        return cmd_run(argc - 1, argv + 1);
    fprintf(stderr, "outboxd: unknown command \"%s\" (see outboxd --help)\n", cmd);
    return EXIT_OUTBOXD_USAGE;
}
