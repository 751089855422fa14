/*
 * reader.c: a source's logical replication stream -> segments for the stager.
 *
 * Job: open a replication=database connection, make sure the wal2json slot
 * exists, START_REPLICATION from the staging checkpoint, decode every
 * XLogData message into a raw_events row (or a dead letter), and keep the
 * walsender content: answer keepalives, send status updates on a timer even
 * while staging is slow, acknowledge what staging has committed.
 *
 * Invariant: the flush LSN sent to the source never passes a change that is
 * not committed in staging.  It is only ever a position the stager published
 * after its commit: the commit end LSN (nextlsn) of the last whole
 * transaction staged, the end LSN of a staged non-transactional message, or
 * a keepalive walEnd that was itself written to the checkpoint first.
 *
 * Restart: the server resends everything after its confirmed_flush_lsn, which
 * may be behind the checkpoint.  The reader skips transactions that end at or
 * before the checkpoint, and the first txn_seq changes of the transaction the
 * checkpoint says was staged in part, so each change is staged exactly once.
 *
 * pgoutput's Begin lacks the commit end LSN that keys a transaction's rows:
 * the reader predicts it (wp_pgoutput_predict_end) and streams the rows
 * keyed so, in segments marked txn_open, which staging never commits; the
 * Commit confirms the prediction or has the stager relabel them in the same
 * staging transaction (wp_segment_add_relabel).  So no checkpoint of a
 * pgoutput source ever lies inside a transaction.
 *
 * The loop has the shape of pg_recvlogical's: one poll on the socket with a
 * computed timeout; XLogData and keepalives dispatched separately; feedback
 * on a timer.  Message layouts (big-endian):
 *   'w' XLogData   : Int64 dataStart, Int64 walEnd, Int64 sendTime, payload  (25-byte header)
 *   'k' keepalive  : Int64 walEnd, Int64 sendTime, Byte1 replyRequested      (18 bytes)
 *   'r' status     : Int64 write, Int64 flush, Int64 apply, Int64 clientTime, Byte1 replyRequested (34 bytes)
 */
#include "wp_setup.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <libpq-fe.h>

#include "decoder.h"
#include "encoder.h"
#include "log.h"
#include "metrics.h"
#include "pg.h"
#include "pgoutput.h"
#include "reader.h"

#define SEGMENT_MAX_BYTES (256 * 1024)
#define SEGMENT_MAX_ROWS 2000
#define POLL_MAX_MS 100
/*
 * Rows wait at most this long in the reader for more rows to join their
 * segment before they go to the stager.  A few ms of latency buys segments
 * (and so staging commits) of a useful size when rows trickle in.
 */
#define SEGMENT_LINGER_MS 5
#define PG_EPOCH_OFFSET_US (946684800LL * 1000000LL)

typedef struct input_ops input_ops_t;

struct wp_reader {
    const wp_config_t *config;
    const wp_source_config_t *source;
    PGconn *conn;
    const input_ops_t *input; /* the slot's output plugin: how to start it and read its messages */
    wp_pgoutput_t *pgoutput;  /* pgoutput only: relation cache */
    PGconn *catalog;          /* pgoutput only: plain connection naming types (opened when first needed) */
    bool broken;              /* a message could not be read for a reason of ours (catalog): retry the stream */
    wp_decoder_t *decoder;
    wp_encoder_t *encoder;
    wp_filter_t *filter; /* the source's column filters and masks, applied by decoder */

    /* stream state */
    wp_position_t start; /* checkpoint the session started from */
    wp_position_t pos;   /* position after the last message handled */
    wp_position_t pushed; /* position of the last segment pushed */
    wp_segment_t *segment;
    bool in_txn;
    bool skipping;  /* whole transaction already staged */
    int skip_seq;   /* changes of this transaction already staged */
    int seq;
    wp_lsn_t txn_end;   /* the transaction's commit end LSN (pgoutput: predicted until its Commit) */
    wp_lsn_t txn_final; /* pgoutput: the commit record's start, from Begin */
    bool has_xid;
    int64_t xid;
    char ts[64];
    bool has_ts;

    /* feedback */
    wp_lsn_t received; /* highest header LSN seen (reported as write) */
    wp_lsn_t acked;    /* highest flush LSN sent */
    int64_t last_feedback_ms;
    int64_t last_position_push_ms;
    int64_t dirty_since_ms; /* 0, or when rows or a transaction end first waited to be pushed */

    /*
     * pgoutput: a segment was pushed inside the open transaction; at its
     * Commit the segment is pushed at once (boundary_due), giving staging a
     * point where it may commit (it never commits inside a transaction).
     */
    bool txn_pushed;
    bool boundary_due;
    /* pgoutput: commits that did not end where Begin predicted */
    uint64_t mispredicted;
    wp_metric_t *m_mispredicted;
};

/* ---- small helpers ------------------------------------------------------------------------- */

static uint64_t get_u64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | (unsigned char)p[i];
    return v;
}

