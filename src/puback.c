/*
 * puback.c - JetStream's answers: the common ones in one pass, anything else through jansson.
 *
 * The relay reads one answer per event, so the usual success answer is recognised by its
 * exact shape, without a JSON parser; anything unusual (an error, a domain, fields a later
 * server adds) still gets a full parse.
 */
#include "outboxd/puback.h"

#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "outboxd/util.h"

/* Returns p past lit (n bytes, after any spaces before it), or NULL when lit does not come
 * next. NEXT() passes a literal's length. */
#define NEXT(p, end, lit) next((p), (end), (lit), sizeof(lit) - 1)
static const char *next(const char *p, const char *end, const char *lit, size_t n)
{
    while (p && p < end && *p == ' ')
        p++;
    return p && (size_t)(end - p) >= n && memcmp(p, lit, n) == 0 ? p + n : NULL;
}

/* {"stream":"S", "seq":N}, or the same with ,"duplicate": true before the brace, as nats-server
 * writes them (2.9 puts a space after the comma and after "duplicate":; spaces between tokens
 * pass).
 * Returns PUBACK_STORED, PUBACK_DUPLICATE, or -1 for anything else. */
static bool name_byte(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-';
}

int puback_quick(const char *d, size_t n, uint64_t *seq)
{
    const char *end = d + n;
    const char *p = NEXT(NEXT(NEXT(NEXT(d, end, "{"), end, "\"stream\""), end, ":"), end, "\"");
    if (!p)
        return -1;
    /* A stream name of the usual characters; anything else (escapes, say) goes to jansson, so
     * that this path accepts nothing jansson would refuse. */
    while (p < end && name_byte(*p))
        p++;
    if (p == end || *p != '"')
        return -1;
    p = NEXT(NEXT(NEXT(p + 1, end, ","), end, "\"seq\""), end, ":");
    p = NEXT(p, end, "");
    if (!p || p == end || *p < '0' || *p > '9')
        return -1;
    /* A JSON number: no leading zero; at most 18 digits, within jansson's integers. */
    const char *digits = p;
    while (p < end && *p >= '0' && *p <= '9')
        p++;
    if (p - digits > 18 || (*digits == '0' && p - digits > 1))
        return -1;
    uint64_t v = 0;
    for (const char *c = digits; c < p; c++)
        v = v * 10 + (uint64_t)(*c - '0');
    *seq = v;
    if (NEXT(p, end, "}") == end)
        return PUBACK_STORED;
    p = NEXT(NEXT(NEXT(NEXT(p, end, ","), end, "\"duplicate\""), end, ":"), end, "true");
    return p && NEXT(p, end, "}") == end ? PUBACK_DUPLICATE : -1;
}

PubAckKind puback_parse(const char *data, size_t len, PubAckInfo *info)
{
    info->seq = 0;
    info->err_code = 0;
    info->description[0] = '\0';
    if (!data || len == 0)
        return PUBACK_REFUSED;
    int quick = puback_quick(data, len, &info->seq);
    if (quick >= 0)
        return (PubAckKind)quick;

    json_error_t jerr;
    json_t *root = json_loadb(data, len, 0, &jerr);
    json_t *e = root ? json_object_get(root, "error") : NULL;
    PubAckKind kind = PUBACK_REFUSED;
    if (e) {
        json_int_t c = json_integer_value(json_object_get(e, "err_code"));
        if (c == 0)
            c = json_integer_value(json_object_get(e, "code"));
        info->err_code = c > 0 && c <= 0xffff ? (unsigned)c : 0;
        const char *d = json_string_value(json_object_get(e, "description"));
        snprintf(info->description, sizeof(info->description), "%s", d ? d : "");
        text_one_line(info->description);
    } else if (root && json_is_integer(json_object_get(root, "seq"))) {
        kind = json_is_true(json_object_get(root, "duplicate")) ? PUBACK_DUPLICATE
                                                                : PUBACK_STORED;
        json_int_t s = json_integer_value(json_object_get(root, "seq"));
        info->seq = s > 0 ? (uint64_t)s : 0;
    }
    json_decref(root);
    return kind;
}

bool puback_reply_subject(const char *subject, uint64_t *seq, unsigned *attempt)
{
    const char *dot2 = strrchr(subject, '.');
    const char *dot1 = dot2 ? memrchr(subject, '.', (size_t)(dot2 - subject)) : NULL;
    /* At most 19 digits for the seq and 3 for the attempt: no overflow below. */
    if (!dot1 || dot2 - dot1 < 2 || dot2 - dot1 > 20 || !dot2[1] || strlen(dot2 + 1) > 3)
        return false;
    uint64_t s = 0;
    for (const char *c = dot1 + 1; c < dot2; c++) {
        if (*c < '0' || *c > '9')
            return false;
        s = s * 10 + (uint64_t)(*c - '0');
    }
    unsigned a = 0;
    for (const char *c = dot2 + 1; *c; c++) {
        if (*c < '0' || *c > '9')
            return false;
        a = a * 10 + (unsigned)(*c - '0');
    }
    *seq = s;
    *attempt = a;
    return true;
}
