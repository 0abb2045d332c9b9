/*
 * pgstream.h - the libpq replication connection: connect with pinned session settings, the
 * start-up checks that PostgreSQL can answer, slot and publication creation, START_REPLICATION,
 * the CopyBoth read loop and standby status updates.
 *
 * Owned and used by one thread. Functions that can fail return 0 on success and -1 with a
 * one-line message in err; PGO_CHECK_FAILED (a positive code) marks a failed start-up check,
 * which the caller reports with its own exit code.
 */
#ifndef OUTBOXD_PGSTREAM_H
#define OUTBOXD_PGSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/outbox.h"

#define PGSTREAM_CHECK_FAILED 1
#define PGSTREAM_SLOT_BUSY 2 /* another session streams from the slot */
#define PGSTREAM_SLOT_LOST 3 /* the slot was invalidated (wal_status lost): it can never stream */

typedef struct PgStream PgStream;

typedef struct PgSystem {
    char system_id[32];
    uint32_t timeline;
    uint64_t xlogpos;
    char dbname[64];
} PgSystem;

/*
 * First-start backfill: when the slot is created, the rows already in the outbox, as the slot's
 * starting snapshot sees them (no more, no less than what the WAL will not bring), are handed
 * to on_row one by one, table after table, each in commit order through a cursor (memory stays
 * bounded). Commit order is the key (ts, xid, ctid): with track_commit_timestamp on, ts is each
 * row's commit time (pg_xact_commit_timestamp(xmin)), exact; without it, the table's time
 * column (occurred_at: the transaction's start with the default now()), which is commit order
 * for the transactions of one writer, not for concurrent ones. Then the transaction id widened
 * to 64 bits, then the row's place (ctid; rows of one multi-row INSERT are not on disk in
 * insertion order). key is that key as text, "<ts>|<xid>|<ctid>": a resumed backfill continues
 * after the last key stored. values[i] is NULL for SQL NULL. on_row returns 0 to go on, -1 to
 * stop (with err set). count_only just counts them into rows.
 *
 * While the server works (the slot's creation waits for every running transaction; a FETCH
 * may sort), tick is called about every 200 ms; it returns false to cancel the statement (a
 * stop request), which then fails.
 */
typedef struct PgBackfill {
    int (*on_row)(void *arg, size_t table, const char *key, int ncols, const char *const *names,
                  const uint32_t *types, const char *const *values, const int *lens, char *err,
                  size_t errlen);
    bool (*tick)(void *arg); /* may be NULL */
    /* The slot exists and position and snapshot are known, before the first row is read:
     * record them durably. -1 (with err) stops the backfill. May be NULL. */
    int (*on_start)(void *arg, char *err, size_t errlen);
    void *arg;
    bool count_only;
    uint64_t rows;     /* rows seen */
    uint64_t position; /* the slot's consistent point */
    char snapshot[8192]; /* the slot's snapshot (pg_current_snapshot() text): set when the slot
                          * is created, the filter of pgstream_read_outbox() */
    bool commit_order;   /* set by the read: the server keeps commit times (exact order) */
    /* A recovery reads only what committed since an RFC 3339 time: with commit times, rows
     * committed at or after it; without, rows whose time column is at most since_margin_ms
     * before it (a transaction that started before the cut may commit after it). NULL: all. */
    const char *since;
    int64_t since_margin_ms;
    /* pgstream_read_outbox(): start at table first_table, after the key "after" ("": from its
     * first row); the tables after it from their first row */
    size_t first_table;
    const char *after;
} PgBackfill;

/* What the relay asks of the database at start-up. */
typedef struct PgSetup {
    const char *slot;
    const char *publication;
    const OutboxMapper *mapper; /* the outbox tables and the columns each needs */
    bool create;           /* create the publication and the slot when missing */
    bool failover;         /* on PostgreSQL 17+, create the slot as a failover slot, which
                            * standbys with sync_replication_slots keep in step */
    PgBackfill *backfill;  /* NULL: the slot is created without a snapshot */
} PgSetup;

/* A password for every connection of this process (from --pg-password-file), over what the
 * connection string says. Set once at start; the string must outlive the connections. */
void pgstream_set_password(const char *password);

/* Bounds every wait on PostgreSQL of this process's later connections (the relay sets it once
 * at start; 0, the default, leaves statements unbounded, as the one-shot commands want): a
 * statement unanswered for ms (10 s at most on a plain session) drops its connection, and
 * tcp_user_timeout is ms. */
