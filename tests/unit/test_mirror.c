/*
 * test_mirror.c: the payload reader (payload.c) and the table-shape parser
 * (shape.c) the mirror is fed by.
 *
 * Payloads come from jsonb's text output, so the parser must return every
 * value's exact text: strings unescaped (surrogate pairs included), numbers
 * as written, whatever their size or precision.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "payload.h"
#include "shape.h"

static const char *value_of(const wp_jobject_t *o, const char *name, bool *is_null)
{
    const wp_jfield_t *f = wp_jobject_get(o, name, NULL);
    if (f == NULL)
        fail_msg("no field \"%s\"", name);
    *is_null = f->value == NULL;
    return f->value;
}

static void test_values_keep_their_text(void **state)
{
    (void)state;
    wp_payload_t p = {0};
    char err[256];
    bool is_null;
    const char *text =
        "{\"key\": {\"id\": 1}, \"after\": {\"id\": 12345678901234567890123456789, \"s\": "
        "\"q\\\"b\\\\s\\/n\\nt\\tr\\r\\b\\f \\u00e9 \\ud83d\\ude00 \xc3\xa9\", \"n\": null, \"b\": true, "
        "\"c\": false, \"f\": -1.5e-10, \"z\": 0.10000000000000001, \"e\": \"\", \"k\\\"ey\": \"v\"}}";
    assert_int_equal(wp_payload_parse(&p, text, err, sizeof err), 0);
    assert_true(p.after.present);
    assert_true(p.key.present);
    assert_false(p.before.present);
    assert_int_equal(p.after.n, 9);
    assert_string_equal(value_of(&p.after, "id", &is_null), "12345678901234567890123456789");
    assert_string_equal(value_of(&p.after, "s", &is_null),
                        "q\"b\\s/n\nt\tr\r\b\f \xc3\xa9 \xf0\x9f\x98\x80 \xc3\xa9");
    assert_null(value_of(&p.after, "n", &is_null));
    assert_true(is_null);
    assert_string_equal(value_of(&p.after, "b", &is_null), "true");
    assert_string_equal(value_of(&p.after, "c", &is_null), "false");
    assert_string_equal(value_of(&p.after, "f", &is_null), "-1.5e-10");
    assert_string_equal(value_of(&p.after, "z", &is_null), "0.10000000000000001");
    assert_string_equal(value_of(&p.after, "e", &is_null), "");
    assert_false(is_null);
    assert_string_equal(value_of(&p.after, "k\"ey", &is_null), "v");
    assert_string_equal(value_of(&p.key, "id", &is_null), "1");
    assert_null(wp_jobject_get(&p.after, "missing", NULL));

    /* lookups in payload order are linear through the hint; out of order they still find the field */
    size_t hint = 0;
    assert_string_equal(wp_jobject_get(&p.after, "id", &hint)->name, "id");
    assert_int_equal(hint, 1);
    assert_string_equal(wp_jobject_get(&p.after, "s", &hint)->name, "s");
    assert_string_equal(wp_jobject_get(&p.after, "id", &hint)->name, "id");

    /* the parser is reused: a second parse replaces everything */
    assert_int_equal(wp_payload_parse(&p, "{\"before\": {\"a\": 1, \"b\": \"x\"}}", err, sizeof err), 0);
    assert_false(p.after.present);
    assert_false(p.key.present);
    assert_true(p.before.present);
    assert_int_equal(p.before.n, 2);
    assert_string_equal(value_of(&p.before, "b", &is_null), "x");
    wp_payload_free(&p);
}

static void test_other_members_are_skipped(void **state)
{
    (void)state;
    wp_payload_t p = {0};
    char err[256];
    assert_int_equal(wp_payload_parse(&p, "{}", err, sizeof err), 0);
    assert_false(p.after.present || p.key.present || p.before.present);
    assert_int_equal(wp_payload_parse(&p,
                                      "{\"prefix\": \"app\", \"content\": \"{\\\"a\\\": [1, {\\\"b\\\": 2}]}\", "
                                      "\"nested\": {\"x\": [1, 2, {\"y\": null}], \"z\": []}, \"transactional\": true}",
                                      err, sizeof err),
                     0);
    assert_false(p.after.present);
    /* an escaped backslash before "u..." is no \u escape */
    assert_int_equal(wp_payload_parse(&p, "{\"key\": {\"k\": \"\\\\ud83d\"}}", err, sizeof err), 0);
    assert_string_equal(p.key.fields[0].value, "\\ud83d");
    assert_int_equal(wp_payload_parse(&p, " { \"after\" : { } } ", err, sizeof err), 0);
    assert_true(p.after.present);
    assert_int_equal(p.after.n, 0);
    wp_payload_free(&p);
}

