/*
 * health.c - `outboxd health [--ready] [--timeout DURATION] [settings]`.
 *
 * Asks the running relay's own HTTP listener for /healthz (or /readyz with --ready) and exits 0
 * on 200, 1 on anything else. It exists so that the container image needs neither a shell nor
 * curl for its HEALTHCHECK: the probe is the daemon's binary, with the libraries it already
 * loads. The address is --http-addr as the relay reads it (flag > environment > settings file
 * > default), so the probe asks where the relay listens without being told twice; a wildcard
 * listen address is asked on the loopback address.
 *
 * One HTTP/1.0 GET over a plain socket, "Connection: close", read to EOF: no library, and
 * every step (connect, send, receive) counts against one deadline, so a relay that accepts but
 * never answers fails the probe instead of hanging it.
 */
#include "outboxd/health.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "outboxd/config.h"
#include "outboxd/http.h"

/* The listener's answers are one short line; a larger one is cut here. */
#define HEALTH_MAX_RESPONSE 4096

bool health_target(const char *listen_addr, char *host, size_t hostlen, char port[static 6])
{
    bool bracketed;
    if (!http_split_addr(listen_addr, host, hostlen, &bracketed, port))
        return false;
    const char *loopback = NULL;
    if (host[0] == '\0' || strcmp(host, "0.0.0.0") == 0)
        loopback = "127.0.0.1";
    else if (strcmp(host, "::") == 0)
        loopback = "::1";
    if (loopback) {
        if (strlen(loopback) >= hostlen)
            return false;
        strcpy(host, loopback);
    }
    return true;
}

bool health_parse_response(const char *buf, size_t len, int *status, const char **body,
                           size_t *body_len)
{
    /* "HTTP/1.0 200 OK" or "HTTP/1.1 503 Service Unavailable"; the reason may be empty. */
    if (len < 12 || memcmp(buf, "HTTP/1.", 7) != 0 || buf[7] < '0' || buf[7] > '9' ||
        buf[8] != ' ')
        return false;
    int code = 0;
    for (int i = 9; i < 12; i++) {
        if (buf[i] < '0' || buf[i] > '9')
            return false;
        code = code * 10 + (buf[i] - '0');
    }
    if (len > 12 && buf[12] != ' ' && buf[12] != '\r' && buf[12] != '\n')
        return false;
    *status = code;
    *body = buf + len;
    *body_len = 0;
    /* The body starts after the first empty line: "\r\n\r\n", or "\n\n" from a lax server. */
    for (size_t i = 12; i < len; i++) {
        if (buf[i] != '\n')
            continue;
        size_t j = i + 1;
        if (j < len && buf[j] == '\r')
            j++;
        if (j < len && buf[j] == '\n') {
            *body = buf + j + 1;
            *body_len = len - (j + 1);
            break;
        }
    }
    return true;
}

void health_body_line(const char *body, size_t len, char *out, size_t outlen)
{
    size_t n = 0;
    for (size_t i = 0; i < len && body[i] != '\n' && n + 1 < outlen; i++) {
        unsigned char c = (unsigned char)body[i];
        if (c == '\r' && (i + 1 == len || body[i + 1] == '\n'))
            break;
        out[n++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (outlen > 0)
        out[n] = '\0';
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits until fd is ready for events or the deadline passes. Returns 1 ready, 0 timed out,
 * -1 on an error (errno set). */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int rc = poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left);
        if (rc < 0 && errno == EINTR)
            continue;
        return rc < 0 ? -1 : rc;
    }
}

/* Connects to one address before the deadline. Returns the socket, or -1 with errno set
 * (ETIMEDOUT when the deadline passed). */
static int connect_one(const struct addrinfo *ai, int64_t deadline)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                    ai->ai_protocol);
    if (fd < 0)
        return -1;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
        return fd;
    if (errno != EINPROGRESS)
        goto fail;
    int rc = wait_fd(fd, POLLOUT, deadline);
    if (rc <= 0) {
        if (rc == 0)
            errno = ETIMEDOUT;
        goto fail;
    }
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0)
        goto fail;
    if (soerr != 0) {
        errno = soerr;
        goto fail;
    }
    return fd;
fail:;
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

