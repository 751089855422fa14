/*
 * test_decoder.c: wal2json v2 decoding, payload and shape encoding.
 *
 * Inputs come from tests/data/wal2json (real captured messages, see its
 * README) plus synthetic messages for edge cases.  Every message is copied
 * into a heap buffer of exactly its length (no NUL terminator) before it is
 * parsed and freed right after, so ASan catches over-reads and any pointer
 * that borrows from the input instead of from the decoder.  Every payload and
 * shape is re-parsed with jansson to prove it is valid JSON.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <jansson.h>

#include "decoder.h"
#include "mem.h"

#define DATA_DIR WP_TEST_DATA "/wal2json/"

/* ---------------------------------------------------------------- helpers */

static char *read_file(const char *name, size_t *len)
{
    char path[1024];
    snprintf(path, sizeof path, "%s%s", DATA_DIR, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        fail_msg("cannot open %s", path);
    wp_buf_t b = WP_BUF_INIT;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        wp_buf_append(&b, chunk, n);
    fclose(f);
    if (b.data == NULL)
        wp_buf_reserve(&b, 0);
    if (len)
        *len = b.len;
    return b.data;
}

/* A fixture file without its trailing newline. */
static char *read_text(const char *name)
{
    size_t len;
    char *s = read_file(name, &len);
    while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r'))
        s[--len] = '\0';
    return s;
}

typedef struct lines {
    char *buf;
    char **line;
    size_t n;
} lines_t;

static lines_t read_lines(const char *name)
{
    lines_t l = {read_file(name, NULL), NULL, 0};
    size_t cap = 0;
    for (char *p = l.buf; *p;) {
        char *nl = strchr(p, '\n');
        if (nl)
            *nl = '\0';
        if (*p) {
            if (l.n == cap) {
                cap = cap ? cap * 2 : 16;
                l.line = wp_realloc(l.line, cap * sizeof *l.line);
            }
            l.line[l.n++] = p;
        }
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    return l;
}

static void lines_free(lines_t *l)
{
    free(l->line);
    free(l->buf);
}

/* Parses msg[0..len) from an exact-size heap copy; returns wp_decoder_parse's result. */
static int parse_n(wp_decoder_t *d, const char *msg, size_t len, wp_change_t *c, char *err, size_t errlen)
{
    char *copy = wp_malloc(len);
    if (len)
        memcpy(copy, msg, len);
    int rc = wp_decoder_parse(d, copy, len, c, err, errlen);
    memset(copy, 'Z', len); /* anything still pointing into the input now sees garbage */
    free(copy);
    return rc;
}

static void parse_ok(wp_decoder_t *d, const char *msg, wp_change_t *c)
{
    char err[WP_ERRLEN];
    if (parse_n(d, msg, strlen(msg), c, err, sizeof err) != 0)
        fail_msg("parse failed: %s\nmessage: %s", err, msg);
}

static void assert_valid_json(const char *s)
{
    json_error_t jerr;
    json_t *j = json_loads(s, JSON_REJECT_DUPLICATES, &jerr);
    if (j == NULL)
        fail_msg("not valid JSON (%s at %d): %s", jerr.text, jerr.position, s);
    json_decref(j);
}

/* The payload of the last parse, checked to be valid JSON; caller frees. */
static char *payload(wp_decoder_t *d, const wp_change_t *c)
{
    wp_buf_t b = WP_BUF_INIT;
    wp_decoder_payload(d, c, &b);
    assert_non_null(b.data);
    assert_int_equal(strlen(b.data), b.len);
    assert_valid_json(b.data);
    return b.data;
}

static void check_payload(wp_decoder_t *d, const wp_change_t *c, const char *expected)
{
    char *p = payload(d, c);
    assert_string_equal(p, expected);
    free(p);
}

/* Parses msg and checks its payload in one go. */
static void check_msg(wp_decoder_t *d, const char *msg, wp_op_t op, const char *expected)
{
    wp_change_t c;
    parse_ok(d, msg, &c);
    assert_int_equal(c.op, op);
    check_payload(d, &c, expected);
}

static int64_t shape(wp_decoder_t *d, const wp_change_t *c, char **json)
{
    wp_buf_t b = WP_BUF_INIT;
    int64_t id = wp_decoder_shape(d, c, &b);
    if (id != 0) {
        assert_true(id > 0);
        assert_valid_json(b.data);
    } else {
        assert_int_equal(b.len, 0);
    }
    if (json)
        *json = b.data;
    else
        wp_buf_free(&b);
    return id;
}

/* True when s is valid UTF-8 (jansson checks it when building a string). */
static bool is_utf8(const char *s)
{
    json_t *j = json_string(s);
    bool ok = j != NULL;
    json_decref(j);
    return ok;
}

/*
 * Parses msg[0..len) with a fresh decoder and expects a rejection whose reason
 * contains want.  Also checks that the decoder holds nothing afterwards and
 * still decodes a good message.
 */
static void check_bad_n(const char *msg, size_t len, const char *want)
{
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char err[WP_ERRLEN];

    parse_ok(d, "{\"action\":\"T\",\"schema\":\"s\",\"table\":\"t\"}", &c);
    memset(err, 'x', sizeof err);
    int rc = parse_n(d, msg, len, &c, err, sizeof err);
    if (rc != -1)
        fail_msg("accepted bad message: %.*s", (int)len, msg);
    assert_non_null(memchr(err, '\0', sizeof err));
    if (strstr(err, want) == NULL)
        fail_msg("reason \"%s\" lacks \"%s\" (message: %.*s)", err, want, (int)len, msg);
    assert_true(strlen(err) > 0);
    assert_true(is_utf8(err));
    for (const char *p = err; *p; p++)
        assert_true((unsigned char)*p >= 0x20);
    assert_int_equal(c.op, 0);
    assert_null(c.table);
    assert_null(c.timestamp);

    /* Nothing is held after a failure. */
    wp_buf_t b = WP_BUF_INIT;
    assert_int_equal(wp_decoder_shape(d, &c, &b), 0);
    wp_decoder_payload(d, &c, &b);
    assert_string_equal(b.data, "{}");
    wp_buf_free(&b);

    /* Without an error buffer it still fails cleanly. */
    assert_int_equal(parse_n(d, msg, len, &c, NULL, 0), -1);

    check_msg(d, "{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"integer\",\"value\":1}]}",
              WP_OP_INSERT, "{\"after\":{\"a\":1}}");
    wp_decoder_destroy(d);
}

static void check_bad(const char *msg, const char *want)
{
    check_bad_n(msg, strlen(msg), want);
}

/* An INSERT into public.t with one column; type, oid (NULL: absent) and value as JSON text. */
static char *one_col_insert(const char *type, const char *typeoid, const char *value)
{
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_printf(&b, "{\"action\":\"I\",\"schema\":\"public\",\"table\":\"t\",\"columns\":[{\"name\":\"c\",\"type\":\"%s\"",
                  type);
    if (typeoid)
        wp_buf_printf(&b, ",\"typeoid\":%s", typeoid);
    wp_buf_puts(&b, ",\"value\":");
    wp_buf_puts(&b, value);
    wp_buf_puts(&b, "}]}");
    return b.data;
}

/* Checks that one column of the given type and value encodes as {"after":{"c":expected}}. */
static void check_value(const char *type, const char *typeoid, const char *value, const char *expected)
{
    wp_decoder_t *d = wp_decoder_create();
    char *msg = one_col_insert(type, typeoid, value);
    char want[8192];
    snprintf(want, sizeof want, "{\"after\":{\"c\":%s}}", expected);
    wp_change_t c;
    parse_ok(d, msg, &c);
    char *p = payload(d, &c);
    if (strcmp(p, want) != 0)
        fail_msg("type %s oid %s value %s: got %s, want %s", type, typeoid ? typeoid : "-", value, p, want);
    free(p);
    free(msg);
    wp_decoder_destroy(d);
}

/* ---------------------------------------------------------------- tests */

static void test_op_names(void **state)
{
    (void)state;
    assert_string_equal(wp_op_name(WP_OP_INSERT), "insert");
    assert_string_equal(wp_op_name(WP_OP_UPDATE), "update");
    assert_string_equal(wp_op_name(WP_OP_DELETE), "delete");
    assert_string_equal(wp_op_name(WP_OP_TRUNCATE), "truncate");
    assert_string_equal(wp_op_name(WP_OP_MESSAGE), "message");
    assert_string_equal(wp_op_name(WP_OP_BEGIN), "begin");
    assert_string_equal(wp_op_name(WP_OP_COMMIT), "commit");
}

static void test_create_destroy(void **state)
{
    (void)state;
    wp_decoder_destroy(NULL);
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    memset(&c, 0, sizeof c);
    wp_buf_t b = WP_BUF_INIT;
    /* Nothing parsed yet. */
    assert_int_equal(wp_decoder_shape(d, &c, &b), 0);
    wp_decoder_payload(d, &c, &b);
    assert_string_equal(b.data, "{}");
    wp_buf_free(&b);
    wp_decoder_destroy(d);
}

/* Appendix A.4: every action, line by line, with exact payloads. */
static void test_a4_session(void **state)
{
    (void)state;
    static const struct {
        wp_op_t op;
        const char *payload; /* NULL: B/C */
    } want[] = {
        {WP_OP_BEGIN, NULL},
        {WP_OP_INSERT, "{\"after\":{\"id\":1,\"name\":\"one\",\"price\":\"10.50\",\"flag\":true,\"note\":\"x\"}}"},
        {WP_OP_INSERT, "{\"after\":{\"id\":2,\"name\":\"two\",\"price\":null,\"flag\":null,\"note\":null}}"},
        {WP_OP_COMMIT, NULL},
        {WP_OP_BEGIN, NULL},
        /* UPDATE, key unchanged */
        {WP_OP_UPDATE,
         "{\"after\":{\"id\":1,\"name\":\"ONE\",\"price\":\"10.50\",\"flag\":true,\"note\":\"x\"},\"key\":{\"id\":1}}"},
        {WP_OP_COMMIT, NULL},
        {WP_OP_BEGIN, NULL},
        /* UPDATE that changes the key: the key is the old one */
        {WP_OP_UPDATE,
         "{\"after\":{\"id\":3,\"name\":\"two\",\"price\":null,\"flag\":null,\"note\":null},\"key\":{\"id\":2}}"},
        {WP_OP_COMMIT, NULL},
        {WP_OP_BEGIN, NULL},
        {WP_OP_DELETE, "{\"key\":{\"id\":3}}"},
        {WP_OP_COMMIT, NULL},
        /* REPLICA IDENTITY FULL: whole old row */
        {WP_OP_UPDATE, "{\"after\":{\"id\":1,\"name\":\"full-row\",\"qty\":6},"
                       "\"before\":{\"id\":1,\"name\":\"full-row\",\"qty\":5}}"},
        /* FULL delete: the row width is known from the FULL update above */
        {WP_OP_DELETE, "{\"before\":{\"id\":1,\"name\":null,\"qty\":6}}"},
        {WP_OP_BEGIN, NULL},
        {WP_OP_COMMIT, NULL},
        /* USING INDEX: the old index value */
        {WP_OP_UPDATE, "{\"after\":{\"id\":1,\"code\":\"C2\",\"val\":\"v2\"},\"key\":{\"code\":\"C1\"}}"},
        {WP_OP_BEGIN, NULL},
        {WP_OP_TRUNCATE, "{}"},
        {WP_OP_TRUNCATE, "{}"},
        {WP_OP_COMMIT, NULL},
        {WP_OP_MESSAGE, "{\"prefix\":\"myapp\",\"content\":\"non-transactional msg\",\"transactional\":false}"},
        {WP_OP_BEGIN, NULL},
        {WP_OP_INSERT, "{\"after\":{\"id\":20,\"name\":\"with msg\",\"price\":\"1.00\",\"flag\":true,\"note\":\"m\"}}"},
        {WP_OP_MESSAGE, "{\"prefix\":\"myapp\",\"content\":\"transactional msg\",\"transactional\":true}"},
        {WP_OP_COMMIT, NULL},
        {WP_OP_MESSAGE, "{\"prefix\":\"myapp\",\"content\":\"non-tx msg, rolled back txn\",\"transactional\":false}"},
        {WP_OP_BEGIN, NULL},
        /* unchanged TOAST column "big" left out: absent from "after" */
        {WP_OP_UPDATE, "{\"after\":{\"id\":1,\"small\":\"s2\"},\"key\":{\"id\":1}}"},
        {WP_OP_COMMIT, NULL},
        /* FULL + TOAST: "after" lacks big, "before" has it */
        {WP_OP_UPDATE, "{\"after\":{\"id\":1,\"small\":\"s2\"},\"before\":{\"id\":1,\"small\":\"s1\",\"big\":\"<3000 x B>\"}}"},
    };
    lines_t l = read_lines("a4_v2_session.jsonl");
    assert_int_equal(l.n, sizeof want / sizeof want[0]);
    wp_decoder_t *d = wp_decoder_create();
    for (size_t i = 0; i < l.n; i++) {
        wp_change_t c;
        parse_ok(d, l.line[i], &c);
        if (c.op != want[i].op)
            fail_msg("line %zu: op %s, want %s", i + 1, wp_op_name(c.op), wp_op_name(want[i].op));
        if (want[i].payload) {
            char *p = payload(d, &c);
            if (strcmp(p, want[i].payload) != 0)
                fail_msg("line %zu: payload\n %s\nwant\n %s", i + 1, p, want[i].payload);
            free(p);
            if (c.op != WP_OP_MESSAGE) {
                assert_string_equal(c.schema, "public");
                assert_non_null(c.table);
            }
        } else {
            assert_null(c.schema);
            assert_null(c.table);
            assert_true(c.nextlsn > c.lsn);
            assert_int_equal(shape(d, &c, NULL), 0);
        }
    }
    wp_decoder_destroy(d);
    lines_free(&l);
}

/* Field values of individual A.4 messages. */
static void test_a4_fields(void **state)
{
    (void)state;
    lines_t l = read_lines("a4_v2_session.jsonl");
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;

    parse_ok(d, l.line[0], &c); /* B 850 */
    assert_int_equal(c.op, WP_OP_BEGIN);
    assert_true(c.has_xid);
    assert_int_equal(c.xid, 850);
    assert_string_equal(c.timestamp, "2026-11-26 16:32:11.740428+00");
    assert_int_equal(c.lsn, 0x52BA8570);
    assert_int_equal(c.nextlsn, 0x52BA85A0);

    parse_ok(d, l.line[1], &c); /* I t_pk */
    assert_int_equal(c.op, WP_OP_INSERT);
    assert_int_equal(c.xid, 850);
    assert_int_equal(c.lsn, 0x52BA8400);
    assert_int_equal(c.nextlsn, 0);
    assert_string_equal(c.schema, "public");
    assert_string_equal(c.table, "t_pk");
    assert_int_equal(c.ncolumns, 5);
    assert_int_equal(c.nidentity, 0);

    parse_ok(d, l.line[5], &c); /* U t_pk */
    assert_int_equal(c.ncolumns, 5);
    assert_int_equal(c.nidentity, 1);

    parse_ok(d, l.line[11], &c); /* D t_pk */
    assert_int_equal(c.op, WP_OP_DELETE);
    assert_int_equal(c.ncolumns, 0);
    assert_int_equal(c.nidentity, 1);
    assert_int_equal(c.lsn, 0x52BA86F0);

    parse_ok(d, l.line[19], &c); /* T t_nopk */
    assert_int_equal(c.op, WP_OP_TRUNCATE);
    assert_string_equal(c.table, "t_nopk");
    assert_int_equal(c.lsn, 0x52BAA818);
    assert_int_equal(shape(d, &c, NULL), 0);

    parse_ok(d, l.line[22], &c); /* non-transactional M */
    assert_int_equal(c.op, WP_OP_MESSAGE);
    assert_false(c.has_xid);
    assert_null(c.timestamp);
    assert_false(c.transactional);
    assert_int_equal(c.lsn, 0x52BAABB8);
    assert_string_equal(c.prefix, "myapp");
    assert_string_equal(c.content, "non-transactional msg");
    assert_int_equal(c.content_len, strlen("non-transactional msg"));
    assert_null(c.table);
    assert_int_equal(shape(d, &c, NULL), 0);

    parse_ok(d, l.line[25], &c); /* transactional M */
    assert_true(c.has_xid);
    assert_int_equal(c.xid, 868);
    assert_true(c.transactional);
    assert_string_equal(c.timestamp, "2026-11-26 16:32:11.746387+00");
    assert_string_equal(c.content, "transactional msg");

    wp_decoder_destroy(d);
    lines_free(&l);
}

/* DELETE on a FULL table: "before" only once the table's row width is known. */
static void test_delete_full_heuristic(void **state)
{
    (void)state;
    lines_t l = read_lines("a4_v2_session.jsonl");
    const char *del_full = l.line[14];
    const char *ins_full = "{\"action\":\"I\",\"schema\":\"public\",\"table\":\"t_full\",\"columns\":["
                           "{\"name\":\"id\",\"type\":\"integer\",\"value\":1},"
                           "{\"name\":\"name\",\"type\":\"text\",\"value\":\"full-row\"},"
                           "{\"name\":\"qty\",\"type\":\"integer\",\"value\":5}]}";
    wp_decoder_t *d = wp_decoder_create();

    /* Nothing known about t_full yet: reported as key. */
    check_msg(d, del_full, WP_OP_DELETE, "{\"key\":{\"id\":1,\"name\":null,\"qty\":6}}");
    /* An insert teaches the row width. */
    check_msg(d, ins_full, WP_OP_INSERT, "{\"after\":{\"id\":1,\"name\":\"full-row\",\"qty\":5}}");
    check_msg(d, del_full, WP_OP_DELETE, "{\"before\":{\"id\":1,\"name\":null,\"qty\":6}}");
    /* Another schema's t_full is another table. */
    check_msg(d,
              "{\"action\":\"D\",\"schema\":\"other\",\"table\":\"t_full\",\"identity\":["
              "{\"name\":\"id\",\"type\":\"integer\",\"value\":1},{\"name\":\"name\",\"type\":\"text\",\"value\":null},"
              "{\"name\":\"qty\",\"type\":\"integer\",\"value\":6}]}",
              WP_OP_DELETE, "{\"key\":{\"id\":1,\"name\":null,\"qty\":6}}");
    /* A key delete on t_pk after its inserts stays a key. */
    parse_ok(d, l.line[1], &(wp_change_t){0});
    check_msg(d, l.line[11], WP_OP_DELETE, "{\"key\":{\"id\":3}}");
    /* After DDL adds a column, the next insert updates the width. */
    check_msg(d,
              "{\"action\":\"I\",\"schema\":\"public\",\"table\":\"t_full\",\"columns\":["
              "{\"name\":\"id\",\"type\":\"integer\",\"value\":2},{\"name\":\"name\",\"type\":\"text\",\"value\":\"x\"},"
              "{\"name\":\"qty\",\"type\":\"integer\",\"value\":5},{\"name\":\"extra\",\"type\":\"text\",\"value\":null}]}",
              WP_OP_INSERT, "{\"after\":{\"id\":2,\"name\":\"x\",\"qty\":5,\"extra\":null}}");
    check_msg(d, del_full, WP_OP_DELETE, "{\"key\":{\"id\":1,\"name\":null,\"qty\":6}}");

    wp_decoder_destroy(d);
    lines_free(&l);
}

/* UPDATE heuristics beyond A.4. */
static void test_update_identity(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    /* No identity at all: only "after". */
    check_msg(d,
              "{\"action\":\"U\",\"schema\":\"public\",\"table\":\"t\",\"columns\":"
              "[{\"name\":\"id\",\"type\":\"integer\",\"value\":1}]}",
              WP_OP_UPDATE, "{\"after\":{\"id\":1}}");
    /* As many identity entries as columns, but other names: a key. */
    check_msg(d,
              "{\"action\":\"U\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"integer\",\"value\":1}],"
              "\"identity\":[{\"name\":\"b\",\"type\":\"integer\",\"value\":2}]}",
              WP_OP_UPDATE, "{\"after\":{\"a\":1},\"key\":{\"b\":2}}");
    /* Same names in another order: still the whole row. */
    check_msg(d,
              "{\"action\":\"U\",\"table\":\"t2\",\"columns\":[{\"name\":\"a\",\"type\":\"integer\",\"value\":1},"
              "{\"name\":\"b\",\"type\":\"integer\",\"value\":2}],"
              "\"identity\":[{\"name\":\"b\",\"type\":\"integer\",\"value\":3},{\"name\":\"a\",\"type\":\"integer\",\"value\":4}]}",
              WP_OP_UPDATE, "{\"after\":{\"a\":1,\"b\":2},\"before\":{\"b\":3,\"a\":4}}");
    /* Empty identity array on an update: an empty key. */
    check_msg(d,
              "{\"action\":\"U\",\"table\":\"t3\",\"columns\":[{\"name\":\"a\",\"type\":\"integer\",\"value\":1}],"
              "\"identity\":[]}",
              WP_OP_UPDATE, "{\"after\":{\"a\":1},\"key\":{}}");
    wp_decoder_destroy(d);
}

static void check_fixture_payload(const char *input, const char *expected_file)
{
    char *msg = read_text(input);
    char *want = read_text(expected_file);
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    parse_ok(d, msg, &c);
    assert_int_equal(c.op, WP_OP_INSERT);
    assert_string_equal(c.table, "t_types");
    assert_int_equal(c.ncolumns, 31);
    assert_false(c.has_xid);
    assert_int_equal(c.lsn, 0);
    char *p = payload(d, &c);
    if (strcmp(p, want) != 0)
        fail_msg("payload\n %s\nwant\n %s", p, want);

    /* Spot checks on the parsed payload, independent of the text comparison. */
    json_t *root = json_loads(p, 0, NULL);
    json_t *after = json_object_get(root, "after");
    assert_string_equal(json_string_value(json_object_get(after, "n")), "12345678901234567890.123456789");
    assert_string_equal(json_string_value(json_object_get(after, "i8")), "9223372036854775807");
    assert_string_equal(json_string_value(json_object_get(after, "by")), "\\x00ff41");
    assert_string_equal(json_string_value(json_object_get(after, "j")), "{\"k\": [1, 2], \"s\": \"x\"}");
    assert_string_equal(json_string_value(json_object_get(after, "vc")), "h\xc3\xa9llo");
    assert_string_equal(json_string_value(json_object_get(after, "Mixed Case Col")), "mixed");
    assert_string_equal(json_string_value(json_object_get(after, "tarr")), "{\"a b\",\"c\\\"d\",NULL}");
    assert_true(json_is_integer(json_object_get(after, "o")));
    assert_int_equal(json_integer_value(json_object_get(after, "o")), 4294967295LL);
    assert_int_equal(json_integer_value(json_object_get(after, "i2")), -32768);
    assert_true(json_is_real(json_object_get(after, "f8")));
    assert_true(json_is_null(json_object_get(after, "nul")));
    assert_true(json_is_false(json_object_get(after, "b")));
    json_decref(root);

    free(p);
    free(want);
    free(msg);
    wp_decoder_destroy(d);
}

/* Appendix A.5, default options: bare numbers of any size. */
static void test_a5_types_default(void **state)
{
    (void)state;
    check_fixture_payload("a5_v2_types.json", "a5_v2_types.payload.json");
}

/* Appendix A.5 with numeric-data-types-as-string + include-type-oids. */
static void test_a5_types_as_string_oids(void **state)
{
    (void)state;
    check_fixture_payload("a5_v2_types_as_string_oids.json", "a5_v2_types_as_string_oids.payload.json");
}

static void test_shape(void **state)
{
    (void)state;
    char *oids_msg = read_text("a5_v2_types_as_string_oids.json");
    char *want = read_text("a5_v2_types_as_string_oids.shape.json");
    char *plain_msg = read_text("a5_v2_types.json");
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char *json;

    parse_ok(d, oids_msg, &c);
    int64_t id1 = shape(d, &c, &json);
    assert_string_equal(json, want);
    free(json);
    /* Cached: the same message gives the same shape, appended after existing bytes. */
    parse_ok(d, oids_msg, &c);
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_puts(&b, "prefix:");
    assert_int_equal(wp_decoder_shape(d, &c, &b), id1);
    assert_int_equal(strncmp(b.data, "prefix:", 7), 0);
    assert_string_equal(b.data + 7, want);
    wp_buf_free(&b);

    /* Without oids the shape differs ("typeoid":null) and so does the id. */
    parse_ok(d, plain_msg, &c);
    int64_t id2 = shape(d, &c, &json);
    assert_true(id2 != id1);
    assert_non_null(strstr(json, "{\"name\":\"Mixed Case Col\",\"type\":\"text\",\"typeoid\":null}"));
    free(json);

    /* A fresh decoder computes the same ids: they are stable across runs. */
    wp_decoder_t *d2 = wp_decoder_create();
    parse_ok(d2, plain_msg, &c);
    assert_int_equal(shape(d2, &c, NULL), id2);
    parse_ok(d2, oids_msg, &c);
    assert_int_equal(shape(d2, &c, NULL), id1);
    wp_decoder_destroy(d2);

    free(plain_msg);
    free(want);
    free(oids_msg);
    wp_decoder_destroy(d);
}

/*
 * include-column-positions: each new-tuple column's attnum goes into the
 * shape (never the payload), changes the shape's id, and must be an attnum.
 */
static void test_shape_positions(void **state)
{
    (void)state;
    static const char with[] =
        "{\"action\":\"U\",\"lsn\":\"0/10\",\"schema\":\"public\",\"table\":\"t\",\"columns\":["
        "{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"value\":1,\"position\":1},"
        "{\"name\":\"bee\",\"type\":\"text\",\"typeoid\":25,\"value\":\"x\",\"position\":3}],"
        "\"identity\":[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"value\":1}]}";
    static const char without[] =
        "{\"action\":\"U\",\"lsn\":\"0/10\",\"schema\":\"public\",\"table\":\"t\",\"columns\":["
        "{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"value\":1},"
        "{\"name\":\"bee\",\"type\":\"text\",\"typeoid\":25,\"value\":\"x\"}],"
        "\"identity\":[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"value\":1}]}";
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char *json, err[WP_ERRLEN];

    parse_ok(d, with, &c);
    check_payload(d, &c, "{\"after\":{\"id\":1,\"bee\":\"x\"},\"key\":{\"id\":1}}");
    int64_t id1 = shape(d, &c, &json);
    assert_string_equal(json, "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"position\":1},"
                              "{\"name\":\"bee\",\"type\":\"text\",\"typeoid\":25,\"position\":3}]");
    free(json);
    parse_ok(d, without, &c);
    check_payload(d, &c, "{\"after\":{\"id\":1,\"bee\":\"x\"},\"key\":{\"id\":1}}");
    int64_t id2 = shape(d, &c, &json);
    assert_true(id1 != id2);
    assert_null(strstr(json, "position"));
    free(json);
    /* the same names at other positions (a column dropped and added again) are another shape */
    char *moved = wp_strdup(with);
    *strstr(moved, "\"position\":3") = '\0';
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_printf(&b, "%s\"position\":4%s", moved, strstr(with, "\"position\":3") + 12);
    parse_ok(d, b.data, &c);
    assert_true(shape(d, &c, NULL) != id1);
    wp_buf_free(&b);
    free(moved);

    static const char *const bad[] = {"0", "-1", "32768", "1.5", "\"3\"", "null"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        wp_buf_t m = WP_BUF_INIT;
        wp_buf_printf(&m,
                      "{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"id\",\"type\":\"integer\","
                      "\"value\":1,\"position\":%s}]}",
                      bad[i]);
        assert_int_equal(parse_n(d, m.data, m.len, &c, err, sizeof err), -1);
        assert_non_null(strstr(err, "\"position\" is not an attribute number"));
        wp_buf_free(&m);
    }
    wp_decoder_destroy(d);
}

/* Shapes of I, U and D of one table, the cache, and what changes an id. */
static void test_shape_cache(void **state)
{
    (void)state;
    lines_t l = read_lines("a4_v2_session.jsonl");
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char *json;

    parse_ok(d, l.line[1], &c); /* I t_pk */
    int64_t ins = shape(d, &c, &json);
    assert_string_equal(json, "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":null},"
                              "{\"name\":\"name\",\"type\":\"text\",\"typeoid\":null},"
                              "{\"name\":\"price\",\"type\":\"numeric(10,2)\",\"typeoid\":null},"
                              "{\"name\":\"flag\",\"type\":\"boolean\",\"typeoid\":null},"
                              "{\"name\":\"note\",\"type\":\"character varying(20)\",\"typeoid\":null}]");
    free(json);
    parse_ok(d, l.line[2], &c); /* I t_pk, other values */
    assert_int_equal(shape(d, &c, NULL), ins);
    parse_ok(d, l.line[5], &c); /* U t_pk: the new row's columns */
    assert_int_equal(shape(d, &c, NULL), ins);
    parse_ok(d, l.line[11], &c); /* D t_pk: the identity columns */
    int64_t del = shape(d, &c, &json);
    assert_string_equal(json, "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":null}]");
    free(json);
    assert_true(del != ins);
    /* Shapes of several kinds alternate without losing each other's ids. */
    for (int i = 0; i < 3; i++) {
        parse_ok(d, l.line[1], &c);
        assert_int_equal(shape(d, &c, NULL), ins);
        parse_ok(d, l.line[11], &c);
        assert_int_equal(shape(d, &c, NULL), del);
    }
    /* Same columns, other table: other id. */
    parse_ok(d, "{\"action\":\"D\",\"schema\":\"public\",\"table\":\"t_other\","
                "\"identity\":[{\"name\":\"id\",\"type\":\"integer\",\"value\":3}]}",
             &c);
    assert_true(shape(d, &c, NULL) != del);
    /* Same table and names; a type, an oid, a name or the schema differs: other ids. */
    static const char *variants[] = {
        "{\"action\":\"D\",\"schema\":\"public\",\"table\":\"t_pk\",\"identity\":[{\"name\":\"id\",\"type\":\"bigint\",\"value\":3}]}",
        "{\"action\":\"D\",\"schema\":\"public\",\"table\":\"t_pk\",\"identity\":[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"value\":3}]}",
        "{\"action\":\"D\",\"schema\":\"public\",\"table\":\"t_pk\",\"identity\":[{\"name\":\"ID\",\"type\":\"integer\",\"value\":3}]}",
        "{\"action\":\"D\",\"schema\":\"public2\",\"table\":\"t_pk\",\"identity\":[{\"name\":\"id\",\"type\":\"integer\",\"value\":3}]}",
        "{\"action\":\"D\",\"table\":\"t_pk\",\"identity\":[{\"name\":\"id\",\"type\":\"integer\",\"value\":3}]}",
    };
    int64_t ids[5];
    for (size_t i = 0; i < 5; i++) {
        parse_ok(d, variants[i], &c);
        ids[i] = shape(d, &c, NULL);
        assert_true(ids[i] != del);
        for (size_t k = 0; k < i; k++)
            assert_true(ids[i] != ids[k]);
    }
    /* More shapes than the cache keeps per table: ids are still right. */
    parse_ok(d, l.line[11], &c);
    assert_int_equal(shape(d, &c, NULL), del);
    parse_ok(d, variants[1], &c);
    assert_int_equal(shape(d, &c, NULL), ids[1]);
    /* TOAST-omitted update: the new row has fewer columns, another shape. */
    parse_ok(d, l.line[29], &c);
    parse_ok(d, l.line[29], &c);
    int64_t toast = shape(d, &c, &json);
    assert_string_equal(json, "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":null},"
                              "{\"name\":\"small\",\"type\":\"text\",\"typeoid\":null}]");
    free(json);
    assert_true(toast > 0);

    wp_decoder_destroy(d);
    lines_free(&l);
}

