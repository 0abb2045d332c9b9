/*
 * log.c - leveled logging to stderr. Text lines look like
 *   2026-11-22T17:26:18.123Z info: started streaming at 0/16B3748
 * and JSON lines like {"ts":"...","level":"info","msg":"started streaming at 0/16B3748"}.
 * One write(2) per line, so lines from nats.c's threads never interleave mid-line.
 */
#include "outboxd/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "outboxd/util.h"

static LogLevel min_level = LOG_INFO;
static bool as_json;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

bool log_level_parse(const char *name, LogLevel *out)
{
    for (size_t i = 0; i < ARRAY_SIZE(level_names); i++) {
        if (strcasecmp(name, level_names[i]) == 0) {
            *out = (LogLevel)i;
            return true;
        }
    }
    return false;
}

void log_setup(LogLevel level, bool json)
{
    min_level = level;
    as_json = json;
}

bool log_enabled(LogLevel level)
{
    return level >= min_level;
}

static void json_escape(Buf *b, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            buf_printf(b, "\\u%04x", c);
        else
            buf_putc(b, (char)c);
    }
}

void log_msg(LogLevel level, const char *fmt, ...)
{
    if (level < min_level)
        return;

    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[40];
    size_t n = strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + n, sizeof(when) - n, ".%03ldZ", ts.tv_nsec / 1000000);

    Buf line;
    buf_init(&line);
    if (as_json) {
        buf_printf(&line, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":\"", when, level_names[level]);
        json_escape(&line, msg);
        buf_puts(&line, "\"}\n");
    } else {
        buf_printf(&line, "%s %s: %s\n", when, level_names[level], msg);
    }
    ssize_t ignored = write(STDERR_FILENO, line.data, line.len);
    (void)ignored;
    buf_deinit(&line);
}
