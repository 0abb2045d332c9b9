/*
 * main.c - outboxd's command line: subcommands, settings, signals.
 *
 *   outboxd [run] [settings]                    relay committed outbox inserts (the default)
 *   outboxd status [--json] [--max-lag BYTES] [settings]
 *   outboxd --help | --version
 *
 * Signal handlers only set a flag; the relay's loop notices it within one wait.
 */
#include <jansson.h>
#include <libpq-fe.h>
#include <nats/nats.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "outboxd/config.h"
#include "outboxd/log.h"
#include "outboxd/relay.h"
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
                 "  outboxd --help             this text\n"
                 "  outboxd --version          versions of outboxd and its libraries\n\n"
                 "Settings (flag > environment > default):\n",
            OUTBOXD_VERSION);
    config_print_help(out);
    fprintf(out, "\nExit codes: 0 stopped cleanly, 1 runtime failure (a restart resends from "
                 "the confirmed LSN),\n2 bad setting, 3 a start-up check failed (the message "
                 "says what to fix).\n");
}

static void version(void)
{
    int pq = PQlibVersion();
    printf("outboxd %s\nlibpq %d.%d\nnats.c %s\njansson %s\n", OUTBOXD_VERSION, pq / 10000,
           pq % 10000, nats_GetVersion(), JANSSON_VERSION);
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

static int cmd_status(int argc, char **argv)
{
    bool json = false;
    int64_t max_lag = -1;
    char *rest[argc + 1];
    int nrest = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *lag = NULL;
        if (strcmp(a, "--json") == 0) {
            json = true;
        } else if (strncmp(a, "--max-lag=", 10) == 0) {
            lag = a + 10;
        } else if (strcmp(a, "--max-lag") == 0) {
            if (i + 1 == argc) {
                fprintf(stderr, "outboxd: option --max-lag needs a value\n");
                return EXIT_OUTBOXD_USAGE;
            }
            lag = argv[++i];
        } else {
            rest[nrest++] = argv[i];
        }
        if (lag && !config_parse_bytes(lag, &max_lag)) {
            fprintf(stderr, "outboxd: invalid value '%s' for --max-lag: expected bytes such as "
                            "64MiB or 1GiB\n",
                    lag);
            return EXIT_OUTBOXD_USAGE;
        }
    }
    rest[nrest] = NULL;
    Config cfg;
    if (!load_config(&cfg, nrest, rest)) {
        config_deinit(&cfg);
        return EXIT_OUTBOXD_USAGE;
    }
    log_setup(LOG_WARN, false); /* status speaks through its report, not the log */
    int code = status_run(&cfg, json, max_lag);
    config_deinit(&cfg);
    nats_Close();
    return code;
}

int main(int argc, char **argv)
{
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
    if (!cmd || strncmp(cmd, "-", 1) == 0)
        return cmd_run(argc - 1, argv + 1);
    fprintf(stderr, "outboxd: unknown command \"%s\" (see outboxd --help)\n", cmd);
    return EXIT_OUTBOXD_USAGE;
}
