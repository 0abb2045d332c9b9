/*
 * outbox.c - decoded outbox row -> event (subject, Nats-Msg-Id, headers, body).
 *
 * Which columns mean what is decided by name when a Relation message arrives, and cached per
 * relation id, so the per-row work is a few index lookups and copies into reused buffers.
 * Everything that can make a row unpublishable is detected here and reported, never skipped:
 * the relay decides what to do with such a row.
 */
#include "outboxd/outbox.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "outboxd/subject.h"

/* Type OIDs that change how a value is turned into bytes. */
#define OID_BOOL 16
#define OID_BYTEA 17
#define OID_INT8 20
#define OID_INT2 21
#define OID_INT4 23
#define OID_OID 26
#define OID_JSON 114
#define OID_FLOAT4 700
#define OID_FLOAT8 701
#define OID_TIMESTAMPTZ 1184
#define OID_NUMERIC 1700
#define OID_JSONB 3802

/* Most extra headers one table may add. */
#define MAX_EXTRA_HEADERS OUTBOX_MAX_EXTRA_HEADERS

/* Header for each optional role, in the order headers are written. */
static const struct {
    int role;
    const char *header;
} role_headers[] = {
    {ROLE_EVENT_TYPE, OUTBOX_HDR_EVENT_TYPE},
    {ROLE_AGGREGATE_TYPE, OUTBOX_HDR_AGGREGATE_TYPE},
    {ROLE_AGGREGATE_ID, OUTBOX_HDR_AGGREGATE_ID},
    {ROLE_OCCURRED_AT, OUTBOX_HDR_OCCURRED_AT},
    {ROLE_SCHEMA_VERSION, OUTBOX_HDR_SCHEMA_VERSION},
    {ROLE_TRACE_ID, OUTBOX_HDR_TRACE_ID},
};

typedef struct ExtraHeader {
    char *column;
    char *header;
} ExtraHeader;

/* One outbox table as configured. */
typedef struct TableSpec {
    char *schema;
    char *table;
    char *qualified;
    SubjectTemplate *tmpl;
    char **tmpl_cols;               /* the column each placeholder reads */
    char *role_col[CONFIG_NROLES];  /* NULL: the table has no column for the role */
    ExtraHeader extra[MAX_EXTRA_HEADERS];
    size_t nextra;
    bool envelope;                  /* body: every column as a JSON object */
} TableSpec;

/* What a relation id means: a table that is not relayed (spec < 0), or one that is. */
typedef struct Binding {
    uint32_t relid;
    int spec;
    int col[CONFIG_NROLES];       /* index in the row, or -1 */
    uint32_t col_type[CONFIG_NROLES];
    int *tmpl_col;                /* per placeholder: index in the row */
    int extra_col[MAX_EXTRA_HEADERS];
    uint32_t extra_type[MAX_EXTRA_HEADERS];
    /* for envelope bodies: the columns' names (JSON-escaped, quoted) and types */
    uint16_t ncols;
    char **json_names;
    uint32_t *types;
} Binding;

