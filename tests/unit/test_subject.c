/* test_subject.c - subject templates: compiling, escaping, expansion, validation. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "outboxd/subject.h"

static SubjectValue val(const char *s)
{
    return (SubjectValue){.data = s, .len = s ? strlen(s) : 0};
}

static Buf escape_buf;

/* Escapes data[0..len); the result lives until the next call. */
static const char *escape(const char *data, size_t len)
{
    buf_reset(&escape_buf);
    subject_escape_token(data, len, &escape_buf);
    return escape_buf.data;
}

/* Reverses the escaping of s[0..len) into out; false on a malformed escape. */
static bool unescape(const char *s, size_t len, Buf *out)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < len; i++) {
        if (s[i] != '%') {
            buf_putc(out, s[i]);
            continue;
        }
        if (len - i < 3)
            return false;
        const char *hi = s[i + 1] ? strchr(hex, s[i + 1]) : NULL;
        const char *lo = s[i + 2] ? strchr(hex, s[i + 2]) : NULL;
        if (!hi || !lo)
            return false;
        buf_putc(out, (char)((hi - hex) << 4 | (lo - hex)));
        i += 2;
    }
    return true;
}

static void test_default_template(void)
{
    SubjectTemplate *t = NULL;
    char err[256] = "";
    CHECK(subject_template_new(&t, "outbox.{aggregate_type}.{event_type}", err, sizeof err) == 0);
    CHECK_STR(err, "");
    CHECK(t != NULL);
    if (!t)
        return;
    CHECK(subject_template_ncolumns(t) == 2);
    CHECK_STR(subject_template_column(t, 0), "aggregate_type");
    CHECK_STR(subject_template_column(t, 1), "event_type");
    CHECK(subject_template_column(t, 2) == NULL);

    SubjectValue v[2] = {val("order"), val("created")};
    Buf b;
    buf_init(&b);
    subject_template_expand(t, v, &b);
    CHECK_STR(b.data, "outbox.order.created");
    CHECK(b.len == strlen("outbox.order.created"));

    /* Appends after what the buffer holds; reuse after reset. */
    buf_puts(&b, "|");
    v[0] = val("Order.Line");
    v[1] = val("item added");
    subject_template_expand(t, v, &b);
    CHECK_STR(b.data, "outbox.order.created|outbox.Order%2ELine.item%20added");
    buf_reset(&b);
    v[0] = val(NULL);
    v[1] = val("");
    subject_template_expand(t, v, &b);
    CHECK_STR(b.data, "outbox._._");
    CHECK(subject_is_valid(b.data, b.len));
    buf_deinit(&b);
    subject_template_free(t);
}

static void test_escape(void)
{
    CHECK_STR(escape("abcXYZ019", 9), "abcXYZ019");
    const char *kept = "-_~!@#$&'()+,;=:/?[]^|";
    CHECK_STR(escape(kept, strlen(kept)), kept);
    CHECK_STR(escape("a.b", 3), "a%2Eb");
    CHECK_STR(escape("*", 1), "%2A");
    CHECK_STR(escape(">", 1), "%3E");
    CHECK_STR(escape("%", 1), "%25");
    CHECK_STR(escape("50%", 3), "50%25");
    CHECK_STR(escape("a b", 3), "a%20b");
    CHECK_STR(escape("\t", 1), "%09");
    CHECK_STR(escape("\r\n", 2), "%0D%0A");
    CHECK_STR(escape("a\0b", 3), "a%00b");
    CHECK_STR(escape("\x7f", 1), "%7F");
    CHECK_STR(escape("{}\"\\<`", 6), "%7B%7D%22%5C%3C%60");
    CHECK_STR(escape("caf\xc3\xa9", 5), "caf%C3%A9");
    CHECK_STR(escape("\xff", 1), "%FF");
    CHECK_STR(escape("", 0), "_");
    CHECK_STR(escape(NULL, 0), "_");
    CHECK_STR(escape("_", 1), "_");
    /* len, not NUL, ends the value */
    CHECK_STR(escape("abcdef", 3), "abc");

    /* The table in subject.c against the rule, byte by byte. */
    const char *keep_set = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                           "-_~!@#$&'()+,;=:/?[]^|";
    int wrong = 0;
    for (int c = 0; c < 256; c++) {
        char in = (char)c;
        const char *got = escape(&in, 1);
        bool keep = c != 0 && strchr(keep_set, c) != NULL;
        char want[4];
        if (keep)
            snprintf(want, sizeof want, "%c", c);
        else
            snprintf(want, sizeof want, "%%%02X", c);
        if (strcmp(got, want) != 0) {
            fprintf(stderr, "byte 0x%02X: got %s, want %s\n", c, got, want);
            wrong++;
        }
    }
    CHECK(wrong == 0);
}

