/*
 * fuzz_subject - subject templates and value escaping.
 *
 * Input: the first line is a template, each further line the value of the next template column
 * (as numbered by subject_template_column); a missing line is SQL NULL, an empty line an empty
 * value. The values are also escaped on their own. Checked invariants, from subject.h:
 *   - a rejected template leaves *out alone and gives a non-empty one-line reason;
 *   - an accepted template names distinct, non-empty columns of [A-Za-z0-9_];
 *   - every expansion is a valid subject (subject_is_valid), appended after what the buffer held,
 *     with exactly as many '.' as the template: a value never adds a token;
 *   - an escaped value is non-empty, has no '.', '*', '>', space or control byte, and decodes
 *     back to the value ("_" standing for NULL and for the empty value).
 *
 * Seeds: corpus/fuzz_subject (hand-written).
 */
#include <string.h>

#include "fuzz.h"
#include "outboxd/subject.h"
#include "outboxd/util.h"

#define MAX_VALUES 64

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1; /* lowercase hex is not what subject.h promises */
}

static void check_escaped(const char *data, size_t len)
{
    Buf b;
    buf_init(&b);
    buf_puts(&b, "x"); /* escaping appends */
    subject_escape_token(data, len, &b);
    FUZZ_ASSERT(b.len >= 2 && b.data[0] == 'x' && b.data[b.len] == '\0');
    const char *e = b.data + 1;
    size_t elen = b.len - 1;
    if (!data || len == 0) {
        FUZZ_ASSERT(elen == 1 && e[0] == '_');
        buf_deinit(&b);
        return;
    }
    /* Decode and compare byte by byte. */
    size_t j = 0;
    for (size_t i = 0; i < elen; i++) {
        unsigned char c = (unsigned char)e[i];
        FUZZ_ASSERT(c > 0x20 && c < 0x7f && c != '.' && c != '*' && c != '>');
        unsigned char orig;
        if (c == '%') {
            FUZZ_ASSERT(i + 2 < elen);
            int hi = hexval(e[i + 1]), lo = hexval(e[i + 2]);
            FUZZ_ASSERT(hi >= 0 && lo >= 0);
            orig = (unsigned char)(hi << 4 | lo);
            i += 2;
        } else {
            orig = c;
        }
        FUZZ_ASSERT(j < len && (unsigned char)data[j] == orig);
        j++;
    }
    FUZZ_ASSERT(j == len);
    buf_deinit(&b);
}

static size_t count_dots(const char *s, size_t n)
{
    size_t d = 0;
    for (size_t i = 0; i < n; i++)
        d += s[i] == '.';
    return d;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    size_t tlen = nl ? (size_t)(nl - data) : size;
    char *tmpl = fuzz_strndup(data, tlen);
    tlen = strlen(tmpl); /* a NUL byte ends the template, as it would in a C string */

    /* The value lines, each in its own exact-size block. */
    SubjectValue values[MAX_VALUES];
    char *owned[MAX_VALUES];
    size_t nvalues = 0;
    const uint8_t *p = nl ? nl + 1 : data + size;
    const uint8_t *end = data + size;
    while (nl && nvalues < MAX_VALUES) {
        const uint8_t *e = memchr(p, '\n', (size_t)(end - p));
        size_t n = e ? (size_t)(e - p) : (size_t)(end - p);
        owned[nvalues] = fuzz_dup(p, n);
        values[nvalues].data = owned[nvalues];
        values[nvalues].len = n;
        nvalues++;
        if (!e)
            break;
        p = e + 1;
    }
    for (size_t i = 0; i < nvalues; i++)
        check_escaped(values[i].data, values[i].len);
    check_escaped(NULL, 0);
    if (nl) { /* everything after the template as one value: covers newlines in values */
        char *rest = fuzz_dup(nl + 1, (size_t)(end - (nl + 1)));
        check_escaped(rest, (size_t)(end - (nl + 1)));
        free(rest);
    }

    SubjectTemplate *t = (SubjectTemplate *)(uintptr_t)0x1; /* sentinel: must stay untouched */
    char err[256];
    err[0] = '\0';
    if (subject_template_new(&t, tmpl, err, sizeof err) < 0) {
        FUZZ_ASSERT(t == (SubjectTemplate *)(uintptr_t)0x1);
        size_t n = strlen(err);
        FUZZ_ASSERT(n > 0 && fuzz_one_line(err, n));
        goto done;
    }

    size_t ncols = subject_template_ncolumns(t);
    for (size_t i = 0; i < ncols; i++) {
        const char *c = subject_template_column(t, i);
        FUZZ_ASSERT(c && c[0] != '\0');
        for (const char *q = c; *q; q++)
            FUZZ_ASSERT((*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') ||
                        (*q >= '0' && *q <= '9') || *q == '_');
        for (size_t j = 0; j < i; j++)
            FUZZ_ASSERT(strcmp(c, subject_template_column(t, j)) != 0);
    }
    FUZZ_ASSERT(subject_template_column(t, ncols) == NULL);

    /* Values as given (missing ones NULL), then all NULL. */
    SubjectValue *args = calloc(ncols + 1, sizeof *args);
    if (!args)
        abort();
    for (size_t i = 0; i < ncols && i < nvalues; i++)
        args[i] = values[i];
    size_t dots = count_dots(tmpl, tlen);
    for (int round = 0; round < 2; round++) {
        Buf out;
        buf_init(&out);
        buf_puts(&out, "prefix.");
        subject_template_expand(t, args, &out);
        FUZZ_ASSERT(out.len > 7 && memcmp(out.data, "prefix.", 7) == 0);
        FUZZ_ASSERT(out.data[out.len] == '\0' && strlen(out.data) == out.len);
        FUZZ_ASSERT(subject_is_valid(out.data + 7, out.len - 7));
        FUZZ_ASSERT(subject_is_valid(out.data, out.len));
        FUZZ_ASSERT(count_dots(out.data + 7, out.len - 7) == dots);
        if (ncols == 0) /* no placeholders: the template is the subject */
            FUZZ_ASSERT(strcmp(out.data + 7, tmpl) == 0);
        buf_deinit(&out);
        memset(args, 0, (ncols + 1) * sizeof *args);
    }
    free(args);
    subject_template_free(t);

done:
    for (size_t i = 0; i < nvalues; i++)
        free(owned[i]);
    free(tmpl);
    return 0;
}