struct OutboxMapper {
    TableSpec *specs;
    size_t nspecs;
    Binding *bindings;
    size_t nbindings;
    size_t cap;
    SubjectValue *tmpl_values;      /* sized for the largest template */
    /* table-less events: logical decoding messages with this prefix (NULL: off) */
    char *msg_prefix;
    SubjectTemplate *msg_tmpl;
    char *msg_label;                /* "message prefix outbox", for dead letters and logs */
    Buf scratch;      /* subjects of rejected rows */
    Buf scratch_body; /* decoded bytea bodies of rejected rows */
    uint64_t txn_lsn; /* the transaction whose commit LSN and time are formatted in txn_text */
    int64_t txn_time;
    char txn_text[2][32];
    uint32_t txn_tli;
    char txn_pos[OUTBOX_POSITION_MAX]; /* "<timeline> <commit LSN> ", the index follows */
    size_t txn_pos_len;
    char source[128];  /* Outbox-Source, "" for none */
    size_t source_len;
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

static int role_of(const char *name)
{
    for (int r = 0; r < CONFIG_NROLES; r++)
        if (strcmp(config_role_names[r], name) == 0)
            return r;
    return -1;
}

static void add_extra(void *arg, const char *column, size_t column_len, const char *header,
                      size_t header_len)
{
    TableSpec *t = arg;
    if (t->nextra == MAX_EXTRA_HEADERS) {
        t->nextra++; /* reported by spec_init */
        return;
    }
    t->extra[t->nextra].column = xstrndup(column, column_len);
    t->extra[t->nextra].header = xstrndup(header, header_len);
    t->nextra++;
}

static void spec_deinit(TableSpec *t)
{
    if (t->tmpl)
        for (size_t i = 0; i < subject_template_ncolumns(t->tmpl); i++)
            free(t->tmpl_cols[i]);
    free(t->tmpl_cols);
    subject_template_free(t->tmpl);
    for (int r = 0; r < CONFIG_NROLES; r++)
        free(t->role_col[r]);
    for (size_t i = 0; i < t->nextra && i < MAX_EXTRA_HEADERS; i++) {
        free(t->extra[i].column);
        free(t->extra[i].header);
    }
    free(t->schema);
    free(t->table);
    free(t->qualified);
}

static int spec_init(TableSpec *t, const TableConfig *tc, char *err, size_t errlen)
{
    memset(t, 0, sizeof(*t));
    const char *table = tc->table;
    const char *dot = strchr(table, '.');
    if (table[0] == '\0' || (dot && (dot == table || dot[1] == '\0' || strchr(dot + 1, '.')))) {
        snprintf(err, errlen, "invalid outbox table name '%s': expected schema.table or table",
                 table);
        return -1;
    }
    if (subject_template_new(&t->tmpl, tc->subject, err, errlen) < 0)
        return -1;
    t->schema = dot ? xstrndup(table, (size_t)(dot - table)) : xstrdup("public");
    t->table = xstrdup(dot ? dot + 1 : table);
    t->qualified = strf("%s.%s", t->schema, t->table);
    for (int r = 0; r < CONFIG_NROLES; r++) {
        const char *c = config_role_column(tc, r);
        t->role_col[r] = c ? xstrdup(c) : NULL;
    }
    /* A placeholder naming a role reads the role's column: "{aggregate_type}" works whatever
     * the column is called. Any other name is a column name. */
    size_t nt = subject_template_ncolumns(t->tmpl);
    t->tmpl_cols = xcalloc(nt + 1, sizeof(char *));
    for (size_t i = 0; i < nt; i++) {
        const char *name = subject_template_column(t->tmpl, i);
        int r = role_of(name);
        t->tmpl_cols[i] = xstrdup(r >= 0 && t->role_col[r] ? t->role_col[r] : name);
    }
    config_each_header(tc, add_extra, t);
    if (t->nextra > MAX_EXTRA_HEADERS) {
        snprintf(err, errlen, "%s: at most %d extra headers (--header) per table", t->qualified,
                 MAX_EXTRA_HEADERS);
        return -1;
    }
    t->envelope = tc->body && strcmp(tc->body, "envelope") == 0;
    return 0;
}

int outbox_mapper_new(OutboxMapper **out, const TableConfig *tables, size_t ntables,
                      const char *message_prefix, const char *message_subject, char *err,
                      size_t errlen)
{
    OutboxMapper *m = xcalloc(1, sizeof(*m));
    m->specs = xcalloc(ntables, sizeof(*m->specs));
    size_t most = 0;
    for (size_t i = 0; i < ntables; i++) {
        m->nspecs = i + 1;
        if (spec_init(&m->specs[i], &tables[i], err, errlen) < 0) {
            outbox_mapper_free(m);
            return -1;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(m->specs[j].qualified, m->specs[i].qualified) == 0) {
                snprintf(err, errlen, "table %s is listed twice", m->specs[i].qualified);
                outbox_mapper_free(m);
                return -1;
            }
        }
        size_t n = subject_template_ncolumns(m->specs[i].tmpl);
        most = n > most ? n : most;
    }
    if (message_prefix) {
        if (subject_template_new(&m->msg_tmpl, message_subject, err, errlen) < 0) {
            outbox_mapper_free(m);
            return -1;
        }
        m->msg_prefix = xstrdup(message_prefix);
        m->msg_label = strf("message prefix %s", message_prefix);
        size_t n = subject_template_ncolumns(m->msg_tmpl);
        most = n > most ? n : most;
    }
    m->tmpl_values = xcalloc(most + 1, sizeof(SubjectValue));
    *out = m;
    return 0;
}

int outbox_mapper_from_config(OutboxMapper **out, const Config *cfg, char *err, size_t errlen)
{
    return outbox_mapper_new(out, cfg->tables, cfg->ntables,
                             cfg->messages ? cfg->message_prefix : NULL, cfg->t.subject, err,
                             errlen);
}

int outbox_mapper_new_table(OutboxMapper **out, const char *table, const char *subject_template,
                            char *err, size_t errlen)
{
    TableConfig tc = {.table = (char *)table, .subject = (char *)subject_template};
    return outbox_mapper_new(out, &tc, 1, NULL, NULL, err, errlen);
}

static void binding_clear(Binding *b)
{
    free(b->tmpl_col);
    b->tmpl_col = NULL;
    for (uint16_t i = 0; b->json_names && i < b->ncols; i++)
        free(b->json_names[i]);
    free(b->json_names);
    free(b->types);
    b->json_names = NULL;
    b->types = NULL;
    b->ncols = 0;
}

void outbox_mapper_free(OutboxMapper *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->nbindings; i++)
        binding_clear(&m->bindings[i]);
    free(m->bindings);
    for (size_t i = 0; i < m->nspecs; i++)
        spec_deinit(&m->specs[i]);
    free(m->specs);
    free(m->tmpl_values);
    subject_template_free(m->msg_tmpl);
    free(m->msg_prefix);
    free(m->msg_label);
    buf_deinit(&m->scratch);
    buf_deinit(&m->scratch_body);
    free(m);
}