static void test_placeholders(void)
{
    SubjectTemplate *t = NULL;
    char err[256];
    CHECK(subject_template_new(&t, "orders.{aggregate_id}-v1.x{a}y{b}z.{a}", err, sizeof err) ==
          0);
    if (!t)
        return;
    CHECK(subject_template_ncolumns(t) == 3);
    CHECK_STR(subject_template_column(t, 0), "aggregate_id");
    CHECK_STR(subject_template_column(t, 1), "a");
    CHECK_STR(subject_template_column(t, 2), "b");
    SubjectValue v[3] = {val("42"), val("A.B"), {.data = "x\0y", .len = 3}};
    Buf b;
    buf_init(&b);
    subject_template_expand(t, v, &b);
    CHECK_STR(b.data, "orders.42-v1.xA%2EByx%00yz.A%2EB");
    CHECK(subject_is_valid(b.data, b.len));
    subject_template_free(t);

    /* Whole subject from one placeholder, and literal-only templates. */
    CHECK(subject_template_new(&t, "{Subject_1}", err, sizeof err) == 0);
    if (t) {
        buf_reset(&b);
        v[0] = val("a.b.c");
        subject_template_expand(t, v, &b);
        CHECK_STR(b.data, "a%2Eb%2Ec");
        subject_template_free(t);
    }
    CHECK(subject_template_new(&t, "fixed.subject", err, sizeof err) == 0);
    if (t) {
        CHECK(subject_template_ncolumns(t) == 0);
        buf_reset(&b);
        subject_template_expand(t, NULL, &b);
        CHECK_STR(b.data, "fixed.subject");
        subject_template_free(t);
    }
    /* Punctuation allowed in literal text, including "%" and "-". */
    CHECK(subject_template_new(&t, "a-b_c.%25.$x", err, sizeof err) == 0);
    subject_template_free(t);
    subject_template_free(NULL);
    buf_deinit(&b);
}

static void check_bad(const char *tmpl, const char *want)
{
    SubjectTemplate *t = (SubjectTemplate *)(uintptr_t)1; /* must stay untouched */
    char err[256] = "";
    CHECK(subject_template_new(&t, tmpl, err, sizeof err) == -1);
    CHECK(t == (SubjectTemplate *)(uintptr_t)1);
    CHECK_STR(err, want);
}

static void test_template_errors(void)
{
    check_bad("", "subject template '': empty");
    check_bad("outbox..x", "subject template 'outbox..x': empty token");
    check_bad(".a", "subject template '.a': leading '.'");
    check_bad("a.", "subject template 'a.': trailing '.'");
    check_bad(".", "subject template '.': leading '.'");
    check_bad("a.{b", "subject template 'a.{b': unclosed '{'");
    check_bad("a.{b.c}", "subject template 'a.{b.c}': unclosed '{'");
    check_bad("a.{}", "subject template 'a.{}': empty placeholder '{}'");
    check_bad("a.{b-c}",
              "subject template 'a.{b-c}': bad column name 'b-c' in placeholder (letters, digits "
              "and _ only)");
    check_bad("a.{b{c}}", "subject template 'a.{b{c}}': bad column name 'b{c' in placeholder "
                          "(letters, digits and _ only)");
    check_bad("a.{ b}", "subject template 'a.{ b}': bad column name ' b' in placeholder (letters, "
                        "digits and _ only)");
    check_bad("a.b}", "subject template 'a.b}': unmatched '}'");
    check_bad("a.*", "subject template 'a.*': wildcard '*' not allowed");
    check_bad("a.>", "subject template 'a.>': wildcard '>' not allowed");
    check_bad("a.x*y", "subject template 'a.x*y': wildcard '*' not allowed");
    check_bad("a b", "subject template 'a b': space not allowed");
    /* The template is quoted with its control bytes as '?': the message stays one line. */
    check_bad("a\tb", "subject template 'a?b': byte 0x09 not allowed (printable ASCII only)");
    check_bad("caf\xc3\xa9",
              "subject template 'caf\xc3\xa9': byte 0xC3 not allowed (printable ASCII only)");
    check_bad("a.\x7f", "subject template 'a.?': byte 0x7F not allowed (printable ASCII only)");

    /* A NULL template and a tiny or absent error buffer do not crash. */
    SubjectTemplate *t = NULL;
    char small[8];
    CHECK(subject_template_new(&t, NULL, small, sizeof small) == -1);
    CHECK(strlen(small) == sizeof small - 1);
    CHECK(subject_template_new(&t, "a..b", NULL, 0) == -1);
    CHECK(t == NULL);
}

