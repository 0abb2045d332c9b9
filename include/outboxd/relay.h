/*
 * relay.h - the pipeline: WAL stream -> pgoutput decoder -> outbox mapper -> JetStream, and
 * the decision which LSN may be confirmed to PostgreSQL.
 */
#ifndef OUTBOXD_RELAY_H
#define OUTBOXD_RELAY_H

#include <signal.h>

#include "outboxd/config.h"
#include "outboxd/util.h"

/* Exit codes of outboxd, documented in the README. */
enum {
    EXIT_OUTBOXD_OK = 0,      /* stopped cleanly */
    EXIT_OUTBOXD_FAILURE = 1, /* a runtime failure; a restart resends from the confirmed LSN */
    EXIT_OUTBOXD_USAGE = 2,   /* a bad setting */
    EXIT_OUTBOXD_CHECK = 3,   /* a start-up check failed: the database or broker is not ready */
};

/*
 * Runs the relay until *stop becomes non-zero (set from a signal handler) or a failure.
 * Returns one of the exit codes above.
 */
int relay_run(const Config *cfg, volatile sig_atomic_t *stop);

/*
 * The subject filter that covers every subject a template can produce: each token holding a
 * placeholder becomes "*" ("outbox.{a}.{b}" -> "outbox.*.*"). Appends it to out.
 */
void relay_template_filter(const char *tmpl, Buf *out);

/* The distinct filters of every template the relay publishes with (each table's, and the
 * messages' when they are on), separated by spaces: "orders.* payments.*.*". */
void relay_subject_filter(const Config *cfg, Buf *out);

#endif