size_t outbox_mapper_ntables(const OutboxMapper *m)
{
    return m->nspecs;
}

const char *outbox_mapper_schema(const OutboxMapper *m, size_t i)
{
    return m->specs[i].schema;
}

const char *outbox_mapper_table(const OutboxMapper *m, size_t i)
{
    return m->specs[i].table;
}

const char *outbox_mapper_qualified(const OutboxMapper *m, size_t i)
{
    return m->specs[i].qualified;
}

void outbox_mapper_set_source(OutboxMapper *m, const char *source)
{
    snprintf(m->source, sizeof(m->source), "%s", source);
    m->source_len = strlen(m->source);
}

const char *outbox_mapper_source(const OutboxMapper *m)
{
    return m->source;
}

void outbox_mapper_describe_tables(const OutboxMapper *m, char *out, size_t n)
{
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < m->nspecs && used < n; i++) {
        int w = snprintf(out + used, n - used, "%s%s", i ? ", " : "", m->specs[i].qualified);
        if (w < 0)
            break;
        used += (size_t)w;
    }
}

const char *outbox_mapper_role_column(const OutboxMapper *m, size_t i, int role)
{
    return m->specs[i].role_col[role];
}

static int find_name(const char *const *names, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return (int)i;
    return -1;
}

int outbox_mapper_check_columns(const OutboxMapper *m, size_t i, const char *const *names,
                                size_t n, char *err, size_t errlen)
{
    const TableSpec *t = &m->specs[i];
    static const int required[] = {ROLE_EVENT_ID, ROLE_PAYLOAD};
    for (size_t k = 0; k < ARRAY_SIZE(required); k++) {
        const char *col = t->role_col[required[k]];
        if (!col || find_name(names, n, col) < 0) {
            char flag[CONFIG_ROLE_FLAG_MAX];
            config_role_flag(required[k], flag);
            snprintf(err, errlen, "outbox table %s has no column \"%s\" for the %s: add it, or "
                                  "name the column that holds it with %s",
                     t->qualified, col ? col : config_role_names[required[k]],
                     config_role_names[required[k]], flag);
            return -1;
        }
    }
    for (size_t k = 0; k < subject_template_ncolumns(t->tmpl); k++) {
        if (find_name(names, n, t->tmpl_cols[k]) < 0) {
            snprintf(err, errlen, "subject template names column \"%s\", which %s does not have",
                     t->tmpl_cols[k], t->qualified);
            return -1;
        }
    }
    for (size_t k = 0; k < t->nextra; k++) {
        if (find_name(names, n, t->extra[k].column) < 0) {
            snprintf(err, errlen, "--header names column \"%s\", which %s does not have",
                     t->extra[k].column, t->qualified);
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

static void append_json_string(Buf *b, const char *p, size_t n);

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
    binding_clear(b);
    b->spec = -1;
    for (size_t i = 0; i < m->nspecs; i++)
        if (strcmp(rel->u.relation.nspname, m->specs[i].schema) == 0 &&
            strcmp(rel->u.relation.relname, m->specs[i].table) == 0)
            b->spec = (int)i;
    if (b->spec < 0)
        return 0;
    const TableSpec *t = &m->specs[b->spec];

    uint16_t ncols = rel->u.relation.ncols;
    const char *names[PGO_MAX_COLUMNS];
    for (uint16_t i = 0; i < ncols; i++)
        names[i] = rel->cols[i].name;
    if (outbox_mapper_check_columns(m, (size_t)b->spec, names, ncols, err, errlen) < 0) {
        b->spec = -1; /* an insert into it now fails loudly as an unknown relation */
        return -1;
    }
    for (int r = 0; r < CONFIG_NROLES; r++) {
        b->col[r] = t->role_col[r] ? find_name(names, ncols, t->role_col[r]) : -1;
        b->col_type[r] = b->col[r] >= 0 ? rel->cols[b->col[r]].type_oid : 0;
    }
    size_t nt = subject_template_ncolumns(t->tmpl);
    b->tmpl_col = xcalloc(nt + 1, sizeof(int));
    for (size_t k = 0; k < nt; k++)
        b->tmpl_col[k] = find_name(names, ncols, t->tmpl_cols[k]);
    for (size_t k = 0; k < t->nextra; k++) {
        b->extra_col[k] = find_name(names, ncols, t->extra[k].column);
        b->extra_type[k] = rel->cols[b->extra_col[k]].type_oid;
    }
    if (t->envelope) {
        b->ncols = ncols;
        b->json_names = xcalloc(ncols, sizeof(char *));
        b->types = xcalloc(ncols, sizeof(uint32_t));
        for (uint16_t i = 0; i < ncols; i++) {
            Buf q;
            buf_init(&q);
            append_json_string(&q, names[i], strlen(names[i]));
            b->json_names[i] = q.data;
            b->types[i] = rel->cols[i].type_oid;
        }
    }
    return 0;
}

bool outbox_mapper_is_outbox(const OutboxMapper *m, uint32_t relid)
{
    for (size_t i = 0; i < m->nbindings; i++)
        if (m->bindings[i].relid == relid)
            return m->bindings[i].spec >= 0;
    return false;
}

bool outbox_mapper_wants_message(const OutboxMapper *m, const PgoMessage *msg)
{
    return m->msg_prefix && strcmp(msg->u.message.prefix, m->msg_prefix) == 0;
}

const char *outbox_mapper_message_label(const OutboxMapper *m)
{
    return m->msg_label ? m->msg_label : "";
}

static const char hexdigits[] = "0123456789ABCDEF";

/* Header values travel in a text protocol: control bytes (CR and LF above all) would end the
 * header early, so they are written as %XX. Everything else is kept byte for byte. */
static bool header_byte_ok(unsigned char c)
{
    return c >= 0x20 && c != 0x7f;
}

/* How many bytes from p on need no escaping. Eight at a time: a word has a byte below 0x20
 * when (x - 0x20..) & ~x has a high bit set, and a 0x7f when x ^ 0x7f.. has a zero byte. */
static size_t clean_run(const char *p, size_t n)
{
    const uint64_t ones = UINT64_C(0x0101010101010101), highs = UINT64_C(0x8080808080808080);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, p + i, 8);
        uint64_t del = x ^ (ones * 0x7f);
        if ((((x - ones * 0x20) & ~x) | ((del - ones) & ~del)) & highs)
            break;
    }
    while (i < n && header_byte_ok((unsigned char)p[i]))
        i++;
    return i;
}

