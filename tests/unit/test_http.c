/*
 * test_http.c - the /metrics, /healthz, /readyz listener, fetched with a tiny socket client.
 * Every socket operation is bounded by a timeout, so a broken server fails the test instead of
 * hanging it.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "check.h"
#include "outboxd/http.h"

#define IO_TIMEOUT_S 5

static Metrics m;

static void set_timeouts(int fd)
{
    struct timeval tv = {.tv_sec = IO_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* bounds connect() too */
}

/* A port nobody listens on right now: bind :0, read the port, close. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        perror("free_port");
        exit(1);
    }
    close(fd);
    return ntohs(a.sin_port);
}

typedef struct Response {
    int status;       /* -1: no response (refused, reset, timed out) */
    Buf raw;          /* everything read */
    const char *body; /* into raw, after the blank line */
} Response;

/* Sends req to host:port (IPv4 or IPv6 literal) and reads until the server closes. */
static void fetch_from(const char *host, int port, const char *req, size_t reqlen, Response *r)
{
    r->status = -1;
    r->body = NULL;
    buf_reset(&r->raw);

    struct sockaddr_storage ss = {0};
    socklen_t sslen;
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        sslen = sizeof *a4;
    } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        sslen = sizeof *a6;
    } else {
        return;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    set_timeouts(fd);
    if (connect(fd, (struct sockaddr *)&ss, sslen) != 0) {
        close(fd);
        return;
    }
    /* The server may refuse before reading everything: a failed send is not an error here. */
    for (size_t off = 0; off < reqlen;) {
        ssize_t n = send(fd, req + off, reqlen - off, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        off += (size_t)n;
    }
    char chunk[4096];
    for (;;) {
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n <= 0)
            break;
        buf_append(&r->raw, chunk, (size_t)n);
    }
    close(fd);

    if (r->raw.len == 0)
        return;
    int status;
    if (sscanf(r->raw.data, "HTTP/1.%*d %d ", &status) == 1)
        r->status = status;
    const char *sep = strstr(r->raw.data, "\r\n\r\n");
    r->body = sep ? sep + 4 : NULL;
}

static void fetch(int port, const char *req, Response *r)
{
    fetch_from("127.0.0.1", port, req, strlen(req), r);
}

/* True when the response has the header line "name: value" (name case-insensitively). */
static bool has_header(const Response *r, const char *name, const char *value)
{
    const char *end = r->body ? r->body : r->raw.data + r->raw.len;
    size_t nl = strlen(name), vl = strlen(value);
    for (const char *p = r->raw.data; p && p < end; p = strstr(p, "\r\n"), p = p ? p + 2 : NULL) {
        if (strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ')
                v++;
            if (strncmp(v, value, vl) == 0 && v[vl] == '\r')
                return true;
        }
    }
    return false;
}

