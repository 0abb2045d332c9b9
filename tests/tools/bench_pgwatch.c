/*
 * bench_pgwatch - PostgreSQL alone, live: a bare pgoutput consumer that times every transaction
 * from its commit to the moment its Commit message is read.
 *
 * It is "PG alone" of scripts/bench's live floor. A consumer in Python (psycopg2) spent tens of
 * microseconds per message and at 20k rows/s became the slowest part of what it measured; this
 * one does no more per message than any client must: PQgetCopyData, a look at the first byte,
 * and for a Commit its commit time (pgoutput v1: 'C', flags, commit LSN, end LSN, commit time in
 * µs since 2000-01-01) beside the wall clock. It confirms the end LSN every second and answers
 * keepalives that ask for a reply, as a real subscriber does.
 *
 * Usage: bench_pgwatch --dsn CONNINFO --slot S --publication P --out FILE
 * Prints "ready" once streaming; on SIGTERM or SIGINT writes FILE as every commit time (unix
 * seconds, doubles) followed by every latency (seconds, doubles), as scripts/bench reads it.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#define PG_EPOCH_US INT64_C(946684800000000)

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static int64_t unix_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint64_t get64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | (unsigned char)p[i];
    return v;
}

static void put64(char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (char)(v & 0xff);
}

static int send_status(PGconn *conn, uint64_t lsn)
{
    char m[34];
    m[0] = 'r';
    put64(m + 1, lsn);
    put64(m + 9, lsn);
    put64(m + 17, lsn);
    put64(m + 25, (uint64_t)(unix_us() - PG_EPOCH_US));
    m[33] = 0;
    return PQputCopyData(conn, m, sizeof(m)) == 1 && PQflush(conn) == 0 ? 0 : -1;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_pgwatch --dsn CONNINFO --slot S --publication P --out FILE\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *dsn = NULL, *slot = NULL, *pub = NULL, *out = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--dsn") == 0)
            dsn = argv[i + 1];
        else if (strcmp(argv[i], "--slot") == 0)
            slot = argv[i + 1];
        else if (strcmp(argv[i], "--publication") == 0)
            pub = argv[i + 1];
        else if (strcmp(argv[i], "--out") == 0)
            out = argv[i + 1];
        else
            usage();
    }
    if (!dsn || !slot || !pub || !out)
        usage();
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    const char *keys[] = {"dbname", "replication", NULL};
    const char *vals[] = {dsn, "database", NULL};
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(conn) != CONNECTION_OK) {
        fprintf(stderr, "bench_pgwatch: %s", PQerrorMessage(conn));
        return 1;
    }
    char sql[512];
    snprintf(sql, sizeof(sql),
             "START_REPLICATION SLOT \"%s\" LOGICAL 0/0 (proto_version '1', "
             "publication_names '\"%s\"')",
             slot, pub);
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_COPY_BOTH) {
        fprintf(stderr, "bench_pgwatch: %s", PQerrorMessage(conn));
        return 1;
    }
    PQclear(res);
    printf("ready\n");
    fflush(stdout);

    size_t cap = 1 << 16, n = 0;
    double *commits = malloc(cap * sizeof(double)), *lats = malloc(cap * sizeof(double));
    uint64_t flushed = 0, confirm = 0;
    int64_t next_status = 0;
    while (!stop && commits && lats) {
        char *buf = NULL;
        int len = PQgetCopyData(conn, &buf, 1);
        if (len == 0) {
            struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
            if (poll(&pfd, 1, 200) < 0 && errno != EINTR)
                break;
            if (!PQconsumeInput(conn))
                break;
        } else if (len < 0) {
            break;
        } else {
            int64_t now = unix_us();
            if (buf[0] == 'w' && len > 25 && buf[25] == 'C' && len >= 25 + 26) {
                int64_t ct = (int64_t)get64(buf + 25 + 18) + PG_EPOCH_US;
                confirm = get64(buf + 25 + 10);
                if (n == cap) {
                    cap *= 2;
                    commits = realloc(commits, cap * sizeof(double));
                    lats = realloc(lats, cap * sizeof(double));
                    if (!commits || !lats)
                        break;
                }
                commits[n] = (double)ct / 1e6;
                lats[n] = (double)(now - ct) / 1e6;
                n++;
            } else if (buf[0] == 'k' && len >= 18 && buf[17]) {
                next_status = 0; /* a reply is asked for */
            }
            PQfreemem(buf);
        }
        int64_t mono = unix_us();
        if (mono >= next_status) {
            if (confirm > flushed || next_status == 0) {
                if (send_status(conn, confirm) < 0)
                    break;
                flushed = confirm;
            }
            next_status = mono + 1000000;
        }
    }
    FILE *f = fopen(out, "wb");
    if (!f || !commits || !lats || fwrite(commits, sizeof(double), n, f) != n ||
        fwrite(lats, sizeof(double), n, f) != n) {
        fprintf(stderr, "bench_pgwatch: could not write %s\n", out);
        return 1;
    }
    fclose(f);
    PQfinish(conn);
    free(commits);
    free(lats);
    return 0;
}
