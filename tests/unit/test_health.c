/*
 * test_health.c - `outboxd health`: where it asks (health_target), how it reads the answer
 * (health_parse_response, health_body_line), and one round trip against the real listener
 * (http_start) on a free loopback port: 200 on /healthz, 503 on /readyz before the relay is
 * ready, exit 1 when nothing listens.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "outboxd/health.h"
#include "outboxd/http.h"
#include "outboxd/util.h"

static void check_target(const char *addr, const char *want_host, const char *want_port)
{
    char host[64] = "unchanged", port[6] = "";
    bool ok = health_target(addr, host, sizeof host, port);
    CHECK(ok);
    if (ok) {
        CHECK_STR(host, want_host);
        CHECK_STR(port, want_port);
    }
}

static void test_target(void)
{
    check_target(":9847", "127.0.0.1", "9847");
    check_target("9847", "127.0.0.1", "9847");
    check_target("0.0.0.0:9847", "127.0.0.1", "9847");
    check_target("[::]:9847", "::1", "9847");
    check_target("127.0.0.1:80", "127.0.0.1", "80");
    check_target("10.1.2.3:9847", "10.1.2.3", "9847");
    check_target("[::1]:9847", "::1", "9847");
    check_target("localhost:9847", "localhost", "9847");

    char host[64], port[6];
    CHECK(!health_target("off", host, sizeof host, port));
    CHECK(!health_target("", host, sizeof host, port));
    CHECK(!health_target(":0", host, sizeof host, port));
    CHECK(!health_target(":65536", host, sizeof host, port));
    CHECK(!health_target("::1:9847", host, sizeof host, port));
    CHECK(!health_target("[::1]9847", host, sizeof host, port));
    CHECK(!health_target("host:", host, sizeof host, port));
    char tiny[4];
    CHECK(!health_target(":9847", tiny, sizeof tiny, port)); /* "127.0.0.1" does not fit */
}

static void check_parse(const char *resp, int want_status, const char *want_body)
{
    int status = -1;
    const char *body = NULL;
    size_t body_len = 99;
    bool ok = health_parse_response(resp, strlen(resp), &status, &body, &body_len);
    CHECK(ok);
    if (ok) {
        CHECK(status == want_status);
        CHECK_MEM(body, body_len, want_body, strlen(want_body));
    }
}

static void test_parse(void)
{
    check_parse("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n", 200,
                "ok\n");
    check_parse("HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n"
                "standby: another relay holds the slot\n",
                503, "standby: another relay holds the slot\n");
    check_parse("HTTP/1.0 404 Not Found\n\nnot found\n", 404, "not found\n"); /* bare LF */
    check_parse("HTTP/1.1 200\r\n\r\nready\n", 200, "ready\n");             /* no reason */
    check_parse("HTTP/1.1 200 OK\r\n\r\n", 200, "");                         /* empty body */
    check_parse("HTTP/1.0 200 OK\r\nX: y\r\n", 200, "");          /* cut before the body */
    check_parse("HTTP/1.0 200", 200, "");                          /* only the status line */
    check_parse("HTTP/1.0 200 OK\r\n\r\nline one\r\n\r\nline two", 200,
                "line one\r\n\r\nline two"); /* only the first blank line ends the headers */

    const char *bad[] = {
        "",
        "HTTP/1.0",
        "HTTP/1.0 20",
        "HTTP/2 200 OK\r\n\r\n",
        "http/1.0 200 OK\r\n\r\n",
        "HTTP/1.0 2x0 OK\r\n\r\n",
        "HTTP/1.0 2000 OK\r\n\r\n",
        "HTTP/1.0  200 OK\r\n\r\n",
        "SSH-2.0-OpenSSH_9.2\r\n",
        "ok\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int status = -1;
        const char *body = NULL;
        size_t body_len = 0;
        if (health_parse_response(bad[i], strlen(bad[i]), &status, &body, &body_len)) {
            check_failures++;
            fprintf(stderr, "%s:%d: \"%s\" parsed as a response\n", __FILE__, __LINE__, bad[i]);
        }
        check_count++;
    }
}

static void test_body_line(void)
{
    char out[16];
    health_body_line("ready\n", 6, out, sizeof out);
    CHECK_STR(out, "ready");
    health_body_line("ok\r\nmore\n", 9, out, sizeof out);
    CHECK_STR(out, "ok");
    health_body_line("", 0, out, sizeof out);
    CHECK_STR(out, "");
    health_body_line("a\tb\x1b[31mc\x7f", 10, out, sizeof out);
    CHECK_STR(out, "a?b?[31mc?");
    health_body_line("no newline at all, and long", 27, out, sizeof out);
    CHECK_STR(out, "no newline at a"); /* 15 bytes and the terminator */
    health_body_line("a\rb\n", 4, out, sizeof out);
    CHECK_STR(out, "a?b");
}

