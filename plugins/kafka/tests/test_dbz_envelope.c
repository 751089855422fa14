/*
 * test_dbz_envelope.c: the Debezium envelope encoder against fixtures (STUB: the API links).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "envelope.h"

static void test_links(void **state)
{
    (void)state;
    wp_dbz_record_t r = {0};
    wp_dbz_record_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_links),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
