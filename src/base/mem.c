/*
 * mem.c: allocation wrappers that abort on exhaustion, and wp_buf_t.
 *
 * Invariant: a wp_buf_t with cap > 0 always holds a NUL after len bytes, so
 * its data can be handed to C string functions without copying.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

static void WP_NORETURN oom(size_t n)
{
    fprintf(stderr, "walpipe: out of memory allocating %zu bytes\n", n);
    abort();
}

void *wp_malloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *wp_calloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        oom(n * size);
    return p;
}

void *wp_realloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom(n);
    return q;
}

char *wp_strdup(const char *s)
{
    return wp_strndup(s, strlen(s));
}

char *wp_strndup(const char *s, size_t n)
{
    char *d = wp_malloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

void wp_buf_reserve(wp_buf_t *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    b->data = wp_realloc(b->data, cap);
    b->cap = cap;
}

void wp_buf_append(wp_buf_t *b, const void *p, size_t n)
{
    wp_buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void wp_buf_puts(wp_buf_t *b, const char *s)
{
    wp_buf_append(b, s, strlen(s));
}

void wp_buf_putc(wp_buf_t *b, char c)
{
    wp_buf_reserve(b, 1);
    b->data[b->len++] = c;
    b->data[b->len] = '\0';
}

void wp_buf_printf(wp_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) {
        va_end(ap2);
        return;
    }
    if ((size_t)n < sizeof tmp) {
        wp_buf_append(b, tmp, (size_t)n);
    } else {
        wp_buf_reserve(b, (size_t)n);
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
        b->len += (size_t)n;
    }
    va_end(ap2);
}

void wp_buf_reset(wp_buf_t *b)
{
    b->len = 0;
    if (b->cap)
        b->data[0] = '\0';
}

void wp_buf_put_i64(wp_buf_t *b, int64_t v)
{
    char tmp[24];
    size_t n = sizeof tmp;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[--n] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[--n] = '-';
    wp_buf_append(b, tmp + n, sizeof tmp - n);
}

void wp_buf_free(wp_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}
