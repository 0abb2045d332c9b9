/*
 * http.h - the HTTP listener for /metrics, /healthz and /readyz (libmicrohttpd, its own
 * thread). It serves nothing else, accepts only GET and HEAD, and refuses oversized requests.
 */
#ifndef OUTBOXD_HTTP_H
#define OUTBOXD_HTTP_H

#include <stddef.h>

#include "outboxd/metrics.h"

typedef struct HttpServer HttpServer;

/*
 * Starts listening on addr ("host:port", ":port" for every address, or "port"). Returns 0, or
 * -1 with a one-line reason in err (bad address, port in use).
 */
int http_start(HttpServer **out, const char *addr, const Metrics *m, char *err, size_t errlen);
void http_stop(HttpServer *s);

#endif
