/*
 * decoder.h: one wal2json format-version-2 message -> one change.
 *
 * The reader hands every XLogData payload to wp_decoder_parse.  The decoder
 * validates the whole message (so later steps cannot fail on its shape) and
 * describes it as a wp_change_t whose pointers borrow from the decoder's
 * current parse: they stay valid until the next wp_decoder_parse call or
 * wp_decoder_destroy.  A message that fails validation is reported with a
 * reason for walpipe.dead_letters; the decoder never aborts on bad input.
 *
 * Payload encoding (wp_decoder_payload) is the compact row image stored in
 * walpipe.raw_events.payload:
 *   insert   {"after":{col:value,...}}
 *   update   {"after":{...},"key":{...}}     identity = replica-identity key
 *            {"after":{...},"before":{...}}  identity = whole old row (REPLICA IDENTITY FULL)
 *   delete   {"key":{...}} or {"before":{...}}
 *   truncate {}
 *   message  {"prefix":"...","content":"...","transactional":true|false}
 * Values: SQL NULL -> null; bool -> true/false; int2/int4/oid/float4/float8
 * -> JSON number (their text form round-trips through a double; a text no
 * PostgreSQL prints for them, such as 1e400, goes out as a string); int8 -> number
 * when |v| <= 2^53, else string; numeric -> string (keeps precision and scale);
 * bytea -> "\\x<hex>" (PostgreSQL's input form); everything else -> the
 * type's text output as a JSON string (json/jsonb included, kept verbatim).
 * Columns an UPDATE leaves out (unchanged TOAST) are absent from "after".
 */
#ifndef WP_DECODER_H
#define WP_DECODER_H

#include "wp_setup.h"

#include <walpipe/lsn.h>

#include "filter.h"
#include "mem.h"

typedef enum wp_op {
    WP_OP_BEGIN = 0,
    WP_OP_COMMIT,
    WP_OP_INSERT,
    WP_OP_UPDATE,
    WP_OP_DELETE,
    WP_OP_TRUNCATE,
    WP_OP_MESSAGE,
} wp_op_t;

/* "insert", "update", ... as stored in raw_events.event_type; "begin"/"commit" for the envelope. */
const char *wp_op_name(wp_op_t op);

typedef struct wp_change {
    wp_op_t op;
    bool has_xid;           /* false when absent or null (non-transactional message) */
    int64_t xid;
    const char *timestamp;  /* commit timestamp text as wal2json printed it, or NULL */
    int64_t commit_time;    /* the same in microseconds since 2000-01-01 00:00 UTC (timestamptz), when timestamp */
    wp_lsn_t lsn;           /* "lsn": change record start; B/C: commit start; M: message end */
    wp_lsn_t nextlsn;       /* B/C only: end of the commit record (what to acknowledge) */
    const char *schema;     /* I/U/D/T; NULL otherwise */
    const char *table;      /* I/U/D/T; NULL otherwise */
    size_t ncolumns;        /* I/U: entries in "columns" */
    size_t nidentity;       /* U/D: entries in "identity" */
    bool transactional;     /* M */
    const char *prefix;     /* M */
    const char *content;    /* M, may contain NUL only if the JSON escaped it */
    size_t content_len;     /* M */
} wp_change_t;

typedef struct wp_decoder wp_decoder_t;

wp_decoder_t *wp_decoder_create(void);
void wp_decoder_destroy(wp_decoder_t *decoder); /* NULL is a no-op */

/*
 * Parses one wal2json v2 message of len bytes (need not be NUL-terminated).
 * Returns 0 and fills *change, or -1 with a one-line reason in errbuf (for
 * example "invalid JSON at byte 17: ...", "\"columns\" entry 2 has no \"name\"",
 * "unknown action \"X\"", or a payload too large for jsonb: a string, or an
 * object's contents, over 2^28 - 1 bytes).  Numbers of any size or precision are accepted
 * and kept exactly as printed.  A "timestamp" must be ISO with a UTC offset,
 * as the walsender prints it under DateStyle ISO (the reader pins it).
 */
