/*
 * test_dbz_envelope.c: the Debezium envelope encoder (plugins/kafka/envelope.c) against
 * fixtures.
 *
 * Each fixture (fixtures/<case>.json) holds the encoder options, one walpipe sink event (as
 * raw_events would hand it over: payload, columns, key_columns) and the records Debezium's
 * PostgreSQL connector 3.1.3.Final writes for it through JsonConverter, written by hand from
 * Debezium's documented format and source (each fixture's "why" says where from).  The
 * records are compared field by field: every object's keys in the same ORDER (Debezium's
 * field order is part of the contract: keys must be byte-identical for the murmur2
 * partitioner), numbers by their text, strings and nesting exactly; the first difference is
 * reported with its path.  The raw key/value text must also be compact (no whitespace).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include "envelope.h"
#include "fixture_json.h"

/* Field-by-field, order-sensitive comparison; on a difference prints the path and returns 0. */
static int same(yajl_val want, yajl_val got, const char *path)
{
    char sub[1024];
    if (!want || !got || want->type != got->type) {
        print_error("%s: want type %d, got type %d\n", path, want ? (int)want->type : -1, got ? (int)got->type : -1);
        return 0;
    }
    switch (want->type) {
    case yajl_t_object:
        if (want->u.object.len != got->u.object.len) {
            print_error("%s: want %zu fields, got %zu\n", path, want->u.object.len, got->u.object.len);
            for (size_t i = 0; i < got->u.object.len; i++)
                print_error("   got field %s\n", got->u.object.keys[i]);
            return 0;
        }
        for (size_t i = 0; i < want->u.object.len; i++) {
            snprintf(sub, sizeof sub, "%s.%s", path, want->u.object.keys[i]);
            if (strcmp(want->u.object.keys[i], got->u.object.keys[i]) != 0) {
                print_error("%s: field %zu: want \"%s\", got \"%s\"\n", path, i, want->u.object.keys[i],
                            got->u.object.keys[i]);
                return 0;
            }
            if (!same(want->u.object.values[i], got->u.object.values[i], sub))
                return 0;
        }
        return 1;
    case yajl_t_array:
        if (want->u.array.len != got->u.array.len) {
            print_error("%s: want %zu items, got %zu\n", path, want->u.array.len, got->u.array.len);
            return 0;
        }
        for (size_t i = 0; i < want->u.array.len; i++) {
            snprintf(sub, sizeof sub, "%s[%zu]", path, i);
            if (!same(want->u.array.values[i], got->u.array.values[i], sub))
                return 0;
        }
        return 1;
    case yajl_t_string:
        if (strcmp(want->u.string, got->u.string) != 0) {
            print_error("%s: want \"%s\", got \"%s\"\n", path, want->u.string, got->u.string);
            return 0;
        }
        return 1;
    case yajl_t_number:
        if (strcmp(want->u.number.r, got->u.number.r) != 0) {
            print_error("%s: want %s, got %s\n", path, want->u.number.r, got->u.number.r);
            return 0;
        }
        return 1;
    default:
        return 1;
    }
}

/* Compares one record part (key, value, header value): want JSON null means a NULL pointer. */
static int same_part(yajl_val want, const char *got, size_t got_len, const char *path)
{
    char perr[256];
    if (!want || YAJL_IS_NULL(want)) {
        if (got) {
            print_error("%s: want null, got %.*s\n", path, (int)got_len, got);
            return 0;
        }
        return 1;
    }
    if (!got) {
        print_error("%s: want a value, got NULL\n", path);
        return 0;
    }
    if (strlen(got) != got_len) {
        print_error("%s: length %zu is not the text's\n", path, got_len);
        return 0;
    }
    for (size_t i = 0; i < got_len; i++) {
        /* compact: no whitespace outside strings (none of the fixtures' strings hold a newline) */
        if (got[i] == '\n') {
            print_error("%s: not compact\n", path);
            return 0;
        }
    }
    yajl_val g = yajl_tree_parse(got, perr, sizeof perr);
    if (!g) {
        print_error("%s: not JSON (%s): %s\n", path, perr, got);
        return 0;
    }
    int ok = same(want, g, path);
    if (!ok)
        print_error("%s was: %s\n", path, got);
    yajl_tree_free(g);
    return ok;
}