/* More tables than the cache holds: it is emptied and keeps working. */
static void test_many_tables(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char msg[256];
    int64_t first = 0;
    for (int i = 0; i < 20000; i++) {
        snprintf(msg, sizeof msg,
                 "{\"action\":\"I\",\"schema\":\"s\",\"table\":\"t%d\",\"columns\":"
                 "[{\"name\":\"id\",\"type\":\"integer\",\"value\":%d}]}",
                 i % 17000, i);
        parse_ok(d, msg, &c);
        wp_buf_t b = WP_BUF_INIT;
        int64_t id = wp_decoder_shape(d, &c, &b);
        wp_buf_free(&b);
        assert_true(id > 0);
        if (i == 0)
            first = id;
        if (i == 17000)
            assert_int_equal(id, first);
    }
    wp_decoder_destroy(d);
}

/* The value rules, one column at a time. */
static void test_value_rules(void **state)
{
    (void)state;
    /* numeric: string with the exact text, whatever wal2json printed */
    check_value("numeric", NULL, "10.50", "\"10.50\"");
    check_value("numeric(10,2)", NULL, "1.00", "\"1.00\"");
    check_value("numeric", NULL, "12345678901234567890.123456789", "\"12345678901234567890.123456789\"");
    check_value("numeric", NULL, "18446744073709551615", "\"18446744073709551615\"");
    check_value("numeric", NULL, "-18446744073709551615.000000000000000000001",
                "\"-18446744073709551615.000000000000000000001\"");
    check_value("numeric", NULL, "10", "\"10\"");
    check_value("numeric", NULL, "-0", "\"-0\"");
    check_value("numeric", NULL, "1e400", "\"1e400\"");
    check_value("numeric", NULL, "1E-7", "\"1E-7\"");
    check_value("numeric", "1700", "\"NaN\"", "\"NaN\"");
    check_value("numeric", "1700", "null", "null");
    check_value("numeric", "1700", "\"12345678901234567890.123456789\"", "\"12345678901234567890.123456789\"");
    /* int8: number within +-2^53, else string */
    check_value("bigint", NULL, "9007199254740992", "9007199254740992");
    check_value("bigint", NULL, "-9007199254740992", "-9007199254740992");
    check_value("bigint", NULL, "9007199254740993", "\"9007199254740993\"");
    check_value("bigint", NULL, "-9007199254740993", "\"-9007199254740993\"");
    check_value("bigint", NULL, "9223372036854775807", "\"9223372036854775807\"");
    check_value("bigint", NULL, "-9223372036854775808", "\"-9223372036854775808\"");
    check_value("bigint", "20", "\"9007199254740992\"", "9007199254740992");
    check_value("bigint", "20", "\"9223372036854775807\"", "\"9223372036854775807\"");
    check_value("bigint", "20", "0", "0");
    /* int2/int4/oid: numbers */
    check_value("integer", NULL, "-2147483648", "-2147483648");
    check_value("smallint", NULL, "32767", "32767");
    check_value("oid", NULL, "4294967295", "4294967295");
    check_value("oid", "26", "\"4294967295\"", "4294967295");
    check_value("integer", "23", "\"2\"", "2");
    /* float4/float8: the number text verbatim */
    check_value("double precision", NULL, "0.1", "0.1");
    check_value("double precision", NULL, "1.7976931348623157e+308", "1.7976931348623157e+308");
    check_value("double precision", NULL, "5e-324", "5e-324");
    check_value("double precision", NULL, "-0", "-0");
    check_value("double precision", NULL, "1", "1");
    check_value("real", NULL, "1.5", "1.5");
    check_value("real", "700", "\"3.4028235e+38\"", "3.4028235e+38");
    check_value("double precision", "701", "\"-Infinity\"", "\"-Infinity\"");
    check_value("double precision", "701", "\"NaN\"", "\"NaN\"");
    check_value("double precision", NULL, "null", "null");
    /* bool */
    check_value("boolean", NULL, "true", "true");
    check_value("boolean", "16", "false", "false");
    /* bytea: PostgreSQL's input form */
    check_value("bytea", NULL, "\"00ff41\"", "\"\\\\x00ff41\"");
    check_value("bytea", "17", "\"DEADbeef\"", "\"\\\\xDEADbeef\"");
    check_value("bytea", NULL, "\"\"", "\"\\\\x\"");
    check_value("bytea", NULL, "null", "null");
    /* everything else: the text as a string, json included */
    check_value("json", "114", "\"{\\\"k\\\": [1, 2]}\"", "\"{\\\"k\\\": [1, 2]}\"");
    check_value("jsonb", NULL, "\"[1.0, 12345678901234567890]\"", "\"[1.0, 12345678901234567890]\"");
    check_value("integer[]", "1007", "\"{1,2,NULL}\"", "\"{1,2,NULL}\"");
    check_value("posint", "16435", "\"5\"", "\"5\"");
    /* a domain printed as a bare number still goes out as text */
    check_value("posint", "16435", "5", "\"5\"");
    check_value("posint", "16435", "1.25", "\"1.25\"");
    /* typeoid wins over the type name */
    check_value("numeric", "23", "7", "7");
    check_value("integer", "1700", "7", "\"7\"");
    check_value("text", NULL, "\"12345678901234567890.5\"", "\"12345678901234567890.5\"");
}

