/*
 * subject.h - NATS subject templates such as "outbox.{aggregate_type}.{event_type}".
 *
 * A template is literal subject text with "{column}" placeholders naming columns of the outbox
 * row. A placeholder may stand for a whole token or part of one ("orders.{aggregate_id}-v1").
 * Column values are escaped so that each expansion is one valid subject and a value can never
 * add tokens or wildcards. The rule (subject_escape_token):
 *   - bytes A-Z a-z 0-9 and - _ ~ ! @ # $ & ' ( ) + , ; = : / ? [ ] ^ | are kept as they are;
 *   - every other byte (".", "*", ">", "%", space, control bytes, non-ASCII) becomes "%XX",
 *     uppercase hex, as in URL percent-encoding;
 *   - a NULL or empty value becomes "_".
 * The mapping is deterministic, and reversible except for "_" (which also stands for a value
 * that is exactly "_").
 */
#ifndef OUTBOXD_SUBJECT_H
#define OUTBOXD_SUBJECT_H

#include <stdbool.h>
#include <stddef.h>

#include "outboxd/util.h"

typedef struct SubjectTemplate SubjectTemplate;

/* One column value for an expansion; data == NULL means SQL NULL. Not NUL-terminated. */
typedef struct SubjectValue {
    const char *data;
    size_t len;
} SubjectValue;

/*
 * Compiles a template. On success writes *out and returns 0. On a malformed template (unbalanced
 * braces, an empty placeholder, an empty token, a wildcard or whitespace in the literal text, a
 * leading or trailing ".") returns -1 with a one-line reason in err; *out is not touched.
 */
int subject_template_new(SubjectTemplate **out, const char *tmpl, char *err, size_t errlen);
void subject_template_free(SubjectTemplate *t);

/* The distinct column names the template uses, in order of first appearance. */
size_t subject_template_ncolumns(const SubjectTemplate *t);
const char *subject_template_column(const SubjectTemplate *t, size_t i);

/*
 * Appends the expansion to out (after what out holds). values[i] is the value of column i as
 * numbered by subject_template_column(). Never fails: every value escapes to a valid token part.
 */
void subject_template_expand(const SubjectTemplate *t, const SubjectValue *values, Buf *out);

/* Appends the escaped form of one value (see the rule above) to out. */
void subject_escape_token(const char *data, size_t len, Buf *out);

/* True when s is a valid subject to publish to: non-empty tokens separated by ".", no
 * whitespace or control bytes, no "*" or ">" tokens. */
bool subject_is_valid(const char *s, size_t len);

/* True when pattern (a stream's subject, wildcards allowed) captures every subject that sub
 * (a subject, or a filter with wildcards such as "outbox.*.*") can be. */
bool subject_covers(const char *pattern, const char *sub);

#endif
