/* test_metrics.c - counters, the latency histogram, readiness, and the Prometheus rendering. */
#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "outboxd/metrics.h"
#include "outboxd_version.h"

/* The families in the order they are rendered, with their types. */
static const struct {
    const char *name, *type;
} families[] = {
    {"outboxd_build_info", "gauge"},
    {"outboxd_events_published_total", "counter"},
    {"outboxd_events_duplicate_total", "counter"},
    {"outboxd_events_id_reused_total", "counter"},
    {"outboxd_events_already_stored_total", "counter"},
    {"outboxd_anchors_false_total", "counter"},
    {"outboxd_publish_acks_lost_total", "counter"},
    {"outboxd_publish_errors_total", "counter"},
    {"outboxd_publish_retries_total", "counter"},
    {"outboxd_messages_refused_total", "counter"},
    {"outboxd_dead_letter_total", "counter"},
    {"outboxd_in_flight_events", "gauge"},
    {"outboxd_oldest_pending_age_seconds", "gauge"},
    {"outboxd_replication_lag_bytes", "gauge"},
    {"outboxd_confirmed_lsn", "gauge"},
    {"outboxd_commit_to_ack_seconds", "histogram"},
    {"outboxd_last_commit_timestamp_seconds", "gauge"},
    {"outboxd_postgres_connected", "gauge"},
    {"outboxd_nats_connected", "gauge"},
    {"outboxd_standby", "gauge"},
    {"outboxd_slot_lost", "gauge"},
    {"outboxd_backfill_phase", "gauge"},
    {"outboxd_backfill_rows", "gauge"},
};

#define NOW INT64_C(1763832378000000) /* 2025-11-22T17:26:18Z */

static Buf out;

/* Renders m at now; the text lives until the next call. */
static const char *render(const Metrics *m, int64_t now)
{
    buf_reset(&out);
    metrics_render(m, now, &out);
    return out.data;
}

/* True when text has line (without its newline) as a whole line. */
static bool has_line(const char *text, const char *line)
{
    size_t n = strlen(line);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, line, n) == 0 && p[n] == '\n')
            return true;
    }
    return false;
}

#define CHECK_LINE(text, line)                                                                     \
    do {                                                                                           \
        check_count++;                                                                             \
        if (!has_line((text), (line))) {                                                           \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: no line \"%s\" in:\n%s", __FILE__, __LINE__, (line), (text));  \
        }                                                                                          \
    } while (0)

/* Counts lines that start with prefix. */
static int count_prefix(const char *text, const char *prefix)
{
    int n = 0;
    size_t len = strlen(prefix);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        n += strncmp(p, prefix, len) == 0;
    return n;
}

/* The value of the sample line that starts with "name " (labels included in name). */
static double sample(const char *text, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, name, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    }
    return NAN;
}

/* Validator for the text format: returns NULL, or what is wrong with the first bad line. */

static bool metric_name_char(char c, bool first)
{
    return isalpha((unsigned char)c) || c == '_' || c == ':' ||
           (!first && isdigit((unsigned char)c));
}

static bool label_name_char(char c, bool first)
{
    return isalpha((unsigned char)c) || c == '_' || (!first && isdigit((unsigned char)c));
}

static int family_index(const char *name, size_t len)
{
    for (size_t i = 0; i < ARRAY_SIZE(families); i++) {
        if (strlen(families[i].name) == len && strncmp(families[i].name, name, len) == 0)
            return (int)i;
    }
    return -1;
}

/* The family a sample name belongs to (histograms have _bucket, _sum, _count samples). */
static int sample_family(const char *name, size_t len)
{
    int f = family_index(name, len);
    if (f >= 0)
        return f;
    static const char *const suffixes[] = {"_bucket", "_sum", "_count"};
    for (size_t i = 0; i < ARRAY_SIZE(suffixes); i++) {
        size_t sl = strlen(suffixes[i]);
        if (len > sl && strncmp(name + len - sl, suffixes[i], sl) == 0) {
            f = family_index(name, len - sl);
            if (f >= 0 && strcmp(families[f].type, "histogram") == 0)
                return f;
        }
    }
    return -1;
}

