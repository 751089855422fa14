/*
 * reader.h: one source's replication connection, decoded into segments.
 *
 * See reader.c for the acknowledgement invariant.
 */
#ifndef WP_READER_H
#define WP_READER_H

#include "wp_setup.h"

#include "config.h"
#include "pipeline.h"

typedef struct wp_slot_info {
    char systemid[32];   /* IDENTIFY_SYSTEM */
    bool exists;         /* the slot was there when we looked */
    bool lost;           /* wal_status = 'lost': invalidated */
    wp_lsn_t confirmed_flush;
} wp_slot_info_t;

typedef struct wp_reader wp_reader_t;

/* Borrows config and source; they must outlive the reader. */
wp_reader_t *wp_reader_create(const wp_config_t *config, const wp_source_config_t *source);
void wp_reader_destroy(wp_reader_t *reader); /* NULL is a no-op */

/*
 * Opens the replication connection, runs IDENTIFY_SYSTEM and looks the slot
 * up.  Returns 0, or -1 after logging why, with *fatal set when the error
 * needs a fix on the source or in the configuration (wal_level, missing
 * privilege, unknown database, ...: decided by SQLSTATE).  The caller decides
 * whether that stops walpipe or is retried (source.c).
 */
int wp_reader_open(wp_reader_t *reader, wp_slot_info_t *info, bool *fatal);

#define WP_SNAPSHOT_NAME_LEN 64

/* True when name has the form of an exported snapshot's name (hex digits and dashes, shorter than the limit). */
bool wp_reader_snapshot_name_valid(const char *name);

/*
 * Reads the primary message of wal2json's notice that it dropped a change,
 * `no tuple identifier for UPDATE in table "schema"."table"` (the names as
 * they are, unescaped).  Returns false when message is not one.  Else sets
 * *is_update (false: a DELETE), *names to the text after "in table ", and
 * *schema and *table when the names split one way only (NULL when a name's
 * own quotes and dots make the split ambiguous).  The strings are the
 * caller's to free.
 */
bool wp_reader_parse_dropped(const char *message, bool *is_update, char **schema, char **table, char **names);

typedef struct wp_slot_spec {
    const char *name;     /* NULL: the source's configured slot */
    bool temporary;       /* dropped when the connection ends */
    bool export_snapshot; /* export the snapshot of the consistent point (SNAPSHOT 'export') */
} wp_slot_spec_t;

/*
 * Creates a wal2json slot (spec NULL: the configured slot, no snapshot);
 * *consistent_point is where it starts.  With export_snapshot, snapshot_name
 * receives the exported snapshot, which stays importable only until this
 * connection runs its next command (START_REPLICATION, for example).
 */
int wp_reader_create_slot(wp_reader_t *reader, const wp_slot_spec_t *spec, wp_lsn_t *consistent_point,
                          char snapshot_name[WP_SNAPSHOT_NAME_LEN], bool *fatal);

/* Drops the configured slot (waiting if a previous walsender still holds it). */
int wp_reader_drop_slot(wp_reader_t *reader);

/*
 * Streams from start (the staging checkpoint) into queue until a stop is
 * requested (returns 0 once everything read is committed and acknowledged)
 * or an error (returns -1, logged; the queue is marked failed).
 */
int wp_reader_stream(wp_reader_t *reader, const wp_position_t *start, wp_queue_t *queue, bool *fatal);

void wp_reader_close(wp_reader_t *reader);

#endif /* WP_READER_H */
