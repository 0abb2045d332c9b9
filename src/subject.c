/*
 * subject.c - NATS subject templates: compiled once, expanded per event.
 *
 * subject_template_new() checks the template and compiles it into a list of segments, each
 * either literal text or a reference to a column; the columns are deduplicated and numbered in
 * order of first appearance, which is the order the caller passes values in. Expansion reserves
 * the worst case once and writes straight into the Buf: no allocation of its own and one table
 * lookup per value byte.
 *
 * Why an expansion is always a valid subject: the literal text was checked to hold only printable
 * ASCII other than space, "*" and ">", with every token non-empty; an escaped value holds only the
 * bytes of keep_byte[] below plus "%" and hex digits, never ".", and is never empty ("_" for
 * NULL/empty). So a value can neither add a token nor form a wildcard.
 */
#include "outboxd/subject.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * 1 for the bytes an escaped value keeps as they are: A-Z a-z 0-9 and - _ ~ ! @ # $ & ' ( ) + ,
 * ; = : / ? [ ] ^ |. Everything else (including ".", "*", ">", "%", space, controls and every
 * byte >= 0x80) becomes "%XX". tests/unit/test_subject.c checks this table against the rule.
 */
static const unsigned char keep_byte[256] = {
    [0x20] =
    0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1, /* 0x20  !"#$%&'()*+,-./ */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, /* 0x30 0123456789:;<=>? */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 0x40 @ABCDEFGHIJKLMNO */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, /* 0x50 PQRSTUVWXYZ[\]^_ */
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, /* 0x60 `abcdefghijklmno */
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 0, /* 0x70 pqrstuvwxyz{|}~  */
    /* 0x80..0xFF: 0 */
};

static const char hex_digit[16] = "0123456789ABCDEF";

/* A piece of the compiled template: literal text, or the value of column col. */
typedef struct Segment {
    const char *text; /* points into SubjectTemplate.src; NULL for a column */
    size_t len;
    size_t col;
} Segment;

struct SubjectTemplate {
    char *src;         /* copy of the template text */
    Segment *segs;
    size_t nsegs;
    char **cols;       /* distinct column names, order of first appearance */
    size_t ncols;
    size_t literal_len; /* total bytes of literal text */
};

static bool is_name_byte(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static void set_err(char *err, size_t errlen, const char *tmpl, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void set_err(char *err, size_t errlen, const char *tmpl, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    int n = snprintf(err, errlen, "subject template '%s': ", tmpl);
    if (n < 0 || (size_t)n >= errlen) {
        text_one_line(err);
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    text_one_line(err); /* the template and column names are quoted as given */
}

/* Returns the number of column name[0..len), adding it when new. */
static size_t add_column(SubjectTemplate *t, const char *name, size_t len)
{
    for (size_t i = 0; i < t->ncols; i++)
        if (strlen(t->cols[i]) == len && memcmp(t->cols[i], name, len) == 0)
            return i;
    t->cols = xrealloc(t->cols, (t->ncols + 1) * sizeof *t->cols);
    t->cols[t->ncols] = xstrndup(name, len);
    return t->ncols++;
}

static void add_segment(SubjectTemplate *t, const char *text, size_t len, size_t col)
{
    t->segs = xrealloc(t->segs, (t->nsegs + 1) * sizeof *t->segs);
    t->segs[t->nsegs++] = (Segment){.text = text, .len = len, .col = col};
    if (text)
        t->literal_len += len;
}

int subject_template_new(SubjectTemplate **out, const char *tmpl, char *err, size_t errlen)
{
    if (!tmpl || tmpl[0] == '\0') {
        set_err(err, errlen, tmpl ? tmpl : "", "empty");
        return -1;
    }

    SubjectTemplate *t = xcalloc(1, sizeof *t);
    t->src = xstrdup(tmpl);
    const char *s = t->src;
    size_t n = strlen(s);
    size_t lit_start = 0;   /* start of the pending literal run */
    bool token_empty = true; /* nothing yet in the current token */

    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c == '{') {
            size_t j = i + 1;
            while (j < n && s[j] != '}' && s[j] != '.')
                j++;
            if (j == n || s[j] == '.') {
                set_err(err, errlen, tmpl, "unclosed '{'");
                goto fail;
            }
            if (j == i + 1) {
                set_err(err, errlen, tmpl, "empty placeholder '{}'");
                goto fail;
            }
            for (size_t k = i + 1; k < j; k++) {
                if (!is_name_byte((unsigned char)s[k])) {
                    set_err(err, errlen, tmpl,
                            "bad column name '%.*s' in placeholder (letters, digits and _ only)",
                            (int)(j - i - 1), s + i + 1);
                    goto fail;
                }
            }
            if (i > lit_start)
                add_segment(t, s + lit_start, i - lit_start, 0);
            add_segment(t, NULL, 0, add_column(t, s + i + 1, j - i - 1));
            token_empty = false;
            i = j + 1;
            lit_start = i;
            continue;
        }
        if (c == '.') {
            if (token_empty) {
                if (i == 0)
                    set_err(err, errlen, tmpl, "leading '.'");
                else
                    set_err(err, errlen, tmpl, "empty token");
                goto fail;
            }
            token_empty = true;
            i++;
            continue;
        }
        if (c == '}') {
            set_err(err, errlen, tmpl, "unmatched '}'");
            goto fail;
        }
        if (c == '*' || c == '>') {
            set_err(err, errlen, tmpl, "wildcard '%c' not allowed", c);
            goto fail;
        }
        if (c == ' ') {
            set_err(err, errlen, tmpl, "space not allowed");
            goto fail;
        }
        if (c < 0x21 || c > 0x7e) {
            set_err(err, errlen, tmpl, "byte 0x%02X not allowed (printable ASCII only)", c);
            goto fail;
        }
        token_empty = false;
        i++;
    }
    if (token_empty) {
        set_err(err, errlen, tmpl, "trailing '.'");
        goto fail;
    }
    if (n > lit_start)
        add_segment(t, s + lit_start, n - lit_start, 0);
    *out = t;
    return 0;

fail:
    subject_template_free(t);
    return -1;
}

void subject_template_free(SubjectTemplate *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->ncols; i++)
        free(t->cols[i]);
    free(t->cols);
    free(t->segs);
    free(t->src);
    free(t);
}

