/*
 * outbox.h - turning a decoded outbox row into an event: subject, Nats-Msg-Id, headers, body.
 *
 * The mapper learns each table from pgoutput Relation messages (cached by relation id; a table
 * altered mid-stream sends a new Relation and is re-bound) and finds the outbox columns by name,
 * so column order and extra columns do not matter. Mapping reuses the event's buffers: after the
 * first few events it allocates nothing.
 */
#ifndef OUTBOXD_OUTBOX_H
#define OUTBOXD_OUTBOX_H

#include <stdbool.h>
#include <stdint.h>

#include "outboxd/config.h"
#include "outboxd/pgoutput.h"
#include "outboxd/util.h"

/* Header names, a contract with consumers. */
#define OUTBOX_HDR_MSG_ID "Nats-Msg-Id"
#define OUTBOX_HDR_EVENT_TYPE "Outbox-Event-Type"
#define OUTBOX_HDR_AGGREGATE_TYPE "Outbox-Aggregate-Type"
#define OUTBOX_HDR_AGGREGATE_ID "Outbox-Aggregate-Id"
#define OUTBOX_HDR_OCCURRED_AT "Outbox-Occurred-At"
#define OUTBOX_HDR_SCHEMA_VERSION "Outbox-Schema-Version"
#define OUTBOX_HDR_TRACE_ID "Outbox-Trace-Id"
#define OUTBOX_HDR_COMMIT_LSN "Outbox-Commit-Lsn"
#define OUTBOX_HDR_COMMIT_TIME "Outbox-Commit-Time"

#define OUTBOX_HDR_EXPECTED_LAST "Nats-Expected-Last-Sequence"
#define OUTBOX_HDR_POSITION "Outbox-Position"
#define OUTBOX_HDR_SOURCE "Outbox-Source"
#define OUTBOX_HDR_DL_REASON "Outbox-Dead-Letter-Reason"
#define OUTBOX_HDR_DL_DETAIL "Outbox-Dead-Letter-Detail"
#define OUTBOX_HDR_ORIGINAL_SUBJECT "Outbox-Original-Subject"
#define OUTBOX_HDR_EVENT_ID "Outbox-Event-Id"
#define OUTBOX_HDR_TABLE "Outbox-Table"

#define OUTBOX_MAX_HEADERS 32
/* Most extra headers an event may add (--header columns, or an envelope's "headers"). */
#define OUTBOX_MAX_EXTRA_HEADERS 16
/* Longest subject outboxd publishes to: a NATS publish line is limited to 4 KiB. */
#define OUTBOX_MAX_SUBJECT 2048
/* Longest event_id accepted as a Nats-Msg-Id. */
#define OUTBOX_MAX_EVENT_ID 255

typedef struct OutboxHeader {
    const char *name;
    size_t off; /* value offset in OutboxEvent.hvals, NUL-terminated there */
    size_t len; /* value length */
} OutboxHeader;

/* One event ready to publish. Filled by outbox_map_insert(), reused between events. */
typedef struct OutboxEvent {
    Buf subject;                /* NUL-terminated */
    Buf hvals;                  /* header values, each NUL-terminated */
    OutboxHeader headers[OUTBOX_MAX_HEADERS];
    size_t nheaders;
    const char *msg_id;         /* points into hvals; valid until the next mapping */
    const char *body;           /* into the decoded message, or into body_buf for bytea */
    size_t body_len;
    Buf body_buf;
    char names[OUTBOX_MAX_EXTRA_HEADERS][65]; /* header names taken from an envelope */
    uint64_t commit_lsn;
    int64_t commit_time;        /* µs since 2000-01-01 */
} OutboxEvent;

void outbox_event_init(OutboxEvent *ev);
void outbox_event_deinit(OutboxEvent *ev);
/* Returns the value of header name, or NULL. */
const char *outbox_event_header(const OutboxEvent *ev, const char *name);
/* Adds header name with value[0..len) as it is: the caller knows it holds no control bytes. */
void outbox_event_add_header(OutboxEvent *ev, const char *name, const char *value, size_t len);
/* Gives header name the value (added when absent); returns where the value now is. */
const char *outbox_event_set_header(OutboxEvent *ev, const char *name, const char *value,
                                    size_t len);

typedef struct OutboxMapper OutboxMapper;