static void append_header_value(Buf *b, const char *p, size_t n)
{
    /* Values are almost always clean: copy runs of ordinary bytes in one go. */
    for (;;) {
        size_t run = clean_run(p, n);
        buf_append(b, p, run);
        if (run == n)
            return;
        unsigned char c = (unsigned char)p[run];
        char esc[3] = {'%', hexdigits[c >> 4], hexdigits[c & 15]};
        buf_append(b, esc, 3);
        p += run + 1;
        n -= run + 1;
    }
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



/* Starts header name: its value is what goes into hvals until end_header(). */
static void begin_header(OutboxEvent *ev, const char *name)
{
    OutboxHeader *h = &ev->headers[ev->nheaders++];
    h->name = name;
    h->off = ev->hvals.len;
    h->len = 0;
}

static void end_header(OutboxEvent *ev)
{
    OutboxHeader *h = &ev->headers[ev->nheaders - 1];
    h->len = ev->hvals.len - h->off;
    buf_putc(&ev->hvals, '\0');
}

void outbox_event_add_header(OutboxEvent *ev, const char *name, const char *value, size_t len)
{
    begin_header(ev, name);
    buf_append(&ev->hvals, value, len);
    end_header(ev);
}

const char *outbox_event_set_header(OutboxEvent *ev, const char *name, const char *value,
                                    size_t len)
{
    for (size_t i = 0; i < ev->nheaders; i++) {
        OutboxHeader *h = &ev->headers[i];
        if (strcmp(h->name, name) == 0) {
            h->off = ev->hvals.len; /* the old value stays behind, unused */
            h->len = len;
            buf_append(&ev->hvals, value, len);
            buf_putc(&ev->hvals, '\0');
            return ev->hvals.data + h->off;
        }
    }
    outbox_event_add_header(ev, name, value, len);
    return ev->hvals.data + ev->headers[ev->nheaders - 1].off;
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

/* Appends p[0..n) as a JSON string. PostgreSQL sends text as UTF-8 (outboxd's sessions ask
 * for it), so only quotes, backslashes and control bytes need escaping. */
static void append_json_string(Buf *b, const char *p, size_t n)
{
    buf_putc(b, '"');
    size_t start = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        buf_append(b, p + start, i - start);
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_append(b, esc, 2);
        } else {
            char esc[6] = {'\\', 'u', '0', '0', hexdigits[c >> 4], hexdigits[c & 15]};
            buf_append(b, esc, 6);
        }
        start = i + 1;
    }
    buf_append(b, p + start, n - start);
    buf_putc(b, '"');
}

/* True for the text of a JSON number (PostgreSQL's numeric may also say NaN or Infinity). */
static bool json_number_text(const char *p, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((p[i] >= '0' && p[i] <= '9') || p[i] == '-' || p[i] == '+' || p[i] == '.' ||
              p[i] == 'e' || p[i] == 'E'))
            return false;
    return p[0] != '+' && p[0] != '.' && p[n - 1] != '.';
}

/* The whole row as one JSON object, columns in table order: json and jsonb embedded as they
 * are, booleans and numbers as JSON ones, NULL as null, everything else (bytea in PostgreSQL's
 * hex form) as a string. */