/* Strings with everything that needs escaping, names that are not identifiers. */
static void test_escaping(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    /* Input escapes yajl decodes; output uses the short forms and raw UTF-8. */
    check_msg(d,
              "{\"action\":\"I\",\"schema\":\"S p\\\"a\\\\ce\",\"table\":\"Weird Table\",\"columns\":["
              "{\"name\":\"Col\\\"Q\",\"type\":\"text\",\"value\":\"a\\/b\"},"
              "{\"name\":\"Mixed Case Col\",\"type\":\"text\",\"value\":\"\\u0001\\u001f\\u007f\\b\\f\\n\\r\\t\"},"
              "{\"name\":\"na\\u00efve \xe5\x90\x8d\",\"type\":\"text\",\"value\":\"\\ud83d\\ude00 \xf0\x9f\x98\x80\"},"
              "{\"name\":\"\",\"type\":\"text\",\"value\":\"\\\\\\\"\"},"
              "{\"name\":\"x\\u2028y\",\"type\":\"character varying(5)\",\"value\":\"\\u2028\"}]}",
              WP_OP_INSERT,
              "{\"after\":{\"Col\\\"Q\":\"a/b\","
              "\"Mixed Case Col\":\"\\u0001\\u001f\x7f\\b\\f\\n\\r\\t\","
              "\"na\xc3\xafve \xe5\x90\x8d\":\"\xf0\x9f\x98\x80 \xf0\x9f\x98\x80\","
              "\"\":\"\\\\\\\"\","
              "\"x\xe2\x80\xa8y\":\"\xe2\x80\xa8\"}}");
    wp_change_t c;
    parse_ok(d, "{\"action\":\"M\",\"transactional\":false,\"prefix\":\"p\\\"x\",\"content\":\"line1\\nline2 \\\"q\\\"\"}",
             &c);
    assert_int_equal(c.content_len, 15);
    check_payload(d, &c, "{\"prefix\":\"p\\\"x\",\"content\":\"line1\\nline2 \\\"q\\\"\",\"transactional\":false}");
    /* an escaped backslash before "ud800" is no \u escape; a surrogate pair is one character */
    parse_ok(d, "{\"action\":\"T\",\"table\":\"\\\\ud800 \\\"x\\\\\\ud83d\\ude00\"}", &c);
    assert_string_equal(c.table, "\\ud800 \"x\\\xf0\x9f\x98\x80");
    wp_decoder_destroy(d);
}

