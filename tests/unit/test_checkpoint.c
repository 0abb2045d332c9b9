/* Unit tests for the checkpoint's format: round trips, the bare LSN of outboxd 0.1, members of
 * a later release, and every way a value can be wrong. */
#include <string.h>

#include "check.h"
#include "outboxd/checkpoint.h"

static int decode(const char *s, Checkpoint *c, char *err, size_t errlen)
{
    return checkpoint_decode(s, strlen(s), c, err, errlen);
}

static void test_round_trip(void)
{
    Checkpoint in = {.lsn = UINT64_C(0x116B3F10), .timeline = 3, .commit_time = 818000123456789,
                     .commit_lsn = UINT64_C(0x116B3E80)};
    strcpy(in.system, "7312345678901234567");
    strcpy(in.slot, "outboxd");
    in.backfill = (CheckpointBackfill){.active = true, .position = 0x16B3E00, .rows = 1200};
    strcpy(in.backfill.snapshot, "757:760:757,758");
    strcpy(in.backfill.after, "018f0c1e-\"quoted\"");
    strcpy(in.backfill.table, "public.outbox");
    strcpy(in.backfill.since, "2026-12-03T17:26:18.123456Z");
    Buf b;
    buf_init(&b);
    checkpoint_encode(&in, &b);
    CHECK(strstr(b.data, "\"version\":1") != NULL);
    CHECK(strstr(b.data, "\"lsn\":\"0/116B3F10\"") != NULL);
    Checkpoint out;
    char err[256] = "";
    CHECK(checkpoint_decode(b.data, b.len, &out, err, sizeof(err)) == 0);
    CHECK(out.version == CHECKPOINT_VERSION);
    CHECK(out.lsn == in.lsn && out.timeline == 3 && out.commit_time == in.commit_time);
    CHECK(out.commit_lsn == in.commit_lsn);
    CHECK_STR(out.system, in.system);
    CHECK_STR(out.slot, "outboxd");
    CHECK(out.backfill.active && out.backfill.position == 0x16B3E00 && out.backfill.rows == 1200);
    CHECK_STR(out.backfill.snapshot, "757:760:757,758");
    CHECK_STR(out.backfill.after, in.backfill.after);
    CHECK_STR(out.backfill.table, "public.outbox");
    CHECK_STR(out.backfill.since, in.backfill.since);

    /* Without a backfill the member is absent, and reads back inactive. */
    in.backfill.active = false;
    checkpoint_encode(&in, &b);
    CHECK(strstr(b.data, "backfill") == NULL);
    CHECK(checkpoint_decode(b.data, b.len, &out, err, sizeof(err)) == 0 && !out.backfill.active);
    buf_deinit(&b);
}

static void test_old_and_new(void)
{
    Checkpoint c;
    char err[256] = "";
    /* What outboxd 0.1 wrote. */
    CHECK(decode("0/16B3F10", &c, err, sizeof(err)) == 0 && c.lsn == 0x16B3F10 && c.version == 0);
    CHECK(!c.backfill.active && c.timeline == 0);
    /* A later release's members are ignored. */
    CHECK(decode("{\"version\":1,\"lsn\":\"0/10\",\"fork\":{\"x\":1},\"nodes\":[1,2]}", &c, err,
                 sizeof(err)) == 0 &&
          c.lsn == 0x10);
}

static void test_wrong(void)
{
    static const char *const bad[][2] = {
        {"", "neither JSON nor an LSN"},
        {"hello", "neither JSON nor an LSN"},
        {"{\"version\":1", "not a JSON object"},
        {"[1]", "neither JSON nor an LSN"},
        {"{\"lsn\":\"0/1\"}", "no \"version\""},
        {"{\"version\":2,\"lsn\":\"0/1\"}", "version 2, this outboxd reads versions up to 1"},
        {"{\"version\":0,\"lsn\":\"0/1\"}", "version 0"},
        {"{\"version\":\"1\",\"lsn\":\"0/1\"}", "version is not an integer"},
        {"{\"version\":1}", "no \"lsn\""},
        {"{\"version\":1,\"lsn\":\"zz\"}", "\"zz\" is not an LSN"},
        {"{\"version\":1,\"lsn\":5}", "lsn is not a string"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"timeline\":\"1\"}", "timeline is not an integer"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"commit_time\":\"yesterday\"}", "not an RFC 3339 time"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"commit_lsn\":\"-1/0\"}", "\"-1/0\" is not an LSN"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"backfill\":1}", "backfill is not an object"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"backfill\":{}}", "backfill has no \"position\""},
        {"{\"version\":1,\"lsn\":\"0/1\",\"backfill\":{\"position\":\"0/1\",\"rows\":\"x\"}}",
         "backfill.rows is not an integer"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"backfill\":{\"position\":\"0/1\",\"table\":2}}",
         "backfill.table is not a string"},
        {"{\"version\":1,\"lsn\":\"0/1\",\"backfill\":{\"position\":\"0/1\",\"since\":\"x\"}}",
         "backfill.since \"x\" is not an RFC 3339 time"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        Checkpoint c = {.lsn = 77};
        char err[256] = "";
        int rc = decode(bad[i][0], &c, err, sizeof(err));
        CHECK(rc == -1);
        CHECK(c.lsn == 77); /* untouched on failure */
        if (!strstr(err, bad[i][1])) {
            check_failures++;
            fprintf(stderr, "input %s: error \"%s\" does not say \"%s\"\n", bad[i][0], err,
                    bad[i][1]);
        }
    }
}

int main(void)
{
    test_round_trip();
    test_old_and_new();
    test_wrong();
    return check_report("test_checkpoint");
}
