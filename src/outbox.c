/*
 * outbox.c - decoded outbox row -> event (subject, Nats-Msg-Id, headers, body).
 *
 * Which columns mean what is decided by name when a Relation message arrives, and cached per
 * relation id, so the per-row work is a few index lookups and copies into reused buffers.
 * Everything that can make a row unpublishable is detected here and reported, never skipped:
 * the relay decides what to do with such a row.
 */
#include "outboxd/outbox.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "outboxd/subject.h"

/* Type OIDs that change how a value is turned into bytes. */
#define OID_BYTEA 17
#define OID_TIMESTAMPTZ 1184

enum {
    COL_EVENT_ID,
    COL_AGGREGATE_TYPE,
    COL_AGGREGATE_ID,
    COL_EVENT_TYPE,
    COL_PAYLOAD,
    COL_OCCURRED_AT,
    COL_SCHEMA_VERSION,
    COL_TRACE_ID,
    NUM_COLS
};

static const char *const column_names[NUM_COLS] = {
    "event_id",   "aggregate_type", "aggregate_id",   "event_type",
    "payload",    "occurred_at",    "schema_version", "trace_id",
};

/* Header for each optional column, in the order headers are written. */
static const struct {
    int col;
    const char *header;
} column_headers[] = {
    {COL_EVENT_TYPE, OUTBOX_HDR_EVENT_TYPE},
    {COL_AGGREGATE_TYPE, OUTBOX_HDR_AGGREGATE_TYPE},
    {COL_AGGREGATE_ID, OUTBOX_HDR_AGGREGATE_ID},
    {COL_OCCURRED_AT, OUTBOX_HDR_OCCURRED_AT},
    {COL_SCHEMA_VERSION, OUTBOX_HDR_SCHEMA_VERSION},
    {COL_TRACE_ID, OUTBOX_HDR_TRACE_ID},
};

const char *const outbox_required_columns[2] = {"event_id", "payload"};

typedef struct Binding {
    uint32_t relid;
    bool is_outbox;
    int col[NUM_COLS];       /* index in the row, or -1 */
    uint32_t col_type[NUM_COLS];
    int *tmpl_col;           /* per template column: index in the row */
} Binding;

struct OutboxMapper {
    char *schema;
    char *table;
    char *qualified;
    SubjectTemplate *tmpl;
    Binding *bindings;
    size_t nbindings;
    size_t cap;
    SubjectValue *tmpl_values;
    Buf scratch; /* subjects of rejected rows */
    Buf scratch_body; /* decoded bytea bodies of rejected rows */
    uint64_t txn_lsn; /* the transaction whose commit LSN and time are formatted in txn_text */
    int64_t txn_time;
    char txn_text[2][32];
};

void outbox_event_init(OutboxEvent *ev)
{
    memset(ev, 0, sizeof(*ev));
    buf_init(&ev->subject);
    buf_init(&ev->hvals);
    buf_init(&ev->body_buf);
}

void outbox_event_deinit(OutboxEvent *ev)
{
    buf_deinit(&ev->subject);
    buf_deinit(&ev->hvals);
    buf_deinit(&ev->body_buf);
}

const char *outbox_event_header(const OutboxEvent *ev, const char *name)
{
    for (size_t i = 0; i < ev->nheaders; i++)
        if (strcmp(ev->headers[i].name, name) == 0)
            return ev->hvals.data + ev->headers[i].off;
    return NULL;
}

int outbox_mapper_new(OutboxMapper **out, const char *table, const char *subject_template,
                      char *err, size_t errlen)
{
    const char *dot = strchr(table, '.');
    const char *schema = dot ? NULL : "public";
    if (table[0] == '\0' || (dot && (dot == table || dot[1] == '\0' || strchr(dot + 1, '.')))) {
        snprintf(err, errlen, "invalid outbox table name '%s': expected schema.table or table",
                 table);
        return -1;
    }
    SubjectTemplate *tmpl;
    if (subject_template_new(&tmpl, subject_template, err, errlen) < 0)
        return -1;

    OutboxMapper *m = xcalloc(1, sizeof(*m));
    m->schema = dot ? xstrndup(table, (size_t)(dot - table)) : xstrdup(schema);
    m->table = xstrdup(dot ? dot + 1 : table);
    Buf q;
    buf_init(&q);
    buf_printf(&q, "%s.%s", m->schema, m->table);
    m->qualified = q.data;
    m->tmpl = tmpl;
    m->tmpl_values = xcalloc(subject_template_ncolumns(tmpl) + 1, sizeof(SubjectValue));
    *out = m;
    return 0;
}

