/*
 * plugins/kafka/fastjson.h: an arena parser of event payloads for the Debezium encoder, giving
 * the tree yajl_tree_parse gives (for the plain JSON it accepts) without a malloc per node.
 * See fastjson.c for what it accepts and declines.  Not thread-safe: one arena per session.
 */
#ifndef WP_FASTJSON_H
#define WP_FASTJSON_H

#include <yajl/yajl_tree.h>

typedef struct wp_fj_arena wp_fj_arena_t;

wp_fj_arena_t *wp_fj_new(void);      /* NULL on out of memory */
void wp_fj_free(wp_fj_arena_t *a);   /* NULL is a no-op */
void wp_fj_reset(wp_fj_arena_t *a);  /* forgets every tree parsed into a */

/*
 * Parses text (NUL-terminated) when it is a JSON object in the plain subset; the tree lives in
 * a until the next parse or reset (never yajl_tree_free it).  NULL: declined (not plain, not an
 * object, invalid, or out of memory): parse it with yajl_tree_parse instead.
 */
yajl_val wp_fj_parse_object(wp_fj_arena_t *a, const char *text);

#endif /* WP_FASTJSON_H */
