/*
 * pgoutput.c: pgoutput protocol version 1 messages -> wal2json-equivalent changes.
 *
 * Message layouts (big-endian integers, NUL-terminated strings):
 *   B  Int64 final_lsn, Int64 commit_ts, Int32 xid
 *   C  Int8 flags, Int64 commit_lsn, Int64 end_lsn, Int64 commit_ts
 *   O  Int64 origin_lsn, String name                               (ignored)
 *   R  Int32 relid, String nspname, String relname, Int8 replident, Int16 natts,
 *      natts x (Int8 flags (1 = part of the replica identity), String name, Int32 typeoid, Int32 typmod)
 *   Y  Int32 typeoid, String nspname, String typname                (ignored: format_type names types)
 *   I  Int32 relid, 'N' tuple
 *   U  Int32 relid, ['K' tuple | 'O' tuple], 'N' tuple
 *   D  Int32 relid, 'K' tuple | 'O' tuple
 *   T  Int32 nrels, Int8 options, nrels x Int32 relid
 *   M  Int8 flags (1 = transactional), Int64 lsn, String prefix, Int32 len, len bytes
 *   tuple: Int16 natts, natts x ('n' | 'u' | 't' Int32 len, len bytes | 'b' ...)
 * (commit_ts: microseconds since 2000-01-01 UTC.)
 *
 * Equivalences with wal2json (see decoder.h for the payload):
 *  - "columns" are the new tuple's columns less 'u' (unchanged TOAST), each
 *    with its attnum as "position"; "identity" is the old tuple ('K': the
 *    identity columns, 'O': the whole old row), or, for an UPDATE that did not
 *    touch the key, the new tuple's identity columns (wal2json takes them from
 *    the new row too).  "before" when the identity is the whole row.
 *  - bool t/f -> true/false; bytea "\x.." -> its hex; numbers keep their
 *    text.  NaN and +-Infinity keep theirs too (wal2json prints null).
 *  - A Truncate of n tables is n truncate changes, in the message's order.
 *
 * Invariant: no read goes past a message's end (every read is checked by
 * the cursor), and every relation a row names was described by a Relation
 * message of this stream first.
 */
#include "wp_setup.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "pgoutput.h"

#define PG_EPOCH_OFFSET_US (946684800LL * 1000000LL)

typedef struct rel_col {
    char *name;
    uint32_t typeoid;
    int32_t typmod;
    bool key;    /* part of the replica identity */
    char *type;  /* as wal2json prints it; NULL until described */
    int attnum;  /* 0 unknown */
} rel_col_t;

typedef struct rel {
    uint32_t relid;
    char *schema;
    char *table;
    char replident; /* d, n, f, i */
    bool left_out;  /* not in tables, or in exclude_tables */
    bool described; /* types and attnums known */
    rel_col_t *cols;
    size_t ncols;
} rel_t;

struct wp_pgoutput {
    const wp_source_config_t *source;
    wp_pgoutput_describe_fn describe;
    void *describe_arg;

    rel_t **rels; /* open addressing by relid; cap a power of two */
    size_t rels_cap;
    size_t nrels;

    /* the transaction being read */
    bool has_xid;
    int64_t xid;
    int64_t commit_time;
    char ts[96]; /* commit time as text (wp_change_t.timestamp) */

    /* the last Truncate, for wp_pgoutput_next */
    const char *trunc; /* its relids; NULL when done */
    uint32_t trunc_left;
    const char *trunc_end;

    /* columns handed to the decoder, reused */
    wp_decoder_column_t *cols[2];
    size_t cols_cap[2];

};

/* ---- reading ------------------------------------------------------------------------------- */

typedef struct cursor {
    const unsigned char *p;
    const unsigned char *end;
} cursor_t;

static bool get_u8(cursor_t *c, uint8_t *v)
{
    if (c->end - c->p < 1)
        return false;
    *v = *c->p++;
    return true;
}

static bool get_u16(cursor_t *c, uint16_t *v)
{
    if (c->end - c->p < 2)
        return false;
    *v = (uint16_t)((c->p[0] << 8) | c->p[1]);
    c->p += 2;
    return true;
}

static bool get_u32(cursor_t *c, uint32_t *v)
{
    if (c->end - c->p < 4)
        return false;
    *v = ((uint32_t)c->p[0] << 24) | ((uint32_t)c->p[1] << 16) | ((uint32_t)c->p[2] << 8) | c->p[3];
    c->p += 4;
    return true;
}

