/*
 * test_reader.c: the form an exported snapshot name must have before
 * walpipe splices it, quoted, into SET TRANSACTION SNAPSHOT (the one
 * statement that takes no parameter).
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "reader.h"

static void test_snapshot_names(void **state)
{
    (void)state;
    /* what PostgreSQL 15 exports: "%08X-%08X-%d" */
    assert_true(wp_reader_snapshot_name_valid("00000003-00000002-1"));
    assert_true(wp_reader_snapshot_name_valid("0000000A-0000BEEF-12"));
    static const char *const bad[] = {
        "",
        "-1",
        "00000003-00000002-1'; DROP TABLE walpipe.raw_events; --",
        "00000003-00000002-1' ",
        "00000003 00000002 1",
        "00000003-00000002-1\n",
        "0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0", /* 65: too long */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (wp_reader_snapshot_name_valid(bad[i]))
            fail_msg("accepted snapshot name \"%s\"", bad[i]);
}

static void check_dropped(const char *message, bool update, const char *schema, const char *table,
                          const char *names)
{
    bool is_update = !update;
    char *s, *t, *n;
    assert_true(wp_reader_parse_dropped(message, &is_update, &s, &t, &n));
    assert_int_equal(is_update, update);
    if (schema) {
        assert_non_null(s);
        assert_string_equal(s, schema);
        assert_string_equal(t, table);
    } else {
        assert_null(s);
        assert_null(t);
    }
    assert_string_equal(n, names);
    free(s);
    free(t);
    free(n);
}

/* wal2json's notice of a dropped change names the table "%s"."%s", unescaped */
static void test_dropped_notices(void **state)
{
    (void)state;
    check_dropped("no tuple identifier for UPDATE in table \"public\".\"t\"", true, "public", "t",
                  "\"public\".\"t\"");
    check_dropped("no tuple identifier for DELETE in table \"we.ird\".\"t\"x.\xc3\xbc\"", false, "we.ird",
                  "t\"x.\xc3\xbc", "\"we.ird\".\"t\"x.\xc3\xbc\"");
    check_dropped("no tuple identifier for DELETE in table \"\".\"\"", false, "", "", "\"\".\"\"");
    /* splits two ways: left to staging, which knows the tables */
    check_dropped("no tuple identifier for UPDATE in table \"x\".\"y\".\"z\"", true, NULL, NULL,
                  "\"x\".\"y\".\"z\"");
    check_dropped("no tuple identifier for UPDATE in table public.t", true, NULL, NULL, "public.t");
    static const char *const other[] = {
        "no tuple data for UPDATE in table \"public\".\"t\"",
        "no tuple identifier for INSERT in table \"public\".\"t\"",
        "no tuple identifier for UPDATE on table \"public\".\"t\"",
        "",
    };
    for (size_t i = 0; i < sizeof other / sizeof other[0]; i++) {
        bool u;
        char *s, *t, *n;
        assert_false(wp_reader_parse_dropped(other[i], &u, &s, &t, &n));
        assert_null(n);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_snapshot_names),
        cmocka_unit_test(test_dropped_notices),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