static void put_u64(char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

/*
 * Classifies an error from the source by its SQLSTATE (the server's, or the
 * one wp_pg_connect_params read from a failed connection).  Returns a hint
 * naming the fix, or NULL, and sets *needs_fix for errors that only a change
 * on the source or in the configuration cures: wrong names or credentials,
 * missing privilege, wal_level, a missing plugin.  Whether such an error
 * stops walpipe or is retried is the caller's decision (source.c: a source
 * being restored or recreated comes back by itself).  Everything else, and
 * every failure without a SQLSTATE (no server, connection refused or lost),
 * is worth retrying as it is.
 */
static const char *classify_error(const char *sqlstate, bool *needs_fix)
{
    static const struct {
        const char *sqlstate;
        bool needs_fix;
        const char *hint;
    } source_errors[] = {
        /* invalid_catalog_name */
        {"3D000", true, "check dbname in the source's conninfo (a database being restored or recreated: see README, "
                        "\"Errors\")"},
        /* invalid_password */
        {"28P01", true, "check the user and password in the source's conninfo"},
        /* invalid_authorization_specification: no such role, pg_hba.conf */
        {"28000", true, "check the user in the source's conninfo and allow the connection in the source's pg_hba.conf"},
        /* insufficient_privilege: no REPLICATION, no CONNECT */
        {"42501", true, "grant the role replication: ALTER ROLE <user> WITH REPLICATION, and CONNECT on the database"},
        /* object_not_in_prerequisite_state */
        {"55000", true, "set wal_level = logical in the source's postgresql.conf and restart it, if that is what the "
                        "message names; a standby, a database closed to connections or an invalidated slot give "
                        "this error too"},
        /* undefined_file: the output plugin's library */
        {"58P01", true, "install the wal2json output plugin on the source "
                        "(Debian: apt-get install postgresql-15-wal2json)"},
        /* invalid_parameter_value: an option wal2json does not know */
        {"22023", true, "the installed wal2json does not support an option walpipe needs (wal2json >= 2.5)"},
        /* configuration_limit_exceeded: all replication slots are in use */
        {"53400", true, "raise max_replication_slots on the source (and restart it), or drop a slot nobody uses"},
        /* object_in_use: the slot is active for another PID */
        {"55006", false, "another consumer holds the slot (or its previous walsender has not exited yet); retrying"},
        /* cannot_connect_now */
        {"57P03", false, "the source is starting up, shutting down or recovering; retrying"},
        /* too_many_connections: also max_wal_senders */
        {"53300", false, "the source has no connection or WAL sender free (max_connections, max_wal_senders); "
                         "retrying"},
    };
    *needs_fix = false;
    if (sqlstate == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof source_errors / sizeof source_errors[0]; i++) {
        if (strcmp(sqlstate, source_errors[i].sqlstate) == 0) {
            *needs_fix = source_errors[i].needs_fix;
            return source_errors[i].hint;
        }
    }
    return NULL;
}

/*
 * Logs an error from the source on one line, with the hint of its SQLSTATE
 * (NULL or "" when it has none), and sets *needs_fix (classify_error).
 */
static void log_source_error(const char *what, const char *msg, const char *sqlstate, bool *needs_fix)
{
    const char *hint = classify_error(sqlstate && *sqlstate ? sqlstate : NULL, needs_fix);
    char line[1024];
    snprintf(line, sizeof line, "%s", msg ? msg : "unknown error");
    /* keep it to one line: libpq messages end in newlines and may carry DETAIL lines */
    for (char *p = line; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
    for (size_t n = strlen(line); n > 0 && line[n - 1] == ' '; n--)
        line[n - 1] = '\0';
    if (hint)
        wp_error("%s: %s; hint: %s", what, line, hint);
    else
        wp_error("%s: %s", what, line);
}

/* log_source_error for a failed command: the SQLSTATE of res (NULL when libpq had none to give). */
static void log_result_error(const char *what, PGconn *conn, const PGresult *res, bool *needs_fix)
{
    log_source_error(what, PQerrorMessage(conn), res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL, needs_fix);
}

static wp_segment_t *current_segment(wp_reader_t *reader);

#define DROPPED_PREFIX "no tuple identifier for "
#define DROPPED_TABLE " in table "

bool wp_reader_parse_dropped(const char *message, bool *is_update, char **schema, char **table, char **names)
{
    *schema = *table = *names = NULL;
    size_t plen = strlen(DROPPED_PREFIX);
    if (strncmp(message, DROPPED_PREFIX, plen) != 0)
        return false;
    const char *p = message + plen;
    if (strncmp(p, "UPDATE", 6) == 0)
        *is_update = true;
    else if (strncmp(p, "DELETE", 6) == 0)
        *is_update = false;
    else
        return false;
    p += 6;
    size_t tlen = strlen(DROPPED_TABLE);
    if (strncmp(p, DROPPED_TABLE, tlen) != 0)
        return false;
    p += tlen;
    *names = wp_strdup(p);
    /*
     * wal2json prints "%s"."%s" with the names as they are, unescaped: a
     * name may hold quotes and dots itself.  The split is only certain when
     * the separator "." occurs once between the outer quotes.
     */
    size_t len = strlen(p);
    if (len < 5 || p[0] != '"' || p[len - 1] != '"')
        return true;
    const char *inner = p + 1, *end = p + len - 1, *sep = NULL;
    int seps = 0;
    for (const char *q = inner; q + 3 <= end; q++) {
        if (q[0] == '"' && q[1] == '.' && q[2] == '"') {
            sep = q;
            seps++;
        }
    }
    if (seps != 1)
        return true;
    *schema = wp_strndup(inner, (size_t)(sep - inner));
    *table = wp_strndup(sep + 3, (size_t)(end - (sep + 3)));
    return true;
}

/*
 * libpq calls this from inside PQgetCopyData, in stream order: a notice the
 * walsender sent while decoding a transaction arrives after that
 * transaction's B message was handled and before its C.  wal2json reports an
 * UPDATE or DELETE it dropped (no replica identity) only this way, so the
 * reader notes it on the current segment against the transaction being
 * decoded; the stager records it as a divergence with the checkpoint.
 */
static void notice_receiver(void *arg, const PGresult *res)
{
    wp_reader_t *reader = arg;
    const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *message = PQresultErrorMessage(res);
    char line[1024];
    snprintf(line, sizeof line, "%s", message ? message : "");
    for (size_t n = strlen(line); n > 0 && (line[n - 1] == '\n' || line[n - 1] == ' '); n--)
        line[n - 1] = '\0';
    wp_warn("source says: %s", line);

    bool is_update;
    char *schema, *table, *names;
    if (severity == NULL || strcmp(severity, "WARNING") != 0 || primary == NULL ||
        !wp_reader_parse_dropped(primary, &is_update, &schema, &table, &names))
        return;
    if (reader->in_txn && reader->skipping)
        goto out; /* the transaction was staged before a restart, and its note with it */
    if (!reader->in_txn)
        wp_warn("wal2json dropped a change outside a transaction it was decoding; recording it at an unknown "
                "position");
    wp_segment_add_dropped(current_segment(reader), reader->in_txn ? reader->txn_end : WP_LSN_INVALID, is_update,
                           schema, table, names);
out:
    free(schema);
    free(table);
    free(names);
}

/*
 * What differs between output plugins, behind one small interface: the
 * plugin's name (slot creation and lookup), the options of
 * START_REPLICATION, and how an XLogData payload becomes changes for
 * dispatch().  Everything else in this file is the same for both.
 */
struct input_ops {
    const char *plugin;
    void (*options)(const wp_reader_t *reader, wp_buf_t *sql); /* appends " (...)" */
    void (*xlogdata)(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len);
};

static const input_ops_t wal2json_input, pgoutput_input;
static int describe_relation(void *arg, uint32_t relid, wp_pgoutput_attr_t *attrs, size_t n, char *errbuf,
                             size_t errlen);

/* ---- lifecycle ----------------------------------------------------------------------------- */

wp_reader_t *wp_reader_create(const wp_config_t *config, const wp_source_config_t *source)
{
    wp_reader_t *reader = wp_calloc(1, sizeof *reader);
    reader->config = config;
    reader->source = source;
    reader->decoder = wp_decoder_create();
    reader->encoder = wp_encoder_create(source->name);
    reader->filter = wp_filter_create(source);
    wp_decoder_set_filter(reader->decoder, reader->filter);
    reader->input = source->plugin == WP_PLUGIN_PGOUTPUT ? &pgoutput_input : &wal2json_input;
    if (source->plugin == WP_PLUGIN_PGOUTPUT) {
        reader->pgoutput = wp_pgoutput_create(source, describe_relation, reader);
        reader->m_mispredicted =
            wp_metric(WP_METRIC_COUNTER, "walpipe_pgoutput_mispredicted_commits_total",
                      "pgoutput transactions whose commit end LSN was not the one predicted at their Begin (their "
                      "rows were relabelled in staging before their checkpoint)",
                      "source", source->name, NULL);
    }
    return reader;
}

void wp_reader_close(wp_reader_t *reader)
{
    if (reader->conn)
        PQfinish(reader->conn);
    reader->conn = NULL;
    if (reader->catalog)
        PQfinish(reader->catalog);
    reader->catalog = NULL;
    if (reader->pgoutput)
        wp_pgoutput_reset(reader->pgoutput); /* a new stream describes its relations again */
    reader->broken = false;
    wp_segment_destroy(reader->segment);
    reader->segment = NULL;
}

void wp_reader_destroy(wp_reader_t *reader)
{
    if (reader == NULL)
        return;
    wp_reader_close(reader);
    wp_decoder_destroy(reader->decoder);
    wp_pgoutput_destroy(reader->pgoutput);
    wp_encoder_destroy(reader->encoder);
    wp_filter_destroy(reader->filter);
    free(reader);
}

/*
 * Sets *exists to whether the source's publication exists.  A replication
 * connection speaks the simple protocol only: the name goes in as a quoted
 * literal.  Returns 0, or -1 after logging why.
 */
static int publication_exists(wp_reader_t *reader, bool *exists, bool *fatal)
{
    const char *pub = reader->source->publication;
    char *lit = PQescapeLiteral(reader->conn, pub, strlen(pub));
    wp_buf_t sql = WP_BUF_INIT;
    PGresult *res = NULL;
    int rc = -1;
    if (lit == NULL) {
        wp_error("could not quote the publication name: %s", PQerrorMessage(reader->conn));
        goto out;
    }
    wp_buf_printf(&sql, "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s", lit);
    res = PQexec(reader->conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_result_error("could not look up the publication", reader->conn, res, fatal);
        goto out;
    }
    *exists = PQntuples(res) == 1;
    rc = 0;
out:
    PQclear(res);
    if (lit)
        PQfreemem(lit);
    wp_buf_free(&sql);
    return rc;
}

/*
 * pgoutput: the tables in `tables` that exist on the source but that the
 * publication does not publish (a table added to `tables` after the
 * publication was made): their changes would never be sent.  walpipe's own
 * publication gets them added (ALTER PUBLICATION ... ADD TABLE: changes
 * committed from then on are sent, as pgoutput reads the publication as of
 * each change); a named one, which walpipe never changes, gets a warning
 * with that fix.  Returns 0, or -1 after logging why.
 */
static int publication_cover(wp_reader_t *reader, bool *fatal)
{
    const wp_source_config_t *source = reader->source;
    const char *pub = source->publication;
    wp_buf_t sql = WP_BUF_INIT, list = WP_BUF_INIT;
    PGresult *res = NULL;
    char *lit = NULL, *ident = NULL;
    int rc = -1;
    if (source->ntables == 0)
        return 0; /* FOR ALL TABLES */
    lit = PQescapeLiteral(reader->conn, pub, strlen(pub));
    ident = PQescapeIdentifier(reader->conn, pub, strlen(pub));
    if (lit == NULL || ident == NULL) {
        wp_error("could not quote the publication name: %s", PQerrorMessage(reader->conn));
        goto out;
    }
    wp_buf_puts(&sql, "SELECT format('%I.%I', v.s, v.t) FROM (VALUES ");
    for (size_t i = 0; i < source->ntables; i++) {
        char *s = PQescapeLiteral(reader->conn, source->tables[i].schema, strlen(source->tables[i].schema));
        char *t = PQescapeLiteral(reader->conn, source->tables[i].table, strlen(source->tables[i].table));
        if (s && t)
            wp_buf_printf(&sql, "%s(%d, %s, %s)", i ? ", " : "", (int)i, s, t);
        PQfreemem(s);
        PQfreemem(t);
        if (s == NULL || t == NULL) {
            wp_error("could not quote a table name: %s", PQerrorMessage(reader->conn));
            goto out;
        }
    }
    wp_buf_printf(&sql,
                  ") v(i, s, t) JOIN pg_catalog.pg_namespace n ON n.nspname = v.s "
                  "JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = v.t AND c.relkind = 'r' "
                  "AND c.relpersistence = 'p' "
                  "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication p WHERE p.pubname = %s AND "
                  "(p.puballtables OR EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt WHERE "
                  "pt.pubname = p.pubname AND pt.schemaname = v.s AND pt.tablename = v.t))) ORDER BY v.i",
                  lit);
    res = PQexec(reader->conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_result_error("could not read what the publication publishes", reader->conn, res, fatal);
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++)
        wp_buf_printf(&list, "%s%s", r ? ", " : "", PQgetvalue(res, r, 0));
    if (PQntuples(res) == 0) {
        rc = 0;
        goto out;
    }
    if (source->publication_set) {
        wp_warn("publication \"%s\" (source \"%s\") does not publish %s, which the source's tables list: "
                "their changes are not sent, so walpipe never sees them; hint: ALTER PUBLICATION %s ADD TABLE %s "
                "(walpipe never changes a publication it did not create)",
                pub, source->name, list.data, ident, list.data);
        rc = 0;
        goto out;
    }
    wp_buf_reset(&sql);
    wp_buf_printf(&sql, "ALTER PUBLICATION %s ADD TABLE %s", ident, list.data);
    PQclear(res);
    res = PQexec(reader->conn, sql.data);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        log_result_error("could not add the source's new tables to walpipe's publication", reader->conn, res, fatal);
        goto out;
    }
    wp_warn("added %s to publication \"%s\" (source \"%s\"): listed in tables since the publication was "
            "created; their changes are sent from now on, not those committed before; hint: `walpipe snapshot "
            "--config FILE --source %s --table SCHEMA.TABLE` copies their rows",
            list.data, pub, source->name, source->name);
    rc = 0;
out:
    PQclear(res);
    if (lit)
        PQfreemem(lit);
    if (ident)
        PQfreemem(ident);
    wp_buf_free(&sql);
    wp_buf_free(&list);
    return rc;
}

/*
 * pgoutput: does the publication exist?  A named one must; walpipe's own
 * (publication unset) is created with the slot, so it must exist once the
 * slot does.  Returns 0, or -1 after logging the fix (*fatal set).
 */
static int check_publication(wp_reader_t *reader, bool slot_exists, bool *fatal)
{
    const char *pub = reader->source->publication;
    bool exists = false;
    int rc = -1;
    if (publication_exists(reader, &exists, fatal) != 0)
        goto out;
    if (!exists && reader->source->publication_set) {
        wp_error("publication \"%s\" (source \"%s\") does not exist on the source; hint: create it there "
                 "(CREATE PUBLICATION \"%s\" FOR ALL TABLES, or FOR TABLE the tables to capture), or remove "
                 "publication from the source's section to let walpipe create walpipe's own with the slot",
                 pub, reader->source->name, pub);
        *fatal = true;
        goto out;
    }
    if (!exists && slot_exists) {
        wp_error("publication \"%s\" (source \"%s\"), which walpipe created with slot \"%s\", is gone; hint: "
                 "create it again as it was (CREATE PUBLICATION \"%s\" FOR ALL TABLES, or FOR TABLE the source's "
                 "tables), or drop the slot to start over",
                 pub, reader->source->name, reader->source->slot, pub);
        *fatal = true;
        goto out;
    }
    rc = exists ? publication_cover(reader, fatal) : 0;
out:
    return rc;
}

/*
 * pgoutput: creates walpipe's own publication (publication unset) unless it
 * exists: FOR TABLE the source's tables, else FOR ALL TABLES.  Done before
 * the slot is created: pgoutput reads publications as of each change's
 * position, so the publication must be older than everything decoded.
 */
static int create_publication(wp_reader_t *reader, bool *fatal)
{
    const wp_source_config_t *source = reader->source;
    wp_buf_t sql = WP_BUF_INIT;
    PGresult *res = NULL;
    int rc = -1;
    if (source->publication_set)
        return 0;
    bool exists = false;
    if (publication_exists(reader, &exists, fatal) != 0)
        goto out;
    if (exists) {
        rc = 0;
        goto out;
    }
    char *ident = PQescapeIdentifier(reader->conn, source->publication, strlen(source->publication));
    if (ident == NULL) {
        wp_error("could not quote the publication name: %s", PQerrorMessage(reader->conn));
        goto out;
    }
    wp_buf_printf(&sql, "CREATE PUBLICATION %s FOR ", ident);
    PQfreemem(ident);
    wp_buf_puts(&sql, source->ntables ? "TABLE " : "ALL TABLES");
    for (size_t i = 0; i < source->ntables; i++) {
        char *s = PQescapeIdentifier(reader->conn, source->tables[i].schema, strlen(source->tables[i].schema));
        char *t = PQescapeIdentifier(reader->conn, source->tables[i].table, strlen(source->tables[i].table));
        if (s && t)
            wp_buf_printf(&sql, "%s%s.%s", i ? ", " : "", s, t);
        PQfreemem(s);
        PQfreemem(t);
        if (s == NULL || t == NULL) {
            wp_error("could not quote a table name: %s", PQerrorMessage(reader->conn));
            goto out;
        }
    }
    res = PQexec(reader->conn, sql.data);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        log_result_error("could not create the publication", reader->conn, res, fatal);
        goto out;
    }
    wp_info("created publication \"%s\" for %s", source->publication,
            source->ntables ? "the source's tables" : "all tables");
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&sql);
    return rc;
}

