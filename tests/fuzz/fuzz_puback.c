/*
 * fuzz_puback - JetStream's answers to publishes, and the reply subjects they come back on.
 *
 * Input: the bytes of an answer's body; the same bytes, up to the first NUL, also serve as a
 * reply subject. Checked invariants, from puback.h:
 *   - the one-pass reader is a strict subset of the JSON reading: whatever puback_quick()
 *     accepts, jansson reads as an object without "error", with an integer "seq" and with
 *     "duplicate" true exactly when the quick answer is PUBACK_DUPLICATE;
 *   - puback_parse() agrees with both: the quick answer when there is one, else the JSON one
 *     (an object with an integer "seq" and no "error" is stored or a duplicate, all else is
 *     refused), with an err_code that fits 16 bits;
 *   - a reply subject that parses ends in ".<digits>.<digits>" and gives back those numbers.
 *
 * Seeds: corpus/fuzz_puback (hand-written, tests/fuzz/make-seeds).
 */
#include <jansson.h>
#include <string.h>

#include "fuzz.h"
#include "outboxd/puback.h"

static void check_answer(const char *d, size_t n)
{
    uint64_t quick_seq = 0;
    int quick = puback_quick(d, n, &quick_seq);
    json_error_t jerr;
    json_t *root = json_loadb(d, n, 0, &jerr);
    bool ok = root && json_is_object(root) && !json_object_get(root, "error") &&
              json_is_integer(json_object_get(root, "seq"));
    bool dup = ok && json_is_true(json_object_get(root, "duplicate"));
    if (quick >= 0) {
        FUZZ_ASSERT(ok);
        FUZZ_ASSERT((quick == PUBACK_DUPLICATE) == dup);
    }
    PubAckInfo info;
    PubAckKind kind = puback_parse(d, n, &info);
    unsigned code = info.err_code;
    if (quick >= 0) {
        FUZZ_ASSERT(kind == (PubAckKind)quick && code == 0);
        FUZZ_ASSERT(quick_seq == (uint64_t)json_integer_value(json_object_get(root, "seq")));
    }
    else
        FUZZ_ASSERT(kind == (ok ? (dup ? PUBACK_DUPLICATE : PUBACK_STORED) : PUBACK_REFUSED));
    FUZZ_ASSERT(code <= 0xffff);
    json_decref(root);
}

static void check_subject(const char *s)
{
    uint64_t seq = 0;
    unsigned attempt = 0;
    if (!puback_reply_subject(s, &seq, &attempt))
        return;
    const char *dot2 = strrchr(s, '.');
    FUZZ_ASSERT(dot2 && dot2 > s);
    const char *dot1 = dot2 - 1;
    while (dot1 > s && *dot1 != '.')
        dot1--;
    FUZZ_ASSERT(*dot1 == '.' && dot2 - dot1 >= 2 && dot2[1]);
    uint64_t want_seq = 0;
    for (const char *c = dot1 + 1; c < dot2; c++) {
        FUZZ_ASSERT(*c >= '0' && *c <= '9');
        want_seq = want_seq * 10 + (uint64_t)(*c - '0');
    }
    unsigned want_attempt = 0;
    for (const char *c = dot2 + 1; *c; c++) {
        FUZZ_ASSERT(*c >= '0' && *c <= '9');
        want_attempt = want_attempt * 10 + (unsigned)(*c - '0');
    }
    FUZZ_ASSERT(seq == want_seq && attempt == want_attempt);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *body = fuzz_dup((const char *)data, size);
    check_answer(body, size);
    free(body);
    size_t len = strnlen((const char *)data, size);
    char *subject = fuzz_strndup(data, len);
    check_subject(subject);
    free(subject);
    return 0;
}
