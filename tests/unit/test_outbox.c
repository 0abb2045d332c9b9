/* Unit tests for the outbox mapper: decoded Relation + Insert -> event. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "outboxd/outbox.h"

#define OID_TEXT 25
#define OID_UUID 2950
#define OID_JSONB 3802
#define OID_BYTEA 17
#define OID_TIMESTAMPTZ 1184
#define OID_INT4 23

typedef struct Col {
    const char *name;
    unsigned oid;
    const char *value; /* NULL = SQL NULL */
} Col;

static PgoMessage *msg;

static void relation(uint32_t relid, const char *nsp, const char *rel, const Col *cols, int n)
{
    memset(msg, 0, sizeof(*msg));
    msg->kind = PGO_RELATION;
    msg->u.relation.relid = relid;
    msg->u.relation.nspname = nsp;
    msg->u.relation.relname = rel;
    msg->u.relation.ncols = (uint16_t)n;
    for (int i = 0; i < n; i++) {
        msg->cols[i].name = cols[i].name;
        msg->cols[i].type_oid = cols[i].oid;
    }
}

static void insert(uint32_t relid, const Col *cols, int n)
{
    memset(msg, 0, sizeof(*msg));
    msg->kind = PGO_INSERT;
    msg->u.insert.relid = relid;
    msg->u.insert.ncols = (uint16_t)n;
    for (int i = 0; i < n; i++) {
        msg->values[i].kind = cols[i].value ? 't' : 'n';
        msg->values[i].data = cols[i].value;
        msg->values[i].len = cols[i].value ? (uint32_t)strlen(cols[i].value) : 0;
    }
}

static const OutboxTxn txn = {.commit_lsn = 0x16B3748, .commit_time = 0};

static void test_default_table(void)
{
    OutboxMapper *m;
    char err[256];
    CHECK(outbox_mapper_new(&m, "public.outbox", "outbox.{aggregate_type}.{event_type}", err,
                            sizeof(err)) == 0);
    CHECK_STR(outbox_mapper_qualified(m), "public.outbox");
    Col cols[] = {
        {"event_id", OID_UUID, "5e5f88a5-1281-4836-8412-0c2a3a9b23b2"},
        {"aggregate_type", OID_TEXT, "order"},
        {"aggregate_id", OID_TEXT, "42"},
        {"event_type", OID_TEXT, "created"},
        {"payload", OID_JSONB, "{\"a\": 1}"},
        {"occurred_at", OID_TIMESTAMPTZ, "2026-11-22 17:26:18.5+00"},
        {"schema_version", OID_INT4, "1"},
        {"trace_id", OID_TEXT, NULL},
    };
    relation(16384, "public", "outbox", cols, 8);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    CHECK(outbox_mapper_is_outbox(m, 16384));
    CHECK(!outbox_mapper_is_outbox(m, 99));
    insert(16384, cols, 8);
    OutboxEvent ev;
    outbox_event_init(&ev);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == 0);
    CHECK_STR(ev.subject.data, "outbox.order.created");
    CHECK_STR(ev.msg_id, "5e5f88a5-1281-4836-8412-0c2a3a9b23b2");
    CHECK_MEM(ev.body, ev.body_len, "{\"a\": 1}", 8);
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_MSG_ID), "5e5f88a5-1281-4836-8412-0c2a3a9b23b2");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_EVENT_TYPE), "created");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_TYPE), "order");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_ID), "42");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_OCCURRED_AT), "2026-11-22T17:26:18.5Z");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_SCHEMA_VERSION), "1");
    CHECK(outbox_event_header(&ev, OUTBOX_HDR_TRACE_ID) == NULL); /* NULL column: no header */
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_COMMIT_LSN), "0/16B3748");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_COMMIT_TIME), "2000-01-01T00:00:00.000000Z");

    /* Values that would break a subject or a header are escaped. */
    cols[1].value = "order.v2 *";
    cols[2].value = "line1\r\nInjected: yes";
    cols[7].value = "t-1";
    insert(16384, cols, 8);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == 0);
    CHECK_STR(ev.subject.data, "outbox.order%2Ev2%20%2A.created");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_ID), "line1%0D%0AInjected: yes");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_TRACE_ID), "t-1");

    /* Rows that cannot become events are refused with the reason. */
    cols[0].value = NULL;
    insert(16384, cols, 8);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_EVENT_ID);
    CHECK(strstr(err, "event_id is null") != NULL);
    cols[0].value = "has space";
    insert(16384, cols, 8);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_EVENT_ID);
    CHECK(strstr(err, "Nats-Msg-Id") != NULL);
    cols[0].value = "ok-id";
    cols[4].value = NULL;
    insert(16384, cols, 8);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_NULL_PAYLOAD);
    CHECK(strstr(err, "payload is null") != NULL);
    insert(77, cols, 8);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_UNKNOWN_RELATION);

    /* A subject too long for a NATS publish line. */
    cols[4].value = "{}";
    char *longtype = malloc(OUTBOX_MAX_SUBJECT + 1);
    memset(longtype, 'x', OUTBOX_MAX_SUBJECT);
    longtype[OUTBOX_MAX_SUBJECT] = '\0';
    cols[1].value = longtype;
    insert(16384, cols, 8);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_SUBJECT);
    free(longtype);

    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

