/*
 * fuzz_outbox - outbox rows to events and dead letters.
 *
 * Two input shapes, chosen by the first byte:
 *   'W'  wire: a template choice byte, then records of [u16 big-endian length][pgoutput message].
 *        Each record is decoded with pgoutput_decode() and fed to the mapper as the relay does:
 *        Begin sets the transaction, Relation goes to outbox_mapper_relation(), Insert to
 *        outbox_map_insert(). The seeds are real captured messages (tests/fixtures/pgoutput).
 *   else synthetic: a template and a table choice, a transaction, a dead-letter body limit, then
 *        up to MAX_OPS operations, each a Relation (relid, names, up to MAX_COLS columns with
 *        names and type OIDs from the input), an Insert (relid, up to MAX_COLS values of kind
 *        n/u/t/b with data from the input) or a new Begin. This reaches the mapper with shapes
 *        the decoder would also accept but that are hard to reach through its wire format.
 * Every name and value is in its own exact-size block (see fuzz.h).
 *
 * After each Insert: outbox_map_insert(); for a mapped event, the checks below and a dead letter
 * built from it (as for an event too large to publish); for a rejected row,
 * outbox_describe_row() and outbox_dead_letter(). Invariants, from outbox.h:
 *   - a mapped event's Nats-Msg-Id is the event_id, 1..OUTBOX_MAX_EVENT_ID bytes of printable
 *     ASCII without space; its subject is valid and at most OUTBOX_MAX_SUBJECT bytes;
 *   - every header value is non-empty and has no control byte (CR/LF would split the header);
 *   - a dead letter's Nats-Msg-Id starts with "dlq-" and has no control byte or space, its
 *     subject is the dead-letter subject, and a body it had to replace is a JSON object naming
 *     the table, the commit LSN and the reason;
 *   - a rejected row has a non-empty one-line reason (the relay passes it on as the dead
 *     letter's detail, which outbox.h documents as one line). Mapper set-up errors only have to
 *     be non-empty: outbox.h does not promise one line there, and they quote the table name.
 */
#include <string.h>

#include <jansson.h>

#include "fuzz.h"
#include "outboxd/outbox.h"
#include "outboxd/pgoutput.h"
#include "outboxd/subject.h"

#define MAX_OPS 16
#define MAX_COLS 24
#define DLQ_SUBJECT "outbox.dead_letter"

static const char *const templates[] = {
    "outbox.{aggregate_type}.{event_type}",
    "orders.{aggregate_id}-v1",
    "ev.{event_id}.{payload}.{trace_id}",
    "{aggregate_type}",
    "x.{occurred_at}.{schema_version}.{aggregate_type}{aggregate_id}",
    "fixed.subject",
    "t.{c0}.{c1}.{c0}",
};
static const char *const tables[] = {"public.outbox", "outbox", "app.events"};
static const char *const column_names[] = {
    "event_id",    "aggregate_type", "aggregate_id", "event_type", "payload",
    "occurred_at", "schema_version", "trace_id",     "c0",         "c1",
};
static const uint32_t type_oids[] = {25, 17, 1184, 3802, 2950, 23}; /* text bytea timestamptz
                                                                      jsonb uuid int4 */

static PgoMessage rel, ins; /* ~64 KiB each: not on the stack */

/* Blocks to free at the end of the input. */
typedef struct Pool {
    void *p[2 * MAX_OPS * (MAX_COLS + 4) + 16];
    size_t n;
} Pool;

static void *keep(Pool *pool, void *p)
{
    FUZZ_ASSERT(pool->n < sizeof pool->p / sizeof pool->p[0]);
    pool->p[pool->n++] = p;
    return p;
}

static void check_headers(const OutboxEvent *ev)
{
    FUZZ_ASSERT(ev->nheaders >= 1 && ev->nheaders <= OUTBOX_MAX_HEADERS);
    FUZZ_ASSERT(strcmp(ev->headers[0].name, OUTBOX_HDR_MSG_ID) == 0);
    FUZZ_ASSERT(ev->msg_id == ev->hvals.data + ev->headers[0].off);
    FUZZ_ASSERT(outbox_event_header(ev, OUTBOX_HDR_MSG_ID) == ev->msg_id);
    for (size_t i = 0; i < ev->nheaders; i++) {
        FUZZ_ASSERT(ev->headers[i].name && ev->headers[i].name[0]);
        FUZZ_ASSERT(ev->headers[i].off < ev->hvals.len);
        const char *v = ev->hvals.data + ev->headers[i].off;
        size_t n = strlen(v);
        FUZZ_ASSERT(n > 0 && ev->headers[i].off + n < ev->hvals.len + 1);
        FUZZ_ASSERT(ev->headers[i].len == n); /* what wire_encode() copies */
        for (size_t j = 0; j < n; j++)
            FUZZ_ASSERT((unsigned char)v[j] >= 0x20 && (unsigned char)v[j] != 0x7f);
    }
}