/* Numbers anywhere (values, unknown fields, nested arrays, inside strings) are read as their exact text. */
static void test_numbers_anywhere(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    /* Numbers inside strings, in unknown fields, in nested arrays, after whitespace. */
    check_msg(d,
              "{ \"action\" : \"I\" , \"x\":[1.5, [2.5e3,-0,99999999999999999999], {\"y\": 0.5}],"
              "\"table\":\"t:1.5,[2.5]\\\":3.5\", \"position\":1e999, \"columns\" :\n[ {\"name\":\"n\",\"type\":\"numeric\","
              "\"value\"\t:\r\n 3.14159265358979323846264338327950288419716939937510 },"
              "{\"name\":\"q\",\"type\":\"text\",\"value\":\"[1.5,{\\\"a\\\":2.5}]\"}]}",
              WP_OP_INSERT,
              "{\"after\":{\"n\":\"3.14159265358979323846264338327950288419716939937510\",\"q\":\"[1.5,{\\\"a\\\":2.5}]\"}}");
    /* A long numeric. */
    wp_buf_t msg = WP_BUF_INIT;
    wp_buf_t want = WP_BUF_INIT;
    wp_buf_puts(&msg, "{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"n\",\"type\":\"numeric\",\"value\":");
    wp_buf_puts(&want, "{\"after\":{\"n\":\"");
    for (int i = 0; i < 5000; i++) {
        wp_buf_putc(&msg, (char)('1' + i % 9));
        wp_buf_putc(&want, (char)('1' + i % 9));
    }
    wp_buf_puts(&msg, ".5}]}");
    wp_buf_puts(&want, ".5\"}}");
    check_msg(d, msg.data, WP_OP_INSERT, want.data);
    wp_buf_free(&msg);
    wp_buf_free(&want);
    wp_decoder_destroy(d);
}

