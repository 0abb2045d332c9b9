/* test_liveness.c - when a silent replication connection is asked for a reply, and when it is
 * given up (pgstream_liveness, the rule of PostgreSQL's wal_receiver_timeout). */
#include <stdint.h>

#include "check.h"
#include "outboxd/pgstream.h"

#define S INT64_C(1000000)

static void test_rule(void)
{
    int64_t t = 10 * S; /* the timeout */
    int64_t last = 100 * S;
    /* Within half the timeout: nothing to do. */
    CHECK(pgstream_liveness(last, last, 0, t) == PG_LIVE);
    CHECK(pgstream_liveness(last + 5 * S - 1, last, 0, t) == PG_LIVE);
    CHECK(pgstream_liveness_deadline(last, 0, t) == last + 5 * S);
    /* Half of it: ask for a reply, once. */
    CHECK(pgstream_liveness(last + 5 * S, last, 0, t) == PG_ASK_REPLY);
    CHECK(pgstream_liveness(last + 5 * S, last, last - 1, t) == PG_ASK_REPLY); /* asked before */
    int64_t asked = last + 5 * S;
    CHECK(pgstream_liveness(asked + 1, last, asked, t) == PG_LIVE);
    CHECK(pgstream_liveness_deadline(last, asked, t) == last + t);
    /* The whole timeout with nothing received, the request half of it old: silent. */
    CHECK(pgstream_liveness(last + t - 1, last, asked, t) == PG_LIVE);
    CHECK(pgstream_liveness(last + t, last, asked, t) == PG_SILENT);
    /* A request sent late (the relay was busy past half the timeout) gets half the timeout to
     * be answered before the connection counts as silent. */
    int64_t late = last + 9 * S;
    CHECK(pgstream_liveness(last + t, last, late, t) == PG_LIVE);
    CHECK(pgstream_liveness_deadline(last, late, t) == late + 5 * S);
    CHECK(pgstream_liveness(late + 5 * S, last, late, t) == PG_SILENT);
    /* Anything received starts afresh. */
    CHECK(pgstream_liveness(last + t, last + t - 1, asked, t) == PG_LIVE);
    /* 0 turns it off. */
    CHECK(pgstream_liveness(last + 1000 * S, last, 0, 0) == PG_LIVE);
    CHECK(pgstream_liveness_deadline(last, 0, 0) == INT64_MAX);
}

int main(void)
{
    test_rule();
    return check_report("test_liveness");
}
