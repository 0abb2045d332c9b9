/*
 * bench_publish - publishes outbox-like messages to JetStream as fast as a bounded window allows.
 *
 * It is "limit B" of scripts/bench: what the broker (and nats.c) can take for the messages outboxd
 * sends, with no PostgreSQL and no decoding in the way. Each message looks like one outboxd builds
 * from a row that scripts/bench writes:
 *
 *   subject  <prefix>.<aggregate_type>.<event_type>, aggregate_type cycling over order, customer,
 *            invoice, payment and event_type over created, updated (the same 8 subjects as the
 *            bench's rows: message i gets AGG[i % 4], EVT[(i / 4) % 2])
 *   headers  Nats-Msg-Id (a random UUID, unique), Outbox-Event-Type, Outbox-Aggregate-Type,
 *            Outbox-Aggregate-Id, Outbox-Occurred-At, Outbox-Schema-Version, Outbox-Trace-Id
 *            (32 hex digits), Outbox-Commit-Lsn, Outbox-Commit-Time, Outbox-Position: 10 headers
 *            of the same sizes as outboxd's; with --chain also Nats-Expected-Last-Sequence =
 *            the sequence of the message before it (the stream starts empty), as outboxd sends
 *            with --strict-order=true (its default)
 *   body     {"pad": "...", "seq": "0000000042"}, exactly --body-bytes bytes (at least 32)
 *
 * Usage:
 *   bench_publish --count N [--url URL] [--stream NAME] [--subject-prefix P] [--body-bytes B]
 *                 [--window W] [--mode core|async] [--chain]
 *   bench_publish --rate R --duration S [...]      (paced: "NATS alone" of scripts/bench's live)
 *
 * Modes:
 *   core   (default) what outboxd does: the header block encoded once (src/wire.c), a core NATS
 *          publish with a reply subject <inbox>.<i> and one wildcard subscription <inbox>.> that
 *          receives every PubAck. At most --window
 *          messages (default 4096, outboxd's --max-inflight default) are unacknowledged at once.
 *   async  nats.c's JetStream async API: js_PublishMsgAsync with PublishAsync.MaxPending =
 *          --window and an AckHandler counting the acks, then js_PublishAsyncComplete.
 *
 * Paced (--rate R --duration S, core mode only): the live floor of scripts/bench. Like its paced
 * writer (1000 transactions/s of R/1000 rows), it publishes a burst of R/1000 messages every
 * millisecond (fewer bursts below 1000/s), each stamped Outbox-Commit-Time = the wall clock at
 * the burst, so a subscriber measures publish to receipt as it measures outboxd's commit to
 * receipt. The cheapest way to hand a burst to the server: a WireBatch (src/wire.c), one write
 * per burst; where that is not available nats.c's flusher writes it ("flush" in the output).
 * "start_unix"/"end_unix" bound the bursts; "behind_max_s" is how late the latest burst was.
 *
 * The clock starts before the first publish and stops when the last PubAck arrived. With
 * --stream NAME the stream must exist before the start, and its message count afterwards is
 * reported as "stored". Prints one JSON object on stdout:
 *   {"events":N,"seconds":S,"rate":R,"acked":N,"errors":0,"duplicates":0,"stored":N,...}
 * Exit status 0 when every message was acknowledged without error, 1 otherwise, 2 on bad usage.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nats/nats.h>

#include "outboxd/outbox.h"
#include "outboxd/wire.h"

#define DEFAULT_URL "nats://127.0.0.1:4222"
#define STALL_LIMIT_MS 60000

static const char *const AGG[] = {"order", "customer", "invoice", "payment"};
static const char *const EVT[] = {"created", "updated"};
#define NAGG (sizeof(AGG) / sizeof(AGG[0]))
#define NEVT (sizeof(EVT) / sizeof(EVT[0]))

typedef struct Args {
    const char *url;
    const char *stream;
    const char *prefix;
    const char *mode;
    int64_t count;
    int64_t body_bytes;
    int64_t window;
    double rate;     /* paced: messages per second (0: as fast as the window allows) */
    double duration; /* paced: seconds */
    bool chain;
} Args;

typedef struct State {
    _Atomic int64_t acked;
    _Atomic int64_t errors;
    _Atomic int64_t duplicates;
    _Atomic int waiting;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char first_error[256];
    atomic_flag first_error_set;
} State;

static State st = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
    .first_error_set = ATOMIC_FLAG_INIT,
};

