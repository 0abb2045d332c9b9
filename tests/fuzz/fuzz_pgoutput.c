/*
 * fuzz_pgoutput - the replication stream decoder on hostile bytes.
 *
 * Each input goes to pgcopy_decode() (a CopyData frame) and to pgoutput_decode() (a pgoutput
 * message), and the payload of a decoded 'w' frame goes to pgoutput_decode() as well, as the
 * relay does. The input is copied into an exact-size block first so any read past its end is an
 * AddressSanitizer report. Beyond "never crash", the checks are the header's contracts: on
 * success every decoded pointer and length lies inside the buffer and every name ends inside
 * it; on failure the reason is a non-empty single line.
 *
 * Seeds: the .bin files of tests/fixtures/pgoutput (real frames and messages), copied into
 * corpus/fuzz_pgoutput.
 */
#include <string.h>

#include "fuzz.h"
#include "outboxd/pgoutput.h"

static PgoMessage msg; /* ~64 KiB: not on the stack */

static bool inside(const char *buf, size_t len, const char *p, size_t n)
{
    return p >= buf && (size_t)(p - buf) <= len && n <= len - (size_t)(p - buf);
}

/* A NUL-terminated string that starts and ends inside buf. */
static bool str_inside(const char *buf, size_t len, const char *s)
{
    if (!s || !inside(buf, len, s, 0))
        return false;
    return memchr(s, '\0', len - (size_t)(s - buf)) != NULL;
}

static void check_err(const char *err)
{
    size_t n = strlen(err);
    FUZZ_ASSERT(n > 0);
    FUZZ_ASSERT(fuzz_one_line(err, n));
}

static void decode_message(const char *buf, size_t len)
{
    char err[256];
    err[0] = '\0';
    if (pgoutput_decode(buf, len, &msg, err, sizeof err) < 0) {
        check_err(err);
        return;
    }
    FUZZ_ASSERT(len > 0 && (unsigned char)buf[0] == (unsigned char)msg.kind);
    switch (msg.kind) {
    case PGO_ORIGIN:
        FUZZ_ASSERT(str_inside(buf, len, msg.u.origin.name));
        break;
    case PGO_RELATION:
        FUZZ_ASSERT(str_inside(buf, len, msg.u.relation.nspname));
        FUZZ_ASSERT(str_inside(buf, len, msg.u.relation.relname));
        FUZZ_ASSERT(msg.u.relation.ncols <= PGO_MAX_COLUMNS);
        for (uint16_t i = 0; i < msg.u.relation.ncols; i++)
            FUZZ_ASSERT(str_inside(buf, len, msg.cols[i].name));
        break;
    case PGO_TYPE:
        FUZZ_ASSERT(str_inside(buf, len, msg.u.type.nspname));
        FUZZ_ASSERT(str_inside(buf, len, msg.u.type.typname));
        break;
    case PGO_INSERT:
        FUZZ_ASSERT(msg.u.insert.ncols <= PGO_MAX_COLUMNS);
        for (uint16_t i = 0; i < msg.u.insert.ncols; i++) {
            const PgoValue *v = &msg.values[i];
            switch (v->kind) {
            case 'n':
            case 'u':
                FUZZ_ASSERT(v->data == NULL);
                break;
            case 't':
            case 'b':
                FUZZ_ASSERT(v->data != NULL && inside(buf, len, v->data, v->len));
                break;
            default:
                FUZZ_ASSERT(!"value kind other than n, u, t, b");
            }
        }
        break;
    case PGO_MESSAGE:
        FUZZ_ASSERT(str_inside(buf, len, msg.u.message.prefix));
        FUZZ_ASSERT(msg.u.message.len == 0 ||
                    inside(buf, len, msg.u.message.content, msg.u.message.len));
        break;
    default:
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = fuzz_dup(data, size);
    char err[256];

    err[0] = '\0';
    PgCopyMsg cm;
    memset(&cm, 0xa5, sizeof cm);
    PgCopyMsg before = cm;
    if (pgcopy_decode(buf, size, &cm, err, sizeof err) == 0) {
        if (cm.kind == PG_COPY_XLOGDATA) {
            FUZZ_ASSERT(inside(buf, size, cm.data, cm.len));
            /* The payload on its own, in its own block, as the relay passes it on. */
            char *payload = fuzz_dup(cm.data, cm.len);
            decode_message(payload, cm.len);
            free(payload);
        } else {
            FUZZ_ASSERT(cm.kind == PG_COPY_KEEPALIVE);
        }
    } else {
        check_err(err);
        FUZZ_ASSERT(memcmp(&cm, &before, sizeof cm) == 0); /* out written only on success */
    }

    decode_message(buf, size);
    free(buf);
    return 0;
}
