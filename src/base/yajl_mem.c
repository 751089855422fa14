/*
 * yajl_mem.c: yajl's allocator on top of mem.h (see yajl_mem.h).
 *
 * Invariant: the functions keep no state; the table is written once, at
 * compile time, so sharing it between threads is safe.
 */
#include "wp_setup.h"

#include <stdlib.h>

#include "mem.h"
#include "yajl_mem.h"

static void *yajl_malloc_fn(void *ctx, size_t n)
{
    (void)ctx;
    return wp_malloc(n);
}

static void *yajl_realloc_fn(void *ctx, void *p, size_t n)
{
    (void)ctx;
    return wp_realloc(p, n);
}

static void yajl_free_fn(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static yajl_alloc_funcs funcs = {yajl_malloc_fn, yajl_realloc_fn, yajl_free_fn, NULL};

yajl_alloc_funcs *wp_yajl_mem(void)
{
    return &funcs;
}