static const char *validate(const char *text, char *why, size_t whylen)
{
    int help[ARRAY_SIZE(families)] = {0}, type[ARRAY_SIZE(families)] = {0};
    int last_family = -1;
    size_t tl = strlen(text);
    if (tl == 0 || text[tl - 1] != '\n')
        return "does not end with a newline";

    for (const char *line = text; *line;) {
        const char *eol = strchr(line, '\n');
        size_t len = (size_t)(eol - line);
        const char *p = line;
#define BAD(msg)                                                                                   \
    do {                                                                                           \
        snprintf(why, whylen, "%s: %.*s", (msg), (int)len, line);                                  \
        return why;                                                                                \
    } while (0)
        if (len == 0)
            BAD("empty line");
        if (*p == '#') {
            bool is_help = strncmp(p, "# HELP ", 7) == 0, is_type = strncmp(p, "# TYPE ", 7) == 0;
            if (!is_help && !is_type)
                BAD("comment that is neither HELP nor TYPE");
            p += 7;
            const char *name = p;
            while (p < eol && *p != ' ')
                p++;
            int f = family_index(name, (size_t)(p - name));
            if (f < 0)
                BAD("unknown family");
            if (f < last_family)
                BAD("family out of order");
            last_family = f;
            if (p >= eol || p + 1 >= eol)
                BAD("no text after the name");
            p++;
            if (is_help) {
                help[f]++;
                if (type[f])
                    BAD("HELP after TYPE");
            } else {
                type[f]++;
                if ((size_t)(eol - p) != strlen(families[f].type) ||
                    strncmp(p, families[f].type, (size_t)(eol - p)) != 0)
                    BAD("wrong type");
            }
            line = eol + 1;
            continue;
        }

        const char *name = p;
        if (!metric_name_char(*p, true))
            BAD("bad metric name");
        while (metric_name_char(*p, false))
            p++;
        int f = sample_family(name, (size_t)(p - name));
        if (f < 0)
            BAD("sample of no known family");
        if (f != last_family || !type[f])
            BAD("sample not under its family's TYPE");
        if (*p == '{') {
            p++;
            for (;;) {
                if (!label_name_char(*p, true))
                    BAD("bad label name");
                while (label_name_char(*p, false))
                    p++;
                if (p[0] != '=' || p[1] != '"')
                    BAD("label without =\"");
                p += 2;
                while (p < eol && *p != '"') {
                    if (*p == '\\') {
                        if (p[1] != '\\' && p[1] != '"' && p[1] != 'n')
                            BAD("bad escape in label value");
                        p++;
                    }
                    p++;
                }
                if (p >= eol)
                    BAD("unterminated label value");
                p++;
                if (*p == ',') {
                    p++;
                    continue;
                }
                if (*p != '}')
                    BAD("labels not closed");
                p++;
                break;
            }
        }
        if (*p != ' ')
            BAD("no single space before the value");
        p++;
        size_t vl = (size_t)(eol - p);
        if (vl == 0)
            BAD("no value");
        if (!((vl == 4 && strncmp(p, "+Inf", 4) == 0) || (vl == 4 && strncmp(p, "-Inf", 4) == 0) ||
              (vl == 3 && strncmp(p, "NaN", 3) == 0))) {
            char *end;
            if (isspace((unsigned char)*p))
                BAD("space before the value");
            strtod(p, &end);
            if (end != eol)
                BAD("value is not a float (or has a timestamp)");
        }
        line = eol + 1;
#undef BAD
    }
    for (size_t i = 0; i < ARRAY_SIZE(families); i++) {
        if (help[i] != 1 || type[i] != 1) {
            snprintf(why, whylen, "%s has %d HELP and %d TYPE lines", families[i].name, help[i],
                     type[i]);
            return why;
        }
    }
    return NULL;
}

