/*
 * http.c - the /metrics, /healthz and /readyz listener, on libmicrohttpd's own thread.
 *
 * We create, bind and listen on the socket ourselves and hand it to MHD: that way a busy port
 * is reported with the real errno ("Address already in use") and there is no window in which
 * another process could take the port between a check and MHD's bind. MHD owns the socket from
 * then on and closes it in MHD_stop_daemon.
 *
 * The server answers GET and HEAD on three paths and nothing else: other methods get 405, a
 * request with a body 413, other paths 404. Each connection's memory is bounded
 * (CONNECTION_MEMORY_LIMIT), so an oversized request is refused by MHD itself (431/414); the
 * number of connections and their idle time are bounded too. The handler only reads atomics
 * and the consumer-lag snapshot (under its mutex, never waiting on NATS), so a scrape never
 * blocks the relay.
 *
 * MHD's thread is started with every signal blocked, so process signals (SIGTERM, SIGINT)
 * reach the relay's thread or signalfd, never this one.
 */
#include "outboxd/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "outboxd/consumers.h"
#include "outboxd/log.h"

#define HTTP_CONNECTION_LIMIT 16u
#define HTTP_CONNECTION_TIMEOUT_S 10u
#define HTTP_CONNECTION_MEMORY (32u * 1024u)
#define HTTP_LISTEN_BACKLOG 64
/* /healthz reports stalled when the relay loop has not turned for this long. */
#define HTTP_STALE_US (INT64_C(30) * 1000000)

#define CT_TEXT "text/plain; charset=utf-8"
#define CT_METRICS "text/plain; version=0.0.4; charset=utf-8"

struct HttpServer {
    struct MHD_Daemon *daemon;
    const Metrics *m;
    /* While MHD_start_daemon runs, MHD's first message is kept here for the caller's err. */
    _Atomic bool started;
    char start_msg[256];
};

/* MHD's error log: kept for the start-up error, otherwise logged at debug level (they are
 * about misbehaving clients, not about the relay). */
__attribute__((format(printf, 2, 0))) static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    HttpServer *s = cls;
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r' || msg[n - 1] == '.'))
        msg[--n] = '\0';
    if (!atomic_load(&s->started) && s->start_msg[0] == '\0')
        snprintf(s->start_msg, sizeof s->start_msg, "%s", msg);
    log_debug("http: %s", msg);
}

/* Queues status with body[0..len) (copied) and Content-Type ctype. */
static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *ctype,
                             const char *body, size_t len)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    enum MHD_Result ok = MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (ok == MHD_YES && status == MHD_HTTP_METHOD_NOT_ALLOWED)
        ok = MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    if (ok == MHD_YES)
        ok = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result reply_text(struct MHD_Connection *conn, unsigned status, const char *text)
{
    return reply(conn, status, CT_TEXT, text, strlen(text));
}

/* True when the request announces a body (GET and HEAD have none in our API). */
static bool has_body(struct MHD_Connection *conn)
{
    const char *te =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    if (te)
        return true;
    const char *cl =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    return cl && strcmp(cl, "0") != 0;
}