static wp_dbz_decimal_t decimal_mode(yajl_val v)
{
    const char *s = v && YAJL_IS_STRING(v) ? v->u.string : "precise";
    return strcmp(s, "string") == 0 ? WP_DBZ_DECIMAL_STRING
           : strcmp(s, "double") == 0 ? WP_DBZ_DECIMAL_DOUBLE
                                      : WP_DBZ_DECIMAL_PRECISE;
}

/*
 * Runs the fixture's events in order through one encoder session (one table memory) and checks
 * each event's records: "events" is an array of {"event":..,"records":[..]} (or one "event" and
 * "records" at the top).
 */
static void run_fixture(const char *name)
{
    char path[1024], perr[256];
    snprintf(path, sizeof path, "%s/%s.json", WP_DBZ_FIXTURES, name);
    char *text = fx_read_file(path);
    assert_non_null(text);
    yajl_val fx = yajl_tree_parse(text, perr, sizeof perr);
    if (!fx)
        fail_msg("%s: %s", path, perr);
    yajl_val o = fx_get(fx, "options");
    wp_dbz_options_t opt = {0};
    opt.topic_prefix = fx_str_or_null(fx_get(o, "topic_prefix"));
    opt.database = fx_str_or_null(fx_get(o, "database"));
    opt.schemas_enable = YAJL_IS_TRUE(fx_get(o, "schemas_enable"));
    opt.decimal_mode = decimal_mode(fx_get(o, "decimal_mode"));
    opt.unavailable_placeholder = fx_str_or_null(fx_get(o, "unavailable_placeholder"));
    opt.now_ns = fx_get(o, "now_ns") ? YAJL_GET_INTEGER(fx_get(o, "now_ns")) : 0;
    if (YAJL_IS_TRUE(fx_get(o, "table_memory")))
        opt.tables = wp_dbz_tables_new();
    int tombstones = !YAJL_IS_FALSE(fx_get(o, "tombstones"));

    yajl_val steps = fx_get(fx, "steps");
    size_t nsteps = steps ? steps->u.array.len : 1;
    int ok = 1;
    /* with a table memory, every step runs twice: the second round is served by its caches
       (parsed column lists, generated schemas) and must give the same records */
    size_t rounds = opt.tables ? 2 : 1;
    for (size_t s = 0; s < nsteps * rounds && ok; s++) {
        yajl_val step = steps ? steps->u.array.values[s % nsteps] : fx;
        yajl_val e = fx_get(step, "event");
        wp_sink_event_t ev;
        fx_event(e, s + 1, &ev);

        wp_dbz_record_t out[3];
        char err[256];
        int n = wp_dbz_encode(&opt, &ev, tombstones, out, err, sizeof err);
        yajl_val want = fx_get(step, "records");
        yajl_val want_err = fx_get(step, "error");
        if (want_err) {
            if (n != -1 || strstr(err, want_err->u.string) == NULL) {
                print_error("%s step %zu: want error containing \"%s\", got n=%d \"%s\"\n", name, s, want_err->u.string,
                            n, err);
                ok = 0;
            }
        } else if (n < 0) {
            print_error("%s step %zu: encode failed: %s\n", name, s, err);
            ok = 0;
        } else if ((size_t)n != want->u.array.len) {
            print_error("%s step %zu: want %zu records, got %d\n", name, s, want->u.array.len, n);
            for (int i = 0; i < n; i++)
                print_error("  got %s | %s\n", out[i].key ? out[i].key : "null", out[i].value ? out[i].value : "null");
            ok = 0;
        } else {
            for (int i = 0; i < n && ok; i++) {
                yajl_val r = want->u.array.values[i];
                char p[256];
                if (strcmp(out[i].topic, fx_get(r, "topic")->u.string) != 0) {
                    print_error("%s step %zu record %d: topic want %s got %s\n", name, s, i, fx_get(r, "topic")->u.string,
                                out[i].topic);
                    ok = 0;
                    break;
                }
                snprintf(p, sizeof p, "%s[%zu].record[%d].key", name, s, i);
                ok = ok && same_part(fx_get(r, "key"), out[i].key, out[i].key_len, p);
                snprintf(p, sizeof p, "%s[%zu].record[%d].value", name, s, i);
                ok = ok && same_part(fx_get(r, "value"), out[i].value, out[i].value_len, p);
                yajl_val h = fx_get(r, "header");
                const char *hn = fx_str_or_null(fx_get(h, "name"));
                if ((hn == NULL) != (out[i].header_name == NULL) ||
                    (hn && strcmp(hn, out[i].header_name) != 0)) {
                    print_error("%s step %zu record %d: header want %s got %s\n", name, s, i, hn ? hn : "none",
                                out[i].header_name ? out[i].header_name : "none");
                    ok = 0;
                }
                snprintf(p, sizeof p, "%s[%zu].record[%d].header", name, s, i);
                if (ok && hn)
                    ok = same_part(fx_get(h, "value"), out[i].header_value, out[i].header_value_len, p);
            }
            for (int i = 0; i < n; i++)
                wp_dbz_record_free(&out[i]);
        }
        fx_event_free(&ev);
    }
    wp_dbz_tables_free(opt.tables);
    yajl_tree_free(fx);
    free(text);
    if (!ok)
        fail_msg("fixture %s differs from Debezium's format (see above)", name);
}