static bool get_u64(cursor_t *c, uint64_t *v)
{
    uint32_t hi, lo;
    if (!get_u32(c, &hi) || !get_u32(c, &lo))
        return false;
    *v = ((uint64_t)hi << 32) | lo;
    return true;
}

/* A NUL-terminated string inside the message (borrowed). */
static bool get_str(cursor_t *c, const char **s)
{
    const unsigned char *nul = memchr(c->p, '\0', (size_t)(c->end - c->p));
    if (nul == NULL)
        return false;
    *s = (const char *)c->p;
    c->p = nul + 1;
    return true;
}

static int bad(char *errbuf, size_t errlen, const char *fmt, ...) WP_PRINTF(3, 4);

static int bad(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (errbuf && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, errlen, fmt, ap);
        va_end(ap);
        wp_log_sanitize(errbuf);
    }
    return WP_PGO_BAD;
}

/* ---- relation cache ------------------------------------------------------------------------ */

static void rel_free(rel_t *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->ncols; i++) {
        free(r->cols[i].name);
        free(r->cols[i].type);
    }
    free(r->cols);
    free(r->schema);
    free(r->table);
    free(r);
}

static size_t rel_slot(const wp_pgoutput_t *p, uint32_t relid)
{
    size_t j = (relid * 2654435761u) & (p->rels_cap - 1);
    while (p->rels[j] && p->rels[j]->relid != relid)
        j = (j + 1) & (p->rels_cap - 1);
    return j;
}

static rel_t *rel_find(const wp_pgoutput_t *p, uint32_t relid)
{
    if (p->rels_cap == 0)
        return NULL;
    return p->rels[rel_slot(p, relid)];
}

/* Stores r, replacing the relation of the same id. */
static void rel_put(wp_pgoutput_t *p, rel_t *r)
{
    if ((p->nrels + 1) * 2 > p->rels_cap) {
        size_t cap = p->rels_cap ? p->rels_cap * 2 : 64;
        rel_t **old = p->rels;
        size_t oldcap = p->rels_cap;
        p->rels = wp_calloc(cap, sizeof *p->rels);
        p->rels_cap = cap;
        for (size_t i = 0; i < oldcap; i++)
            if (old[i])
                p->rels[rel_slot(p, old[i]->relid)] = old[i];
        free(old);
    }
    size_t j = rel_slot(p, r->relid);
    if (p->rels[j])
        rel_free(p->rels[j]);
    else
        p->nrels++;
    p->rels[j] = r;
}

static bool table_listed(const wp_table_ref_t *tables, size_t n, const char *schema, const char *table)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(tables[i].schema, schema) == 0 && strcmp(tables[i].table, table) == 0)
            return true;
    return false;
}

/*
 * wal2json prints a type name that format_type quoted (it starts with '"')
 * without adding quotes of its own, so the JSON string holds the name
 * without them: "My Type" reads My Type.  Done the same here, in place.
 */
static void type_as_wal2json(char *type)
{
    size_t len = strlen(type);
    if (len >= 2 && type[0] == '"' && type[len - 1] == '"') {
        memmove(type, type + 1, len - 2);
        type[len - 2] = '\0';
    }
}

/* Asks the describe callback for r's type names and attnums, once. */
static int rel_describe(wp_pgoutput_t *p, rel_t *r, char *errbuf, size_t errlen)
{
    if (r->described)
        return 0;
    int rc = WP_PGO_RETRY;
    wp_pgoutput_attr_t *attrs = wp_calloc(r->ncols ? r->ncols : 1, sizeof *attrs);
    for (size_t i = 0; i < r->ncols; i++) {
        attrs[i].name = r->cols[i].name;
        attrs[i].typeoid = r->cols[i].typeoid;
        attrs[i].typmod = r->cols[i].typmod;
    }
    if (p->describe == NULL || p->describe(p->describe_arg, r->relid, attrs, r->ncols, errbuf, errlen) != 0) {
        if (p->describe == NULL && errbuf && errlen)
            snprintf(errbuf, errlen, "no catalog to name the types of relation %u", r->relid);
        for (size_t i = 0; i < r->ncols; i++)
            free(attrs[i].type);
        goto out;
    }
    for (size_t i = 0; i < r->ncols; i++) {
        free(r->cols[i].type);
        r->cols[i].type = attrs[i].type ? attrs[i].type : wp_strdup("???");
        type_as_wal2json(r->cols[i].type);
        r->cols[i].attnum = attrs[i].attnum;
    }
    r->described = true;
    rc = 0;
out:
    free(attrs);
    return rc;
}

