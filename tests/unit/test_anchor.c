/* test_anchor.c - the skip rule (anchor.c): what an anchor covers, when the WAL proves it or
 * shows it false, which stream messages make one, and the positions of backfilled rows against
 * streamed transactions. */
#include <stdint.h>

#include "check.h"
#include "outboxd/anchor.h"
#include "outboxd/util.h"

#define T0 INT64_C(818000000000000) /* some commit time, µs since 2000-01-01 */

static void covers(void)
{
    Anchor a = {.pos = {.timeline = 1, .lsn = 0x1000, .index = 3}, .commit_time = T0};
    CHECK(anchor_covers(&a, &(OutboxPosition){1, 0x0FFF, 99}));
    CHECK(anchor_covers(&a, &(OutboxPosition){1, 0x1000, 0}));
    CHECK(anchor_covers(&a, &(OutboxPosition){1, 0x1000, 3}));
    CHECK(!anchor_covers(&a, &(OutboxPosition){1, 0x1000, 4}));
    CHECK(!anchor_covers(&a, &(OutboxPosition){1, 0x1001, 0}));
    /* another timeline is never compared */
    CHECK(!anchor_covers(&a, &(OutboxPosition){2, 0x0001, 0}));
}

static void proof(void)
{
    Anchor a = {.pos = {.timeline = 1, .lsn = 0x5000, .index = 7}, .commit_time = T0};
    /* earlier transactions: still ahead */
    CHECK(anchor_on_begin(&a, 0x4000, T0 - 5) == ANCHOR_AHEAD);
    /* the anchor's own transaction, to the microsecond */
    CHECK(anchor_on_begin(&a, 0x5000, T0) == ANCHOR_MET);
    /* another transaction at the same LSN: another history (a restored snapshot) */
    CHECK(anchor_on_begin(&a, 0x5000, T0 + 1) == ANCHOR_FALSE);
    /* the WAL went past it */
    CHECK(anchor_on_begin(&a, 0x5001, T0) == ANCHOR_FALSE);
    /* keepalives: up to the anchor's commit record it may still come; past it, it did not */
    CHECK(anchor_on_keepalive(&a, 0x4FFF) == ANCHOR_AHEAD);
    CHECK(anchor_on_keepalive(&a, 0x5000) == ANCHOR_AHEAD);
    CHECK(anchor_on_keepalive(&a, 0x5001) == ANCHOR_FALSE);
}

static void from_events(void)
{
    const char *src = "7312345678901234567/outboxd";
    const char *when = "2026-12-03T17:26:18.123456Z";
    Anchor a;
    CHECK(anchor_from_event("1 0/16B3F10 4", when, src, NULL, src, &a) == 1);
    CHECK(a.pos.timeline == 1 && a.pos.lsn == 0x16B3F10 && a.pos.index == 4);
    int64_t unix_us;
    CHECK(time_parse_rfc3339(when, strlen(when), &unix_us));
    CHECK(a.commit_time == unix_us - PG_EPOCH_OFFSET_US);
    CHECK_STR(a.from, "the stream");
    /* an event written before outboxd named its sources: used, proven like any other */
    CHECK(anchor_from_event("1 0/16B3F10 4", when, NULL, NULL, src, &a) == 1);
    /* another system (a database moved to a new cluster) or another slot: never */
    CHECK(anchor_from_event("1 0/16B3F10 4", when, "7399999999999999999/outboxd", NULL, src,
                            &a) == 0);
    CHECK(anchor_from_event("1 0/16B3F10 4", when, "7312345678901234567/other", NULL, src, &a) ==
          0);
    /* a replayed copy, a message without a position, malformed values */
    CHECK(anchor_from_event("1 0/16B3F10 4", when, src, "1", src, &a) == 0);
    CHECK(anchor_from_event(NULL, when, src, NULL, src, &a) == 0);
    CHECK(anchor_from_event("1 0/16B3F10 4", NULL, src, NULL, src, &a) == 0);
    CHECK(anchor_from_event("1 0/16B3F10 4", "yesterday", src, NULL, src, &a) == 0);
    CHECK(anchor_from_event("1 -1/0 4", when, src, NULL, src, &a) == 0);
    CHECK(anchor_from_event("1 123456789/0 4", when, src, NULL, src, &a) == 0);
    CHECK(anchor_from_event("1 0/0 4", when, src, NULL, src, &a) == 0);

    char out[ANCHOR_SOURCE_MAX];
    anchor_source_format("7312345678901234567", "outboxd", out);
    CHECK_STR(out, src);
}

/* A transaction committing in the very record after the slot's consistent point has commit LSN
 * = the slot's position. Backfilled rows carry the position minus one: neither kind of anchor
 * ever covers an event of the other kind. */
static void backfill_against_streamed(void)
{
    uint64_t slot = 0x2000000;
    Anchor last_backfilled = {.pos = {1, slot - 1, 9999}, .commit_time = T0};
    CHECK(!anchor_covers(&last_backfilled, &(OutboxPosition){1, slot, 0}));
    Anchor first_streamed = {.pos = {1, slot, 0}, .commit_time = T0};
    CHECK(anchor_covers(&first_streamed, &(OutboxPosition){1, slot - 1, 9999}));
    CHECK(!anchor_covers(&first_streamed, &(OutboxPosition){1, slot, 1}));
    /* a backfilled anchor is before the slot: streaming from the slot proves nothing by it
     * and skips nothing (session.c takes no anchor below the start) */
    CHECK(last_backfilled.pos.lsn < slot);
}

static void lsns(void)
{
    uint64_t v;
    CHECK(lsn_parse("0/0", &v) && v == 0);
    CHECK(lsn_parse("FFFFFFFF/FFFFFFFF", &v) && v == UINT64_MAX);
    CHECK(lsn_parse("16/B374D848", &v) && v == ((UINT64_C(0x16) << 32) | 0xB374D848));
    CHECK(lsn_parse("a/b", &v) && v == ((UINT64_C(0xa) << 32) | 0xb));
    CHECK(!lsn_parse("-1/0", &v));
    CHECK(!lsn_parse("0/-1", &v));
    CHECK(!lsn_parse("+1/0", &v));
    CHECK(!lsn_parse(" 1/0", &v));
    CHECK(!lsn_parse("1/ 0", &v));
    CHECK(!lsn_parse("100000000/0", &v));
    CHECK(!lsn_parse("0/100000000", &v));
    CHECK(!lsn_parse("1/", &v));
    CHECK(!lsn_parse("/1", &v));
    CHECK(!lsn_parse("1/0 ", &v));
    CHECK(!lsn_parse("1/0x", &v));
    CHECK(!lsn_parse("0x1/0", &v));
    CHECK(!lsn_parse(NULL, &v));
}

int main(void)
{
    covers();
    proof();
    from_events();
    backfill_against_streamed();
    lsns();
    return check_report("test_anchor");
}
