/*
 * pg.h: the few libpq chores every module repeats: connect with an
 * application name, run a statement and check its status, build array
 * literals, connect to staging and check its schema version.
 *
 * Invariant: every function here logs a failure once, itself, with what it
 * was doing; callers only decide what happens next.  The one exception is
 * wp_pg_connect_params, which hands its error to the caller to classify.  Nothing here logs a
 * conninfo string or a password (libpq's own messages name host, port and
 * database at most).
 */
#ifndef WP_PG_H
#define WP_PG_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include "config.h"
#include "mem.h"

/*
 * Connects to conninfo with application_name appname and, unless NULL,
 * libpq's options (e.g. "-c synchronous_commit=on").  what names the peer in
 * the error ("staging", "source \"app\"").  Returns the connection, or NULL
 * after logging why.  The caller owns the connection (PQfinish).
 */
PGconn *wp_pg_connect(const char *conninfo, const char *appname, const char *options, const char *what);

/*
 * A plain (non-replication) connection to a source for catalog reads: names
 * arrive as UTF-8 whatever the source database's encoding, and the connect
 * attempt gives up after 10 s (over the conninfo's own keys).  Returns the
 * connection whatever its status (NULL only when out of memory): the caller
 * checks PQstatus and logs the failure once, in the words of its job.
 */
PGconn *wp_pg_connect_source(const char *conninfo, const char *appname);

/* Why a connection attempt failed (wp_pg_connect_params). */
typedef struct wp_pg_conn_error {
    char sqlstate[6];    /* the SQLSTATE the server answered with, or "" (no server, refused, timeout, ...) */
    bool needs_password; /* the server asked for a password and the conninfo gave none */
    char message[512];   /* libpq's message on one line, without the SQLSTATE and LOCATION it adds */
} wp_pg_conn_error_t;

/*
 * Connects like PQconnectdbParams(keys, vals, 1), but also tells why it
 * failed: libpq (15) keeps the fields of a server's error during connection
 * startup to itself (PQresultErrorField needs a PGresult, and a failed
 * connection has none), so this asks libpq for its verbose message format and
 * reads the SQLSTATE out of that fixed layout ("SEVERITY:  SQLSTATE: text")
 * rather than out of the (possibly translated) English text.  connect_timeout,
 * when set, bounds the whole attempt; a stop request (wp_stop_requested) ends
 * it early.  Returns the connection (the caller owns it), or NULL with *err
 * filled; logs nothing.
 */
PGconn *wp_pg_connect_params(const char *const *keys, const char *const *vals, wp_pg_conn_error_t *err);

/*
 * Runs sql (no parameters) and checks that it returned commands or tuples.
 * Returns 0, or -1 after logging "<peer>: could not <what>: <error>".
 */
int wp_pg_exec(PGconn *conn, const char *peer, const char *sql, const char *what);

/* Appends a text[] literal ("{\"a\",\"b\"}", each element quoted and escaped) of items[0..n) to out. */
void wp_pg_text_array(wp_buf_t *out, const char *const *items, size_t n);

/* Appends a bigint[] literal ("{1,2,3}") of ids[0..n) to out. */
void wp_pg_int8_array(wp_buf_t *out, const int64_t *ids, size_t n);

typedef enum wp_staging_check {
    WP_STAGING_OK = 0,
    WP_STAGING_UNREACHABLE = -1, /* connection or query failed: retrying may help (logged) */
    WP_STAGING_OLD_SCHEMA = -2,  /* reachable, but older than this walpipe: `walpipe init` fixes it */
} wp_staging_check_t;

/*
 * Connects to the staging database of config and checks that its schema is
 * at the version this walpipe needs.  On WP_STAGING_OLD_SCHEMA the error
 * naming `walpipe init` is logged when old_schema_is_error, else nothing is
 * logged (the caller says it waits).  *conn is the connection on
 * WP_STAGING_OK, else NULL.
 */
wp_staging_check_t wp_pg_connect_staging(const wp_config_t *config, const char *appname, const char *options,
                                         bool old_schema_is_error, PGconn **conn);

#endif /* WP_PG_H */
