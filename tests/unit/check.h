/*
 * check.h - the few assertions the unit tests need. Each failed check prints file:line and the
 * expression, and the test exits non-zero at the end; CHECK_* never abort early so one run shows
 * every failure.
 */
#ifndef OUTBOXD_TEST_CHECK_H
#define OUTBOXD_TEST_CHECK_H

#include <stdio.h>
#include <string.h>

static int check_failures;
static int check_count;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        check_count++;                                                                             \
        if (!(cond)) {                                                                             \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);              \
        }                                                                                          \
    } while (0)

#define CHECK_STR(got, want)                                                                       \
    do {                                                                                           \
        const char *g_ = (got), *w_ = (want);                                                      \
        check_count++;                                                                             \
        if (g_ == NULL || strcmp(g_, w_) != 0) {                                                   \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: got \"%s\", want \"%s\"\n", __FILE__, __LINE__,               \
                    g_ ? g_ : "(null)", w_);                                                       \
        }                                                                                          \
    } while (0)

#define CHECK_MEM(got, gotlen, want, wantlen)                                                      \
    do {                                                                                           \
        size_t gl_ = (gotlen), wl_ = (wantlen);                                                    \
        check_count++;                                                                             \
        if (gl_ != wl_ || memcmp((got), (want), gl_) != 0) {                                       \
            check_failures++;                                                                      \
            fprintf(stderr, "%s:%d: %s differs from %s (%zu vs %zu bytes)\n", __FILE__, __LINE__,  \
                    #got, #want, gl_, wl_);                                                        \
        }                                                                                          \
    } while (0)

/* Call at the end of main: prints a summary and returns the exit code. */
static inline int check_report(const char *name)
{
    fprintf(stderr, "%s: %d checks, %d failed\n", name, check_count, check_failures);
    return check_failures ? 1 : 0;
}

#endif