static void test_routes(int port)
{
    Response r;
    buf_init(&r.raw);

    fetch(port, "GET /metrics HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    CHECK(r.body && strstr(r.body, "\noutboxd_build_info{version=\""));
    CHECK(r.body && strstr(r.body, "\noutboxd_events_published_total 0\n"));
    CHECK(has_header(&r, "Content-Type", "text/plain; version=0.0.4; charset=utf-8"));

    /* The scrape reads the live values. */
    m.events_published = 42;
    fetch(port, "GET /metrics HTTP/1.0\r\n\r\n", &r);
    CHECK(r.body && strstr(r.body, "\noutboxd_events_published_total 42\n"));

    /* Query strings are ignored; HTTP/1.1 works too (Connection: close to end the read). */
    fetch(port, "GET /metrics?name[]=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &r);
    CHECK(r.status == 200);
    CHECK(r.body && strstr(r.body, "outboxd_build_info"));

    /* HEAD: headers, no body. */
    fetch(port, "HEAD /metrics HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    CHECK(r.body && r.body[0] == '\0');
    CHECK(has_header(&r, "Content-Type", "text/plain; version=0.0.4; charset=utf-8"));

    /* /healthz follows the relay loop's heartbeat. */
    m.heartbeat_mono_us = 0;
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 503);
    CHECK_STR(r.body, "stalled\n");
    m.heartbeat_mono_us = now_mono_us();
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    CHECK_STR(r.body, "ok\n");
    CHECK(has_header(&r, "Content-Type", "text/plain; charset=utf-8"));
    m.heartbeat_mono_us = now_mono_us() - INT64_C(31000000);
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 503);
    m.heartbeat_mono_us = now_mono_us(); /* alive for the rest of the test */

    /* /readyz: postgres, then NATS, and not on standby. */
    fetch(port, "GET /readyz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 503);
    CHECK_STR(r.body, "not ready: postgres disconnected\n");
    m.pg_connected = 1;
    fetch(port, "GET /readyz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 503);
    CHECK_STR(r.body, "not ready: nats disconnected\n");
    m.nats_connected = 1;
    fetch(port, "GET /readyz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    CHECK_STR(r.body, "ready\n");
    m.standby = 1;
    fetch(port, "GET /readyz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 503);
    CHECK_STR(r.body, "standby: another relay holds the slot\n");
    m.standby = 0;

    /* Nothing else is served. */
    fetch(port, "GET /nope HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 404);
    CHECK_STR(r.body, "not found\n");
    fetch(port, "GET / HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 404);
    fetch(port, "GET /metrics/ HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 404);
    fetch(port, "GET /../metrics HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 404 || r.status == 400);

    /* Only GET and HEAD; no bodies. */
    fetch(port, "POST /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", &r);
    CHECK(r.status == 405);
    CHECK(has_header(&r, "Allow", "GET, HEAD"));
    fetch(port, "DELETE /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 405);
    fetch(port, "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &r);
    CHECK(r.status == 405);
    fetch(port, "GET /metrics HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", &r);
    CHECK(r.status == 413);
    fetch(port,
          "GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
          "Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
          &r);
    CHECK(r.status == 413);
    fetch(port, "GET /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n", &r);
    CHECK(r.status == 200);

    /* Garbage gets an error, not a crash. */
    fetch(port, "\x01\x02 nonsense\r\n\r\n", &r);
    CHECK(r.status == -1 || r.status == 400);

    /* A 100 KiB request header is refused (431, or the connection is dropped)... */
    Buf big;
    buf_init(&big);
    buf_puts(&big, "GET /metrics HTTP/1.0\r\nX-Big: ");
    for (int i = 0; i < 100 * 1024; i++)
        buf_putc(&big, 'a');
    buf_puts(&big, "\r\n\r\n");
    fetch_from("127.0.0.1", port, big.data, big.len, &r);
    CHECK(r.status == -1 || (r.status >= 400 && r.status < 500));
    /* ...and so is a 100 KiB URL. */
    buf_reset(&big);
    buf_puts(&big, "GET /");
    for (int i = 0; i < 100 * 1024; i++)
        buf_putc(&big, 'a');
    buf_puts(&big, " HTTP/1.0\r\n\r\n");
    fetch_from("127.0.0.1", port, big.data, big.len, &r);
    CHECK(r.status == -1 || (r.status >= 400 && r.status < 500));
    buf_deinit(&big);

    /* The server still answers afterwards. */
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);

    buf_deinit(&r.raw);
}

/* Two requests on one keep-alive connection, sent back to back: both are answered. */
static void test_keepalive_and_pipelining(int port)
{
    Response r;
    buf_init(&r.raw);
    fetch(port,
          "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
          "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          &r);
    CHECK(r.status == 200);
    CHECK(r.raw.data && strstr(r.raw.data, "ok\n"));
    CHECK(r.raw.data && strstr(r.raw.data, "ready\n"));
    buf_deinit(&r.raw);
}

static void test_bad_addresses(void)
{
    static const char *const bad[] = {
        "",
        "abc",
        "host:",
        ":",
        ":0",
        "0",
        ":65536",
        "70000",
        "-1",
        "127.0.0.1:-1",
        "127.0.0.1:8o",
        "1.2.3.4:80:90",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[]:80",
        "[::1:80",
        "127.0.0.1: 80",
        " 80",
        "80 ",
        "127.0.0.1:123456",
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        HttpServer *s = NULL;
        char err[256] = "", want[256];
        CHECK(http_start(&s, bad[i], &m, err, sizeof err) == -1);
        CHECK(s == NULL);
        snprintf(want, sizeof want, "invalid --http-addr '%s': expected host:port, :port or port",
                 bad[i]);
        CHECK_STR(err, want);
    }

    /* A host that does not resolve. */
    HttpServer *s = NULL;
    char err[256] = "";
    CHECK(http_start(&s, "no-such-host.invalid:9847", &m, err, sizeof err) == -1);
    CHECK(s == NULL);
    CHECK(strncmp(err, "invalid --http-addr 'no-such-host.invalid:9847': ", 48) == 0);

    /* An address this machine does not have. */
    CHECK(http_start(&s, "192.0.2.1:9847", &m, err, sizeof err) == -1);
    CHECK_STR(err, "could not listen on 192.0.2.1:9847: Cannot assign requested address");

    /* No room for the message is fine. */
    CHECK(http_start(&s, "abc", &m, NULL, 0) == -1);
    CHECK(s == NULL);
}

static void test_port_in_use(int port)
{
    char addr[64], err[256] = "", want[256];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    HttpServer *s = NULL;
    CHECK(http_start(&s, addr, &m, err, sizeof err) == -1);
    CHECK(s == NULL);
    snprintf(want, sizeof want, "could not listen on 127.0.0.1:%d: Address already in use", port);
    CHECK_STR(err, want);

    /* Every address overlaps 127.0.0.1 too. */
    snprintf(addr, sizeof addr, ":%d", port);
    CHECK(http_start(&s, addr, &m, err, sizeof err) == -1);
    CHECK(strstr(err, "Address already in use") != NULL);
}

/* ":port", "port", "localhost:port" and "[::1]:port". */
static void test_address_forms(void)
{
    Response r;
    buf_init(&r.raw);
    char addr[64], err[256];

    int port = free_port();
    HttpServer *s = NULL;
    snprintf(addr, sizeof addr, ":%d", port);
    err[0] = '\0';
    CHECK(http_start(&s, addr, &m, err, sizeof err) == 0);
    CHECK_STR(err, "");
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    http_stop(s);

    port = free_port();
    s = NULL;
    snprintf(addr, sizeof addr, "%d", port);
    CHECK(http_start(&s, addr, &m, err, sizeof err) == 0);
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    http_stop(s);

    port = free_port();
    s = NULL;
    snprintf(addr, sizeof addr, "localhost:%d", port);
    CHECK(http_start(&s, addr, &m, err, sizeof err) == 0);
    http_stop(s);

    /* IPv6 loopback, where the machine has it. */
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 lo6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool have_v6 = probe >= 0 && bind(probe, (struct sockaddr *)&lo6, sizeof lo6) == 0;
    if (probe >= 0)
        close(probe);
    if (have_v6) {
        port = free_port();
        s = NULL;
        snprintf(addr, sizeof addr, "[::1]:%d", port);
        CHECK(http_start(&s, addr, &m, err, sizeof err) == 0);
        static const char req[] = "GET /healthz HTTP/1.0\r\n\r\n";
        fetch_from("::1", port, req, sizeof req - 1, &r);
        CHECK(r.status == 200);
        /* The same port on IPv6 is taken; the message shows the address in brackets. */
        HttpServer *s2 = NULL;
        char want[128];
        CHECK(http_start(&s2, addr, &m, err, sizeof err) == -1);
        snprintf(want, sizeof want, "could not listen on [::1]:%d: Address already in use", port);
        CHECK_STR(err, want);
        http_stop(s);
    } else {
        fprintf(stderr, "test_http: no IPv6 loopback, skipping [::1]\n");
    }
    buf_deinit(&r.raw);
}

int main(void)
{
    http_stop(NULL);

    int port = free_port();
    char addr[64], err[256] = "";
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    HttpServer *s = NULL;
    CHECK(http_start(&s, addr, &m, err, sizeof err) == 0);
    CHECK_STR(err, "");
    CHECK(s != NULL);
    if (!s) {
        fprintf(stderr, "test_http: %s\n", err);
        return check_report("test_http");
    }

    test_routes(port);
    test_keepalive_and_pipelining(port);
    test_port_in_use(port);
    http_stop(s);

    /* Stopped: the port is free again and can be taken at once. */
    Response r;
    buf_init(&r.raw);
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == -1);
    s = NULL;
    CHECK(http_start(&s, addr, &m, err, sizeof err) == 0);
    fetch(port, "GET /healthz HTTP/1.0\r\n\r\n", &r);
    CHECK(r.status == 200);
    http_stop(s);
    buf_deinit(&r.raw);

    test_bad_addresses();
    test_address_forms();
    return check_report("test_http");
}
