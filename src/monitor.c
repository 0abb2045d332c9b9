/*
 * monitor.c - the relay's monitoring thread.
 *
 * The relay's thread owns the replication connection and the decode, map and publish path, and
 * every moment it spends waiting on anything else is added to the latency of the events behind
 * it. Two things it used to do in between were synchronous round trips to PostgreSQL on a
 * second, ordinary session: reading pg_current_wal_lsn() every 5 s for the lag gauge, and the
 * bookmarks (a listing, perhaps drops, and a pg_copy_logical_replication_slot() that waits for
 * the server to copy the slot). On a busy two-core machine such a round trip took milliseconds,
 * with the relay's publishing stopped meanwhile. This thread does both, with a session of its
 * own, and hands back nothing but an atomic: metrics.server_wal_lsn (which keepalives on the
 * relay's thread also move forward). The relay tells it whether it streams from its slot
 * (an atomic flag): a standby, or a relay between sessions, makes no bookmarks, as before.
 *
 * Failures are best effort, as they were on the relay's thread: a query that fails closes the
 * session, and the next tick opens it again. Stopping waits for a query in progress; queries on
 * this session are short (and bounded where pgstream bounds queries).
 */
#include "outboxd/monitor.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "outboxd/log.h"
#include "outboxd/metrics.h"
#include "outboxd/pgstream.h"
#include "outboxd/util.h"

struct Monitor {
    char *conninfo;
    Bookmarks *bookmarks;
    int64_t wal_every_us;
    int64_t tick_us;
    PgStream *conn; /* the thread's */
    atomic_bool streaming;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop; /* under lock */
};

/* Sleeps us or until stop; true when stopping. */
static bool nap(Monitor *m, int64_t us)
{
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += us / 1000000;
    until.tv_nsec += (us % 1000000) * 1000;
    if (until.tv_nsec >= 1000000000) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000;
    }
    pthread_mutex_lock(&m->lock);
    while (!m->stop && pthread_cond_timedwait(&m->wake, &m->lock, &until) == 0)
        ;
    bool stop = m->stop;
    pthread_mutex_unlock(&m->lock);
    return stop;
}

static bool session(Monitor *m)
{
    char err[1024];
    if (!m->conn && pgstream_connect_plain(&m->conn, m->conninfo, err, sizeof(err)) != 0) {
        log_debug("monitoring session: %s", err);
        m->conn = NULL;
        return false;
    }
    return true;
}

static void drop_session(Monitor *m)
{
    pgstream_free(m->conn);
    m->conn = NULL;
}

static void *monitor_main(void *arg)
{
    Monitor *m = arg;
    int64_t next_wal = 0;
    char err[1024];
    while (!nap(m, m->tick_us)) {
        if (!atomic_load(&m->streaming))
            continue;
        int64_t now = now_mono_us();
        if (now >= next_wal && session(m)) {
            next_wal = now + m->wal_every_us;
            uint64_t lsn;
            if (pgstream_wal_lsn(m->conn, &lsn, err, sizeof(err)) < 0) {
                log_debug("monitoring session: %s", err);
                drop_session(m);
            } else {
                atomic_store_explicit(&metrics.server_wal_lsn, lsn, memory_order_relaxed);
            }
        }
        if (m->bookmarks && session(m) && bookmark_tick(m->bookmarks, m->conn, now_unix_us()) < 0)
            drop_session(m);
    }
    drop_session(m);
    return NULL;
}

void monitor_start(Monitor **out, const char *conninfo, Bookmarks **bookmarks,
                   int64_t wal_every_us)
{
    Monitor *m = xcalloc(1, sizeof(*m));
    m->conninfo = xstrdup(conninfo);
    m->bookmarks = *bookmarks;
    *bookmarks = NULL;
    m->wal_every_us = wal_every_us;
    /* Bookmarks are due at their own times (bookmark_tick knows them), and streaming starts
     * at any moment: look every second. */
    m->tick_us = wal_every_us < 1000000 ? wal_every_us : 1000000;
    atomic_init(&m->streaming, false);
    pthread_mutex_init(&m->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&m->wake, &attr);
    pthread_condattr_destroy(&attr);
    /* Signals go to the relay's thread: start this one with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&m->thread, NULL, monitor_main, m);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        log_warn("could not start the monitoring thread: %s; the WAL position gauge follows "
                 "keepalives only%s",
                 strerror(rc), m->bookmarks ? " and no bookmarks are made" : "");
        pthread_cond_destroy(&m->wake);
        pthread_mutex_destroy(&m->lock);
        bookmarks_free(m->bookmarks);
        free(m->conninfo);
        free(m);
        m = NULL;
    }
    *out = m;
}

void monitor_set_streaming(Monitor *m, bool streaming)
{
    if (m)
        atomic_store(&m->streaming, streaming);
}

void monitor_stop(Monitor *m)
{
    if (!m)
        return;
    pthread_mutex_lock(&m->lock);
    m->stop = true;
    pthread_cond_signal(&m->wake);
    pthread_mutex_unlock(&m->lock);
    pthread_join(m->thread, NULL);
    pthread_cond_destroy(&m->wake);
    pthread_mutex_destroy(&m->lock);
    bookmarks_free(m->bookmarks);
    free(m->conninfo);
    free(m);
}
