/*
 * setup.h - `outboxd setup` and `outboxd doctor`: preparing a database and a broker for
 * outboxd, and checking that they are ready.
 */
#ifndef OUTBOXD_SETUP_H
#define OUTBOXD_SETUP_H

#include <stdbool.h>

#include "outboxd/config.h"

typedef struct SetupOptions {
    bool apply;          /* run it (PostgreSQL and NATS), instead of printing it */
    const char *role;    /* least-privilege role for the relay, e.g. "outboxd" */
    const char *stream;  /* JetStream stream name, e.g. "OUTBOX" */
    int replicas;        /* stream replicas (1, or 3 on a cluster) */
} SetupOptions;

/*
 * Prints (or with apply, runs) idempotent set-up: the outbox table (cfg->table, columns as in
 * scripts/outbox.sql), the publication (publish = 'insert'), the role (LOGIN REPLICATION,
 * SELECT on the outbox only), and the stream (subjects covering the subject template and the
 * dead-letter subject, 2 minute duplicate window, file storage). Running it twice changes
 * nothing the second time. Returns 0, 1 on a failure to apply (message on stderr), 3 when
 * PostgreSQL or NATS cannot be reached with apply.
 */
int setup_run(const Config *cfg, const SetupOptions *opts);

/*
 * Checks everything outboxd needs and prints a table: one line per check with PASS, WARN or
 * FAIL and, for each non-pass, the fix. as_json prints the same as a JSON array. Returns 0 when
 * nothing failed (warnings allowed), 1 otherwise.
 */
int doctor_run(const Config *cfg, bool as_json);

#endif