/* ---- messages ------------------------------------------------------------------------------ */

static int parse_relation(wp_pgoutput_t *p, cursor_t *c, char *errbuf, size_t errlen)
{
    uint32_t relid;
    const char *schema, *table;
    uint8_t replident;
    uint16_t natts;
    if (!get_u32(c, &relid) || !get_str(c, &schema) || !get_str(c, &table) || !get_u8(c, &replident) ||
        !get_u16(c, &natts))
        return bad(errbuf, errlen, "Relation message is cut short");
    rel_t *r = wp_calloc(1, sizeof *r);
    r->relid = relid;
    r->schema = wp_strdup(schema[0] ? schema : "pg_catalog");
    r->table = wp_strdup(table);
    r->replident = (char)replident;
    r->cols = wp_calloc(natts ? natts : 1, sizeof *r->cols);
    for (uint16_t i = 0; i < natts; i++) {
        uint8_t flags;
        const char *name;
        uint32_t typeoid, typmod;
        if (!get_u8(c, &flags) || !get_str(c, &name) || !get_u32(c, &typeoid) || !get_u32(c, &typmod)) {
            rel_free(r);
            return bad(errbuf, errlen, "Relation message of \"%.64s\".\"%.64s\" is cut short at column %u", schema,
                       table, (unsigned)i + 1);
        }
        r->cols[i].name = wp_strdup(name);
        r->cols[i].typeoid = typeoid;
        r->cols[i].typmod = (int32_t)typmod;
        r->cols[i].key = (flags & 1) != 0;
        r->ncols++;
    }
    if (c->p != c->end) {
        rel_free(r);
        return bad(errbuf, errlen, "Relation message has %zu bytes after its columns", (size_t)(c->end - c->p));
    }
    const wp_source_config_t *s = p->source;
    if (s) {
        r->left_out = (s->ntables > 0 && !table_listed(s->tables, s->ntables, r->schema, r->table)) ||
                      table_listed(s->exclude_tables, s->nexclude_tables, r->schema, r->table);
    }
    rel_put(p, r);
    return WP_PGO_NONE;
}

/* Room for n columns in list k. */
static wp_decoder_column_t *cols_room(wp_pgoutput_t *p, int k, size_t n)
{
    if (n > p->cols_cap[k]) {
        p->cols_cap[k] = n;
        p->cols[k] = wp_realloc(p->cols[k], n * sizeof *p->cols[k]);
    }
    return p->cols[k];
}

/*
 * Reads a tuple of r into list k.  only_key keeps the identity columns only
 * (a 'K' tuple, or the key taken from a new row).  Columns sent as 'u'
 * (unchanged TOAST) are left out.  *n receives the count.
 */
static int read_tuple(wp_pgoutput_t *p, cursor_t *c, const rel_t *r, int k, bool only_key, size_t *n,
                      char *errbuf, size_t errlen)
{
    uint16_t natts;
    if (!get_u16(c, &natts))
        return bad(errbuf, errlen, "tuple is cut short");
    if (natts != r->ncols)
        return bad(errbuf, errlen, "tuple has %u columns, relation \"%.64s\".\"%.64s\" %zu", (unsigned)natts,
                   r->schema, r->table, r->ncols);
    wp_decoder_column_t *out = cols_room(p, k, natts ? natts : 1);
    size_t m = 0;
    for (uint16_t i = 0; i < natts; i++) {
        uint8_t kind;
        uint32_t len = 0;
        const char *text = NULL;
        if (!get_u8(c, &kind))
            return bad(errbuf, errlen, "tuple is cut short at column %u", (unsigned)i + 1);
        switch (kind) {
        case 'n':
        case 'u':
            break;
        case 't':
            if (!get_u32(c, &len) || (size_t)(c->end - c->p) < len)
                return bad(errbuf, errlen, "tuple is cut short in the value of column %u", (unsigned)i + 1);
            text = (const char *)c->p;
            c->p += len;
            break;
        default:
            return bad(errbuf, errlen, "tuple column %u has kind 0x%02x (not n, u or t)", (unsigned)i + 1,
                       (unsigned)kind);
        }
        const rel_col_t *rc = &r->cols[i];
        if (kind == 'u' || (only_key && !rc->key))
            continue;
        out[m] = (wp_decoder_column_t){.name = rc->name,
                                       .type = rc->type,
                                       .typeoid = rc->typeoid,
                                       .position = rc->attnum,
                                       .isnull = kind == 'n',
                                       .text = text,
                                       .len = len};
        m++;
    }
    *n = m;
    return 0;
}