static void envelope_body(const Binding *b, const PgoMessage *ins, Buf *out)
{
    buf_reset(out);
    buf_putc(out, '{');
    uint16_t n = ins->u.insert.ncols < b->ncols ? ins->u.insert.ncols : b->ncols;
    for (uint16_t i = 0; i < n; i++) {
        const PgoValue *v = &ins->values[i];
        if (i > 0)
            buf_putc(out, ',');
        buf_puts(out, b->json_names[i]);
        buf_putc(out, ':');
        if (v->kind != 't' && v->kind != 'b') {
            buf_puts(out, "null");
            continue;
        }
        switch (b->types[i]) {
        case OID_JSON:
        case OID_JSONB:
            buf_append(out, v->data, v->len);
            break;
        case OID_BOOL:
            buf_puts(out, v->len == 1 && v->data[0] == 't' ? "true" : "false");
            break;
        case OID_INT2:
        case OID_INT4:
        case OID_INT8:
        case OID_OID:
        case OID_FLOAT4:
        case OID_FLOAT8:
        case OID_NUMERIC:
            if (json_number_text(v->data, v->len))
                buf_append(out, v->data, v->len);
            else /* NaN, Infinity */
                append_json_string(out, v->data, v->len);
            break;
        default:
            append_json_string(out, v->data, v->len);
        }
    }
    buf_putc(out, '}');
}

/* Expands a template over the values of its placeholders in cols (indexes into the row). */
static void expand_row_subject(OutboxMapper *m, const SubjectTemplate *tmpl, const int *cols,
                               const PgoMessage *ins, Buf *out)
{
    size_t nt = subject_template_ncolumns(tmpl);
    uint16_t ncols = ins->u.insert.ncols;
    for (size_t t = 0; t < nt; t++) {
        int c = cols[t];
        const PgoValue *tv = c >= 0 && c < ncols ? &ins->values[c] : NULL;
        bool present = tv && (tv->kind == 't' || tv->kind == 'b');
        m->tmpl_values[t].data = present ? tv->data : NULL;
        m->tmpl_values[t].len = present ? tv->len : 0;
    }
    buf_reset(out);
    subject_template_expand(tmpl, m->tmpl_values, out);
}

/* Adds one header value, written as it goes into a header: timestamps in RFC 3339. */
static void put_header(OutboxEvent *ev, const char *name, const char *p, size_t n,
                       uint32_t type)
{
    /* No header for an empty value: libnats up to 3.9 reads "Key: \r\n" as taking the next
     * header line for its value, so consumers would misread the rest. */
    if (!p || n == 0)
        return;
    begin_header(ev, name);
    if (type == OID_TIMESTAMPTZ)
        append_timestamptz(&ev->hvals, p, n);
    else
        append_header_value(&ev->hvals, p, n);
    end_header(ev);
}

/* The headers every event carries after its own: the commit LSN and time. */
static void put_txn_headers(OutboxMapper *m, const OutboxTxn *txn, OutboxEvent *ev)
{
    /* Every event of a transaction shares these two: format them once per transaction. */
    if (txn->commit_lsn != m->txn_lsn || txn->commit_time != m->txn_time ||
        txn->timeline != m->txn_tli || !m->txn_text[0][0]) {
        m->txn_lsn = txn->commit_lsn;
        m->txn_time = txn->commit_time;
        m->txn_tli = txn->timeline;
        lsn_format(txn->commit_lsn, m->txn_text[0]);
        pg_time_format_rfc3339(txn->commit_time, m->txn_text[1]);
        m->txn_pos_len = (size_t)snprintf(m->txn_pos, sizeof(m->txn_pos), "%u %s ",
                                          txn->timeline, m->txn_text[0]);
    }
    outbox_event_add_header(ev, OUTBOX_HDR_COMMIT_LSN, m->txn_text[0], strlen(m->txn_text[0]));
    outbox_event_add_header(ev, OUTBOX_HDR_COMMIT_TIME, m->txn_text[1], strlen(m->txn_text[1]));
    /* The position: the transaction's part, then the index, without printf per event. */
    char pos[OUTBOX_POSITION_MAX], digits[12], *d = digits + sizeof(digits);
    uint32_t i = txn->index;
    do
        *--d = (char)('0' + i % 10);
    while ((i /= 10) != 0);
    size_t nd = (size_t)(digits + sizeof(digits) - d);
    memcpy(pos, m->txn_pos, m->txn_pos_len);
    memcpy(pos + m->txn_pos_len, d, nd);
    outbox_event_add_header(ev, OUTBOX_HDR_POSITION, pos, m->txn_pos_len + nd);
    if (m->source_len)
        outbox_event_add_header(ev, OUTBOX_HDR_SOURCE, m->source, m->source_len);
    ev->commit_lsn = txn->commit_lsn;
    ev->commit_time = txn->commit_time;
}

/* Starts an event's headers with its Nats-Msg-Id; -1 when id cannot be one. */
static int put_msg_id(OutboxEvent *ev, const char *id, size_t n, const char *what, char *err,
                      size_t errlen)
{
    if (!id) {
        snprintf(err, errlen, "%s is null", what);
        return -1;
    }
    if (!valid_msg_id(id, n)) {
        snprintf(err, errlen,
                 "%s is not usable as a Nats-Msg-Id (it must be 1 to %d printable ASCII "
                 "characters without spaces)",
                 what, OUTBOX_MAX_EVENT_ID);
        return -1;
    }
    ev->nheaders = 0;
    buf_reset(&ev->hvals);
    outbox_event_add_header(ev, OUTBOX_HDR_MSG_ID, id, n);
    return 0;
}

