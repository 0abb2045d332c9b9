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
    CHECK(outbox_mapper_new_table(&m, "public.outbox", "outbox.{aggregate_type}.{event_type}", err,
                            sizeof(err)) == 0);
    CHECK_STR(outbox_mapper_qualified(m, 0), "public.outbox");
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

    /* Every byte value at every place of a word: only control bytes and DEL are escaped. */
    int wrong = 0;
    for (int c = 1; c < 256 && !wrong; c++) {
        for (int pos = 0; pos < 19; pos++) {
            char value[20], want[24];
            memset(value, 'a', 19);
            value[19] = '\0';
            value[pos] = (char)c;
            size_t k = 0;
            for (int i = 0; i < 19; i++) {
                unsigned char b = (unsigned char)value[i];
                if (b < 0x20 || b == 0x7f)
                    k += (size_t)snprintf(want + k, sizeof(want) - k, "%%%02X", b);
                else
                    want[k++] = (char)b;
            }
            want[k] = '\0';
            cols[2].value = value;
            insert(16384, cols, 8);
            const char *got = outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == 0
                                  ? outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_ID)
                                  : NULL;
            if (!got || strcmp(got, want) != 0) {
                fprintf(stderr, "byte 0x%02X at %d: got \"%s\", want \"%s\"\n", c, pos,
                        got ? got : "(null)", want);
                wrong++;
                break;
            }
        }
    }
    CHECK(wrong == 0);
    cols[2].value = "42"; /* the loop's value is out of scope now */

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
    CHECK(outbox_mapper_new_table(&m, "events", "ev.{aggregate_id}", err, sizeof(err)) == 0);
    CHECK_STR(outbox_mapper_qualified(m, 0), "public.events");
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
    CHECK(outbox_mapper_new_table(&m, "public.outbox", "o.{tenant}", err, sizeof(err)) == 0);
    const char *good[] = {"event_id", "payload", "tenant"};
    CHECK(outbox_mapper_check_columns(m, 0, good, 3, err, sizeof(err)) == 0);
    const char *no_tenant[] = {"event_id", "payload"};
    CHECK(outbox_mapper_check_columns(m, 0, no_tenant, 2, err, sizeof(err)) < 0);
    CHECK(strstr(err, "subject template names column \"tenant\"") != NULL);
    const char *no_payload[] = {"event_id", "tenant"};
    CHECK(outbox_mapper_check_columns(m, 0, no_payload, 2, err, sizeof(err)) < 0);
    CHECK(strstr(err, "has no column \"payload\"") != NULL);
    outbox_mapper_free(m);

    CHECK(outbox_mapper_new_table(&m, "a.b.c", "o", err, sizeof(err)) < 0);
    CHECK(outbox_mapper_new_table(&m, ".b", "o", err, sizeof(err)) < 0);
    CHECK(outbox_mapper_new_table(&m, "a.", "o", err, sizeof(err)) < 0);
    CHECK(outbox_mapper_new_table(&m, "t", "o.{", err, sizeof(err)) < 0);
}

static void test_dead_letters(void)
{
    OutboxMapper *m;
    char err[256];
    CHECK(outbox_mapper_new_table(&m, "public.outbox", "outbox.{aggregate_type}", err, sizeof(err)) ==
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

/* A Debezium outbox table through the preset: id, aggregatetype, aggregateid, type, payload;
 * "{aggregate_type}" in the template reads aggregatetype. */
static void test_debezium_preset_and_extra_headers(void)
{
    OutboxMapper *m;
    char err[256];
    TableConfig tc = {.table = "public.outboxevent",
                      .subject = "outbox.event.{aggregate_type}.{aggregate_id}",
                      .columns = "debezium",
                      .headers = "tenant:Tenant-Id,created:Created-At"};
    CHECK(outbox_mapper_new(&m, &tc, 1, NULL, NULL, err, sizeof(err)) == 0);
    CHECK(outbox_mapper_role_column(m, 0, ROLE_EVENT_ID) != NULL);
    CHECK_STR(outbox_mapper_role_column(m, 0, ROLE_EVENT_ID), "id");
    CHECK(outbox_mapper_role_column(m, 0, ROLE_OCCURRED_AT) == NULL);
    Col cols[] = {
        {"id", OID_UUID, "0b6d6c3a-6c3e-4b87-9b4e-2f1e0c2d3a4b"},
        {"aggregatetype", OID_TEXT, "Order"},
        {"aggregateid", OID_TEXT, "o.17"},
        {"type", OID_TEXT, "OrderCreated"},
        {"payload", OID_JSONB, "{\"total\": 5}"},
        {"tenant", OID_TEXT, "acme"},
        {"created", OID_TIMESTAMPTZ, "2026-11-22 10:00:00+00"},
    };
    const char *names[] = {"id", "aggregatetype", "aggregateid", "type", "payload"};
    CHECK(outbox_mapper_check_columns(m, 0, names, 5, err, sizeof(err)) < 0);
    CHECK(strstr(err, "--header names column \"tenant\"") != NULL);
    relation(20000, "public", "outboxevent", cols, 7);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    insert(20000, cols, 7);
    OutboxEvent ev;
    outbox_event_init(&ev);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_OK);
    CHECK_STR(ev.subject.data, "outbox.event.Order.o%2E17");
    CHECK_STR(ev.msg_id, "0b6d6c3a-6c3e-4b87-9b4e-2f1e0c2d3a4b");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_EVENT_TYPE), "OrderCreated");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_ID), "o.17");
    CHECK_STR(outbox_event_header(&ev, "Tenant-Id"), "acme");
    CHECK_STR(outbox_event_header(&ev, "Created-At"), "2026-11-22T10:00:00Z");
    CHECK_MEM(ev.body, ev.body_len, "{\"total\": 5}", 12);

    /* A missing id names the column and the setting that changes it. */
    const char *no_id[] = {"aggregatetype", "payload", "tenant", "created", "aggregateid"};
    CHECK(outbox_mapper_check_columns(m, 0, no_id, 5, err, sizeof(err)) < 0);
    CHECK(strstr(err, "no column \"id\"") != NULL && strstr(err, "--column-event-id") != NULL);
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