/* A change of relation relid: its cached description, described; NULL with *rc set otherwise. */
static rel_t *change_rel(wp_pgoutput_t *p, uint32_t relid, int *rc, char *errbuf, size_t errlen)
{
    rel_t *r = rel_find(p, relid);
    if (r == NULL) {
        *rc = bad(errbuf, errlen, "change of relation %u, which no Relation message described", relid);
        return NULL;
    }
    if (r->left_out) {
        *rc = WP_PGO_NONE;
        return NULL;
    }
    *rc = rel_describe(p, r, errbuf, errlen);
    return *rc == 0 ? r : NULL;
}

/* The fields every change of the current transaction shares. */
static void txn_fields(const wp_pgoutput_t *p, wp_change_t *change)
{
    change->has_xid = p->has_xid;
    change->xid = p->xid;
    change->timestamp = p->has_xid ? p->ts : NULL;
    change->commit_time = p->commit_time;
}

static void set_commit_time(wp_pgoutput_t *p, int64_t us)
{
    p->commit_time = us;
    time_t secs = (time_t)((us + PG_EPOCH_OFFSET_US) / 1000000 - ((us + PG_EPOCH_OFFSET_US) % 1000000 < 0));
    int64_t frac = (us + PG_EPOCH_OFFSET_US) - (int64_t)secs * 1000000;
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(p->ts, sizeof p->ts, "%04d-%02d-%02d %02d:%02d:%02d.%06d+00", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)frac);
}

static int parse_row(wp_pgoutput_t *p, wp_decoder_t *decoder, cursor_t *c, wp_op_t op, wp_change_t *change,
                     char *errbuf, size_t errlen)
{
    uint32_t relid;
    uint8_t tag;
    int rc;
    size_t nnew = 0, nold = 0;
    bool has_old = false, old_full = false;
    if (!get_u32(c, &relid))
        return bad(errbuf, errlen, "%s message is cut short", wp_op_name(op));
    rel_t *r = change_rel(p, relid, &rc, errbuf, errlen);
    if (r == NULL)
        return rc;
    if (!get_u8(c, &tag))
        return bad(errbuf, errlen, "%s message is cut short", wp_op_name(op));
    if (op != WP_OP_INSERT && (tag == 'K' || tag == 'O')) {
        has_old = true;
        old_full = tag == 'O';
        if (read_tuple(p, c, r, 1, tag == 'K', &nold, errbuf, errlen) != 0)
            goto named;
        if (op == WP_OP_UPDATE && !get_u8(c, &tag))
            return bad(errbuf, errlen, "update message is cut short");
    } else if (op == WP_OP_DELETE) {
        return bad(errbuf, errlen, "delete message has tuple tag 0x%02x (not K or O)", (unsigned)tag);
    }
    if (op != WP_OP_DELETE) {
        if (tag != 'N')
            return bad(errbuf, errlen, "%s message has tuple tag 0x%02x (not N)", wp_op_name(op), (unsigned)tag);
        if (read_tuple(p, c, r, 0, false, &nnew, errbuf, errlen) != 0)
            goto named;
    }
    if (c->p != c->end) {
        bad(errbuf, errlen, "%s message has %zu bytes after its tuples", wp_op_name(op), (size_t)(c->end - c->p));
        goto named;
    }
    if (op == WP_OP_UPDATE && !has_old && r->replident != 'n') {
        /* the key did not change: wal2json takes it from the new row */
        size_t nk = 0;
        wp_decoder_column_t *keys = cols_room(p, 1, nnew ? nnew : 1);
        for (size_t i = 0, j = 0; i < r->ncols && j < nnew; i++) {
            if (strcmp(p->cols[0][j].name, r->cols[i].name) != 0)
                continue; /* a 'u' column, absent from the new row */
            if (r->cols[i].key)
                keys[nk++] = p->cols[0][j];
            j++;
        }
        has_old = nk > 0;
        nold = nk;
    }
    /* "before" when the identity is the whole row; wal2json tells it by the count */
    if (has_old && !old_full)
        old_full = nold == r->ncols;
    wp_change_t in = {.op = op, .schema = r->schema, .table = r->table};
    txn_fields(p, &in);
    if (wp_decoder_load(decoder, &in, p->cols[0], nnew, p->cols[1], nold, has_old, old_full, change, errbuf,
                        errlen) != 0)
        return WP_PGO_BAD;
    return WP_PGO_CHANGE;
named:
    wp_decoder_set_rejected(decoder, r->schema, r->table); /* the table, for the dead letter */
    return WP_PGO_BAD;
}