/*
 * The request handler. MHD calls it first with the headers only, then again once the request
 * is complete. Refusals (wrong method, a body) are answered on the first call, so an announced
 * body is never read and MHD closes the connection; everything else is answered on the second
 * call, which keeps the connection usable for the scraper's next request.
 */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls)
{
    static int headers_seen; /* its address marks a request whose headers were checked */
    const HttpServer *s = cls;
    (void)version;
    (void)upload_data;
    (void)upload_data_size;

    if (*con_cls == NULL) {
        if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
            return reply_text(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
        if (has_body(conn))
            return reply_text(conn, 413 /* Content Too Large */, "request body not allowed\n");
        *con_cls = &headers_seen;
        return MHD_YES;
    }

    if (strcmp(url, "/metrics") == 0) {
        Buf b;
        buf_init(&b);
        int64_t now = now_unix_us();
        metrics_render(s->m, now, &b);
        consumers_render_metrics(&b, now);
        enum MHD_Result ok = reply(conn, MHD_HTTP_OK, CT_METRICS, b.data, b.len);
        buf_deinit(&b);
        return ok;
    }
    if (strcmp(url, "/healthz") == 0) {
        if (metrics_alive(s->m, now_mono_us(), HTTP_STALE_US)) {
            char text[128];
            metrics_health_text(s->m, text, sizeof(text));
            return reply_text(conn, MHD_HTTP_OK, text);
        }
        return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "stalled\n");
    }
    if (strcmp(url, "/readyz") == 0) {
        if (metrics_ready(s->m))
            return reply_text(conn, MHD_HTTP_OK, "ready\n");
        const char *why;
        if (atomic_load_explicit(&s->m->slot_lost, memory_order_relaxed))
            why = "not ready: slot lost (see the log, or outboxd doctor)\n";
        else if (atomic_load_explicit(&s->m->standby, memory_order_relaxed))
            why = "standby: another relay holds the slot\n";
        else if (!atomic_load_explicit(&s->m->pg_connected, memory_order_relaxed))
            why = "not ready: postgres disconnected\n";
        else
            why = "not ready: nats disconnected\n";
        return reply_text(conn, MHD_HTTP_SERVICE_UNAVAILABLE, why);
    }
    return reply_text(conn, MHD_HTTP_NOT_FOUND, "not found\n");
}

/* Address parsing and binding */

/* Also used by `outboxd health` (health.c), to ask the listener this code opened. */
bool http_split_addr(const char *addr, char *host, size_t hostlen, bool *bracketed,
                     char port[static 6])
{
    const char *p;
    size_t n;
    *bracketed = false;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':')
            return false;
        n = (size_t)(end - addr - 1);
        if (n == 0 || n >= hostlen)
            return false;
        memcpy(host, addr + 1, n);
        host[n] = '\0';
        *bracketed = true;
        p = end + 2;
    } else {
        const char *colon = strchr(addr, ':');
        if (colon && strchr(colon + 1, ':'))
            return false; /* more than one ':' */
        n = colon ? (size_t)(colon - addr) : 0;
        if (n >= hostlen || (n > 0 && memchr(addr, '[', n)))
            return false;
        memcpy(host, addr, n);
        host[n] = '\0';
        p = colon ? colon + 1 : addr;
    }
    n = strlen(p);
    if (n == 0 || n > 5 || strspn(p, "0123456789") != n)
        return false;
    long v = strtol(p, NULL, 10);
    if (v < 1 || v > 65535)
        return false;
    snprintf(port, 6, "%ld", v);
    return true;
}

