/*
 * shape.c: a table shape recorded by the capture side
 * (walpipe.table_schemas.columns, a JSON array of {name, type, typeoid,
 * position}) read into a wp_tshape_t the mirror can follow.  position is the
 * source column's attnum (wal2json's include-column-positions); shapes
 * recorded before walpipe asked for it have none and are followed by name.
 *
 * Invariant: a shape that parses has a name and a type for every column;
 * one that does not leaves *out empty.  The shape owns its strings.
 */
#include "wp_setup.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "mem.h"
#include "shape.h"

int wp_tshape_parse(const char *text, wp_tshape_t *out, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loads(text, 0, &jerr);
    int rc = -1;

    memset(out, 0, sizeof *out);
    if (root == NULL || !json_is_array(root)) {
        snprintf(err, errlen, "recorded table shape is not a JSON array: %s", root ? "not an array" : jerr.text);
        goto out;
    }
    out->ncols = json_array_size(root);
    out->cols = wp_calloc(out->ncols ? out->ncols : 1, sizeof *out->cols);
    for (size_t i = 0; i < out->ncols; i++) {
        json_t *c = json_array_get(root, i);
        json_t *name = json_object_get(c, "name"), *type = json_object_get(c, "type");
        json_t *oid = json_object_get(c, "typeoid");
        json_t *pos = json_object_get(c, "position");
        if (pos == NULL)
            pos = json_object_get(c, "attnum");
        if (!json_is_string(name) || !json_is_string(type)) {
            snprintf(err, errlen, "recorded table shape: column %zu has no name or type", i + 1);
            goto out;
        }
        out->cols[i].name = wp_strdup(json_string_value(name));
        out->cols[i].type = wp_strdup(json_string_value(type));
        out->cols[i].typeoid = json_is_integer(oid) ? (int64_t)json_integer_value(oid) : -1;
        out->cols[i].position = -1;
        if (json_is_integer(pos) && json_integer_value(pos) > 0 && json_integer_value(pos) <= 32767)
            out->cols[i].position = (int)json_integer_value(pos);
    }
    out->positioned = out->ncols > 0;
    for (size_t i = 0; i < out->ncols; i++)
        out->positioned &= out->cols[i].position > 0;
    rc = 0;
out:
    if (rc != 0)
        wp_tshape_clear(out);
    json_decref(root);
    return rc;
}

void wp_tshape_clear(wp_tshape_t *shape)
{
    for (size_t i = 0; i < shape->ncols; i++) {
        free(shape->cols[i].name);
        free(shape->cols[i].type);
    }
    free(shape->cols);
    memset(shape, 0, sizeof *shape);
}

ssize_t wp_tshape_at(const wp_tshape_t *shape, int position)
{
    for (size_t i = 0; position > 0 && i < shape->ncols; i++)
        if (shape->cols[i].position == position)
            return (ssize_t)i;
    return -1;
}

ssize_t wp_tshape_named(const wp_tshape_t *shape, const char *name)
{
    for (size_t i = 0; i < shape->ncols; i++)
        if (strcmp(shape->cols[i].name, name) == 0)
            return (ssize_t)i;
    return -1;
}
