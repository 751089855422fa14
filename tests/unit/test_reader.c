/*
 * test_reader.c: the form an exported snapshot name must have before
 * walpipe splices it, quoted, into SET TRANSACTION SNAPSHOT (the one
 * statement that takes no parameter).
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_snapshot_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
