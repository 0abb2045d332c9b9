/* util.c - allocation that aborts on exhaustion, growable buffers, clocks, LSN text. */
#include "outboxd/util.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void oom(size_t n)
{
    fprintf(stderr, "outboxd: out of memory (allocating %zu bytes)\n", n);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        oom(n * size);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

char *vstrf(const char *fmt, va_list ap)
{
    /* Most strings fit a small buffer: format once into it, again only when it was short. */
    char small[256];
    va_list aq;
    va_copy(aq, ap);
    int n = vsnprintf(small, sizeof small, fmt, aq);
    va_end(aq);
    if (n < 0)
        n = 0;
    if ((size_t)n < sizeof small)
        return xstrndup(small, (size_t)n);
    char *s = xmalloc((size_t)n + 1);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    return s;
}

char *strf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vstrf(fmt, ap);
    va_end(ap);
    return s;
}

void buf_init(Buf *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
}

void buf_deinit(Buf *b)
{
    free(b->data);
    buf_init(b);
}

void buf_reset(Buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void buf_reserve(Buf *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
}

void buf_append(Buf *b, const void *p, size_t n)
{
    buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void buf_puts(Buf *b, const char *s)
{
    buf_append(b, s, strlen(s));
}

void buf_putc(Buf *b, char c)
{
    buf_reserve(b, 1);
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
}

void buf_printf(Buf *b, const char *fmt, ...)
{
    /* Most output is short: format into a stack buffer first, and only once more when longer. */
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof(tmp)) {
        buf_append(b, tmp, (size_t)n);
        return;
    }
    buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void format_bytes_human(uint64_t n, char *out, size_t outlen)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)n;
    size_t u = 0;
    while (v >= 1024 && u + 1 < ARRAY_SIZE(units)) {
        v /= 1024;
        u++;
    }
    snprintf(out, outlen, u ? "%.1f %s" : "%.0f %s", v, units[u]);
}

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

bool bytea_hex_decode(const char *text, size_t n, Buf *out)
{
    if (n < 2 || text[0] != '\\' || text[1] != 'x' || (n - 2) % 2 != 0)
        return false;
    buf_reset(out);
    buf_reserve(out, (n - 2) / 2);
    for (size_t i = 2; i < n; i += 2) {
        int hi = hexval((unsigned char)text[i]), lo = hexval((unsigned char)text[i + 1]);
        if (hi < 0 || lo < 0)
            return false;
        out->data[out->len++] = (char)(hi << 4 | lo);
    }
    if (out->data)
        out->data[out->len] = '\0';
    return true;
}

void text_one_line(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = '?';
}

static int64_t clock_us(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t now_mono_us(void)
{
    return clock_us(CLOCK_MONOTONIC);
}

int poll_until(struct pollfd *fds, nfds_t nfds, int64_t deadline)
{
    int64_t wait = deadline - now_mono_us();
    if (wait > 1000000)
        wait = 1000000;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = 0};
    if (wait > 0)
        ts = (struct timespec){.tv_sec = wait / 1000000, .tv_nsec = (wait % 1000000) * 1000};
    return ppoll(fds, nfds, &ts, NULL);
}

int64_t now_unix_us(void)
{
    return clock_us(CLOCK_REALTIME);
}

void *ring_push(Ring *r, size_t size)
{
    if (r->tail - r->head == r->cap) {
        size_t ncap = r->cap ? r->cap * 2 : 1024;
        char *nv = xmalloc(ncap * size);
        for (size_t i = r->head; i < r->tail; i++)
            memcpy(nv + (i - r->head) * size, r->v + (i & (r->cap - 1)) * size, size);
        free(r->v);
        r->tail -= r->head;
        r->head = 0;
        r->v = nv;
        r->cap = ncap;
    }
    r->size = size;
    return r->v + (r->tail++ & (r->cap - 1)) * size;
}

void *ring_front(const Ring *r)
{
    return r->head < r->tail ? r->v + (r->head & (r->cap - 1)) * r->size : NULL;
}

void *ring_back(const Ring *r)
{
    return r->head < r->tail ? r->v + ((r->tail - 1) & (r->cap - 1)) * r->size : NULL;
}

void ring_pop(Ring *r)
{
    if (r->head < r->tail)
        r->head++;
}

void ring_free(Ring *r)
{
    free(r->v);
    *r = (Ring){0};
}

