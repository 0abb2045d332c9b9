/*
 * test_consumers.c - the pure parts of consumer lag: reading consumer info as nats-server 2.9.10
 * sends it, where the search for the oldest unprocessed message starts, ages, the --consumers
 * setting, RFC 3339 times and the rendered metrics (label escaping included).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "outboxd/config.h"
#include "outboxd/consumers.h"

/* A CONSUMER.INFO reply from nats-server 2.9.10: a deliver_policy "new" consumer that never
 * acknowledged and has one delivery outstanding (its ack floor says 0). */
static const char info_new[] =
    "{\"type\":\"io.nats.jetstream.api.v1.consumer_info_response\",\"stream_name\":\"OUTBOX\","
    "\"name\":\"late\",\"created\":\"2026-12-03T17:53:08.26860328Z\",\"config\":{"
    "\"durable_name\":\"late\",\"deliver_policy\":\"new\",\"ack_policy\":\"explicit\","
    "\"ack_wait\":30000000000,\"max_deliver\":-1,\"filter_subject\":\"outbox.order.>\","
    "\"replay_policy\":\"instant\",\"max_waiting\":512,\"max_ack_pending\":1000,"
    "\"num_replicas\":0},\"delivered\":{\"consumer_seq\":1,\"stream_seq\":6,"
    "\"last_active\":\"2026-12-03T17:53:23.088914186Z\"},\"ack_floor\":{\"consumer_seq\":0,"
    "\"stream_seq\":0},\"num_ack_pending\":1,\"num_redelivered\":0,\"num_waiting\":2,"
    "\"num_pending\":1}";

static json_t *load(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!j) {
        fprintf(stderr, "bad test JSON: %s\n", e.text);
        exit(1);
    }
    return j;
}

static void test_parse_info(void)
{
    json_t *j = load(info_new);
    ConsumerLag c;
    CHECK(consumers_parse_info(j, "X", &c) == 0);
    CHECK_STR(c.stream, "OUTBOX");
    CHECK_STR(c.name, "late");
    CHECK(c.durable);
    CHECK_STR(c.filter, "outbox.order.>");
    CHECK_STR(c.deliver_policy, "new");
    CHECK(c.num_pending == 1 && c.num_ack_pending == 1 && c.num_waiting == 2);
    CHECK(c.delivered_stream_seq == 6 && c.delivered_consumer_seq == 1);
    CHECK(c.ack_stream_seq == 0 && c.ack_consumer_seq == 0 && c.ack_active_us == 0);
    CHECK(c.created_us == INT64_C(1796320388268603));
    CHECK(c.oldest_unix_us == -1);
    json_decref(j);

    /* 2.10's several filters; an ephemeral consumer; an error reply. */
    j = load("{\"name\":\"e\",\"config\":{\"filter_subjects\":[\"a.>\",\"b.*\"]},"
             "\"ack_floor\":{\"consumer_seq\":3,\"stream_seq\":9,"
             "\"last_active\":\"2026-01-01T00:00:01.5Z\"}}");
    CHECK(consumers_parse_info(j, "S", &c) == 0);
    CHECK_STR(c.stream, "S");
    CHECK(!c.durable);
    CHECK_STR(c.filter, "a.> b.*");
    CHECK(c.ack_stream_seq == 9 && c.ack_active_us == INT64_C(1767225601500000));
    json_decref(j);
    j = load("{\"error\":{\"code\":404,\"err_code\":10014,\"description\":\"consumer not found\"}}");
    CHECK(consumers_parse_info(j, "S", &c) == -1);
    json_decref(j);
}

static void test_search_start(void)
{
    ConsumerLag c;
    memset(&c, 0, sizeof(c));
    int64_t nb;
    /* Acknowledged up to 9: the search starts at 10. */
    c.ack_consumer_seq = 4;
    c.ack_stream_seq = 9;
    c.delivered_stream_seq = 12;
    c.num_ack_pending = 2;
    CHECK(consumers_search_start(&c, &nb) == 10 && nb == 0);
    /* Nothing outstanding: all it was given (up to 12) is processed. */
    c.num_ack_pending = 0;
    CHECK(consumers_search_start(&c, &nb) == 13);
    /* The trap: "new", never acknowledged, a delivery outstanding, ack floor 0. */
    memset(&c, 0, sizeof(c));
    snprintf(c.deliver_policy, sizeof(c.deliver_policy), "new");
    c.created_us = 1000;
    c.delivered_stream_seq = 6;
    c.delivered_consumer_seq = 1;
    c.num_ack_pending = 1;
    CHECK(consumers_search_start(&c, &nb) == 0 && nb == 1000);
    snprintf(c.deliver_policy, sizeof(c.deliver_policy), "by_start_time");
    c.opt_start_time_us = 2000;
    CHECK(consumers_search_start(&c, &nb) == 0 && nb == 2000);
    snprintf(c.deliver_policy, sizeof(c.deliver_policy), "by_start_sequence");
    c.opt_start_seq = 5;
    CHECK(consumers_search_start(&c, &nb) == 5 && nb == 0);
    snprintf(c.deliver_policy, sizeof(c.deliver_policy), "all");
    CHECK(consumers_search_start(&c, &nb) == 1);
    /* A fresh "new" consumer with nothing delivered: after what it was positioned at. */
    memset(&c, 0, sizeof(c));
    snprintf(c.deliver_policy, sizeof(c.deliver_policy), "new");
    c.delivered_stream_seq = 5;
    CHECK(consumers_search_start(&c, &nb) == 6);
}

