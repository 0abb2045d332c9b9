/* Unit tests for reading JetStream's answers to publishes. */
#include <string.h>

#include "check.h"
#include "outboxd/puback.h"

static PubAckInfo last;

static PubAckKind parse(const char *s, unsigned *code)
{
    PubAckKind k = puback_parse(s, strlen(s), &last);
    *code = last.err_code;
    return k;
}

static void test_answers(void)
{
    unsigned code = 99;
    CHECK(parse("{\"stream\":\"OUTBOX\",\"seq\":12}", &code) == PUBACK_STORED && code == 0);
    CHECK(parse("{\"stream\":\"OUTBOX\",\"seq\":12,\"duplicate\": true}", &code) ==
          PUBACK_DUPLICATE);
    CHECK(parse("{\"stream\":\"OUTBOX\",\"seq\":12,\"duplicate\":true}", &code) ==
          PUBACK_DUPLICATE);
    /* Shapes the quick path does not know still read right. */
    CHECK(parse("{\"stream\":\"OUTBOX\",\"domain\":\"hub\",\"seq\":3}", &code) == PUBACK_STORED);
    CHECK(parse("{\"stream\":\"O\",\"seq\":3,\"domain\":\"hub\",\"duplicate\":true}", &code) ==
          PUBACK_DUPLICATE);
    CHECK(parse("{\"stream\":\"a\\\"b\",\"seq\":1}", &code) == PUBACK_STORED);
    CHECK(parse(" {\"seq\": 7, \"stream\": \"OUTBOX\"}", &code) == PUBACK_STORED);
    /* Errors, after the PubAck fields or alone. */
    CHECK(parse("{\"stream\":\"O\",\"seq\":0,\"error\":{\"code\":400,\"err_code\":10070,"
                "\"description\":\"wrong last msg ID: e-1\"}}",
                &code) == PUBACK_REFUSED &&
          code == 10070);
    CHECK(parse("{\"error\":{\"code\":503,\"description\":\"unavailable\"}}", &code) ==
              PUBACK_REFUSED &&
          code == 503);
    /* Not a PubAck at all. */
    CHECK(parse("hello", &code) == PUBACK_REFUSED && code == 0);
    CHECK(parse("{\"stream\":\"O\",\"seq\":}", &code) == PUBACK_REFUSED && code == 0);
    CHECK(parse("{\"stream\":\"O\"}", &code) == PUBACK_REFUSED && code == 0);
    CHECK(parse("{\"stream\":\"O\",\"seq\":12,\"duplicate\": false}", &code) == PUBACK_STORED);
    CHECK(puback_parse(NULL, 0, &last) == PUBACK_REFUSED && last.err_code == 0);
    CHECK(puback_parse("{\"stream\":\"O\",\"seq\":12}", 10, &last) == PUBACK_REFUSED);
    /* The sequence, from either reader, and JetStream's text for a refusal. */
    CHECK(parse("{\"stream\":\"OUTBOX\", \"seq\":123456789012}", &code) == PUBACK_STORED &&
          last.seq == UINT64_C(123456789012));
    CHECK(parse("{\"seq\": 7, \"stream\": \"OUTBOX\", \"duplicate\": true}", &code) ==
              PUBACK_DUPLICATE &&
          last.seq == 7);
    CHECK(parse("{\"error\":{\"code\":503,\"err_code\":10077,\"description\":\"maximum "
                "messages exceeded\"},\"stream\":\"F\",\"seq\":0}",
                &code) == PUBACK_REFUSED &&
          code == 10077 && last.seq == 0);
    CHECK_STR(last.description, "maximum messages exceeded");
}

/* What nats-server 2.9 writes, byte for byte, and other spellings of the same answers, take
 * the quick path: one answer per event must not need jansson. */
static void test_quick(void)
{
    const char *stored[] = {
        "{\"stream\":\"T\", \"seq\":1}",
        "{\"stream\":\"OUTBOX\",\"seq\":12}",
        "{ \"stream\" :\"T\" , \"seq\" : 1 }",
    };
    const char *dup[] = {
        "{\"stream\":\"T\", \"seq\":1,\"duplicate\": true}",
        "{\"stream\":\"OUTBOX\",\"seq\":12,\"duplicate\":true}",
    };
    uint64_t seq = 0;
    for (size_t i = 0; i < sizeof(stored) / sizeof(stored[0]); i++)
        CHECK(puback_quick(stored[i], strlen(stored[i]), &seq) == PUBACK_STORED);
    for (size_t i = 0; i < sizeof(dup) / sizeof(dup[0]); i++)
        CHECK(puback_quick(dup[i], strlen(dup[i]), &seq) == PUBACK_DUPLICATE);
    CHECK(seq == 12);
    const char *other[] = {
        "{\"stream\":\"T\", \"seq\":1,\"duplicate\": false}",
        "{\"stream\":\"T\", \"seq\":1, \"domain\":\"hub\"}",
        "{\"stream\":\"T\", \"seq\":0,\"error\":{\"code\":503}}",
        "{\"stream\":\"T\", \"seq\":}",
        "{\"stream\":\"T\", \"seq\":1}x",
        "{\"stream\":\"a\\\"b\", \"seq\":1}",          /* escapes: jansson's */
        "{\"stream\":\"T\", \"seq\":01}",                 /* not JSON */
        "{\"stream\":\"T\", \"seq\":1234567890123456789}", /* 19 digits */
        "{\"stream\":\"T",
        "",
    };
    for (size_t i = 0; i < sizeof(other) / sizeof(other[0]); i++)
        CHECK(puback_quick(other[i], strlen(other[i]), &seq) == -1);
}

static void test_reply_subjects(void)
{
    uint64_t seq = 0;
    unsigned attempt = 9;
    CHECK(puback_reply_subject("_INBOX.abc.12.0", &seq, &attempt) && seq == 12 && attempt == 0);
    CHECK(puback_reply_subject("_INBOX.abc.1234567890123456789.255", &seq, &attempt) &&
          seq == UINT64_C(1234567890123456789) && attempt == 255);
    CHECK(!puback_reply_subject("_INBOX.abc.checkpoint", &seq, &attempt));
    CHECK(!puback_reply_subject("_INBOX.abc.12.x", &seq, &attempt));
    CHECK(!puback_reply_subject("_INBOX.abc..0", &seq, &attempt));
    CHECK(!puback_reply_subject("_INBOX.abc.12.", &seq, &attempt));
    CHECK(!puback_reply_subject("_INBOX.abc.1.1000", &seq, &attempt));
    CHECK(!puback_reply_subject("_INBOX.abc.99999999999999999999.0", &seq, &attempt));
    CHECK(!puback_reply_subject("12.0", &seq, &attempt));
}

int main(void)
{
    test_answers();
    test_quick();
    test_reply_subjects();
    return check_report("test_puback");
}