/* The transaction an insert belongs to, from its Begin message, and where the event being
 * mapped stands in it. */
typedef struct OutboxTxn {
    uint64_t commit_lsn;
    int64_t commit_time; /* µs since 2000-01-01 */
    uint32_t timeline;   /* the server's timeline */
    uint32_t index;      /* the event's index among the transaction's events, from 0 */
} OutboxTxn;

/*
 * Where an event comes from in the WAL: its transaction's commit LSN on a timeline, and its
 * index among that transaction's events. Every event carries it as
 * "Outbox-Position: <timeline> <commit LSN> <index>" ("1 0/16B3F10 0"); events are published
 * in position order, so the position of the last event the stream holds says which events it
 * holds (with --strict-order).
 */
typedef struct OutboxPosition {
    uint32_t timeline;
    uint64_t lsn;
    uint32_t index;
} OutboxPosition;

/* Longest "Outbox-Position" value, with its NUL. */
#define OUTBOX_POSITION_MAX 48

/* Formats pos as the header value into out. */
void outbox_position_format(const OutboxPosition *pos, char out[static OUTBOX_POSITION_MAX]);
/* Parses a header value; false when it is not one. */
bool outbox_position_parse(const char *s, OutboxPosition *pos);
/* <0, 0, >0 as a comes before, at or after b (timelines are not compared: see callers). */
int outbox_position_cmp(const OutboxPosition *a, const OutboxPosition *b);

/*
 * Creates a mapper for the outbox tables (each "schema.table" or "table", meaning public.table,
 * with its subject template, column roles, extra headers and body), and, when message_prefix
 * is not NULL, for table-less events: logical decoding messages with that prefix, routed by
 * message_subject. Returns 0, or -1 with a reason in err (a malformed template or table name).
 */
int outbox_mapper_new(OutboxMapper **out, const TableConfig *tables, size_t ntables,
                      const char *message_prefix, const char *message_subject, char *err,
                      size_t errlen);
/* The same from the settings: cfg->tables, and messages when cfg->messages. */
int outbox_mapper_from_config(OutboxMapper **out, const Config *cfg, char *err, size_t errlen);
/* One table with the default column layout, no messages: for tools and tests. */
int outbox_mapper_new_table(OutboxMapper **out, const char *table, const char *subject_template,
                            char *err, size_t errlen);
void outbox_mapper_free(OutboxMapper *m);

/* The tables, numbered 0..ntables-1 in the order they were given. */
size_t outbox_mapper_ntables(const OutboxMapper *m);
const char *outbox_mapper_schema(const OutboxMapper *m, size_t i);
const char *outbox_mapper_table(const OutboxMapper *m, size_t i);
/* "schema.table", for messages. */
const char *outbox_mapper_qualified(const OutboxMapper *m, size_t i);
/* The Outbox-Source every event and dead letter carries from now on ("<system id>/<slot>",
 * see anchor.h); "" (the default) adds none. */
void outbox_mapper_set_source(OutboxMapper *m, const char *source);
const char *outbox_mapper_source(const OutboxMapper *m);
/* "public.a, public.b": the tables, for messages. */
void outbox_mapper_describe_tables(const OutboxMapper *m, char *out, size_t n);
/* The column of table i playing role (ROLE_*), or NULL when it has none. */
const char *outbox_mapper_role_column(const OutboxMapper *m, size_t i, int role);

/*
 * Checks table i's column names (as the catalog lists them) against what the mapper needs:
 * the event id and payload columns, every column the subject template reads and every
 * --header column. Returns 0, or -1 with a start-up error in err naming the missing column.
 */
int outbox_mapper_check_columns(const OutboxMapper *m, size_t i, const char *const *names,
                                size_t n, char *err, size_t errlen);

/*
 * Learns a relation from a decoded Relation message. Relations other than the outbox tables
 * are remembered as such. Returns 0, or -1 when an outbox table lacks a needed column.
 */
int outbox_mapper_relation(OutboxMapper *m, const PgoMessage *rel, char *err, size_t errlen);

/* True when relid is an outbox table (as learned from Relation messages). */
bool outbox_mapper_is_outbox(const OutboxMapper *m, uint32_t relid);