int wp_reader_open(wp_reader_t *reader, wp_slot_info_t *info, bool *fatal)
{
    int rc = -1;
    PGresult *res = NULL;
    char appname[96];
    char *slot_lit = NULL;
    wp_buf_t sql = WP_BUF_INIT;
    *fatal = false;
    memset(info, 0, sizeof *info);
    wp_reader_close(reader);

    snprintf(appname, sizeof appname, "walpipe_%s", reader->source->name);
    /* Values render through each type's output function in the walsender: pin the GUCs that change them. */
    const char *keys[] = {"dbname", "replication", "application_name", "options", "keepalives", "keepalives_idle",
                          "keepalives_interval", "keepalives_count", NULL};
    const char *vals[] = {reader->source->conninfo,
                          "database",
                          appname,
                          "-c datestyle=ISO,MDY -c timezone=UTC -c intervalstyle=postgres -c bytea_output=hex "
                          "-c extra_float_digits=3",
                          "1",
                          "30",
                          "10",
                          "3",
                          NULL};
    wp_pg_conn_error_t cerr;
    reader->conn = wp_pg_connect_params(keys, vals, &cerr);
    if (reader->conn == NULL) {
        if (cerr.needs_password) {
            wp_error("could not connect to source: %s; hint: give the password in the source's conninfo "
                     "(password=${VARIABLE}) or in ~/.pgpass", cerr.message);
            *fatal = true;
        } else {
            log_source_error("could not connect to source", cerr.message, cerr.sqlstate, fatal);
        }
        goto out;
    }
    PQsetNoticeReceiver(reader->conn, notice_receiver, reader);

    res = PQexec(reader->conn, "IDENTIFY_SYSTEM");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 || PQnfields(res) < 4) {
        log_result_error("could not identify the source system", reader->conn, res, fatal);
        goto out;
    }
    if (PQgetisnull(res, 0, 3)) {
        wp_error("source connection is not bound to a database; hint: give dbname in the source's conninfo");
        *fatal = true;
        goto out;
    }
    /* a decimal uint64; staging gets it as a parameter, but nothing else is a system identifier */
    const char *systemid = PQgetvalue(res, 0, 0);
    size_t idlen = strlen(systemid);
    if (idlen == 0 || idlen >= sizeof info->systemid || strspn(systemid, "0123456789") != idlen) {
        wp_error("the source's IDENTIFY_SYSTEM returned a system identifier of an unknown form");
        goto out;
    }
    memcpy(info->systemid, systemid, idlen + 1);
    PQclear(res);

    slot_lit = PQescapeLiteral(reader->conn, reader->source->slot, strlen(reader->source->slot));
    if (slot_lit == NULL) {
        wp_error("could not quote the slot name: %s", PQerrorMessage(reader->conn));
        goto out;
    }
    wp_buf_printf(&sql,
                  "SELECT plugin, slot_type, coalesce(wal_status, ''), confirmed_flush_lsn, "
                  "database = current_database() FROM pg_replication_slots WHERE slot_name = %s",
                  slot_lit);
    res = PQexec(reader->conn, sql.data);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        log_result_error("could not look up the replication slot", reader->conn, res, fatal);
        goto out;
    }
    if (PQntuples(res) == 1) {
        info->exists = true;
        if (strcmp(PQgetvalue(res, 0, 1), "logical") != 0 ||
            strcmp(PQgetvalue(res, 0, 0), reader->input->plugin) != 0 || strcmp(PQgetvalue(res, 0, 4), "t") != 0) {
            wp_error("slot \"%s\" exists but is not a %s logical slot of this database (plugin %s); "
                     "hint: name another slot in the configuration, drop this one, or set the source's plugin to match it",
                     reader->source->slot, reader->input->plugin, PQgetvalue(res, 0, 0));
            *fatal = true;
            goto out;
        }
        info->lost = strcmp(PQgetvalue(res, 0, 2), "lost") == 0;
        const char *flush = PQgetvalue(res, 0, 3);
        if (!PQgetisnull(res, 0, 3) && !wp_lsn_parse(flush, strlen(flush), &info->confirmed_flush)) {
            wp_error("slot \"%s\" reports an unreadable confirmed_flush_lsn", reader->source->slot);
            goto out;
        }
    }
    if (reader->source->plugin == WP_PLUGIN_PGOUTPUT && check_publication(reader, info->exists, fatal) != 0)
        goto out;
    rc = 0;
