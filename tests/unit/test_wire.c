/* Unit tests for wire messages: the encoded form, and both ways of handing it to nats.c. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "outboxd/wire.h"

static void add(OutboxEvent *ev, const char *name, const char *value)
{
    outbox_event_add_header(ev, name, value, strlen(value));
}

static void sample(OutboxEvent *ev, const char *body, size_t body_len)
{
    buf_reset(&ev->subject);
    buf_puts(&ev->subject, "outbox.order.created");
    buf_reset(&ev->hvals);
    ev->nheaders = 0;
    add(ev, OUTBOX_HDR_MSG_ID, "e-1");
    add(ev, OUTBOX_HDR_EVENT_TYPE, "created");
    add(ev, "X-Tenant", "acme");
    ev->body = body;
    ev->body_len = body_len;
}

/* The sample event, encoded with "e-0" as the expected last id. */
static void encode_sample(OutboxEvent *ev, WireMsg *w)
{
    outbox_event_init(ev);
    sample(ev, "{\"a\":1}", 7);
    wire_init(w);
    wire_encode(w, ev, "e-0");
}

static void test_encode(void)
{
    OutboxEvent ev;
    WireMsg w;
    encode_sample(&ev, &w);
    CHECK_STR(wire_subject(&w), "outbox.order.created");
    const char want[] = "NATS/1.0\r\nNats-Msg-Id: e-1\r\nOutbox-Event-Type: created\r\n"
                        "X-Tenant: acme\r\nNats-Expected-Last-Sequence: e-0\r\n\r\n";
    CHECK_MEM(wire_hdr(&w), w.hdr_len, want, sizeof(want) - 1);
    CHECK_MEM(wire_body(&w), w.body_len, "{\"a\":1}", 7);
    CHECK(wire_size(&w) == sizeof(want) - 1 + 7);

    char v[64];
    CHECK(wire_header(&w, OUTBOX_HDR_MSG_ID, v, sizeof(v)));
    CHECK_STR(v, "e-1");
    CHECK(wire_header(&w, "X-Tenant", v, sizeof(v)));
    CHECK_STR(v, "acme");
    CHECK(wire_header(&w, OUTBOX_HDR_EXPECTED_LAST, v, sizeof(v)));
    CHECK_STR(v, "e-0");
    CHECK(!wire_header(&w, "X-Ten", v, sizeof(v))); /* a prefix of a name is not the name */
    CHECK(!wire_header(&w, "Outbox-Trace-Id", v, sizeof(v)));
    CHECK(wire_header(&w, "X-Tenant", v, 3)); /* truncated to fit */
    CHECK_STR(v, "ac");

    /* Without an expected id there is no line for it. */
    wire_encode(&w, &ev, "");
    CHECK(!wire_header(&w, OUTBOX_HDR_EXPECTED_LAST, v, sizeof(v)));
    CHECK_MEM(wire_body(&w), w.body_len, "{\"a\":1}", 7);
    wire_deinit(&w);
    outbox_event_deinit(&ev);
}

/* Replacing the chain header keeps every other byte, whatever its length was. */
static void test_set_expected(void)
{
    OutboxEvent ev;
    outbox_event_init(&ev);
    char body[300];
    for (size_t i = 0; i < sizeof(body); i++)
        body[i] = (char)i; /* any bytes, zero included */
    sample(&ev, body, sizeof(body));
    WireMsg w, fresh;
    wire_init(&w);
    wire_init(&fresh);
    wire_encode(&w, &ev, "short");
    const char *ids[] = {"a-much-longer-id-than-before-0123456789", "x", "", "again-long-id-42", NULL};
    for (int i = 0; i < 5; i++) {
        wire_set_expected(&w, ids[i]);
        wire_encode(&fresh, &ev, ids[i]);
        CHECK_MEM(w.buf.data, w.buf.len, fresh.buf.data, fresh.buf.len);
        CHECK(w.hdr_len == fresh.hdr_len && w.expected_off == fresh.expected_off);
    }
    /* An id read from the stream cannot break the header block. */
    wire_set_expected(&w, "evil\r\nX-Injected: 1");
    char v[64];
    CHECK(!wire_header(&w, "X-Injected", v, sizeof(v)));
    CHECK(wire_header(&w, OUTBOX_HDR_EXPECTED_LAST, v, sizeof(v)));
    CHECK_STR(v, "evil  X-Injected: 1");
    CHECK_MEM(wire_body(&w), w.body_len, body, sizeof(body));
    wire_deinit(&w);
    wire_deinit(&fresh);
    outbox_event_deinit(&ev);
}

