/*
 * dbz_encode_lines.c: a driver for tests/integration/test_dbz_envelope_pg.py (not a test itself).
 *
 * Reads one sink event per stdin line, as JSON {"op","schema","table","lsn","seq","xid",
 * "commit_us","payload","columns","key_columns"} (payload/columns/key_columns as JSON TEXT,
 * e.g. raw_events.payload::text), encodes it with wp_dbz_encode (prefix "pg", database "app",
 * schemas.enable from argv[1] == "1", table memory on) and writes one line per record:
 * {"topic":..,"key":<text or null>,"value":<text or null>,"header":<name or null>}.
 * A line that fails to encode prints {"error":"..."}.  Exit status 0 unless input is not JSON.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include "envelope.h"

static const char *str(yajl_val o, const char *k)
{
    const char *p[] = {k, NULL};
    yajl_val v = yajl_tree_get(o, p, yajl_t_string);
    return v ? YAJL_GET_STRING(v) : NULL;
}

static long long num(yajl_val o, const char *k, long long dflt)
{
    const char *p[] = {k, NULL};
    yajl_val v = yajl_tree_get(o, p, yajl_t_number);
    return v && YAJL_IS_INTEGER(v) ? YAJL_GET_INTEGER(v) : dflt;
}

static void put(yajl_gen g, const char *k, const char *v, size_t n)
{
    yajl_gen_string(g, (const unsigned char *)k, strlen(k));
    if (v)
        yajl_gen_string(g, (const unsigned char *)v, n);
    else
        yajl_gen_null(g);
}

int main(int argc, char **argv)
{
    wp_dbz_options_t opt = {0};
    opt.topic_prefix = "pg";
    opt.database = "app";
    opt.schemas_enable = argc > 1 && strcmp(argv[1], "1") == 0;
    opt.tables = wp_dbz_tables_new();
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int rc = 0;
    yajl_gen g = yajl_gen_alloc(NULL);
    while ((len = getline(&line, &cap, stdin)) > 0) {
        char perr[128];
        yajl_val in = yajl_tree_parse(line, perr, sizeof perr);
        if (!in) {
            fprintf(stderr, "not JSON: %s\n", perr);
            rc = 1;
            break;
        }
        wp_sink_event_t ev = {0};
        ev.source = "app";
        ev.op = str(in, "op");
        ev.schema = str(in, "schema");
        ev.table = str(in, "table");
        ev.lsn = (uint64_t)num(in, "lsn", 0);
        ev.seq = (int32_t)num(in, "seq", 0);
        ev.xid = num(in, "xid", -1);
        ev.commit_us = num(in, "commit_us", 0);
        ev.payload = str(in, "payload");
        ev.payload_len = ev.payload ? strlen(ev.payload) : 0;
        ev.columns = str(in, "columns");
        ev.key_columns = str(in, "key_columns");
        wp_dbz_record_t out[3];
        char err[256];
        int n = wp_dbz_encode(&opt, &ev, 1, out, err, sizeof err);
        const unsigned char *buf;
        size_t blen;
        if (n < 0) {
            yajl_gen_map_open(g);
            put(g, "error", err, strlen(err));
            yajl_gen_map_close(g);
            yajl_gen_get_buf(g, &buf, &blen);
            printf("%.*s\n", (int)blen, buf);
            yajl_gen_clear(g);
            yajl_gen_reset(g, NULL);
        }
        for (int i = 0; i < n; i++) {
            yajl_gen_map_open(g);
            put(g, "topic", out[i].topic, strlen(out[i].topic));
            put(g, "key", out[i].key, out[i].key_len);
            put(g, "value", out[i].value, out[i].value_len);
            put(g, "header", out[i].header_name, out[i].header_name ? strlen(out[i].header_name) : 0);
            yajl_gen_map_close(g);
            yajl_gen_get_buf(g, &buf, &blen);
            printf("%.*s\n", (int)blen, buf);
            yajl_gen_clear(g);
            yajl_gen_reset(g, NULL);
            wp_dbz_record_free(&out[i]);
        }
        yajl_tree_free(in);
    }
    yajl_gen_free(g);
    free(line);
    wp_dbz_tables_free(opt.tables);
    return rc;
}
