/*
 * pgoutput.h: pgoutput's binary protocol (version 1) -> the same changes as wal2json's.
 *
 * A pgoutput stream is a run of messages (PostgreSQL's "Logical Replication
 * Message Formats"): Begin, Relation and Type descriptions, row changes,
 * Truncate, logical Messages, Origin, Commit.  This module reads them and
 * hands each change to the wal2json decoder (wp_decoder_load), so that the
 * payload, the shape and every other column of the raw_events row come out
 * as wal2json's would for the same change.
 *
 * pgoutput names a column's type by OID and typmod only: the names
 * wal2json prints (format_type) and the columns' attnums come from a
 * describe callback, asked once per Relation message (the reader queries the
 * source's catalog).  Relation descriptions are cached per relation id; a
 * new one replaces the old.
 *
 * Begin does not carry the commit's end LSN, by which every row of the
 * transaction is keyed, only the commit record's start: the caller predicts
 * the end from it (wp_pgoutput_predict_end) and checks the prediction
 * against the Commit's end_lsn (reader.c).
 *
 * Every message is bounds-checked: a cut or garbled message is an error with
 * a reason (for a dead letter), never a read past its end.
 */
#ifndef WP_PGOUTPUT_H
#define WP_PGOUTPUT_H

#include "wp_setup.h"

#include "config.h"
#include "decoder.h"
#include "mem.h"

/* One column of a relation, as the describe callback sees it. */
typedef struct wp_pgoutput_attr {
    const char *name; /* in */
    uint32_t typeoid; /* in */
    int32_t typmod;   /* in */
    char *type;       /* out: format_type(typeoid, typmod), malloc'd by the callback (the module frees it) */
    int attnum;       /* out: the column's attnum, 0 when unknown */
} wp_pgoutput_attr_t;

/*
 * Fills type and attnum of attrs[0..n) of relation relid.  Returns 0, or -1
 * with a reason when the catalog could not be read (the caller then retries
 * the stream: such a failure is no property of the message).
 */
typedef int (*wp_pgoutput_describe_fn)(void *arg, uint32_t relid, wp_pgoutput_attr_t *attrs, size_t n, char *errbuf,
                                       size_t errlen);

typedef struct wp_pgoutput wp_pgoutput_t;

/*
 * source (borrowed; NULL = no table lists) gives tables and exclude_tables:
 * rows of other tables are left out, as wal2json's add-tables and
 * filter-tables leave them out.  describe is called with arg.
 */
wp_pgoutput_t *wp_pgoutput_create(const wp_source_config_t *source, wp_pgoutput_describe_fn describe, void *arg);
void wp_pgoutput_destroy(wp_pgoutput_t *p); /* NULL is a no-op */

/* Forgets every relation (a new stream describes them again). */
void wp_pgoutput_reset(wp_pgoutput_t *p);

/* Return values of wp_pgoutput_parse and wp_pgoutput_next. */
#define WP_PGO_CHANGE 1   /* *change is set (and loaded into the decoder) */
#define WP_PGO_NONE 0     /* the message describes (Relation, Type, Origin) or is of a table left out */
#define WP_PGO_BAD (-1)   /* the message is bad: errbuf says why (a dead letter) */
#define WP_PGO_RETRY (-2) /* the catalog could not be read: errbuf says why; stop and retry the stream */

/*
 * Parses one message of len bytes.  B gives WP_OP_BEGIN (xid, commit time,
 * lsn = the commit record's start, nextlsn unknown: 0); C gives
 * WP_OP_COMMIT (lsn = commit start, nextlsn = commit end); rows carry the
 * xid and commit time of the last Begin.  A Truncate of several tables gives
 * the first here and the others from wp_pgoutput_next.  The change borrows
 * from the decoder as wp_decoder_parse's does.
 */
int wp_pgoutput_parse(wp_pgoutput_t *p, wp_decoder_t *decoder, const char *data, size_t len, wp_change_t *change,
                      char *errbuf, size_t errlen);

/* The next change the last parsed message holds (a Truncate's next table): WP_PGO_CHANGE or WP_PGO_NONE. */
int wp_pgoutput_next(wp_pgoutput_t *p, wp_decoder_t *decoder, wp_change_t *change, char *errbuf, size_t errlen);

/*
 * The end LSN of a plain commit record (46 bytes: a transaction without
 * subtransactions, dropped relations or catalog changes, under wal_level =
 * logical) that starts at commit_start (a Begin's final_lsn): the commit end
 * LSN its Commit will most likely give.  Never past the real end: a commit
 * record is never shorter.
 */
wp_lsn_t wp_pgoutput_predict_end(wp_lsn_t commit_start);

#endif /* WP_PGOUTPUT_H */
