/*
 * status.h - `outboxd status`: the slot, the checkpoint and the stream as seen from outside,
 * whether or not a relay runs.
 */
#ifndef OUTBOXD_STATUS_H
#define OUTBOXD_STATUS_H

#include <stdbool.h>
#include <stdint.h>

#include "outboxd/config.h"

/*
 * Prints the status as text (or one JSON object with as_json). Returns 0 when healthy, 1 when
 * the slot is missing or lost or its lag exceeds max_lag bytes (max_lag < 0: no limit), 3 when
 * PostgreSQL cannot be reached. Never prints the connection strings.
 */
int status_run(const Config *cfg, bool as_json, int64_t max_lag);

#endif