static void test_age_and_selection(void)
{
    ConsumerLag c;
    memset(&c, 0, sizeof(c));
    c.oldest_unix_us = -1;
    CHECK(consumers_age_us(&c, 5000000) == -1);
    c.oldest_unix_us = 0;
    CHECK(consumers_age_us(&c, 5000000) == 0);
    c.oldest_unix_us = 1000000;
    CHECK(consumers_age_us(&c, 3500000) == 2500000);
    CHECK(consumers_age_us(&c, 500000) == 0); /* a skewed clock never gives a negative age */

    CHECK(consumers_selected("all", "search"));
    CHECK(!consumers_selected("off", "search"));
    CHECK(consumers_selected("billing,search", "search"));
    CHECK(consumers_selected("search,billing", "search"));
    CHECK(!consumers_selected("searcher,billing", "search"));
    CHECK(!consumers_selected("sear,billing", "search"));
}

static void test_time_parse(void)
{
    int64_t us = 0;
    CHECK(time_parse_rfc3339("2026-11-22T17:26:18.123456Z", 27, &us) && us == INT64_C(1795368378123456));
    CHECK(time_parse_rfc3339("2026-11-22T17:26:18.123456789Z", 30, &us) &&
          us == INT64_C(1795368378123456));
    CHECK(time_parse_rfc3339("2026-11-22T19:26:18+02:00", 25, &us) && us == INT64_C(1795368378000000));
    CHECK(time_parse_rfc3339("1970-01-01T00:00:00Z", 20, &us) && us == 0);
    CHECK(!time_parse_rfc3339("2026-11-22 17:26", 16, &us));
    CHECK(!time_parse_rfc3339("2026-13-22T17:26:18Z", 20, &us));
    CHECK(!time_parse_rfc3339("2026-11-22T17:26:18.Z", 21, &us));
    CHECK(!time_parse_rfc3339("2026-11-22T17:26:18Zjunk", 24, &us));
}

static void test_render(void)
{
    ConsumerLag v[2];
    memset(v, 0, sizeof(v));
    snprintf(v[0].stream, sizeof(v[0].stream), "OUTBOX");
    snprintf(v[0].name, sizeof(v[0].name), "se\"ar\\ch\n");
    v[0].num_pending = 3;
    v[0].num_ack_pending = 2;
    v[0].oldest_unix_us = 10000000;
    v[0].ack_active_us = 11500000;
    snprintf(v[1].stream, sizeof(v[1].stream), "OUTBOX");
    snprintf(v[1].name, sizeof(v[1].name), "billing");
    v[1].oldest_unix_us = -1; /* could not be read: no age sample */
    Buf b;
    buf_init(&b);
    consumers_render(v, 2, 12500000, 12000000, 4, &b);
    const char *t = b.data;
    CHECK(strstr(t, "# TYPE outboxd_consumer_pending_events gauge\n"));
    CHECK(strstr(t, "outboxd_consumer_pending_events{stream=\"OUTBOX\",consumer=\"se\\\"ar\\\\ch\\n\"} 5\n"));
    CHECK(strstr(t, "outboxd_consumer_ack_pending_events{stream=\"OUTBOX\",consumer=\"billing\"} 0\n"));
    CHECK(strstr(t, "outboxd_consumer_oldest_unprocessed_age_seconds{stream=\"OUTBOX\",consumer=\"se\\\"ar\\\\ch\\n\"} 2.5\n"));
    CHECK(!strstr(t, "outboxd_consumer_oldest_unprocessed_age_seconds{stream=\"OUTBOX\",consumer=\"billing\"}"));
    CHECK(strstr(t, "outboxd_consumer_last_ack_age_seconds{stream=\"OUTBOX\",consumer=\"se\\\"ar\\\\ch\\n\"} 1\n"));
    CHECK(strstr(t, "outboxd_consumer_refresh_timestamp_seconds 12\n"));
    CHECK(strstr(t, "outboxd_consumer_refresh_errors_total 4\n"));
    buf_deinit(&b);
}

static void test_setting(void)
{
    static const char *const good[] = {"all", "off", "search", "search,billing", "a-b_c"};
    static const char *const bad[] = {"", "a,,b", "all,search", "a.b", "a b", "x*", "x>", "a/b",
                                      "search,off"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]) + sizeof(bad) / sizeof(bad[0]); i++) {
        bool want = i < sizeof(good) / sizeof(good[0]);
        const char *v = want ? good[i] : bad[i - sizeof(good) / sizeof(good[0])];
        char arg[128], err[512] = "";
        snprintf(arg, sizeof(arg), "--consumers=%s", v);
        char *argv[] = {"--pg-url=dbname=x", arg};
        Config cfg;
        config_init(&cfg);
        int rc = config_parse(&cfg, 2, argv, err, sizeof(err));
        CHECK((rc == 0) == want);
        if ((rc == 0) != want)
            fprintf(stderr, "  --consumers=%s: %s\n", v, err);
        if (rc == 0)
            CHECK_STR(cfg.consumers, v);
        config_deinit(&cfg);
    }
    Config cfg;
    config_init(&cfg);
    CHECK_STR(cfg.consumers, "all");
    CHECK(cfg.consumer_interval_ms == 5000);
    config_deinit(&cfg);
}

int main(void)
{
    clearenv(); /* config_parse() refuses unknown OUTBOXD_* variables, e.g. the test runner's */
    test_parse_info();
    test_search_start();
    test_age_and_selection();
    test_time_parse();
    test_render();
    test_setting();
    return check_report("test_consumers");
}
