/*
 * plugins/kafka/fastjson.c: a payload parser for the Debezium encoder that builds the same
 * yajl_val tree yajl_tree_parse builds, into an arena (one reset per event instead of a
 * malloc per node, key, string and number, and no strtod per number).
 *
 * Invariant: for every text it accepts, the tree equals yajl_tree_parse's as the encoder reads
 * it (types, object keys in order with duplicates kept, strings decoded, each number's text
 * in u.number.r); it accepts only a plain subset and declines the rest (returns NULL), and
 * then the caller parses with yajl_tree_parse as before, so anything unusual (comments,
 * \u escapes, bytes >= 0x80, control characters, invalid JSON, a top level that is not an
 * object, deep nesting) behaves exactly as it did.  Numbers' i, d and flags are NOT set
 * (the encoder reads numbers by their text only).  test_dbz_oracle compares the encoder's
 * output with and without this parser.
 *
 * Ownership: every node and string is the arena's, valid until wp_fj_reset or wp_fj_free.
 */
#include "fastjson.h"

#include <stdlib.h>
#include <string.h>

#define FJ_MAX_DEPTH 32
#define FJ_CHUNK_MIN 8192
#define FJ_KEEP_MAX (1u << 20) /* a reset keeps at most this much memory */

typedef struct fj_chunk {
    struct fj_chunk *next;
    size_t cap, used;
    _Alignas(16) unsigned char data[];
} fj_chunk_t;

struct wp_fj_arena {
    fj_chunk_t *head;
};

wp_fj_arena_t *wp_fj_new(void)
{
    return calloc(1, sizeof(wp_fj_arena_t));
}

static void fj_free_chunks(fj_chunk_t *c)
{
    while (c) {
        fj_chunk_t *next = c->next;
        free(c);
        c = next;
    }
}

void wp_fj_free(wp_fj_arena_t *a)
{
    if (!a)
        return;
    fj_free_chunks(a->head);
    free(a);
}

void wp_fj_reset(wp_fj_arena_t *a)
{
    size_t total = 0;
    if (!a || !a->head)
        return;
    for (fj_chunk_t *c = a->head; c; c = c->next)
        total += c->cap;
    if (!a->head->next && total <= FJ_KEEP_MAX) {
        a->head->used = 0;
        return;
    }
    /* several chunks: next time one of their joint size (when small enough to keep) */
    fj_free_chunks(a->head);
    a->head = NULL;
    if (total <= FJ_KEEP_MAX) {
        a->head = malloc(sizeof(fj_chunk_t) + total);
        if (a->head) {
            a->head->next = NULL;
            a->head->cap = total;
            a->head->used = 0;
        }
    }
}

static void *fj_alloc(wp_fj_arena_t *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (!a->head || a->head->cap - a->head->used < n) {
        size_t cap = a->head ? a->head->cap * 2 : FJ_CHUNK_MIN;
        if (cap < n)
            cap = n;
        fj_chunk_t *c = malloc(sizeof(fj_chunk_t) + cap);
        if (!c)
            return NULL;
        c->next = a->head;
        c->cap = cap;
        c->used = 0;
        a->head = c;
    }
    void *p = a->head->data + a->head->used;
    a->head->used += n;
    return p;
}

typedef struct fj {
    wp_fj_arena_t *a;
    const char *p;
} fj_t;

static void fj_ws(fj_t *f)
{
    while (*f->p == ' ' || *f->p == '\n' || *f->p == '\r' || *f->p == '\t')
        f->p++;
}

/* A string at f->p (the opening quote): decoded into the arena.  NULL: declined. */
static char *fj_string(fj_t *f)
{
    const char *s = ++f->p, *q = s;
    size_t escapes = 0;
    for (;; q++) {
        unsigned char ch = (unsigned char)*q;
        if (ch == '"')
            break;
        if (ch < 0x20 || ch >= 0x80)
            return NULL; /* end of text, control character, non-ASCII: yajl's own checks decide */
        if (ch == '\\') {
            char e = q[1];
            if (e != '"' && e != '\\' && e != '/' && e != 'b' && e != 'f' && e != 'n' && e != 'r' && e != 't')
                return NULL; /* \u and invalid escapes */
            q++;
            escapes++;
        }
    }
    size_t n = (size_t)(q - s);
    char *out = fj_alloc(f->a, n - escapes + 1);
    if (!out)
        return NULL;
    if (!escapes) {
        memcpy(out, s, n);
        out[n] = '\0';
    } else {
        size_t o = 0;
        for (const char *r = s; r < q; r++) {
            if (*r != '\\') {
                out[o++] = *r;
                continue;
            }
            r++;
            switch (*r) {
            case 'b':
                out[o++] = '\b';
                break;
            case 'f':
                out[o++] = '\f';
                break;
            case 'n':
                out[o++] = '\n';
                break;
            case 'r':
                out[o++] = '\r';
                break;
            case 't':
                out[o++] = '\t';
                break;
            default: /* '"', '\\', '/' */
                out[o++] = *r;
            }
        }
        out[o] = '\0';
    }
    f->p = q + 1;
    return out;
}