out:
    PQclear(res);
    if (slot_lit)
        PQfreemem(slot_lit);
    wp_buf_free(&sql);
    if (rc != 0)
        wp_reader_close(reader);
    return rc;
}

bool wp_reader_snapshot_name_valid(const char *name)
{
    /* PostgreSQL exports "%08X-%08X-%d": hex digits and dashes, never anything that needs quoting */
    size_t len = strlen(name);
    return len > 0 && len < WP_SNAPSHOT_NAME_LEN && strspn(name, "0123456789ABCDEFabcdef-") == len &&
           name[0] != '-';
}

int wp_reader_create_slot(wp_reader_t *reader, const wp_slot_spec_t *spec, wp_lsn_t *consistent_point,
                          char snapshot_name[WP_SNAPSHOT_NAME_LEN], bool *fatal)
{
    int rc = -1;
    char sql[200];
    const char *slot = spec && spec->name ? spec->name : reader->source->slot;
    bool export_snapshot = spec && spec->export_snapshot;
    *fatal = false;
    if (snapshot_name)
        snapshot_name[0] = '\0';
    PGresult *res = NULL;
    if (reader->source->plugin == WP_PLUGIN_PGOUTPUT && !(spec && spec->temporary) &&
        create_publication(reader, fatal) != 0)
        goto out;
    /* slot names are validated ([a-z0-9_]) by the configuration, so quoting them is enough */
    snprintf(sql, sizeof sql, "CREATE_REPLICATION_SLOT \"%s\"%s LOGICAL %s (SNAPSHOT '%s')", slot,
             spec && spec->temporary ? " TEMPORARY" : "", reader->input->plugin, export_snapshot ? "export" : "nothing");
    res = PQexec(reader->conn, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        log_result_error("could not create the replication slot", reader->conn, res, fatal);
        goto out;
    }
    const char *cp = PQgetvalue(res, 0, 1);
    if (!wp_lsn_parse(cp, strlen(cp), consistent_point)) {
        wp_error("CREATE_REPLICATION_SLOT returned an unreadable consistent point");
        goto out;
    }
    if (export_snapshot) {
        if (PQgetisnull(res, 0, 2) || !wp_reader_snapshot_name_valid(PQgetvalue(res, 0, 2))) {
            wp_error("CREATE_REPLICATION_SLOT exported no usable snapshot (missing, or a name of an unknown form)");
            goto out;
        }
        snprintf(snapshot_name, WP_SNAPSHOT_NAME_LEN, "%s", PQgetvalue(res, 0, 2));
    }
    wp_info("created slot \"%s\" at %s%s", slot, cp, export_snapshot ? " with an exported snapshot" : "");
    rc = 0;
out:
    PQclear(res);
    return rc;
}

