/*
 * session.h: one plugin session of a sink: tickets out, durability back.
 *
 * The core gives every delivered event a ticket (strictly increasing over
 * the session) and remembers, per ticket, which source and place in that
 * source's order it stands for.  When the plugin reports the highest ticket
 * below which everything is durable, wp_session_settle hands back, in
 * order, the places that became durable: only those may become a position.
 * Filtered-out events ride on the ticket of the last event delivered before
 * them, so a position moves over them exactly when it may.
 */
#ifndef WP_SINK_SESSION_H
#define WP_SINK_SESSION_H

#include "wp_setup.h"

#include "feed.h"
#include "loader.h"

typedef struct wp_session wp_session_t;

/* Creates a session of sink with plugin lib (borrowed); replay marks its events as a replay. */
wp_session_t *wp_session_create(const wp_sink_config_t *sink, const wp_plugin_t *lib, bool replay);
void wp_session_destroy(wp_session_t *s);

/* Opens the plugin; WP_SINK_OK, or RETRY / FATAL with the plugin's reason in err. */
int wp_session_open(wp_session_t *s, char *err, size_t errlen);
bool wp_session_is_open(const wp_session_t *s);

/* Delivers the matching rows of source number src; every row becomes a place to settle. */
int wp_session_deliver(wp_session_t *s, int src, const wp_feed_row_t *rows, int n, char *err, size_t errlen);

/* Serves the plugin for at most timeout_ms (poll), or until everything is durable (flush). */
int wp_session_poll(wp_session_t *s, int timeout_ms, char *err, size_t errlen);
int wp_session_flush(wp_session_t *s, int timeout_ms, char *err, size_t errlen);

/* Places not yet durable (rows delivered or passed, awaiting the plugin). */
size_t wp_session_pending(const wp_session_t *s);

/*
 * The next place that became durable: true with its source number, place and
 * the number of events delivered (0 or 1) up to it since the previous one.
 */
bool wp_session_settle(wp_session_t *s, int *src, wp_sink_pos_t *pos, int *delivered);

/* Closes the plugin session; places not durable are forgotten (delivered again from the position). */
void wp_session_close(wp_session_t *s);

#endif /* WP_SINK_SESSION_H */
