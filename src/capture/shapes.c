/*
 * shapes.c: a stager's table of the shapes staging holds (see shapes.h).
 *
 * Open addressing with linear probing over entries keyed by the proposed id
 * (a hash of the content already), each compared by content on a hit.
 * Pending entries sit in the table too and are listed apart, so a rollback
 * can take them out by rebuilding the table without them.  It is only a
 * cache: past MAX_KNOWN entries it starts over, and a miss only costs one
 * walpipe.record_shape call.
 */
#include "wp_setup.h"

#include <stdlib.h>
#include <string.h>

#include "shapes.h"

#define MAX_KNOWN 65536

typedef struct entry {
    int64_t proposed; /* the decoder's id for the content */
    int64_t id;       /* the id staging holds it under */
    wp_shape_t content; /* schema, table, columns (owned); refs unused */
    bool pending;
} entry_t;

struct wp_shapes {
    entry_t **slots; /* cap slots, a power of two; NULL = empty */
    size_t cap, count;
    entry_t **pending; /* the entries of the open transaction */
    size_t npending, pending_cap;
};

wp_shapes_t *wp_shapes_create(void)
{
    return wp_calloc(1, sizeof(wp_shapes_t));
}

static void entry_free(entry_t *e)
{
    free(e->content.schema);
    free(e->content.table);
    free(e->content.columns);
    free(e);
}

/* Frees every entry matching pending (all when all), and rebuilds the table from the rest. */
static void drop_entries(wp_shapes_t *shapes, bool all)
{
    size_t cap = shapes->cap;
    entry_t **old = shapes->slots;
    shapes->slots = cap ? wp_calloc(cap, sizeof *shapes->slots) : NULL;
    shapes->count = 0;
    for (size_t i = 0; i < cap; i++) {
        entry_t *e = old[i];
        if (e == NULL)
            continue;
        if (all || e->pending) {
            entry_free(e);
            continue;
        }
        size_t j = (size_t)e->proposed & (cap - 1);
        while (shapes->slots[j])
            j = (j + 1) & (cap - 1);
        shapes->slots[j] = e;
        shapes->count++;
    }
    free(old);
    shapes->npending = 0;
}

void wp_shapes_destroy(wp_shapes_t *shapes)
{
    if (shapes == NULL)
        return;
    drop_entries(shapes, true);
    free(shapes->slots);
    free(shapes->pending);
    free(shapes);
}

static entry_t *find(const wp_shapes_t *shapes, const wp_shape_t *shape)
{
    if (shapes->cap == 0)
        return NULL;
    for (size_t j = (size_t)shape->id & (shapes->cap - 1); shapes->slots[j]; j = (j + 1) & (shapes->cap - 1)) {
        entry_t *e = shapes->slots[j];
        if (e->proposed == shape->id &&
            wp_shape_is(&e->content, shape->schema, shape->table, shape->columns, shape->columns_len))
            return e;
    }
    return NULL;
}

int64_t wp_shapes_lookup(const wp_shapes_t *shapes, const wp_shape_t *shape)
{
    const entry_t *e = find(shapes, shape);
    return e ? e->id : 0;
}

static void grow(wp_shapes_t *shapes)
{
    size_t cap = shapes->cap ? shapes->cap * 2 : 64;
    entry_t **slots = wp_calloc(cap, sizeof *slots);
    for (size_t i = 0; i < shapes->cap; i++) {
        entry_t *e = shapes->slots[i];
        if (e == NULL)
            continue;
        size_t j = (size_t)e->proposed & (cap - 1);
        while (slots[j])
            j = (j + 1) & (cap - 1);
        slots[j] = e;
    }
    free(shapes->slots);
    shapes->slots = slots;
    shapes->cap = cap;
}

void wp_shapes_add_pending(wp_shapes_t *shapes, const wp_shape_t *shape, int64_t id)
{
    if (find(shapes, shape) != NULL)
        return;
    if ((shapes->count + 1) * 2 > shapes->cap)
        grow(shapes);
    entry_t *e = wp_calloc(1, sizeof *e);
    e->proposed = shape->id;
    e->id = id;
    e->content.schema = wp_strdup(shape->schema);
    e->content.table = wp_strdup(shape->table);
    e->content.columns = wp_strndup(shape->columns, shape->columns_len);
    e->content.columns_len = shape->columns_len;
    e->pending = true;
    size_t j = (size_t)e->proposed & (shapes->cap - 1);
    while (shapes->slots[j])
        j = (j + 1) & (shapes->cap - 1);
    shapes->slots[j] = e;
    shapes->count++;
    if (shapes->npending == shapes->pending_cap) {
        shapes->pending_cap = shapes->pending_cap ? shapes->pending_cap * 2 : 16;
        shapes->pending = wp_realloc(shapes->pending, shapes->pending_cap * sizeof *shapes->pending);
    }
    shapes->pending[shapes->npending++] = e;
}

void wp_shapes_commit(wp_shapes_t *shapes)
{
    for (size_t i = 0; i < shapes->npending; i++)
        shapes->pending[i]->pending = false;
    shapes->npending = 0;
    if (shapes->count > MAX_KNOWN)
        drop_entries(shapes, true);
}

void wp_shapes_rollback(wp_shapes_t *shapes)
{
    if (shapes->npending > 0)
        drop_entries(shapes, false);
}
