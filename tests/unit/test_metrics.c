/*
 * test_metrics.c: the metrics registry renders the Prometheus text format:
 * HELP and TYPE once per name, escaped label values, cumulative histogram
 * buckets that agree with _count, and exact counts under concurrent updates.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <pthread.h>
#include <string.h>

#include "metrics.h"

static void test_render(void **state)
{
    (void)state;
    wp_metric_t *a = wp_metric(WP_METRIC_COUNTER, "t_events_total", "Events\nseen", "source", "a\"b\\c\nd", NULL);
    wp_metric_t *b = wp_metric(WP_METRIC_COUNTER, "t_events_total", "Events\nseen", "source", "b", NULL);
    assert_ptr_equal(a, wp_metric(WP_METRIC_COUNTER, "t_events_total", "Events\nseen", "source", "a\"b\\c\nd", NULL));
    wp_metric_add(a, 3);
    wp_metric_add(b, 1);
    wp_metric_set(wp_metric(WP_METRIC_GAUGE, "t_ratio", "R", NULL), 0.5);
    wp_metric_t *h = wp_metric(WP_METRIC_HISTOGRAM, "t_latency_seconds", "L", "source", "a", NULL);
    wp_metric_observe(h, 0.003, 2);
    wp_metric_observe(h, 0.2, 1);
    wp_metric_observe(h, 1000, 1);
    wp_buf_t out = WP_BUF_INIT;
    wp_metrics_render(&out);
    wp_buf_append(&out, "", 0);
    const char *text = out.data;
    assert_non_null(strstr(text, "# HELP t_events_total Events\\nseen\n# TYPE t_events_total counter\n"
                                 "t_events_total{source=\"a\\\"b\\\\c\\nd\"} 3\nt_events_total{source=\"b\"} 1\n"));
    assert_non_null(strstr(text, "# TYPE t_ratio gauge\nt_ratio 0.5\n"));
    assert_non_null(strstr(text, "t_latency_seconds_bucket{source=\"a\",le=\"0.005\"} 2\n"));
    assert_non_null(strstr(text, "t_latency_seconds_bucket{source=\"a\",le=\"0.1\"} 2\n"));
    assert_non_null(strstr(text, "t_latency_seconds_bucket{source=\"a\",le=\"0.25\"} 3\n"));
    assert_non_null(strstr(text, "t_latency_seconds_bucket{source=\"a\",le=\"300\"} 3\n"));
    assert_non_null(strstr(text, "t_latency_seconds_bucket{source=\"a\",le=\"+Inf\"} 4\n"));
    assert_non_null(strstr(text, "t_latency_seconds_count{source=\"a\"} 4\n"));
    assert_non_null(strstr(text, "t_latency_seconds_sum{source=\"a\"} 1000.206"));
    /* HELP once per name */
    assert_ptr_equal(strstr(text, "# HELP t_events_total"), strstr(text, "# HELP t_events"));
    assert_null(strstr(strstr(text, "# HELP t_events_total") + 1, "# HELP t_events_total"));
    assert_int_equal(text[out.len - 1], '\n');
    wp_buf_free(&out);
    wp_metrics_reset();
}

static void *adder(void *arg)
{
    wp_metric_t *m = arg;
    for (int i = 0; i < 100000; i++)
        wp_metric_add(m, 1);
    return NULL;
}

static void test_concurrent_adds(void **state)
{
    (void)state;
    wp_metric_t *m = wp_metric(WP_METRIC_COUNTER, "t_adds_total", "A", NULL);
    pthread_t t[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, adder, m);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    assert_true(wp_metric_value(m) == 400000.0);
    wp_metrics_reset();
}

int main(void)
{
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_render), cmocka_unit_test(test_concurrent_adds)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