size_t subject_template_ncolumns(const SubjectTemplate *t)
{
    return t->ncols;
}

const char *subject_template_column(const SubjectTemplate *t, size_t i)
{
    return i < t->ncols ? t->cols[i] : NULL;
}

/* Writes the escaped value at p, which has room for max(1, 3 * len) bytes; returns the end. */
static char *escape_into(char *p, const char *data, size_t len)
{
    if (!data || len == 0) {
        *p++ = '_';
        return p;
    }
    const unsigned char *d = (const unsigned char *)data;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = d[i];
        if (keep_byte[c]) {
            *p++ = (char)c;
        } else {
            p[0] = '%';
            p[1] = hex_digit[c >> 4];
            p[2] = hex_digit[c & 0x0f];
            p += 3;
        }
    }
    return p;
}

static size_t escaped_max(const char *data, size_t len)
{
    if (!data || len == 0)
        return 1;
    if (len > SIZE_MAX / 3) {
        fprintf(stderr, "outboxd: subject value too large (%zu bytes)\n", len);
        abort();
    }
    return 3 * len;
}

void subject_escape_token(const char *data, size_t len, Buf *out)
{
    buf_reserve(out, escaped_max(data, len));
    char *end = escape_into(out->data + out->len, data, len);
    out->len = (size_t)(end - out->data);
    out->data[out->len] = '\0';
}

void subject_template_expand(const SubjectTemplate *t, const SubjectValue *values, Buf *out)
{
    size_t need = t->literal_len;
    for (size_t i = 0; i < t->nsegs; i++)
        if (!t->segs[i].text) {
            const SubjectValue *v = &values[t->segs[i].col];
            need += escaped_max(v->data, v->len);
        }
    buf_reserve(out, need);

    char *p = out->data + out->len;
    for (size_t i = 0; i < t->nsegs; i++) {
        const Segment *seg = &t->segs[i];
        if (seg->text) {
            memcpy(p, seg->text, seg->len);
            p += seg->len;
        } else {
            const SubjectValue *v = &values[seg->col];
            p = escape_into(p, v->data, v->len);
        }
    }
    out->len = (size_t)(p - out->data);
    out->data[out->len] = '\0';
}

bool subject_is_valid(const char *s, size_t len)
{
    if (!s || len == 0)
        return false;
    size_t tok_start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || s[i] == '.') {
            size_t tlen = i - tok_start;
            if (tlen == 0)
                return false;
            if (tlen == 1 && (s[tok_start] == '*' || s[tok_start] == '>'))
                return false;
            tok_start = i + 1;
            continue;
        }
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c == 0x7f)
            return false;
    }
    return true;
}

/* True when pattern (a stream subject, wildcards allowed) captures every subject that sub (a
 * subject or a filter with wildcards) matches. */
bool subject_covers(const char *pattern, const char *sub)
{
    for (;;) {
        size_t pn = strcspn(pattern, "."), sn = strcspn(sub, ".");
        if (pn == 1 && pattern[0] == '>')
            return sn > 0;
        if (sn == 1 && sub[0] == '>')
            return false;
        if (!(pn == 1 && pattern[0] == '*') && (pn != sn || memcmp(pattern, sub, pn) != 0))
            return false;
        pattern += pn;
        sub += sn;
        if (!*pattern || !*sub)
            return !*pattern && !*sub;
        pattern++;
        sub++;
    }
}