#define FIXTURE(n)                                                                                                     \
    static void test_##n(void **state)                                                                                 \
    {                                                                                                                  \
        (void)state;                                                                                                   \
        run_fixture(#n);                                                                                               \
    }

FIXTURE(insert_noschema)
FIXTURE(insert_schema)
FIXTURE(update_noschema)
FIXTURE(update_full_identity)
FIXTURE(update_key_change)
FIXTURE(delete_tombstone)
FIXTURE(delete_no_tombstone)
FIXTURE(delete_schema)
FIXTURE(snapshot_read)
FIXTURE(truncate)
FIXTURE(message_noschema)
FIXTURE(message_schema)
FIXTURE(types_noschema)
FIXTURE(types_schema)
FIXTURE(numeric_precise)
FIXTURE(numeric_string)
FIXTURE(numeric_double)
FIXTURE(temporal)
FIXTURE(arrays)
FIXTURE(toast_placeholder)
FIXTURE(toast_stale_memory)
FIXTURE(utf8_topic)
FIXTURE(no_key)
FIXTURE(errors)

/* The record of a zeroed struct and NULL are fine to free (the caller's cleanup path). */
static void test_record_free(void **state)
{
    (void)state;
    wp_dbz_record_t r = {0};
    wp_dbz_record_free(&r);
    wp_dbz_record_free(NULL);
    wp_dbz_tables_free(NULL);
}

/* now_ns = 0 reads the real clock: ts_ms lands within this call's time. */
static void test_real_clock(void **state)
{
    (void)state;
    wp_dbz_options_t opt = {0};
    opt.topic_prefix = "p";
    wp_sink_event_t ev = {0};
    ev.source = "s";
    ev.op = "truncate";
    ev.schema = "public";
    ev.table = "t";
    ev.payload = "{}";
    ev.xid = -1;
    wp_dbz_record_t out[3];
    char err[256];
    struct timespec a, b;
    clock_gettime(CLOCK_REALTIME, &a);
    assert_int_equal(wp_dbz_encode(&opt, &ev, 1, out, err, sizeof err), 1);
    clock_gettime(CLOCK_REALTIME, &b);
    yajl_val v = yajl_tree_parse(out[0].value, NULL, 0);
    assert_non_null(v);
    long long ts = YAJL_GET_INTEGER(fx_get(v, "ts_ms"));
    assert_true(ts >= (long long)a.tv_sec * 1000 + a.tv_nsec / 1000000);
    assert_true(ts <= (long long)b.tv_sec * 1000 + b.tv_nsec / 1000000);
    yajl_tree_free(v);
    wp_dbz_record_free(&out[0]);
}

/*
 * The session caches (parsed column lists, generated schemas) never change a record: 700
 * inserts over 350 distinct column lists (more than the cache's slots, so slots are evicted and
 * collide) and two tables sharing each list (same columns, different schema names), encoded with
 * the caches and without, byte for byte, schemas.enable on.
 */
static void test_cache_matches_uncached(void **state)
{
    (void)state;
    wp_dbz_options_t with = {0}, without = {0};
    with.topic_prefix = without.topic_prefix = "p";
    with.schemas_enable = without.schemas_enable = 1;
    with.now_ns = without.now_ns = 1;
    with.tables = wp_dbz_tables_new();
    for (int i = 0; i < 700; i++) {
        char columns[256], table[32], payload[128];
        int variant = (i * 7) % 350;
        snprintf(columns, sizeof columns,
                 "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23},{\"name\":\"c%d\",\"type\":\"numeric(%d,2)\","
                 "\"typeoid\":1700}]",
                 variant, 10 + variant % 20);
        snprintf(table, sizeof table, "t%d", i % 2);
        snprintf(payload, sizeof payload, "{\"after\":{\"id\":%d,\"c%d\":\"%d.25\"}}", i, variant, i);
        wp_sink_event_t ev = {0};
        ev.source = "s";
        ev.op = "insert";
        ev.schema = "public";
        ev.table = table;
        ev.xid = i;
        ev.lsn = (uint64_t)i;
        ev.payload = payload;
        ev.payload_len = strlen(payload);
        ev.columns = columns;
        ev.key_columns = "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23}]";
        wp_dbz_record_t a[3], b[3];
        char err[256];
        assert_int_equal(wp_dbz_encode(&with, &ev, 1, a, err, sizeof err), 1);
        assert_int_equal(wp_dbz_encode(&without, &ev, 1, b, err, sizeof err), 1);
        assert_string_equal(a[0].key, b[0].key);
        assert_string_equal(a[0].value, b[0].value);
        assert_non_null(strstr(a[0].value, table[1] == '0' ? "\"p.public.t0.Envelope\"" : "\"p.public.t1.Envelope\""));
        wp_dbz_record_free(&a[0]);
        wp_dbz_record_free(&b[0]);
    }
    wp_dbz_tables_free(with.tables);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_insert_noschema),
        cmocka_unit_test(test_insert_schema),
        cmocka_unit_test(test_update_noschema),
        cmocka_unit_test(test_update_full_identity),
        cmocka_unit_test(test_update_key_change),
        cmocka_unit_test(test_delete_tombstone),
        cmocka_unit_test(test_delete_no_tombstone),
        cmocka_unit_test(test_delete_schema),
        cmocka_unit_test(test_snapshot_read),
        cmocka_unit_test(test_truncate),
        cmocka_unit_test(test_message_noschema),
        cmocka_unit_test(test_message_schema),
        cmocka_unit_test(test_types_noschema),
        cmocka_unit_test(test_types_schema),
        cmocka_unit_test(test_numeric_precise),
        cmocka_unit_test(test_numeric_string),
        cmocka_unit_test(test_numeric_double),
        cmocka_unit_test(test_temporal),
        cmocka_unit_test(test_arrays),
        cmocka_unit_test(test_toast_placeholder),
        cmocka_unit_test(test_toast_stale_memory),
        cmocka_unit_test(test_utf8_topic),
        cmocka_unit_test(test_no_key),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_record_free),
        cmocka_unit_test(test_real_clock),
        cmocka_unit_test(test_cache_matches_uncached),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
