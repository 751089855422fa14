/*
 * log.h: one logger for the whole process, safe from any thread.
 *
 * Lines go to stderr as "TIME LEVEL [component] message" (or one JSON object
 * per line, wp_log_set_format).  Messages follow
 * PostgreSQL's style: lower-case, no trailing period, names quoted, LSNs as
 * X/Y.  Never pass a conninfo or password to these functions.
 */
#ifndef WP_LOG_H
#define WP_LOG_H

#include "wp_setup.h"

#include "config.h"

void wp_log_set_level(wp_log_level_t level);

/* text (default): "TIME LEVEL [component] message"; json: {"time","level","component","message"} per line. */
void wp_log_set_format(wp_log_format_t format);
bool wp_log_enabled(wp_log_level_t level);

/* Names the current thread's component ("main", "source app", ...) in its lines. */
void wp_log_set_component(const char *name);

void wp_log(wp_log_level_t level, const char *fmt, ...) WP_PRINTF(2, 3);

/*
 * wp_log applies wp_log_sanitize to every message, so a caller never needs
 * to for logging; it stays public for text that is stored, not logged.
 *
 * Makes msg (NUL-terminated, changed in place) safe to print as one line and
 * to store as PostgreSQL text when it quotes input: bytes that are not part
 * of valid UTF-8 become '?', control characters become ' '.  A character
 * that snprintf cut in two at the end becomes '?' too.
 */
void wp_log_sanitize(char *msg);

#define wp_debug(...) \
    do { \
        if (wp_log_enabled(WP_LOG_DEBUG)) \
            wp_log(WP_LOG_DEBUG, __VA_ARGS__); \
    } while (0)
#define wp_info(...) wp_log(WP_LOG_INFO, __VA_ARGS__)
#define wp_warn(...) wp_log(WP_LOG_WARNING, __VA_ARGS__)
#define wp_error(...) wp_log(WP_LOG_ERROR, __VA_ARGS__)

#endif /* WP_LOG_H */