/* --body envelope: every column in one JSON object, typed. */
static void test_envelope_body(void)
{
    OutboxMapper *m;
    char err[256];
    TableConfig tc = {.table = "outbox", .subject = "o.{event_type}", .body = "envelope"};
    CHECK(outbox_mapper_new(&m, &tc, 1, NULL, NULL, err, sizeof(err)) == 0);
    Col cols[] = {
        {"event_id", OID_TEXT, "e1"},
        {"event_type", OID_TEXT, "say \"hi\"\n"},
        {"payload", OID_JSONB, "{\"a\": [1, 2]}"},
        {"n", 20 /* int8 */, "-12"},
        {"ok", 16 /* bool */, "t"},
        {"x", 1700 /* numeric */, "NaN"},
        {"gone", OID_TEXT, NULL},
        {"raw", OID_BYTEA, "\\x00ff"},
    };
    relation(1, "public", "outbox", cols, 8);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    insert(1, cols, 8);
    OutboxEvent ev;
    outbox_event_init(&ev);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_OK);
    const char *want = "{\"event_id\":\"e1\",\"event_type\":\"say \\\"hi\\\"\\u000A\","
                       "\"payload\":{\"a\": [1, 2]},\"n\":-12,\"ok\":true,\"x\":\"NaN\","
                       "\"gone\":null,\"raw\":\"\\\\x00ff\"}";
    CHECK_MEM(ev.body, ev.body_len, want, strlen(want));
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

/* Two tables, each with its own template; other relations are not outbox tables. */
static void test_several_tables(void)
{
    OutboxMapper *m;
    char err[256];
    TableConfig tcs[] = {
        {.table = "orders_outbox", .subject = "orders.{aggregate_id}"},
        {.table = "billing.outbox", .subject = "billing.{event_type}"},
    };
    CHECK(outbox_mapper_new(&m, tcs, 2, NULL, NULL, err, sizeof(err)) == 0);
    CHECK(outbox_mapper_ntables(m) == 2);
    char text[128];
    outbox_mapper_describe_tables(m, text, sizeof(text));
    CHECK_STR(text, "public.orders_outbox, billing.outbox");
    Col cols[] = {
        {"event_id", OID_TEXT, "a"},
        {"aggregate_id", OID_TEXT, "7"},
        {"event_type", OID_TEXT, "paid"},
        {"payload", OID_TEXT, "x"},
    };
    relation(10, "public", "orders_outbox", cols, 4);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    relation(11, "billing", "outbox", cols, 4);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    relation(12, "public", "outbox", cols, 4);
    CHECK(outbox_mapper_relation(m, msg, err, sizeof(err)) == 0);
    CHECK(outbox_mapper_is_outbox(m, 10) && outbox_mapper_is_outbox(m, 11));
    CHECK(!outbox_mapper_is_outbox(m, 12));
    OutboxEvent ev;
    outbox_event_init(&ev);
    insert(10, cols, 4);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_OK);
    CHECK_STR(ev.subject.data, "orders.7");
    insert(11, cols, 4);
    CHECK(outbox_map_insert(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_OK);
    CHECK_STR(ev.subject.data, "billing.paid");
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);

    TableConfig twice[] = {{.table = "t", .subject = "a"}, {.table = "public.t", .subject = "b"}};
    CHECK(outbox_mapper_new(&m, twice, 2, NULL, NULL, err, sizeof(err)) < 0);
    CHECK(strstr(err, "listed twice") != NULL);
}

