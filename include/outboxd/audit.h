/*
 * audit.h - `outboxd audit`: does the stream hold every committed outbox row of a time range
 * once, and in commit order?
 *
 * Two sides are compared. The stream side is every message of the events' stream from the
 * range's start on, read once in sequence order (audit.c reads it headers-only through an
 * ephemeral pull consumer); each becomes an AuditMsg: the event id of the row it stands for,
 * what kind of copy it is, its Outbox-Position and Outbox-Source. The table side is the rows
 * committed in the range, read through a cursor in a read-only snapshot. Memory stays bounded
 * on long ranges: the stream side is kept as a compact array of 16 bytes per message (a 64-bit
 * hash of the event id, the sequence and a few flags), sorted by hash once read; the table
 * side is never held, each row is looked up as it is fetched. The order check needs no memory
 * per message: it runs while the stream is read, per source and timeline.
 *
 * Hashes: two different event ids with the same 64-bit hash could hide a missing row behind
 * another row's event (chance about n / 2^64 per missing row: below 1e-13 for a million
 * events) or look like a duplicate; every duplicate candidate is checked against the real
 * ids (audit_verify_duplicates) before it is counted, up to AUDIT_VERIFY_MAX groups.
 *
 * The pure parts (classification, matching, duplicates, order, the report) take no I/O and
 * are unit-tested; audit_run() does the reading. A later `outboxd recover` can reuse the
 * comparison unchanged: read the stream side the same way, then run the table cursor over the
 * full rows (as replay.c does) and publish exactly the rows for which audit_row() answers
 * AUDIT_ROW_MISSING, through replay's mapping and publisher.
 */
#ifndef OUTBOXD_AUDIT_H
#define OUTBOXD_AUDIT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <nats/nats.h>

#include "outboxd/config.h"
#include "outboxd/outbox.h"

/* Event ids named per kind in the report. */
#define AUDIT_NAMED 10
/* Duplicate candidates checked against the real ids, at most (each costs one request). */
#define AUDIT_VERIFY_MAX 1000
/* Rows and messages this far (µs) outside the range are read too, so that an event near an
 * edge finds its row and the reverse: commit times and the time column differ a little, and
 * the stream's clock is not the database's. */
#define AUDIT_MARGIN_US INT64_C(300000000)

typedef enum AuditKind {
    AUDIT_EVENT = 0,       /* the relay's event: Nats-Msg-Id is the row's event id */
    AUDIT_DEAD_LETTER = 1, /* a dead letter standing in for the row in Outbox-Event-Id */
    AUDIT_REPLAY = 2,      /* a copy from `outboxd replay` (Outbox-Replay) */
    AUDIT_FOREIGN = 3,     /* no row's: no Nats-Msg-Id, or a dead letter without event id */
} AuditKind;

/* The headers of a stream message that the audit reads; NULL when absent. */
typedef struct AuditHeaders {
    const char *msg_id;      /* Nats-Msg-Id */
    const char *event_id;    /* Outbox-Event-Id (dead letters, replays with new ids) */
    const char *replay;      /* Outbox-Replay */
    const char *dead_letter; /* Outbox-Dead-Letter-Reason */
    const char *position;    /* Outbox-Position */
    const char *source;      /* Outbox-Source */
    const char *commit_time; /* Outbox-Commit-Time, RFC 3339 */
} AuditHeaders;

/* One stream message as the audit sees it. Pointers refer to the headers it was made from. */
typedef struct AuditMsg {
    uint64_t seq;
    AuditKind kind;
    const char *id; /* the event id of the row it stands for; NULL for AUDIT_FOREIGN */
    bool in_range;  /* its commit time (or, without one, its stored time) is in the range */
    bool has_position; /* a relay position to check the order with (not a replay's 0/0) */
    OutboxPosition pos;
    const char *source; /* Outbox-Source, or "" */
} AuditMsg;

/* The range, in Unix µs: [since, until). INT64_MIN and INT64_MAX leave an end open. */
typedef struct AuditRange {
    int64_t since;
    int64_t until;
} AuditRange;

/* Makes m from a message's headers, its sequence and the time JetStream stored it. */
void audit_msg_from_headers(AuditMsg *m, uint64_t seq, int64_t stored_us, const AuditHeaders *h,
                            const AuditRange *range);

/* One place where the stream's order is not commit order: the message at seq came after the
 * message at prev_seq (same source and timeline) but was committed before it. */
typedef struct AuditBreak {
    uint64_t seq, prev_seq;
    uint64_t hash; /* of the event id of the message at seq */
    OutboxPosition pos, prev_pos;
    char id[OUTBOX_MAX_EVENT_ID + 1];      /* filled by audit_resolve() */
    char prev_id[OUTBOX_MAX_EVENT_ID + 1];
} AuditBreak;

/* A count and the first AUDIT_NAMED of a kind: event ids, and stream sequences where the kind
 * is about messages (0 otherwise). */
typedef struct AuditList {
    uint64_t count;
    size_t n;
    uint64_t seq[AUDIT_NAMED];
    char id[AUDIT_NAMED][OUTBOX_MAX_EVENT_ID + 1];
} AuditList;

