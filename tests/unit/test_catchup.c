/*
 * test_catchup.c: the catch-up tracker (src/ops/catchup.c): when a source
 * counts as catching up and as caught up, its net rate and time left.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <string.h>

#include <cmocka.h>

#include "catchup.h"

#define MB (1024LL * 1024)
#define T0 1000000 /* a monotonic clock's ms */

static void test_enters_at_64mb(void **state)
{
    (void)state;
    wp_catchup_t c;
    memset(&c, 0, sizeof c);
    assert_int_equal(wp_catchup_behind(&c), -1);
    assert_int_equal(wp_catchup_update(&c, T0, 1000 * MB, 1000 * MB - 64 * MB + 1), WP_CATCHUP_NOTHING);
    assert_false(c.catching_up);
    assert_int_equal(wp_catchup_behind(&c), 64 * MB - 1);
    assert_int_equal(wp_catchup_update(&c, T0 + 1000, 1001 * MB, 1000 * MB - 63 * MB), WP_CATCHUP_STARTED);
    assert_true(c.catching_up);
    assert_int_equal(wp_catchup_update(&c, T0 + 2000, 1001 * MB, 1000 * MB - 62 * MB), WP_CATCHUP_NOTHING);
    assert_true(c.catching_up);
}

static void test_rate_is_net_of_what_the_source_writes(void **state)
{
    (void)state;
    wp_catchup_t c;
    memset(&c, 0, sizeof c);
    /* staging 10 MB/s while the source writes 2 MB/s: 8 MB/s net */
    for (int i = 0; i <= 20; i++)
        wp_catchup_update(&c, T0 + i * 1000, 1000 * MB + i * 2 * MB, 800 * MB + i * 10 * MB);
    assert_true(c.catching_up);
    int64_t behind = wp_catchup_behind(&c);
    assert_int_equal(behind, 1040 * MB - 1000 * MB);
    wp_catchup_rate_t r = wp_catchup_rate(&c, 10000);
    assert_true(r.known);
    assert_true(r.seconds == 10.0);
    assert_true(r.staged == 10.0 * MB && r.written == 2.0 * MB && r.net == 8.0 * MB);
    assert_true(wp_catchup_eta(behind, &r) == 5.0);
    /* a window holding the newest sample only, or one under a second: no rate */
    assert_false(wp_catchup_rate(&c, 999).known);
    /* not shrinking: no time left */
    r.net = 0;
    assert_true(wp_catchup_eta(behind, &r) == -1);
    r.net = -1;
    assert_true(wp_catchup_eta(behind, &r) == -1);
    assert_true(wp_catchup_eta(0, &r) == 0);
}

static void test_caught_up_only_when_live_again(void **state)
{
    (void)state;
    wp_catchup_t c;
    memset(&c, 0, sizeof c);
    assert_int_equal(wp_catchup_update(&c, T0, 200 * MB, 100 * MB), WP_CATCHUP_STARTED);
    /* 10 MB behind on a quiet source: under 16 MB, but not all the source wrote 3 s ago is staged */
    assert_int_equal(wp_catchup_update(&c, T0 + 1000, 200 * MB, 190 * MB), WP_CATCHUP_NOTHING);
    assert_true(c.catching_up);
    assert_int_equal(wp_catchup_update(&c, T0 + 2000, 200 * MB, 200 * MB), WP_CATCHUP_DONE);
    assert_false(c.catching_up);
    assert_true(wp_catchup_seconds(&c) == 2.0);
    assert_int_equal(wp_catchup_consumed(&c), 100 * MB);

    /* a busy source (2 MB/s) 4 MB behind: caught up once it staged what the source had 3 s ago */
    memset(&c, 0, sizeof c);
    assert_int_equal(wp_catchup_update(&c, T0, 300 * MB, 100 * MB), WP_CATCHUP_STARTED);
    assert_int_equal(wp_catchup_update(&c, T0 + 1000, 302 * MB, 290 * MB), WP_CATCHUP_NOTHING);
    assert_int_equal(wp_catchup_update(&c, T0 + 2000, 304 * MB, 299 * MB), WP_CATCHUP_NOTHING);
    assert_int_equal(wp_catchup_update(&c, T0 + 3000, 306 * MB, 299 * MB), WP_CATCHUP_NOTHING);
    assert_int_equal(wp_catchup_update(&c, T0 + 4000, 308 * MB, 304 * MB), WP_CATCHUP_DONE);
}

static void test_positions_going_backwards(void **state)
{
    (void)state;
    wp_catchup_t c;
    memset(&c, 0, sizeof c);
    assert_int_equal(wp_catchup_update(&c, T0, 200 * MB, 100 * MB), WP_CATCHUP_STARTED);
    /* a look without staging's checkpoint (only the slot's older confirmed_flush_lsn): keeps the last */
    assert_int_equal(wp_catchup_update(&c, T0 + 1000, 200 * MB, 50 * MB), WP_CATCHUP_NOTHING);
    assert_int_equal(wp_catchup_behind(&c), 100 * MB);
    assert_true(c.catching_up);
    /* the source's WAL going backwards is another server: start over */
    assert_int_equal(wp_catchup_update(&c, T0 + 2000, 10 * MB, 9 * MB), WP_CATCHUP_NOTHING);
    assert_false(c.catching_up);
    assert_int_equal(c.n, 1);
}

static void test_staged_lsn(void **state)
{
    (void)state;
    wp_probe_source_t p;
    memset(&p, 0, sizeof p);
    assert_int_equal(wp_catchup_staged_lsn(&p), WP_LSN_INVALID);
    p.has_checkpoint = true;
    p.checkpoint_lsn = 500;
    assert_int_equal(wp_catchup_staged_lsn(&p), 500);
    p.slot_exists = true;
    p.confirmed_flush = 400;
    assert_int_equal(wp_catchup_staged_lsn(&p), 500);
    p.confirmed_flush = 600; /* keepalives confirmed WAL past the last staged change */
    assert_int_equal(wp_catchup_staged_lsn(&p), 600);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_enters_at_64mb),
        cmocka_unit_test(test_rate_is_net_of_what_the_source_writes),
        cmocka_unit_test(test_caught_up_only_when_live_again),
        cmocka_unit_test(test_positions_going_backwards),
        cmocka_unit_test(test_staged_lsn),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
