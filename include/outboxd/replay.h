/*
 * replay.h - `outboxd replay`: publishing outbox rows still in the table again, through the
 * relay's own mapping, while the relay keeps running.
 */
#ifndef OUTBOXD_REPLAY_H
#define OUTBOXD_REPLAY_H

#include <stdbool.h>
#include <stdint.h>

#include "outboxd/config.h"

/* Added to every replayed event: when the replay ran, RFC 3339 UTC. */
#define OUTBOX_HDR_REPLAY "Outbox-Replay"

typedef struct ReplayOptions {
    const char *since;        /* occurred_at >= since (a timestamptz), or NULL */
    const char *until;        /* occurred_at < until, or NULL */
    const char *aggregate_id; /* aggregate_id = this, or NULL */
    const char *event_type;   /* event_type = this, or NULL */
    bool new_ids;             /* Nats-Msg-Id "<event_id>:replay:<unix seconds>" */
    bool dry_run;             /* count, publish nothing */
    int64_t rate;             /* at most this many events per second; 0: no limit */
} ReplayOptions;

/*
 * Selects the matching rows (ordered by occurred_at, event_id) in one snapshot and publishes
 * each as the relay would, plus the Outbox-Replay header, waiting for every acknowledgement.
 * By default the events keep their Nats-Msg-Id, so JetStream drops those still inside its
 * duplicate window (counted as duplicates); with new_ids they are stored again. Prints a
 * summary line "replayed N events (D duplicates) in S s" (and a progress line on a terminal).
 * Returns 0, 1 when rows could not be published (each named on stderr), 2 on a bad filter,
 * 3 when PostgreSQL, NATS or a stream for the subjects is missing.
 */
int replay_run(const Config *cfg, const ReplayOptions *opts);

#endif
