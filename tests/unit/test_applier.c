/*
 * test_applier.c: the reason an event fails with (wp_event_fail), which goes
 * into walpipe.dead_letters and so must be valid UTF-8 however it is cut.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "applier.h"
#include "mem.h"
#include "utf8.h"

/* A reason of prefix ASCII bytes followed by 3-byte characters (U+20AC), far longer than ev->error. */
static void long_reason(wp_buf_t *b, size_t prefix)
{
    wp_buf_reset(b);
    wp_buf_append(b, "", 0);
    for (size_t i = 0; i < prefix; i++)
        wp_buf_putc(b, 'x');
    for (int i = 0; i < 300; i++)
        wp_buf_puts(b, "\xe2\x82\xac");
}

static void test_cut_on_a_character_boundary(void **state)
{
    (void)state;
    wp_buf_t b = WP_BUF_INIT;
    /* every offset of the cut inside a 3-byte character, and on a boundary */
    for (size_t prefix = 0; prefix < 3; prefix++) {
        wp_event_t ev = {0};
        long_reason(&b, prefix);
        wp_event_fail(&ev, WP_FAIL_RETRY, "DETAIL: %s", b.data);
        size_t len = strlen(ev.error);
        assert_int_equal(ev.fail, WP_FAIL_RETRY);
        assert_true(wp_utf8_valid((const unsigned char *)ev.error, len));
        assert_true(len < sizeof ev.error);
        assert_true(len >= sizeof ev.error - 3); /* cut at most one character short */
        assert_memory_equal(ev.error, "DETAIL: ", 8);
        assert_memory_equal(ev.error + 8, b.data, len - 8);
    }
    wp_buf_free(&b);
}

static void test_invalid_bytes_are_replaced(void **state)
{
    (void)state;
    wp_event_t ev = {0};
    /* a cut character and a stray continuation byte, as a clipped server message could carry */
    wp_event_fail(&ev, WP_FAIL_PARK, "bad %s and %s end", "\xe2\x82", "\x80");
    assert_int_equal(ev.fail, WP_FAIL_PARK);
    assert_true(wp_utf8_valid((const unsigned char *)ev.error, strlen(ev.error)));
    assert_string_equal(ev.error, "bad ?? and ? end");
}

static void test_short_reason_kept_whole(void **state)
{
    (void)state;
    wp_event_t ev = {0};
    wp_event_fail(&ev, WP_FAIL_DEFER, "column \"%s\" of %d", "\xc3\xa9t\xc3\xa9", 42);
    assert_int_equal(ev.fail, WP_FAIL_DEFER);
    assert_string_equal(ev.error, "column \"\xc3\xa9t\xc3\xa9\" of 42");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cut_on_a_character_boundary),
        cmocka_unit_test(test_invalid_bytes_are_replaced),
        cmocka_unit_test(test_short_reason_kept_whole),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
