/*
 * mem.h: allocation that never returns NULL, and a growable byte buffer.
 *
 * walpipe runs under a supervisor and restarts from its staging checkpoint,
 * so running out of memory aborts the process instead of being handled at
 * every call site.  Every wp_buf_t owns its bytes; wp_buf_free releases them.
 */
#ifndef WP_MEM_H
#define WP_MEM_H

#include "wp_setup.h"

#include <stdarg.h>

void *wp_malloc(size_t n);
void *wp_calloc(size_t n, size_t size);
void *wp_realloc(void *p, size_t n);
char *wp_strdup(const char *s);
char *wp_strndup(const char *s, size_t n);
#define WP_FREE(p) \
    do { \
        free(p); \
        (p) = NULL; \
    } while (0)

typedef struct wp_buf {
    char *data; /* always NUL-terminated when cap > 0 */
    size_t len;
    size_t cap;
} wp_buf_t;

#define WP_BUF_INIT {NULL, 0, 0}

void wp_buf_reserve(wp_buf_t *b, size_t extra);
void wp_buf_append(wp_buf_t *b, const void *p, size_t n);
void wp_buf_puts(wp_buf_t *b, const char *s);
void wp_buf_putc(wp_buf_t *b, char c);
void wp_buf_printf(wp_buf_t *b, const char *fmt, ...) WP_PRINTF(2, 3);
void wp_buf_put_i64(wp_buf_t *b, int64_t v); /* decimal; the hot paths avoid printf */
void wp_buf_reset(wp_buf_t *b);
void wp_buf_free(wp_buf_t *b);

#endif /* WP_MEM_H */