/* The next relation of the current Truncate: WP_PGO_CHANGE, WP_PGO_NONE when done, or an error. */
static int truncate_next(wp_pgoutput_t *p, wp_decoder_t *decoder, wp_change_t *change, char *errbuf, size_t errlen)
{
    while (p->trunc && p->trunc_left > 0) {
        cursor_t c = {(const unsigned char *)p->trunc, (const unsigned char *)p->trunc_end};
        uint32_t relid;
        if (!get_u32(&c, &relid)) {
            p->trunc = NULL;
            return bad(errbuf, errlen, "Truncate message is cut short");
        }
        p->trunc = (const char *)c.p;
        p->trunc_left--;
        int rc;
        rel_t *r = change_rel(p, relid, &rc, errbuf, errlen);
        if (r == NULL) {
            if (rc == WP_PGO_NONE)
                continue;
            return rc;
        }
        wp_change_t in = {.op = WP_OP_TRUNCATE, .schema = r->schema, .table = r->table};
        txn_fields(p, &in);
        if (wp_decoder_load(decoder, &in, NULL, 0, NULL, 0, false, false, change, errbuf, errlen) != 0)
            return WP_PGO_BAD;
        return WP_PGO_CHANGE;
    }
    p->trunc = NULL;
    return WP_PGO_NONE;
}

int wp_pgoutput_parse(wp_pgoutput_t *p, wp_decoder_t *decoder, const char *data, size_t len, wp_change_t *change,
                      char *errbuf, size_t errlen)
{
    cursor_t c = {(const unsigned char *)data, (const unsigned char *)data + len};
    uint8_t kind;
    memset(change, 0, sizeof *change);
    if (errbuf && errlen)
        errbuf[0] = '\0';
    p->trunc = NULL;
    /* whatever comes, the decoder's previous change is gone */
    wp_decoder_load(decoder, &(wp_change_t){.op = WP_OP_BEGIN}, NULL, 0, NULL, 0, false, false, change, NULL, 0);
    memset(change, 0, sizeof *change);
    if (!get_u8(&c, &kind))
        return bad(errbuf, errlen, "empty message");
    switch (kind) {
    case 'B': {
        uint64_t final_lsn, ts;
        uint32_t xid;
        if (!get_u64(&c, &final_lsn) || !get_u64(&c, &ts) || !get_u32(&c, &xid) || c.p != c.end)
            return bad(errbuf, errlen, "Begin message is not 21 bytes long");
        p->has_xid = true;
        p->xid = xid;
        set_commit_time(p, (int64_t)ts);
        change->op = WP_OP_BEGIN;
        txn_fields(p, change);
        change->lsn = final_lsn;
        return WP_PGO_CHANGE;
    }
    case 'C': {
        uint8_t flags;
        uint64_t commit_lsn, end_lsn, ts;
        if (!get_u8(&c, &flags) || !get_u64(&c, &commit_lsn) || !get_u64(&c, &end_lsn) || !get_u64(&c, &ts) ||
            c.p != c.end)
            return bad(errbuf, errlen, "Commit message is not 26 bytes long");
        set_commit_time(p, (int64_t)ts);
        change->op = WP_OP_COMMIT;
        txn_fields(p, change);
        change->lsn = commit_lsn;
        change->nextlsn = end_lsn;
        p->has_xid = false;
        return WP_PGO_CHANGE;
    }
    case 'O':
    case 'Y':
        return WP_PGO_NONE; /* origins are not reported (wal2json leaves them out by default); types by format_type */
    case 'R':
        return parse_relation(p, &c, errbuf, errlen);
    case 'I':
        return parse_row(p, decoder, &c, WP_OP_INSERT, change, errbuf, errlen);
    case 'U':
        return parse_row(p, decoder, &c, WP_OP_UPDATE, change, errbuf, errlen);
    case 'D':
        return parse_row(p, decoder, &c, WP_OP_DELETE, change, errbuf, errlen);
    case 'T': {
        uint32_t nrels;
        uint8_t options;
        if (!get_u32(&c, &nrels) || !get_u8(&c, &options) || (size_t)(c.end - c.p) != (size_t)nrels * 4)
            return bad(errbuf, errlen, "Truncate message does not hold the relation ids it counts");
        p->trunc = (const char *)c.p;
        p->trunc_left = nrels;
        p->trunc_end = (const char *)c.end;
        return truncate_next(p, decoder, change, errbuf, errlen);
    }
    case 'M': {
        uint8_t flags;
        uint64_t lsn;
        const char *prefix;
        uint32_t clen;
        if (!get_u8(&c, &flags) || !get_u64(&c, &lsn) || !get_str(&c, &prefix) || !get_u32(&c, &clen) ||
            (size_t)(c.end - c.p) != clen)
            return bad(errbuf, errlen, "Message message is cut short or too long");
        wp_change_t in = {.op = WP_OP_MESSAGE,
                          .lsn = lsn,
                          .transactional = (flags & 1) != 0,
                          .prefix = prefix,
                          .content = (const char *)c.p,
                          .content_len = clen};
        if (in.transactional)
            txn_fields(p, &in); /* wal2json: xid and timestamp null outside a transaction */
        if (wp_decoder_load(decoder, &in, NULL, 0, NULL, 0, false, false, change, errbuf, errlen) != 0)
            return WP_PGO_BAD;
        return WP_PGO_CHANGE;
    }
    default:
        return bad(errbuf, errlen, "unknown pgoutput message type 0x%02x", (unsigned)kind);
    }
}