int wp_reader_drop_slot(wp_reader_t *reader)
{
    char sql[160];
    snprintf(sql, sizeof sql, "DROP_REPLICATION_SLOT \"%s\" WAIT", reader->source->slot);
    PGresult *res = PQexec(reader->conn, sql);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        bool fatal;
        log_result_error("could not drop the replication slot", reader->conn, res, &fatal);
        rc = -1;
    } else {
        wp_info("dropped slot \"%s\"", reader->source->slot);
    }
    PQclear(res);
    return rc;
}

/* ---- feedback ------------------------------------------------------------------------------ */

static int send_feedback(wp_reader_t *reader, wp_queue_t *queue, bool reply_requested)
{
    wp_position_t durable = wp_queue_durable(queue);
    if (durable.lsn > reader->acked)
        reader->acked = durable.lsn;
    wp_lsn_t write = reader->received > reader->acked ? reader->received : reader->acked;
    char msg[34];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    int64_t now_us = (int64_t)tv.tv_sec * 1000000 + tv.tv_usec - PG_EPOCH_OFFSET_US;
    msg[0] = 'r';
    put_u64(msg + 1, write);
    put_u64(msg + 9, reader->acked);
    put_u64(msg + 17, reader->acked);
    put_u64(msg + 25, (uint64_t)now_us);
    msg[33] = reply_requested ? 1 : 0;
    if (PQputCopyData(reader->conn, msg, sizeof msg) != 1 || PQflush(reader->conn) != 0) {
        wp_error("could not send a status update to the source: %s", PQerrorMessage(reader->conn));
        return -1;
    }
    reader->last_feedback_ms = wp_now_ms();
    return 0;
}

/* Sends a status update if the timer is due or staging committed something new. */
static int maybe_feedback(wp_reader_t *reader, wp_queue_t *queue)
{
    int64_t now = wp_now_ms();
    int64_t since = now - reader->last_feedback_ms;
    if (since >= reader->source->status_interval_ms)
        return send_feedback(reader, queue, false);
    if (since >= 20 && wp_queue_durable(queue).lsn > reader->acked)
        return send_feedback(reader, queue, false);
    return 0;
}

/* ---- segments ------------------------------------------------------------------------------ */

static wp_segment_t *current_segment(wp_reader_t *reader)
{
    if (reader->segment == NULL)
        reader->segment = wp_segment_create();
    if (reader->dirty_since_ms == 0)
        reader->dirty_since_ms = wp_now_ms();
    return reader->segment;
}

/*
 * Hands the current segment (possibly holding only a new position) to the
 * stager, waiting while the queue is full but keeping the walsender fed with
 * status updates meanwhile.  Returns 0, or -1 if the session failed.
 */
static int push_segment(wp_reader_t *reader, wp_queue_t *queue, bool final, bool more_coming)
{
    wp_segment_t *segment = current_segment(reader);
    segment->pos = reader->pos;
    /* rows keyed by a predicted commit end may follow: staging must wait for the Commit */
    segment->txn_open = reader->pgoutput != NULL && reader->in_txn && !reader->skipping;
    if (segment->txn_open)
        reader->txn_pushed = true;
    reader->boundary_due = false;
    segment->final = final;
    segment->more_coming = more_coming;
    for (;;) {
        int pushed = wp_queue_push(queue, segment, POLL_MAX_MS);
        if (pushed == 1)
            break;
        if (pushed < 0)
            return -1;
        if (maybe_feedback(reader, queue) != 0)
            return -1;
    }
    reader->segment = NULL;
    reader->pushed = reader->pos;
    reader->last_position_push_ms = wp_now_ms();
    reader->dirty_since_ms = 0;
    return 0;
}

static bool position_advanced(const wp_reader_t *reader)
{
    return reader->pos.lsn != reader->pushed.lsn || reader->pos.txn_end != reader->pushed.txn_end ||
           reader->pos.txn_seq != reader->pushed.txn_seq;
}

/*
 * schema and table name the message's table when known, else NULL.  The raw
 * text of a message that may hold excluded or unmasked columns (its table
 * has column rules, or is unknown while the source has some) is withheld:
 * what the filters keep out must not land in dead_letters either.
 */
static void add_dead_letter(wp_reader_t *reader, const char *data, size_t len, wp_lsn_t lsn, int seq,
                            const char *schema, const char *table, const char *reason)
{
    static const char withheld[] = "(raw text withheld: the message's table has column filters or masks, or could "
                                   "not be told, and the raw text may hold what they keep out of staging)";
    if (wp_filter_has_rules(reader->filter) &&
        (table == NULL || wp_filter_table(reader->filter, schema ? schema : "", schema ? strlen(schema) : 0, table,
                                          strlen(table)) != NULL)) {
        data = withheld;
        len = sizeof withheld - 1;
    }
    wp_segment_add_dead(current_segment(reader), lsn, seq, schema, table, data, len, reason);
}

/* ---- message dispatch ---------------------------------------------------------------------- */

static void begin_txn(wp_reader_t *reader, const wp_change_t *change)
{
    reader->in_txn = true;
    reader->txn_end = change->nextlsn;
    reader->seq = 0;
    reader->skipping = change->nextlsn <= reader->start.lsn;
    reader->skip_seq = change->nextlsn == reader->start.txn_end ? reader->start.txn_seq : 0;
}

/*
 * Handles one decoded message: c is its change, or NULL when it could not
 * be decoded (err says why).  data[0..len) is the raw message, for a dead
 * letter.  Never fails: what cannot be decoded becomes a dead letter.
 */