#define CHECK_VALID(text)                                                                          \
    do {                                                                                           \
        char why_[512];                                                                            \
        const char *bad_ = validate((text), why_, sizeof why_);                                    \
        check_count++;                                                                             \
        if (bad_) {                                                                                \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: invalid exposition: %s\n", __FILE__, __LINE__, bad_);          \
        }                                                                                          \
    } while (0)

static void reset_global(void)
{
    /* Test only: nothing else touches the global here. */
    memset(&metrics, 0, sizeof metrics);
}

static void test_names(void)
{
    CHECK_STR(metrics_publish_error_name(PUBERR_TIMEOUT), "timeout");
    CHECK_STR(metrics_publish_error_name(PUBERR_NO_RESPONDERS), "no_responders");
    CHECK_STR(metrics_publish_error_name(PUBERR_REJECTED), "rejected");
    CHECK_STR(metrics_publish_error_name(PUBERR_CONNECTION), "connection");
    CHECK_STR(metrics_publish_error_name(PUBERR_NO_RESOURCES), "no_resources");
    CHECK_STR(metrics_publish_error_name(PUBERR_COUNT), "unknown");
    CHECK_STR(metrics_dead_letter_name(DLR_INVALID_EVENT_ID), "invalid_event_id");
    CHECK_STR(metrics_dead_letter_name(DLR_NULL_PAYLOAD), "null_payload");
    CHECK_STR(metrics_dead_letter_name(DLR_TOO_LARGE), "too_large");
    CHECK_STR(metrics_dead_letter_name(DLR_INVALID_SUBJECT), "invalid_subject");
    CHECK_STR(metrics_dead_letter_name(DLR_INVALID_ENVELOPE), "invalid_envelope");
    CHECK_STR(metrics_dead_letter_name(DLR_REJECTED), "rejected");
    CHECK_STR(metrics_dead_letter_name(DLR_COUNT), "unknown");
}

static void test_bounds(void)
{
    static const double want[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                  0.25,  0.5,    1,     2.5,  5,     10,   30};
    CHECK(ARRAY_SIZE(want) == METRICS_LATENCY_BUCKETS);
    for (size_t i = 0; i < METRICS_LATENCY_BUCKETS; i++) {
        CHECK(metrics_latency_bounds[i] == want[i]);
        if (i > 0)
            CHECK(metrics_latency_bounds[i] > metrics_latency_bounds[i - 1]);
    }
}

/* An idle relay just started: everything zero, every reason listed. */
static void test_render_zero(void)
{
    Metrics m = {0};
    const char *t = render(&m, NOW);
    CHECK_VALID(t);

    char build[128];
    snprintf(build, sizeof build, "outboxd_build_info{version=\"%s\"} 1", OUTBOXD_VERSION);
    CHECK_LINE(t, build);
    CHECK(strncmp(t, "# HELP outboxd_build_info ", 26) == 0);
    CHECK_LINE(t, "# TYPE outboxd_build_info gauge");
    CHECK_LINE(t, "outboxd_events_published_total 0");
    CHECK_LINE(t, "outboxd_events_duplicate_total 0");
    CHECK_LINE(t, "# HELP outboxd_events_duplicate_total acknowledgements JetStream flagged as "
                  "duplicates (dedupe hits)");
    for (int r = 0; r < PUBERR_COUNT; r++) {
        char line[128];
        snprintf(line, sizeof line, "outboxd_publish_errors_total{reason=\"%s\"} 0",
                 metrics_publish_error_name((PublishError)r));
        CHECK_LINE(t, line);
    }
    CHECK(count_prefix(t, "outboxd_publish_errors_total{") == PUBERR_COUNT);
    for (int r = 0; r < DLR_COUNT; r++) {
        char line[128];
        snprintf(line, sizeof line, "outboxd_dead_letter_total{reason=\"%s\"} 0",
                 metrics_dead_letter_name((DeadLetterReason)r));
        CHECK_LINE(t, line);
    }
    CHECK(count_prefix(t, "outboxd_dead_letter_total{") == DLR_COUNT);
    CHECK_LINE(t, "outboxd_in_flight_events 0");
    CHECK_LINE(t, "outboxd_oldest_pending_age_seconds 0");
    CHECK_LINE(t, "outboxd_replication_lag_bytes 0");
    CHECK_LINE(t, "outboxd_confirmed_lsn 0");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"0.001\"} 0");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"+Inf\"} 0");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_sum 0");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_count 0");
    CHECK_LINE(t, "outboxd_last_commit_timestamp_seconds 0");
    CHECK_LINE(t, "outboxd_postgres_connected 0");
    CHECK_LINE(t, "outboxd_nats_connected 0");
    CHECK_LINE(t, "outboxd_standby 0");
    CHECK_LINE(t, "outboxd_slot_lost 0");
    CHECK(count_prefix(t, "# HELP ") == (int)ARRAY_SIZE(families));
    CHECK(count_prefix(t, "# TYPE ") == (int)ARRAY_SIZE(families));
}

