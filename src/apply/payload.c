/*
 * payload.c: raw_events payloads read with yajl (see payload.h).
 *
 * Job: turn {"after": {...}, "key": {...}, "before": {...}} into three lists
 * of (name, value text) and skip every other member, at any depth.  The
 * callbacks copy names and values into p->arena and record their offsets;
 * pointers are made only at the end, once the arena stops moving.
 *
 * Invariant: on success every name and value is valid UTF-8 without NUL, and
 * a number's value is exactly the text in the payload.  yajl turns a lone
 * \u escape of a UTF-16 surrogate into '?' silently, so the raw text is
 * checked for unpaired surrogates before yajl reads it.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_parse.h>

#include "payload.h"
#include "utf8.h"
#include "yajl_mem.h"

#define MAX_DEPTH 64

typedef struct pending_field {
    size_t name, value;
    bool is_null;
} pending_field_t;

/* What the callbacks share while one payload is read. */
typedef struct reader {
    wp_payload_t *p;
    yajl_handle yajl;
    int depth;            /* containers open: 1 the payload, 2 a member's object, ... */
    wp_jobject_t *member; /* depth 1: the object the next value is (after, key, before), else NULL */
    wp_jobject_t *target; /* depth >= 2: the object being filled, NULL while skipping */
    size_t name;          /* depth 2 of target: arena offset of the pending column name */
    pending_field_t *pend;
    size_t npend, cap;
    char *err;
    size_t errlen;
    bool failed;
} reader_t;

/* Records why the payload is rejected (the first reason wins); returns 0 so yajl stops. */
static int reject(reader_t *r, const char *what)
{
    if (!r->failed)
        snprintf(r->err, r->errlen, "invalid payload JSON at byte %zu: %s", yajl_get_bytes_consumed(r->yajl), what);
    r->failed = true;
    return 0;
}

/* Copies s[0..len) into the arena, NUL-terminated; returns its offset or (size_t)-1 after reject(). */
static size_t keep(reader_t *r, const unsigned char *s, size_t len)
{
    if (memchr(s, '\0', len) != NULL) {
        reject(r, "string contains \\u0000, which jsonb cannot store");
        return (size_t)-1;
    }
    if (!wp_utf8_valid(s, len)) {
        reject(r, "string is not valid UTF-8");
        return (size_t)-1;
    }
    size_t off = r->p->arena.len;
    wp_buf_append(&r->p->arena, s, len);
    wp_buf_putc(&r->p->arena, '\0');
    return off;
}

/* A column value of target (depth 2): a scalar, as text; s NULL for JSON null. */
static int on_value(reader_t *r, const unsigned char *s, size_t len)
{
    if (r->depth == 0)
        return reject(r, "expected an object");
    if (r->depth == 1) {
        if (r->member != NULL)
            return reject(r, "expected an object of column values");
        return 1; /* a member nobody reads */
    }
    if (r->target == NULL || r->depth > 2)
        return 1;
    pending_field_t f = {.name = r->name, .is_null = s == NULL};
    if (s != NULL && (f.value = keep(r, s, len)) == (size_t)-1)
        return 0;
    if (r->npend == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 64;
        r->pend = wp_realloc(r->pend, r->cap * sizeof *r->pend);
    }
    r->pend[r->npend++] = f;
    return 1;
}

static int on_null(void *ctx)
{
    return on_value(ctx, NULL, 0);
}

static int on_boolean(void *ctx, int value)
{
    return value ? on_value(ctx, (const unsigned char *)"true", 4) : on_value(ctx, (const unsigned char *)"false", 5);
}

static int on_number(void *ctx, const char *s, size_t len)
{
    return on_value(ctx, (const unsigned char *)s, len);
}

static int on_string(void *ctx, const unsigned char *s, size_t len)
{
    return on_value(ctx, s, len);
}

/* A container opens; map says whether it is an object. */
static int on_open(reader_t *r, bool map)
{
    if (r->depth == 0 && !map)
        return reject(r, "expected an object");
    if (r->depth == 1 && r->member != NULL) {
        if (!map)
            return reject(r, "expected an object of column values");
        r->target = r->member;
        r->target->present = true;
        r->target->fields = (wp_jfield_t *)(uintptr_t)r->npend; /* an index for now; pointers at the end */
    } else if (r->depth == 2 && r->target != NULL) {
        return reject(r, "expected a scalar value");
    }
    if (++r->depth > MAX_DEPTH)
        return reject(r, "nested too deeply");
    return 1;
}

static int on_start_map(void *ctx)
{
    return on_open(ctx, true);
}

static int on_start_array(void *ctx)
{
    return on_open(ctx, false);
}

static int on_close(void *ctx)
{
    reader_t *r = ctx;
    if (--r->depth == 1 && r->target != NULL) {
        r->target->n = r->npend - (size_t)(uintptr_t)r->target->fields;
        r->target = NULL;
    }
    if (r->depth == 1)
        r->member = NULL;
    return 1;
}

