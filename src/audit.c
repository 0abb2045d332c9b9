/*
 * audit.c - `outboxd audit`: the comparison of the outbox rows of a range with the stream.
 *
 * The pure part (this half of the file) keeps the stream side as 16 bytes per message: a
 * 64-bit hash of the event id the message stands for, and its sequence with four flag bits.
 * Sorted by hash, it answers "which messages stand for this row" with a binary search, so the
 * table side is looked up row by row as it is fetched and never held. The order check runs
 * while the stream is read: per (Outbox-Source, timeline) it keeps the highest position seen;
 * an event whose position is lower was stored after an event committed later, and is recorded
 * as a break. Breaks on later copies of a duplicate are dropped once duplicates are known
 * (a copy stored again is a duplicate, not an order problem).
 *
 * The I/O half (audit_run) is at the end: a read-only snapshot on the database, a headers-only
 * ephemeral pull consumer on the stream.
 */
#include "outboxd/audit.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <nats/nats.h>

#include "outboxd/jetstream.h"
#include "outboxd/pgstream.h"
#include "outboxd/relay.h"
#include "outboxd/util.h"

/* Entry.word: the sequence above 8 bits of flags. */
#define E_KIND 3u     /* AuditKind */
#define E_IN_RANGE 4u
#define E_MATCHED 8u  /* a row read (in the range or its margin) has this id */
#define E_DUP 16u     /* a later copy of an event already stored */
#define E_SEQ_SHIFT 8

typedef struct Entry {
    uint64_t hash;
    uint64_t word;
} Entry;

typedef struct Group {
    char *source;
    uint32_t timeline;
    OutboxPosition max; /* the highest position stored so far */
    uint64_t max_seq;
} Group;

typedef struct BreakRec {
    uint64_t seq, prev_seq, hash;
    OutboxPosition pos, prev_pos;
} BreakRec;

struct Audit {
    AuditRange range;
    Entry *e;
    size_t n, cap;
    Group *groups;
    size_t ngroups;
    BreakRec *br;
    size_t nbr, brcap;
    bool sorted;
    AuditReport rep;
};

static inline uint64_t e_seq(const Entry *e)
{
    return e->word >> E_SEQ_SHIFT;
}

static inline AuditKind e_kind(const Entry *e)
{
    return (AuditKind)(e->word & E_KIND);
}

/* A row's copy that is not a replay: the relay's event or its dead letter. */
static inline bool e_stands(const Entry *e)
{
    return e_kind(e) == AUDIT_EVENT || e_kind(e) == AUDIT_DEAD_LETTER;
}

/* FNV-1a, then splitmix64's finaliser to spread ids that differ in a few bytes. */
static uint64_t id_hash(const char *s, size_t n)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= UINT64_C(1099511628211);
    }
    h ^= h >> 30;
    h *= UINT64_C(0xbf58476d1ce4e5b9);
    h ^= h >> 27;
    h *= UINT64_C(0x94d049bb133111eb);
    h ^= h >> 31;
    return h;
}

void audit_msg_from_headers(AuditMsg *m, uint64_t seq, int64_t stored_us, const AuditHeaders *h,
                            const AuditRange *range)
{
    memset(m, 0, sizeof(*m));
    m->seq = seq;
    m->source = h->source ? h->source : "";
    if (h->replay) {
        m->kind = AUDIT_REPLAY;
        m->id = h->event_id ? h->event_id : h->msg_id; /* --new-ids names the row's id */
    } else if (h->dead_letter) {
        m->kind = AUDIT_DEAD_LETTER;
        m->id = h->event_id; /* NULL when the row's event id was null */
    } else {
        m->kind = AUDIT_EVENT;
        m->id = h->msg_id;
    }
    if (!m->id || !*m->id) {
        m->kind = AUDIT_FOREIGN;
        m->id = NULL;
    }
    int64_t t = stored_us;
    if (h->commit_time)
        time_parse_rfc3339(h->commit_time, strlen(h->commit_time), &t);
    m->in_range = t >= range->since && t < range->until;
    m->has_position = m->kind != AUDIT_REPLAY && m->kind != AUDIT_FOREIGN && h->position &&
                      outbox_position_parse(h->position, &m->pos) && m->pos.lsn != 0;
}

void audit_new(Audit **out, const AuditRange *range)
{
    Audit *a = xcalloc(1, sizeof(*a));
    a->range = *range;
    *out = a;
}

void audit_free(Audit *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < a->ngroups; i++)
        free(a->groups[i].source);
    free(a->groups);
    free(a->e);
    free(a->br);
    free(a);
}

static Group *group_of(Audit *a, const char *source, uint32_t timeline)
{
    for (size_t i = 0; i < a->ngroups; i++)
        if (a->groups[i].timeline == timeline && strcmp(a->groups[i].source, source) == 0)
            return &a->groups[i];
    a->groups = xrealloc(a->groups, (a->ngroups + 1) * sizeof(Group));
    Group *g = &a->groups[a->ngroups++];
    *g = (Group){.source = xstrdup(source), .timeline = timeline};
    return g;
}

void audit_add_msg(Audit *a, const AuditMsg *m)
{
    a->rep.messages++;
    if (m->kind == AUDIT_FOREIGN) {
        a->rep.foreign++;
        return;
    }
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 4096;
        a->e = xrealloc(a->e, a->cap * sizeof(Entry));
    }
    uint64_t hash = id_hash(m->id, strlen(m->id));
    a->e[a->n++] = (Entry){.hash = hash,
                           .word = m->seq << E_SEQ_SHIFT | (uint64_t)m->kind |
                                   (m->in_range ? E_IN_RANGE : 0)};
    if (m->kind == AUDIT_REPLAY || !m->in_range)
        return;
    a->rep.events_in_range++;
    if (!m->has_position) {
        a->rep.unpositioned++;
        return;
    }
    Group *g = group_of(a, m->source, m->pos.timeline);
    if (g->max_seq == 0 || outbox_position_cmp(&m->pos, &g->max) > 0) {
        g->max = m->pos;
        g->max_seq = m->seq;
        return;
    }
    if (outbox_position_cmp(&m->pos, &g->max) == 0)
        return; /* the same event again: a duplicate, counted as such */
    if (a->nbr == a->brcap) {
        a->brcap = a->brcap ? a->brcap * 2 : 64;
        a->br = xrealloc(a->br, a->brcap * sizeof(BreakRec));
    }
    a->br[a->nbr++] = (BreakRec){.seq = m->seq, .prev_seq = g->max_seq, .hash = hash,
                                 .pos = m->pos, .prev_pos = g->max};
}