/* A busy relay: every value set by hand. */
static void test_render_values(void)
{
    Metrics m = {0};
    m.events_published = 42;
    m.events_duplicate = 3;
    m.publish_errors[PUBERR_TIMEOUT] = 5;
    m.publish_errors[PUBERR_CONNECTION] = 1;
    m.publish_retries = 7;
    m.dead_letter[DLR_TOO_LARGE] = 2;
    m.dead_letter[DLR_REJECTED] = 9;
    m.in_flight = 17;
    m.oldest_pending_unix_us = NOW - 2500000;
    m.confirmed_lsn = 0x16B3748;
    m.server_wal_lsn = 0x16B3748 + 4096;
    m.last_commit_unix_us = NOW - 123456;
    m.latency_buckets[0] = 2;  /* <= 1ms */
    m.latency_buckets[1] = 1;  /* <= 2.5ms */
    m.latency_buckets[13] = 1; /* <= 30s */
    m.latency_buckets[14] = 1; /* > 30s */
    m.latency_count = 5;
    m.latency_sum_us = 95003500;
    m.pg_connected = 1;
    m.nats_connected = 1;
    m.standby = 0;

    const char *t = render(&m, NOW);
    CHECK_VALID(t);
    CHECK_LINE(t, "outboxd_events_published_total 42");
    CHECK_LINE(t, "outboxd_events_duplicate_total 3");
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"timeout\"} 5");
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"no_responders\"} 0");
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"rejected\"} 0");
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"connection\"} 1");
    CHECK_LINE(t, "outboxd_publish_retries_total 7");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"invalid_event_id\"} 0");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"null_payload\"} 0");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"too_large\"} 2");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"invalid_subject\"} 0");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"rejected\"} 9");
    CHECK_LINE(t, "outboxd_in_flight_events 17");
    CHECK_LINE(t, "outboxd_oldest_pending_age_seconds 2.5");
    CHECK_LINE(t, "outboxd_replication_lag_bytes 4096");
    CHECK_LINE(t, "outboxd_confirmed_lsn 23803720");
    CHECK_LINE(t, "outboxd_last_commit_timestamp_seconds 1763832377.876544");
    CHECK_LINE(t, "outboxd_postgres_connected 1");
    CHECK_LINE(t, "outboxd_nats_connected 1");
    CHECK_LINE(t, "outboxd_standby 0");

    /* The histogram: cumulative, every bound in order, +Inf equal to _count. */
    static const char *const le[] = {"0.001", "0.0025", "0.005", "0.01", "0.025",
                                     "0.05",  "0.1",    "0.25",  "0.5",  "1",
                                     "2.5",   "5",      "10",    "30",   "+Inf"};
    static const int cumulative[] = {2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 5};
    const char *prev = t;
    for (size_t i = 0; i < ARRAY_SIZE(le); i++) {
        char line[128];
        snprintf(line, sizeof line, "outboxd_commit_to_ack_seconds_bucket{le=\"%s\"} %d", le[i],
                 cumulative[i]);
        CHECK_LINE(t, line);
        const char *at = strstr(t, line);
        CHECK(at && at > prev); /* in increasing order of le */
        if (at)
            prev = at;
    }
    CHECK(count_prefix(t, "outboxd_commit_to_ack_seconds_bucket{") == METRICS_LATENCY_BUCKETS + 1);
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_sum 95.0035");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_count 5");
    CHECK(sample(t, "outboxd_commit_to_ack_seconds_bucket{le=\"+Inf\"}") ==
          sample(t, "outboxd_commit_to_ack_seconds_count"));

    /* The families come in the documented order. */
    const char *last = t;
    for (size_t i = 0; i < ARRAY_SIZE(families); i++) {
        char line[128];
        snprintf(line, sizeof line, "# TYPE %s %s\n", families[i].name, families[i].type);
        const char *at = strstr(t, line);
        CHECK(at && at >= last);
        if (at)
            last = at;
    }
}