/* A port nobody listens on right now: bind :0, read the port, close. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int one = 1; /* the port may hold the listener's connections in TIME_WAIT */
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        perror("free_port");
        exit(1);
    }
    close(fd);
    return ntohs(a.sin_port);
}

/* What health_main printed last (its stdout). */
static char printed[512];

/* health_main with the given arguments; its stdout goes to printed[]. */
static int probe(const char *a1, const char *a2, const char *a3)
{
    char *argv[4] = {(char *)a1, (char *)a2, (char *)a3, NULL};
    int argc = a1 ? (a2 ? (a3 ? 3 : 2) : 1) : 0;
    FILE *tmp = tmpfile();
    if (!tmp) {
        perror("tmpfile");
        exit(1);
    }
    fflush(stdout);
    int saved = dup(1);
    dup2(fileno(tmp), 1);
    int rc = health_main(argc, argv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    rewind(tmp);
    size_t n = fread(printed, 1, sizeof printed - 1, tmp);
    printed[n] = '\0';
    fclose(tmp);
    return rc;
}

static void test_round_trip(void)
{
    static Metrics m; /* not started: alive is stale, not ready */
    int port = free_port();
    char addr[32], flag[48];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    snprintf(flag, sizeof flag, "--http-addr=:%d", port);

    /* Nothing listens yet: exit 1. */
    CHECK(probe(flag, "--timeout=2s", NULL) == 1);

    HttpServer *s = NULL;
    char err[256];
    if (http_start(&s, addr, &m, err, sizeof err) != 0) {
        fprintf(stderr, "http_start %s: %s\n", addr, err);
        check_failures++;
        return;
    }
    /* A Metrics the relay never touched is neither alive nor ready: 503 on both. */
    CHECK(probe(flag, NULL, NULL) == 1);
    CHECK_STR(printed, "503 /healthz: stalled\n");
    CHECK(probe(flag, "--ready", NULL) == 1);
    CHECK_STR(printed, "503 /readyz: not ready: postgres disconnected\n");
    /* The loop turns, both connections are up: 200 on both. */
    m.heartbeat_mono_us = now_mono_us();
    m.pg_connected = 1;
    m.nats_connected = 1;
    CHECK(probe(flag, NULL, NULL) == 0);
    CHECK_STR(printed, "200 /healthz: ok\n");
    CHECK(probe("--ready", flag, "--timeout=1s") == 0);
    CHECK_STR(printed, "200 /readyz: ready\n");
    m.standby = 1;
    CHECK(probe(flag, "--ready", NULL) == 1);
    CHECK_STR(printed, "503 /readyz: standby: another relay holds the slot\n");
    http_stop(s);

    /* A listener that accepts but never answers: exit 1 once --timeout passes. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int one = 1; /* the port may hold the listener's connections in TIME_WAIT */
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 4) != 0) {
        perror("silent listener");
        exit(1);
    }
    int64_t t0 = now_mono_us();
    CHECK(probe(flag, "--timeout=300ms", NULL) == 1);
    int64_t took = now_mono_us() - t0;
    CHECK(took >= 250000 && took < 2000000);
    close(fd);

    /* Bad options and settings: exit 2. */
    CHECK(probe("--timeout", NULL, NULL) == 2);
    CHECK(probe("--timeout=0s", NULL, NULL) == 2);
    CHECK(probe("--timeout=soon", NULL, NULL) == 2);
    CHECK(probe("--http-addr=nonsense:port", NULL, NULL) == 2);
    CHECK(probe("--no-such-setting", NULL, NULL) == 2);
    CHECK(probe("--http-addr=off", NULL, NULL) == 1);
}

extern char **environ;

/* health_main reads its settings as the relay does, and refuses OUTBOXD_* variables it does
 * not know: run it in an environment without the caller's (a test runner's OUTBOXD_TEST_*). */
static void clean_environment(void)
{
    for (size_t i = 0; environ[i];) {
        if (strncmp(environ[i], "OUTBOXD_", 8) == 0) {
            char name[128];
            snprintf(name, sizeof(name), "%.*s", (int)strcspn(environ[i], "="), environ[i]);
            unsetenv(name); /* environ changes: look at the same index again */
        } else {
            i++;
        }
    }
}

int main(void)
{
    clean_environment();
    test_target();
    test_parse();
    test_body_line();
    test_round_trip();
    return check_report("test_health");
}