/* Buffers fit their event closely, and a buffer handed on serves the next event as it is. */
static void test_buffers(void)
{
    OutboxEvent ev;
    outbox_event_init(&ev);
    WireMsg w, next;
    wire_init(&w);
    wire_init(&next);
    char *big = calloc(1, 100000);
    sample(&ev, big, 100000);
    wire_encode(&w, &ev, NULL);
    CHECK(w.body_len == 100000);
    size_t cap = wire_capacity(&w);
    CHECK(cap > wire_size(&w) && cap <= wire_size(&w) + w.subject_len + 1 + 1024);
    char *data = w.buf.data;
    Buf b = wire_take_buffer(&w);
    CHECK(wire_empty(&w) && wire_capacity(&w) == 0 && b.data == data && b.cap == cap);
    wire_give_buffer(&next, b);
    sample(&ev, "{}", 2);
    wire_encode(&next, &ev, NULL); /* smaller: the same buffer */
    CHECK(next.buf.data == data && wire_capacity(&next) == cap);
    CHECK_MEM(wire_body(&next), next.body_len, "{}", 2);
    free(big);
    wire_deinit(&w);
    wire_deinit(&next);
    outbox_event_deinit(&ev);
}

/* Both ways into nats.c read back the same through its documented API. */
static void check_msg(const WireMsg *w, bool raw)
{
    natsMsg *msg = NULL;
    CHECK(wire_to_msg(w, "_INBOX.x.1.0", raw, &msg) == NATS_OK);
    if (!msg)
        return;
    CHECK_STR(natsMsg_GetSubject(msg), "outbox.order.created");
    CHECK_STR(natsMsg_GetReply(msg), "_INBOX.x.1.0");
    CHECK_MEM(natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg), "{\"a\":1}", 7);
    const char *v = NULL;
    CHECK(natsMsgHeader_Get(msg, OUTBOX_HDR_MSG_ID, &v) == NATS_OK);
    CHECK_STR(v, "e-1");
    CHECK(natsMsgHeader_Get(msg, "X-Tenant", &v) == NATS_OK);
    CHECK_STR(v, "acme");
    CHECK(natsMsgHeader_Get(msg, OUTBOX_HDR_EXPECTED_LAST, &v) == NATS_OK);
    CHECK_STR(v, "e-0");
    const char **keys = NULL;
    int n = 0;
    CHECK(natsMsgHeader_Keys(msg, &keys, &n) == NATS_OK && n == 4);
    free((void *)keys);
    wire_msg_free(msg, raw);
}

static void test_to_msg(void)
{
    OutboxEvent ev;
    WireMsg w;
    encode_sample(&ev, &w);
    check_msg(&w, false);
#ifdef OUTBOXD_NATS_RAW
    /* Debian's libnats takes encoded blocks; the start-up check must agree. */
    CHECK(wire_raw_supported());
#endif
    if (wire_raw_supported())
        check_msg(&w, true);
    wire_deinit(&w);
    outbox_event_deinit(&ev);
}

int main(void)
{
    if (nats_Open(-1) != NATS_OK) /* natsMsg_Destroy() needs the library's collector */
        return 1;
    test_encode();
    test_set_expected();
    test_buffers();
    test_to_msg();
    nats_Close();
    return check_report("test_wire");
}