static void test_render_edges(void)
{
    Metrics m = {0};
    const char *t;

    /* Lag is zero while the server position is behind the confirmed one (not yet seen). */
    m.confirmed_lsn = 0x2000000;
    m.server_wal_lsn = 0x1000000;
    t = render(&m, NOW);
    CHECK_LINE(t, "outboxd_replication_lag_bytes 0");
    CHECK_LINE(t, "outboxd_confirmed_lsn 33554432");
    m.server_wal_lsn = 0x2000000;
    CHECK_LINE(render(&m, NOW), "outboxd_replication_lag_bytes 0");
    /* A position past 2^32 (the high half of X/X) is still one number. */
    m.confirmed_lsn = UINT64_C(0x100000000);
    m.server_wal_lsn = UINT64_C(0x100000001);
    t = render(&m, NOW);
    CHECK_LINE(t, "outboxd_confirmed_lsn 4294967296");
    CHECK_LINE(t, "outboxd_replication_lag_bytes 1");

    /* Age: clamped at zero when the commit clock is ahead, fractions to the microsecond. */
    m.oldest_pending_unix_us = NOW + 5000000;
    CHECK_LINE(render(&m, NOW), "outboxd_oldest_pending_age_seconds 0");
    m.oldest_pending_unix_us = NOW - 1;
    CHECK_LINE(render(&m, NOW), "outboxd_oldest_pending_age_seconds 0.000001");
    m.oldest_pending_unix_us = NOW - 90000000;
    CHECK_LINE(render(&m, NOW), "outboxd_oldest_pending_age_seconds 90");
    /* The age rises with the scrape time while nothing changes (a stalled relay). */
    CHECK_LINE(render(&m, NOW + 10000000), "outboxd_oldest_pending_age_seconds 100");

    /* Last commit: whole seconds print without a fraction. */
    m.last_commit_unix_us = NOW;
    CHECK_LINE(render(&m, NOW), "outboxd_last_commit_timestamp_seconds 1763832378");

    /* Flags other than 0/1 still render as 0/1; a negative in-flight gauge is a plain integer. */
    m.pg_connected = 7;
    m.standby = 1;
    m.in_flight = -1;
    t = render(&m, NOW);
    CHECK_LINE(t, "outboxd_postgres_connected 1");
    CHECK_LINE(t, "outboxd_standby 1");
    CHECK_LINE(t, "outboxd_in_flight_events -1");
    CHECK_VALID(t);

    /* Rendering appends. */
    buf_reset(&out);
    buf_puts(&out, "x\n");
    metrics_render(&m, NOW, &out);
    CHECK(strncmp(out.data, "x\n# HELP outboxd_build_info ", 28) == 0);
}

