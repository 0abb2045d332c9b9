/*
 * log.h - leveled logging to stderr, as text or one JSON object per line.
 *
 * Messages follow PostgreSQL's style: lowercase, "could not X: reason", no trailing period.
 * Never pass a secret (a password or a full connection string) to these functions: use
 * redact_conninfo() first.
 */
#ifndef OUTBOXD_LOG_H
#define OUTBOXD_LOG_H

#include <stdbool.h>

typedef enum LogLevel { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR } LogLevel;

/* Returns false when name is not one of debug, info, warn, error. */
bool log_level_parse(const char *name, LogLevel *out);
void log_setup(LogLevel level, bool json);
bool log_enabled(LogLevel level);
void log_msg(LogLevel level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)

#endif