int wp_pgoutput_next(wp_pgoutput_t *p, wp_decoder_t *decoder, wp_change_t *change, char *errbuf, size_t errlen)
{
    memset(change, 0, sizeof *change);
    return truncate_next(p, decoder, change, errbuf, errlen);
}

/* ---- lifecycle ----------------------------------------------------------------- */

wp_pgoutput_t *wp_pgoutput_create(const wp_source_config_t *source, wp_pgoutput_describe_fn describe, void *arg)
{
    wp_pgoutput_t *p = wp_calloc(1, sizeof *p);
    p->source = source;
    p->describe = describe;
    p->describe_arg = arg;
    return p;
}

void wp_pgoutput_reset(wp_pgoutput_t *p)
{
    for (size_t i = 0; i < p->rels_cap; i++) {
        rel_free(p->rels[i]);
        p->rels[i] = NULL;
    }
    p->nrels = 0;
    p->trunc = NULL;
}

void wp_pgoutput_destroy(wp_pgoutput_t *p)
{
    if (p == NULL)
        return;
    wp_pgoutput_reset(p);
    free(p->rels);
    free(p->cols[0]);
    free(p->cols[1]);
    free(p);
}

/*
 * WAL layout (PostgreSQL's xlog.c and xlogreader.c): records follow one
 * another MAXALIGNed (8 bytes) in the pages' space after each page header
 * (XLOG_BLCKSZ 8192; the header is 24 bytes, 40 on a segment's first
 * page); a record may cross a page, its rest following the next header.  A
 * record's end (what a Commit's end_lsn is) is then: in one page, its start
 * plus its MAXALIGNed length; crossing, the next page's start plus the header
 * plus its MAXALIGNed rest.  walpipe assumes the default 16 MB segments: at
 * another size a commit record crossing onto a segment's first page is
 * mispredicted, which costs a relabel, never a wrong key.
 */
#define WAL_PAGE 8192u
#define WAL_SEGMENT (16u << 20)
#define WAL_SHORT_HEADER 24u
#define WAL_LONG_HEADER 40u
#define WAL_ALIGN(n) (((n) + 7u) & ~(uint64_t)7u)
/*
 * A plain commit record under wal_level = logical: the record header (24),
 * the main data's block header (2), xl_xact_commit (8), xl_xact_xinfo (4),
 * xl_xact_dbinfo (8, logical decoding needs it).  Subtransactions, dropped
 * relations, invalidations (DDL) or an origin make it longer; never shorter.
 */
#define PLAIN_COMMIT_RECORD 46u

wp_lsn_t wp_pgoutput_predict_end(wp_lsn_t commit_start)
{
    uint64_t in_page = commit_start % WAL_PAGE;
    uint64_t room = WAL_PAGE - in_page;
    if (PLAIN_COMMIT_RECORD <= room)
        return commit_start + WAL_ALIGN(PLAIN_COMMIT_RECORD);
    uint64_t next_page = commit_start - in_page + WAL_PAGE;
    uint64_t header = next_page % WAL_SEGMENT == 0 ? WAL_LONG_HEADER : WAL_SHORT_HEADER;
    return next_page + header + WAL_ALIGN(PLAIN_COMMIT_RECORD - room);
}