static void touch(const char *p, size_t n)
{
    volatile unsigned char sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (unsigned char)p[i];
    (void)sum;
}

static void check_event(const OutboxEvent *ev, const PgoValue *event_id)
{
    check_headers(ev);
    size_t idlen = strlen(ev->msg_id);
    FUZZ_ASSERT(idlen >= 1 && idlen <= OUTBOX_MAX_EVENT_ID);
    for (size_t i = 0; i < idlen; i++)
        FUZZ_ASSERT((unsigned char)ev->msg_id[i] > 0x20 && (unsigned char)ev->msg_id[i] < 0x7f);
    if (event_id)
        FUZZ_ASSERT(event_id->len == idlen && memcmp(event_id->data, ev->msg_id, idlen) == 0);
    FUZZ_ASSERT(ev->subject.data && strlen(ev->subject.data) == ev->subject.len);
    FUZZ_ASSERT(ev->subject.len <= OUTBOX_MAX_SUBJECT);
    FUZZ_ASSERT(subject_is_valid(ev->subject.data, ev->subject.len));
    FUZZ_ASSERT(ev->body || ev->body_len == 0);
    touch(ev->body, ev->body_len);
}

static void check_dead_letter(const OutboxEvent *out, const DeadLetter *dl, size_t max_body)
{
    check_headers(out);
    size_t idlen = strlen(out->msg_id);
    FUZZ_ASSERT(idlen > 4 && strncmp(out->msg_id, "dlq-", 4) == 0);
    for (size_t i = 0; i < idlen; i++)
        FUZZ_ASSERT((unsigned char)out->msg_id[i] > 0x20 && (unsigned char)out->msg_id[i] < 0x7f);
    FUZZ_ASSERT(strcmp(out->subject.data, DLQ_SUBJECT) == 0);
    if (dl->body && dl->body_len <= max_body) {
        FUZZ_ASSERT(out->body == dl->body && out->body_len == dl->body_len);
        return;
    }
    json_error_t jerr;
    json_t *o = json_loadb(out->body, out->body_len, JSON_ALLOW_NUL, &jerr);
    FUZZ_ASSERT(o && json_is_object(o));
    FUZZ_ASSERT(json_object_get(o, "table") && json_object_get(o, "commit_lsn") &&
                json_object_get(o, "reason"));
    json_decref(o);
}

/* Maps the Insert in ins and checks the event or the dead letter that replaces it. */
static void map_one(OutboxMapper *m, const OutboxTxn *txn, uint32_t index, size_t max_body,
                    OutboxEvent *ev, OutboxEvent *dlq)
{
    char err[512];
    err[0] = '\0';
    OutboxReject r = outbox_map_insert(m, &ins, txn, ev, err, sizeof err);
    DeadLetter dl;
    if (r == OUTBOX_OK) {
        check_event(ev, NULL);
        /* As the relay does for an event too large to publish: dl points into ev. */
        memset(&dl, 0, sizeof dl);
        dl.reason = "too_large";
        dl.detail = "the event is larger than the server allows";
        dl.table = outbox_mapper_qualified(m, 0);
        dl.event_id = ev->msg_id;
        dl.event_id_len = strlen(ev->msg_id);
        dl.subject = ev->subject.data;
        dl.body = ev->body;
        dl.body_len = ev->body_len;
        dl.commit_lsn = txn->commit_lsn;
        dl.commit_time = txn->commit_time;
        dl.index = index;
        outbox_dead_letter(dlq, DLQ_SUBJECT, &dl, max_body);
        check_dead_letter(dlq, &dl, max_body);
        return;
    }
    FUZZ_ASSERT(r == OUTBOX_INVALID_EVENT_ID || r == OUTBOX_NULL_PAYLOAD ||
                r == OUTBOX_INVALID_SUBJECT || r == OUTBOX_UNKNOWN_RELATION);
    size_t n = strlen(err);
    FUZZ_ASSERT(n > 0 && fuzz_one_line(err, n));
    outbox_describe_row(m, &ins, txn, index, &dl);
    dl.reason = r == OUTBOX_INVALID_EVENT_ID ? "invalid_event_id"
                : r == OUTBOX_NULL_PAYLOAD   ? "null_payload"
                : r == OUTBOX_INVALID_SUBJECT ? "invalid_subject"
                                              : "unknown_relation";
    dl.detail = err;
    if (dl.subject)
        touch(dl.subject, strlen(dl.subject));
    if (dl.event_id)
        touch(dl.event_id, dl.event_id_len);
    outbox_dead_letter(dlq, DLQ_SUBJECT, &dl, max_body);
    check_dead_letter(dlq, &dl, max_body);
}

