/*
 * bookmark.h - rolling copies of the relay's slot, so that `outboxd rewind` can go back.
 *
 * A logical slot cannot move backwards. A copy of it (pg_copy_logical_replication_slot) keeps
 * its position and the WAL after it, so the running relay copies its slot every
 * --bookmark-every into "<slot>_bm_<unix seconds>" and drops the copies older than
 * --bookmark-keep. The time in the name is taken after the copy was made: the bookmark's
 * position is one the relay had confirmed by then, so every transaction committed at or after
 * that time lies after it. Bookmarks are made over an ordinary (plain) connection, never the
 * replication stream's.
 *
 * Costs: every bookmark holds the WAL (and the catalog rows logical decoding needs) from its
 * position on, until it is dropped.
 */
#ifndef OUTBOXD_BOOKMARK_H
#define OUTBOXD_BOOKMARK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "outboxd/pgstream.h"

/* Slot names are at most 63 bytes; a bookmark adds "_bm_" and 10 digits. */
#define BOOKMARK_MAX_NAME 63
#define BOOKMARK_SUFFIX "_bm_"
#define BOOKMARK_MAX_SLOT (BOOKMARK_MAX_NAME - (int)(sizeof(BOOKMARK_SUFFIX) - 1) - 10)
/* Replication slots bookmarks always leave free: one for a rewind's scratch copy, one for a
 * second relay (or another consumer) to be created. */
#define BOOKMARK_FREE_SLOTS 2

/*
 * Checks that bookmarks can be named after slot. Returns 0, or -1 with a message saying how
 * long the slot name may be (for the relay to refuse at start).
 */
int bookmark_check_slot(const char *slot, char *err, size_t errlen);

/* The bookmark name of slot for unix_s, into out (at least 64 bytes). */
void bookmark_name(const char *slot, int64_t unix_s, char *out, size_t outlen);

/* True when name is a bookmark of slot; its time (unix seconds) goes into *unix_s. */
bool bookmark_parse(const char *slot, const char *name, int64_t *unix_s);

typedef struct Bookmarks Bookmarks;

/*
 * Bookmarks of slot every every_ms (> 0), kept for keep_ms. Returns 0, or -1 when the slot
 * name leaves no room for the bookmark suffix (err says so).
 */
int bookmarks_new(Bookmarks **out, const char *slot, int64_t every_ms, int64_t keep_ms, char *err,
                  size_t errlen);
void bookmarks_free(Bookmarks *b);

/*
 * Called from the relay's loop as often as it likes: when a bookmark is due, drops the
 * bookmarks older than keep and copies the slot over conn (a plain connection), unless that
 * would leave fewer than BOOKMARK_FREE_SLOTS replication slots free. Cheap when nothing is
 * due. Failures are logged (warn once, then debug until it works again) and retried at the
 * next interval. Returns 0, or -1 when the connection looks lost (no SQLSTATE, or class 08):
 * the caller should open it again.
 */
int bookmark_tick(Bookmarks *b, PgStream *conn, int64_t now_unix_us);

#endif
