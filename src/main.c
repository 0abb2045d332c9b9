/*
 * main.c - outboxd's command line: subcommands, settings, signals.
 *
 *   outboxd [run] [settings]   relay committed outbox inserts to JetStream (the default)
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

static int run(int argc, char **argv)
{
    Config cfg;
    config_init(&cfg);
    char err[1024];
    if (config_parse(&cfg, argc, argv, err, sizeof(err)) < 0) {
        fprintf(stderr, "outboxd: %s\n", err);
        config_deinit(&cfg);
        return EXIT_OUTBOXD_USAGE;
    }
    LogLevel level = LOG_INFO;
    log_level_parse(cfg.log_level, &level);
    log_setup(level, strcmp(cfg.log_format, "json") == 0);

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
        return run(argc - 2, argv + 2);
    if (!cmd || strncmp(cmd, "-", 1) == 0)
        return run(argc - 1, argv + 1);
    fprintf(stderr, "outboxd: unknown command \"%s\" (see outboxd --help)\n", cmd);
    return EXIT_OUTBOXD_USAGE;
}
