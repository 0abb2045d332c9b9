/* test_audit.c - the audit's comparison: classification, matching, duplicates, order, report. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "check.h"
#include "outboxd/audit.h"
#include "outboxd/util.h"

static const AuditRange all = {.since = INT64_MIN, .until = INT64_MAX};

/* A relay event: id, sequence, position "tl lsn index", source (NULL: none). */
static void add_event(Audit *a, const char *id, uint64_t seq, const char *pos, const char *source)
{
    AuditHeaders h = {.msg_id = id, .position = pos, .source = source,
                      .commit_time = "2026-01-02T03:04:05.000006Z"};
    AuditMsg m;
    audit_msg_from_headers(&m, seq, 0, &h, &all);
    audit_add_msg(a, &m);
}

static void add_replay(Audit *a, const char *msg_id, const char *event_id, uint64_t seq)
{
    AuditHeaders h = {.msg_id = msg_id, .event_id = event_id, .replay = "2026-01-02T00:00:00Z",
                      .position = "0 0/0 0", .commit_time = "2026-01-02T03:04:05Z"};
    AuditMsg m;
    audit_msg_from_headers(&m, seq, 0, &h, &all);
    audit_add_msg(a, &m);
}

/* The fake stream for fetch(): ids by sequence. */
static const char *fake_ids[64];

static int fake_fetch(void *arg, uint64_t seq, char *id, size_t idlen)
{
    (void)arg;
    snprintf(id, idlen, "%s", seq < 64 && fake_ids[seq] ? fake_ids[seq] : "?");
    return 0;
}

static void test_classify(void)
{
    AuditRange r = {.since = 1000000, .until = 2000000};
    AuditMsg m;
    AuditHeaders ev = {.msg_id = "e1", .position = "1 0/16B3F10 2", .source = "7/slot",
                       .commit_time = "1970-01-01T00:00:01.5Z"};
    audit_msg_from_headers(&m, 5, 0, &ev, &r);
    CHECK(m.kind == AUDIT_EVENT && strcmp(m.id, "e1") == 0 && m.seq == 5);
    CHECK(m.in_range && m.has_position && m.pos.timeline == 1 && m.pos.lsn == 0x16B3F10 &&
          m.pos.index == 2);
    CHECK_STR(m.source, "7/slot");
    /* Out of the range by commit time; no commit time: the stored time decides. */
    ev.commit_time = "1970-01-01T00:00:02Z";
    audit_msg_from_headers(&m, 5, 0, &ev, &r);
    CHECK(!m.in_range);
    ev.commit_time = NULL;
    ev.source = NULL;
    audit_msg_from_headers(&m, 5, 1500000, &ev, &r);
    CHECK(m.in_range);
    CHECK_STR(m.source, "");

    AuditHeaders dl = {.msg_id = "dlq-e2", .event_id = "e2", .dead_letter = "too_large",
                       .position = "1 0/20 0"};
    audit_msg_from_headers(&m, 6, 1500000, &dl, &r);
    CHECK(m.kind == AUDIT_DEAD_LETTER && strcmp(m.id, "e2") == 0 && m.has_position);
    dl.event_id = NULL; /* a row whose event id was null */
    audit_msg_from_headers(&m, 6, 1500000, &dl, &r);
    CHECK(m.kind == AUDIT_FOREIGN && m.id == NULL);

    AuditHeaders same = {.msg_id = "e3", .replay = "2026-01-01T00:00:00Z", .position = "0 0/0 0"};
    audit_msg_from_headers(&m, 7, 1500000, &same, &r);
    CHECK(m.kind == AUDIT_REPLAY && strcmp(m.id, "e3") == 0 && !m.has_position);
    AuditHeaders fresh = {.msg_id = "e3:replay:1767225600", .event_id = "e3",
                          .replay = "2026-01-01T00:00:00Z"};
    audit_msg_from_headers(&m, 8, 1500000, &fresh, &r);
    CHECK(m.kind == AUDIT_REPLAY && strcmp(m.id, "e3") == 0);

    AuditHeaders none = {0};
    audit_msg_from_headers(&m, 9, 1500000, &none, &r);
    CHECK(m.kind == AUDIT_FOREIGN);
    /* A position from before positions had an LSN (0/0), or garbage: not checked. */
    AuditHeaders bad = {.msg_id = "e4", .position = "nonsense"};
    audit_msg_from_headers(&m, 10, 1500000, &bad, &r);
    CHECK(m.kind == AUDIT_EVENT && !m.has_position);
}

