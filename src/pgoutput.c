/*
 * pgoutput.c - a pure decoder for the logical replication stream.
 *
 * Two layers, both without I/O or allocation:
 *   - pgcopy_*: the CopyData messages of a START_REPLICATION session ('w' XLogData, 'k' keepalive)
 *     and the 'r' standby status update we send back;
 *   - pgoutput_decode: one pgoutput protocol version 1 message, the payload of an XLogData.
 *
 * Every string and value in a decoded message points into the caller's buffer (zero-copy), so it
 * lives exactly as long as that buffer. The input comes from the network and is treated as
 * hostile: every read goes through a Reader that checks the remaining length first, every length
 * and count is checked before use (with no arithmetic that can overflow), and every message must
 * end exactly where its layout says, so trailing bytes are an error too. A bad message yields -1
 * and a one-line lowercase reason naming the message, the column where there is one, the field
 * and the offset: "insert: column 3: length 4096 runs past the end of a 57-byte message".
 *
 * This runs for every WAL message: the fast path is straight-line big-endian loads behind one
 * length comparison each; error text is only formatted on failure.
 */
#include "outboxd/pgoutput.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "outboxd/util.h"

/*
 * A bounds-checked cursor over one message. The first failed read records its reason in err and
 * moves pos to the end, so every later read fails too and decoding can run to the end of a
 * message's layout and check 'failed' once (loops check it to stop early).
 */
typedef struct Reader {
    const unsigned char *p;
    size_t len;
    size_t pos;
    int failed;
    const char *what; /* the message being decoded, for errors: "insert" */
    unsigned col;     /* 1-based column being decoded, 0 outside columns */
    char *err;
    size_t errlen;
} Reader;

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4), cold));
static void rd_fail(Reader *r, const char *fmt, ...) __attribute__((format(printf, 2, 3), cold));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void rd_fail(Reader *r, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (r->failed)
        return;
    r->failed = 1;
    r->pos = r->len;
    if (r->err == NULL || r->errlen == 0)
        return;
    if (r->col)
        n = snprintf(r->err, r->errlen, "%s: column %u: ", r->what, r->col);
    else
        n = snprintf(r->err, r->errlen, "%s: ", r->what);
    if (n < 0 || (size_t)n >= r->errlen)
        return;
    va_start(ap, fmt);
    vsnprintf(r->err + n, r->errlen - (size_t)n, fmt, ap);
    va_end(ap);
}

static void rd_short(Reader *r, const char *field)
{
    rd_fail(r, "%s at offset %zu runs past the end of a %zu-byte message", field, r->pos, r->len);
}

static inline void rd_init(Reader *r, const char *buf, size_t len, size_t pos, const char *what,
                           char *err, size_t errlen)
{
    r->p = (const unsigned char *)buf;
    r->len = len;
    r->pos = pos;
    r->failed = 0;
    r->what = what;
    r->col = 0;
    r->err = err;
    r->errlen = errlen;
}

static inline uint8_t rd_u8(Reader *r, const char *field)
{
    if (r->len - r->pos < 1) {
        rd_short(r, field);
        return 0;
    }
    return r->p[r->pos++];
}

static inline uint16_t rd_u16(Reader *r, const char *field)
{
    const unsigned char *q;

    if (r->len - r->pos < 2) {
        rd_short(r, field);
        return 0;
    }
    q = r->p + r->pos;
    r->pos += 2;
    return (uint16_t)((unsigned)q[0] << 8 | q[1]);
}

static inline uint32_t rd_u32(Reader *r, const char *field)
{
    const unsigned char *q;

    if (r->len - r->pos < 4) {
        rd_short(r, field);
        return 0;
    }
    q = r->p + r->pos;
    r->pos += 4;
    return (uint32_t)q[0] << 24 | (uint32_t)q[1] << 16 | (uint32_t)q[2] << 8 | q[3];
}

