/*
 * log.c: the process logger.
 *
 * Each line is formatted into a local buffer and written with one write(2)
 * call, so lines from different source threads never interleave.
 *
 * Invariant: a call writes exactly one line of valid UTF-8.  The message
 * part is scrubbed here (wp_log_sanitize), whatever the caller passed: table
 * names, server messages and other text from a source may hold newlines or
 * bytes that are not UTF-8, and must not be able to forge a line.
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
static __thread char component[64] = "main";

static const char *const level_names[] = {"DEBUG", "INFO", "WARNING", "ERROR"};

void wp_log_set_level(wp_log_level_t level)
{
    log_level = (int)level;
}

bool wp_log_enabled(wp_log_level_t level)
{
    return (int)level >= log_level;
}

void wp_log_set_component(const char *name)
{
    snprintf(component, sizeof component, "%s", name);
}

void wp_log(wp_log_level_t level, const char *fmt, ...)
{
    if (!wp_log_enabled(level))
        return;
    char line[2048];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02d %02d:%02d:%02d.%03dZ %s [%s] ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(tv.tv_usec / 1000),
                     level_names[level], component);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    /* strip trailing newlines that came from libpq error texts */
    while (len > (size_t)n && (line[len - 1] == '\n' || line[len - 1] == '\r'))
        len--;
    /* the rest becomes one line: inner newlines and other controls turn into spaces, bad bytes into '?' */
    line[len] = '\0';
    wp_log_sanitize(line + n);
    line[len++] = '\n';
    ssize_t w WP_UNUSED = write(STDERR_FILENO, line, len);
}

void wp_log_sanitize(char *msg)
{
    wp_utf8_scrub(msg, true);
}
