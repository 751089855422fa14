/*
 * exporter.h: the [metrics] listener: serves the metrics registry as
 * Prometheus text on GET /metrics (libmicrohttpd, its own thread).
 */
#ifndef WP_EXPORTER_H
#define WP_EXPORTER_H

#include "wp_setup.h"

#include "config.h"

typedef struct wp_exporter wp_exporter_t;

/*
 * Starts listening on config->metrics_listen.  Returns NULL when it is not
 * set (nothing to do; *failed false) or when the address cannot be bound
 * (logged; *failed true).
 */
wp_exporter_t *wp_exporter_start(const wp_config_t *config, bool *failed);

/* Stops listening; NULL is a no-op. */
void wp_exporter_stop(wp_exporter_t *exporter);

#endif /* WP_EXPORTER_H */
