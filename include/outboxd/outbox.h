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

#define OUTBOX_MAX_HEADERS 16
/* Longest event_id accepted as a Nats-Msg-Id. */
#define OUTBOX_MAX_EVENT_ID 255

typedef struct OutboxHeader {
    const char *name;
    size_t off; /* value offset in OutboxEvent.hvals, NUL-terminated there */
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
    uint64_t commit_lsn;
    int64_t commit_time;        /* µs since 2000-01-01 */
} OutboxEvent;

void outbox_event_init(OutboxEvent *ev);
void outbox_event_deinit(OutboxEvent *ev);
/* Returns the value of header name, or NULL. */
const char *outbox_event_header(const OutboxEvent *ev, const char *name);

typedef struct OutboxMapper OutboxMapper;

/* The transaction an insert belongs to, from its Begin message. */
typedef struct OutboxTxn {
    uint64_t commit_lsn;
    int64_t commit_time; /* µs since 2000-01-01 */
} OutboxTxn;

/* Columns the mapper looks for, by name. event_id and payload are required. */
extern const char *const outbox_required_columns[2];

/*
 * Creates a mapper for table ("schema.table" or "table", meaning public.table) and a subject
 * template. Returns 0, or -1 with a reason in err (a malformed template or table name).
 */
int outbox_mapper_new(OutboxMapper **out, const char *table, const char *subject_template,
                      char *err, size_t errlen);
void outbox_mapper_free(OutboxMapper *m);

const char *outbox_mapper_schema(const OutboxMapper *m);
const char *outbox_mapper_table(const OutboxMapper *m);
/* "schema.table", for messages. */
const char *outbox_mapper_qualified(const OutboxMapper *m);

/*
 * Checks a table's column names (as the catalog lists them) against what the mapper needs:
 * event_id, payload and every column the subject template names. Returns 0, or -1 with a
 * start-up error in err naming the missing column.
 */
int outbox_mapper_check_columns(const OutboxMapper *m, const char *const *names, size_t n,
                                char *err, size_t errlen);

/*
 * Learns a relation from a decoded Relation message. Relations other than the outbox are
 * remembered as such. Returns 0, or -1 when the outbox table lacks a needed column.
 */
int outbox_mapper_relation(OutboxMapper *m, const PgoMessage *rel, char *err, size_t errlen);

/* True when relid is the outbox table (as learned from Relation messages). */
bool outbox_mapper_is_outbox(const OutboxMapper *m, uint32_t relid);

/*
 * Maps a decoded Insert into the outbox into ev. The message must stay alive while ev is used
 * (the body may point into it). Returns 0, or -1 with the reason the row cannot become an
 * event in err (event_id or payload null, an event_id unfit as a message id, an unknown
 * relation): the caller must not skip such a row silently.
 */
int outbox_map_insert(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                      OutboxEvent *ev, char *err, size_t errlen);

#endif