static void expect_bad(const char *text, const char *needle)
{
    wp_payload_t p = {0};
    char err[256] = "";
    if (wp_payload_parse(&p, text, err, sizeof err) == 0)
        fail_msg("accepted: %s", text);
    if (strstr(err, needle) == NULL)
        fail_msg("expected \"%s\" in: %s (input %s)", needle, err, text);
    wp_payload_free(&p);
}

static void test_bad_payloads_are_rejected(void **state)
{
    (void)state;
    expect_bad("", "at byte 0: parse error: premature EOF");
    expect_bad("[]", "expected an object");
    expect_bad("{\"after\": {\"a\": 1}", "at byte 18: parse error: premature EOF");
    expect_bad("{\"after\": {\"a\": \"x}}", "premature EOF");
    expect_bad("{\"after\": {\"a\": \"\\x\"}}", "inside a string, '\\' occurs before a character");
    expect_bad("{\"after\": {\"a\": \"\\u00zz\"}}", "non-hex");
    expect_bad("{\"after\": {\"a\": \"\\u0000\"}}", "\\u0000");
    expect_bad("{\"after\": {\"a\": \"\\ud83d\"}}", "unpaired surrogate");
    expect_bad("{\"after\": {\"a\": \"\\ude00\"}}", "unpaired surrogate");
    expect_bad("{\"after\": {\"a\": \"\\ud83d\\u0041\"}}", "at byte 17: a \\u escape is an unpaired");
    expect_bad("[]", "at byte 1: expected an object");
    expect_bad("\"x\"", "expected an object");
    expect_bad("{\"after\": {\"a\": \"\xff\"}}", "invalid bytes in UTF8 string");
    expect_bad("{\"after\": {\"a\": {\"b\": 1}}}", "expected a scalar value");
    expect_bad("{\"after\": {\"a\": [1]}}", "expected a scalar value");
    expect_bad("{\"after\": {}, \"after\": {}}", "duplicate member");
    expect_bad("{\"after\": 5}", "expected an object of column values");
    expect_bad("{\"after\": {\"a\": 1}} x", "trailing garbage");
    expect_bad("{\"after\": {\"a\": 1 \"b\": 2}}", "I expect ',' or '}'");
    expect_bad("{\"after\": {\"a\" 1}}", "separated by a colon");
}

static void test_shapes(void **state)
{
    (void)state;
    wp_tshape_t s;
    char err[256];
    assert_int_equal(wp_tshape_parse("[{\"name\": \"id\", \"type\": \"integer\", \"typeoid\": 23}, "
                                     "{\"name\": \"We\\\"ird\", \"type\": \"numeric(10,2)\", \"typeoid\": 1700}, "
                                     "{\"name\": \"e\", \"type\": \"mood\", \"typeoid\": null}]",
                                     &s, err, sizeof err),
                     0);
    assert_int_equal(s.ncols, 3);
    assert_string_equal(s.cols[1].name, "We\"ird");
    assert_string_equal(s.cols[1].type, "numeric(10,2)");
    assert_int_equal(s.cols[1].typeoid, 1700);
    assert_int_equal(s.cols[2].typeoid, -1);
    assert_int_equal(s.cols[0].position, -1); /* recorded by a walpipe before positions */
    assert_false(s.positioned);
    assert_int_equal(wp_tshape_named(&s, "e"), 2);
    assert_int_equal(wp_tshape_at(&s, 1), -1);
    wp_tshape_clear(&s);
    /* positions (attnums) as shapes carry them; key discovery may name them "attnum" */
    assert_int_equal(wp_tshape_parse("[{\"name\": \"id\", \"type\": \"integer\", \"position\": 1}, "
                                     "{\"name\": \"b\", \"type\": \"text\", \"attnum\": 4}]",
                                     &s, err, sizeof err),
                     0);
    assert_true(s.positioned);
    assert_int_equal(wp_tshape_at(&s, 4), 1);
    assert_int_equal(wp_tshape_at(&s, 2), -1);
    wp_tshape_clear(&s);
    assert_int_equal(wp_tshape_parse("[{\"name\": \"id\", \"type\": \"integer\", \"position\": 1}, "
                                     "{\"name\": \"b\", \"type\": \"text\", \"position\": 0}]",
                                     &s, err, sizeof err),
                     0);
    assert_false(s.positioned); /* 0 is no attnum */
    wp_tshape_clear(&s);
    assert_int_equal(wp_tshape_parse("{}", &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "not a JSON array"));
    assert_int_equal(wp_tshape_parse("[{\"name\": 1}]", &s, err, sizeof err), -1);
    assert_non_null(strstr(err, "column 1 has no name or type"));
    assert_null(s.cols);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values_keep_their_text),
        cmocka_unit_test(test_other_members_are_skipped),
        cmocka_unit_test(test_bad_payloads_are_rejected),
        cmocka_unit_test(test_shapes),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
