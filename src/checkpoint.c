/*
 * checkpoint.c - the checkpoint's format (checkpoint.h): encoding and strict decoding, no I/O.
 *
 * Strict on what it understands, lenient on what it does not: a member outboxd knows must have
 * the right type (a checkpoint that says something else than it seems is an error to report,
 * never a position to guess), while unknown members are ignored so a later release can add
 * some without breaking an earlier one that reads them during a rolling upgrade.
 */
#include "outboxd/checkpoint.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

static void put_lsn(json_t *o, const char *key, uint64_t lsn)
{
    char s[18];
    json_object_set_new(o, key, json_string(lsn_format(lsn, s)));
}

static void put_time(json_t *o, const char *key, int64_t pg_us)
{
    char s[32];
    pg_time_format_rfc3339(pg_us, s);
    json_object_set_new(o, key, json_string(s));
}

void checkpoint_encode(const Checkpoint *c, Buf *out)
{
    json_t *o = json_object();
    json_object_set_new(o, "version", json_integer(CHECKPOINT_VERSION));
    put_lsn(o, "lsn", c->lsn);
    if (c->timeline)
        json_object_set_new(o, "timeline", json_integer(c->timeline));
    if (c->system[0])
        json_object_set_new(o, "system", json_string(c->system));
    if (c->slot[0])
        json_object_set_new(o, "slot", json_string(c->slot));
    if (c->commit_time)
        put_time(o, "commit_time", c->commit_time);
    if (c->commit_lsn)
        put_lsn(o, "commit_lsn", c->commit_lsn);
    put_time(o, "written", now_unix_us() - PG_EPOCH_OFFSET_US);
    if (c->backfill.active) {
        json_t *b = json_object();
        put_lsn(b, "position", c->backfill.position);
        json_object_set_new(b, "snapshot", json_string(c->backfill.snapshot));
        json_object_set_new(b, "table", json_string(c->backfill.table));
        json_object_set_new(b, "after", json_string(c->backfill.after));
        json_object_set_new(b, "rows", json_integer((json_int_t)c->backfill.rows));
        if (c->backfill.since[0])
            json_object_set_new(b, "since", json_string(c->backfill.since));
        json_object_set_new(o, "backfill", b);
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    buf_reset(out);
    buf_puts(out, s);
    free(s);
    json_decref(o);
}

/* Parses what put_time writes into µs since 2000-01-01. */
static bool parse_time(const char *s, int64_t *pg_us)
{
    int64_t unix_us;
    if (!time_parse_rfc3339(s, strlen(s), &unix_us))
        return false;
    *pg_us = unix_us - PG_EPOCH_OFFSET_US;
    return true;
}

/* The member key of o: absent is fine (*present false), a wrong type is an error. */
static json_t *member(json_t *o, const char *key, json_type type, const char *where,
                      char *err, size_t errlen, bool *bad)
{
    json_t *v = json_object_get(o, key);
    if (!v)
        return NULL;
    if (json_typeof(v) != type) {
        snprintf(err, errlen, "the checkpoint's %s%s is not a%s", where, key,
                 type == JSON_STRING ? " string" : type == JSON_INTEGER ? "n integer" : "n object");
        *bad = true;
        return NULL;
    }
    return v;
}

static bool read_lsn(json_t *o, const char *key, const char *where, uint64_t *lsn, char *err,
                     size_t errlen, bool *bad)
{
    json_t *v = member(o, key, JSON_STRING, where, err, errlen, bad);
    if (v && !lsn_parse(json_string_value(v), lsn)) {
        snprintf(err, errlen, "the checkpoint's %s%s \"%.40s\" is not an LSN", where, key,
                 json_string_value(v));
        *bad = true;
    }
    return v != NULL;
}

static void read_string(json_t *o, const char *key, const char *where, char *out, size_t outlen,
                        char *err, size_t errlen, bool *bad)
{
    json_t *v = member(o, key, JSON_STRING, where, err, errlen, bad);
    if (v)
        snprintf(out, outlen, "%s", json_string_value(v));
}

int checkpoint_decode(const char *value, size_t len, Checkpoint *out, char *err, size_t errlen)
{
    Checkpoint c;
    memset(&c, 0, sizeof(c));
    while (len > 0 && (*value == ' ' || *value == '\n' || *value == '\t')) {
        value++;
        len--;
    }
    if (len == 0 || *value != '{') { /* a bare LSN, as outboxd 0.1 wrote it */
        char lsn[40];
        snprintf(lsn, sizeof(lsn), "%.*s", (int)(len < sizeof(lsn) - 1 ? len : sizeof(lsn) - 1),
                 value);
        if (!lsn_parse(lsn, &c.lsn)) {
            text_one_line(lsn);
            snprintf(err, errlen, "the checkpoint holds \"%s\", neither JSON nor an LSN", lsn);
            return -1;
        }
        *out = c;
        return 0;
    }
    json_error_t je;
    json_t *o = json_loadb(value, len, 0, &je);
    if (!o || !json_is_object(o)) {
        snprintf(err, errlen, "the checkpoint is not a JSON object: %s",
                 o ? "another JSON value" : je.text);
        json_decref(o);
        return -1;
    }
    bool bad = false;
    json_t *v = member(o, "version", JSON_INTEGER, "", err, errlen, &bad);
    if (!v && !bad) {
        snprintf(err, errlen, "the checkpoint has no \"version\"");
        bad = true;
    }
    if (v) {
        json_int_t version = json_integer_value(v);
        if (version < 1 || version > CHECKPOINT_VERSION) {
            snprintf(err, errlen,
                     "the checkpoint is version %" JSON_INTEGER_FORMAT ", this outboxd reads "
                     "versions up to %d: run a release at least as new as the one that wrote it",
                     version, CHECKPOINT_VERSION);
            bad = true;
        }
        c.version = (int)version;
    }
    if (!bad && !read_lsn(o, "lsn", "", &c.lsn, err, errlen, &bad) && !bad) {
        snprintf(err, errlen, "the checkpoint has no \"lsn\"");
        bad = true;
    }
    if (!bad && (v = member(o, "timeline", JSON_INTEGER, "", err, errlen, &bad)))
        c.timeline = (uint32_t)json_integer_value(v);
    if (!bad)
        read_string(o, "system", "", c.system, sizeof(c.system), err, errlen, &bad);
    if (!bad)
        read_string(o, "slot", "", c.slot, sizeof(c.slot), err, errlen, &bad);
    if (!bad && (v = member(o, "commit_time", JSON_STRING, "", err, errlen, &bad)) &&
        !parse_time(json_string_value(v), &c.commit_time)) {
        snprintf(err, errlen, "the checkpoint's commit_time \"%.40s\" is not an RFC 3339 time",
                 json_string_value(v));
        bad = true;
    }
    if (!bad)
        read_lsn(o, "commit_lsn", "", &c.commit_lsn, err, errlen, &bad);
    json_t *b = bad ? NULL : member(o, "backfill", JSON_OBJECT, "", err, errlen, &bad);
    if (b) {
        c.backfill.active = true;
        if (!read_lsn(b, "position", "backfill.", &c.backfill.position, err, errlen, &bad) &&
            !bad) {
            snprintf(err, errlen, "the checkpoint's backfill has no \"position\"");
            bad = true;
        }
        if (!bad)
            read_string(b, "snapshot", "backfill.", c.backfill.snapshot,
                        sizeof(c.backfill.snapshot), err, errlen, &bad);
        if (!bad)
            read_string(b, "table", "backfill.", c.backfill.table, sizeof(c.backfill.table), err,
                        errlen, &bad);
        if (!bad)
            read_string(b, "after", "backfill.", c.backfill.after, sizeof(c.backfill.after), err,
                        errlen, &bad);
        if (!bad && (v = member(b, "rows", JSON_INTEGER, "backfill.", err, errlen, &bad)))
            c.backfill.rows = (uint64_t)json_integer_value(v);
        int64_t since;
        if (!bad)
            read_string(b, "since", "backfill.", c.backfill.since, sizeof(c.backfill.since), err,
                        errlen, &bad);
        if (!bad && c.backfill.since[0] && !parse_time(c.backfill.since, &since)) {
            snprintf(err, errlen, "the checkpoint's backfill.since \"%.40s\" is not an RFC 3339 "
                                  "time", c.backfill.since);
            bad = true;
        }
    }
    json_decref(o);
    if (bad)
        return -1;
    *out = c;
    return 0;
}