static int fj_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* A number at f->p in JSON's grammar, its text copied.  NULL: declined. */
static char *fj_number(fj_t *f)
{
    const char *s = f->p, *q = s;
    if (*q == '-')
        q++;
    if (*q == '0')
        q++;
    else if (*q >= '1' && *q <= '9')
        while (fj_digit(*q))
            q++;
    else
        return NULL;
    if (*q == '.') {
        q++;
        if (!fj_digit(*q))
            return NULL;
        while (fj_digit(*q))
            q++;
    }
    if (*q == 'e' || *q == 'E') {
        q++;
        if (*q == '+' || *q == '-')
            q++;
        if (!fj_digit(*q))
            return NULL;
        while (fj_digit(*q))
            q++;
    }
    /* what may follow a number in the accepted subset (yajl lexes e.g. "01" as two tokens
       and fails; declined here) */
    if (*q != ',' && *q != '}' && *q != ']' && *q != ' ' && *q != '\n' && *q != '\r' && *q != '\t' && *q != '\0')
        return NULL;
    size_t n = (size_t)(q - s);
    char *out = fj_alloc(f->a, n + 1);
    if (!out)
        return NULL;
    memcpy(out, s, n);
    out[n] = '\0';
    f->p = q;
    return out;
}

static yajl_val fj_node(fj_t *f, yajl_type t)
{
    yajl_val v = fj_alloc(f->a, sizeof *v);
    if (v) {
        memset(v, 0, sizeof *v);
        v->type = t;
    }
    return v;
}

/* One member or element while its container is open. */
typedef struct fj_item {
    struct fj_item *next;
    const char *key;
    yajl_val val;
} fj_item_t;

static yajl_val fj_value(fj_t *f, int depth);

static yajl_val fj_container(fj_t *f, int depth, int is_object)
{
    fj_item_t *first = NULL, **tail = &first;
    size_t n = 0;
    char close = is_object ? '}' : ']';
    yajl_val v;

    if (depth >= FJ_MAX_DEPTH)
        return NULL;
    f->p++;
    fj_ws(f);
    if (*f->p == close) {
        f->p++;
    } else {
        for (;;) {
            fj_item_t *it = fj_alloc(f->a, sizeof *it);
            if (!it)
                return NULL;
            it->next = NULL;
            it->key = NULL;
            if (is_object) {
                if (*f->p != '"' || !(it->key = fj_string(f)))
                    return NULL;
                fj_ws(f);
                if (*f->p != ':')
                    return NULL;
                f->p++;
                fj_ws(f);
            }
            if (!(it->val = fj_value(f, depth + 1)))
                return NULL;
            *tail = it;
            tail = &it->next;
            n++;
            fj_ws(f);
            if (*f->p == ',') {
                f->p++;
                fj_ws(f);
                continue;
            }
            if (*f->p != close)
                return NULL;
            f->p++;
            break;
        }
    }
    if (!(v = fj_node(f, is_object ? yajl_t_object : yajl_t_array)))
        return NULL;
    yajl_val *vals = n ? fj_alloc(f->a, n * sizeof *vals) : NULL;
    const char **keys = n && is_object ? fj_alloc(f->a, n * sizeof *keys) : NULL;
    if (n && (!vals || (is_object && !keys)))
        return NULL;
    size_t i = 0;
    for (fj_item_t *it = first; it; it = it->next, i++) {
        vals[i] = it->val;
        if (is_object)
            keys[i] = it->key;
    }
    if (is_object) {
        v->u.object.keys = keys;
        v->u.object.values = vals;
        v->u.object.len = n;
    } else {
        v->u.array.values = vals;
        v->u.array.len = n;
    }
    return v;
}

static yajl_val fj_value(fj_t *f, int depth)
{
    yajl_val v;
    switch (*f->p) {
    case '{':
        return fj_container(f, depth, 1);
    case '[':
        return fj_container(f, depth, 0);
    case '"': {
        char *s = fj_string(f);
        if (!s || !(v = fj_node(f, yajl_t_string)))
            return NULL;
        v->u.string = s;
        return v;
    }
    case 't':
        if (strncmp(f->p, "true", 4) != 0)
            return NULL;
        f->p += 4;
        return fj_node(f, yajl_t_true);
    case 'f':
        if (strncmp(f->p, "false", 5) != 0)
            return NULL;
        f->p += 5;
        return fj_node(f, yajl_t_false);
    case 'n':
        if (strncmp(f->p, "null", 4) != 0)
            return NULL;
        f->p += 4;
        return fj_node(f, yajl_t_null);
    default: {
        char *r = fj_number(f);
        if (!r || !(v = fj_node(f, yajl_t_number)))
            return NULL;
        v->u.number.r = r;
        return v;
    }
    }
}

yajl_val wp_fj_parse_object(wp_fj_arena_t *a, const char *text)
{
    fj_t f = {a, text};
    yajl_val v;

    wp_fj_reset(a);
    fj_ws(&f);
    if (*f.p != '{')
        return NULL;
    v = fj_container(&f, 0, 1);
    if (!v)
        return NULL;
    fj_ws(&f); /* only whitespace may follow (yajl: trailing garbage is an error) */
    return *f.p == '\0' ? v : NULL;
}