/* A logical decoding message: an event, or a dead letter saying why not. */
static void map_message(OutboxMapper *m, const OutboxTxn *txn, uint32_t index,
                        const PgoMessage *msg, OutboxEvent *ev, OutboxEvent *dlq)
{
    if (!outbox_mapper_wants_message(m, msg))
        return;
    char err[512];
    err[0] = '\0';
    OutboxReject rej = outbox_map_message(m, msg, txn, ev, err, sizeof err);
    if (rej == OUTBOX_OK) {
        FUZZ_ASSERT(ev->msg_id && ev->msg_id[0]);
        FUZZ_ASSERT(subject_is_valid(ev->subject.data, ev->subject.len));
        FUZZ_ASSERT(ev->body_len <= msg->u.message.len);
        FUZZ_ASSERT(ev->body >= msg->u.message.content &&
                    ev->body + ev->body_len <= msg->u.message.content + msg->u.message.len);
        for (size_t i = 0; i < ev->nheaders; i++)
            touch(ev->hvals.data + ev->headers[i].off, strlen(ev->hvals.data + ev->headers[i].off));
        return;
    }
    FUZZ_ASSERT(err[0] != '\0');
    DeadLetter dl;
    outbox_describe_message(m, msg, txn, index, &dl);
    dl.reason = "invalid_envelope";
    dl.detail = err;
    if (dl.event_id)
        touch(dl.event_id, dl.event_id_len);
    outbox_dead_letter(dlq, DLQ_SUBJECT, &dl, 256);
    check_dead_letter(dlq, &dl, 256);
}

static int new_mapper(OutboxMapper **m, FuzzInput *in, Pool *pool)
{
    uint8_t tc = fuzz_u8(in), tb = fuzz_u8(in), shape = fuzz_u8(in);
    const char *tmpl = tc % 8 < 7 ? templates[tc % 8] : keep(pool, fuzz_str(in));
    const char *table = tb % 4 < 3 ? tables[tb % 4] : keep(pool, fuzz_str(in));
    char err[512];
    err[0] = '\0';
    /* The shape bits: envelope bodies, the Debezium layout, an extra header. */
    TableConfig tcfg = {.table = (char *)table,
                        .subject = (char *)tmpl,
                        .body = shape & 1 ? "envelope" : "payload",
                        .columns = shape & 2 ? "debezium" : "outboxd",
                        .headers = shape & 4 ? "aggregate_id:Agg" : NULL};
    if (outbox_mapper_new(m, &tcfg, 1, "outbox", tmpl, err, sizeof err) < 0) {
        FUZZ_ASSERT(err[0] != '\0'); /* may quote the table name, newlines and all */
        return -1;
    }
    return 0;
}