/* "host:port", or "[v6]:port" when host holds a ':'. */
static void format_hostport(const char *host, const char *port, char *out, size_t outlen)
{
    snprintf(out, outlen, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
}

/*
 * GETs path from host:port within timeout_ms and reads the answer into buf (up to bufcap
 * bytes). Returns the bytes read, or -1 after printing why nothing usable came back.
 */
static long fetch(const char *host, const char *port, const char *path, int64_t timeout_ms,
                  char *buf, size_t bufcap)
{
    char where[300];
    format_hostport(host, port, where, sizeof where);
    int64_t deadline = now_ms() + timeout_ms;

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    int grc = getaddrinfo(host, port, &hints, &res);
    if (grc != 0) {
        fprintf(stderr, "outboxd health: cannot resolve %s: %s\n", host,
                grc == EAI_SYSTEM ? strerror(errno) : gai_strerror(grc));
        return -1;
    }
    int fd = -1, first_errno = 0;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        fd = connect_one(ai, deadline);
        if (fd < 0 && first_errno == 0)
            first_errno = errno;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        if (first_errno == ECONNREFUSED)
            fprintf(stderr, "outboxd health: nothing listens on %s (is outboxd running, with "
                            "this --http-addr?)\n",
                    where);
        else if (first_errno == ETIMEDOUT)
            fprintf(stderr, "outboxd health: no connection to %s within %lld ms\n", where,
                    (long long)timeout_ms);
        else
            fprintf(stderr, "outboxd health: cannot connect to %s: %s\n", where,
                    strerror(first_errno));
        return -1;
    }

    char req[512];
    int reqlen = snprintf(req, sizeof req,
                          "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: outboxd-health\r\n"
                          "Connection: close\r\n\r\n",
                          path, where);
    size_t sent = 0;
    while (sent < (size_t)reqlen) {
        ssize_t n = send(fd, req + sent, (size_t)reqlen - sent, MSG_NOSIGNAL);
        if (n > 0) {
            sent += (size_t)n;
            continue;
        }
        int rc = (n < 0 && (errno == EAGAIN || errno == EINTR)) ? wait_fd(fd, POLLOUT, deadline)
                                                                 : -1;
        if (rc <= 0) {
            fprintf(stderr, "outboxd health: cannot send the request to %s: %s\n", where,
                    rc == 0 ? "timed out" : strerror(errno));
            close(fd);
            return -1;
        }
    }

    /* HTTP/1.0 without keep-alive: the answer ends where the listener closes. */
    size_t got = 0;
    for (;;) {
        if (got == bufcap)
            break; /* enough to judge: the status line and the start of the body */
        ssize_t n = recv(fd, buf + got, bufcap - got, 0);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        if (n == 0)
            break;
        if (errno != EAGAIN && errno != EINTR) {
            fprintf(stderr, "outboxd health: reading the answer from %s: %s\n", where,
                    strerror(errno));
            close(fd);
            return -1;
        }
        int rc = wait_fd(fd, POLLIN, deadline);
        if (rc <= 0) {
            if (rc == 0)
                fprintf(stderr, "outboxd health: no %s from %s within %lld ms\n",
                        got ? "complete answer" : "answer", where, (long long)timeout_ms);
            else
                fprintf(stderr, "outboxd health: reading the answer from %s: %s\n", where,
                        strerror(errno));
            close(fd);
            return -1;
        }
    }
    close(fd);
    return (long)got;
}

int health_main(int argc, char **argv)
{
    bool ready = false;
    int64_t timeout_ms = HEALTH_DEFAULT_TIMEOUT_MS;
    /* The settings, as the relay reads them; the probe connects to no database, so pg_url
     * (required by the relay) gets a placeholder that any --pg-url given overrides. */
    char placeholder[] = "--pg-url=postgresql:///unused";
    char *rest[argc + 2];
    int nrest = 0;
    rest[nrest++] = placeholder;
    for (int i = 0; i < argc; i++) {
        bool bad = false;
        const char *v;
        if (strcmp(argv[i], "--ready") == 0) {
            ready = true;
        } else if ((v = config_option_value(argc, argv, &i, "--timeout", &bad))) {
            if (!config_parse_duration_ms(v, &timeout_ms) || timeout_ms < 1 ||
                timeout_ms > 600000) {
                fprintf(stderr, "outboxd: invalid value '%s' for --timeout: expected a duration "
                                "such as 500ms or 3s, at most 10m\n",
                        v);
                return 2;
            }
        } else if (bad) {
            return 2;
        } else {
            rest[nrest++] = argv[i];
        }
    }
    rest[nrest] = NULL;

    Config cfg;
    config_init(&cfg);
    char err[1024];
    if (config_parse(&cfg, nrest, rest, err, sizeof err) < 0) {
        fprintf(stderr, "outboxd: %s\n", err);
        config_deinit(&cfg);
        return 2;
    }
    char host[256], port[6];
    int code = 1;
    const char *path = ready ? "/readyz" : "/healthz";
    if (strcmp(cfg.http_addr, "off") == 0) {
        fprintf(stderr, "outboxd health: the HTTP listener is off (--http-addr off): there is "
                        "nothing to ask\n");
    } else if (!health_target(cfg.http_addr, host, sizeof host, port)) {
        fprintf(stderr, "outboxd health: cannot read an address from --http-addr '%s'\n",
                cfg.http_addr);
        code = 2;
    } else {
        static char buf[HEALTH_MAX_RESPONSE];
        long n = fetch(host, port, path, timeout_ms, buf, sizeof buf);
        int status;
        const char *body;
        size_t body_len;
        char where[300];
        format_hostport(host, port, where, sizeof where);
        if (n < 0) {
            /* fetch() said why */
        } else if (!health_parse_response(buf, (size_t)n, &status, &body, &body_len)) {
            fprintf(stderr, "outboxd health: %s did not answer %s with HTTP (is it outboxd's "
                            "listener?)\n",
                    where, path);
        } else {
            char line[256];
            health_body_line(body, body_len, line, sizeof line);
            printf("%d %s%s%s\n", status, path, line[0] ? ": " : "", line);
            code = status == 200 ? 0 : 1;
        }
    }
    config_deinit(&cfg);
    return code;
}
