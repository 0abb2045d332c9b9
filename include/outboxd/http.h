/*
 * http.h - the HTTP listener for /metrics, /healthz and /readyz (libmicrohttpd, its own
 * thread). It serves nothing else, accepts only GET and HEAD, and refuses oversized requests.
 */
#ifndef OUTBOXD_HTTP_H
#define OUTBOXD_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "outboxd/metrics.h"

typedef struct HttpServer HttpServer;

/*
 * Starts listening on addr ("host:port", ":port" for every address, or "port"). Returns 0, or
 * -1 with a one-line reason in err (bad address, port in use).
 */
int http_start(HttpServer **out, const char *addr, const Metrics *m, char *err, size_t errlen);
void http_stop(HttpServer *s);

/*
 * Splits addr into host and port: "host:port", ":port", "port", "[v6]:port". *host is "" for
 * every address; *bracketed says the host was written in brackets. Returns false on anything
 * else, including a port outside 1..65535 and an unbracketed IPv6 address.
 */
bool http_split_addr(const char *addr, char *host, size_t hostlen, bool *bracketed,
                     char port[static 6]);

#endif