static inline uint64_t rd_u64(Reader *r, const char *field)
{
    const unsigned char *q;

    if (r->len - r->pos < 8) {
        rd_short(r, field);
        return 0;
    }
    q = r->p + r->pos;
    r->pos += 8;
    return (uint64_t)q[0] << 56 | (uint64_t)q[1] << 48 | (uint64_t)q[2] << 40 |
           (uint64_t)q[3] << 32 | (uint64_t)q[4] << 24 | (uint64_t)q[5] << 16 |
           (uint64_t)q[6] << 8 | q[7];
}

/* A NUL-terminated string; the terminator must lie inside the message. */
static inline const char *rd_str(Reader *r, const char *field)
{
    const char *s = (const char *)r->p + r->pos;
    const char *nul = memchr(s, '\0', r->len - r->pos);

    if (nul == NULL) {
        rd_fail(r, "%s at offset %zu has no NUL terminator before the end of a %zu-byte message",
                field, r->pos, r->len);
        return NULL;
    }
    r->pos += (size_t)(nul - s) + 1;
    return s;
}

/* n bytes whose length came from the message itself. */
static inline const char *rd_bytes(Reader *r, uint32_t n, const char *field)
{
    const char *s = (const char *)r->p + r->pos;

    if (n > r->len - r->pos) {
        rd_fail(r, "%s %" PRIu32 " runs past the end of a %zu-byte message", field, n, r->len);
        return NULL;
    }
    r->pos += n;
    return s;
}

/* Describes a type or kind byte for an error: "'X' (0x58)", or "0x01" when not printable. */
static const char *byte_desc(char buf[16], unsigned char c)
{
    if (c >= 0x20 && c < 0x7f)
        snprintf(buf, 16, "'%c' (0x%02x)", c, c);
    else
        snprintf(buf, 16, "0x%02x", c);
    return buf;
}

/* ---- CopyData framing ------------------------------------------------------------------- */

int pgcopy_decode(const char *buf, size_t len, PgCopyMsg *out, char *err, size_t errlen)
{
    PgCopyMsg m;
    Reader r;
    unsigned char type;
    char b[16];

    if (len == 0) {
        set_err(err, errlen, "empty copydata message");
        return -1;
    }
    type = (unsigned char)buf[0];
    memset(&m, 0, sizeof m);
    switch (type) {
    case 'w':
        rd_init(&r, buf, len, 1, "xlogdata", err, errlen);
        m.kind = PG_COPY_XLOGDATA;
        m.wal_start = rd_u64(&r, "wal start");
        m.wal_end = rd_u64(&r, "wal end");
        m.send_time = (int64_t)rd_u64(&r, "send time");
        if (r.failed)
            return -1;
        m.data = buf + r.pos;
        m.len = len - r.pos;
        break;
    case 'k':
        rd_init(&r, buf, len, 1, "keepalive", err, errlen);
        m.kind = PG_COPY_KEEPALIVE;
        m.wal_end = rd_u64(&r, "wal end");
        m.send_time = (int64_t)rd_u64(&r, "send time");
        m.reply_requested = rd_u8(&r, "reply flag") != 0;
        if (r.failed)
            return -1;
        if (r.pos != len) {
            set_err(err, errlen, "keepalive: %zu trailing byte%s after a complete %zu-byte message",
                    len - r.pos, len - r.pos == 1 ? "" : "s", r.pos);
            return -1;
        }
        break;
    default:
        set_err(err, errlen, "unknown copydata message type %s", byte_desc(b, type));
        return -1;
    }
    *out = m;
    return 0;
}

static inline void put_u64(unsigned char *q, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        q[i] = (unsigned char)v;
        v >>= 8;
    }
}

void pgcopy_encode_status(char out[34], uint64_t write_lsn, uint64_t flush_lsn, uint64_t apply_lsn,
                          int64_t now_unix_us, int reply_requested)
{
    unsigned char *q = (unsigned char *)out;

    q[0] = 'r';
    put_u64(q + 1, write_lsn);
    put_u64(q + 9, flush_lsn);
    put_u64(q + 17, apply_lsn);
    put_u64(q + 25, (uint64_t)(now_unix_us - PG_EPOCH_OFFSET_US));
    q[33] = reply_requested ? 1 : 0;
}

