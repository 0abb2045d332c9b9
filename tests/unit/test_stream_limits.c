/* test_stream_limits.c - when a stream's refusal is its own global limits (a full stream, which
 * passes later) and when it is not (jsapi_stream_at_limits: the test behind turning a refusal
 * that repeats with room to spare into a dead letter). */
#include "check.h"
#include "outboxd/jetstream.h"

static void test_limits(void)
{
    StreamInfo s = {.messages = 10, .bytes = 1000, .max_msgs = -1, .max_bytes = -1};
    CHECK(!jsapi_stream_at_limits(&s, 100)); /* unlimited */
    s.max_msgs = 10;
    CHECK(jsapi_stream_at_limits(&s, 1)); /* at max_msgs */
    s.max_msgs = 11;
    CHECK(!jsapi_stream_at_limits(&s, 1));
    s.max_msgs = 0; /* 0 is unlimited too */
    CHECK(!jsapi_stream_at_limits(&s, 1));
    s.max_bytes = 1100;
    CHECK(!jsapi_stream_at_limits(&s, 100)); /* fits exactly */
    CHECK(jsapi_stream_at_limits(&s, 101));  /* one byte too many */
    s.bytes = 2000; /* lowered below what it holds */
    CHECK(jsapi_stream_at_limits(&s, 1));
}

int main(void)
{
    test_limits();
    return check_report("test_stream_limits");
}
