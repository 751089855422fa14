/*
 * filter.h: a source's table exclusions, column filters and masks, compiled
 * once from its configuration and applied to every change and snapshot row
 * before it is staged (README "Filters and masking").
 *
 * A compiled filter is immutable and may be shared by threads (the reader,
 * the snapshot workers); the caller keeps it alive while any decoder uses it.
 */
#ifndef WP_FILTER_H
#define WP_FILTER_H

#include "wp_setup.h"

#include <libpq-fe.h>

#include "config.h"
#include "mem.h"

typedef struct wp_filter wp_filter_t;
typedef struct wp_filter_table wp_filter_table_t;

/* What becomes of one column of a table. */
typedef enum wp_filter_action {
    WP_FILTER_KEEP = 0,
    WP_FILTER_DROP,   /* excluded (or not included): absent from payloads and shapes */
    WP_FILTER_SHA256, /* masked: hex SHA-256 of salt || text, as text */
    WP_FILTER_REDACT, /* masked: WP_FILTER_REDACTED, as text */
    WP_FILTER_NULL,   /* masked: NULL, type kept */
} wp_filter_action_t;

/* What a redact mask stages in place of every non-NULL value. */
#define WP_FILTER_REDACTED "***"
#define WP_FILTER_SHA256_HEX 64

/* Compiles source's rules; borrows nothing from source afterwards.  Never NULL. */
wp_filter_t *wp_filter_create(const wp_source_config_t *source);
void wp_filter_destroy(wp_filter_t *filter); /* NULL is a no-op */

/* The column rules of one table, or NULL when it has none (every column kept as is). */
const wp_filter_table_t *wp_filter_table(const wp_filter_t *filter, const char *schema, size_t slen,
                                         const char *table, size_t tlen);

/* True when the source has any [table] section (a change of an unnamed table may still belong to one). */
bool wp_filter_has_rules(const wp_filter_t *filter);

wp_filter_action_t wp_filter_column(const wp_filter_table_t *table, const char *name, size_t len);

/*
 * Writes the lower-case hex SHA-256 of the source's mask_salt followed by
 * the len bytes of text (prefix first when not NULL) into out, NUL-terminated.
 */
void wp_filter_sha256(const wp_filter_t *filter, const char *prefix, const char *text, size_t len,
                      char out[WP_FILTER_SHA256_HEX + 1]);

/*
 * For a copy of the source's catalog in staging (a column's name, type and
 * a value such as its ADD COLUMN default, as text): false when the column
 * must not be copied at all (its table is in exclude_tables, or the column is
 * excluded or not included); otherwise *type and *value (NULL = SQL NULL)
 * are replaced as the stream stages the column: a sha256 mask's digest
 * (written into digest) or "***", each with type "text"; NULL for a null mask.
 */
bool wp_filter_catalog_column(const wp_filter_t *filter, const char *schema, const char *table, const char *column,
                              const char **type, const char **value, char digest[WP_FILTER_SHA256_HEX + 1]);

/*
 * Refuses, at start, column rules that touch a key: reads from the source's
 * catalog (conn: a plain or replication=database connection, simple
 * queries only) the columns of each ruled table's primary key, replica
 * identity index and the unique index the mirror would key on, and fails
 * when one is excluded, not included or masked.  Tables that do not exist
 * are skipped.  Returns 0; 1 when refused, logged once (naming the source,
 * table, column and the fix); -1 when the catalog could not be read (logged).
 */
int wp_filter_check_keys(const wp_filter_t *filter, PGconn *conn);

/* As wp_filter_check_keys, logging nothing: the problem (and, when refused, the fix) appended to the buffers. */
int wp_filter_key_conflict(const wp_filter_t *filter, PGconn *conn, wp_buf_t *problem, wp_buf_t *fix);

#endif /* WP_FILTER_H */