static void test_columns_by_name_and_bytea(void)
{
    OutboxMapper *m;
    char err[256];
    CHECK(outbox_mapper_new(&m, "events", "ev.{aggregate_id}", err, sizeof(err)) == 0);
    CHECK_STR(outbox_mapper_qualified(m), "public.events");
    /* Another order, an extra column, a bytea payload. */
    Col cols[] = {
        {"extra", OID_TEXT, "x"},
        {"payload", OID_BYTEA, "\\x00ff10"},
        {"aggregate_id", OID_TEXT, ""},
        {"event_id", OID_TEXT, "id-1"},
    };
    relation(5, "public", "events", cols, 4);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    insert(5, cols, 4);
    OutboxEvent ev;
    outbox_event_init(&ev);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == 0);
    CHECK_MEM(ev.body, ev.body_len, "\x00\xff\x10", 3);
    CHECK_STR(ev.subject.data, "ev._");
    CHECK(outbox_event_header(&ev, OUTBOX_HDR_EVENT_TYPE) == NULL);
    CHECK(outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_ID) == NULL); /* empty: no header */
    cols[1].value = "\\x0g";
    insert(5, cols, 4);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_NULL_PAYLOAD);

    /* ALTER TABLE dropping event_id: the new Relation is refused, and so are its inserts. */
    Col altered[] = {{"payload", OID_JSONB, "{}"}, {"aggregate_id", OID_TEXT, "1"}};
    relation(5, "public", "events", altered, 2);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) < 0);
    CHECK(strstr(err, "has no column \"event_id\"") != NULL);
    CHECK(!outbox_mapper_is_outbox(m, 5));

    /* A same-named table in another schema is not the outbox. */
    relation(6, "other", "events", cols, 4);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    CHECK(!outbox_mapper_is_outbox(m, 6));
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

static void test_start_up_column_check(void)
{
    OutboxMapper *m;
    char err[256];
    CHECK(outbox_mapper_new(&m, "public.outbox", "o.{tenant}", err, sizeof(err)) == 0);
    const char *good[] = {"event_id", "payload", "tenant"};
    CHECK(outbox_mapper_check_columns(m, good, 3, err, sizeof(err)) == 0);
    const char *no_tenant[] = {"event_id", "payload"};
    CHECK(outbox_mapper_check_columns(m, no_tenant, 2, err, sizeof(err)) < 0);
    CHECK(strstr(err, "subject template names column \"tenant\"") != NULL);
    const char *no_payload[] = {"event_id", "tenant"};
    CHECK(outbox_mapper_check_columns(m, no_payload, 2, err, sizeof(err)) < 0);
    CHECK(strstr(err, "has no column \"payload\"") != NULL);
    outbox_mapper_free(m);

    CHECK(outbox_mapper_new(&m, "a.b.c", "o", err, sizeof(err)) < 0);
    CHECK(outbox_mapper_new(&m, ".b", "o", err, sizeof(err)) < 0);
    CHECK(outbox_mapper_new(&m, "a.", "o", err, sizeof(err)) < 0);
    CHECK(outbox_mapper_new(&m, "t", "o.{", err, sizeof(err)) < 0);
}

