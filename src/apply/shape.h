/*
 * shape.h: a source table's recorded shape (walpipe.table_schemas.columns):
 * its columns' names and types, which the mirror follows (see shape.c).
 */
#ifndef WP_SHAPE_H
#define WP_SHAPE_H

#include "wp_setup.h"

#include <walpipe/lsn.h>

/* One column of a recorded table shape (walpipe.table_schemas.columns). */
typedef struct wp_tshape_col {
    char *name;
    char *type;      /* format_type() text on the source */
    int64_t typeoid; /* -1 when not recorded */
    int position;    /* the source column's attnum; -1 when not recorded (older staging, a delete's identity) */
} wp_tshape_col_t;

typedef struct wp_tshape {
    wp_tshape_col_t *cols;
    size_t ncols;
    wp_lsn_t first_lsn; /* where staging first saw this shape: orders shapes of one table */
    bool positioned;    /* every column has a position */
} wp_tshape_t;

/* The index of the column at position (attnum) in shape, or -1. */
ssize_t wp_tshape_at(const wp_tshape_t *shape, int position);

/* The index of the column named name in shape, or -1. */
ssize_t wp_tshape_named(const wp_tshape_t *shape, const char *name);

/*
 * Parses a columns JSON array into *out: {"name", "type", "typeoid",
 * "position"} entries (key discovery's key columns may name the attnum
 * "attnum" instead of "position").  Returns 0, or -1 with a reason.
 */
int wp_tshape_parse(const char *json, wp_tshape_t *out, char *err, size_t errlen);
void wp_tshape_clear(wp_tshape_t *shape);

#endif /* WP_SHAPE_H */