static OutboxReject check_subject_len(const OutboxEvent *ev, char *err, size_t errlen)
{
    if (ev->subject.len <= OUTBOX_MAX_SUBJECT)
        return OUTBOX_OK;
    snprintf(err, errlen, "the subject is %zu bytes long, more than the %d a NATS publish allows for it",
             ev->subject.len, OUTBOX_MAX_SUBJECT);
    return OUTBOX_INVALID_SUBJECT;
}

OutboxReject outbox_map_insert(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                               OutboxEvent *ev, char *err, size_t errlen)
{
    const Binding *b = binding_for(m, ins->u.insert.relid);
    if (!b || b->spec < 0) {
        snprintf(err, errlen, "insert into relation %u, which is not a known outbox table",
                 ins->u.insert.relid);
        return OUTBOX_UNKNOWN_RELATION;
    }
    const TableSpec *t = &m->specs[b->spec];
    const PgoValue *v = ins->values;
    uint16_t ncols = ins->u.insert.ncols;
#define VAL(c) ((c) >= 0 && (c) < ncols && (v[c].kind == 't' || v[c].kind == 'b') ? &v[c] : NULL)

    const PgoValue *id = VAL(b->col[ROLE_EVENT_ID]);
    if (put_msg_id(ev, id ? id->data : NULL, id ? id->len : 0, t->role_col[ROLE_EVENT_ID], err,
                   errlen) < 0)
        return OUTBOX_INVALID_EVENT_ID;
    const PgoValue *payload = VAL(b->col[ROLE_PAYLOAD]);
    if (!payload) {
        snprintf(err, errlen, "%s is null", t->role_col[ROLE_PAYLOAD]);
        return OUTBOX_NULL_PAYLOAD;
    }
    if (t->envelope) {
        envelope_body(b, ins, &ev->body_buf);
        ev->body = ev->body_buf.data;
        ev->body_len = ev->body_buf.len;
    } else if (b->col_type[ROLE_PAYLOAD] == OID_BYTEA) {
        if (!bytea_hex_decode(payload->data, payload->len, &ev->body_buf)) {
            snprintf(err, errlen, "%s is bytea but not in hex format", t->role_col[ROLE_PAYLOAD]);
            return OUTBOX_NULL_PAYLOAD;
        }
        ev->body = ev->body_buf.data;
        ev->body_len = ev->body_buf.len;
    } else {
        ev->body = payload->data;
        ev->body_len = payload->len;
    }

    for (size_t i = 0; i < ARRAY_SIZE(role_headers); i++) {
        int r = role_headers[i].role;
        const PgoValue *cv = VAL(b->col[r]);
        if (cv)
            put_header(ev, role_headers[i].header, cv->data, cv->len, b->col_type[r]);
    }
    for (size_t k = 0; k < t->nextra; k++) {
        const PgoValue *cv = VAL(b->extra_col[k]);
        if (cv)
            put_header(ev, t->extra[k].header, cv->data, cv->len, b->extra_type[k]);
    }
    put_txn_headers(m, txn, ev);
    ev->msg_id = ev->hvals.data;
#undef VAL
    expand_row_subject(m, t->tmpl, b->tmpl_col, ins, &ev->subject);
    return check_subject_len(ev, err, errlen);
}

void outbox_describe_row(OutboxMapper *m, const PgoMessage *ins, const OutboxTxn *txn,
                         uint32_t index, DeadLetter *dl)
{
    memset(dl, 0, sizeof(*dl));
    dl->commit_lsn = txn->commit_lsn;
    dl->commit_time = txn->commit_time;
    dl->index = index;
    const Binding *b = binding_for(m, ins->u.insert.relid);
    if (!b || b->spec < 0)
        return;
    const TableSpec *t = &m->specs[b->spec];
    dl->table = t->qualified;
    uint16_t ncols = ins->u.insert.ncols;
    int c = b->col[ROLE_EVENT_ID];
    if (c >= 0 && c < ncols && ins->values[c].data) {
        dl->event_id = ins->values[c].data;
        dl->event_id_len = ins->values[c].len;
    }
    c = b->col[ROLE_PAYLOAD];
    if (c >= 0 && c < ncols && ins->values[c].data) {
        dl->body = ins->values[c].data;
        dl->body_len = ins->values[c].len;
        /* A bytea payload travels as its bytes, as it would have in the event; one that is
         * not valid hex stays as the text PostgreSQL sent. */
        if (b->col_type[ROLE_PAYLOAD] == OID_BYTEA &&
            bytea_hex_decode(dl->body, dl->body_len, &m->scratch_body)) {
            dl->body = m->scratch_body.data ? m->scratch_body.data : "";
            dl->body_len = m->scratch_body.len;
        }
    }
    expand_row_subject(m, t->tmpl, b->tmpl_col, ins, &m->scratch);
    dl->subject = m->scratch.data;
}