/* ---- pgoutput messages ------------------------------------------------------------------ */

/*
 * TupleData: Int16 ncols, then per column a kind byte and, for 't' and 'b', Int32 len + bytes.
 * Fills values[] when it is not NULL (the update/delete tuples are only checked).
 */
static void rd_tuple(Reader *r, PgoValue *values, uint16_t *ncols_out)
{
    uint16_t ncols = rd_u16(r, "column count");

    if (ncols > PGO_MAX_COLUMNS) {
        rd_fail(r, "%u columns, more than the maximum of %d", (unsigned)ncols, PGO_MAX_COLUMNS);
        return;
    }
    for (unsigned i = 0; i < ncols && !r->failed; i++) {
        unsigned char kind;
        const char *data = NULL;
        uint32_t len = 0;

        r->col = i + 1;
        kind = rd_u8(r, "kind");
        switch (kind) {
        case 't':
        case 'b':
            len = rd_u32(r, "length");
            data = rd_bytes(r, len, "length");
            break;
        case 'n':
        case 'u':
            break;
        default:
            if (!r->failed) {
                char b[16];
                rd_fail(r, "unknown tuple kind %s", byte_desc(b, kind));
            }
            break;
        }
        if (values) {
            values[i].kind = (char)kind;
            values[i].data = data;
            values[i].len = len;
        }
    }
    r->col = 0;
    if (ncols_out)
        *ncols_out = ncols;
}

static void decode_relation(Reader *r, PgoMessage *msg)
{
    uint16_t ncols;

    msg->u.relation.relid = rd_u32(r, "relation id");
    msg->u.relation.nspname = rd_str(r, "namespace");
    msg->u.relation.relname = rd_str(r, "relation name");
    msg->u.relation.replident = (char)rd_u8(r, "replica identity");
    ncols = rd_u16(r, "column count");
    if (ncols > PGO_MAX_COLUMNS) {
        rd_fail(r, "%u columns, more than the maximum of %d", (unsigned)ncols, PGO_MAX_COLUMNS);
        return;
    }
    for (unsigned i = 0; i < ncols && !r->failed; i++) {
        PgoColumn *c = &msg->cols[i];

        r->col = i + 1;
        c->flags = rd_u8(r, "flags");
        c->name = rd_str(r, "name");
        c->type_oid = rd_u32(r, "type oid");
        c->typmod = (int32_t)rd_u32(r, "type modifier");
    }
    r->col = 0;
    msg->u.relation.ncols = ncols;
}

static void decode_insert(Reader *r, PgoMessage *msg)
{
    unsigned char marker;
    char b[16];

    msg->u.insert.relid = rd_u32(r, "relation id");
    marker = rd_u8(r, "tuple marker");
    if (!r->failed && marker != 'N') {
        rd_fail(r, "want tuple marker 'N', got %s", byte_desc(b, marker));
        return;
    }
    rd_tuple(r, msg->values, &msg->u.insert.ncols);
}

/* Update: Int32 relid, optionally 'K' or 'O' + old tuple, then 'N' + new tuple. */
static void decode_update(Reader *r, PgoMessage *msg)
{
    unsigned char marker;
    char b[16];

    msg->u.update.relid = rd_u32(r, "relation id");
    marker = rd_u8(r, "tuple marker");
    if (!r->failed && (marker == 'K' || marker == 'O')) {
        rd_tuple(r, NULL, NULL);
        marker = rd_u8(r, "new tuple marker");
        if (!r->failed && marker != 'N') {
            rd_fail(r, "want tuple marker 'N' after the old tuple, got %s", byte_desc(b, marker));
            return;
        }
    } else if (!r->failed && marker != 'N') {
        rd_fail(r, "want tuple marker 'K', 'O' or 'N', got %s", byte_desc(b, marker));
        return;
    }
    rd_tuple(r, NULL, NULL);
}