static void dispatch(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len, const wp_change_t *c,
                     const char *err)
{
    wp_change_t change;

    if (c == NULL) {
        const char *schema, *table;
        wp_decoder_rejected_table(reader->decoder, &schema, &table);
        if (reader->in_txn) {
            reader->seq++;
            if (!reader->skipping && reader->seq > reader->skip_seq) {
                add_dead_letter(reader, data, len, reader->txn_end, reader->seq, schema, table, err);
                reader->pos.txn_end = reader->txn_end;
                reader->pos.txn_seq = reader->seq;
            }
        } else if (header_lsn > reader->start.lsn) {
            add_dead_letter(reader, data, len, header_lsn, 0, schema, table, err);
        }
        return;
    }
    change = *c;

    switch (change.op) {
    case WP_OP_BEGIN:
        if (reader->in_txn)
            wp_warn("transaction ending at %X/%X began before the previous one committed",
                    (unsigned)(change.nextlsn >> 32), (unsigned)change.nextlsn);
        begin_txn(reader, &change);
        reader->has_xid = change.has_xid;
        reader->xid = change.xid;
        break;
    case WP_OP_COMMIT:
        if (!reader->in_txn)
            wp_warn("commit without a begin at %X/%X", (unsigned)(change.nextlsn >> 32), (unsigned)change.nextlsn);
        if (!reader->skipping && change.nextlsn > reader->pos.lsn) {
            /* a transaction that staged rows ends: its checkpoint should follow them promptly */
            if (reader->pos.txn_end != WP_LSN_INVALID && reader->dirty_since_ms == 0)
                reader->dirty_since_ms = wp_now_ms();
            reader->pos.lsn = change.nextlsn;
            reader->pos.txn_end = WP_LSN_INVALID;
            reader->pos.txn_seq = 0;
        }
        reader->in_txn = false;
        reader->skipping = false;
        break;
    case WP_OP_MESSAGE:
        if (!change.transactional) {
            /* stands alone: keyed by its own LSN (the end of the message record) */
            if (change.lsn > reader->start.lsn) {
                wp_encoder_add(reader->encoder, current_segment(reader), reader->decoder, &change, NULL, change.lsn, 0);
                if (!reader->in_txn && change.lsn > reader->pos.lsn)
                    reader->pos.lsn = change.lsn;
            }
            break;
        }
        /* a transactional message is a change of its transaction */
        __attribute__((fallthrough));
    case WP_OP_INSERT:
    case WP_OP_UPDATE:
    case WP_OP_DELETE:
    case WP_OP_TRUNCATE:
        if (!reader->in_txn) {
            if (header_lsn > reader->start.lsn)
                add_dead_letter(reader, data, len, header_lsn, 0, change.schema, change.table,
                                "change outside a transaction");
            break;
        }
        reader->seq++;
        if (reader->skipping || reader->seq <= reader->skip_seq)
            break;
        wp_encoder_add(reader->encoder, current_segment(reader), reader->decoder, &change, NULL, reader->txn_end,
                       reader->seq);
        reader->pos.txn_end = reader->txn_end;
        reader->pos.txn_seq = reader->seq;
        break;
    }
}

/* ---- inputs: wal2json and pgoutput ------------------------------------------------------- */

/* wal2json: one JSON message is one change, in stream order. */
static void wal2json_xlogdata(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len)
{
    wp_change_t change;
    char err[WP_ERRLEN];
    bool ok = wp_decoder_parse(reader->decoder, data, len, &change, err, sizeof err) == 0;
    dispatch(reader, header_lsn, data, len, ok ? &change : NULL, err);
}

/*
 * pgoutput's Begin: the transaction's rows are keyed by its commit end LSN,
 * which only the Commit gives; Begin gives the commit record's start
 * (final_lsn), from which the end of a plain commit record follows
 * (wp_pgoutput_predict_end).
 */
static void pgoutput_begin(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len,
                           wp_change_t *begin)
{
    if (reader->in_txn) {
        /*
         * Its rows may be in the open staging batch under its prediction,
         * and no Commit will relabel or confirm them: start over from the
         * checkpoint (the batch rolls back).  A walsender never does this.
         */
        wp_error("pgoutput began a transaction before the previous one committed; restarting the stream");
        reader->broken = true;
        return;
    }
    reader->txn_final = begin->lsn;
    reader->txn_pushed = false;
    begin->nextlsn = wp_pgoutput_predict_end(begin->lsn);
    dispatch(reader, header_lsn, data, len, begin, NULL);
    /*
     * A checkpoint inside a pgoutput transaction (written before walpipe
     * streamed them; the stager no longer commits one) names it by its real
     * end, which the prediction may miss: it is the first transaction not
     * skipped whose commit starts before that end.
     */
    if (!reader->skipping && reader->start.txn_end != WP_LSN_INVALID && reader->txn_final < reader->start.txn_end)
        reader->skip_seq = reader->start.txn_seq;
}

/*
 * pgoutput's Commit (change, or NULL when unreadable: err says why; its
 * XLogData header then gives the end, as the walsender writes a Commit at
 * its commit end LSN): a mispredicted end has the rows already keyed by the
 * prediction relabelled in staging, before the checkpoint that passes them.
 */
static void pgoutput_commit(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len,
                            const wp_change_t *change, const char *err)
{
    wp_change_t commit;
    if (change) {
        commit = *change;
    } else {
        wp_warn("unreadable pgoutput Commit (%s); taking its transaction's end from the message's position", err);
        memset(&commit, 0, sizeof commit);
        commit.op = WP_OP_COMMIT;
        commit.lsn = commit.nextlsn = header_lsn;
    }
    if (reader->in_txn && commit.nextlsn != reader->txn_end) {
        char a[WP_LSN_STRLEN], b[WP_LSN_STRLEN], c[WP_LSN_STRLEN];
        reader->mispredicted++;
        wp_metric_add(reader->m_mispredicted, 1);
        wp_debug("pgoutput transaction %lld: commit at %s ends at %s, not at the predicted %s (a commit record of "
                 "more than a plain one's 46 bytes)%s; %llu mispredicted so far",
                 (long long)reader->xid, wp_lsn_format(reader->txn_final, a), wp_lsn_format(commit.nextlsn, b),
                 wp_lsn_format(reader->txn_end, c),
                 reader->pos.txn_end == reader->txn_end ? ": relabelling its rows" : "",
                 (unsigned long long)reader->mispredicted);
        /* rows (or dead letters) were staged under the prediction: staging rewrites their key */
        if (!reader->skipping && reader->pos.txn_end == reader->txn_end)
            wp_segment_add_relabel(current_segment(reader), reader->txn_end, commit.nextlsn);
        reader->txn_end = commit.nextlsn;
    }
    dispatch(reader, header_lsn, data, len, &commit, NULL);
    /*
     * A transaction that filled segments leaves the reader behind the
     * source; its segments so far all ended inside it.  Pushing now ends
     * one at its Commit, where a full or old batch can commit.
     */
    if (reader->txn_pushed)
        reader->boundary_due = true;
    reader->txn_pushed = false;
}

/*
 * pgoutput: one message, parsed (and, for a Truncate, each of its tables)
 * and dispatched.  A catalog failure stops the stream (reader->broken):
 * the message is fine, the reader could not name its types.
 */
static void pgoutput_message(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len)
{
    wp_change_t change;
    char err[WP_ERRLEN];
    int rc = wp_pgoutput_parse(reader->pgoutput, reader->decoder, data, len, &change, err, sizeof err);
    if (rc == WP_PGO_CHANGE && change.op == WP_OP_BEGIN) {
        pgoutput_begin(reader, header_lsn, data, len, &change);
        return;
    }
    if (rc == WP_PGO_BAD && len > 0 && data[0] == 'B') {
        /*
         * No commit position to key the transaction's rows by, nor to tell
         * whether it was staged before: a walsender never sends this (Begin
         * has a fixed layout), so the stream starts over.
         */
        wp_error("unreadable pgoutput Begin: %s; restarting the stream", err);
        reader->broken = true;
        return;
    }
    if ((rc == WP_PGO_CHANGE && change.op == WP_OP_COMMIT) || (rc == WP_PGO_BAD && len > 0 && data[0] == 'C')) {
        pgoutput_commit(reader, header_lsn, data, len, rc == WP_PGO_CHANGE ? &change : NULL, err);
        return;
    }
    for (;;) {
        if (rc == WP_PGO_RETRY) {
            if (!reader->broken)
                wp_error("could not decode a pgoutput change: %s", err);
            reader->broken = true;
            return;
        }
        if (rc == WP_PGO_NONE)
            return;
        dispatch(reader, header_lsn, data, len, rc == WP_PGO_CHANGE ? &change : NULL, err);
        if (rc != WP_PGO_CHANGE || change.op != WP_OP_TRUNCATE)
            return;
        rc = wp_pgoutput_next(reader->pgoutput, reader->decoder, &change, err, sizeof err);
    }
}