static void test_observe(void)
{
    reset_global();
    metrics_observe_latency(500);      /* 0.0005 s */
    metrics_observe_latency(1000);     /* exactly 0.001: le is inclusive */
    metrics_observe_latency(1001);     /* just over: 0.0025 */
    metrics_observe_latency(-5);       /* skewed clocks: counted as 0 */
    metrics_observe_latency(7000000);  /* 7 s: le 10 */
    metrics_observe_latency(30000000); /* 30 s: le 30 */
    metrics_observe_latency(60000000); /* 60 s: +Inf */
    CHECK(metrics.latency_buckets[0] == 3);
    CHECK(metrics.latency_buckets[1] == 1);
    CHECK(metrics.latency_buckets[12] == 1);
    CHECK(metrics.latency_buckets[13] == 1);
    CHECK(metrics.latency_buckets[14] == 1);
    CHECK(metrics.latency_count == 7);
    CHECK(metrics.latency_sum_us == 500 + 1000 + 1001 + 7000000 + 30000000 + 60000000);

    const char *t = render(&metrics, NOW);
    CHECK_VALID(t);
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"0.001\"} 3");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"0.0025\"} 4");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"5\"} 4");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"10\"} 5");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"30\"} 6");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_bucket{le=\"+Inf\"} 7");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_sum 97.002501");
    CHECK_LINE(t, "outboxd_commit_to_ack_seconds_count 7");

    /* Every bucket's bound is an upper bound: a value at each bound lands in that bucket. */
    reset_global();
    for (int i = 0; i < METRICS_LATENCY_BUCKETS; i++)
        metrics_observe_latency((int64_t)(metrics_latency_bounds[i] * 1e6 + 0.5));
    for (int i = 0; i < METRICS_LATENCY_BUCKETS; i++)
        CHECK(metrics.latency_buckets[i] == 1);
    CHECK(metrics.latency_buckets[METRICS_LATENCY_BUCKETS] == 0);

    /* Counters with reasons; out-of-range reasons are ignored. */
    reset_global();
    metrics_publish_error(PUBERR_NO_RESPONDERS);
    metrics_publish_error(PUBERR_NO_RESPONDERS);
    metrics_publish_error(PUBERR_REJECTED);
    metrics_publish_error(PUBERR_COUNT);
    metrics_dead_letter(DLR_INVALID_SUBJECT);
    metrics_dead_letter(DLR_COUNT);
    t = render(&metrics, NOW);
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"no_responders\"} 2");
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"rejected\"} 1");
    CHECK_LINE(t, "outboxd_publish_errors_total{reason=\"timeout\"} 0");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"invalid_subject\"} 1");
    CHECK_LINE(t, "outboxd_dead_letter_total{reason=\"rejected\"} 0");
    reset_global();
}

#define THREADS 4
#define PER_THREAD 21000 /* a multiple of every reason count */

static void *hammer(void *arg)
{
    (void)arg;
    for (int i = 0; i < PER_THREAD; i++) {
        metrics_publish_error((PublishError)(i % PUBERR_COUNT));
        metrics_dead_letter((DeadLetterReason)(i % DLR_COUNT));
        metrics_observe_latency(i);
    }
    return NULL;
}

/* Updates from several threads are never lost. */
static void test_concurrent(void)
{
    reset_global();
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        CHECK(pthread_create(&th[i], NULL, hammer, NULL) == 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    uint64_t errors = 0, dead = 0, buckets = 0;
    for (int r = 0; r < PUBERR_COUNT; r++) {
        CHECK(metrics.publish_errors[r] == THREADS * PER_THREAD / PUBERR_COUNT);
        errors += metrics.publish_errors[r];
    }
    for (int r = 0; r < DLR_COUNT; r++)
        dead += metrics.dead_letter[r];
    for (int i = 0; i <= METRICS_LATENCY_BUCKETS; i++)
        buckets += metrics.latency_buckets[i];
    CHECK(errors == THREADS * PER_THREAD);
    CHECK(dead == THREADS * PER_THREAD);
    CHECK(buckets == THREADS * PER_THREAD);
    CHECK(metrics.latency_count == THREADS * PER_THREAD);
    CHECK(metrics.latency_sum_us == (uint64_t)THREADS * PER_THREAD * (PER_THREAD - 1) / 2);
    reset_global();
}

static void test_ready_alive(void)
{
    Metrics m = {0};
    CHECK(!metrics_ready(&m));
    m.pg_connected = 1;
    CHECK(!metrics_ready(&m));
    m.nats_connected = 1;
    CHECK(metrics_ready(&m));
    m.standby = 1;
    CHECK(!metrics_ready(&m));
    m.standby = 0;
    m.slot_lost = 1;
    CHECK(!metrics_ready(&m));
    m.slot_lost = 0;
    m.pg_connected = 0;
    CHECK(!metrics_ready(&m));

    const int64_t stale = 30000000;
    CHECK(!metrics_alive(&m, 1000, stale)); /* never turned */
    m.heartbeat_mono_us = 1000;
    CHECK(metrics_alive(&m, 1000, stale));
    CHECK(metrics_alive(&m, 1000 + stale, stale));
    CHECK(!metrics_alive(&m, 1000 + stale + 1, stale));
}

int main(void)
{
    buf_init(&out);
    test_names();
    test_bounds();
    test_render_zero();
    test_render_values();
    test_render_edges();
    test_observe();
    test_concurrent();
    test_ready_alive();
    buf_deinit(&out);
    return check_report("test_metrics");
}