/* Error positions count the bytes read when the problem showed: the offending byte, 1-based. */
static void test_error_position(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char e[WP_ERRLEN];
    char want[64];
    const char *msgs[] = {
        "{\"action\":\"I\",\"x\":1.5,\"y\":[2.5,3.5],\"table\":}",
        "{\"action\":\"I\",\"table\":?,\"x\":1.5,\"y\":[2.5]}",
        "{\"action\":\"I\",\"table\":\"t\"}}",
    };
    const char *bad[] = {"}", "?", "}}"};
    for (size_t i = 0; i < sizeof msgs / sizeof msgs[0]; i++) {
        assert_int_equal(parse_n(d, msgs[i], strlen(msgs[i]), &c, e, sizeof e), -1);
        snprintf(want, sizeof want, "invalid JSON at byte %zu:", (size_t)(strstr(msgs[i], bad[i]) - msgs[i]) + 1 +
                                                                    (strlen(bad[i]) - 1));
        if (strstr(e, want) == NULL)
            fail_msg("%s: reason \"%s\" lacks \"%s\"", msgs[i], e, want);
    }
    /* A message cut short fails at its end. */
    const char *cut = "{\"action\":\"I\",\"table\":\"t";
    assert_int_equal(parse_n(d, cut, strlen(cut), &c, e, sizeof e), -1);
    snprintf(want, sizeof want, "invalid JSON at byte %zu:", strlen(cut));
    if (strstr(e, want) == NULL)
        fail_msg("reason \"%s\" lacks \"%s\"", e, want);
    wp_decoder_destroy(d);
}

