/*
 * yajl_mem.h: yajl's allocator routed through mem.h, for every yajl parser.
 *
 * Invariant: memory yajl asks for comes from wp_malloc/wp_realloc, so
 * running out of it aborts with a message as everywhere else in walpipe.
 */
#ifndef WP_YAJL_MEM_H
#define WP_YAJL_MEM_H

#include "wp_setup.h"

#include <yajl/yajl_common.h>

/* The allocator to pass to yajl_alloc (shared, never freed, safe from any thread). */
yajl_alloc_funcs *wp_yajl_mem(void);

#endif /* WP_YAJL_MEM_H */