static void test_complete_stream_is_ok(void)
{
    Audit *a;
    audit_new(&a, &all);
    char id[16], pos[32];
    for (int i = 1; i <= 5; i++) {
        snprintf(id, sizeof(id), "e%d", i);
        snprintf(pos, sizeof(pos), "1 0/%X 0", 0x100 * i);
        add_event(a, id, (uint64_t)i, pos, "1/s");
    }
    audit_stream_done(a);
    CHECK(audit_verify_duplicates(a, fake_fetch, NULL) == 0);
    for (int i = 5; i >= 1; i--) {
        snprintf(id, sizeof(id), "e%d", i);
        CHECK(audit_row(a, id, strlen(id), true) == AUDIT_ROW_HELD);
    }
    audit_finish(a);
    const AuditReport *r = audit_report(a);
    CHECK(audit_ok(r));
    CHECK(r->rows == 5 && r->messages == 5 && r->events_in_range == 5);
    CHECK(r->missing.count == 0 && r->duplicates.count == 0 && r->breaks_count == 0);
    CHECK(r->unmatched.count == 0 && r->unpositioned == 0);
    audit_free(a);
}

static void test_missing_dead_letters_and_unmatched(void)
{
    Audit *a;
    audit_new(&a, &all);
    add_event(a, "a", 1, "1 0/10 0", NULL);
    AuditHeaders dl = {.msg_id = "dlq-b", .event_id = "b", .dead_letter = "null_payload",
                       .position = "1 0/10 1"};
    AuditMsg m;
    audit_msg_from_headers(&m, 2, 0, &dl, &all);
    audit_add_msg(a, &m);
    add_event(a, "gone", 3, "1 0/20 0", NULL); /* its row was deleted */
    add_event(a, "edge", 4, "1 0/30 0", NULL); /* its row is in the margin */
    audit_stream_done(a);
    CHECK(audit_row(a, "a", 1, true) == AUDIT_ROW_HELD);
    CHECK(audit_row(a, "b", 1, true) == AUDIT_ROW_HELD);
    CHECK(audit_row(a, "c", 1, true) == AUDIT_ROW_MISSING);
    CHECK(audit_row(a, "d", 1, true) == AUDIT_ROW_MISSING);
    CHECK(audit_row(a, "edge", 4, false) == AUDIT_ROW_HELD);
    CHECK(audit_row(a, "outside", 7, false) == AUDIT_ROW_MISSING); /* never counted */
    audit_finish(a);
    fake_ids[3] = "gone";
    CHECK(audit_resolve(a, fake_fetch, NULL) == 0);
    const AuditReport *r = audit_report(a);
    CHECK(!audit_ok(r));
    CHECK(r->rows == 4);
    CHECK(r->missing.count == 2 && r->missing.n == 2);
    CHECK_STR(r->missing.id[0], "c");
    CHECK_STR(r->missing.id[1], "d");
    CHECK(r->dead_letters == 1);
    CHECK(r->unmatched.count == 1 && r->unmatched.seq[0] == 3);
    CHECK_STR(r->unmatched.id[0], "gone");
    audit_free(a);
    fake_ids[3] = NULL;
}

static void test_many_missing_names_the_first_few(void)
{
    Audit *a;
    audit_new(&a, &all);
    audit_stream_done(a);
    char id[16];
    for (int i = 0; i < 25; i++) {
        snprintf(id, sizeof(id), "m%02d", i);
        CHECK(audit_row(a, id, strlen(id), true) == AUDIT_ROW_MISSING);
    }
    audit_finish(a);
    const AuditReport *r = audit_report(a);
    CHECK(r->missing.count == 25 && r->missing.n == AUDIT_NAMED);
    CHECK_STR(r->missing.id[0], "m00");
    CHECK_STR(r->missing.id[9], "m09");
    audit_free(a);
}