/* Fields the decoder does not read are skipped whatever they hold; yajl does not recurse, so depth costs nothing. */
static void test_ignored_fields(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    wp_buf_t deep = WP_BUF_INIT;
    wp_buf_puts(&deep, "{\"action\":\"I\",\"table\":\"t\",\"x\":");
    for (int i = 0; i < 100000; i++)
        wp_buf_puts(&deep, "[{\"columns\":");
    wp_buf_puts(&deep, "1");
    for (int i = 0; i < 100000; i++)
        wp_buf_puts(&deep, "}]");
    wp_buf_puts(&deep, ",\"columns\":[{\"name\":\"a\",\"extra\":{\"name\":[\"b\"]},\"type\":\"integer\",\"value\":7,"
                       "\"more\":[[[]]]}],\"z\":{\"columns\":[1,2]}}");
    check_msg(d, deep.data, WP_OP_INSERT, "{\"after\":{\"a\":7}}");
    wp_buf_free(&deep);
    /* a key the decoder reads, twice in one entry */
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"name\":\"b\",\"type\":\"text\","
              "\"value\":\"v\"}]}", "duplicate");
    wp_decoder_destroy(d);
}

/* Commit timestamps become microseconds since 2000-01-01 UTC; libc's timegm is the independent reference. */
static void test_commit_time(void **state)
{
    static const struct {
        const char *text;
        int y, mo, d, h, mi, s;
        long us;
        int offset_s; /* east of UTC */
    } cases[] = {
        {"2026-11-26 16:32:11.740428+00", 2026, 11, 26, 16, 32, 11, 740428, 0},
        {"2000-01-01 00:00:00+00", 2000, 1, 1, 0, 0, 0, 0, 0},
        {"1999-12-31 23:59:59.999999+00", 1999, 12, 31, 23, 59, 59, 999999, 0},
        {"2024-02-29 12:00:00.5+00", 2024, 2, 29, 12, 0, 0, 500000, 0},
        {"2100-03-01 00:00:00.000001+00", 2100, 3, 1, 0, 0, 0, 1, 0},
        {"1970-01-01 00:00:00+00", 1970, 1, 1, 0, 0, 0, 0, 0},
        {"2026-06-01 10:00:00.25+05:30", 2026, 6, 1, 10, 0, 0, 250000, 5 * 3600 + 30 * 60},
        {"2026-06-01 10:00:00-08", 2026, 6, 1, 10, 0, 0, 0, -8 * 3600},
        {"1900-01-01 00:00:00+00:09:21", 1900, 1, 1, 0, 0, 0, 0, 9 * 60 + 21},
        {"12026-01-01 00:00:00+00", 12026, 1, 1, 0, 0, 0, 0, 0},
        {"294276-12-31 23:59:59.999999-15", 294276, 12, 31, 23, 59, 59, 999999, -15 * 3600},
    };
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char msg[256];
        wp_change_t c;
        struct tm tm = {.tm_year = cases[i].y - 1900, .tm_mon = cases[i].mo - 1, .tm_mday = cases[i].d,
                        .tm_hour = cases[i].h, .tm_min = cases[i].mi, .tm_sec = cases[i].s};
        int64_t want = ((int64_t)timegm(&tm) - 946684800 - cases[i].offset_s) * 1000000 + cases[i].us;
        snprintf(msg, sizeof msg, "{\"action\":\"T\",\"table\":\"t\",\"timestamp\":\"%s\"}", cases[i].text);
        parse_ok(d, msg, &c);
        if (c.commit_time != want)
            fail_msg("%s: %lld us, expected %lld", cases[i].text, (long long)c.commit_time, (long long)want);
        assert_string_equal(c.timestamp, cases[i].text);
    }
    wp_decoder_destroy(d);
    /* anything else is no timestamp the walsender prints under DateStyle ISO */
    static const char *const bad[] = {
        "2026-11-26 16:32:11",         "2026-11-26T16:32:11+00",    "Thu Nov 26 16:32:11 2026 UTC",
        "11/26/2026 16:32:11+00",      "2026-11-26 16:32:11.+00",   "2026-11-26 16:32:11.1234567+00",
        "2026-02-29 00:00:00+00",      "2026-13-01 00:00:00+00",    "2026-11-26 24:00:00+00",
        "2026-11-26 16:32:11+00 BC",   "2026-11-26 16:32:11+0",     "2026-11-26 16:32:11+00:",
        "infinity",                    "",                          "226-11-26 16:32:11+00",
        "294277-01-01 00:00:00+00",    "999999-12-31 23:59:59+00",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char msg[256];
        snprintf(msg, sizeof msg, "{\"action\":\"T\",\"table\":\"t\",\"timestamp\":\"%s\"}", bad[i]);
        check_bad(msg, "\"timestamp\" is not an ISO timestamp with a UTC offset");
    }
}

static void test_other_fixtures(void **state)
{
    (void)state;
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;

    lines_t a6 = read_lines("a6_v2_pk.jsonl"); /* include-pk: "pk" is ignored */
    assert_int_equal(a6.n, 2);
    check_msg(d, a6.line[0], WP_OP_UPDATE,
              "{\"after\":{\"id\":1,\"name\":\"ONE\",\"price\":\"10.50\",\"flag\":true,\"note\":\"x\"},\"key\":{\"id\":1}}");
    check_msg(d, a6.line[1], WP_OP_DELETE, "{\"key\":{\"id\":3}}");
    lines_free(&a6);

    lines_t a10 = read_lines("a10_v2_stream.jsonl");
    assert_int_equal(a10.n, 5);
    parse_ok(d, a10.line[0], &c);
    assert_int_equal(c.op, WP_OP_BEGIN);
    assert_null(c.timestamp);
    assert_int_equal(c.xid, 880);
    assert_int_equal(c.nextlsn, 0x52BAE208);
    parse_ok(d, a10.line[2], &c);
    assert_int_equal(c.op, WP_OP_MESSAGE);
    assert_false(c.has_xid);
    assert_int_equal(c.lsn, 0x52BAE248);
    check_payload(d, &c, "{\"prefix\":\"hb\",\"content\":\"heartbeat\",\"transactional\":false}");
    parse_ok(d, a10.line[4], &c);
    assert_int_equal(c.op, WP_OP_COMMIT);
    assert_int_equal(c.lsn, 0x52BAE2D8);
    assert_int_equal(c.nextlsn, 0x52BAE308);
    lines_free(&a10);

    /* LSN forms */
    parse_ok(d, "{\"action\":\"C\",\"lsn\":\"ffffffff/FFFFFFFF\",\"nextlsn\":\"1/0\"}", &c);
    assert_true(c.lsn == UINT64_MAX);
    assert_true(c.nextlsn == UINT64_C(0x100000000));
    wp_decoder_destroy(d);

    /* Negative typeoid: wal2json printed an OID above 2^31 with %d. */
    d = wp_decoder_create();
    parse_ok(d, "{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"c\",\"type\":\"mytype\","
                "\"typeoid\":-2147483648,\"value\":\"v\"}]}",
             &c);
    char *json;
    assert_true(shape(d, &c, &json) > 0);
    assert_string_equal(json, "[{\"name\":\"c\",\"type\":\"mytype\",\"typeoid\":2147483648}]");
    free(json);
    wp_decoder_destroy(d);
}