static int on_key(void *ctx, const unsigned char *s, size_t len)
{
    reader_t *r = ctx;
    if (r->depth == 1) {
        wp_payload_t *p = r->p;
        r->member = len == 5 && memcmp(s, "after", 5) == 0    ? &p->after
                    : len == 3 && memcmp(s, "key", 3) == 0    ? &p->key
                    : len == 6 && memcmp(s, "before", 6) == 0 ? &p->before
                                                              : NULL;
        if (r->member != NULL && r->member->present)
            return reject(r, "duplicate member");
        return 1;
    }
    if (r->depth == 2 && r->target != NULL && (r->name = keep(r, s, len)) == (size_t)-1)
        return 0;
    return 1;
}

/* yajl_number takes every number as text, so yajl_integer and yajl_double are never called. */
static const yajl_callbacks callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_boolean,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_key,
    .yajl_end_map = on_close,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_close,
};

static int hex4(const char *s, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = wp_hexval((unsigned char)s[i]);
        if (h < 0)
            return -1;
        v = v * 16 + (unsigned)h;
    }
    *out = v;
    return 0;
}

/*
 * The byte offset of the first \u escape in text that is a UTF-16 surrogate
 * without its partner, or -1 if none.  Backslashes only occur inside strings
 * in JSON, so the whole text can be scanned; yajl reports other escape errors.
 */
static ptrdiff_t unpaired_surrogate(const char *text)
{
    for (const char *s = strchr(text, '\\'); s != NULL; s = strchr(s, '\\')) {
        unsigned cp, lo;
        if (s[1] != 'u' || hex4(s + 2, &cp) != 0) {
            s += s[1] ? 2 : 1; /* another escape (or yajl's error) */
            continue;
        }
        if (cp >= 0xDC00 && cp <= 0xDFFF)
            return s - text;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s[6] != '\\' || s[7] != 'u' || hex4(s + 8, &lo) != 0 || lo < 0xDC00 || lo > 0xDFFF)
                return s - text;
            s += 12;
            continue;
        }
        s += 6;
    }
    return -1;
}

int wp_payload_parse(wp_payload_t *p, const char *text, char *err, size_t errlen)
{
    reader_t r = {.p = p, .err = err, .errlen = errlen};
    size_t len = strlen(text);
    int rc = -1;

    wp_buf_reset(&p->arena);
    wp_buf_reserve(&p->arena, 1);
    memset(&p->after, 0, sizeof p->after);
    memset(&p->key, 0, sizeof p->key);
    memset(&p->before, 0, sizeof p->before);
    ptrdiff_t bad = unpaired_surrogate(text);
    if (bad >= 0) {
        snprintf(err, errlen, "invalid payload JSON at byte %td: a \\u escape is an unpaired surrogate", bad);
        return -1;
    }
    r.yajl = yajl_alloc(&callbacks, wp_yajl_mem(), &r);
    yajl_status st = yajl_parse(r.yajl, (const unsigned char *)text, len);
    size_t at = yajl_get_bytes_consumed(r.yajl);
    if (st == yajl_status_ok) {
        st = yajl_complete_parse(r.yajl);
        at = len; /* a payload cut short shows only at its end */
    }
    if (st == yajl_status_error && !r.failed) {
        unsigned char *e = yajl_get_error(r.yajl, 0, NULL, 0);
        size_t n = strlen((char *)e);
        while (n > 0 && (e[n - 1] == '\n' || e[n - 1] == '.' || e[n - 1] == ' '))
            e[--n] = '\0';
        snprintf(err, errlen, "invalid payload JSON at byte %zu: %s", at, (char *)e);
        yajl_free_error(r.yajl, e);
        goto out;
    }
    if (st != yajl_status_ok)
        goto out; /* a callback stopped it and said why */
    if (r.npend > p->fields_cap) {
        p->fields_cap = r.npend;
        p->fields = wp_realloc(p->fields, r.npend * sizeof *p->fields);
    }
    for (size_t i = 0; i < r.npend; i++) {
        p->fields[i].name = p->arena.data + r.pend[i].name;
        p->fields[i].value = r.pend[i].is_null ? NULL : p->arena.data + r.pend[i].value;
    }
    wp_jobject_t *objs[] = {&p->after, &p->key, &p->before};
    for (size_t i = 0; i < 3; i++)
        if (objs[i]->present)
            objs[i]->fields = r.npend ? p->fields + (uintptr_t)objs[i]->fields : NULL;
    rc = 0;
out:
    if (rc != 0) {
        memset(&p->after, 0, sizeof p->after);
        memset(&p->key, 0, sizeof p->key);
        memset(&p->before, 0, sizeof p->before);
    }
    free(r.pend);
    yajl_free(r.yajl);
    return rc;
}

void wp_payload_free(wp_payload_t *p)
{
    wp_buf_free(&p->arena);
    free(p->fields);
    memset(p, 0, sizeof *p);
}

const wp_jfield_t *wp_jobject_get(const wp_jobject_t *o, const char *name, size_t *hint)
{
    size_t start = hint && *hint < o->n ? *hint : 0;
    for (size_t k = 0; k < o->n; k++) {
        size_t i = (start + k) % o->n;
        if (strcmp(o->fields[i].name, name) == 0) {
            if (hint)
                *hint = i + 1;
            return &o->fields[i];
        }
    }
    return NULL;
}
