/*
 * log.c: the process logger.
 *
 * Each line is formatted into a local buffer and written with one write(2)
 * call, so lines from different source threads never interleave.
 *
 * Invariant: a call writes exactly one line of valid UTF-8.  The message
 * part is scrubbed here (wp_log_sanitize), whatever the caller passed: table
 * names, server messages and other text from a source may hold newlines or
 * bytes that are not UTF-8, and must not be able to forge a line.  In the
 * json format (log_format = json, for log shippers) that line is one JSON
 * object, {"time","level","component","message"}, built from the same
 * scrubbed text with '"' and '\\' escaped, so no message can forge a field.
 */
#include "wp_setup.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "utf8.h"

static volatile int log_level = WP_LOG_INFO;
static volatile int log_format = WP_LOG_FORMAT_TEXT;
static __thread char component[64] = "main";

static const char *const level_names[] = {"DEBUG", "INFO", "WARNING", "ERROR"};
static const char *const json_level_names[] = {"debug", "info", "warning", "error"};

/* The longest message kept, in bytes; a longer one is cut (on a character boundary, by the scrub). */
#define MSG_MAX 1900

void wp_log_set_level(wp_log_level_t level)
{
    log_level = (int)level;
}

bool wp_log_enabled(wp_log_level_t level)
{
    return (int)level >= log_level;
}

void wp_log_set_format(wp_log_format_t format)
{
    log_format = (int)format;
}

void wp_log_set_component(const char *name)
{
    snprintf(component, sizeof component, "%s", name);
}

/*
 * Appends s to out (at *len, never past cap) as the inside of a JSON string.
 * s is already scrubbed (valid UTF-8, no control characters), so only '"'
 * and '\\' need escaping.  The caller's sizes leave room for twice s; were
 * it short, s is cut before a character, never inside an escape.
 */
static void json_append(char *out, size_t cap, size_t *len, const char *s)
{
    for (; *s && *len + 2 < cap; s++) {
        if (*s == '"' || *s == '\\')
            out[(*len)++] = '\\';
        out[(*len)++] = *s;
    }
}

void wp_log(wp_log_level_t level, const char *fmt, ...)
{
    if (!wp_log_enabled(level))
        return;
    char msg[MSG_MAX + 1];
    /* json: every message byte may double, plus the fixed fields */
    char line[2 * MSG_MAX + 2 * sizeof component + 128];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t mlen = m < 0 ? 0 : (size_t)m;
    if (mlen > MSG_MAX)
        mlen = MSG_MAX;
    /* strip trailing newlines that came from libpq error texts */
    while (mlen > 0 && (msg[mlen - 1] == '\n' || msg[mlen - 1] == '\r'))
        mlen--;
    msg[mlen] = '\0';
    /* the rest becomes one line: inner newlines and other controls turn into spaces, bad bytes into '?' */
    wp_log_sanitize(msg);
    size_t len;
    if (log_format == WP_LOG_FORMAT_JSON) {
        char comp[sizeof component];
        snprintf(comp, sizeof comp, "%s", component);
        wp_log_sanitize(comp);
        int n = snprintf(line, sizeof line,
                         "{\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\",\"level\":\"%s\",\"component\":\"",
                         tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                         (int)(tv.tv_usec / 1000), json_level_names[level]);
        len = (size_t)n;
        /* the suffixes (13 and 2 bytes) and the newline stay within line whatever json_append does */
        json_append(line, sizeof line - 16, &len, comp);
        memcpy(line + len, "\",\"message\":\"", 13);
        len += 13;
        json_append(line, sizeof line - 16, &len, msg);
        memcpy(line + len, "\"}", 2);
        len += 2;
    } else {
        int n = snprintf(line, sizeof line, "%04d-%02d-%02d %02d:%02d:%02d.%03dZ %s [%s] %s", tm.tm_year + 1900,
                         tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000),
                         level_names[level], component, msg);
        len = n < 0 ? 0 : (size_t)n;
        if (len > sizeof line - 2)
            len = sizeof line - 2;
    }
    line[len++] = '\n';
    ssize_t w WP_UNUSED = write(STDERR_FILENO, line, len);
}

void wp_log_sanitize(char *msg)
{
    wp_utf8_scrub(msg, true);
}
