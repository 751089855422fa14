/*
 * test_lsn.c: wp_lsn_parse / wp_lsn_format.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <string.h>

#include <cmocka.h>

#include <walpipe/lsn.h>

static bool parse(const char *s, wp_lsn_t *out)
{
    return wp_lsn_parse(s, strlen(s), out);
}

static void test_round_trip(void **state)
{
    (void)state;
    static const char *const texts[] = {
        "0/0", "0/1", "1/0", "16/B374D848", "FFFFFFFF/FFFFFFFF", "ABCDEF01/23456789", "A/FFFFFFFF",
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        wp_lsn_t lsn = 12345;
        char buf[WP_LSN_STRLEN];
        assert_true(parse(texts[i], &lsn));
        assert_string_equal(wp_lsn_format(lsn, buf), texts[i]);
    }
}

static void test_values(void **state)
{
    (void)state;
    wp_lsn_t lsn = 99;
    char buf[WP_LSN_STRLEN];

    assert_true(parse("0/0", &lsn));
    assert_int_equal(lsn, WP_LSN_INVALID);
    assert_true(parse("FFFFFFFF/FFFFFFFF", &lsn));
    assert_true(lsn == UINT64_MAX);
    assert_true(parse("16/b374d848", &lsn));
    assert_true(lsn == UINT64_C(0x16B374D848));
    assert_string_equal(wp_lsn_format(lsn, buf), "16/B374D848");
    assert_true(parse("00000001/00000002", &lsn));
    assert_true(lsn == UINT64_C(0x100000002));
    assert_string_equal(wp_lsn_format(lsn, buf), "1/2");
    assert_string_equal(wp_lsn_format(UINT64_MAX, buf), "FFFFFFFF/FFFFFFFF");
    assert_int_equal(strlen(buf) + 1, WP_LSN_STRLEN);
}

static void test_rejects(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",   "/",   "1/",   "/1",   "123456789/0", "0/123456789", "1/2x",  " 1/2", "1/2 ", "1//2",
        "g/1", "1/g", "1\\2", "-1/2", "+1/2",       "0x1/2",       "1/0x2", "1",    "1/2/3",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        wp_lsn_t lsn = 777;
        if (parse(bad[i], &lsn))
            fail_msg("accepted \"%s\"", bad[i]);
        assert_int_equal(lsn, 777); /* untouched on failure */
    }
    wp_lsn_t lsn = 777;
    assert_false(wp_lsn_parse(NULL, 0, &lsn));
    assert_false(wp_lsn_parse("1/2", 0, &lsn));
    assert_int_equal(lsn, 777);
}

/* len bounds the read: the text need not be NUL-terminated. */
static void test_length_bound(void **state)
{
    (void)state;
    wp_lsn_t lsn = 0;
    const char text[] = {'A', 'B', '/', 'C', 'D', 'E', 'F'}; /* no NUL */

    assert_true(wp_lsn_parse(text, sizeof text, &lsn));
    assert_true(lsn == UINT64_C(0xAB0000CDEF));
    assert_true(wp_lsn_parse("1/23zzz", 4, &lsn));
    assert_true(lsn == UINT64_C(0x100000023));
    assert_false(wp_lsn_parse("1/2", 2, &lsn));        /* "1/" */
    assert_true(wp_lsn_parse("1/2\0" "5", 3, &lsn));   /* stops before the NUL */
    assert_false(wp_lsn_parse("1/2\0" "5", 5, &lsn));  /* a NUL inside len is junk */
}

static void test_ordering(void **state)
{
    (void)state;
    static const char *const sorted[] = {
        "0/0", "0/1", "0/FFFFFFFF", "1/0", "1/1", "A/0", "10/0", "FFFFFFFF/FFFFFFFE", "FFFFFFFF/FFFFFFFF",
    };
    size_t n = sizeof sorted / sizeof sorted[0];
    for (size_t i = 0; i + 1 < n; i++) {
        wp_lsn_t a, b;
        assert_true(parse(sorted[i], &a));
        assert_true(parse(sorted[i + 1], &b));
        if (!(a < b))
            fail_msg("%s should sort before %s", sorted[i], sorted[i + 1]);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip), cmocka_unit_test(test_values),  cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_length_bound), cmocka_unit_test(test_ordering),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
