/*
 * test_dbz_oracle.c: the encoder (envelope.c) writes the same bytes as the encoder before its
 * speed work (envelope_ref.c, the oracle), record for record: topic, key, value, header name
 * and value compared with memcmp, the record count and the error text too.
 *
 * Two sources of events:
 *  - every fixture's events (the .json files in fixtures/), under every combination of schemas.enable,
 *    table memory, tombstones and decimal.handling.mode, each step twice (the second round is
 *    served by the session caches);
 *  - seeded random events (WP_ORACLE_SEED overrides the seed): tables whose columns are drawn
 *    from the fixtures' columns with values drawn from the fixtures' values of that type (or
 *    random strings with quotes, backslashes, control characters and multibyte UTF-8 for the
 *    text types), names with the characters JSON must escape, random lsn/xid/commit times, all
 *    ops including key changes, TOAST-omitted columns and messages.
 * The two encoders keep their own table memory, fed the same events in the same order.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include "envelope.h"
#include "fixture_json.h"
#include "envelope_ref.h"

static const char *const fixtures[] = {
    "insert_noschema", "insert_schema",  "update_noschema",   "update_full_identity", "update_key_change",
    "delete_tombstone", "delete_no_tombstone", "delete_schema", "snapshot_read",      "truncate",
    "message_noschema", "message_schema", "types_noschema",   "types_schema",         "numeric_precise",
    "numeric_string",  "numeric_double", "temporal",          "arrays",               "toast_placeholder",
    "toast_stale_memory", "utf8_topic",  "no_key",            "errors",               NULL};

static int same_bytes(const char *a, size_t alen, const char *b, size_t blen)
{
    if (!a || !b)
        return a == b && alen == blen;
    return alen == blen && memcmp(a, b, alen) == 0;
}

static size_t compared, encoded; /* events compared; those that gave records */

/* Encodes ev with both encoders; on any difference prints it and returns 0. */
static int same_output(const wp_dbz_options_t *opt, const wp_dbz_options_t *ref_opt, const wp_sink_event_t *ev,
                       int tombstones, const char *label)
{
    wp_dbz_record_t a[3], b[3];
    char ea[256], eb[256];
    int na = wp_dbz_encode(opt, ev, tombstones, a, ea, sizeof ea);
    int nb = wp_dbz_ref_encode(ref_opt, ev, tombstones, b, eb, sizeof eb);
    int ok = 1;

    compared++;
    if (na > 0)
        encoded++;
    if (na != nb) {
        print_error("%s: %d records, the oracle %d (%s | %s)\n", label, na, nb, na < 0 ? ea : "", nb < 0 ? eb : "");
        ok = 0;
    } else if (na < 0 && strcmp(ea, eb) != 0) {
        print_error("%s: error \"%s\", the oracle \"%s\"\n", label, ea, eb);
        ok = 0;
    }
    for (int i = 0; ok && i < na; i++) {
        const char *what = NULL;
        if (!same_bytes(a[i].topic, a[i].topic ? strlen(a[i].topic) : 0, b[i].topic, b[i].topic ? strlen(b[i].topic) : 0))
            what = "topic";
        else if (!same_bytes(a[i].key, a[i].key_len, b[i].key, b[i].key_len))
            what = "key";
        else if (!same_bytes(a[i].value, a[i].value_len, b[i].value, b[i].value_len))
            what = "value";
        else if (!same_bytes(a[i].header_name, a[i].header_name ? strlen(a[i].header_name) : 0, b[i].header_name,
                             b[i].header_name ? strlen(b[i].header_name) : 0))
            what = "header name";
        else if (!same_bytes(a[i].header_value, a[i].header_value_len, b[i].header_value, b[i].header_value_len))
            what = "header value";
        if (what) {
            print_error("%s record %d: %s differs\n  got    key %s\n         value %s\n  oracle key %s\n         value %s\n",
                        label, i, what, a[i].key ? a[i].key : "null", a[i].value ? a[i].value : "null",
                        b[i].key ? b[i].key : "null", b[i].value ? b[i].value : "null");
            ok = 0;
        }
    }
    for (int i = 0; i < 3; i++) {
        if (i < na)
            wp_dbz_record_free(&a[i]);
        if (i < nb)
            wp_dbz_ref_record_free(&b[i]);
    }
    return ok;
}