static inline bool entry_less(const Entry *a, const Entry *b)
{
    return a->hash != b->hash ? a->hash < b->hash : a->word < b->word;
}

static inline void entry_swap(Entry *a, Entry *b)
{
    Entry t = *a;
    *a = *b;
    *b = t;
}

/* Sorts by (hash, sequence) in place: glibc's qsort() takes a merge buffer as large as the
 * array (another 16 MB per million messages). Quicksort on random hashes, recursing into the
 * smaller part (stack depth log n), insertion sort below 16. */
static void sort_entries(Entry *e, size_t n)
{
    while (n > 16) {
        Entry *mid = e + n / 2, *last = e + n - 1;
        if (entry_less(mid, e))
            entry_swap(mid, e);
        if (entry_less(last, mid)) {
            entry_swap(last, mid);
            if (entry_less(mid, e))
                entry_swap(mid, e);
        }
        Entry pivot = *mid;
        size_t i = 0, j = n - 1;
        for (;;) {
            while (entry_less(&e[i], &pivot))
                i++;
            while (entry_less(&pivot, &e[j]))
                j--;
            if (i >= j)
                break;
            entry_swap(&e[i++], &e[j--]);
        }
        /* [0, j] <= pivot <= [j + 1, n) */
        size_t left = j + 1;
        if (left < n - left) {
            sort_entries(e, left);
            e += left;
            n -= left;
        } else {
            sort_entries(e + left, n - left);
            n = left;
        }
    }
    for (size_t i = 1; i < n; i++)
        for (size_t k = i; k > 0 && entry_less(&e[k], &e[k - 1]); k--)
            entry_swap(&e[k], &e[k - 1]);
}

/* The index of the first entry with hash h, or a->n. */
static size_t lower_bound(const Audit *a, uint64_t h)
{
    size_t lo = 0, hi = a->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a->e[mid].hash < h)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

void audit_stream_done(Audit *a)
{
    sort_entries(a->e, a->n);
    a->sorted = true;
    /* Within one hash, by sequence: every copy after the first that is not a replay is a
     * duplicate candidate, when one of them is in the range. */
    for (size_t i = 0; i < a->n;) {
        size_t j = i;
        bool in_range = false;
        size_t stands = 0;
        for (; j < a->n && a->e[j].hash == a->e[i].hash; j++) {
            if (e_stands(&a->e[j])) {
                stands++;
                in_range |= (a->e[j].word & E_IN_RANGE) != 0;
            }
        }
        if (stands > 1 && in_range) {
            bool first = true;
            for (size_t k = i; k < j; k++) {
                if (!e_stands(&a->e[k]))
                    continue;
                if (!first)
                    a->e[k].word |= E_DUP;
                first = false;
            }
        }
        i = j;
    }
}

int audit_verify_duplicates(Audit *a, AuditFetch fetch, void *arg)
{
    char (*ids)[OUTBOX_MAX_EVENT_ID + 1] = NULL;
    size_t idcap = 0;
    int rc = 0;
    for (size_t i = 0; i < a->n && rc == 0;) {
        size_t j = i;
        bool dup = false;
        for (; j < a->n && a->e[j].hash == a->e[i].hash; j++)
            dup |= (a->e[j].word & E_DUP) != 0;
        if (dup && a->rep.verified_groups >= AUDIT_VERIFY_MAX) {
            a->rep.unverified_groups++;
        } else if (dup) {
            a->rep.verified_groups++;
            if (j - i > idcap) {
                idcap = j - i;
                ids = xrealloc(ids, idcap * sizeof(*ids));
            }
            for (size_t k = i; k < j && rc == 0; k++)
                if (e_stands(&a->e[k]) && fetch(arg, e_seq(&a->e[k]), ids[k - i], sizeof(ids[0])) < 0)
                    rc = -1;
            /* A copy is a duplicate only when an earlier copy has its very id. */
            for (size_t k = i; k < j && rc == 0; k++) {
                if (!(a->e[k].word & E_DUP))
                    continue;
                bool same = false;
                for (size_t p = i; p < k && !same; p++)
                    same = e_stands(&a->e[p]) && strcmp(ids[p - i], ids[k - i]) == 0;
                if (!same)
                    a->e[k].word &= ~(uint64_t)E_DUP;
            }
        }
        i = j;
    }
    free(ids);
    return rc;
}

/* Counts one more of a list's kind; keeps the AUDIT_NAMED with the lowest sequences. */
static void list_offer(AuditList *l, uint64_t seq, const char *id, size_t idlen)
{
    l->count++;
    size_t at = l->n;
    if (l->n == AUDIT_NAMED) {
        at = 0;
        for (size_t i = 1; i < l->n; i++)
            if (l->seq[i] > l->seq[at])
                at = i;
        if (seq == 0 || l->seq[at] <= seq)
            return;
    } else {
        l->n++;
    }
    l->seq[at] = seq;
    if (idlen > OUTBOX_MAX_EVENT_ID)
        idlen = OUTBOX_MAX_EVENT_ID;
    memcpy(l->id[at], id ? id : "", id ? idlen : 0);
    l->id[at][id ? idlen : 0] = '\0';
}