void outbox_mapper_free(OutboxMapper *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->nbindings; i++)
        free(m->bindings[i].tmpl_col);
    free(m->bindings);
    free(m->tmpl_values);
    buf_deinit(&m->scratch);
    buf_deinit(&m->scratch_body);
    subject_template_free(m->tmpl);
    free(m->schema);
    free(m->table);
    free(m->qualified);
    free(m);
}

const char *outbox_mapper_schema(const OutboxMapper *m)
{
    return m->schema;
}

const char *outbox_mapper_table(const OutboxMapper *m)
{
    return m->table;
}

const char *outbox_mapper_qualified(const OutboxMapper *m)
{
    return m->qualified;
}

static int find_name(const char *const *names, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return (int)i;
    return -1;
}

int outbox_mapper_check_columns(const OutboxMapper *m, const char *const *names, size_t n,
                                char *err, size_t errlen)
{
    for (size_t i = 0; i < ARRAY_SIZE(outbox_required_columns); i++) {
        if (find_name(names, n, outbox_required_columns[i]) < 0) {
            snprintf(err, errlen, "outbox table %s has no column \"%s\"", m->qualified,
                     outbox_required_columns[i]);
            return -1;
        }
    }
    for (size_t i = 0; i < subject_template_ncolumns(m->tmpl); i++) {
        const char *col = subject_template_column(m->tmpl, i);
        if (find_name(names, n, col) < 0) {
            snprintf(err, errlen, "subject template names column \"%s\", which %s does not have",
                     col, m->qualified);
            return -1;
        }
    }
    return 0;
}

static Binding *binding_for(OutboxMapper *m, uint32_t relid)
{
    for (size_t i = 0; i < m->nbindings; i++)
        if (m->bindings[i].relid == relid)
            return &m->bindings[i];
    return NULL;
}

int outbox_mapper_relation(OutboxMapper *m, const PgoMessage *rel, char *err, size_t errlen)
{
    Binding *b = binding_for(m, rel->u.relation.relid);
    if (!b) {
        if (m->nbindings == m->cap) {
            m->cap = m->cap ? m->cap * 2 : 8;
            m->bindings = xrealloc(m->bindings, m->cap * sizeof(*m->bindings));
        }
        b = &m->bindings[m->nbindings++];
        memset(b, 0, sizeof(*b));
        b->relid = rel->u.relation.relid;
    }
    b->is_outbox = strcmp(rel->u.relation.nspname, m->schema) == 0 &&
                   strcmp(rel->u.relation.relname, m->table) == 0;
    free(b->tmpl_col);
    b->tmpl_col = NULL;
    if (!b->is_outbox)
        return 0;

    uint16_t ncols = rel->u.relation.ncols;
    for (int c = 0; c < NUM_COLS; c++) {
        b->col[c] = -1;
        for (uint16_t i = 0; i < ncols; i++) {
            if (strcmp(rel->cols[i].name, column_names[c]) == 0) {
                b->col[c] = i;
                b->col_type[c] = rel->cols[i].type_oid;
                break;
            }
        }
    }
    const char *names[PGO_MAX_COLUMNS];
    for (uint16_t i = 0; i < ncols; i++)
        names[i] = rel->cols[i].name;
    if (outbox_mapper_check_columns(m, names, ncols, err, errlen) < 0) {
        b->is_outbox = false; /* an insert into it now fails loudly as an unknown relation */
        return -1;
    }
    size_t nt = subject_template_ncolumns(m->tmpl);
    b->tmpl_col = xcalloc(nt + 1, sizeof(int));
    for (size_t t = 0; t < nt; t++)
        b->tmpl_col[t] = find_name(names, ncols, subject_template_column(m->tmpl, t));
    return 0;
}

bool outbox_mapper_is_outbox(const OutboxMapper *m, uint32_t relid)
{
    for (size_t i = 0; i < m->nbindings; i++)
        if (m->bindings[i].relid == relid)
            return m->bindings[i].is_outbox;
    return false;
}