static void test_duplicates_and_replay_copies(void)
{
    Audit *a;
    audit_new(&a, &all);
    add_event(a, "x", 1, "1 0/10 0", NULL);
    add_event(a, "y", 2, "1 0/10 1", NULL);
    add_event(a, "z", 3, "1 0/20 0", NULL);
    add_event(a, "x", 4, "1 0/10 0", NULL); /* stored again after the duplicate window */
    add_replay(a, "y", NULL, 5);            /* replay with the same ids */
    add_replay(a, "z:replay:1", "z", 6);    /* replay with new ids */
    add_replay(a, "w", NULL, 7);            /* the only copy of w */
    add_event(a, "v", 8, "1 0/30 0", NULL);
    audit_stream_done(a);
    for (int s = 1; s <= 8; s++)
        fake_ids[s] = (const char *[]){"", "x", "y", "z", "x", "y", "z", "w", "v"}[s];
    CHECK(audit_verify_duplicates(a, fake_fetch, NULL) == 0);
    CHECK(audit_report(a)->verified_groups == 1);
    CHECK(audit_row(a, "x", 1, true) == AUDIT_ROW_HELD);
    CHECK(audit_row(a, "y", 1, true) == AUDIT_ROW_HELD);
    CHECK(audit_row(a, "z", 1, true) == AUDIT_ROW_HELD);
    CHECK(audit_row(a, "w", 1, true) == AUDIT_ROW_REPLAY_ONLY);
    CHECK(audit_row(a, "v", 1, true) == AUDIT_ROW_HELD);
    audit_finish(a);
    CHECK(audit_resolve(a, fake_fetch, NULL) == 0);
    const AuditReport *r = audit_report(a);
    CHECK(r->duplicates.count == 1 && r->duplicates.seq[0] == 4);
    CHECK_STR(r->duplicates.id[0], "x");
    /* The copy stored again is a duplicate, not also an order break. */
    CHECK(r->breaks_count == 0);
    CHECK(r->replays.count == 3 && r->replays.seq[0] == 5 && r->replays.seq[2] == 7);
    CHECK_STR(r->replays.id[1], "z");
    CHECK(r->replay_only.count == 1);
    CHECK_STR(r->replay_only.id[0], "w");
    CHECK(r->missing.count == 0);
    CHECK(!audit_ok(r));
    audit_free(a);
    memset(fake_ids, 0, sizeof(fake_ids));
}

static void test_a_hash_collision_is_not_a_duplicate(void)
{
    /* The same id on both sides of the index, but the stream says they differ: as if two ids
     * had the same hash. Verification drops the candidate. */
    Audit *a;
    audit_new(&a, &all);
    add_event(a, "p", 1, "1 0/10 0", NULL);
    add_event(a, "p", 2, "1 0/20 0", NULL);
    audit_stream_done(a);
    fake_ids[1] = "p";
    fake_ids[2] = "q";
    CHECK(audit_verify_duplicates(a, fake_fetch, NULL) == 0);
    audit_row(a, "p", 1, true);
    audit_finish(a);
    CHECK(audit_report(a)->duplicates.count == 0);
    CHECK(audit_ok(audit_report(a)));
    audit_free(a);
    memset(fake_ids, 0, sizeof(fake_ids));
}

