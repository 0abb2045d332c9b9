/*
 * checkpoint.h - the relay's durable progress: what it has stored, where it stands in the WAL,
 * and how far a first-start backfill got.
 *
 * The checkpoint lives in a JetStream key-value bucket (one key per system id and slot), beside
 * the stream it describes, so it survives the relay's host and a database restart; PostgreSQL
 * 15 does not write a slot's confirmed position to disk when only that moved.
 *
 * Format: one JSON object,
 *
 *   {"version": 1, "lsn": "0/16B3F10", "timeline": 1, "system": "7312...", "slot": "outboxd",
 *    "written": "2026-12-03T17:26:18.123456Z", "commit_time": "...", "commit_lsn": "0/16B3E80",
 *    "backfill": {"position": "0/16B3E00", "snapshot": "757:757:", "table": "public.outbox",
 *                 "after": "...", "rows": 1200}}
 *
 * "lsn" is the confirmed position (every event before it is stored), "timeline" the timeline
 * it was reached on, "commit_time" and "commit_lsn" the commit time and commit LSN of the last
 * transaction confirmed (an anchor, anchor.h: proven when that transaction comes again; and
 * for a gap's runbook after a failover), "backfill" present while a first-start
 * backfill is unfinished: "table" and "after" are its keyset progress (every row of the tables
before "table", and of "table" every row whose event id sorts at or before "after", is stored;
both "" before the first), "snapshot" the slot's snapshot that a resumed backfill reads in,
"since" present for a recovery (only the rows committed since then, see backfill.c).
Readers ignore members they do not know, so later releases add
 * members without a new version; "version" goes up only for a change an older outboxd would
 * misread, and outboxd refuses a checkpoint of a higher version than its own. A bare LSN
 * ("0/16B3F10", what outboxd 0.1 wrote) reads as version 0 with only "lsn".
 */
#ifndef OUTBOXD_CHECKPOINT_H
#define OUTBOXD_CHECKPOINT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/util.h"

#define CHECKPOINT_VERSION 1

/* A first-start backfill in progress. */
typedef struct CheckpointBackfill {
    bool active;        /* a backfill is unfinished */
    uint64_t position;  /* the slot's starting point: backfilled events carry it */
    char snapshot[8192]; /* the slot's snapshot, pg_current_snapshot() text: a resumed
                          * backfill reads only the rows visible in it ("" when unknown) */
    char table[192];    /* keyset progress: the table "after" belongs to ("" at start) */
    char after[512];    /* keyset progress: the last key whose row is stored ("" at start) */
    uint64_t rows;      /* rows stored so far */
    char since[40];     /* a recovery: only the rows committed since this RFC 3339 time, the
                         * last transaction relayed before the slot was lost ("" for a
                         * first-start backfill: every row) */
} CheckpointBackfill;

typedef struct Checkpoint {
    int version;           /* as read; CHECKPOINT_VERSION when written */
    uint64_t lsn;          /* confirmed position; 0: none */
    uint32_t timeline;     /* 0: unknown */
    int64_t commit_time;   /* µs since 2000-01-01 of the last confirmed transaction; 0: unknown */
    uint64_t commit_lsn;   /* that transaction's commit LSN; 0: unknown */
    char system[32];       /* the system id ("" when unknown) */
    char slot[64];
    CheckpointBackfill backfill;
} Checkpoint;

/* Encodes c as the JSON above (version CHECKPOINT_VERSION, "written" = now) into out. */
void checkpoint_encode(const Checkpoint *c, Buf *out);

/*
 * Decodes a checkpoint value (JSON, or a bare LSN). Returns 0, or -1 with err saying what is
 * wrong (not JSON, a member of the wrong type, a version newer than this outboxd's). *c is
 * written only on success.
 */
int checkpoint_decode(const char *value, size_t len, Checkpoint *c, char *err, size_t errlen);

#endif