static const char hexdigits[] = "0123456789ABCDEF";

/* Header values travel in a text protocol: control bytes (CR and LF above all) would end the
 * header early, so they are written as %XX. Everything else is kept byte for byte. */
static void append_header_value(Buf *b, const char *p, size_t n)
{
    /* Values are almost always clean: copy runs of ordinary bytes in one go. */
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c != 0x7f)
            continue;
        buf_append(b, p + start, i - start);
        char esc[3] = {'%', hexdigits[c >> 4], hexdigits[c & 15]};
        buf_append(b, esc, 3);
        start = i + 1;
    }
    buf_append(b, p + start, n - start);
}

/* PostgreSQL renders a timestamptz (DateStyle ISO, TimeZone UTC) as
 * "2026-11-22 17:26:18.123456+00"; RFC 3339 wants "2026-11-22T17:26:18.123456Z". */
static void append_timestamptz(Buf *b, const char *p, size_t n)
{
    size_t start = b->len;
    append_header_value(b, p, n);
    char *s = b->data + start;
    size_t len = b->len - start;
    if (len > 10 && s[10] == ' ')
        s[10] = 'T';
    if (len > 3 && strcmp(s + len - 3, "+00") == 0) {
        b->len -= 3;
        buf_putc(b, 'Z');
    } else if (len > 3 && (s[len - 3] == '+' || s[len - 3] == '-')) {
        buf_puts(b, ":00");
    }
}



static void add_header(OutboxEvent *ev, const char *name, size_t off)
{
    ev->headers[ev->nheaders].name = name;
    ev->headers[ev->nheaders].off = off;
    ev->nheaders++;
}

static bool valid_msg_id(const char *p, size_t n)
{
    if (n == 0 || n > OUTBOX_MAX_EVENT_ID)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] <= 0x20 || (unsigned char)p[i] >= 0x7f)
            return false;
    return true;
}

/* Expands the subject template over a row into out. */
static void expand_subject(OutboxMapper *m, const Binding *b, const PgoMessage *ins, Buf *out)
{
    size_t nt = subject_template_ncolumns(m->tmpl);
    uint16_t ncols = ins->u.insert.ncols;
    for (size_t t = 0; t < nt; t++) {
        int c = b->tmpl_col[t];
        const PgoValue *tv = c >= 0 && c < ncols ? &ins->values[c] : NULL;
        bool present = tv && (tv->kind == 't' || tv->kind == 'b');
        m->tmpl_values[t].data = present ? tv->data : NULL;
        m->tmpl_values[t].len = present ? tv->len : 0;
    }
    buf_reset(out);
    subject_template_expand(m->tmpl, m->tmpl_values, out);
}

