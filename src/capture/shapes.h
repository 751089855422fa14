/*
 * shapes.h: the table shapes a stager knows staging holds, and under which id.
 *
 * A stager records each new shape once (walpipe.record_shape) and then finds
 * it here.  Entries recorded in the open staging transaction are pending:
 * they become known when it commits and are forgotten when it rolls back, so
 * a shape is never taken for recorded when its row was rolled back.
 *
 * Invariant: a known entry says that walpipe.table_schemas holds exactly this
 * content (schema, table, columns) under its id, committed.
 */
#ifndef WP_SHAPES_H
#define WP_SHAPES_H

#include "wp_setup.h"

#include "pipeline.h"

typedef struct wp_shapes wp_shapes_t;

wp_shapes_t *wp_shapes_create(void);
void wp_shapes_destroy(wp_shapes_t *shapes); /* NULL is a no-op */

/* The id staging holds shape's content under (known or pending), or 0 when not known. */
int64_t wp_shapes_lookup(const wp_shapes_t *shapes, const wp_shape_t *shape);

/* Remembers shape's content (copied) as recorded under id by the open transaction. */
void wp_shapes_add_pending(wp_shapes_t *shapes, const wp_shape_t *shape, int64_t id);

/* The open transaction committed: its entries are known from now on. */
void wp_shapes_commit(wp_shapes_t *shapes);

/* The open transaction rolled back (or its outcome is unknown): forgets its entries. */
void wp_shapes_rollback(wp_shapes_t *shapes);

#endif /* WP_SHAPES_H */