typedef struct AuditReport {
    uint64_t rows;            /* rows committed in the range */
    uint64_t messages;        /* stream messages read */
    uint64_t events_in_range; /* ... of them rows' events committed in the range */
    AuditList missing;        /* rows the stream lacks (by event id) */
    AuditList duplicates;     /* events stored more than once: count of extra copies */
    uint64_t breaks_count;    /* places where the order is not commit order */
    size_t nbreaks;
    AuditBreak breaks[AUDIT_NAMED];
    AuditList replays;        /* replay copies of rows in the range: not duplicates */
    AuditList replay_only;    /* rows the stream holds only as replay copies */
    AuditList unmatched;      /* events in the range with no row (deleted, or table-less) */
    uint64_t unpositioned;    /* events in the range without a position: order not checked */
    uint64_t foreign;         /* messages that stand for no row */
    uint64_t dead_letters;    /* rows present as their dead letter */
    uint64_t verified_groups; /* duplicate candidates checked against real ids */
    uint64_t unverified_groups; /* ... left unchecked past AUDIT_VERIFY_MAX */
} AuditReport;

typedef struct Audit Audit;

void audit_new(Audit **out, const AuditRange *range);
void audit_free(Audit *a);

/* The stream side, one message at a time in sequence order. Checks the order as it goes. */
void audit_add_msg(Audit *a, const AuditMsg *m);

/*
 * Reads the stream side of a: the messages of stream stored since from_us (Unix µs; INT64_MIN
 * from its start) up to sequence last_seq, headers only, through an ephemeral pull consumer,
 * into audit_add_msg(). tick (may be NULL) is told the count read after each batch. Returns 0,
 * or -1 with the reason in err. A recovery uses it to learn what the stream holds since its
 * cut, then audit_row() for each row it considers.
 */
int audit_read_stream(Audit *a, natsConnection *nc, const char *stream, int64_t from_us,
                      uint64_t last_seq, void (*tick)(void *arg, uint64_t read), void *arg,
                      char *err, size_t errlen);

/* The stream side is complete: sorts it and finds the duplicate candidates. */
void audit_stream_done(Audit *a);

/*
 * Checks each duplicate candidate (several non-replay messages with the same id hash) against
 * the real event ids, which fetch(arg, seq, id, idlen) reads (0, or -1 when it cannot: the
 * candidate is kept). Drops candidates that are hash collisions. At most AUDIT_VERIFY_MAX
 * groups. Returns 0, or -1 when fetch failed (err set by it).
 */
typedef int (*AuditFetch)(void *arg, uint64_t seq, char *id, size_t idlen);
int audit_verify_duplicates(Audit *a, AuditFetch fetch, void *arg);

typedef enum AuditRowState {
    AUDIT_ROW_HELD,        /* the relay's event or its dead letter is there */
    AUDIT_ROW_REPLAY_ONLY, /* only replay copies are */
    AUDIT_ROW_MISSING,     /* nothing stands for it */
} AuditRowState;

/* The table side: a row with event id id[0..len). in_range false: a row of the margin, only
 * matched (never missing). Rows must be unique. */
AuditRowState audit_row(Audit *a, const char *id, size_t len, bool in_range);

/* Both sides are done: counts the events without a row and leaves the order breaks that are
 * not duplicates. */
void audit_finish(Audit *a);

/* Fills the event ids of the named messages (duplicates, breaks, unmatched) with fetch.
 * Returns 0, or -1 when fetch failed. */
int audit_resolve(Audit *a, AuditFetch fetch, void *arg);

const AuditReport *audit_report(const Audit *a);

/* True when the stream holds each row once and in order. */
bool audit_ok(const AuditReport *r);

/* How the range was selected and what was read, for the report's first lines. */
typedef struct AuditContext {
    const char *tables;  /* "public.outbox" */
    const char *stream;
    const char *since;   /* as given, or NULL */
    const char *until;
    bool by_commit_time; /* track_commit_timestamp: rows by commit time; else by time column */
    const char *time_column; /* the column used without commit times */
    uint64_t rows_without_commit_time; /* by commit time, rows whose time is not known */
    bool relay_behind;   /* the relay had not confirmed the snapshot's WAL when the stream was read */
    const char *dead_letters_elsewhere; /* the stream dead letters go to when not this one */
    double seconds;
} AuditContext;

/* The report as text, or as one JSON object. */
void audit_print_text(FILE *out, const AuditContext *ctx, const AuditReport *r);
void audit_print_json(FILE *out, const AuditContext *ctx, const AuditReport *r);

typedef struct AuditOptions {
    const char *since; /* a timestamptz, or NULL */
    const char *until; /* a timestamptz, or NULL: the snapshot's time */
    bool json;
    int64_t wait_ms;   /* how long to wait for a running relay to publish what committed */
} AuditOptions;

/*
 * The command: reads both sides (never writes anything: a read-only transaction, no publish),
 * prints the report. Returns 0 when the stream holds each row of the range once and in commit
 * order, 1 when not (or on a failure while reading), 2 on bad usage, 3 when PostgreSQL, NATS or
 * the stream cannot be reached.
 */
int audit_run(const Config *cfg, const AuditOptions *opts);

#endif