OutboxReject outbox_map_insert(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                               OutboxEvent *ev, char *err, size_t errlen)
{
    const Binding *b = binding_for(m, ins->u.insert.relid);
    if (!b || !b->is_outbox) {
        snprintf(err, errlen, "insert into relation %u, which is not a known outbox table",
                 ins->u.insert.relid);
        return OUTBOX_UNKNOWN_RELATION;
    }
    const PgoValue *v = ins->values;
    uint16_t ncols = ins->u.insert.ncols;
#define VAL(c) (b->col[c] >= 0 && b->col[c] < ncols ? &v[b->col[c]] : NULL)
#define PRESENT(pv) ((pv) && ((pv)->kind == 't' || (pv)->kind == 'b'))

    const PgoValue *id = VAL(COL_EVENT_ID);
    if (!PRESENT(id)) {
        snprintf(err, errlen, "event_id is null");
        return OUTBOX_INVALID_EVENT_ID;
    }
    if (!valid_msg_id(id->data, id->len)) {
        snprintf(err, errlen,
                 "event_id is not usable as a Nats-Msg-Id (it must be 1 to %d printable ASCII "
                 "characters without spaces)",
                 OUTBOX_MAX_EVENT_ID);
        return OUTBOX_INVALID_EVENT_ID;
    }
    const PgoValue *payload = VAL(COL_PAYLOAD);
    if (!PRESENT(payload)) {
        snprintf(err, errlen, "payload is null");
        return OUTBOX_NULL_PAYLOAD;
    }
    if (b->col_type[COL_PAYLOAD] == OID_BYTEA) {
        if (!bytea_hex_decode(payload->data, payload->len, &ev->body_buf)) {
            snprintf(err, errlen, "payload is bytea but not in hex format");
            return OUTBOX_NULL_PAYLOAD;
        }
        ev->body = ev->body_buf.data;
        ev->body_len = ev->body_buf.len;
    } else {
        ev->body = payload->data;
        ev->body_len = payload->len;
    }

    ev->commit_lsn = txn->commit_lsn;
    ev->commit_time = txn->commit_time;
    ev->nheaders = 0;
    buf_reset(&ev->hvals);

    add_header(ev, OUTBOX_HDR_MSG_ID, ev->hvals.len);
    buf_append(&ev->hvals, id->data, id->len);
    buf_putc(&ev->hvals, '\0');
    for (size_t i = 0; i < ARRAY_SIZE(column_headers); i++) {
        const PgoValue *cv = VAL(column_headers[i].col);
        /* No header for a NULL or empty value: libnats up to 3.9 reads "Key: \r\n" as
         * taking the next header line for its value, so consumers would misread the rest. */
        if (!PRESENT(cv) || cv->len == 0)
            continue;
        add_header(ev, column_headers[i].header, ev->hvals.len);
        if (b->col_type[column_headers[i].col] == OID_TIMESTAMPTZ)
            append_timestamptz(&ev->hvals, cv->data, cv->len);
        else
            append_header_value(&ev->hvals, cv->data, cv->len);
        buf_putc(&ev->hvals, '\0');
    }
    /* Every event of a transaction shares these two: format them once per transaction. */
    if (txn->commit_lsn != m->txn_lsn || txn->commit_time != m->txn_time || !m->txn_text[0][0]) {
        m->txn_lsn = txn->commit_lsn;
        m->txn_time = txn->commit_time;
        lsn_format(txn->commit_lsn, m->txn_text[0]);
        pg_time_format_rfc3339(txn->commit_time, m->txn_text[1]);
    }
    add_header(ev, OUTBOX_HDR_COMMIT_LSN, ev->hvals.len);
    buf_append(&ev->hvals, m->txn_text[0], strlen(m->txn_text[0]) + 1);
    add_header(ev, OUTBOX_HDR_COMMIT_TIME, ev->hvals.len);
    buf_append(&ev->hvals, m->txn_text[1], strlen(m->txn_text[1]) + 1);
    ev->msg_id = ev->hvals.data;

    expand_subject(m, b, ins, &ev->subject);
    if (ev->subject.len > OUTBOX_MAX_SUBJECT) {
        snprintf(err, errlen,
                 "the subject is %zu bytes long, more than the %d a NATS publish allows for it",
                 ev->subject.len, OUTBOX_MAX_SUBJECT);
        return OUTBOX_INVALID_SUBJECT;
    }
#undef VAL
#undef PRESENT
    return OUTBOX_OK;
}

void outbox_describe_row(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                         uint32_t index, DeadLetter *dl)
{
    memset(dl, 0, sizeof(*dl));
    dl->table = m->qualified;
    dl->commit_lsn = txn->commit_lsn;
    dl->commit_time = txn->commit_time;
    dl->index = index;
    const Binding *b = binding_for(m, ins->u.insert.relid);
    if (!b || !b->is_outbox)
        return;
    uint16_t ncols = ins->u.insert.ncols;
    int c = b->col[COL_EVENT_ID];
    if (c >= 0 && c < ncols && ins->values[c].data) {
        dl->event_id = ins->values[c].data;
        dl->event_id_len = ins->values[c].len;
    }
    c = b->col[COL_PAYLOAD];
    if (c >= 0 && c < ncols && ins->values[c].data) {
        dl->body = ins->values[c].data;
        dl->body_len = ins->values[c].len;
        /* A bytea payload travels as its bytes, as it would have in the event; one that is
         * not valid hex stays as the text PostgreSQL sent. */
        if (b->col_type[COL_PAYLOAD] == OID_BYTEA &&
            bytea_hex_decode(dl->body, dl->body_len, &m->scratch_body)) {
            dl->body = m->scratch_body.data ? m->scratch_body.data : "";
            dl->body_len = m->scratch_body.len;
        }
    }
    expand_subject(m, b, ins, &m->scratch);
    dl->subject = m->scratch.data;
}