/* json_object_get on a payload, which must be valid JSON; caller json_decrefs. */
static json_t *payload_json(wp_decoder_t *d, const wp_change_t *c, char **text)
{
    char *p = payload(d, c);
    json_t *j = json_loads(p, 0, NULL);
    assert_non_null(j);
    if (text)
        *text = p;
    else
        free(p);
    return j;
}

/* A real wal2json 2.5 capture (see tests/data/wal2json/pg15_w2j25_session.sql). */
static void test_w2j25_session(void **state)
{
    (void)state;
    lines_t l = read_lines("pg15_w2j25_session.jsonl");
    assert_int_equal(l.n, 10);
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char *text;
    json_t *j;

    parse_ok(d, l.line[0], &c); /* INSERT t_types */
    assert_int_equal(c.ncolumns, 36);
    j = payload_json(d, &c, &text);
    assert_non_null(strstr(text, "\"n2\":\"-0.0000000000000000000000000000000000000000000000000000000000000000000000000000000"
                                 "000000000000000000000000000000000000000000000000001\""));
    assert_non_null(strstr(text, "\"f8neg\":-0,"));
    assert_non_null(strstr(text, "\"i8min\":\"-9223372036854775808\""));
    assert_non_null(strstr(text, "\"i8\":\"9223372036854775807\""));
    assert_non_null(strstr(text, "\"txt\":\"line1\\nline2\\t\\\"quoted\\\" \\\\ back \xc3\xa9 \\u0001\""));
    assert_non_null(strstr(text, "\"Col\\\"Q\":\"q\""));
    assert_non_null(strstr(text, "\"o\":4294967295,"));
    assert_int_equal(json_string_length(json_object_get(json_object_get(j, "after"), "big")), 3000);
    json_decref(j);
    free(text);

    parse_ok(d, l.line[1], &c); /* UPDATE, DEFAULT identity: the unchanged EXTERNAL "big" is left out */
    assert_int_equal(c.ncolumns, 35);
    j = payload_json(d, &c, NULL);
    assert_null(json_object_get(json_object_get(j, "after"), "big"));
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "after"), "i2")), 1);
    assert_int_equal(json_object_size(json_object_get(j, "key")), 1);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "key"), "id")), 2);
    assert_null(json_object_get(j, "before"));
    json_decref(j);

    parse_ok(d, l.line[2], &c); /* UPDATE, FULL identity: "before" has the whole old row */
    j = payload_json(d, &c, NULL);
    assert_null(json_object_get(json_object_get(j, "after"), "big"));
    assert_null(json_object_get(j, "key"));
    assert_int_equal(json_object_size(json_object_get(j, "before")), 36);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "before"), "i2")), 1);
    assert_int_equal(json_string_length(json_object_get(json_object_get(j, "before"), "big")), 3000);
    json_decref(j);

    parse_ok(d, l.line[3], &c); /* DELETE, FULL identity */
    j = payload_json(d, &c, NULL);
    assert_int_equal(json_object_size(json_object_get(j, "before")), 36);
    json_decref(j);

    check_msg(d, l.line[4], WP_OP_INSERT, "{\"after\":{\"id\":1,\"v\":\"a\"}}");
    check_msg(d, l.line[5], WP_OP_DELETE, "{\"key\":{\"id\":1}}");
    check_msg(d, l.line[6], WP_OP_TRUNCATE, "{}");
    check_msg(d, l.line[7], WP_OP_MESSAGE,
              "{\"prefix\":\"hb\",\"content\":\"h\xc3\xa9llo \\\"x\\\"\",\"transactional\":false}");
    check_msg(d, l.line[8], WP_OP_MESSAGE, "{\"prefix\":\"px\",\"content\":\"tab\\there\",\"transactional\":true}");
    check_msg(d, l.line[9], WP_OP_INSERT, "{\"after\":{\"id\":5,\"v\":null}}");

    wp_decoder_destroy(d);
    lines_free(&l);
}

