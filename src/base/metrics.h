/*
 * metrics.h: the process's metrics registry (counters, gauges, histograms),
 * rendered in the Prometheus text format.
 *
 * A series is a metric name plus its label values.  wp_metric() finds or
 * creates one (under the registry's mutex, allocating on first use only);
 * callers on a hot path look their series up once and keep the pointer,
 * which stays valid until wp_metrics_reset.  Updating a counter or gauge is
 * a lock-free atomic; observing a histogram takes its own small mutex so that
 * a scrape never sees its buckets and count disagree.
 *
 * Label values are escaped here; never pass a conninfo or other secret as a
 * label value (source names, slot names, table names and kinds only).
 */
#ifndef WP_METRICS_H
#define WP_METRICS_H

#include "wp_setup.h"

#include "mem.h"

typedef enum wp_metric_type {
    WP_METRIC_COUNTER,
    WP_METRIC_GAUGE,
    WP_METRIC_HISTOGRAM, /* buckets: WP_METRIC_LATENCY_BUCKETS, in seconds */
} wp_metric_type_t;

typedef struct wp_metric wp_metric_t;

/*
 * The series of metric name with the labels given as NULL-terminated
 * (label name, value) pairs of strings, created on first use.  type and help
 * must be the same at every call for a name.  Never NULL; owned by the registry.
 */
wp_metric_t *wp_metric(wp_metric_type_t type, const char *name, const char *help, ...);

/* Counter or gauge: adds v (a counter only ever gets v >= 0). */
void wp_metric_add(wp_metric_t *metric, double v);
/* Gauge: sets v. */
void wp_metric_set(wp_metric_t *metric, double v);
/* Histogram: n observations of value v. */
void wp_metric_observe(wp_metric_t *metric, double v, uint64_t n);
/* Counter or gauge: the current value; histogram: the count of observations. */
double wp_metric_value(wp_metric_t *metric);

/* Appends every metric in the Prometheus text format 0.0.4 (HELP and TYPE once per name) to out. */
void wp_metrics_render(wp_buf_t *out);

/* Frees every series (at exit, and between unit tests); no series pointer may be used after. */
void wp_metrics_reset(void);

#endif /* WP_METRICS_H */
