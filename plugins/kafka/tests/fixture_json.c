/* fixture_json.c: see fixture_json.h. */
#define _GNU_SOURCE
#include "fixture_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *fx_read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    if (buf)
        buf[n] = '\0';
    fclose(f);
    return buf;
}

yajl_val fx_get(yajl_val obj, const char *key)
{
    const char *path[] = {key, NULL};
    return obj && YAJL_IS_OBJECT(obj) ? yajl_tree_get(obj, path, yajl_t_any) : NULL;
}

const char *fx_str_or_null(yajl_val v)
{
    return v && YAJL_IS_STRING(v) ? v->u.string : NULL;
}

void fx_dump(yajl_gen g, yajl_val v)
{
    if (YAJL_IS_OBJECT(v)) {
        yajl_gen_map_open(g);
        for (size_t i = 0; i < v->u.object.len; i++) {
            yajl_gen_string(g, (const unsigned char *)v->u.object.keys[i], strlen(v->u.object.keys[i]));
            fx_dump(g, v->u.object.values[i]);
        }
        yajl_gen_map_close(g);
    } else if (YAJL_IS_ARRAY(v)) {
        yajl_gen_array_open(g);
        for (size_t i = 0; i < v->u.array.len; i++)
            fx_dump(g, v->u.array.values[i]);
        yajl_gen_array_close(g);
    } else if (YAJL_IS_STRING(v))
        yajl_gen_string(g, (const unsigned char *)v->u.string, strlen(v->u.string));
    else if (YAJL_IS_NUMBER(v))
        yajl_gen_number(g, v->u.number.r, strlen(v->u.number.r));
    else if (YAJL_IS_TRUE(v))
        yajl_gen_bool(g, 1);
    else if (YAJL_IS_FALSE(v))
        yajl_gen_bool(g, 0);
    else
        yajl_gen_null(g);
}

char *fx_gen_text(yajl_gen g)
{
    const unsigned char *buf;
    size_t n;
    yajl_gen_get_buf(g, &buf, &n);
    char *s = strndup((const char *)buf, n);
    yajl_gen_clear(g);
    yajl_gen_reset(g, NULL);
    return s;
}

char *fx_to_text(yajl_val v)
{
    if (!v || YAJL_IS_NULL(v))
        return NULL;
    yajl_gen g = yajl_gen_alloc(NULL);
    fx_dump(g, v);
    char *s = fx_gen_text(g);
    yajl_gen_free(g);
    return s;
}

void fx_event(yajl_val e, uint64_t ticket, wp_sink_event_t *ev)
{
    memset(ev, 0, sizeof *ev);
    ev->ticket = ticket;
    ev->source = fx_str_or_null(fx_get(e, "source"));
    ev->lsn = (uint64_t)YAJL_GET_INTEGER(fx_get(e, "lsn"));
    ev->seq = (int32_t)YAJL_GET_INTEGER(fx_get(e, "seq"));
    ev->op = fx_str_or_null(fx_get(e, "op"));
    ev->schema = fx_str_or_null(fx_get(e, "schema"));
    ev->table = fx_str_or_null(fx_get(e, "table"));
    ev->xid = fx_get(e, "xid") && YAJL_IS_INTEGER(fx_get(e, "xid")) ? YAJL_GET_INTEGER(fx_get(e, "xid")) : -1;
    ev->commit_us = fx_get(e, "commit_us") ? YAJL_GET_INTEGER(fx_get(e, "commit_us")) : 0;
    char *payload = fx_to_text(fx_get(e, "payload"));
    ev->payload = payload;
    ev->payload_len = payload ? strlen(payload) : 0;
    ev->columns = fx_to_text(fx_get(e, "columns"));
    ev->key_columns = fx_to_text(fx_get(e, "key_columns"));
}

void fx_event_free(wp_sink_event_t *ev)
{
    free((char *)ev->payload);
    free((char *)ev->columns);
    free((char *)ev->key_columns);
    ev->payload = ev->columns = ev->key_columns = NULL;
}