/* Rejected messages, one reason per violated rule. */
static void test_bad_input(void **state)
{
    (void)state;
    lines_t a4 = read_lines("a4_v2_session.jsonl");
    /* Truncated real messages at several points. */
    for (size_t cut = 1; cut < strlen(a4.line[1]); cut += 37)
        check_bad_n(a4.line[1], cut, "invalid JSON at byte");
    check_bad_n(a4.line[1], strlen(a4.line[1]) - 1, "invalid JSON at byte");
    lines_free(&a4);

    char *a7 = read_text("a7_v2_default_invalid.json");
    check_bad(a7, "invalid JSON at byte");
    free(a7);
    lines_t a8 = read_lines("a8_v2_minimal.jsonl");
    check_bad(a8.line[0], "\"nextlsn\" is missing");
    check_bad(a8.line[1], "\"columns\" entry 1 has no \"type\"");
    lines_free(&a8);

    /* framing */
    check_bad("", "empty message");
    check_bad_n("\0", 1, "invalid JSON at byte");
    check_bad("   ", "invalid JSON");
    check_bad("[1,2]", "message is not a JSON object");
    check_bad("\"B\"", "message is not a JSON object");
    check_bad("{\"action\":\"T\",\"table\":\"t\"} x", "invalid JSON");
    check_bad("{\"action\":\"T\",\"table\":\"t\"}{}", "invalid JSON");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"table\":\"u\"}", "duplicate");
    check_bad("{\"action\":\"T\",\"table\":\"t\u00e9\x01\"}", "invalid JSON");
    check_bad_n("{\"action\":\"T\",\"table\":\"t\0\"}", sizeof "{\"action\":\"T\",\"table\":\"t\0\"}" - 1,
                "invalid JSON");
    check_bad("{\"action\":\"I\",1.5:2,\"table\":\"t\"}", "invalid JSON");
    check_bad("{\"action\":\"I\",\"a\":1,1.5:2,\"table\":\"t\"}", "invalid JSON");
    check_bad("{\"action\":\"I\",\"a\":[1.5:2],\"table\":\"t\"}", "invalid JSON");
    check_bad("{\"action\":\"I\",\"a\":01,\"table\":\"t\"}", "invalid JSON");
    check_bad("{\"action\":\"I\",\"a\":1.,\"table\":\"t\"}", "invalid JSON");
    check_bad("{\"action\":\"I\",\"a\":NaN,\"table\":\"t\"}", "invalid JSON");
    /* invalid UTF-8, and reasons that quote it stay valid UTF-8 */
    check_bad("{\"action\":\"M\",\"transactional\":false,\"prefix\":\"p\",\"content\":\"\xff\x41\x01\"}",
              "invalid JSON at byte");
    check_bad("{\"action\":\"T\",\"table\":\"\xc3\"}", "invalid JSON at byte");
    check_bad("{\"action\":\"T\",\"table\":\"\xed\xa0\x80\"}", "invalid JSON");
    check_bad("{\"action\":\"T\",\"table\":\"t\"}\xff\xfe", "invalid JSON");
    check_bad("{\"action\":\"T\",\"table\":\"\\ud800\"}", "invalid JSON");
    /* NUL: jsonb cannot store it */
    check_bad("{\"action\":\"M\",\"transactional\":false,\"prefix\":\"p\",\"content\":\"a\\u0000b\"}", "\\u0000");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\\u0000\",\"type\":\"text\",\"value\":\"v\"}]}",
              "\\u0000");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"k\\u0000\":1}", "\\u0000");
    /* strict UTF-8, as PostgreSQL wants it: overlong forms, encoded surrogates, above U+10FFFF */
    check_bad("{\"action\":\"T\",\"table\":\"\xc0\x80\"}", "not valid UTF-8");
    check_bad("{\"action\":\"T\",\"table\":\"\xe0\x80\x80\"}", "not valid UTF-8");
    check_bad("{\"action\":\"T\",\"table\":\"\xf4\x90\x80\x80\"}", "not valid UTF-8");
    check_bad("{\"action\":\"T\",\"table\":\"\xf8\x88\x80\x80\x80\"}", "not valid UTF-8");
    /* \u escapes: surrogates only in high-low pairs */
    check_bad("{\"action\":\"T\",\"table\":\"\\udc00\"}", "unpaired UTF-16 surrogate");
    check_bad("{\"action\":\"T\",\"table\":\"a\\ud800\\u0041\"}", "unpaired UTF-16 surrogate");
    check_bad("{\"action\":\"T\",\"table\":\"\\\\\\ud800\"}", "unpaired UTF-16 surrogate");

    /* action */
    check_bad("{\"table\":\"t\"}", "\"action\" is missing");
    check_bad("{\"action\":{\"x\":[1]},\"table\":\"t\"}", "\"action\" is not a string");
    check_bad("{\"action\":1,\"table\":\"t\"}", "\"action\" is not a string");
    check_bad("{\"action\":null}", "\"action\" is not a string");
    check_bad("{\"action\":\"X\",\"table\":\"t\"}", "unknown action \"X\"");
    check_bad("{\"action\":\"\",\"table\":\"t\"}", "unknown action \"\"");
    check_bad("{\"action\":\"II\",\"table\":\"t\"}", "unknown action \"II\"");
    check_bad("{\"action\":\"i\",\"table\":\"t\"}", "unknown action \"i\"");
    check_bad("{\"action\":\"\\u00e9\\n\",\"table\":\"t\"}", "unknown action \"\xc3\xa9 \"");

    /* common fields */
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"xid\":\"850\"}", "\"xid\" is not an integer or null");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"xid\":1.5}", "\"xid\" is not an integer or null");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"xid\":99999999999999999999}", "\"xid\" is not an integer or null");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"xid\":1e999999}", "\"xid\" is not an integer or null");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"xid\":true}", "\"xid\" is not an integer or null");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"xid\":-1}", "\"xid\" is negative");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"timestamp\":5}", "\"timestamp\" is not a string or null");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":5}", "\"lsn\" is not a string");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":null}", "\"lsn\" is not a string");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":\"0/\"}", "\"lsn\" is not an LSN");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":\"/1\"}", "\"lsn\" is not an LSN");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":\"0/123456789\"}", "\"lsn\" is not an LSN");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":\"0/1 \"}", "\"lsn\" is not an LSN");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":\"g/1\"}", "\"lsn\" is not an LSN");
    check_bad("{\"action\":\"T\",\"table\":\"t\",\"lsn\":\"0x1/1\"}", "\"lsn\" is not an LSN");

    /* B/C */
    check_bad("{\"action\":\"B\",\"xid\":1,\"lsn\":\"0/1\"}", "\"nextlsn\" is missing");
    check_bad("{\"action\":\"C\",\"lsn\":\"0/1\",\"nextlsn\":null}", "\"nextlsn\" is not a string");
    check_bad("{\"action\":\"C\",\"lsn\":\"0/1\",\"nextlsn\":\"0/1/2\"}", "\"nextlsn\" is not an LSN");

    /* I/U/D/T: table and schema */
    check_bad("{\"action\":\"T\"}", "\"table\" is missing");
    check_bad("{\"action\":\"T\",\"table\":null}", "\"table\" is not a string");
    check_bad("{\"action\":\"D\",\"table\":[\"t\"],\"identity\":[]}", "\"table\" is not a string");
    check_bad("{\"action\":\"T\",\"schema\":5,\"table\":\"t\"}", "\"schema\" is not a string");
    check_bad("{\"action\":\"I\",\"schema\":null,\"table\":\"t\",\"columns\":[]}", "\"schema\" is not a string");

    /* columns */
    check_bad("{\"action\":\"I\",\"table\":\"t\"}", "\"columns\" is missing");
    check_bad("{\"action\":\"U\",\"table\":\"t\",\"identity\":[]}", "\"columns\" is missing");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":{}}", "\"columns\" is not an array");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":null}", "\"columns\" is not an array");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[1]}", "\"columns\" entry 1 is not an object");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"value\":1},[]]}",
              "\"columns\" entry 2 is not an object");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"type\":\"text\",\"value\":1}]}",
              "\"columns\" entry 1 has no \"name\"");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":5,\"type\":\"text\",\"value\":1}]}",
              "\"columns\" entry 1: \"name\" is not a string");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"value\":1}]}",
              "\"columns\" entry 1 has no \"type\"");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":null,\"value\":1}]}",
              "\"columns\" entry 1: \"type\" is not a string");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"typeoid\":\"25\",\"value\":1}]}",
              "\"columns\" entry 1: \"typeoid\" is not an integer");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"typeoid\":2.5,\"value\":1}]}",
              "\"columns\" entry 1: \"typeoid\" is not an integer");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"typeoid\":4294967296,\"value\":1}]}",
              "\"columns\" entry 1: \"typeoid\" 4294967296 is not an OID");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"typeoid\":-2147483649,\"value\":1}]}",
              "is not an OID");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\"}]}",
              "\"columns\" entry 1 has no \"value\"");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"value\":[1]}]}",
              "\"columns\" entry 1: \"value\" is not a string, number, boolean or null");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"value\":{}}]}",
              "\"value\" is not a string, number, boolean or null");
    /* bytea that is not hex: bytea_output=escape mangles it (wal2json issue #301) */
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"by\",\"type\":\"bytea\",\"value\":\"01\\\\002\"}]}",
              "\"columns\" entry 1: bytea \"value\" is not hex");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"by\",\"type\":\"bytea\",\"value\":\"abc\"}]}",
              "bytea \"value\" is not hex");
    check_bad("{\"action\":\"I\",\"table\":\"t\",\"columns\":[{\"name\":\"by\",\"type\":\"bytea\",\"typeoid\":17,\"value\":12}]}",
              "bytea \"value\" is not hex");

    /* identity */
    check_bad("{\"action\":\"D\",\"table\":\"t\"}", "\"identity\" is missing");
    check_bad("{\"action\":\"D\",\"table\":\"t\",\"identity\":{}}", "\"identity\" is not an array");
    check_bad("{\"action\":\"U\",\"table\":\"t\",\"columns\":[],\"identity\":null}", "\"identity\" is not an array");
    check_bad("{\"action\":\"U\",\"table\":\"t\",\"columns\":[{\"name\":\"a\",\"type\":\"text\",\"value\":\"1\"}],"
              "\"identity\":[{\"name\":\"a\",\"type\":\"text\",\"value\":\"1\"},{\"name\":\"b\",\"type\":\"text\"}]}",
              "\"identity\" entry 2 has no \"value\"");

    /* M */
    check_bad("{\"action\":\"M\",\"prefix\":\"p\",\"content\":\"c\"}", "\"transactional\" is missing");
    check_bad("{\"action\":\"M\",\"transactional\":\"true\",\"prefix\":\"p\",\"content\":\"c\"}",
              "\"transactional\" is not a boolean");
    check_bad("{\"action\":\"M\",\"transactional\":1,\"prefix\":\"p\",\"content\":\"c\"}",
              "\"transactional\" is not a boolean");
    check_bad("{\"action\":\"M\",\"transactional\":true,\"content\":\"c\"}", "\"prefix\" is missing");
    check_bad("{\"action\":\"M\",\"transactional\":true,\"prefix\":5,\"content\":\"c\"}", "\"prefix\" is not a string");
    check_bad("{\"action\":\"M\",\"transactional\":true,\"prefix\":\"p\"}", "\"content\" is missing");
    check_bad("{\"action\":\"M\",\"transactional\":true,\"prefix\":\"p\",\"content\":null}",
              "\"content\" is not a string");

    /* A long reason is cut at a character boundary and stays valid UTF-8. */
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t c;
    char small[18];
    const char *m = "{\"action\":\"\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\"}";
    assert_int_equal(parse_n(d, m, strlen(m), &c, small, sizeof small), -1);
    assert_true(is_utf8(small));
    assert_int_equal(strncmp(small, "unknown ", 8), 0);
    wp_decoder_destroy(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_op_names),
        cmocka_unit_test(test_create_destroy),
        cmocka_unit_test(test_a4_session),
        cmocka_unit_test(test_a4_fields),
        cmocka_unit_test(test_delete_full_heuristic),
        cmocka_unit_test(test_update_identity),
        cmocka_unit_test(test_a5_types_default),
        cmocka_unit_test(test_a5_types_as_string_oids),
        cmocka_unit_test(test_shape),
        cmocka_unit_test(test_shape_cache),
        cmocka_unit_test(test_shape_positions),
        cmocka_unit_test(test_many_tables),
        cmocka_unit_test(test_value_rules),
        cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_numbers_anywhere),
        cmocka_unit_test(test_error_position),
        cmocka_unit_test(test_ignored_fields),
        cmocka_unit_test(test_commit_time),
        cmocka_unit_test(test_other_fixtures),
        cmocka_unit_test(test_w2j25_session),
        cmocka_unit_test(test_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
