/*
 * health.h - `outboxd health`: asks a running relay's HTTP listener (/healthz, or /readyz) and
 * exits 0 on 200, 1 otherwise. It is the probe of images that have no shell and no curl (the
 * container's HEALTHCHECK, an exec probe); it reads --http-addr from the same settings the
 * relay reads, and speaks plain HTTP/1.0 over a socket, bounded by a timeout.
 */
#ifndef OUTBOXD_HEALTH_H
#define OUTBOXD_HEALTH_H

#include <stdbool.h>
#include <stddef.h>

/* How long the probe waits in all (connect, send, answer) unless --timeout says otherwise. */
#define HEALTH_DEFAULT_TIMEOUT_MS 3000

/*
 * Where to ask a listener on listen_addr (an --http-addr value: "host:port", ":port", "port",
 * "[v6]:port"): a wildcard host ("", 0.0.0.0) becomes 127.0.0.1 and "::" becomes ::1; any other
 * host is kept. Writes the host (no brackets) and the port. Returns false when listen_addr is
 * not an address (including "off").
 */
bool health_target(const char *listen_addr, char *host, size_t hostlen, char port[static 6]);

/*
 * Parses the HTTP/1.x response in buf[0..len): the status code into *status, and the body
 * (after the blank line that ends the headers, CRLF or bare LF) into *body and *body_len; a
 * response without that blank line has an empty body. Returns false when buf does not start
 * with a status line "HTTP/1.x NNN".
 */
bool health_parse_response(const char *buf, size_t len, int *status, const char **body,
                           size_t *body_len);

/*
 * Copies the first line of body[0..len) into out (at most outlen - 1 bytes), with control
 * characters replaced by '?', for printing; "" for an empty body.
 */
void health_body_line(const char *body, size_t len, char *out, size_t outlen);

/*
 * `outboxd health [--ready] [--timeout DURATION] [settings]`: argv holds what follows
 * "health". Returns the exit code: 0 healthy (or ready), 1 not, or nothing answered, 2 a bad
 * option or setting.
 */
int health_main(int argc, char **argv);

#endif