/* Prints "bench_publish: <msg> <what>" and the usage line; exits 2. */
static void usage(const char *msg, const char *what) __attribute__((noreturn));

static void usage(const char *msg, const char *what)
{
    fprintf(stderr, "bench_publish: %s %s", msg, what);
    fprintf(stderr, "\nusage: bench_publish --count N [--url URL] [--stream NAME] "
                    "[--subject-prefix P] [--body-bytes B] [--window W] [--mode core|async] "
                    "[--chain]\n");
    exit(2);
}

static int64_t parse_int(const char *name, const char *v)
{
    char *end = NULL;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno || !end || *end || n < 0)
        usage("bad value for", name);
    return (int64_t)n;
}

static void parse_args(int argc, char **argv, Args *a)
{
    *a = (Args){.url = DEFAULT_URL, .stream = "", .prefix = "bench", .mode = "core",
                .count = -1, .body_bytes = 200, .window = 4096};
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) != 0)
            usage("unexpected argument", arg);
        char name[64];
        const char *eq = strchr(arg, '=');
        size_t nlen = eq ? (size_t)(eq - arg) : strlen(arg);
        if (nlen >= sizeof(name))
            usage("unknown option", arg);
        memcpy(name, arg, nlen);
        name[nlen] = '\0';
        if (strcmp(name, "--chain") == 0) {
            a->chain = eq ? strcmp(eq + 1, "false") != 0 : true;
            continue;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (!val) {
            if (i + 1 >= argc)
                usage("missing value for", name);
            val = argv[++i];
        }
        if (strcmp(name, "--url") == 0)
            a->url = val;
        else if (strcmp(name, "--stream") == 0)
            a->stream = val;
        else if (strcmp(name, "--subject-prefix") == 0)
            a->prefix = val;
        else if (strcmp(name, "--mode") == 0)
            a->mode = val;
        else if (strcmp(name, "--count") == 0)
            a->count = parse_int(name, val);
        else if (strcmp(name, "--body-bytes") == 0)
            a->body_bytes = parse_int(name, val);
        else if (strcmp(name, "--window") == 0)
            a->window = parse_int(name, val);
        else if (strcmp(name, "--rate") == 0)
            a->rate = (double)parse_int(name, val);
        else if (strcmp(name, "--duration") == 0)
            a->duration = (double)parse_int(name, val);
        else
            usage("unknown option", name);
    }
    if (a->rate > 0) {
        if (a->duration <= 0)
            usage("--rate needs", "--duration");
        if (strcmp(a->mode, "core") != 0)
            usage("--rate works with", "--mode core");
        a->count = 0; /* decided by rate and duration */
    }
    if (a->count < 0)
        usage("missing option", "--count");
    if (a->body_bytes < 32)
        usage("must be at least 32:", "--body-bytes");
    if (a->window < 1)
        usage("must be at least 1:", "--window");
    if (strcmp(a->mode, "core") != 0 && strcmp(a->mode, "async") != 0)
        usage("--mode must be core or async, not", a->mode);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* xoshiro256** : cheap random bits for the ids */
static uint64_t rng_s[4];

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(void)
{
    uint64_t r = rotl(rng_s[1] * 5, 7) * 9, t = rng_s[1] << 17;
    rng_s[2] ^= rng_s[0];
    rng_s[3] ^= rng_s[1];
    rng_s[1] ^= rng_s[2];
    rng_s[0] ^= rng_s[3];
    rng_s[2] ^= t;
    rng_s[3] = rotl(rng_s[3], 45);
    return r;
}