void pgstream_set_receive_timeout(int64_t ms);

/*
 * Connects with replication=database and the session settings that fix how values are
 * rendered (UTF8, ISO dates, UTC, hex bytea, exact floats). Returns 0, or
 * PGSTREAM_CHECK_FAILED with "could not connect to PostgreSQL: ..." in err (the message never
 * contains the password).
 */
int pgstream_connect(PgStream **out, const char *conninfo, char *err, size_t errlen);

/* The same without replication=database: an ordinary session for monitoring queries. */
int pgstream_connect_plain(PgStream **out, const char *conninfo, char *err, size_t errlen);

/* The server's current WAL write position (pg_current_wal_lsn()). */
int pgstream_wal_lsn(PgStream *s, uint64_t *out, char *err, size_t errlen);
void pgstream_free(PgStream *s);

/* IDENTIFY_SYSTEM. */
int pgstream_identify(PgStream *s, PgSystem *sys, char *err, size_t errlen);

/*
 * The start-up checks and setup, in the order that matters: wal_level, the role's REPLICATION
 * attribute, each outbox table and its columns (checked against the mapper), then the
 * publication (created first when allowed) covering the tables, then the slot (created after
 * the publication when allowed; a slot made first would fail on the changes in between).
 * Returns 0, -1 on an unexpected error, or PGSTREAM_CHECK_FAILED with the failed check in err.
 * *created_slot tells whether this call created the slot.
 */
int pgstream_setup(PgStream *s, const PgSetup *setup, bool *created_slot, char *err,
                   size_t errlen);

typedef struct PgSlotInfo {
    bool exists;
    int active_pid;     /* the walsender streaming from it, 0 when free */
    uint64_t confirmed; /* confirmed_flush_lsn, 0 when never confirmed */
    uint64_t restart;   /* restart_lsn: the oldest WAL the slot holds */
    uint64_t wal;       /* the server's current WAL position */
    char wal_status[16]; /* reserved, extended, unreserved or lost */
    char plugin[64];
    bool this_db;       /* the slot decodes the database this session is connected to */
} PgSlotInfo;

int pgstream_slot_info(PgStream *s, const char *slot, PgSlotInfo *info, char *err,
                       size_t errlen);

/* The server's version as a number (170004 for 17.4). */
int pgstream_server_version(const PgStream *s);

/* ALTER_REPLICATION_SLOT slot (FAILOVER true) on a replication connection (17+): a slot copy
 * does not keep the flag. Returns 0, or -1 with err. */
int pgstream_set_failover(PgStream *s, const char *slot, char *err, size_t errlen);

/*
 * Where timeline old_tli ended in the history of the server's timeline cur_tli
 * (TIMELINE_HISTORY): *fork is the first LSN that belongs to the next timeline. Returns 0, 1
 * when old_tli is not in that history (another lineage), -1 with err on failure.
 */
int pgstream_timeline_fork(PgStream *s, uint32_t cur_tli, uint32_t old_tli, uint64_t *fork,
                           char *err, size_t errlen);

/*
 * Resumes a backfill that was interrupted: reads the outbox's rows from backfill->first_table
 * and backfill->after on into backfill->on_row, in a new repeatable-read transaction, keeping
 * only rows whose xmin is visible in backfill->snapshot (the slot's: rows committed later come
 * through the WAL). Frozen rows (xmin 2) count as visible. A row's 32-bit xmin is widened to
 * 64 bits against the current transaction's snapshot, exact for every xid not frozen.
 */
int pgstream_read_outbox(PgStream *s, const PgSetup *setup, char *err, size_t errlen);

/* Takes the session advisory lock named name (a 64-bit hash of it) without waiting: *got
 * tells whether this session holds it now. Released by pgstream_unlock or the end of the
 * session (also when the process dies). */
int pgstream_try_lock(PgStream *s, const char *name, bool *got, char *err, size_t errlen);
int pgstream_unlock(PgStream *s, const char *name, char *err, size_t errlen);

/* Drops the replication slot (it must not be in use). */
int pgstream_drop_slot(PgStream *s, const char *slot, char *err, size_t errlen);

/* The server's wal_sender_timeout in milliseconds (0 = disabled). */
int pgstream_wal_sender_timeout_ms(PgStream *s, int64_t *out, char *err, size_t errlen);

/* START_REPLICATION SLOT slot LOGICAL start (proto_version 1, the publication). Returns
 * PGSTREAM_SLOT_BUSY when another session holds the slot, PGSTREAM_SLOT_LOST when PostgreSQL
 * invalidated it. */