static void add_text_header(OutboxEvent *ev, const char *name, const char *value, size_t len)
{
    if (!value || len == 0) /* see the note on empty values in outbox_map_insert */
        return;
    add_header(ev, name, ev->hvals.len);
    append_header_value(&ev->hvals, value, len);
    buf_putc(&ev->hvals, '\0');
}

/* A JSON string of s; text that is not UTF-8 keeps its bytes as %XX (JSON needs UTF-8). */
static json_t *json_text(const char *s, size_t n)
{
    json_t *v = json_stringn(s ? s : "", n);
    if (v)
        return v;
    Buf esc;
    buf_init(&esc);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c >= 0x7f || c == '%')
            buf_printf(&esc, "%%%02X", c);
        else
            buf_putc(&esc, (char)c);
    }
    v = json_string(esc.data ? esc.data : "");
    buf_deinit(&esc);
    return v;
}

void outbox_dead_letter(OutboxEvent *out, const char *dlq_subject, const DeadLetter *dl,
                        size_t max_body)
{
    char lsn[18], when[32];
    lsn_format(dl->commit_lsn, lsn);
    pg_time_format_rfc3339(dl->commit_time, when);

    out->nheaders = 0;
    buf_reset(&out->hvals);
    add_header(out, OUTBOX_HDR_MSG_ID, out->hvals.len);
    if (dl->event_id && valid_msg_id(dl->event_id, dl->event_id_len)) {
        buf_puts(&out->hvals, "dlq-");
        buf_append(&out->hvals, dl->event_id, dl->event_id_len);
    } else {
        buf_printf(&out->hvals, "dlq-%X-%X-%u", LSN_ARGS(dl->commit_lsn), dl->index);
    }
    buf_putc(&out->hvals, '\0');
    add_text_header(out, OUTBOX_HDR_DL_REASON, dl->reason, dl->reason ? strlen(dl->reason) : 0);
    add_text_header(out, OUTBOX_HDR_DL_DETAIL, dl->detail, dl->detail ? strlen(dl->detail) : 0);
    add_text_header(out, OUTBOX_HDR_ORIGINAL_SUBJECT, dl->subject,
                    dl->subject ? strlen(dl->subject) : 0);
    add_text_header(out, OUTBOX_HDR_EVENT_ID, dl->event_id, dl->event_id_len);
    add_text_header(out, OUTBOX_HDR_TABLE, dl->table, dl->table ? strlen(dl->table) : 0);
    add_text_header(out, OUTBOX_HDR_COMMIT_LSN, lsn, strlen(lsn));
    add_text_header(out, OUTBOX_HDR_COMMIT_TIME, when, strlen(when));
    out->msg_id = out->hvals.data;
    out->commit_lsn = dl->commit_lsn;
    out->commit_time = dl->commit_time;
    buf_reset(&out->subject);
    buf_puts(&out->subject, dlq_subject);

    if (dl->body && dl->body_len <= max_body) {
        /* The caller's body may live in out->body_buf already: then it stays where it is. */
        out->body = dl->body;
        out->body_len = dl->body_len;
        return;
    }
    json_t *o = json_object();
    json_object_set_new(o, "table", json_text(dl->table, dl->table ? strlen(dl->table) : 0));
    if (dl->event_id)
        json_object_set_new(o, "event_id", json_text(dl->event_id, dl->event_id_len));
    json_object_set_new(o, "commit_lsn", json_string(lsn));
    json_object_set_new(o, "reason", json_text(dl->reason, dl->reason ? strlen(dl->reason) : 0));
    json_object_set_new(o, "detail", json_text(dl->detail, dl->detail ? strlen(dl->detail) : 0));
    json_object_set_new(o, "body_bytes", json_integer((json_int_t)dl->body_len));
    char *text = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(o);
    buf_reset(&out->body_buf);
    buf_puts(&out->body_buf, text ? text : "{}");
    free(text);
    out->body = out->body_buf.data;
    out->body_len = out->body_buf.len;
}