static void test_is_valid(void)
{
#define V(s) subject_is_valid(s, strlen(s))
    CHECK(V("a"));
    CHECK(V("a.b.c"));
    CHECK(V("a.b*c.d>e"));
    CHECK(V("caf\xc3\xa9.x"));
    CHECK(V("%2E.x"));
    CHECK(!V(""));
    CHECK(!subject_is_valid(NULL, 0));
    CHECK(!V("."));
    CHECK(!V(".a"));
    CHECK(!V("a."));
    CHECK(!V("a..b"));
    CHECK(!V("a.*"));
    CHECK(!V("*.a"));
    CHECK(!V("a.>"));
    CHECK(!V(">"));
    CHECK(!V("a b"));
    CHECK(!V("a\tb"));
    CHECK(!V("a\nb"));
    CHECK(!V("a\x7f"));
    CHECK(!subject_is_valid("a\0b", 3));
    CHECK(subject_is_valid("a.b.junk", 3)); /* len, not NUL */
#undef V
}

/* Every expansion of arbitrary bytes is a valid subject with the template's token count, made
 * of safe bytes only, and every escaped value decodes back to the original. */
static void test_random_values(void)
{
    SubjectTemplate *t = NULL;
    char err[256];
    CHECK(subject_template_new(&t, "outbox.{a}.x{b}y", err, sizeof err) == 0);
    if (!t)
        return;
    uint64_t state = 0x9E3779B97F4A7C15u;
    unsigned char data[2][24];
    Buf b, tok, dec;
    buf_init(&b);
    buf_init(&tok);
    buf_init(&dec);
    int invalid = 0, wrong_tokens = 0, bad_chars = 0, not_reversible = 0;
    for (int n = 0; n < 10000; n++) {
        SubjectValue v[2];
        for (int k = 0; k < 2; k++) {
            state = state * 6364136223846793005u + 1442695040888963407u;
            size_t len = (size_t)(state >> 59); /* 0..31, trimmed below */
            if (len > sizeof data[k])
                len = sizeof data[k];
            for (size_t i = 0; i < len; i++) {
                state = state * 6364136223846793005u + 1442695040888963407u;
                data[k][i] = (unsigned char)(state >> 56);
            }
            v[k].data = (n % 97 == 0 && k == 0) ? NULL : (const char *)data[k];
            v[k].len = len;
        }
        buf_reset(&b);
        subject_template_expand(t, v, &b);
        if (!subject_is_valid(b.data, b.len))
            invalid++;
        size_t dots = 0;
        for (size_t i = 0; i < b.len; i++) {
            unsigned char c = (unsigned char)b.data[i];
            dots += c == '.';
            if (c <= 0x20 || c >= 0x7f || c == '*' || c == '>')
                bad_chars++;
        }
        if (dots != 2)
            wrong_tokens++;

        if (v[1].len > 0) {
            buf_reset(&tok);
            buf_reset(&dec);
            subject_escape_token(v[1].data, v[1].len, &tok);
            if (!unescape(tok.data, tok.len, &dec) || dec.len != v[1].len ||
                memcmp(dec.data, v[1].data, dec.len) != 0)
                not_reversible++;
        }
    }
    CHECK(invalid == 0);
    CHECK(wrong_tokens == 0);
    CHECK(bad_chars == 0);
    CHECK(not_reversible == 0);
    buf_deinit(&b);
    buf_deinit(&tok);
    buf_deinit(&dec);
    subject_template_free(t);
}

static void test_covers(void)
{
    CHECK(subject_covers("outbox.>", "outbox.*.*"));
    CHECK(subject_covers("outbox.>", "outbox.dead_letter"));
    CHECK(subject_covers("outbox.*.*", "outbox.*.*"));
    CHECK(subject_covers("outbox.*.created", "outbox.order.created"));
    CHECK(!subject_covers("outbox.*.created", "outbox.*.*"));
    CHECK(!subject_covers("outbox.order.>", "outbox.*.*"));
    CHECK(!subject_covers("outbox.>", "outbox"));
    CHECK(!subject_covers("outbox.*", "outbox.*.*"));
    CHECK(!subject_covers("orders.>", "outbox.*.*"));
    CHECK(subject_covers(">", "anything.at.all"));
}

int main(void)
{
    test_default_template();
    test_escape();
    test_placeholders();
    test_template_errors();
    test_is_valid();
    test_random_values();
    buf_deinit(&escape_buf);
    test_covers();
    return check_report("test_subject");
}