static void test_dead_letters(void)
{
    OutboxMapper *m;
    char err[256];
    CHECK(outbox_mapper_new(&m, "public.outbox", "outbox.{aggregate_type}", err, sizeof(err)) ==
          0);
    Col cols[] = {
        {"event_id", OID_TEXT, NULL},
        {"aggregate_type", OID_TEXT, "order"},
        {"payload", OID_JSONB, "{\"a\": 1}"},
    };
    relation(9, "public", "outbox", cols, 3);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    insert(9, cols, 3);
    OutboxTxn t = {.commit_lsn = 0x100000ABC, .commit_time = 0};
    DeadLetter dl;
    outbox_describe_row(m, msg, &t, 3, &dl);
    CHECK(dl.event_id == NULL);
    CHECK_STR(dl.subject, "outbox.order");
    CHECK_STR(dl.table, "public.outbox");
    CHECK_MEM(dl.body, dl.body_len, "{\"a\": 1}", 8);
    CHECK(dl.index == 3 && dl.commit_lsn == 0x100000ABC);
    dl.reason = "invalid_event_id";
    dl.detail = "event_id is null";

    OutboxEvent out;
    outbox_event_init(&out);
    outbox_dead_letter(&out, "outbox.dead_letter", &dl, 1024);
    CHECK_STR(out.subject.data, "outbox.dead_letter");
    CHECK_STR(out.msg_id, "dlq-1-ABC-3"); /* no usable event_id: position in the WAL */
    CHECK_STR(outbox_event_header(&out, OUTBOX_HDR_DL_REASON), "invalid_event_id");
    CHECK_STR(outbox_event_header(&out, OUTBOX_HDR_DL_DETAIL), "event_id is null");
    CHECK_STR(outbox_event_header(&out, OUTBOX_HDR_ORIGINAL_SUBJECT), "outbox.order");
    CHECK_STR(outbox_event_header(&out, OUTBOX_HDR_TABLE), "public.outbox");
    CHECK_STR(outbox_event_header(&out, OUTBOX_HDR_COMMIT_LSN), "1/ABC");
    CHECK(outbox_event_header(&out, OUTBOX_HDR_EVENT_ID) == NULL);
    CHECK_MEM(out.body, out.body_len, "{\"a\": 1}", 8); /* fits: the original body */

    /* A usable event id names the dead letter; a body over the limit becomes a pointer. */
    dl.event_id = "evt-1\r\nX: y";
    dl.event_id_len = strlen(dl.event_id);
    outbox_dead_letter(&out, "dlq", &dl, 4);
    CHECK_STR(out.msg_id, "dlq-1-ABC-3"); /* CR/LF: still not usable */
    CHECK_STR(outbox_event_header(&out, OUTBOX_HDR_EVENT_ID), "evt-1%0D%0AX: y");
    dl.event_id = "evt-1";
    dl.event_id_len = 5;
    outbox_dead_letter(&out, "dlq", &dl, 4);
    CHECK_STR(out.msg_id, "dlq-evt-1");
    CHECK(out.body_len > 0 && out.body[0] == '{');
    CHECK(strstr(out.body, "\"event_id\":\"evt-1\"") != NULL);
    CHECK(strstr(out.body, "\"commit_lsn\":\"1/ABC\"") != NULL);
    CHECK(strstr(out.body, "\"reason\":\"invalid_event_id\"") != NULL);
    CHECK(strstr(out.body, "\"body_bytes\":8") != NULL);
    outbox_event_deinit(&out);
    outbox_mapper_free(m);
}

int main(void)
{
    msg = malloc(sizeof(*msg));
    test_default_table();
    test_columns_by_name_and_bytea();
    test_start_up_column_check();
    test_dead_letters();
    free(msg);
    return check_report("test_outbox");
}