/* Delete: Int32 relid, 'K' or 'O' + old tuple. */
static void decode_delete(Reader *r, PgoMessage *msg)
{
    unsigned char marker;
    char b[16];

    msg->u.del.relid = rd_u32(r, "relation id");
    marker = rd_u8(r, "tuple marker");
    if (!r->failed && marker != 'K' && marker != 'O') {
        rd_fail(r, "want tuple marker 'K' or 'O', got %s", byte_desc(b, marker));
        return;
    }
    rd_tuple(r, NULL, NULL);
}

/* Truncate: Int32 nrels, Int8 options, nrels x Int32 relid (checked, not returned). */
static void decode_truncate(Reader *r, PgoMessage *msg)
{
    uint32_t nrels = rd_u32(r, "relation count");

    msg->u.truncate.nrels = nrels;
    msg->u.truncate.options = rd_u8(r, "options");
    if (!r->failed && nrels > (r->len - r->pos) / 4)
        rd_fail(r, "%" PRIu32 " relation ids run past the end of a %zu-byte message", nrels,
                r->len);
    else
        r->pos += (size_t)nrels * 4;
}

static void decode_message(Reader *r, PgoMessage *msg)
{
    uint32_t len;

    msg->u.message.flags = rd_u8(r, "flags");
    msg->u.message.lsn = rd_u64(r, "lsn");
    msg->u.message.prefix = rd_str(r, "prefix");
    len = rd_u32(r, "content length");
    msg->u.message.content = rd_bytes(r, len, "content length");
    msg->u.message.len = len;
}

int pgoutput_decode(const char *buf, size_t len, PgoMessage *msg, char *err, size_t errlen)
{
    Reader r;
    unsigned char type;
    char b[16];

    if (len == 0) {
        set_err(err, errlen, "empty pgoutput message");
        return -1;
    }
    type = (unsigned char)buf[0];
    rd_init(&r, buf, len, 1, NULL, err, errlen);
    switch (type) {
    case 'B':
        r.what = "begin";
        msg->u.begin.final_lsn = rd_u64(&r, "final lsn");
        msg->u.begin.commit_time = (int64_t)rd_u64(&r, "commit time");
        msg->u.begin.xid = rd_u32(&r, "xid");
        break;
    case 'C':
        r.what = "commit";
        msg->u.commit.flags = rd_u8(&r, "flags");
        msg->u.commit.commit_lsn = rd_u64(&r, "commit lsn");
        msg->u.commit.end_lsn = rd_u64(&r, "end lsn");
        msg->u.commit.commit_time = (int64_t)rd_u64(&r, "commit time");
        break;
    case 'O':
        r.what = "origin";
        msg->u.origin.commit_lsn = rd_u64(&r, "commit lsn");
        msg->u.origin.name = rd_str(&r, "name");
        break;
    case 'R':
        r.what = "relation";
        decode_relation(&r, msg);
        break;
    case 'Y':
        r.what = "type";
        msg->u.type.oid = rd_u32(&r, "type oid");
        msg->u.type.nspname = rd_str(&r, "namespace");
        msg->u.type.typname = rd_str(&r, "type name");
        break;
    case 'I':
        r.what = "insert";
        decode_insert(&r, msg);
        break;
    case 'U':
        r.what = "update";
        decode_update(&r, msg);
        break;
    case 'D':
        r.what = "delete";
        decode_delete(&r, msg);
        break;
    case 'T':
        r.what = "truncate";
        decode_truncate(&r, msg);
        break;
    case 'M':
        r.what = "message";
        decode_message(&r, msg);
        break;
    default:
        set_err(err, errlen, "unknown pgoutput message type %s", byte_desc(b, type));
        return -1;
    }
    if (r.failed)
        return -1;
    if (r.pos != len) {
        set_err(err, errlen, "%s: %zu trailing byte%s after a complete %zu-byte message", r.what,
                len - r.pos, len - r.pos == 1 ? "" : "s", r.pos);
        return -1;
    }
    msg->kind = (PgoKind)type;
    return 0;
}