/* ---------------------------------------------------------------- fixtures */

static int run_fixture_variant(yajl_val fx, const char *name, int schemas, int memory, int tombstones,
                               wp_dbz_decimal_t mode)
{
    yajl_val o = fx_get(fx, "options");
    wp_dbz_options_t opt = {0}, ref = {0};
    char label[256];
    int ok = 1;

    opt.topic_prefix = fx_str_or_null(fx_get(o, "topic_prefix"));
    opt.database = fx_str_or_null(fx_get(o, "database"));
    opt.schemas_enable = schemas;
    opt.decimal_mode = mode;
    opt.unavailable_placeholder = fx_str_or_null(fx_get(o, "unavailable_placeholder"));
    opt.now_ns = fx_get(o, "now_ns") ? YAJL_GET_INTEGER(fx_get(o, "now_ns")) : 1;
    ref = opt;
    if (memory) {
        opt.tables = wp_dbz_tables_new();
        ref.tables = wp_dbz_ref_tables_new();
    }
    yajl_val steps = fx_get(fx, "steps");
    size_t nsteps = steps ? steps->u.array.len : 1;
    for (size_t s = 0; s < nsteps * 2 && ok; s++) {
        yajl_val e = fx_get(steps ? steps->u.array.values[s % nsteps] : fx, "event");
        wp_sink_event_t ev;
        fx_event(e, s + 1, &ev);
        snprintf(label, sizeof label, "%s step %zu (schemas %d, memory %d, tombstones %d, decimal %d)", name, s,
                 schemas, memory, tombstones, (int)mode);
        ok = same_output(&opt, &ref, &ev, tombstones, label);
        fx_event_free(&ev);
    }
    wp_dbz_tables_free(opt.tables);
    wp_dbz_ref_tables_free(ref.tables);
    return ok;
}

static void test_fixtures_byte_for_byte(void **state)
{
    (void)state;
    int ok = 1;
    compared = 0;
    for (const char *const *f = fixtures; *f && ok; f++) {
        char path[1024], perr[256];
        snprintf(path, sizeof path, "%s/%s.json", WP_DBZ_FIXTURES, *f);
        char *text = fx_read_file(path);
        assert_non_null(text);
        yajl_val fx = yajl_tree_parse(text, perr, sizeof perr);
        if (!fx)
            fail_msg("%s: %s", path, perr);
        for (int v = 0; v < 24 && ok; v++)
            ok = run_fixture_variant(fx, *f, v & 1, (v >> 1) & 1, (v >> 2) & 1, (wp_dbz_decimal_t)(v / 8));
        yajl_tree_free(fx);
        free(text);
    }
    if (!ok)
        fail_msg("the encoder's bytes differ from the oracle's (see above)");
    print_message("%zu events compared\n", compared);
    assert_true(compared > 1000);
}

/* ---------------------------------------------------------------- random events */

static uint64_t rng_state;

static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static size_t pick(size_t n)
{
    return (size_t)(rnd() % n);
}

/* A random string with what JSON escapes and multibyte UTF-8 (valid UTF-8, as staging holds). */
static void random_text(char *out, size_t cap)
{
    static const char *const parts[] = {"a", "Z", "0", " ", "\"", "\\", "/", "\n", "\t", "\r", "\b", "\f",
                                        "\x01", "\x1f", "\x7f", "\xc3\xa9", "\xe4\xb8\xad", "\xf0\x9f\x98\x80",
                                        "'", "{", "}", ",", ":", "<", "NULL", "\xe2\x80\xa8"};
    size_t o = 0, n = pick(12);
    for (size_t i = 0; i < n; i++) {
        const char *p = parts[pick(sizeof parts / sizeof *parts)];
        size_t l = strlen(p);
        if (o + l + 1 >= cap)
            break;
        memcpy(out + o, p, l);
        o += l;
    }
    out[o] = '\0';
}