/* ---- table-less events: logical decoding messages ---- */

static size_t json_ws(const char *p, size_t i, size_t n)
{
    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r'))
        i++;
    return i;
}

/* The index just past the JSON value at p[i]. The text must be valid JSON (jansson read it). */
static size_t json_skip(const char *p, size_t i, size_t n)
{
    int depth = 0;
    do {
        if (p[i] == '"') {
            for (i++; i < n && p[i] != '"'; i++)
                if (p[i] == '\\')
                    i++;
            i++;
        } else if (p[i] == '{' || p[i] == '[') {
            depth++;
            i++;
        } else if (p[i] == '}' || p[i] == ']') {
            depth--;
            i++;
        } else if (depth > 0) {
            i++;
        } else {
            while (i < n && !strchr(",}] \t\r\n", p[i]))
                i++;
        }
    } while (depth > 0 && i < n);
    return i;
}

/* Finds the text of member key of the JSON object in p[0..n), exactly as written. */
static bool json_member_text(const char *p, size_t n, const char *key, const char **val,
                             size_t *vlen)
{
    size_t klen = strlen(key);
    size_t i = json_ws(p, 0, n);
    if (i >= n || p[i] != '{')
        return false;
    for (i = json_ws(p, i + 1, n); i < n && p[i] == '"';) {
        size_t ks = i + 1;
        i = json_skip(p, i, n);
        size_t ke = i - 1;
        i = json_ws(p, i, n);
        if (i >= n || p[i] != ':')
            return false;
        i = json_ws(p, i + 1, n);
        size_t vs = i;
        i = json_skip(p, i, n);
        if (ke - ks == klen && memcmp(p + ks, key, klen) == 0) {
            *val = p + vs;
            *vlen = i - vs;
            return true;
        }
        i = json_ws(p, i, n);
        if (i < n && p[i] == ',')
            i = json_ws(p, i + 1, n);
    }
    return false;
}

/* A field of the envelope as text: a string's value, or a number's or boolean's JSON text.
 * NULL when absent, null, an object or an array. */
static const char *envelope_field(json_t *env, const char *content, size_t len, const char *key,
                                  size_t *n)
{
    json_t *v = json_object_get(env, key);
    if (json_is_string(v)) {
        *n = json_string_length(v);
        return json_string_value(v);
    }
    const char *text;
    if ((json_is_number(v) || json_is_boolean(v)) && json_member_text(content, len, key, &text, n))
        return text;
    *n = 0;
    return NULL;
}

OutboxReject outbox_map_message(OutboxMapper *m, const PgoMessage *msg, const OutboxTxn *txn,
                                OutboxEvent *ev, char *err, size_t errlen)
{
    const char *content = msg->u.message.content;
    size_t len = msg->u.message.len;
    json_error_t jerr;
    /* Integers as reals: a payload may hold numbers wider than 64 bits, and only its text is
     * used. */
    json_t *env = json_loadb(content ? content : "", len, JSON_DECODE_INT_AS_REAL, &jerr);
    OutboxReject rej = OUTBOX_INVALID_ENVELOPE;
    if (!env || !json_is_object(env)) {
        snprintf(err, errlen, "the message is not a JSON object%s%s", env ? "" : ": ",
                 env ? "" : jerr.text);
        goto done;
    }
    json_t *idv = json_object_get(env, "event_id"); /* a string: numbers are not ids */
    size_t n = json_string_length(idv);
    if (put_msg_id(ev, json_string_value(idv), n, "event_id", err, errlen) < 0) {
        rej = OUTBOX_INVALID_EVENT_ID;
        goto done;
    }
    const char *body;
    size_t body_len;
    if (!json_member_text(content, len, "payload", &body, &body_len) ||
        json_is_null(json_object_get(env, "payload"))) {
        snprintf(err, errlen, "the message has no \"payload\" field");
        rej = OUTBOX_NULL_PAYLOAD;
        goto done;
    }
    ev->body = body;
    ev->body_len = body_len;
    for (size_t i = 0; i < ARRAY_SIZE(role_headers); i++) {
        const char *v = envelope_field(env, content, len, config_role_names[role_headers[i].role],
                                       &n);
        put_header(ev, role_headers[i].header, v, n,
                   role_headers[i].role == ROLE_OCCURRED_AT ? OID_TIMESTAMPTZ : 0);
    }
    json_t *headers = json_object_get(env, "headers");
    if (headers && !json_is_null(headers)) {
        const char *name;
        json_t *hv;
        bool ok = json_is_object(headers) && json_object_size(headers) <= MAX_EXTRA_HEADERS;
        json_object_foreach(headers, name, hv)
        {
            if (!ok || !json_is_string(hv) || !config_header_name_ok(name, strlen(name)) ||
                config_header_name_reserved(name, strlen(name))) {
                snprintf(err, errlen, "\"headers\" must map at most %d names (letters, digits, "
                                      "'-', '_'; not Nats-* or Outbox-*) to strings",
                         MAX_EXTRA_HEADERS);
                goto done;
            }
        }
        size_t k = 0;
        json_object_foreach(headers, name, hv)
        {
            /* The names must outlive env: the event keeps copies. */
            snprintf(ev->names[k], sizeof ev->names[k], "%s", name);
            put_header(ev, ev->names[k++], json_string_value(hv), json_string_length(hv), 0);
        }
    }
    put_txn_headers(m, txn, ev);
    ev->msg_id = ev->hvals.data;
    /* Placeholders name fields of the envelope. */
    size_t nt = subject_template_ncolumns(m->msg_tmpl);
    for (size_t t = 0; t < nt; t++)
        m->tmpl_values[t].data = envelope_field(env, content, len,
                                                subject_template_column(m->msg_tmpl, t),
                                                &m->tmpl_values[t].len);
    buf_reset(&ev->subject);
    subject_template_expand(m->msg_tmpl, m->tmpl_values, &ev->subject);
    rej = check_subject_len(ev, err, errlen);
done:
    json_decref(env);
    return rej;
}

