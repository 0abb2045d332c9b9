/*
 * pgoutput.h - a pure decoder for the logical replication stream: the CopyData frames of a
 * START_REPLICATION session ('w' XLogData, 'k' keepalive) and the pgoutput protocol version 1
 * messages inside XLogData (Begin, Commit, Relation, Insert, ...). No I/O, no allocation.
 *
 * Every decoded string and value points into the caller's buffer and lives as long as it does.
 * Every length is checked against the buffer: a truncated or corrupt message yields -1 and a
 * one-line reason, never a read past the end.
 */
#ifndef OUTBOXD_PGOUTPUT_H
#define OUTBOXD_PGOUTPUT_H

#include <stddef.h>
#include <stdint.h>

/* PostgreSQL allows at most 1664 columns in a row. */
#define PGO_MAX_COLUMNS 1664

/* ---- CopyData framing ------------------------------------------------------------------- */

typedef enum PgCopyKind {
    PG_COPY_XLOGDATA,  /* 'w' */
    PG_COPY_KEEPALIVE, /* 'k' */
} PgCopyKind;

typedef struct PgCopyMsg {
    PgCopyKind kind;
    uint64_t wal_start;     /* 'w': the message's own LSN (0/0 for Relation and Type) */
    uint64_t wal_end;       /* 'w': same as wal_start for logical decoding; 'k': the server's
                               sent position */
    int64_t send_time;      /* µs since 2000-01-01 */
    int reply_requested;    /* 'k' only */
    const char *data;       /* 'w': the pgoutput message */
    size_t len;
} PgCopyMsg;

/* Decodes one CopyData message. Returns 0, or -1 with a reason in err; out is written only on
 * success. A 'w' payload is the rest of the frame (possibly empty: pgoutput_decode rejects it). */
int pgcopy_decode(const char *buf, size_t len, PgCopyMsg *out, char *err, size_t errlen);

/* Encodes a standby status update ('r', 34 bytes) into out. now_unix_us is Unix time in µs. */
void pgcopy_encode_status(char out[34], uint64_t write_lsn, uint64_t flush_lsn, uint64_t apply_lsn,
                          int64_t now_unix_us, int reply_requested);

/* ---- pgoutput messages ------------------------------------------------------------------ */

typedef enum PgoKind {
    PGO_BEGIN = 'B',
    PGO_COMMIT = 'C',
    PGO_ORIGIN = 'O',
    PGO_RELATION = 'R',
    PGO_TYPE = 'Y',
    PGO_INSERT = 'I',
    PGO_UPDATE = 'U',
    PGO_DELETE = 'D',
    PGO_TRUNCATE = 'T',
    PGO_MESSAGE = 'M',
} PgoKind;

typedef struct PgoColumn {
    uint8_t flags;     /* 1 = part of the key */
    const char *name;  /* NUL-terminated, inside the buffer */
    uint32_t type_oid;
    int32_t typmod;
} PgoColumn;

/* One column of a TupleData. kind is 'n' (null), 'u' (unchanged TOAST), 't' (text), 'b' (binary). */
typedef struct PgoValue {
    char kind;
    const char *data; /* not NUL-terminated; NULL for 'n' and 'u' */
    uint32_t len;
} PgoValue;

typedef struct PgoMessage {
    PgoKind kind;
    union {
        struct { uint64_t final_lsn; int64_t commit_time; uint32_t xid; } begin;
        struct { uint8_t flags; uint64_t commit_lsn; uint64_t end_lsn; int64_t commit_time; } commit;
        struct { uint64_t commit_lsn; const char *name; } origin;
        struct {
            uint32_t relid;
            const char *nspname;
            const char *relname;
            char replident;
            uint16_t ncols; /* columns in cols[] */
        } relation;
        struct { uint32_t oid; const char *nspname; const char *typname; } type;
        struct {
            uint32_t relid;
            uint16_t ncols; /* values in values[] */
        } insert;
        struct { uint32_t relid; } update, del; /* decoded only as far as the relation id */
        struct { uint32_t nrels; uint8_t options; } truncate;
        struct {
            uint8_t flags; /* 1 = transactional */
            uint64_t lsn;
            const char *prefix;
            const char *content;
            uint32_t len;
        } message;
    } u;
    /* Filled for PGO_RELATION and PGO_INSERT; reused between calls, never allocated. */
    PgoColumn cols[PGO_MAX_COLUMNS];
    PgoValue values[PGO_MAX_COLUMNS];
} PgoMessage;

/*
 * Decodes one pgoutput (protocol version 1) message. For PGO_RELATION fills msg->cols, for
 * PGO_INSERT fills msg->values (the new tuple). Update and Delete tuples are checked but not
 * returned. Returns 0, or -1 with a one-line reason in err naming the message type and what was
 * wrong ("insert: column 3: length 4096 runs past the end of a 57-byte message"); on failure
 * *msg is partly overwritten. An unknown message type, and any byte after the end of a message's
 * layout, is an error.
 */
int pgoutput_decode(const char *buf, size_t len, PgoMessage *msg, char *err, size_t errlen);

#endif