int wp_decoder_parse(wp_decoder_t *decoder, const char *data, size_t len, wp_change_t *change, char *errbuf,
                     size_t errlen);

/* One column of a change another input decoded (pgoutput.c), as wp_decoder_load takes it. */
typedef struct wp_decoder_column {
    const char *name; /* NUL-terminated */
    const char *type; /* NUL-terminated: the type's name as wal2json would print it (format_type) */
    int64_t typeoid;
    int position;     /* the attnum, or 0 when unknown */
    bool isnull;
    const char *text; /* the type's output text (not NUL-terminated), when !isnull; bytea as \x<hex> */
    size_t len;
} wp_decoder_column_t;

/*
 * Loads a change another input decoded as if wp_decoder_parse had parsed
 * the equivalent wal2json message, so that wp_decoder_payload and
 * wp_decoder_shape describe it in the same words.  change gives op, xid,
 * timestamp and commit_time, lsn, nextlsn, schema and table (I/U/D/T),
 * transactional, prefix and content (M); cols the new row (I/U); ident the
 * old key or old row (U/D, when has_ident), ident_full that it is the whole
 * old row.  Every string is copied (the inputs may go away after the call;
 * a message's content ends at its first NUL, as wal2json cuts it).  Checks
 * the values as the parse does (strict UTF-8, no NUL, bool t/f, bytea
 * \x<hex>, jsonb's size limit) and applies the filter.  Returns 0 and fills
 * *out, or -1 with a reason (and wp_decoder_rejected_table names the table).
 */
int wp_decoder_load(wp_decoder_t *decoder, const wp_change_t *change, const wp_decoder_column_t *cols, size_t ncols,
                    const wp_decoder_column_t *ident, size_t nident, bool has_ident, bool ident_full,
                    wp_change_t *out, char *errbuf, size_t errlen);

/* After another input failed to decode a change of schema.table: wp_decoder_rejected_table names it (copies). */
void wp_decoder_set_rejected(wp_decoder_t *decoder, const char *schema, const char *table);

/*
 * Applies a source's column filters and masks (filter.h) to every change
 * parsed from now on, before its payload and shape are built: an excluded
 * column is dropped from "columns" and "identity" alike (as if the table had
 * no such column); a masked one keeps its name, with the masked value, and
 * with type "text" (typeoid 25) for sha256 and redact, its own type for
 * null.  filter is borrowed (NULL = none) and must outlive the decoder.
 */
void wp_decoder_set_filter(wp_decoder_t *decoder, const wp_filter_t *filter);

/*
 * After a failed wp_decoder_parse: the schema and table the message names,
 * when it got that far (else NULL each), for its dead letter.  They borrow
 * from the decoder until the next parse.
 */
void wp_decoder_rejected_table(const wp_decoder_t *decoder, const char **schema, const char **table);

/* Appends the payload JSON (see the top of this file) of the last parsed I/U/D/T/M change to out. */
void wp_decoder_payload(wp_decoder_t *decoder, const wp_change_t *change, wp_buf_t *out);

/*
 * Describes the column set of the last parsed I/U/D change (the new row's
 * columns for I/U, the identity columns for D): appends
 * [{"name":..,"type":..,"typeoid":N[,"position":P]},...] to out and returns a
 * stable 63-bit id of (schema, table, that JSON).  "position" is the
 * column's attnum, present when wal2json sent it (include-column-positions:
 * I/U columns only, never the identity); it is what lets the mirror tell a
 * renamed column from a dropped and added one.  Returns 0 for T and M.  The id
 * is a proposal (FNV-1a, which anyone can aim at): the stager records the
 * shape by content and may use another id (sql/006_shape_ids.sql).
 */
int64_t wp_decoder_shape(wp_decoder_t *decoder, const wp_change_t *change, wp_buf_t *out);

#endif /* WP_DECODER_H */