void outbox_describe_message(OutboxMapper *m, const PgoMessage *msg, const OutboxTxn *txn,
                             uint32_t index, DeadLetter *dl)
{
    memset(dl, 0, sizeof(*dl));
    dl->table = outbox_mapper_message_label(m);
    dl->commit_lsn = txn->commit_lsn;
    dl->commit_time = txn->commit_time;
    dl->index = index;
    dl->body = msg->u.message.content ? msg->u.message.content : "";
    dl->body_len = msg->u.message.len;
    /* The event id as written, when it is a plain string. */
    const char *id;
    size_t n;
    if (json_member_text(dl->body, dl->body_len, "event_id", &id, &n) && n >= 2 && id[0] == '"' &&
        !memchr(id, '\\', n)) {
        dl->event_id = id + 1;
        dl->event_id_len = n - 2;
    }
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
    begin_header(out, OUTBOX_HDR_MSG_ID);
    if (dl->event_id && valid_msg_id(dl->event_id, dl->event_id_len)) {
        buf_puts(&out->hvals, "dlq-");
        buf_append(&out->hvals, dl->event_id, dl->event_id_len);
    } else {
        buf_printf(&out->hvals, "dlq-%X-%X-%u", LSN_ARGS(dl->commit_lsn), dl->index);
    }
    end_header(out);
    put_header(out, OUTBOX_HDR_DL_REASON, dl->reason, dl->reason ? strlen(dl->reason) : 0, 0);
    put_header(out, OUTBOX_HDR_DL_DETAIL, dl->detail, dl->detail ? strlen(dl->detail) : 0, 0);
    put_header(out, OUTBOX_HDR_ORIGINAL_SUBJECT, dl->subject,
               dl->subject ? strlen(dl->subject) : 0, 0);
    put_header(out, OUTBOX_HDR_EVENT_ID, dl->event_id, dl->event_id_len, 0);
    put_header(out, OUTBOX_HDR_TABLE, dl->table, dl->table ? strlen(dl->table) : 0, 0);
    put_header(out, OUTBOX_HDR_COMMIT_LSN, lsn, strlen(lsn), 0);
    put_header(out, OUTBOX_HDR_COMMIT_TIME, when, strlen(when), 0);
    char pos[OUTBOX_POSITION_MAX];
    if (dl->position)
        snprintf(pos, sizeof(pos), "%s", dl->position);
    else
        outbox_position_format(
            &(OutboxPosition){.timeline = dl->timeline, .lsn = dl->commit_lsn, .index = dl->index},
            pos);
    put_header(out, OUTBOX_HDR_POSITION, pos, strlen(pos), 0);
    put_header(out, OUTBOX_HDR_SOURCE, dl->source, dl->source ? strlen(dl->source) : 0, 0);
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

void outbox_position_format(const OutboxPosition *pos, char out[static OUTBOX_POSITION_MAX])
{
    char lsn[18];
    snprintf(out, OUTBOX_POSITION_MAX, "%u %s %u", pos->timeline, lsn_format(pos->lsn, lsn),
             pos->index);
}

bool outbox_position_parse(const char *s, OutboxPosition *pos)
{
    char lsn[24];
    unsigned long tl, index;
    int n = 0;
    if (sscanf(s, "%lu %23s %lu%n", &tl, lsn, &index, &n) != 3 || s[n] != '\0' ||
        tl > UINT32_MAX || index > UINT32_MAX || !isdigit((unsigned char)s[0]))
        return false;
    OutboxPosition p = {.timeline = (uint32_t)tl, .index = (uint32_t)index};
    if (!lsn_parse(lsn, &p.lsn))
        return false;
    *pos = p;
    return true;
}

int outbox_position_cmp(const OutboxPosition *a, const OutboxPosition *b)
{
    if (a->lsn != b->lsn)
        return a->lsn < b->lsn ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index ? 1 : 0;
}
