/*
 * monitor.h - the relay's monitoring thread: its slow PostgreSQL queries, off the relay's thread.
 */
#ifndef OUTBOXD_MONITOR_H
#define OUTBOXD_MONITOR_H

#include <stdbool.h>
#include <stdint.h>

#include "outboxd/bookmark.h"

typedef struct Monitor Monitor;

/*
 * Starts the thread. It opens an ordinary session to conninfo of its own and, while the relay
 * says it streams (monitor_set_streaming), reads the server's WAL position into
 * metrics.server_wal_lsn every wal_every_us and makes the bookmarks (bookmark_tick). Takes
 * ownership of bookmarks (NULL: none) and sets *bookmarks to NULL. Never fails for the relay:
 * without a thread the gauge stays as keepalives set it and no bookmarks are made (logged).
 */
void monitor_start(Monitor **out, const char *conninfo, Bookmarks **bookmarks,
                   int64_t wal_every_us);
/* Whether the relay streams from its slot: bookmarks copy the slot only then. */
void monitor_set_streaming(Monitor *m, bool streaming);
/* Stops the thread (after the query it may be in) and frees everything; accepts NULL. */
void monitor_stop(Monitor *m);

#endif