static int cmp_seq_slot(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* Sorts a list's named entries by sequence. */
static void list_sort(AuditList *l)
{
    struct {
        uint64_t seq;
        char id[OUTBOX_MAX_EVENT_ID + 1];
    } tmp[AUDIT_NAMED];
    for (size_t i = 0; i < l->n; i++) {
        tmp[i].seq = l->seq[i];
        memcpy(tmp[i].id, l->id[i], sizeof(tmp[i].id));
    }
    qsort(tmp, l->n, sizeof(tmp[0]), cmp_seq_slot);
    for (size_t i = 0; i < l->n; i++) {
        l->seq[i] = tmp[i].seq;
        memcpy(l->id[i], tmp[i].id, sizeof(tmp[i].id));
    }
}

AuditRowState audit_row(Audit *a, const char *id, size_t len, bool in_range)
{
    uint64_t h = id_hash(id, len);
    size_t i = lower_bound(a, h);
    bool held = false, dead_letter = false;
    size_t replays = 0;
    for (size_t k = i; k < a->n && a->e[k].hash == h; k++) {
        Entry *e = &a->e[k];
        e->word |= E_MATCHED;
        if (e_kind(e) == AUDIT_REPLAY) {
            replays++;
            if (in_range)
                list_offer(&a->rep.replays, e_seq(e), id, len);
        } else if (e_kind(e) == AUDIT_EVENT) {
            held = true;
        } else if (e_kind(e) == AUDIT_DEAD_LETTER) {
            dead_letter = true;
        }
    }
    AuditRowState st = held || dead_letter ? AUDIT_ROW_HELD
                       : replays           ? AUDIT_ROW_REPLAY_ONLY
                                           : AUDIT_ROW_MISSING;
    if (!in_range)
        return st;
    a->rep.rows++;
    if (!held && dead_letter)
        a->rep.dead_letters++;
    if (st == AUDIT_ROW_REPLAY_ONLY)
        list_offer(&a->rep.replay_only, 0, id, len);
    if (st == AUDIT_ROW_MISSING)
        list_offer(&a->rep.missing, 0, id, len);
    return st;
}

/* The entry for (hash, seq), or NULL. */
static const Entry *find_entry(const Audit *a, uint64_t hash, uint64_t seq)
{
    for (size_t k = lower_bound(a, hash); k < a->n && a->e[k].hash == hash; k++)
        if (e_seq(&a->e[k]) == seq)
            return &a->e[k];
    return NULL;
}

void audit_finish(Audit *a)
{
    AuditReport *r = &a->rep;
    for (size_t k = 0; k < a->n; k++) {
        const Entry *e = &a->e[k];
        if (e->word & E_DUP)
            list_offer(&r->duplicates, e_seq(e), NULL, 0);
        else if (e_stands(e) && (e->word & E_IN_RANGE) && !(e->word & E_MATCHED))
            list_offer(&r->unmatched, e_seq(e), NULL, 0);
    }
    for (size_t b = 0; b < a->nbr; b++) {
        const BreakRec *br = &a->br[b];
        const Entry *e = find_entry(a, br->hash, br->seq);
        if (e && (e->word & E_DUP))
            continue;
        if (r->nbreaks < AUDIT_NAMED)
            r->breaks[r->nbreaks++] = (AuditBreak){.seq = br->seq, .prev_seq = br->prev_seq,
                                                   .hash = br->hash, .pos = br->pos,
                                                   .prev_pos = br->prev_pos};
        r->breaks_count++;
    }
    list_sort(&r->duplicates);
    list_sort(&r->unmatched);
    list_sort(&r->replays);
}

int audit_resolve(Audit *a, AuditFetch fetch, void *arg)
{
    AuditReport *r = &a->rep;
    AuditList *lists[] = {&r->duplicates, &r->unmatched};
    for (size_t l = 0; l < ARRAY_SIZE(lists); l++)
        for (size_t i = 0; i < lists[l]->n; i++)
            if (fetch(arg, lists[l]->seq[i], lists[l]->id[i], sizeof(lists[l]->id[i])) < 0)
                return -1;
    for (size_t i = 0; i < r->nbreaks; i++) {
        AuditBreak *b = &r->breaks[i];
        if (fetch(arg, b->seq, b->id, sizeof(b->id)) < 0 ||
            fetch(arg, b->prev_seq, b->prev_id, sizeof(b->prev_id)) < 0)
            return -1;
    }
    return 0;
}

const AuditReport *audit_report(const Audit *a)
{
    return &a->rep;
}

bool audit_ok(const AuditReport *r)
{
    return r->missing.count == 0 && r->duplicates.count == 0 && r->breaks_count == 0;
}

/* ---- the report ---------------------------------------------------------------------------- */

static void print_list(FILE *out, const char *what, const AuditList *l, bool seqs,
                       const char *note)
{
    fprintf(out, "%s: %" PRIu64 "%s\n", what, l->count, l->count && note ? note : "");
    for (size_t i = 0; i < l->n; i++) {
        if (seqs)
            fprintf(out, "  %s (stream sequence %" PRIu64 ")\n", l->id[i], l->seq[i]);
        else
            fprintf(out, "  %s\n", l->id[i]);
    }
    if (l->count > l->n)
        fprintf(out, "  ... and %" PRIu64 " more\n", l->count - l->n);
}

static void range_text(const AuditContext *ctx, char *out, size_t n)
{
    snprintf(out, n, "[%s, %s)", ctx->since ? ctx->since : "-inf",
             ctx->until ? ctx->until : "now");
}

void audit_print_text(FILE *out, const AuditContext *ctx, const AuditReport *r)
{
    char range[256];
    range_text(ctx, range, sizeof(range));
    fprintf(out, "audit of %s against stream %s, rows committed in %s\n", ctx->tables,
            ctx->stream, range);
    if (ctx->by_commit_time)
        fprintf(out, "range and order by commit time (track_commit_timestamp is on)");
    else
        fprintf(out, "range by the %s column: track_commit_timestamp is off, so commit times "
                     "of rows are not known (order is checked by the events' positions)",
                ctx->time_column);
    if (ctx->by_commit_time && ctx->rows_without_commit_time)
        fprintf(out, "; %" PRIu64 " rows without a known commit time went by %s",
                ctx->rows_without_commit_time, ctx->time_column);
    fprintf(out, "\nrows: %" PRIu64 " in the range; stream: %" PRIu64 " messages read, %" PRIu64
                 " events committed in the range\n",
            r->rows, r->messages, r->events_in_range);
    print_list(out, "missing from the stream", &r->missing, false, NULL);
    print_list(out, "stored twice (extra copies)", &r->duplicates, true, NULL);
    if (r->unverified_groups)
        fprintf(out, "  (%" PRIu64 " of the duplicate groups counted by id hash, unchecked)\n",
                r->unverified_groups);
    fprintf(out, "out of commit order: %" PRIu64 "\n", r->breaks_count);
    for (size_t i = 0; i < r->nbreaks; i++) {
        const AuditBreak *b = &r->breaks[i];
        char p[OUTBOX_POSITION_MAX], q[OUTBOX_POSITION_MAX];
        outbox_position_format(&b->pos, p);
        outbox_position_format(&b->prev_pos, q);
        fprintf(out, "  %s (sequence %" PRIu64 ", position %s) stored after %s (sequence %" PRIu64
                     ", position %s)\n",
                b->id, b->seq, p, b->prev_id, b->prev_seq, q);
    }
    if (r->breaks_count > r->nbreaks)
        fprintf(out, "  ... and %" PRIu64 " more\n", r->breaks_count - r->nbreaks);
    print_list(out, "replay copies (from outboxd replay, not duplicates)", &r->replays, true, NULL);
    print_list(out, "held only as replay copies", &r->replay_only, false, NULL);
    if (r->dead_letters)
        fprintf(out, "held as dead letters: %" PRIu64 "\n", r->dead_letters);
    print_list(out, "events in the range without a row", &r->unmatched, true,
               " (rows deleted from the table, or table-less events: their order was "
               "checked, their rows could not be)");
    if (r->unpositioned)
        fprintf(out, "events without a position (order not checked): %" PRIu64 "\n",
                r->unpositioned);
    if (r->foreign)
        fprintf(out, "messages that stand for no row: %" PRIu64 "\n", r->foreign);
    if (ctx->dead_letters_elsewhere)
        fprintf(out, "note: dead letters go to stream %s, which the audit does not read: rows "
                     "that were dead-lettered show as missing\n",
                ctx->dead_letters_elsewhere);
    if (ctx->relay_behind)
        fprintf(out, "note: the relay had not yet confirmed everything committed before the "
                     "audit began; rows committed in the last moments may show as missing\n");
    fprintf(out, "%s (%.1f s)\n",
            audit_ok(r) ? "OK: the stream holds each row once, in commit order"
                        : "PROBLEMS FOUND",
            ctx->seconds);
}

static json_t *list_json(const AuditList *l, bool seqs)
{
    json_t *ids = json_array();
    for (size_t i = 0; i < l->n; i++) {
        if (seqs)
            json_array_append_new(ids, json_pack("{s:s,s:I}", "event_id", l->id[i], "seq",
                                                 (json_int_t)l->seq[i]));
        else
            json_array_append_new(ids, json_string(l->id[i]));
    }
    return json_pack("{s:I,s:o}", "count", (json_int_t)l->count, "first", ids);
}

void audit_print_json(FILE *out, const AuditContext *ctx, const AuditReport *r)
{
    json_t *breaks = json_array();
    for (size_t i = 0; i < r->nbreaks; i++) {
        const AuditBreak *b = &r->breaks[i];
        char p[OUTBOX_POSITION_MAX], q[OUTBOX_POSITION_MAX];
        outbox_position_format(&b->pos, p);
        outbox_position_format(&b->prev_pos, q);
        json_array_append_new(breaks, json_pack("{s:s,s:I,s:s,s:s,s:I,s:s}", "event_id", b->id,
                                                "seq", (json_int_t)b->seq, "position", p,
                                                "after_event_id", b->prev_id, "after_seq",
                                                (json_int_t)b->prev_seq, "after_position", q));
    }
    json_t *o = json_pack(
        "{s:b,s:s,s:s,s:o,s:o,s:s,s:s,s:I,s:I,s:I,s:o,s:o,s:{s:I,s:o},s:o,s:o,s:I,s:o,s:I,s:I,"
        "s:I,s:b,s:f}",
        "ok", audit_ok(r), "tables", ctx->tables, "stream", ctx->stream, "since",
        ctx->since ? json_string(ctx->since) : json_null(), "until",
        ctx->until ? json_string(ctx->until) : json_null(), "range_by",
        ctx->by_commit_time ? "commit_time" : "time_column", "time_column", ctx->time_column,
        "rows_without_commit_time", (json_int_t)ctx->rows_without_commit_time, "rows",
        (json_int_t)r->rows, "messages_read", (json_int_t)r->messages, "missing",
        list_json(&r->missing, false), "duplicates", list_json(&r->duplicates, true),
        "out_of_order", "count", (json_int_t)r->breaks_count, "first", breaks, "replay_copies",
        list_json(&r->replays, true), "replay_only", list_json(&r->replay_only, false),
        "dead_letters", (json_int_t)r->dead_letters, "unmatched_events",
        list_json(&r->unmatched, true), "unpositioned_events", (json_int_t)r->unpositioned,
        "foreign_messages", (json_int_t)r->foreign, "events_in_range",
        (json_int_t)r->events_in_range, "relay_behind", ctx->relay_behind, "seconds",
        ctx->seconds);
    json_object_set_new(o, "dead_letter_stream_not_read",
                        ctx->dead_letters_elsewhere ? json_string(ctx->dead_letters_elsewhere)
                                                    : json_null());
    char *text = json_dumps(o, JSON_COMPACT);
    fprintf(out, "%s\n", text ? text : "{}");
    free(text);
    json_decref(o);
}

/* ---- reading both sides ---------------------------------------------------------------------- */

/* Pull requests ask for this many messages at a time. */
#define PULL_BATCH 5000
#define FETCH_ROWS 10000
#define PROGRESS_EVERY_US INT64_C(5000000)
#define CURSOR "outboxd_audit"

typedef struct Run {
    const Config *cfg;
    const AuditOptions *opts;
    Audit *audit;
    AuditRange range;
    AuditContext ctx;
    OutboxMapper *mapper;
    PgStream *pg;
    natsConnection *nc;
    char stream[256];
    char dl_stream[256];
    uint64_t last_seq;
    JsStoredMsg got; /* scratch for fetch() */
    Buf sql;
    char since_lit[64], until_lit[64]; /* SQL timestamptz expressions */
    int64_t started_mono, next_progress;
    char err[1024];
} Run;

static void progress(Run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A line on stderr every few seconds of a long audit. */
static void progress(Run *r, const char *fmt, ...)
{
    int64_t now = now_mono_us();
    if (now < r->next_progress)
        return;
    r->next_progress = now + PROGRESS_EVERY_US;
    if (now - r->started_mono < PROGRESS_EVERY_US)
        return; /* short audits say nothing */
    va_list ap;
    va_start(ap, fmt);
    fputs("audit: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---- the database side ---- */

static int sql_rows(Run *r, const char *what, PgRows **rows, char sqlstate[6])
{
    return pgstream_sql(r->pg, r->sql.data, what, rows, sqlstate, r->err, sizeof(r->err));
}

/* Reads one of --since/--until as Unix µs; 2 when it is not a time. */
static int parse_time(Run *r, const char *flag, const char *value, int64_t *out)
{
    buf_reset(&r->sql);
    buf_puts(&r->sql, "SELECT (extract(epoch FROM ");
    pgstream_quote_literal(&r->sql, value);
    buf_puts(&r->sql, "::timestamptz) * 1000000)::bigint");
    char what[64], sqlstate[6] = "";
    snprintf(what, sizeof(what), "invalid %s", flag);
    PgRows *rows = NULL;
    if (sql_rows(r, what, &rows, sqlstate) < 0) {
        char *context = strstr(r->err, " LINE ");
        if (context)
            *context = '\0';
        return strncmp(sqlstate, "22", 2) == 0 ? EXIT_OUTBOXD_USAGE : EXIT_OUTBOXD_CHECK;
    }
    *out = strtoll(pgrows_value(rows, 0, 0) ?: "0", NULL, 10);
    pgrows_free(rows);
    return 0;
}

/* Opens the read-only snapshot; learns the range's ends, whether commit times are kept, and
 * where the WAL stood. */
static int open_snapshot(Run *r, uint64_t *wal)
{
    buf_reset(&r->sql);
    buf_puts(&r->sql, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; "
                      "SELECT current_setting('track_commit_timestamp') = 'on', "
                      "(extract(epoch FROM now()) * 1000000)::bigint, "
                      "CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END");
    PgRows *rows = NULL;
    if (sql_rows(r, "could not open a snapshot", &rows, NULL) < 0)
        return EXIT_OUTBOXD_CHECK;
    r->ctx.by_commit_time = pgrows_true(rows, 0, 0);
    int64_t now = strtoll(pgrows_value(rows, 0, 1) ?: "0", NULL, 10);
    if (!r->opts->until)
        r->range.until = now;
    const char *lsn = pgrows_value(rows, 0, 2);
    if (!lsn || !lsn_parse(lsn, wal))
        *wal = 0;
    pgrows_free(rows);
    return 0;
}

/* Waits up to --wait for a relay that holds the slot to confirm wal: what committed before
 * the snapshot is then in the stream. A slot nobody holds will not move: no wait. */
static void wait_for_relay(Run *r, uint64_t wal)
{
    if (wal == 0)
        return;
    int64_t deadline = now_mono_us() + r->opts->wait_ms * 1000;
    char lsn[18];
    lsn_format(wal, lsn);
    for (;;) {
        buf_reset(&r->sql);
        buf_printf(&r->sql, "SELECT active, confirmed_flush_lsn >= '%s'::pg_lsn FROM "
                            "pg_catalog.pg_replication_slots WHERE slot_name = ", lsn);
        pgstream_quote_literal(&r->sql, r->cfg->slot);
        PgRows *rows = NULL;
        if (sql_rows(r, "could not read the slot", &rows, NULL) < 0)
            return;
        bool active = pgrows_count(rows) == 1 && pgrows_true(rows, 0, 0);
        bool done = pgrows_count(rows) == 1 && pgrows_true(rows, 0, 1);
        pgrows_free(rows);
        if (!active || done)
            return;
        if (now_mono_us() >= deadline) {
            r->ctx.relay_behind = true;
            return;
        }
        struct timespec ts = {.tv_nsec = 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static void put_table(Run *r, size_t t)
{
    pgstream_quote_ident(&r->sql, outbox_mapper_schema(r->mapper, t));
    buf_putc(&r->sql, '.');
    pgstream_quote_ident(&r->sql, outbox_mapper_table(r->mapper, t));
}

/* Declares the cursor over table t's rows in the range and its margins: (event id, in the
 * range, commit time unknown). */
static int declare_rows(Run *r, size_t t)
{
    const char *id = outbox_mapper_role_column(r->mapper, t, ROLE_EVENT_ID);
    const char *at = outbox_mapper_role_column(r->mapper, t, ROLE_OCCURRED_AT);
    Buf *s = &r->sql;
    buf_reset(s);
    buf_puts(s, "DECLARE " CURSOR " NO SCROLL CURSOR FOR SELECT id, t IS NULL OR (t >= ");
    buf_puts(s, r->since_lit);
    buf_puts(s, " AND t < ");
    buf_puts(s, r->until_lit);
    buf_puts(s, "), ct IS NULL FROM (SELECT ");
    pgstream_quote_ident(s, id);
    buf_puts(s, "::text AS id, ");
    Buf col;
    buf_init(&col);
    if (at)
        pgstream_quote_ident(&col, at);
    else
        buf_puts(&col, "NULL::timestamptz");
    if (r->ctx.by_commit_time)
        buf_printf(s, "coalesce(pg_catalog.pg_xact_commit_timestamp(xmin), %s) AS t, "
                      "pg_catalog.pg_xact_commit_timestamp(xmin) AS ct",
                   col.data);
    else
        buf_printf(s, "%s AS t, NULL::timestamptz AS ct", col.data);
    buf_deinit(&col);
    buf_puts(s, " FROM ");
    put_table(r, t);
    buf_printf(s, ") s WHERE id IS NOT NULL AND (t IS NULL OR (t >= %s - interval '%d seconds' "
                  "AND t < %s + interval '%d seconds'))",
               r->since_lit, (int)(AUDIT_MARGIN_US / 1000000), r->until_lit,
               (int)(AUDIT_MARGIN_US / 1000000));
    char sqlstate[6] = "";
    if (sql_rows(r, "could not select the outbox rows", NULL, sqlstate) < 0)
        return strcmp(sqlstate, "42P01") == 0 || strcmp(sqlstate, "42703") == 0
                   ? EXIT_OUTBOXD_CHECK
                   : EXIT_OUTBOXD_FAILURE;
    return 0;
}

static int read_rows(Run *r)
{
    uint64_t seen = 0;
    for (size_t t = 0; t < outbox_mapper_ntables(r->mapper); t++) {
        int code = declare_rows(r, t);
        if (code != 0)
            return code;
        for (;;) {
            PgRows *rows = NULL;
            buf_reset(&r->sql);
            buf_printf(&r->sql, "FETCH %d FROM " CURSOR, FETCH_ROWS);
            if (sql_rows(r, "could not fetch the outbox rows", &rows, NULL) < 0)
                return EXIT_OUTBOXD_FAILURE;
            int n = pgrows_count(rows);
            for (int i = 0; i < n; i++) {
                const char *id = pgrows_value(rows, i, 0);
                bool in_range = pgrows_true(rows, i, 1);
                audit_row(r->audit, id, strlen(id), in_range);
                if (in_range && pgrows_true(rows, i, 2))
                    r->ctx.rows_without_commit_time++;
            }
            pgrows_free(rows);
            seen += (uint64_t)n;
            progress(r, "%" PRIu64 " rows read from the table", seen);
            if (n < FETCH_ROWS)
                break;
        }
        buf_reset(&r->sql);
        buf_puts(&r->sql, "CLOSE " CURSOR);
        if (sql_rows(r, "could not close the cursor", NULL, NULL) < 0)
            return EXIT_OUTBOXD_FAILURE;
    }
    return 0;
}

/* ---- the stream side ---- */

/* The headers the audit reads, out of nats.c's message (NULL when absent). */
static void msg_headers(natsMsg *msg, AuditHeaders *h)
{
    memset(h, 0, sizeof(*h));
    natsMsgHeader_Get(msg, OUTBOX_HDR_MSG_ID, &h->msg_id);
    natsMsgHeader_Get(msg, OUTBOX_HDR_EVENT_ID, &h->event_id);
    natsMsgHeader_Get(msg, "Outbox-Replay", &h->replay);
    natsMsgHeader_Get(msg, OUTBOX_HDR_DL_REASON, &h->dead_letter);
    natsMsgHeader_Get(msg, OUTBOX_HDR_POSITION, &h->position);
    natsMsgHeader_Get(msg, OUTBOX_HDR_SOURCE, &h->source);
    natsMsgHeader_Get(msg, OUTBOX_HDR_COMMIT_TIME, &h->commit_time);
}

/* The stream sequence, stored time (Unix µs) and pending count from a delivered message's
 * reply subject: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>, or the
 * newer form with a domain and an account hash after $JS.ACK. False when it is not one. */
static bool ack_meta(const char *reply, uint64_t *seq, int64_t *stored_us, uint64_t *pending)
{
    if (!reply || strncmp(reply, "$JS.ACK.", 8) != 0)
        return false;
    const char *tok[16];
    size_t n = 0;
    for (const char *p = reply; p && n < ARRAY_SIZE(tok); p = strchr(p, '.')) {
        if (*p == '.')
            p++;
        tok[n++] = p;
    }
    size_t base = n == 9 ? 0 : n >= 11 ? 2 : SIZE_MAX;
    if (base == SIZE_MAX)
        return false;
    *seq = strtoull(tok[base + 5], NULL, 10);
    *stored_us = strtoll(tok[base + 7], NULL, 10) / 1000;
    *pending = strtoull(tok[base + 8], NULL, 10);
    return *seq > 0;
}

/* An ephemeral headers-only consumer of stream from from_us (Unix µs; INT64_MIN: its start). */
static int create_consumer(natsConnection *nc, const char *stream, int64_t from_us, char *name_out,
                           size_t namelen, char *err, size_t errlen)
{
    json_t *config = json_pack("{s:s,s:b,s:b,s:I}", "ack_policy", "none", "headers_only", 1,
                               "mem_storage", 1, "inactive_threshold",
                               (json_int_t)INT64_C(60000000000));
    if (from_us != INT64_MIN) {
        char when[32];
        pg_time_format_rfc3339(from_us - PG_EPOCH_OFFSET_US, when);
        json_object_set_new(config, "deliver_policy", json_string("by_start_time"));
        json_object_set_new(config, "opt_start_time", json_string(when));
    } else {
        json_object_set_new(config, "deliver_policy", json_string("all"));
    }
    json_t *req = json_pack("{s:s,s:o}", "stream_name", stream, "config", config);
    char *body = json_dumps(req, JSON_COMPACT);
    json_decref(req);
    char subject[320];
    snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.CREATE.%s", stream);
    bool no_responders;
    json_t *reply = jsapi_request(nc, subject, body, &no_responders, err, errlen);
    free(body);
    if (!reply)
        return -1;
    const char *name = json_string_value(json_object_get(reply, "name"));
    json_t *error = json_object_get(reply, "error");
    int rc = 0;
    if (error || !name) {
        snprintf(err, errlen, "could not create a consumer to read stream %s: %s", stream,
                 json_string_value(json_object_get(error, "description")) ?: "unexpected reply");
        rc = -1;
    } else {
        snprintf(name_out, namelen, "%s", name);
    }
    json_decref(reply);
    return rc;
}

static void delete_consumer(natsConnection *nc, const char *stream, const char *consumer)
{
    char subject[512], err[256];
    snprintf(subject, sizeof(subject), "$JS.API.CONSUMER.DELETE.%s.%s", stream, consumer);
    bool no_responders;
    json_decref(jsapi_request_within(nc, subject, "", 2000, &no_responders, err, sizeof(err)));
}

int audit_read_stream(Audit *a, natsConnection *nc, const char *stream, int64_t from_us,
                      uint64_t last_seq, void (*tick)(void *arg, uint64_t read), void *arg,
                      char *err, size_t errlen)
{
    if (last_seq == 0)
        return 0;
    char consumer[128];
    if (create_consumer(nc, stream, from_us, consumer, sizeof(consumer), err, errlen) < 0)
        return -1;
    natsSubscription *sub = NULL;
    char inbox[160], next[512];
    snprintf(inbox, sizeof(inbox), "_INBOX.outboxd-audit.%s", consumer);
    snprintf(next, sizeof(next), "$JS.API.CONSUMER.MSG.NEXT.%s.%s", stream, consumer);
    char body[64];
    snprintf(body, sizeof(body), "{\"batch\":%d,\"no_wait\":true}", PULL_BATCH);
    natsStatus s = natsConnection_SubscribeSync(&sub, nc, inbox);
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(sub, -1, -1);
    int rc = 0;
    bool done = false;
    uint64_t read = 0;
    while (s == NATS_OK && !done) {
        s = natsConnection_PublishRequestString(nc, next, inbox, body);
        int got = 0;
        while (s == NATS_OK && got < PULL_BATCH) {
            natsMsg *msg = NULL;
            s = natsSubscription_NextMsg(&msg, sub, 10000);
            if (s != NATS_OK)
                break;
            uint64_t seq, pending;
            int64_t stored;
            if (!ack_meta(natsMsg_GetReply(msg), &seq, &stored, &pending)) {
                /* A status: 404 no messages, 408 timeout. The batch is over. */
                natsMsg_Destroy(msg);
                if (got == 0)
                    done = true;
                break;
            }
            got++;
            read++;
            AuditHeaders h;
            msg_headers(msg, &h);
            AuditMsg m;
            audit_msg_from_headers(&m, seq, stored, &h, &a->range);
            audit_add_msg(a, &m);
            natsMsg_Destroy(msg);
            if (seq >= last_seq || pending == 0) {
                done = true;
                break;
            }
        }
        if (tick)
            tick(arg, read);
    }
    if (s != NATS_OK) {
        snprintf(err, errlen, "could not read stream %s: %s", stream, natsStatus_GetText(s));
        rc = -1;
    }
    natsSubscription_Destroy(sub);
    delete_consumer(nc, stream, consumer);
    return rc;
}

static void stream_progress(void *arg, uint64_t read)
{
    Run *r = arg;
    progress(r, "%" PRIu64 " stream messages read (to sequence %" PRIu64 ")", read, r->last_seq);
}

/* Reads every message from the range's start (less the margin) on, headers only, in pull
 * batches, until the stream's last message when the audit began (or nothing more is there). */
static int read_stream(Run *r)
{
    int64_t from = r->range.since != INT64_MIN ? r->range.since - AUDIT_MARGIN_US : INT64_MIN;
    return audit_read_stream(r->audit, r->nc, r->stream, from, r->last_seq, stream_progress, r,
                             r->err, sizeof(r->err));
}

/* AuditFetch: the event id the message at seq stands for. */
static int fetch(void *arg, uint64_t seq, char *id, size_t idlen)
{
    Run *r = arg;
    int rc = jsapi_msg_get(r->nc, r->stream, seq, NULL, 5000, &r->got, r->err, sizeof(r->err));
    if (rc < 0)
        return -1;
    if (rc == 1) { /* deleted since */
        snprintf(id, idlen, "?");
        return 0;
    }
    char v[7][OUTBOX_MAX_EVENT_ID + 64];
    const char *names[7] = {OUTBOX_HDR_MSG_ID, OUTBOX_HDR_EVENT_ID, "Outbox-Replay",
                            OUTBOX_HDR_DL_REASON, OUTBOX_HDR_POSITION, OUTBOX_HDR_SOURCE,
                            OUTBOX_HDR_COMMIT_TIME};
    const char *p[7];
    for (int i = 0; i < 7; i++)
        p[i] = jsapi_header_value(r->got.hdrs.data, names[i], v[i], sizeof(v[i])) ? v[i] : NULL;
    AuditHeaders h = {.msg_id = p[0], .event_id = p[1], .replay = p[2], .dead_letter = p[3],
                      .position = p[4], .source = p[5], .commit_time = p[6]};
    AuditMsg m;
    audit_msg_from_headers(&m, seq, 0, &h, &r->range);
    snprintf(id, idlen, "%s", m.id ? m.id : p[0] ? p[0] : "?");
    return 0;
}

static int open_nats(Run *r)
{
    r->nc = jsapi_connect_once(r->cfg->nats_url, r->err, sizeof(r->err));
    if (!r->nc)
        return EXIT_OUTBOXD_CHECK;
    Buf filter;
    buf_init(&filter);
    relay_subject_filter(r->cfg, &filter);
    bool found = false;
    int rc = jsapi_find_stream(r->nc, filter.data, r->stream, sizeof(r->stream), &found, r->err,
                               sizeof(r->err));
    if (rc == 0 && !found) {
        snprintf(r->err, sizeof(r->err), "no JetStream stream captures %s", filter.data);
        rc = -1;
    }
    buf_deinit(&filter);
    StreamInfo info;
    if (rc == 0)
        rc = jsapi_stream_info(r->nc, r->stream, &info, r->err, sizeof(r->err));
    if (rc < 0)
        return EXIT_OUTBOXD_CHECK;
    r->last_seq = info.last_seq;
    /* Without strict order dead letters may go to another stream. */
    const char *dlq = r->cfg->dead_letter_subject;
    if (strcmp(r->cfg->on_poison, "dead-letter") == 0 && dlq && !jsapi_stream_covers(&info, dlq)) {
        char err[256];
        found = false;
        if (jsapi_find_stream(r->nc, dlq, r->dl_stream, sizeof(r->dl_stream), &found, err,
                              sizeof(err)) == 0 &&
            found)
            r->ctx.dead_letters_elsewhere = r->dl_stream;
    }
    return 0;
}

int audit_run(const Config *cfg, const AuditOptions *opts)
{
    Run r = {.cfg = cfg, .opts = opts, .range = {.since = INT64_MIN, .until = INT64_MAX}};
    r.started_mono = now_mono_us();
    r.next_progress = r.started_mono;
    buf_init(&r.sql);
    buf_init(&r.got.hdrs);
    int code = EXIT_OUTBOXD_FAILURE;
    char tables[512] = "";

    if (outbox_mapper_from_config(&r.mapper, cfg, r.err, sizeof(r.err)) < 0) {
        code = EXIT_OUTBOXD_USAGE;
        goto fail;
    }
    outbox_mapper_describe_tables(r.mapper, tables, sizeof(tables));
    /* Without commit times the range goes by the time column: every table needs one. */
    const char *time_column = NULL;
    for (size_t t = 0; t < outbox_mapper_ntables(r.mapper); t++)
        if (!time_column)
            time_column = outbox_mapper_role_column(r.mapper, t, ROLE_OCCURRED_AT);
    r.ctx = (AuditContext){.tables = tables, .stream = r.stream, .since = opts->since,
                           .until = opts->until, .time_column = time_column ?: "occurred_at"};

    if (pgstream_connect_plain(&r.pg, cfg->pg_url, r.err, sizeof(r.err)) != 0) {
        code = EXIT_OUTBOXD_CHECK;
        goto fail;
    }
    if ((opts->since && (code = parse_time(&r, "--since", opts->since, &r.range.since)) != 0) ||
        (opts->until && (code = parse_time(&r, "--until", opts->until, &r.range.until)) != 0))
        goto fail;
    if (r.range.since >= r.range.until) {
        snprintf(r.err, sizeof(r.err), "--since must come before --until");
        code = EXIT_OUTBOXD_USAGE;
        goto fail;
    }
    uint64_t wal;
    if ((code = open_snapshot(&r, &wal)) != 0)
        goto fail;
    if (!r.ctx.by_commit_time && (opts->since || opts->until)) {
        for (size_t t = 0; t < outbox_mapper_ntables(r.mapper); t++) {
            if (!outbox_mapper_role_column(r.mapper, t, ROLE_OCCURRED_AT)) {
                snprintf(r.err, sizeof(r.err),
                         "outbox table %s has no time column to select the range by, and "
                         "track_commit_timestamp is off (--column-occurred-at names one)",
                         outbox_mapper_qualified(r.mapper, t));
                code = EXIT_OUTBOXD_USAGE;
                goto fail;
            }
        }
    }
    /* The range's ends as SQL: what was given, or the snapshot's now() (and no lower end). */
    Buf lit;
    buf_init(&lit);
    if (opts->since) {
        pgstream_quote_literal(&lit, opts->since);
        buf_puts(&lit, "::timestamptz");
    } else {
        buf_puts(&lit, "'-infinity'::timestamptz");
    }
    snprintf(r.since_lit, sizeof(r.since_lit), "%s", lit.data);
    buf_reset(&lit);
    if (opts->until) {
        pgstream_quote_literal(&lit, opts->until);
        buf_puts(&lit, "::timestamptz");
    } else {
        buf_puts(&lit, "now()");
    }
    snprintf(r.until_lit, sizeof(r.until_lit), "%s", lit.data);
    size_t litlen = lit.len;
    buf_deinit(&lit);
    if (litlen >= sizeof(r.until_lit) || strlen(r.since_lit) + 1 >= sizeof(r.since_lit)) {
        snprintf(r.err, sizeof(r.err), "--since or --until is too long");
        code = EXIT_OUTBOXD_USAGE;
        goto fail;
    }
    wait_for_relay(&r, wal);

    if ((code = open_nats(&r)) != 0)
        goto fail;
    audit_new(&r.audit, &r.range);
    code = EXIT_OUTBOXD_FAILURE;
    if (read_stream(&r) < 0)
        goto fail;
    audit_stream_done(r.audit);
    if (audit_verify_duplicates(r.audit, fetch, &r) < 0)
        goto fail;
    if ((code = read_rows(&r)) != 0)
        goto fail;
    audit_finish(r.audit);
    if (audit_resolve(r.audit, fetch, &r) < 0) {
        code = EXIT_OUTBOXD_FAILURE;
        goto fail;
    }
    r.ctx.seconds = (double)(now_mono_us() - r.started_mono) / 1e6;
    const AuditReport *rep = audit_report(r.audit);
    if (opts->json)
        audit_print_json(stdout, &r.ctx, rep);
    else
        audit_print_text(stdout, &r.ctx, rep);
    fflush(stdout);
    code = audit_ok(rep) ? EXIT_OUTBOXD_OK : EXIT_OUTBOXD_FAILURE;
    goto done;
fail:
    fprintf(stderr, "outboxd: %s\n", r.err);
done:
    if (r.pg) {
        char err[128];
        pgstream_sql(r.pg, "ROLLBACK", "could not end the snapshot", NULL, NULL, err, sizeof(err));
    }
    natsConnection_Destroy(r.nc);
    pgstream_free(r.pg);
    outbox_mapper_free(r.mapper);
    audit_free(r.audit);
    buf_deinit(&r.sql);
    buf_deinit(&r.got.hdrs);
    return code;
}