static void run_wire(FuzzInput *in, Pool *pool)
{
    OutboxMapper *m;
    if (new_mapper(&m, in, pool) < 0)
        return;
    OutboxEvent ev, dlq;
    outbox_event_init(&ev);
    outbox_event_init(&dlq);
    OutboxTxn txn = {0, 0};
    uint32_t index = 0;
    for (int op = 0; op < MAX_OPS && in->len > 0; op++) {
        size_t n = fuzz_u16(in);
        if (n > in->len)
            n = in->len;
        char *buf = keep(pool, fuzz_take(in, n));
        char err[256];
        PgoMessage *msg = n > 0 && buf[0] == 'R' ? &rel : &ins;
        if (pgoutput_decode(buf, n, msg, err, sizeof err) < 0)
            continue;
        switch (msg->kind) {
        case PGO_BEGIN:
            txn.commit_lsn = msg->u.begin.final_lsn;
            txn.commit_time = msg->u.begin.commit_time;
            index = 0;
            break;
        case PGO_RELATION:
            err[0] = '\0';
            if (outbox_mapper_relation(m, &rel, err, sizeof err) < 0)
                FUZZ_ASSERT(err[0] != '\0');
            break;
        case PGO_INSERT:
            map_one(m, &txn, index++, 256, &ev, &dlq);
            break;
        case PGO_MESSAGE:
            map_message(m, &txn, index++, msg, &ev, &dlq);
            break;
        default:
            break;
        }
    }
    outbox_event_deinit(&dlq);
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

static void read_relation(FuzzInput *in, Pool *pool, const OutboxMapper *m)
{
    rel.kind = PGO_RELATION;
    rel.u.relation.relid = fuzz_u8(in) % 4;
    uint8_t names = fuzz_u8(in);
    switch (names % 4) {
    case 0: /* the outbox */
        rel.u.relation.nspname = outbox_mapper_schema(m, 0);
        rel.u.relation.relname = outbox_mapper_table(m, 0);
        break;
    case 1: /* same table, other schema */
        rel.u.relation.nspname = "other";
        rel.u.relation.relname = outbox_mapper_table(m, 0);
        break;
    case 2:
        rel.u.relation.nspname = outbox_mapper_schema(m, 0);
        rel.u.relation.relname = "orders";
        break;
    default:
        rel.u.relation.nspname = keep(pool, fuzz_str(in));
        rel.u.relation.relname = keep(pool, fuzz_str(in));
        break;
    }
    rel.u.relation.replident = 'd';
    uint16_t ncols = fuzz_u8(in) % (MAX_COLS + 1);
    rel.u.relation.ncols = ncols;
    for (uint16_t i = 0; i < ncols; i++) {
        PgoColumn *c = &rel.cols[i];
        c->flags = fuzz_u8(in) & 1;
        uint8_t nb = fuzz_u8(in);
        c->name = nb < 0xf0 ? column_names[nb % (sizeof column_names / sizeof column_names[0])]
                            : keep(pool, fuzz_str(in));
        uint8_t tb = fuzz_u8(in) % 7;
        c->type_oid = tb < 6 ? type_oids[tb] : fuzz_u32(in);
        c->typmod = -1;
    }
}

static void read_insert(FuzzInput *in, Pool *pool)
{
    ins.kind = PGO_INSERT;
    ins.u.insert.relid = fuzz_u8(in) % 4;
    uint16_t ncols = fuzz_u8(in) % (MAX_COLS + 1);
    ins.u.insert.ncols = ncols;
    for (uint16_t i = 0; i < ncols; i++) {
        PgoValue *v = &ins.values[i];
        static const char kinds[] = {'t', 'n', 'u', 'b'};
        v->kind = kinds[fuzz_u8(in) % 4];
        if (v->kind == 'n' || v->kind == 'u') {
            v->data = NULL;
            v->len = 0;
        } else {
            size_t n = fuzz_len(in);
            v->data = keep(pool, fuzz_take(in, n));
            v->len = (uint32_t)n;
        }
    }
}

/* A transaction: a raw LSN, and a commit time that is raw or, for a selector byte from 0xf0,
 * one of the edge values a corrupt stream could carry. */
static void read_txn(FuzzInput *in, OutboxTxn *txn)
{
    static const int64_t edges[] = {
        0, -1, 1, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1,
        INT64_C(9223372036854775807) - INT64_C(946684800000000), /* PG_EPOCH_OFFSET_US */
    };
    txn->commit_lsn = fuzz_u64(in);
    uint8_t sel = fuzz_u8(in);
    txn->commit_time =
        sel < 0xf0 ? (int64_t)fuzz_u64(in) : edges[sel % (sizeof edges / sizeof edges[0])];
}

static void run_synthetic(FuzzInput *in, Pool *pool)
{
    OutboxMapper *m;
    if (new_mapper(&m, in, pool) < 0)
        return;
    OutboxTxn txn;
    read_txn(in, &txn);
    size_t max_body = fuzz_u16(in);
    OutboxEvent ev, dlq;
    outbox_event_init(&ev);
    outbox_event_init(&dlq);
    uint32_t index = 0;
    for (int op = 0; op < MAX_OPS && in->len > 0; op++) {
        char err[512];
        switch (fuzz_u8(in) % 3) {
        case 0:
            read_relation(in, pool, m);
            err[0] = '\0';
            if (outbox_mapper_relation(m, &rel, err, sizeof err) < 0)
                FUZZ_ASSERT(err[0] != '\0');
            break;
        case 1:
            read_insert(in, pool);
            map_one(m, &txn, index++, max_body, &ev, &dlq);
            break;
        default:
            read_txn(in, &txn);
            index = 0;
            break;
        }
    }
    outbox_event_deinit(&dlq);
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FuzzInput in = {data, size};
    Pool pool;
    pool.n = 0;
    if (size > 0 && data[0] == 'W') {
        fuzz_u8(&in);
        run_wire(&in, &pool);
    } else {
        fuzz_u8(&in);
        run_synthetic(&in, &pool);
    }
    for (size_t i = 0; i < pool.n; i++)
        free(pool.p[i]);
    return 0;
}