static void test_order_breaks(void)
{
    Audit *a;
    audit_new(&a, &all);
    /* Commit order 1..6 by LSN; stored 1 2 5 3 4 6: 3 and 4 came after 5. Index order within a
     * transaction counts too: 0/70 1 before 0/70 0. */
    const int lsn[] = {1, 2, 5, 3, 4, 6};
    char id[16], pos[32];
    for (int i = 0; i < 6; i++) {
        snprintf(id, sizeof(id), "o%d", lsn[i]);
        snprintf(pos, sizeof(pos), "1 0/%X 0", lsn[i] * 16);
        add_event(a, id, (uint64_t)i + 1, pos, "9/s");
        fake_ids[i + 1] = xstrdup(id);
    }
    add_event(a, "i1", 7, "1 0/70 1", "9/s");
    add_event(a, "i0", 8, "1 0/70 0", "9/s");
    fake_ids[7] = "i1";
    fake_ids[8] = "i0";
    audit_stream_done(a);
    audit_finish(a);
    CHECK(audit_resolve(a, fake_fetch, NULL) == 0);
    const AuditReport *r = audit_report(a);
    CHECK(r->breaks_count == 3 && r->nbreaks == 3);
    CHECK(r->breaks[0].seq == 4 && r->breaks[0].prev_seq == 3);
    CHECK_STR(r->breaks[0].id, "o3");
    CHECK_STR(r->breaks[0].prev_id, "o5");
    CHECK(r->breaks[0].pos.lsn == 0x30 && r->breaks[0].prev_pos.lsn == 0x50);
    CHECK(r->breaks[1].seq == 5 && r->breaks[1].prev_seq == 3);
    CHECK(r->breaks[2].seq == 8 && r->breaks[2].prev_seq == 7);
    CHECK(!audit_ok(r));
    for (int i = 1; i <= 6; i++)
        free((char *)fake_ids[i]);
    memset(fake_ids, 0, sizeof(fake_ids));
    audit_free(a);
}

static void test_order_is_per_source_and_timeline(void)
{
    Audit *a;
    audit_new(&a, &all);
    add_event(a, "a1", 1, "1 0/900 0", "100/s");
    add_event(a, "b1", 2, "1 0/100 0", "200/s");     /* another system: LSNs say nothing */
    add_event(a, "a2", 3, "2 0/500 0", "100/s");     /* a new timeline after a failover */
    add_event(a, "old", 4, "1 0/50 0", NULL);        /* an older release, without a source */
    add_event(a, "a3", 5, "2 0/600 0", "100/s");
    add_event(a, "nopos", 6, NULL, "100/s");         /* no position: not checked */
    add_replay(a, "a1", NULL, 7);                    /* replays are appended: not checked */
    audit_stream_done(a);
    audit_finish(a);
    const AuditReport *r = audit_report(a);
    CHECK(r->breaks_count == 0);
    CHECK(r->unpositioned == 1);
    CHECK(r->unmatched.count == 6);
    audit_free(a);

    /* Within one source and timeline a lower LSN is a break. */
    audit_new(&a, &all);
    add_event(a, "a1", 1, "1 0/900 0", "100/s");
    add_event(a, "a2", 2, "1 0/800 0", "100/s");
    audit_stream_done(a);
    audit_finish(a);
    CHECK(audit_report(a)->breaks_count == 1);
    audit_free(a);
}

static void test_events_outside_the_range_are_not_checked(void)
{
    AuditRange r = {.since = 1000000, .until = 2000000};
    Audit *a;
    audit_new(&a, &r);
    AuditHeaders h = {.msg_id = "late", .position = "1 0/900 0",
                      .commit_time = "1970-01-01T00:00:03Z"};
    AuditMsg m;
    audit_msg_from_headers(&m, 1, 0, &h, &r);
    audit_add_msg(a, &m);
    h = (AuditHeaders){.msg_id = "in", .position = "1 0/100 0",
                       .commit_time = "1970-01-01T00:00:01Z"};
    audit_msg_from_headers(&m, 2, 0, &h, &r);
    audit_add_msg(a, &m);
    audit_stream_done(a);
    CHECK(audit_row(a, "in", 2, true) == AUDIT_ROW_HELD);
    audit_finish(a);
    const AuditReport *rep = audit_report(a);
    CHECK(rep->events_in_range == 1 && rep->messages == 2);
    CHECK(rep->breaks_count == 0 && rep->unmatched.count == 0);
    CHECK(audit_ok(rep));
    audit_free(a);
}

