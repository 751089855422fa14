/*
 * metrics.c: the metrics registry (see metrics.h).
 *
 * Invariant: families and series are only ever appended (until
 * wp_metrics_reset), so a series pointer handed out stays valid and a scrape
 * walks the lists under the registry mutex while writers update values with
 * atomics.  A gauge or counter keeps its double's bits in an atomic uint64.
 */
#include "wp_setup.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metrics.h"

static const double latency_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300};
#define NBUCKETS (sizeof latency_buckets / sizeof latency_buckets[0])

struct wp_metric {
    struct family *family;
    char *labels; /* owned: rendered label pairs without braces, "" for none */
    _Atomic uint64_t bits; /* counter or gauge value, a double's bits */
    pthread_mutex_t mu;    /* histogram only */
    uint64_t buckets[NBUCKETS + 1]; /* non-cumulative counts; the last is +Inf */
    double sum;
    struct wp_metric *next;
};

typedef struct family {
    wp_metric_type_t type;
    char *name; /* owned */
    char *help; /* owned */
    wp_metric_t *series, *tail;
    struct family *next;
} family_t;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static family_t *families, *families_tail;

static uint64_t to_bits(double v)
{
    uint64_t b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static double from_bits(uint64_t b)
{
    double v;
    memcpy(&v, &b, sizeof v);
    return v;
}

/* Appends s to out with Prometheus label value escaping (\\, \", \n). */
static void put_escaped(wp_buf_t *out, const char *s, bool quote_too)
{
    for (; *s; s++) {
        if (*s == '\\')
            wp_buf_puts(out, "\\\\");
        else if (*s == '\n')
            wp_buf_puts(out, "\\n");
        else if (*s == '"' && quote_too)
            wp_buf_puts(out, "\\\"");
        else
            wp_buf_putc(out, *s);
    }
}

static family_t *find_family(wp_metric_type_t type, const char *name, const char *help)
{
    for (family_t *f = families; f; f = f->next)
        if (strcmp(f->name, name) == 0)
            return f;
    family_t *f = wp_calloc(1, sizeof *f);
    f->type = type;
    f->name = wp_strdup(name);
    f->help = wp_strdup(help);
    if (families_tail)
        families_tail->next = f;
    else
        families = f;
    families_tail = f;
    return f;
}

wp_metric_t *wp_metric(wp_metric_type_t type, const char *name, const char *help, ...)
{
    wp_buf_t labels = WP_BUF_INIT;
    va_list ap;
    va_start(ap, help);
    for (const char *k; (k = va_arg(ap, const char *)) != NULL;) {
        const char *v = va_arg(ap, const char *);
        if (labels.len)
            wp_buf_putc(&labels, ',');
        wp_buf_printf(&labels, "%s=\"", k);
        put_escaped(&labels, v ? v : "", true);
        wp_buf_putc(&labels, '"');
    }
    va_end(ap);
    wp_buf_append(&labels, "", 0);

    pthread_mutex_lock(&registry_mu);
    family_t *f = find_family(type, name, help);
    wp_metric_t *m = f->series;
    while (m && strcmp(m->labels, labels.data ? labels.data : "") != 0)
        m = m->next;
    if (m == NULL) {
        m = wp_calloc(1, sizeof *m);
        m->family = f;
        m->labels = labels.data ? labels.data : wp_strdup("");
        labels.data = NULL;
        atomic_init(&m->bits, to_bits(0.0));
        pthread_mutex_init(&m->mu, NULL);
        if (f->tail)
            f->tail->next = m;
        else
            f->series = m;
        f->tail = m;
    }
    pthread_mutex_unlock(&registry_mu);
    wp_buf_free(&labels);
    return m;
}

void wp_metric_add(wp_metric_t *metric, double v)
{
    uint64_t old = atomic_load(&metric->bits);
    while (!atomic_compare_exchange_weak(&metric->bits, &old, to_bits(from_bits(old) + v)))
        ;
}

void wp_metric_set(wp_metric_t *metric, double v)
{
    atomic_store(&metric->bits, to_bits(v));
}

void wp_metric_observe(wp_metric_t *metric, double v, uint64_t n)
{
    size_t i = 0;
    while (i < NBUCKETS && !(v <= latency_buckets[i]))
        i++;
    pthread_mutex_lock(&metric->mu);
    metric->buckets[i] += n;
    metric->sum += v * (double)n;
    pthread_mutex_unlock(&metric->mu);
}

double wp_metric_value(wp_metric_t *metric)
{
    if (metric->family->type != WP_METRIC_HISTOGRAM)
        return from_bits(atomic_load(&metric->bits));
    uint64_t count = 0;
    pthread_mutex_lock(&metric->mu);
    for (size_t i = 0; i <= NBUCKETS; i++)
        count += metric->buckets[i];
    pthread_mutex_unlock(&metric->mu);
    return (double)count;
}

static void put_value(wp_buf_t *out, double v)
{
    if (isnan(v))
        wp_buf_puts(out, "NaN");
    else if (isinf(v))
        wp_buf_puts(out, v > 0 ? "+Inf" : "-Inf");
    else if (v == floor(v) && fabs(v) < 9e15)
        wp_buf_put_i64(out, (int64_t)v);
    else
        wp_buf_printf(out, "%.17g", v);
}

/* name{labels[,extra]} with the braces left out when there is no label at all. */
static void put_series(wp_buf_t *out, const char *name, const char *suffix, const char *labels, const char *extra)
{
    wp_buf_puts(out, name);
    wp_buf_puts(out, suffix);
    if (labels[0] || extra) {
        wp_buf_putc(out, '{');
        wp_buf_puts(out, labels);
        if (extra) {
            if (labels[0])
                wp_buf_putc(out, ',');
            wp_buf_puts(out, extra);
        }
        wp_buf_putc(out, '}');
    }
    wp_buf_putc(out, ' ');
}

static void render_histogram(wp_buf_t *out, const family_t *f, wp_metric_t *m)
{
    uint64_t buckets[NBUCKETS + 1];
    double sum;
    pthread_mutex_lock(&m->mu);
    memcpy(buckets, m->buckets, sizeof buckets);
    sum = m->sum;
    pthread_mutex_unlock(&m->mu);
    uint64_t cumulative = 0;
    char le[48];
    for (size_t i = 0; i <= NBUCKETS; i++) {
        cumulative += buckets[i];
        if (i < NBUCKETS)
            snprintf(le, sizeof le, "le=\"%g\"", latency_buckets[i]);
        else
            snprintf(le, sizeof le, "le=\"+Inf\"");
        put_series(out, f->name, "_bucket", m->labels, le);
        put_value(out, (double)cumulative);
        wp_buf_putc(out, '\n');
    }
    put_series(out, f->name, "_sum", m->labels, NULL);
    put_value(out, sum);
    wp_buf_putc(out, '\n');
    put_series(out, f->name, "_count", m->labels, NULL);
    put_value(out, (double)cumulative);
    wp_buf_putc(out, '\n');
}

void wp_metrics_render(wp_buf_t *out)
{
    static const char *const type_names[] = {"counter", "gauge", "histogram"};
    pthread_mutex_lock(&registry_mu);
    for (const family_t *f = families; f; f = f->next) {
        wp_buf_printf(out, "# HELP %s ", f->name);
        put_escaped(out, f->help, false);
        wp_buf_printf(out, "\n# TYPE %s %s\n", f->name, type_names[f->type]);
        for (wp_metric_t *m = f->series; m; m = m->next) {
            if (f->type == WP_METRIC_HISTOGRAM) {
                render_histogram(out, f, m);
                continue;
            }
            put_series(out, f->name, "", m->labels, NULL);
            put_value(out, from_bits(atomic_load(&m->bits)));
            wp_buf_putc(out, '\n');
        }
    }
    pthread_mutex_unlock(&registry_mu);
}

void wp_metrics_reset(void)
{
    pthread_mutex_lock(&registry_mu);
    for (family_t *f = families, *fn; f; f = fn) {
        fn = f->next;
        for (wp_metric_t *m = f->series, *mn; m; m = mn) {
            mn = m->next;
            pthread_mutex_destroy(&m->mu);
            free(m->labels);
            free(m);
        }
        free(f->name);
        free(f->help);
        free(f);
    }
    families = families_tail = NULL;
    pthread_mutex_unlock(&registry_mu);
}