/* pgoutput: messages are dispatched as they arrive, rows keyed by a predicted commit end (see the top). */
static void pgoutput_xlogdata(wp_reader_t *reader, wp_lsn_t header_lsn, const char *data, size_t len)
{
    if (!reader->broken)
        pgoutput_message(reader, header_lsn, data, len);
}

/* Appends , "option" 'value' with the value's quotes doubled (the replication grammar's literal). */
static void put_option(wp_buf_t *sql, const char *option, const char *value)
{
    wp_buf_printf(sql, ", \"%s\" '", option);
    for (const char *p = value; *p; p++) {
        if (*p == '\'')
            wp_buf_putc(sql, '\'');
        wp_buf_putc(sql, *p);
    }
    wp_buf_putc(sql, '\'');
}

static void put_table_option(wp_buf_t *sql, const char *option, const wp_table_ref_t *tables, size_t n);

static void wal2json_options(const wp_reader_t *reader, wp_buf_t *sql)
{
    wp_buf_puts(sql, " (\"format-version\" '2', \"include-xids\" '1', \"include-timestamp\" '1', \"include-lsn\" '1', "
                     "\"include-type-oids\" '1', \"include-column-positions\" '1'");
    put_table_option(sql, "add-tables", reader->source->tables, reader->source->ntables);
    /* applied by wal2json before add-tables: an excluded table is never sent */
    put_table_option(sql, "filter-tables", reader->source->exclude_tables, reader->source->nexclude_tables);
    wp_buf_putc(sql, ')');
}

static void pgoutput_options(const wp_reader_t *reader, wp_buf_t *sql)
{
    /* publication_names is a list of identifiers: the name double-quoted, its quotes doubled */
    wp_buf_t names = WP_BUF_INIT;
    wp_buf_putc(&names, '"');
    for (const char *p = reader->source->publication; *p; p++) {
        if (*p == '"')
            wp_buf_putc(&names, '"');
        wp_buf_putc(&names, *p);
    }
    wp_buf_putc(&names, '"');
    wp_buf_puts(sql, " (\"proto_version\" '1'");
    put_option(sql, "publication_names", names.data);
    put_option(sql, "messages", "true");
    wp_buf_putc(sql, ')');
    wp_buf_free(&names);
}

static const input_ops_t wal2json_input = {"wal2json", wal2json_options, wal2json_xlogdata};
static const input_ops_t pgoutput_input = {"pgoutput", pgoutput_options, pgoutput_xlogdata};

/*
 * pgoutput's describe callback: the type names wal2json would print
 * (format_type with the column's typmod) and the attnums, from the
 * source's catalog on a plain connection opened when first needed.  Names
 * and OIDs go in as parameters (arrays).
 */
static int describe_relation(void *arg, uint32_t relid, wp_pgoutput_attr_t *attrs, size_t n, char *errbuf,
                             size_t errlen)
{
    wp_reader_t *reader = arg;
    wp_buf_t oids = WP_BUF_INIT, mods = WP_BUF_INIT, names = WP_BUF_INIT;
    PGresult *res = NULL;
    int rc = -1;
    char relid_text[16];
    if (reader->catalog == NULL || PQstatus(reader->catalog) != CONNECTION_OK) {
        char appname[96];
        if (reader->catalog)
            PQfinish(reader->catalog);
        snprintf(appname, sizeof appname, "walpipe_%s_catalog", reader->source->name);
        reader->catalog = wp_pg_connect_source(reader->source->conninfo, appname);
        if (reader->catalog == NULL || PQstatus(reader->catalog) != CONNECTION_OK) {
            snprintf(errbuf, errlen, "could not connect to the source to read its catalog: %s",
                     reader->catalog ? PQerrorMessage(reader->catalog) : "out of memory");
            wp_log_sanitize(errbuf);
            goto out;
        }
    }
    wp_buf_putc(&oids, '{');
    wp_buf_putc(&mods, '{');
    wp_buf_putc(&names, '{');
    for (size_t i = 0; i < n; i++) {
        wp_buf_printf(&oids, "%s%u", i ? "," : "", attrs[i].typeoid);
        wp_buf_printf(&mods, "%s%d", i ? "," : "", attrs[i].typmod);
        wp_buf_puts(&names, i ? ",\"" : "\"");
        for (const char *p = attrs[i].name; *p; p++) {
            if (*p == '"' || *p == '\\')
                wp_buf_putc(&names, '\\');
            wp_buf_putc(&names, *p);
        }
        wp_buf_putc(&names, '"');
    }
    wp_buf_putc(&oids, '}');
    wp_buf_putc(&mods, '}');
    wp_buf_putc(&names, '}');
    snprintf(relid_text, sizeof relid_text, "%u", relid);
    const char *params[4] = {relid_text, oids.data, mods.data, names.data};
    res = PQexecParams(reader->catalog,
                       "SELECT pg_catalog.format_type(c.oid, c.typmod), coalesce(a.attnum, 0) "
                       "FROM unnest($2::oid[], $3::int4[], $4::text[]) WITH ORDINALITY AS c(oid, typmod, name, i) "
                       "LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = $1::oid AND a.attname = c.name "
                       "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY c.i",
                       4, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || (size_t)PQntuples(res) != n) {
        snprintf(errbuf, errlen, "could not read the source's catalog: %s", PQerrorMessage(reader->catalog));
        wp_log_sanitize(errbuf);
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        attrs[i].type = PQgetisnull(res, (int)i, 0) ? NULL : wp_strdup(PQgetvalue(res, (int)i, 0));
        attrs[i].attnum = atoi(PQgetvalue(res, (int)i, 1));
    }
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&oids);
    wp_buf_free(&mods);
    wp_buf_free(&names);
    return rc;
}

/*
 * A keepalive's walEnd covers everything already sent to us.  When no
 * transaction is open, staging may record it as the checkpoint (so that a
 * quiet source's slot advances while other databases write); it is pushed as
 * a position-only segment and acknowledged once committed like any other.
 */
static void handle_keepalive(wp_reader_t *reader, wp_lsn_t wal_end)
{
    if (reader->in_txn || wal_end <= reader->pos.lsn || reader->pos.txn_end != WP_LSN_INVALID)
        return;
    reader->pos.lsn = wal_end;
}

/* ---- the loop ------------------------------------------------------------------------------ */

/*
 * Appends , "option" 'schema.table,...' for wal2json's add-tables or
 * filter-tables (nothing when n is 0): comma-separated, with space ' , . *
 * and backslash escaped by a backslash, and quotes doubled for the
 * replication grammar's literal.
 */