static void rng_seed(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t z = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid();
    for (int i = 0; i < 4; i++) {
        z += UINT64_C(0x9e3779b97f4a7c15);
        uint64_t x = z;
        x = (x ^ (x >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
        x = (x ^ (x >> 27)) * UINT64_C(0x94d049bb133111eb);
        rng_s[i] = x ^ (x >> 31);
    }
}

static void hex(char *out, uint64_t v, int digits)
{
    static const char h[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--) {
        out[i] = h[v & 15];
        v >>= 4;
    }
}

/* A random version 4 UUID, 36 characters plus NUL. */
static void make_uuid(char out[37])
{
    uint64_t a = rng_next(), b = rng_next();
    a = (a & ~UINT64_C(0xf000)) | UINT64_C(0x4000);
    b = (b & ~(UINT64_C(3) << 62)) | (UINT64_C(2) << 62);
    hex(out, a >> 32, 8);
    out[8] = '-';
    hex(out + 9, (a >> 16) & 0xffff, 4);
    out[13] = '-';
    hex(out + 14, a & 0xffff, 4);
    out[18] = '-';
    hex(out + 19, b >> 48, 4);
    out[23] = '-';
    hex(out + 24, b & UINT64_C(0xffffffffffff), 12);
    out[36] = '\0';
}

/* RFC 3339 UTC with microseconds, as outboxd writes its time headers. */
static void rfc3339(char *out, size_t outlen, int64_t unix_us)
{
    time_t secs = (time_t)(unix_us / 1000000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(out, outlen, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, outlen - n, ".%06dZ", (int)(unix_us % 1000000));
}

static void note_error(const char *what)
{
    atomic_fetch_add(&st.errors, 1);
    if (!atomic_flag_test_and_set(&st.first_error_set))
        snprintf(st.first_error, sizeof(st.first_error), "%s", what);
}

/* Called for every answer; wakes the publisher when it waits for room in the window. */
static void count_ack(void)
{
    atomic_fetch_add(&st.acked, 1);
    if (atomic_load(&st.waiting)) {
        pthread_mutex_lock(&st.mu);
        pthread_cond_signal(&st.cv);
        pthread_mutex_unlock(&st.mu);
    }
}

static void on_reply(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
    (void)nc;
    (void)sub;
    (void)closure;
    if (natsMsg_IsNoResponders(msg)) {
        note_error("no responders (no stream captures the subject)");
    } else {
        const char *data = natsMsg_GetData(msg);
        int len = natsMsg_GetDataLength(msg);
        if (data && len > 0 && memmem(data, (size_t)len, "\"error\"", 7)) {
            char text[200];
            snprintf(text, sizeof(text), "%.*s", len > 180 ? 180 : len, data);
            note_error(text);
        } else if (data && len > 0 && memmem(data, (size_t)len, "\"duplicate\":true", 16)) {
            atomic_fetch_add(&st.duplicates, 1);
        }
    }
    natsMsg_Destroy(msg);
    count_ack();
}

static void on_js_ack(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    (void)js;
    (void)closure;
    if (pae) {
        char text[200];
        snprintf(text, sizeof(text), "%s (err_code %d)",
                 pae->ErrText ? pae->ErrText : natsStatus_GetText(pae->Err), (int)pae->ErrCode);
        note_error(text);
    } else if (pa && pa->Duplicate) {
        atomic_fetch_add(&st.duplicates, 1);
    }
    natsMsg_Destroy(msg);
    count_ack();
}

/* Waits until fewer than window messages are unacknowledged; false after STALL_LIMIT_MS
 * without any progress. */
static bool wait_for_room(int64_t sent, int64_t window)
{
    if (sent - atomic_load(&st.acked) < window)
        return true;
    int64_t last = atomic_load(&st.acked);
    double stalled_since = now_s();
    pthread_mutex_lock(&st.mu);
    atomic_store(&st.waiting, 1);
    while (sent - atomic_load(&st.acked) >= window) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 50 * 1000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&st.cv, &st.mu, &ts);
        int64_t now_acked = atomic_load(&st.acked);
        if (now_acked != last) {
            last = now_acked;
            stalled_since = now_s();
        } else if (now_s() - stalled_since > STALL_LIMIT_MS / 1000.0) {
            atomic_store(&st.waiting, 0);
            pthread_mutex_unlock(&st.mu);
            return false;
        }
    }
    atomic_store(&st.waiting, 0);
    pthread_mutex_unlock(&st.mu);
    return true;
}

typedef struct Gen {
    const Args *a;
    char *body;
    size_t seq_off; /* where the 10 seq digits go in body */
    int64_t base_us;
    uint64_t base_lsn;
    OutboxEvent ev;
    double header_bytes; /* sum over messages of the encoded header block size */
    int64_t commit_us;   /* paced: the burst's wall clock, for Outbox-Commit-Time (0: synthetic) */
} Gen;

static void gen_init(Gen *g, const Args *a)
{
    memset(g, 0, sizeof(*g));
    g->a = a;
    outbox_event_init(&g->ev);
    size_t n = (size_t)a->body_bytes;
    g->body = malloc(n + 1);
    if (!g->body) {
        fprintf(stderr, "bench_publish: out of memory\n");
        exit(1);
    }
    /* {"pad": "<P>", "seq": "<10 digits>"} : 32 bytes around P */
    size_t p = n - 32;
    size_t off = 0;
    memcpy(g->body + off, "{\"pad\": \"", 9);
    off += 9;
    for (size_t i = 0; i < p; i++)
        g->body[off + i] = "0123456789abcdef"[(i * 7 + i / 16) & 15];
    off += p;
    memcpy(g->body + off, "\", \"seq\": \"", 11);
    off += 11;
    g->seq_off = off;
    memcpy(g->body + off, "0000000000\"}", 12);
    off += 12;
    g->body[off] = '\0';
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    g->base_us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
    g->base_lsn = UINT64_C(0x1000000);
}

static void add(OutboxEvent *ev, const char *name, const char *value)
{
    outbox_event_add_header(ev, name, value, strlen(value));
}

/* Encodes message i into w, as outboxd encodes an event (src/wire.c). */
static void build(Gen *g, int64_t i, WireMsg *w)
{
    const Args *a = g->a;
    char subject[256], id[37], aggid[32], occurred[64], committed[64], trace[33], lsn[32],
        pos[64];
    const char *agg = AGG[(uint64_t)i % NAGG], *evt = EVT[((uint64_t)i / NAGG) % NEVT];
    snprintf(subject, sizeof(subject), "%s.%s.%s", a->prefix, agg, evt);
    make_uuid(id);
    snprintf(aggid, sizeof(aggid), "agg-%" PRId64, i % 100000);
    rfc3339(occurred, sizeof(occurred), g->base_us + i);
    rfc3339(committed, sizeof(committed), g->commit_us ? g->commit_us : g->base_us + i + 50);
    hex(trace, rng_next(), 16);
    hex(trace + 16, rng_next(), 16);
    trace[32] = '\0';
    uint64_t l = g->base_lsn + (uint64_t)i * 330;
    snprintf(lsn, sizeof(lsn), "%" PRIX64 "/%" PRIX64, l >> 32, l & 0xffffffff);
    snprintf(pos, sizeof(pos), "1 %s 0", lsn);

    char digits[24];
    snprintf(digits, sizeof(digits), "%010" PRId64, i % INT64_C(10000000000));
    memcpy(g->body + g->seq_off, digits, 10);

    OutboxEvent *ev = &g->ev;
    buf_reset(&ev->subject);
    buf_puts(&ev->subject, subject);
    buf_reset(&ev->hvals);
    ev->nheaders = 0;
    add(ev, "Nats-Msg-Id", id);
    add(ev, "Outbox-Event-Type", evt);
    add(ev, "Outbox-Aggregate-Type", agg);
    add(ev, "Outbox-Aggregate-Id", aggid);
    add(ev, "Outbox-Occurred-At", occurred);
    add(ev, "Outbox-Schema-Version", "1");
    add(ev, "Outbox-Trace-Id", trace);
    add(ev, "Outbox-Commit-Lsn", lsn);
    add(ev, "Outbox-Commit-Time", committed);
    add(ev, "Outbox-Position", pos);
    ev->body = g->body;
    ev->body_len = (size_t)a->body_bytes;
    char expected[24];
    snprintf(expected, sizeof(expected), "%" PRId64, i);
    wire_encode(w, ev, a->chain ? expected : NULL);
    g->header_bytes += (double)w->hdr_len;
}

static int fail_nats(const char *what, natsStatus s);

static int64_t unix_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void sleep_until(double t)
{
    struct timespec ts = {.tv_sec = (time_t)t, .tv_nsec = (long)((t - (double)(time_t)t) * 1e9)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

typedef struct Paced {
    double start_unix, end_unix, behind_max;
    bool batched;
} Paced;

/* The paced mode: bursts of rate/1000 messages every millisecond for duration seconds. Returns
 * the number sent, or -1 (reported) on a failed publish or a stall. */
static int64_t run_paced(const Args *a, natsConnection *nc, const char *inbox, Gen *g, Paced *pc)
{
    WireBatch batch;
    wire_batch_init(&batch);
    char check[192];
    snprintf(check, sizeof(check), "%s-check", inbox);
    pc->batched = wire_batch_check(&batch, nc, check);
    double bursts = a->rate < 1000 ? a->rate : 1000;
    int64_t per = (int64_t)(a->rate / bursts + 0.5);
    bursts = a->rate / (double)per;
    int64_t nbursts = (int64_t)(a->duration * bursts + 0.5);
    WireMsg w;
    wire_init(&w);
    int64_t sent = 0;
    double t0 = now_s();
    pc->start_unix = (double)unix_us() / 1e6;
    for (int64_t j = 0; j < nbursts; j++) {
        double due = t0 + (double)j / bursts;
        double now = now_s();
        if (now < due)
            sleep_until(due);
        else if (now - due > pc->behind_max)
            pc->behind_max = now - due;
        g->commit_us = unix_us();
        for (int64_t k = 0; k < per; k++, sent++) {
            if (!wait_for_room(sent, a->window)) {
                fprintf(stderr, "bench_publish: no ack for %d s; giving up\n",
                        STALL_LIMIT_MS / 1000);
                sent = -1;
                goto done;
            }
            build(g, sent, &w);
            char reply[192];
            snprintf(reply, sizeof(reply), "%s.%" PRId64, inbox, sent);
            natsStatus s = wire_batch_add(&batch, nc, &w, reply);
            if (s != NATS_OK) {
                fail_nats("publish", s);
                sent = -1;
                goto done;
            }
        }
        natsStatus s = wire_batch_flush(&batch, nc);
        if (s != NATS_OK) {
            fail_nats("publish", s);
            sent = -1;
            goto done;
        }
    }
done:
    pc->end_unix = (double)unix_us() / 1e6;
    wire_deinit(&w);
    wire_batch_deinit(&batch);
    return sent;
}

static int fail_nats(const char *what, natsStatus s)
{
    fprintf(stderr, "bench_publish: %s: %s", what, natsStatus_GetText(s));
    const char *last = nats_GetLastError(NULL);
    if (last && *last)
        fprintf(stderr, " (%s)", last);
    fprintf(stderr, "\n");
    return 1;
}

int main(int argc, char **argv)
{
    Args a;
    parse_args(argc, argv, &a);
    rng_seed();
    bool async = strcmp(a.mode, "async") == 0;

    natsOptions *no = NULL;
    natsConnection *nc = NULL;
    natsSubscription *sub = NULL;
    jsCtx *js = NULL;
    natsStatus s = natsOptions_Create(&no);
    if (s == NATS_OK)
        s = natsOptions_SetURL(no, a.url);
    if (s == NATS_OK)
        s = natsOptions_SetName(no, "bench_publish");
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(no, 5000);
    if (s == NATS_OK)
        s = natsConnection_Connect(&nc, no);
    if (s != NATS_OK)
        return fail_nats("connect", s);

    jsOptions jo;
    jsOptions_Init(&jo);
    jo.Wait = 10000;
    if (async) {
        jo.PublishAsync.MaxPending = a.window;
        jo.PublishAsync.AckHandler = on_js_ack;
        jo.PublishAsync.StallWait = 1000;
    }
    if ((s = natsConnection_JetStream(&js, nc, &jo)) != NATS_OK)
        return fail_nats("JetStream context", s);

    if (a.stream[0]) {
        jsStreamInfo *si = NULL;
        jsErrCode jerr = 0;
        if ((s = js_GetStreamInfo(&si, js, a.stream, NULL, &jerr)) != NATS_OK)
            return fail_nats("stream info (does the stream exist?)", s);
        jsStreamInfo_Destroy(si);
    }

    char inbox[128] = "";
    if (!async) {
        natsInbox *ib = NULL;
        if ((s = natsInbox_Create(&ib)) != NATS_OK)
            return fail_nats("inbox", s);
        snprintf(inbox, sizeof(inbox), "%s", (const char *)ib);
        natsInbox_Destroy(ib);
        char wildcard[160];
        snprintf(wildcard, sizeof(wildcard), "%s.>", inbox);
        s = natsConnection_Subscribe(&sub, nc, wildcard, on_reply, NULL);
        if (s == NATS_OK)
            s = natsSubscription_SetPendingLimits(sub, -1, -1);
        if (s == NATS_OK)
            s = natsConnection_FlushTimeout(nc, 5000);
        if (s != NATS_OK)
            return fail_nats("subscribe", s);
    }

    Gen g;
    gen_init(&g, &a);
    int rc = 0;
    int64_t sent = 0;
    WireMsg w;
    wire_init(&w);
    double t0 = now_s();
    Paced pc = {0};
    if (a.rate > 0) {
        sent = run_paced(&a, nc, inbox, &g, &pc);
        if (sent < 0) {
            rc = 1;
            sent = 0;
        }
        a.count = sent;
    }
    for (int64_t i = 0; a.rate <= 0 && i < a.count; i++) {
        build(&g, i, &w);
        if (!async) {
            if (!wait_for_room(sent, a.window)) {
                fprintf(stderr, "bench_publish: no ack for %d s; giving up\n",
                        STALL_LIMIT_MS / 1000);
                rc = 1;
                break;
            }
            char reply[192];
            snprintf(reply, sizeof(reply), "%s.%" PRId64, inbox, i);
            s = wire_publish(nc, &w, reply);
        } else {
            natsMsg *m = NULL;
            if ((s = wire_to_msg(&w, NULL, wire_raw_supported(), &m)) != NATS_OK) {
                rc = fail_nats("build message", s);
                break;
            }
            double stall_start = now_s();
            while ((s = js_PublishMsgAsync(js, &m, NULL)) == NATS_TIMEOUT &&
                   now_s() - stall_start < STALL_LIMIT_MS / 1000.0)
                ;
            natsMsg_Destroy(m); /* NULL when the library took it */
        }
        if (s != NATS_OK) {
            rc = fail_nats("publish", s);
            break;
        }
        sent++;
    }
    if (rc == 0) {
        if (async) {
            jsPubOptions po;
            jsPubOptions_Init(&po);
            po.MaxWait = STALL_LIMIT_MS;
            if ((s = js_PublishAsyncComplete(js, &po)) != NATS_OK)
                rc = fail_nats("waiting for the acks", s);
        } else if (!wait_for_room(sent, 1)) {
            fprintf(stderr, "bench_publish: no ack for %d s; giving up\n", STALL_LIMIT_MS / 1000);
            rc = 1;
        }
    }
    /* the async ack handler may still be running for the last message */
    for (int spin = 0; spin < 1000 && atomic_load(&st.acked) < sent; spin++)
        nats_Sleep(1);
    double secs = now_s() - t0;
    int64_t acked = atomic_load(&st.acked), errors = atomic_load(&st.errors);

    int64_t stored = -1;
    if (a.stream[0]) {
        jsStreamInfo *si = NULL;
        jsErrCode jerr = 0;
        if (js_GetStreamInfo(&si, js, a.stream, NULL, &jerr) == NATS_OK && si) {
            stored = (int64_t)si->State.Msgs;
            jsStreamInfo_Destroy(si);
        }
    }
    if (errors > 0 || acked != a.count)
        rc = 1;

    printf("{\"events\":%" PRId64 ",\"seconds\":%.6f,\"rate\":%.1f,\"acked\":%" PRId64
           ",\"errors\":%" PRId64 ",\"duplicates\":%" PRId64 ",\"stored\":%" PRId64
           ",\"mode\":\"%s\",\"window\":%" PRId64 ",\"chain\":%s,\"body_bytes\":%" PRId64
           ",\"header_bytes_avg\":%.1f",
           sent, secs, secs > 0 ? (double)acked / secs : 0.0, acked, errors,
           (int64_t)atomic_load(&st.duplicates), stored, a.mode, a.window,
           a.chain ? "true" : "false", a.body_bytes,
           sent > 0 ? g.header_bytes / (double)sent : 0.0);
    if (a.rate > 0)
        printf(",\"paced_rate\":%.1f,\"start_unix\":%.6f,\"end_unix\":%.6f,\"behind_max_s\":%.4f,"
               "\"flush\":\"%s\"",
               pc.end_unix > pc.start_unix ? (double)sent / (pc.end_unix - pc.start_unix) : 0.0,
               pc.start_unix, pc.end_unix, pc.behind_max, pc.batched ? "batch" : "flusher");
    if (errors > 0) {
        printf(",\"first_error\":\"");
        for (const char *p = st.first_error; *p; p++)
            if (*p == '"' || *p == '\\')
                printf("\\%c", *p);
            else if ((unsigned char)*p >= 0x20)
                putchar(*p);
        printf("\"");
    }
    printf("}\n");
    fflush(stdout);

    if (sub) {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
    }
    jsCtx_Destroy(js);
    natsConnection_Close(nc);
    natsConnection_Destroy(nc);
    natsOptions_Destroy(no);
    free(g.body);
    wire_deinit(&w);
    outbox_event_deinit(&g.ev);
    nats_CloseAndWait(2000);
    return rc;
}