static void test_report(void)
{
    Audit *a;
    audit_new(&a, &all);
    add_event(a, "x", 1, "1 0/20 0", NULL);
    add_event(a, "y", 2, "1 0/10 0", NULL);
    add_replay(a, "x", NULL, 3);
    audit_stream_done(a);
    audit_row(a, "x", 1, true);
    audit_row(a, "y", 1, true);
    audit_row(a, "lost", 4, true);
    audit_finish(a);
    fake_ids[1] = "x";
    fake_ids[2] = "y";
    CHECK(audit_resolve(a, fake_fetch, NULL) == 0);
    AuditContext ctx = {.tables = "public.outbox", .stream = "OUTBOX", .since = "2026-01-01",
                        .until = NULL, .by_commit_time = false, .time_column = "occurred_at",
                        .seconds = 1.25};
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    audit_print_text(f, &ctx, audit_report(a));
    fclose(f);
    CHECK(strstr(text, "rows committed in [2026-01-01, now)") != NULL);
    CHECK(strstr(text, "range by the occurred_at column: track_commit_timestamp is off") != NULL);
    CHECK(strstr(text, "missing from the stream: 1\n  lost\n") != NULL);
    CHECK(strstr(text, "out of commit order: 1\n  y (sequence 2, position 1 0/10 0) stored after x "
                       "(sequence 1, position 1 0/20 0)\n") != NULL);
    CHECK(strstr(text, "replay copies (from outboxd replay, not duplicates): 1\n  x (stream "
                       "sequence 3)\n") != NULL);
    CHECK(strstr(text, "PROBLEMS FOUND (1.2 s)") != NULL || strstr(text, "PROBLEMS FOUND (1.3 s)"));
    free(text);

    text = NULL;
    f = open_memstream(&text, &len);
    audit_print_json(f, &ctx, audit_report(a));
    fclose(f);
    json_error_t jerr;
    json_t *o = json_loads(text, 0, &jerr);
    CHECK(o != NULL);
    CHECK(json_is_false(json_object_get(o, "ok")));
    CHECK(json_integer_value(json_object_get(o, "rows")) == 3);
    CHECK_STR(json_string_value(json_object_get(o, "range_by")), "time_column");
    json_t *missing = json_object_get(o, "missing");
    CHECK(json_integer_value(json_object_get(missing, "count")) == 1);
    CHECK_STR(json_string_value(json_array_get(json_object_get(missing, "first"), 0)), "lost");
    json_t *br = json_array_get(json_object_get(json_object_get(o, "out_of_order"), "first"), 0);
    CHECK_STR(json_string_value(json_object_get(br, "event_id")), "y");
    CHECK_STR(json_string_value(json_object_get(br, "after_position")), "1 0/20 0");
    json_t *rep = json_array_get(json_object_get(json_object_get(o, "replay_copies"), "first"), 0);
    CHECK(json_integer_value(json_object_get(rep, "seq")) == 3);
    CHECK(json_is_null(json_object_get(o, "until")));
    json_decref(o);
    free(text);
    audit_free(a);
    memset(fake_ids, 0, sizeof(fake_ids));
}

/* A larger run: every id found, nothing flagged, in well under a second. */
static void test_many_events(void)
{
    enum { N = 200000 };
    Audit *a;
    audit_new(&a, &all);
    char id[40], pos[48];
    for (int i = 0; i < N; i++) {
        snprintf(id, sizeof(id), "00000000-0000-4000-8000-%012d", i);
        snprintf(pos, sizeof(pos), "1 0/%X %d", 0x1000 + i / 3, i % 3);
        add_event(a, id, (uint64_t)i + 1, pos, "1/s");
    }
    audit_stream_done(a);
    CHECK(audit_verify_duplicates(a, fake_fetch, NULL) == 0);
    int held = 0;
    for (int i = N - 1; i >= 0; i--) {
        snprintf(id, sizeof(id), "00000000-0000-4000-8000-%012d", i);
        held += audit_row(a, id, strlen(id), true) == AUDIT_ROW_HELD;
    }
    audit_finish(a);
    CHECK(held == N);
    CHECK(audit_ok(audit_report(a)));
    CHECK(audit_report(a)->verified_groups == 0);
    audit_free(a);
}

int main(void)
{
    test_classify();
    test_complete_stream_is_ok();
    test_missing_dead_letters_and_unmatched();
    test_many_missing_names_the_first_few();
    test_duplicates_and_replay_copies();
    test_a_hash_collision_is_not_a_duplicate();
    test_order_breaks();
    test_order_is_per_source_and_timeline();
    test_events_outside_the_range_are_not_checked();
    test_report();
    test_many_events();
    return check_report("test_audit");
}
