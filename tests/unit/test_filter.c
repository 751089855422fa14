/*
 * test_filter.c: what becomes of a column under a source's filters and
 * masks (filter.h), for catalog copies: the same rules and digests as the
 * stream (the stream's are checked against hashlib in test_filters.py).
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "filter.h"

static void test_catalog_columns(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *c = wp_config_parse_string("[staging]\nconninfo = host=s\n[source app]\nconninfo = host=a\n"
                                            "exclude_tables = public.audit\nmask_salt = 0123456789abcdef\n"
                                            "[table app.public.users]\nexclude_columns = ssn\n"
                                            "mask = email:sha256, phone:redact, notes:null\n"
                                            "[table app.public.wide]\ninclude_columns = id\n",
                                            "t.ini", err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    wp_filter_t *f = wp_filter_create(&c->sources[0]);
    char digest[WP_FILTER_SHA256_HEX + 1];
    const char *type = "integer", *value = "42";

    assert_true(wp_filter_catalog_column(f, "public", "users", "id", &type, &value, digest));
    assert_string_equal(type, "integer");
    assert_string_equal(value, "42");
    assert_false(wp_filter_catalog_column(f, "public", "users", "ssn", &type, &value, digest));
    assert_false(wp_filter_catalog_column(f, "public", "audit", "id", &type, &value, digest));
    assert_false(wp_filter_catalog_column(f, "public", "wide", "other", &type, &value, digest));
    assert_true(wp_filter_catalog_column(f, "public", "wide", "id", &type, &value, digest));
    assert_true(wp_filter_catalog_column(f, "public", "other", "ssn", &type, &value, digest));

    /* sha256("0123456789abcdef" "a@b"), computed with: printf %s 0123456789abcdefa@b | sha256sum */
    type = "character varying(100)";
    value = "a@b";
    assert_true(wp_filter_catalog_column(f, "public", "users", "email", &type, &value, digest));
    assert_string_equal(type, "text");
    assert_string_equal(value, "e66a60c661c62bd173317b7cc453fa5999809aeea06844b9e65eff8e764b2fa9");
    type = "integer";
    value = NULL;
    assert_true(wp_filter_catalog_column(f, "public", "users", "email", &type, &value, digest));
    assert_null(value);
    value = "555";
    assert_true(wp_filter_catalog_column(f, "public", "users", "phone", &type, &value, digest));
    assert_string_equal(value, WP_FILTER_REDACTED);
    type = "integer";
    value = "7";
    assert_true(wp_filter_catalog_column(f, "public", "users", "notes", &type, &value, digest));
    assert_null(value);
    assert_string_equal(type, "integer");
    wp_filter_destroy(f);
    wp_config_destroy(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_catalog_columns),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