/* The fixtures' columns: (name, type) and the values seen for that type (any column of it). */
typedef struct pool_col {
    const char *name;
    const char *type;
} pool_col_t;

#define POOL_MAX 512
static pool_col_t pool[POOL_MAX];
static size_t npool;
static yajl_val pool_vals[POOL_MAX][16];
static size_t npool_vals[POOL_MAX];

static size_t pool_type(const char *type)
{
    for (size_t i = 0; i < npool; i++)
        if (strcmp(pool[i].type, type) == 0)
            return i;
    return npool;
}

static void pool_add(yajl_val event)
{
    yajl_val cols = fx_get(event, "columns"), payload = fx_get(event, "payload");
    if (!cols || !YAJL_IS_ARRAY(cols))
        return;
    for (size_t i = 0; i < cols->u.array.len; i++) {
        const char *n = fx_str_or_null(fx_get(cols->u.array.values[i], "name"));
        const char *t = fx_str_or_null(fx_get(cols->u.array.values[i], "type"));
        if (!n || !t)
            continue;
        size_t k = pool_type(t);
        if (k == npool) {
            if (npool == POOL_MAX)
                continue;
            pool[npool].name = n;
            pool[npool++].type = t;
        }
        const char *images[] = {"after", "before", "key"};
        for (int im = 0; im < 3; im++) {
            yajl_val v = fx_get(fx_get(payload, images[im]), n);
            if (v && npool_vals[k] < 16)
                pool_vals[k][npool_vals[k]++] = v;
        }
    }
}

static int is_text_type(const char *t)
{
    return strcmp(t, "text") == 0 || strncmp(t, "character", 9) == 0;
}

typedef struct rtable {
    char schema[64], table[64];
    size_t cols[6]; /* pool indexes; cols[0] is the key column when keyed */
    char names[6][32];
    size_t n;
    int keyed;
    char *columns, *key_columns;
} rtable_t;

static void gen_value(yajl_gen g, const rtable_t *t, size_t c)
{
    size_t k = t->cols[c];
    if (pick(8) == 0) {
        yajl_gen_null(g);
    } else if (is_text_type(pool[k].type) || npool_vals[k] == 0) {
        char s[128];
        random_text(s, sizeof s);
        yajl_gen_string(g, (const unsigned char *)s, strlen(s));
    } else {
        fx_dump(g, pool_vals[k][pick(npool_vals[k])]);
    }
}

static void gen_image(yajl_gen g, const rtable_t *t, int key_only, int omit_toast, int keyval)
{
    yajl_gen_map_open(g);
    for (size_t c = 0; c < (key_only ? 1 : t->n); c++) {
        if (omit_toast && c > 0 && pick(3) == 0)
            continue; /* an unchanged TOAST column the encoder must fill in */
        yajl_gen_string(g, (const unsigned char *)t->names[c], strlen(t->names[c]));
        if (c == 0 && t->keyed)
            yajl_gen_integer(g, keyval);
        else
            gen_value(g, t, c);
    }
    yajl_gen_map_close(g);
}