/* xorshift64*: jitter needs no more, and each thread keeps its own state. */
static uint64_t random_u64(void)
{
    static _Thread_local uint64_t x;
    if (x == 0)
        x = (uint64_t)now_mono_us() * UINT64_C(0x9E3779B97F4A7C15) | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

int64_t backoff_jitter_us(int64_t base_us, int64_t max_us, unsigned attempt)
{
    int64_t cap = base_us;
    for (unsigned i = 0; i < attempt && cap < max_us; i++)
        cap *= 2;
    if (cap > max_us)
        cap = max_us;
    return (int64_t)(random_u64() % (uint64_t)(cap + 1));
}

/* One half of an LSN: 1 to 8 hex digits, nothing else (sscanf's %X would take a sign, spaces
 * and any number of digits, and a malformed position could then read as FFFFFFFF/...). */
static const char *lsn_half(const char *s, unsigned *out)
{
    unsigned v = 0;
    int n = 0;
    for (; n < 8 && isxdigit((unsigned char)s[n]); n++)
        v = v * 16 + (unsigned)(isdigit((unsigned char)s[n]) ? s[n] - '0'
                                                             : (tolower((unsigned char)s[n]) - 'a' + 10));
    if (n == 0 || isxdigit((unsigned char)s[n]))
        return NULL;
    *out = v;
    return s + n;
}

bool lsn_parse(const char *s, uint64_t *out)
{
    unsigned hi, lo;
    if (!s || !(s = lsn_half(s, &hi)) || *s != '/' || !(s = lsn_half(s + 1, &lo)) || *s != '\0')
        return false;
    *out = ((uint64_t)hi << 32) | lo;
    return true;
}

char *lsn_format(uint64_t lsn, char out[static 18])
{
    snprintf(out, 18, LSN_FMT, LSN_ARGS(lsn));
    return out;
}

int64_t pg_time_to_unix_us(int64_t pg_us)
{
    if (pg_us > INT64_MAX - PG_EPOCH_OFFSET_US)
        return INT64_MAX;
    return pg_us + PG_EPOCH_OFFSET_US;
}

void pg_time_format_rfc3339(int64_t pg_us, char out[static 32])
{
    int64_t unix_us = pg_time_to_unix_us(pg_us);
    int64_t secs = unix_us / 1000000;
    int64_t frac = unix_us % 1000000;
    if (frac < 0) {
        frac += 1000000;
        secs -= 1;
    }
    time_t t = (time_t)secs;
    struct tm tm;
    if (!gmtime_r(&t, &tm)) { /* beyond what struct tm holds: only from a corrupt stream */
        snprintf(out, 32, "%s", secs < 0 ? "0000-01-01T00:00:00.000000Z"
                                         : "9999-12-31T23:59:59.999999Z");
        return;
    }
    /* Years past 9999 cannot come from PostgreSQL's timestamptz range in practice; clamp so the
     * text always fits. */
    int year = tm.tm_year + 1900;
    if (year < 0 || year > 9999)
        year = year < 0 ? 0 : 9999;
    char text[80];
    snprintf(text, sizeof(text), "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", year, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
    memcpy(out, text, 31);
    out[31] = '\0';
}

/* Days from 1970-01-01 to y-m-d in the proleptic Gregorian calendar (y >= 1). */
static int64_t days_from_civil(int64_t y, int m, int d)
{
    y -= m <= 2;
    int64_t era = y / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* n decimal digits at p as a number, or -1. */
static int digits(const char *p, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

bool time_parse_rfc3339(const char *s, size_t n, int64_t *unix_us)
{
    /* YYYY-MM-DDTHH:MM:SS, then optional .fraction, then Z or +HH:MM / -HH:MM. */
    if (n < 20 || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
        s[13] != ':' || s[16] != ':')
        return false;
    int year = digits(s, 4), mon = digits(s + 5, 2), day = digits(s + 8, 2);
    int hour = digits(s + 11, 2), min = digits(s + 14, 2), sec = digits(s + 17, 2);
    if (year < 1 || mon < 1 || mon > 12 || day < 1 || day > 31 || hour < 0 || hour > 23 ||
        min < 0 || min > 59 || sec < 0 || sec > 60)
        return false;
    size_t i = 19;
    int64_t frac_us = 0, scale = 100000;
    if (i < n && s[i] == '.') {
        size_t start = ++i;
        for (; i < n && s[i] >= '0' && s[i] <= '9'; i++, scale /= 10)
            frac_us += (s[i] - '0') * scale; /* digits past the sixth add 0 */
        if (i == start)
            return false;
    }
    int64_t offset_s = 0;
    if (i + 1 == n && (s[i] == 'Z' || s[i] == 'z')) {
        i++;
    } else if (i + 6 == n && (s[i] == '+' || s[i] == '-') && s[i + 3] == ':') {
        int oh = digits(s + i + 1, 2), om = digits(s + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59)
            return false;
        offset_s = (s[i] == '-' ? -1 : 1) * (int64_t)(oh * 3600 + om * 60);
        i += 6;
    }
    if (i != n)
        return false;
    int64_t secs = days_from_civil(year, mon, day) * 86400 + hour * 3600 + min * 60 + sec - offset_s;
    *unix_us = secs * 1000000 + frac_us;
    return true;
}