static void put_table_option(wp_buf_t *sql, const char *option, const wp_table_ref_t *tables, size_t n)
{
    if (n == 0)
        return;
    wp_buf_printf(sql, ", \"%s\" '", option);
    for (size_t i = 0; i < n; i++) {
        const char *parts[2] = {tables[i].schema, tables[i].table};
        if (i)
            wp_buf_putc(sql, ',');
        for (int k = 0; k < 2; k++) {
            if (k)
                wp_buf_putc(sql, '.');
            for (const char *p = parts[k]; *p; p++) {
                if (strchr(" ',.*\\", *p))
                    wp_buf_putc(sql, '\\');
                if (*p == '\'')
                    wp_buf_putc(sql, '\''); /* the replication grammar doubles quotes in literals */
                wp_buf_putc(sql, *p);
            }
        }
    }
    wp_buf_putc(sql, '\'');
}

int wp_reader_check_filters(wp_reader_t *reader)
{
    return wp_filter_check_keys(reader->filter, reader->conn);
}

static int start_replication(wp_reader_t *reader, bool *fatal)
{
    int rc = -1;
    wp_buf_t sql = WP_BUF_INIT;
    char lsn[WP_LSN_STRLEN];
    wp_buf_printf(&sql, "START_REPLICATION SLOT \"%s\" LOGICAL %s", reader->source->slot,
                  wp_lsn_format(reader->start.lsn, lsn));
    reader->input->options(reader, &sql);
    PGresult *res = PQexec(reader->conn, sql.data);
    if (PQresultStatus(res) != PGRES_COPY_BOTH) {
        log_result_error("could not start replication", reader->conn, res, fatal);
        goto out;
    }
    wp_info("streaming from slot \"%s\" at %s", reader->source->slot, lsn);
    rc = 0;
out:
    PQclear(res);
    wp_buf_free(&sql);
    return rc;
}

/* Waits for the socket to become readable, at most timeout_ms.  Returns -1 on error. */
static int wait_socket(PGconn *conn, int timeout_ms)
{
    struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
    if (pfd.fd < 0) {
        wp_error("source connection has no socket");
        return -1;
    }
    int n = poll(&pfd, 1, timeout_ms);
    if (n < 0 && errno != EINTR) {
        wp_error("could not poll the source connection: %m");
        return -1;
    }
    return 0;
}

/*
 * Graceful stop: stage what we have, wait for its commit, acknowledge it,
 * end the COPY.  Inside a pgoutput transaction whose Commit has not arrived
 * the stager rolls the batch back instead (its rows carry a predicted key):
 * then what staging held before is acknowledged, and the source sends the
 * rest again on the next start.
 */
static int finish_stream(wp_reader_t *reader, wp_queue_t *queue)
{
    if (push_segment(reader, queue, true, false) != 0)
        return -1;
    while (!wp_queue_finished(queue)) {
        if (wp_queue_failed(queue))
            return -1;
        if (maybe_feedback(reader, queue) != 0)
            return -1;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (send_feedback(reader, queue, false) != 0)
        return -1;
    char lsn[WP_LSN_STRLEN];
    wp_info("stopped; acknowledged %s", wp_lsn_format(reader->acked, lsn));
    /* everything staged is acknowledged already; a failed goodbye only costs the walsender a timeout */
    if (PQputCopyEnd(reader->conn, NULL) != 1 || PQflush(reader->conn) != 0)
        wp_warn("could not end the replication stream cleanly: %s", PQerrorMessage(reader->conn));
    return 0;
}

int wp_reader_stream(wp_reader_t *reader, const wp_position_t *start, wp_queue_t *queue, bool *fatal)
{
    int rc = -1;
    char *buf = NULL;
    *fatal = false;
    reader->start = *start;
    reader->pos = *start;
    reader->pushed = *start;
    reader->in_txn = reader->skipping = false;
    reader->txn_pushed = reader->boundary_due = false;
    reader->acked = WP_LSN_INVALID;
    reader->received = WP_LSN_INVALID;
    reader->last_feedback_ms = 0;
    reader->last_position_push_ms = wp_now_ms();
    reader->dirty_since_ms = 0;

    if (start_replication(reader, fatal) != 0)
        goto fail;

    for (;;) {
        if (wp_stop_requested()) {
            rc = finish_stream(reader, queue);
            if (rc != 0)
                goto fail;
            goto out;
        }
        if (wp_queue_failed(queue))
            goto fail;
        if (maybe_feedback(reader, queue) != 0)
            goto fail;

        int n = PQgetCopyData(reader->conn, &buf, 1);
        if (n == 0) {
            /*
             * Nothing buffered.  Rows (or a transaction end) waiting for at
             * least SEGMENT_LINGER_MS go to the stager now; younger ones wait
             * for the socket that long at most.  A position that only moved
             * (empty transactions, keepalives) goes on the status timer.
             */
            int64_t now = wp_now_ms();
            int wait = POLL_MAX_MS;
            bool position_due = position_advanced(reader) &&
                                now - reader->last_position_push_ms >= reader->source->status_interval_ms;
            if (reader->dirty_since_ms != 0) {
                int64_t left = reader->dirty_since_ms + SEGMENT_LINGER_MS - now;
                if (left <= 0)
                    position_due = true;
                else
                    wait = (int)left;
            }
            if (position_due) {
                if (push_segment(reader, queue, false, false) != 0)
                    goto fail;
                wait = POLL_MAX_MS;
            }
            if (wait_socket(reader->conn, wait) != 0)
                goto fail;
            if (!PQconsumeInput(reader->conn)) {
                log_result_error("lost the source connection", reader->conn, NULL, fatal);
                goto fail;
            }
            continue;
        }
        if (n == -1) {
            PGresult *res = PQgetResult(reader->conn);
            if (PQresultStatus(res) != PGRES_COMMAND_OK)
                log_source_error("replication stream ended", PQresultErrorMessage(res),
                                 PQresultErrorField(res, PG_DIAG_SQLSTATE), fatal);
            else
                wp_error("source ended the replication stream");
            PQclear(res);
            goto fail;
        }
        if (n == -2) {
            log_result_error("could not read from the source", reader->conn, NULL, fatal);
            goto fail;
        }

        if (buf[0] == 'w' && n >= 25) {
            wp_lsn_t data_start = get_u64(buf + 1);
            if (data_start > reader->received)
                reader->received = data_start;
            reader->input->xlogdata(reader, data_start, buf + 25, (size_t)n - 25);
            if (reader->broken)
                goto fail;
            wp_segment_t *segment = reader->segment;
            bool full = segment && (segment->copy.len >= SEGMENT_MAX_BYTES || segment->rows >= SEGMENT_MAX_ROWS);
            if ((full || reader->boundary_due) && push_segment(reader, queue, false, true) != 0)
                goto fail;
        } else if (buf[0] == 'k' && n >= 18) {
            wp_lsn_t wal_end = get_u64(buf + 1);
            if (wal_end > reader->received)
                reader->received = wal_end;
            handle_keepalive(reader, wal_end);
            if (buf[17] && send_feedback(reader, queue, false) != 0)
                goto fail;
        } else {
            wp_error("unexpected replication message type 0x%02x of %d bytes", (unsigned char)buf[0], n);
            goto fail;
        }
        PQfreemem(buf);
        buf = NULL;
    }

fail:
    rc = -1;
    wp_queue_fail(queue);
out:
    if (buf)
        PQfreemem(buf);
    wp_reader_close(reader);
    return rc;
}