static void make_tables(rtable_t *tabs, size_t ntabs, yajl_gen g)
{
    static const char *const schemas[] = {"public", "inventory", "Sch\"ema", "tab\\le", "ctl\x01\x1f", "\xc3\xbc",
                                          "emoji\xf0\x9f\x98\x80", "a/b.c-d_e"};
    static const char *const odd_names[] = {"na\"me", "c\\d", "\xc3\xbc", "sp ace", "ctl\x02"};
    size_t key_type = pool_type("integer");
    for (size_t i = 0; i < ntabs; i++) {
        rtable_t *t = &tabs[i];
        snprintf(t->schema, sizeof t->schema, "%s", schemas[pick(sizeof schemas / sizeof *schemas)]);
        snprintf(t->table, sizeof t->table, "t%zu%s", i, pick(3) == 0 ? "\"x\\y\xc3\xa9" : "");
        t->keyed = pick(5) != 0;
        t->n = 2 + pick(5);
        for (size_t c = 0; c < t->n; c++) {
            t->cols[c] = c == 0 && t->keyed ? key_type : pick(npool);
            if (c > 0 && pick(6) == 0)
                snprintf(t->names[c], sizeof t->names[c], "%s%zu", odd_names[pick(5)], c);
            else
                snprintf(t->names[c], sizeof t->names[c], c == 0 ? "id" : "c%zu", c);
        }
        yajl_gen_array_open(g);
        for (size_t c = 0; c < t->n; c++) {
            yajl_gen_map_open(g);
            yajl_gen_string(g, (const unsigned char *)"name", 4);
            yajl_gen_string(g, (const unsigned char *)t->names[c], strlen(t->names[c]));
            yajl_gen_string(g, (const unsigned char *)"type", 4);
            yajl_gen_string(g, (const unsigned char *)pool[t->cols[c]].type, strlen(pool[t->cols[c]].type));
            yajl_gen_map_close(g);
        }
        yajl_gen_array_close(g);
        t->columns = fx_gen_text(g);
        t->key_columns = NULL;
        if (t->keyed) {
            yajl_gen_array_open(g);
            yajl_gen_map_open(g);
            yajl_gen_string(g, (const unsigned char *)"name", 4);
            yajl_gen_string(g, (const unsigned char *)"id", 2);
            yajl_gen_string(g, (const unsigned char *)"type", 4);
            yajl_gen_string(g, (const unsigned char *)"integer", 7);
            yajl_gen_map_close(g);
            yajl_gen_array_close(g);
            t->key_columns = fx_gen_text(g);
        }
    }
}