static void message(uint8_t flags, const char *prefix, const char *content)
{
    memset(msg, 0, sizeof(*msg));
    msg->kind = PGO_MESSAGE;
    msg->u.message.flags = flags;
    msg->u.message.prefix = prefix;
    msg->u.message.content = content;
    msg->u.message.len = (uint32_t)strlen(content);
}

/* Table-less events: the envelope's fields, the payload's exact text as the body. */
static void test_messages(void)
{
    OutboxMapper *m;
    char err[256];
    TableConfig tc = {.table = "outbox", .subject = "outbox.{aggregate_type}.{event_type}"};
    CHECK(outbox_mapper_new(&m, &tc, 1, "outbox", tc.subject, err, sizeof(err)) == 0);
    OutboxEvent ev;
    outbox_event_init(&ev);

    message(1, "other", "{}");
    CHECK(!outbox_mapper_wants_message(m, msg));
    const char *env = "{\"event_id\": \"m-1\", \"aggregate_type\": \"cart\", \"event_type\": "
                      "\"checked.out\", \"aggregate_id\": 99, \"schema_version\": 2, "
                      "\"payload\": {\"big\": 123456789012345678901234567890, \"s\": \"}\\\"\"}, "
                      "\"occurred_at\": \"2026-11-22 09:00:00+00\", "
                      "\"headers\": {\"Tenant-Id\": \"acme\"}}";
    message(1, "outbox", env);
    CHECK(outbox_mapper_wants_message(m, msg));
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_OK);
    CHECK_STR(ev.msg_id, "m-1");
    CHECK_STR(ev.subject.data, "outbox.cart.checked%2Eout");
    const char *body = "{\"big\": 123456789012345678901234567890, \"s\": \"}\\\"\"}";
    CHECK_MEM(ev.body, ev.body_len, body, strlen(body));
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_AGGREGATE_ID), "99");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_SCHEMA_VERSION), "2");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_OCCURRED_AT), "2026-11-22T09:00:00Z");
    CHECK_STR(outbox_event_header(&ev, "Tenant-Id"), "acme");
    CHECK_STR(outbox_event_header(&ev, OUTBOX_HDR_COMMIT_LSN), "0/16B3748");

    /* A string payload is JSON text too: the quotes stay. */
    message(1, "outbox", "{\"payload\":\"plain\",\"event_id\":\"m-2\"}");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_OK);
    CHECK_MEM(ev.body, ev.body_len, "\"plain\"", 7);
    CHECK_STR(ev.subject.data, "outbox._._");

    /* What cannot be an event says why. */
    message(1, "outbox", "not json");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_ENVELOPE);
    message(1, "outbox", "[1]");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_ENVELOPE);
    message(1, "outbox", "{\"event_id\": 5, \"payload\": 1}");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_EVENT_ID);
    message(1, "outbox", "{\"event_id\": \"x\"}");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_NULL_PAYLOAD);
    message(1, "outbox", "{\"event_id\": \"x\", \"payload\": null}");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_NULL_PAYLOAD);
    message(1, "outbox", "{\"event_id\": \"x\", \"payload\": 1, \"headers\": {\"Nats-Expected-Stream\": \"s\"}}");
    CHECK(outbox_map_message(m, msg, &txn, &ev, err, sizeof(err)) == OUTBOX_INVALID_ENVELOPE);
    CHECK(strstr(err, "headers") != NULL);

    DeadLetter dl;
    message(1, "outbox", "{\"event_id\": \"bad id\", \"payload\": 1}");
    outbox_describe_message(m, msg, &txn, 3, &dl);
    CHECK_STR(dl.table, "message prefix outbox");
    CHECK(dl.event_id && dl.event_id_len == 6 && memcmp(dl.event_id, "bad id", 6) == 0);
    CHECK(dl.index == 3 && dl.body_len == msg->u.message.len);
    outbox_event_deinit(&ev);
    outbox_mapper_free(m);
}

int main(void)
{
    msg = malloc(sizeof(*msg));
    test_default_table();
    test_columns_by_name_and_bytea();
    test_start_up_column_check();
    test_dead_letters();
    test_debezium_preset_and_extra_headers();
    test_envelope_body();
    test_several_tables();
    test_messages();
    free(msg);
    return check_report("test_outbox");
}
