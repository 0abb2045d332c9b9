/*
 * fuzz.h - what the libFuzzer targets in tests/fuzz/ share: the entry point's prototype, an
 * assertion that aborts (so libFuzzer records the input as a crash), and a cursor that turns the
 * fuzzer's bytes into bounded choices, numbers and strings.
 *
 * Every value handed to the code under test lives in its own exact-size heap block
 * (fuzz_dup), so AddressSanitizer reports a read one byte past a value, which it would not if
 * the value pointed into the middle of the fuzzer's input.
 */
#ifndef OUTBOXD_FUZZ_H
#define OUTBOXD_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant of the module under test. On failure: file:line, the expression, abort(). */
#define FUZZ_ASSERT(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* The fuzzer's bytes, consumed from the front. Reads past the end yield zeros and empty data. */
typedef struct FuzzInput {
    const uint8_t *p;
    size_t len;
} FuzzInput;

static inline uint8_t fuzz_u8(FuzzInput *in)
{
    if (in->len == 0)
        return 0;
    in->len--;
    return *in->p++;
}

static inline uint16_t fuzz_u16(FuzzInput *in)
{
    uint16_t hi = fuzz_u8(in);
    return (uint16_t)(hi << 8 | fuzz_u8(in));
}

static inline uint32_t fuzz_u32(FuzzInput *in)
{
    uint32_t hi = fuzz_u16(in);
    return hi << 16 | fuzz_u16(in);
}

static inline uint64_t fuzz_u64(FuzzInput *in)
{
    uint64_t hi = fuzz_u32(in);
    return hi << 32 | fuzz_u32(in);
}

/* A length: one byte, or when that byte is 0xff, two more (big-endian); never more than what
 * is left of the input. */
static inline size_t fuzz_len(FuzzInput *in)
{
    size_t n = fuzz_u8(in);
    if (n == 0xff)
        n = fuzz_u16(in);
    return n < in->len ? n : in->len;
}

/* Takes n bytes (n <= in->len) and returns them in an exact-size heap block; a zero-length
 * value still gets a distinct, unreadable block. Free with free(). */
static inline char *fuzz_take(FuzzInput *in, size_t n)
{
    char *p = malloc(n ? n : 1);
    if (!p)
        abort();
    memcpy(p, in->p, n);
    in->p += n;
    in->len -= n;
    return p;
}

/* Takes a length-prefixed string and returns it NUL-terminated in an exact-size block. */
static inline char *fuzz_str(FuzzInput *in)
{
    size_t n = fuzz_len(in);
    char *p = malloc(n + 1);
    if (!p)
        abort();
    memcpy(p, in->p, n);
    p[n] = '\0';
    in->p += n;
    in->len -= n;
    return p;
}

/* An exact-size copy of p[0..n) (n may be 0). */
static inline char *fuzz_dup(const void *p, size_t n)
{
    char *q = malloc(n ? n : 1);
    if (!q)
        abort();
    if (n)
        memcpy(q, p, n);
    return q;
}

/* p[0..n) and a NUL in an exact-size block of n + 1 bytes. */
static inline char *fuzz_strndup(const void *p, size_t n)
{
    char *q = malloc(n + 1);
    if (!q)
        abort();
    if (n)
        memcpy(q, p, n);
    q[n] = '\0';
    return q;
}

/* True when s[0..n) holds no CR or LF: messages documented as "one line". */
static inline bool fuzz_one_line(const char *s, size_t n)
{
    return memchr(s, '\n', n) == NULL && memchr(s, '\r', n) == NULL;
}

#endif
