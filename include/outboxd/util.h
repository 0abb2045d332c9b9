/*
 * util.h - allocation, growable buffers, clocks and LSN helpers shared by every module.
 *
 * Out-of-memory is not a recoverable condition for a relay: x*alloc() abort with a message, so
 * callers never check for NULL.
 */
#ifndef OUTBOXD_UTIL_H
#define OUTBOXD_UTIL_H

#include <poll.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* printf pieces for an LSN: printf("at " LSN_FMT, LSN_ARGS(lsn)) prints "at 0/16B3748". */
#define LSN_FMT "%X/%X"
#define LSN_ARGS(lsn) (unsigned)((uint64_t)(lsn) >> 32), (unsigned)((uint64_t)(lsn) & 0xffffffffu)

void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* printf into a new heap string. */
char *strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
char *vstrf(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));

/* A growable byte buffer, always NUL-terminated after data[len] once anything was appended. */
typedef struct Buf {
    char *data;
    size_t len;
    size_t cap;
} Buf;

/* A FIFO of fixed-size elements that doubles when full (a power of two, indices wrap): the
 * relay's confirmable marks, a backfill's progress. Zero-initialised it is empty; the element
 * size is set by the first push. */
typedef struct Ring {
    char *v;
    size_t size;       /* of one element */
    size_t cap;        /* elements, a power of two */
    size_t head, tail; /* head <= tail; tail - head elements */
} Ring;

/* Room for one more element at the back (uninitialised), growing the ring when full. */
void *ring_push(Ring *r, size_t size);
/* The oldest element, or the newest; NULL when empty. */
void *ring_front(const Ring *r);
void *ring_back(const Ring *r);
/* Drops the oldest element. */
void ring_pop(Ring *r);
void ring_free(Ring *r);

void buf_init(Buf *b);
void buf_deinit(Buf *b);
void buf_reset(Buf *b);
void buf_reserve(Buf *b, size_t extra);
void buf_append(Buf *b, const void *p, size_t n);
void buf_puts(Buf *b, const char *s);
void buf_putc(Buf *b, char c);
void buf_printf(Buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Replaces control bytes (CR, LF, ...) in s with '?', so a message that quotes user input
 * stays one line. */
void text_one_line(char *s);

/* Formats a byte count for people: "512 B", "1.5 KiB", "3.2 GiB". */
void format_bytes_human(uint64_t n, char *out, size_t outlen);

/* Decodes PostgreSQL's hex bytea text ("\\x" and two hex digits per byte) into out; false
 * when text is not in that form. */
bool bytea_hex_decode(const char *text, size_t n, Buf *out);

/* CLOCK_MONOTONIC in microseconds: for deadlines and intervals. */
int64_t now_mono_us(void);
/* ppoll() until deadline (CLOCK_MONOTONIC µs), at most a second at a time; 0 when it has
 * passed. To the microsecond: poll()'s milliseconds, rounded up, turn a wait for a timer one
 * millisecond away (the publisher's look for acknowledgements) into two. */
int poll_until(struct pollfd *fds, nfds_t nfds, int64_t deadline);
/* CLOCK_REALTIME in microseconds since the Unix epoch. */
int64_t now_unix_us(void);

/* PostgreSQL timestamps count microseconds since 2000-01-01 00:00:00 UTC. */
#define PG_EPOCH_OFFSET_US INT64_C(946684800000000)

/* A PostgreSQL timestamp as Unix microseconds, saturating instead of overflowing (a corrupt
 * stream can carry any 64-bit value). */
int64_t pg_time_to_unix_us(int64_t pg_us);

/* Full jitter: a uniform delay in [0, min(max_us, base_us * 2^attempt)] (µs). Each thread
 * draws from its own generator. Every retry in outboxd backs off with it. */
int64_t backoff_jitter_us(int64_t base_us, int64_t max_us, unsigned attempt);

/* Parses "X/X" (each half 1 to 8 hex digits) into an LSN. Returns false on anything else. */
bool lsn_parse(const char *s, uint64_t *out);
/* Formats an LSN as "X/X" into out (at least 18 bytes); returns out. */
char *lsn_format(uint64_t lsn, char out[static 18]);

/* Formats a PostgreSQL timestamp (µs since 2000-01-01 UTC) as RFC 3339 UTC with microseconds,
 * "2026-11-22T17:26:18.123456Z", into out (at least 32 bytes). */
void pg_time_format_rfc3339(int64_t pg_us, char out[static 32]);

/* Parses an RFC 3339 time of n bytes ("2026-11-22T17:26:18.123456Z", nats-server's nanosecond
 * "...18.123456789Z", or an offset "+02:00") into Unix microseconds; digits past the sixth
 * fraction digit are dropped. False on anything else. */
bool time_parse_rfc3339(const char *s, size_t n, int64_t *unix_us);

#endif