/* True when a decoded logical decoding message has the events' prefix (and messages are on). */
bool outbox_mapper_wants_message(const OutboxMapper *m, const PgoMessage *msg);
/* "message prefix outbox": where table-less events come from, for logs and dead letters. */
const char *outbox_mapper_message_label(const OutboxMapper *m);

/* Why a row cannot become an event: the outcome of outbox_map_insert(). */
typedef enum OutboxReject {
    OUTBOX_OK = 0,
    OUTBOX_INVALID_EVENT_ID, /* null, or unfit as a Nats-Msg-Id */
    OUTBOX_NULL_PAYLOAD,     /* null, or a bytea that is not hex */
    OUTBOX_INVALID_SUBJECT,  /* the expanded subject is too long */
    OUTBOX_UNKNOWN_RELATION, /* not an outbox table: a bug or a corrupt stream, never a row */
    OUTBOX_INVALID_ENVELOPE, /* a message that is not a JSON object, or bad "headers" */
} OutboxReject;

/*
 * Maps a decoded Insert into the outbox into ev. The message must stay alive while ev is used
 * (the body may point into it). Returns 0, or -1 with the reason the row cannot become an
 * event in err (event_id or payload null, an event_id unfit as a message id, an unknown
 * relation): the caller must not skip such a row silently.
 */
OutboxReject outbox_map_insert(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                               OutboxEvent *ev, char *err, size_t errlen);

/*
 * Maps a table-less event: a transactional logical decoding message whose content is the JSON
 * envelope {"event_id": "...", "payload": <any JSON>, "aggregate_type": ..., "aggregate_id":
 * ..., "event_type": ..., "occurred_at": ..., "schema_version": ..., "trace_id": ...,
 * "headers": {"Name": "value"}}. The body is the payload's JSON text exactly as written; the
 * message must stay alive while ev is used. Returns OUTBOX_OK or why it cannot be an event.
 */
OutboxReject outbox_map_message(OutboxMapper *m, const PgoMessage *msg, const OutboxTxn *txn,
                                OutboxEvent *ev, char *err, size_t errlen);

/* What a dead letter says about the event it replaces. Unknown parts are NULL. */
typedef struct DeadLetter {
    const char *reason;   /* a short code: invalid_event_id, null_payload, too_large, ... */
    const char *detail;   /* one line */
    const char *table;    /* "schema.table" */
    const char *event_id; /* raw, possibly invalid; NULL when null */
    size_t event_id_len;
    const char *subject;  /* the subject the event would have had */
    const char *body;     /* the event's body; NULL or too large: a JSON pointer replaces it */
    size_t body_len;
    uint64_t commit_lsn;
    int64_t commit_time;  /* µs since 2000-01-01 */
    uint32_t index;       /* the row's position among the transaction's outbox rows */
    uint32_t timeline;
    const char *position; /* the replaced event's Outbox-Position, or NULL: made from
                           * timeline, commit_lsn and index */
    const char *source;   /* Outbox-Source, or NULL for none */
    /* dl may point into the event that is being replaced, but never into out. */
} DeadLetter;

/*
 * Builds the dead-letter event for dl into out: subject dlq_subject; Nats-Msg-Id "dlq-<event_id>",
 * or "dlq-<commit LSN>-<index>" when the event_id is unusable (stable across restarts either
 * way, so a repeat is dropped as a duplicate);
 * headers Outbox-Dead-Letter-Reason, -Detail, Outbox-Original-Subject, Outbox-Event-Id,
 * Outbox-Table, Outbox-Commit-Lsn, Outbox-Commit-Time, Outbox-Position and Outbox-Source (the
 * dead letter stands in the event's place in the stream). The body is the original body when it
 * is given and at most max_body bytes, else a short JSON object pointing at the row.
 */
void outbox_dead_letter(OutboxEvent *out, const char *dlq_subject, const DeadLetter *dl,
                        size_t max_body);

/* Fills dl from a row that outbox_map_insert() rejected, as far as the row allows. Pointers
 * refer to the message and the mapper. */
void outbox_describe_row(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                         uint32_t index, DeadLetter *dl);

/* Fills dl from a message that outbox_map_message() rejected, as far as it allows. */
void outbox_describe_message(OutboxMapper *m, const PgoMessage *msg, const OutboxTxn *txn,
                             uint32_t index, DeadLetter *dl);

#endif