static void test_random_byte_for_byte(void **state)
{
    (void)state;
    static const char *const prefixes[] = {"dbserver1", "p\"x\\", "\xc3\xbc-pre.fix", "a"};
    static const char *const dbs[] = {NULL, "", "postgres", "d\"b\\\n\x01"};
    static const char *const ops[] = {"insert", "update", "update", "delete", "snapshot", "truncate", "message",
                                      "update"};
    const char *seed_env = getenv("WP_ORACLE_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : 20261130;
    char *texts[24];
    yajl_val trees[24];
    size_t ntexts = 0;
    int ok = 1;

    rng_state = seed ? seed : 1;
    npool = 0;
    memset(npool_vals, 0, sizeof npool_vals);
    for (const char *const *f = fixtures; *f; f++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s.json", WP_DBZ_FIXTURES, *f);
        texts[ntexts] = fx_read_file(path);
        assert_non_null(texts[ntexts]);
        trees[ntexts] = yajl_tree_parse(texts[ntexts], NULL, 0);
        assert_non_null(trees[ntexts]);
        yajl_val fx = trees[ntexts++], steps = fx_get(fx, "steps");
        if (strcmp(*f, "errors") == 0)
            continue; /* its columns are broken on purpose */
        if (steps)
            for (size_t s = 0; s < steps->u.array.len; s++)
                pool_add(fx_get(steps->u.array.values[s], "event"));
        else
            pool_add(fx_get(fx, "event"));
    }
    assert_true(npool > 40);
    assert_true(pool_type("integer") < npool);

    yajl_gen g = yajl_gen_alloc(NULL);
    rtable_t tabs[8];
    make_tables(tabs, 8, g);
    compared = encoded = 0;
    for (int session = 0; session < 12 && ok; session++) {
        wp_dbz_options_t opt = {0}, ref = {0};
        opt.topic_prefix = prefixes[pick(4)];
        opt.database = dbs[pick(4)];
        opt.schemas_enable = (int)pick(2);
        opt.decimal_mode = (wp_dbz_decimal_t)pick(3);
        opt.unavailable_placeholder = pick(2) ? NULL : "__x\"y";
        ref = opt;
        if (session % 4 != 3) {
            opt.tables = wp_dbz_tables_new();
            ref.tables = wp_dbz_ref_tables_new();
        }
        int tombstones = (int)pick(2);
        for (int i = 0; i < 600 && ok; i++) {
            rtable_t *t = &tabs[pick(8)];
            const char *op = ops[pick(8)];
            wp_sink_event_t ev = {0};
            char label[128];
            int keyval = (int)pick(20);
            ev.ticket = (uint64_t)i + 1;
            ev.source = pick(2) ? "src1" : "s\"2";
            static const uint64_t edge_lsns[] = {0, 9, 10, 99, 100, 101, 999, 1000, UINT64_C(9223372036854775807),
                                                 UINT64_C(9223372036854775808), UINT64_MAX};
            ev.lsn = pick(8) == 0 ? edge_lsns[pick(sizeof edge_lsns / sizeof *edge_lsns)]
                     : pick(4) == 0 ? rnd() : rnd() % 100000000;
            ev.seq = (int32_t)pick(1000);
            ev.op = op;
            ev.schema = t->schema;
            ev.table = t->table;
            ev.xid = pick(5) == 0 ? -1 : (int64_t)(rnd() % 4000000000u);
            ev.commit_us = pick(6) == 0 ? 0 : pick(6) == 0 ? -(int64_t)(rnd() % 100000000000000ull)
                                                            : 1700000000000000ll + (int64_t)(rnd() % 100000000000ull);
            opt.now_ns = ref.now_ns = 1766925059600123456ll + (int64_t)(rnd() % 1000000000000ull) - 500000000000ll;
            ev.columns = t->columns;
            ev.key_columns = t->key_columns;
            yajl_gen_map_open(g);
            if (!strcmp(op, "message")) {
                char s[128];
                random_text(s, sizeof s);
                yajl_gen_string(g, (const unsigned char *)"prefix", 6);
                yajl_gen_string(g, (const unsigned char *)s, strlen(s));
                random_text(s, sizeof s);
                yajl_gen_string(g, (const unsigned char *)"content", 7);
                yajl_gen_string(g, (const unsigned char *)s, strlen(s));
            } else if (!strcmp(op, "insert") || !strcmp(op, "snapshot")) {
                yajl_gen_string(g, (const unsigned char *)"after", 5);
                gen_image(g, t, 0, 0, keyval);
            } else if (!strcmp(op, "update")) {
                yajl_gen_string(g, (const unsigned char *)"after", 5);
                gen_image(g, t, 0, 1, keyval);
                if (pick(3) == 0) {
                    yajl_gen_string(g, (const unsigned char *)"before", 6);
                    gen_image(g, t, 0, 0, pick(3) ? keyval : keyval + 1);
                } else if (t->keyed && pick(2)) {
                    yajl_gen_string(g, (const unsigned char *)"key", 3);
                    gen_image(g, t, 1, 0, pick(3) ? keyval : keyval + 1);
                }
            } else if (!strcmp(op, "delete")) {
                yajl_gen_string(g, (const unsigned char *)(pick(2) && t->keyed ? "key" : "before"),
                                pick(2) && t->keyed ? 3 : 6);
                gen_image(g, t, 0, 0, keyval);
            }
            yajl_gen_map_close(g);
            char *payload = fx_gen_text(g);
            ev.payload = payload;
            ev.payload_len = strlen(payload);
            snprintf(label, sizeof label, "seed %llu session %d event %d (%s)", (unsigned long long)seed, session, i,
                     op);
            ok = same_output(&opt, &ref, &ev, tombstones, label);
            if (!ok)
                print_error("  payload %s\n  columns %s\n", payload, t->columns);
            free(payload);
        }
        wp_dbz_tables_free(opt.tables);
        wp_dbz_ref_tables_free(ref.tables);
    }
    for (size_t i = 0; i < 8; i++) {
        free(tabs[i].columns);
        free(tabs[i].key_columns);
    }
    yajl_gen_free(g);
    for (size_t i = 0; i < ntexts; i++) {
        yajl_tree_free(trees[i]);
        free(texts[i]);
    }
    if (!ok)
        fail_msg("the encoder's bytes differ from the oracle's (see above)");
    print_message("%zu random events compared, %zu encoded (seed %llu)\n", compared, encoded, (unsigned long long)seed);
    assert_true(encoded > compared / 2); /* most events are valid: the comparison covers records, not refusals */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixtures_byte_for_byte),
        cmocka_unit_test(test_random_byte_for_byte),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