/* Formats sa as "1.2.3.4:80" or "[::1]:80". */
static void format_sockaddr(const struct sockaddr *sa, socklen_t salen, char *out, size_t outlen)
{
    char h[NI_MAXHOST], p[NI_MAXSERV];
    if (getnameinfo(sa, salen, h, sizeof h, p, sizeof p, NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        snprintf(out, outlen, "?");
        return;
    }
    snprintf(out, outlen, sa->sa_family == AF_INET6 ? "[%s]:%s" : "%s:%s", h, p);
}

/* Creates a listening socket on sa. Returns the socket, or -1 with errno set. */
static int listen_on(const struct sockaddr *sa, socklen_t salen)
{
    int fd = socket(sa->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1, zero = 0;
    /* SO_REUSEADDR lets a restart bind while old connections sit in TIME_WAIT; it does not let
     * two listeners share a port on Linux. */
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
        goto fail;
    if (sa->sa_family == AF_INET6 &&
        IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr) &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) != 0)
        goto fail;
    if (bind(fd, sa, salen) != 0 || listen(fd, HTTP_LISTEN_BACKLOG) != 0)
        goto fail;
    return fd;
fail:;
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

/*
 * Binds and listens on the address addr names. On success returns the socket and writes its
 * address to where[]; on failure returns -1 with the reason in err. A host name is tried
 * address by address; the first failure is the one reported.
 */
static int open_listener(const char *addr, char *where, size_t wherelen, char *err, size_t errlen)
{
    char host[256], port[6];
    bool bracketed;
    if (!http_split_addr(addr, host, sizeof host, &bracketed, port)) {
        snprintf(err, errlen, "invalid --http-addr '%s': expected host:port, :port or port", addr);
        return -1;
    }

    if (host[0] == '\0') {
        /* Every address: IPv6 and IPv4 on one dual-stack socket, or IPv4 alone. */
        struct sockaddr_in6 a6 = {.sin6_family = AF_INET6,
                                  .sin6_port = htons((uint16_t)atoi(port)),
                                  .sin6_addr = IN6ADDR_ANY_INIT};
        struct sockaddr_in a4 = {.sin_family = AF_INET,
                                 .sin_port = htons((uint16_t)atoi(port)),
                                 .sin_addr.s_addr = htonl(INADDR_ANY)};
        format_sockaddr((struct sockaddr *)&a6, sizeof a6, where, wherelen);
        int fd = listen_on((struct sockaddr *)&a6, sizeof a6);
        if (fd < 0 && (errno == EAFNOSUPPORT || errno == EADDRNOTAVAIL)) {
            format_sockaddr((struct sockaddr *)&a4, sizeof a4, where, wherelen);
            fd = listen_on((struct sockaddr *)&a4, sizeof a4);
        }
        if (fd < 0)
            snprintf(err, errlen, "could not listen on %s: %s", where, strerror(errno));
        return fd;
    }

    struct addrinfo hints = {
        .ai_family = bracketed ? AF_INET6 : AF_UNSPEC,
        .ai_socktype = SOCK_STREAM,
        .ai_flags = AI_NUMERICSERV | (bracketed ? AI_NUMERICHOST : 0),
    };
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "invalid --http-addr '%s': %s", addr,
                 rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        return -1;
    }
    int fd = -1, first_errno = 0;
    char first[128] = "";
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
        format_sockaddr(ai->ai_addr, ai->ai_addrlen, where, wherelen);
        fd = listen_on(ai->ai_addr, ai->ai_addrlen);
        if (fd < 0 && first[0] == '\0') {
            first_errno = errno;
            snprintf(first, sizeof first, "%s", where);
        }
    }
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, errlen, "could not listen on %s: %s", first[0] ? first : host,
                 strerror(first_errno ? first_errno : EADDRNOTAVAIL));
    return fd;
}

/* True when fd is still the listening socket we bound to where (MHD closes the socket it was
 * given on some failures and not on others). */
static bool still_our_listener(int fd, const char *where)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int listening = 0;
    socklen_t ilen = sizeof listening;
    char now[128];
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ilen) != 0 || !listening)
        return false;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0)
        return false;
    format_sockaddr((struct sockaddr *)&ss, len, now, sizeof now);
    return strcmp(now, where) == 0;
}

int http_start(HttpServer **out, const char *addr, const Metrics *m, char *err, size_t errlen)
{
    char where[128];
    char scratch[1];
    if (!err || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }

    int fd = open_listener(addr, where, sizeof where, err, errlen);
    if (fd < 0)
        return -1;

    HttpServer *s = xcalloc(1, sizeof *s);
    s->m = m;
    atomic_init(&s->started, false);

    /* MHD's thread inherits this thread's signal mask: start it with every signal blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    /* clang-format off */
    s->daemon = MHD_start_daemon(
        MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, on_request, s,
        MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s, /* first, so nothing reaches stderr */
        MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
        MHD_OPTION_CONNECTION_LIMIT, HTTP_CONNECTION_LIMIT,
        MHD_OPTION_CONNECTION_TIMEOUT, HTTP_CONNECTION_TIMEOUT_S,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_CONNECTION_MEMORY,
        MHD_OPTION_END);
    /* clang-format on */
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    if (!s->daemon) {
        if (still_our_listener(fd, where))
            close(fd);
        if (s->start_msg[0])
            snprintf(err, errlen, "could not start HTTP server on %s: %s", where, s->start_msg);
        else
            snprintf(err, errlen, "could not start HTTP server on %s", where);
        free(s);
        return -1;
    }
    atomic_store(&s->started, true);
    *out = s;
    return 0;
}

void http_stop(HttpServer *s)
{
    if (!s)
        return;
    MHD_stop_daemon(s->daemon);
    free(s);
}