int pgstream_start(PgStream *s, const char *slot, const char *publication, bool messages,
                   uint64_t start_lsn, char *err, size_t errlen);

/*
 * Reads the next CopyData message without blocking. Returns 1 with buf and len set (valid until
 * the next call), 0 when nothing is buffered (wait for the socket, then pgstream_consume), or
 * -1 when the stream ended or failed (err says why).
 */
int pgstream_read(PgStream *s, const char **buf, size_t *len, char *err, size_t errlen);

/* Reads what the socket has into the buffer of libpq. */
int pgstream_consume(PgStream *s, char *err, size_t errlen);

int pgstream_socket(const PgStream *s);

/* True when the socket has bytes (or an end) that libpq has not read yet. */
bool pgstream_readable(const PgStream *s);

/*
 * Whether a replication connection is silent, the way PostgreSQL's walreceiver judges it with
 * wal_receiver_timeout: once half of timeout passed since the last message (last_received),
 * ask the server for a reply (a status update with reply requested; the walsender answers at
 * once with a keepalive); once timeout passed with nothing received and the server had half of
 * it to answer that request (asked: when it was sent, 0 or older than last_received when none
 * since), the connection is silent. All times in µs; timeout <= 0 never judges.
 */
typedef enum PgLiveness { PG_LIVE, PG_ASK_REPLY, PG_SILENT } PgLiveness;
PgLiveness pgstream_liveness(int64_t now, int64_t last_received, int64_t asked, int64_t timeout);
/* When pgstream_liveness() has something to say next (INT64_MAX: never). */
int64_t pgstream_liveness_deadline(int64_t last_received, int64_t asked, int64_t timeout);

/* The server process of this connection (PQbackendPID) and when it started (pg_stat_activity's
 * backend_start, as text), read before START_REPLICATION: what names this session later. */
int pgstream_session_id(PgStream *s, int *pid, char *started, size_t startedlen, char *err,
                        size_t errlen);

/* Ends the server process pid if it still is the one that started at started
 * (pg_terminate_backend, waiting up to 2 s for it to exit). *ended tells whether it did.
 * Returns -1 with err when the server refused (the role may not signal that process). */
int pgstream_terminate_session(PgStream *s, int pid, const char *started, bool *ended,
                               char *err, size_t errlen);

/* Sends a standby status update and flushes it. */
int pgstream_send_status(PgStream *s, uint64_t write_lsn, uint64_t flush_lsn, bool reply,
                         char *err, size_t errlen);

/* Ends the CopyBoth session (CopyDone) and reads the server's final results. */
int pgstream_finish(PgStream *s, char *err, size_t errlen);

/* ---- plain SQL, for `outboxd setup` and `outboxd doctor` ---------------------------------------
 * These work on either kind of connection (a plain one from pgstream_connect_plain is meant).
 * Quoting needs no connection: identifiers are double-quoted with inner quotes doubled (as
 * PQescapeIdentifier does), literals single-quoted with quotes doubled, and written E'...' with
 * backslashes doubled when there are any, so they read the same whatever
 * standard_conforming_strings says. */

#include "outboxd/util.h"

/* Appends name as a quoted SQL identifier: "my ""odd"" name". */
void pgstream_quote_ident(Buf *out, const char *name);
/* Appends s as a quoted SQL string literal. */
void pgstream_quote_literal(Buf *out, const char *s);

/* The rows of a query: text values, read-only. */
typedef struct PgRows PgRows;

/*
 * Runs one SQL string (simple query protocol: several statements are allowed, the last one's
 * result counts) that returns rows or not. Returns 0 and, when out is not NULL, the rows in *out
 * (free with pgrows_free; none for a command). On failure returns -1 with "<what>: <server
 * message>" in err and, when sqlstate is not NULL, the SQLSTATE there ("" when none). Notices
 * (e.g. "relation already exists, skipping") are dropped, not printed.
 */
int pgstream_sql(PgStream *s, const char *sql, const char *what, PgRows **out, char sqlstate[6],
                 char *err, size_t errlen);
int pgrows_count(const PgRows *r);
/* The value at row, col as text, or NULL when it is SQL NULL or out of range. */
const char *pgrows_value(const PgRows *r, int row, int col);
/* True when the value is the boolean true ("t"). */
bool pgrows_true(const PgRows *r, int row, int col);
void pgrows_free(PgRows *r);

#endif
