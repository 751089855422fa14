/*
 * decoder.c: wal2json format-version-2 messages -> wp_change_t, payloads and shapes.
 *
 * A message is read in one pass by yajl's event parser (no tree is built):
 * the callbacks below keep the top-level fields and the "columns" /
 * "identity" entries the decoder needs, as jval_t values whose text lives in
 * decoder->text, and skip everything else.  parse_message() then validates
 * what was kept, in a fixed order, so every message gets the same reason.
 *
 * The decoder owns: the kept values of the last message that parsed (their
 * text in decoder->text), the column arrays reused from call to call, and a
 * small per-table cache (column count of the table's rows, for the "key" vs
 * "before" heuristic, and the table's recent shapes with their ids).
 *
 * Invariants:
 *  - After a successful wp_decoder_parse, every pointer in the returned
 *    wp_change_t and in decoder->lists borrows from decoder->text until
 *    the next parse or wp_decoder_destroy.  After a failed parse the decoder
 *    holds no message (valid == false).
 *  - A message that parses has been validated completely, so
 *    wp_decoder_payload and wp_decoder_shape cannot fail on it and always
 *    write valid JSON that PostgreSQL accepts as jsonb: every string kept is
 *    strictly valid UTF-8 (no overlong forms, no surrogates, nothing above
 *    U+10FFFF; checked here, because yajl's own check is looser) and holds
 *    no NUL (\u0000, which jsonb cannot store); \u escapes are paired
 *    surrogates or none (yajl would turn a lone one into '?').
 *  - No number is ever rounded: yajl hands over each number's text as
 *    printed, and the value rules decide per column type whether that text
 *    goes out as a JSON number or as a JSON string.
 *
 * A decoder is used by one thread at a time; it has no global state.
 */
#include "wp_setup.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yajl/yajl_parse.h>

#include "decoder.h"
#include "log.h"
#include "utf8.h"
#include "yajl_mem.h"

/* Shapes remembered per table: I, U without TOAST columns, D identity, one spare. */
#define SHAPE_SLOTS 4
/* The table cache is emptied when it reaches this many tables (it is only a cache). */
#define MAX_TABLES 16384
/* decoder->text is released when it grew past this for a huge message and the next one is small. */
#define TEXT_KEEP (1024 * 1024)
/* Largest integer a double holds exactly, as decimal text. */
#define INT53_TEXT "9007199254740992"

/*
 * jsonb stores a string's length, and the size of each object's contents, in
 * 28 bits (JENTRY_OFFLENMASK): staging refuses a payload beyond that.
 */
#define JSONB_MAX_BYTES ((size_t)0x0FFFFFFF)
/*
 * Bytes a scalar may take in jsonb beyond its text: alignment (3), varlena
 * header (4) and numeric header (4); a numeric's digits take fewer bytes
 * than their text.  The 2 a bytea's "\x" adds are counted on top.
 */
#define JSONB_SCALAR_EXTRA 16
/* A container's alignment (3) and header (4); each member adds a JEntry (4), two for an object's pair. */
#define JSONB_CONTAINER_EXTRA 7
#define JSONB_PAIR_EXTRA 8

#define FNV_OFFSET UINT64_C(14695981039346656037)
#define FNV_PRIME UINT64_C(1099511628211)

/* How a column's value is written into the payload; see the value rules in decoder.h. */
typedef enum vclass {
    VC_OTHER = 0, /* the type's text output as a JSON string */
    VC_BOOL,
    VC_INT,     /* int2, int4, oid: number */
    VC_INT8,    /* number within +-2^53, else string */
    VC_FLOAT,   /* float4, float8: number text verbatim */
    VC_NUMERIC, /* string, exact text */
    VC_BYTEA,   /* "\\x" + hex */
} vclass_t;

/* What kind of JSON value a key held; JK_ABSENT when the key was not there. */
typedef enum jkind {
    JK_ABSENT = 0,
    JK_NULL,
    JK_FALSE,
    JK_TRUE,
    JK_NUMBER,
    JK_STRING,
    JK_ARRAY,
    JK_OBJECT,
} jkind_t;

/* One kept value.  s is NUL-terminated text in decoder->text: a number's text as printed, or a decoded string. */
typedef struct jval {
    jkind_t kind;
    const char *s; /* JK_NUMBER and JK_STRING only */
    size_t len;
} jval_t;

/* The keys of a "columns"/"identity" entry the decoder reads. */
typedef enum ckey {
    CK_NONE = -1,
    CK_NAME,
    CK_TYPE,
    CK_TYPEOID,
    CK_VALUE,
    CK_POSITION,
    CK_COUNT,
} ckey_t;

/* One entry of "columns" or "identity". */
typedef struct col {
    jval_t key[CK_COUNT]; /* name, type, typeoid, value, position as kept */
    bool not_object;      /* the array element is no object */
    const char *name;     /* the rest is set by parse_columns() */
    size_t name_len;
    const char *type;
    size_t type_len;
    int64_t typeoid; /* 0..UINT32_MAX, or -1 when "typeoid" is absent */
    int64_t position; /* the column's attnum (1..32767, include-column-positions), or -1 when absent */
    const jval_t *value;
    vclass_t vclass;
} col_t;

/* The top-level keys the decoder reads. */
typedef enum field {
    F_NONE = -1,
    F_ACTION,
    F_XID,
    F_TIMESTAMP,
    F_LSN,
    F_NEXTLSN,
    F_SCHEMA,
    F_TABLE,
    F_COLUMNS,
    F_IDENTITY,
    F_TRANSACTIONAL,
    F_PREFIX,
    F_CONTENT,
    F_COUNT,
} field_t;

/* A key the decoder reads, with its length (keys are compared for every key of every message). */
typedef struct known_key {
    const char *name;
    size_t len;
} known_key_t;

#define KEY(s) {s, sizeof s - 1}
static const known_key_t field_keys[F_COUNT] = {
    KEY("action"), KEY("xid"),   KEY("timestamp"), KEY("lsn"),           KEY("nextlsn"), KEY("schema"),
    KEY("table"),  KEY("columns"), KEY("identity"), KEY("transactional"), KEY("prefix"), KEY("content"),
};
static const known_key_t column_keys[CK_COUNT] = {KEY("name"), KEY("type"), KEY("typeoid"), KEY("value"),
                                                  KEY("position")};
#undef KEY

typedef struct shape {
    bool used;
    size_t ncols;
    wp_buf_t sig;    /* per column: name NUL type NUL (names and types never hold NUL) */
    int64_t *oids;   /* ncols typeoids, -1 for absent */
    int64_t *positions; /* ncols positions (attnums), -1 for absent */
    size_t oids_cap;
    wp_buf_t json;   /* [{"name":..,"type":..,"typeoid":N|null[,"position":P]},...] */
    int64_t id;
} shape_t;

typedef struct table_entry {
    uint64_t hash;
    char *key; /* schema NUL table (absent schema as ""), owned */
    size_t key_len;
    int64_t ncols; /* columns of a whole row of the table as last seen (after filtering), -1 unknown */
    const wp_filter_table_t *rule; /* the table's column filters and masks, when rule_known; NULL = none */
    bool rule_known;
    shape_t shapes[SHAPE_SLOTS];
    unsigned next_slot; /* round-robin victim when no slot matches */
} table_entry_t;

/* One column array ("columns" or "identity") as kept; entries reused from message to message. */
typedef struct col_list {
    col_t *cols;
    size_t n;
    size_t cap;
} col_list_t;

struct wp_decoder {
    bool valid;         /* the fields below describe a message */
    wp_change_t last;   /* what the last successful parse returned */
    wp_buf_t text;      /* the kept values' text; sized once per message, so pointers into it hold */
    jval_t fields[F_COUNT];
    col_list_t lists[2]; /* [0] "columns" of the last I/U, [1] "identity" of the last U/D */
    bool has_ident;
    bool ident_full;    /* identity is the whole old row: "before", not "key" */
    table_entry_t *table; /* cache entry of the last I/U/D */
    const char *rejected_schema; /* after a failed parse: its table when known (in text), else NULL */
    const char *rejected_table;

    const wp_filter_t *filter; /* borrowed; NULL = no filters */
    wp_buf_t mask_text;        /* the sha256 masks of the last message; sized before use, so pointers hold */

    table_entry_t **tables; /* open addressing, linear probing; cap is a power of two */
    size_t tables_cap;
    size_t ntables;
};

/* ---------------------------------------------------------------- small helpers */

static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= FNV_PRIME;
    }
    return h;
}

static bool is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/*
 * True when s[0..len) is exactly one JSON number (RFC 8259 grammar).
 * *is_int is set when it has neither fraction nor exponent.
 */
static bool json_number_text(const char *s, size_t len, bool *is_int)
{
    size_t i = 0;
    *is_int = true;
    if (i < len && s[i] == '-')
        i++;
    if (i >= len || !is_digit((unsigned char)s[i]))
        return false;
    if (s[i] == '0') {
        i++;
    } else {
        while (i < len && is_digit((unsigned char)s[i]))
            i++;
    }
    if (i < len && s[i] == '.') {
        *is_int = false;
        i++;
        if (i >= len || !is_digit((unsigned char)s[i]))
            return false;
        while (i < len && is_digit((unsigned char)s[i]))
            i++;
    }
    if (i < len && (s[i] == 'e' || s[i] == 'E')) {
        *is_int = false;
        i++;
        if (i < len && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= len || !is_digit((unsigned char)s[i]))
            return false;
        while (i < len && is_digit((unsigned char)s[i]))
            i++;
    }
    return i == len;
}

/*
 * s[0..len) is a valid JSON integer literal.  True when |value| <= limit,
 * where limit is given as decimal text without sign or leading zeros.
 */
static bool int_text_within(const char *s, size_t len, const char *limit)
{
    if (len > 0 && s[0] == '-') {
        s++;
        len--;
    }
    size_t ll = strlen(limit);
    if (len != ll)
        return len < ll;
    return memcmp(s, limit, len) <= 0;
}

/* The integer literal s[0..len) is an int64 other than "-0" (the integers the decoder reads as such). */
static bool int_text_is_int64(const char *s, size_t len)
{
    if (len == 2 && s[0] == '-' && s[1] == '0')
        return false;
    if (len > 0 && s[0] == '-')
        return int_text_within(s, len, "9223372036854775808");
    return int_text_within(s, len, "9223372036854775807");
}

/* ---------------------------------------------------------------- JSON output */

/* Bytes that need escaping inside a JSON string: control characters, '"' and '\\'. */
static bool needs_escape(unsigned char c)
{
    return c < 0x20 || c == '"' || c == '\\';
}

/* Appends s[0..len) as a JSON string.  s is valid UTF-8 without NUL (the parse checked it). */
static void put_string(wp_buf_t *out, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t start = 0;
    wp_buf_reserve(out, len + 2);
    wp_buf_putc(out, '"');
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!needs_escape(c))
            continue;
        wp_buf_append(out, s + start, i - start);
        start = i + 1;
        switch (c) {
        case '"':
            wp_buf_append(out, "\\\"", 2);
            break;
        case '\\':
            wp_buf_append(out, "\\\\", 2);
            break;
        case '\n':
            wp_buf_append(out, "\\n", 2);
            break;
        case '\r':
            wp_buf_append(out, "\\r", 2);
            break;
        case '\t':
            wp_buf_append(out, "\\t", 2);
            break;
        case '\b':
            wp_buf_append(out, "\\b", 2);
            break;
        case '\f':
            wp_buf_append(out, "\\f", 2);
            break;
        default: {
            char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            wp_buf_append(out, u, sizeof u);
            break;
        }
        }
    }
    wp_buf_append(out, s + start, len - start);
    wp_buf_putc(out, '"');
}

/*
 * True when the JSON number text s (NUL-terminated) may go out bare for an
 * int2/int4/oid/float4/float8 column: at most 64 characters, an exponent of
 * at most 3 digits, and finite as a double.  Whatever PostgreSQL prints for
 * those types passes (float8's longest is 24 characters, e+308 at most).
 * Only a corrupt or forged message holds anything else, and it goes out as a
 * string: "1e400" is no double, and "1e-99999" or thousands of fraction
 * digits overflow jsonb's numeric, which would fail the staging COPY of the
 * whole batch on every retry instead of costing one value.  Caught by the
 * payload invariant of tests/fuzz/fuzz_checks.c.
 */
static bool number_fits_double(const char *s, size_t len)
{
    const char *e = memchr(s, 'e', len);
    if (e == NULL)
        e = memchr(s, 'E', len);
    if (len > 64)
        return false;
    if (e != NULL) {
        e++;
        if (*e == '+' || *e == '-')
            e++;
        if ((size_t)(s + len - e) > 3)
            return false;
    }
    double d = strtod(s, NULL);
    return d != HUGE_VAL && d != -HUGE_VAL;
}

/* Appends one column value following the value rules in decoder.h. */
static void put_value(wp_buf_t *out, const col_t *col)
{
    const jval_t *v = col->value;
    bool is_int;

    switch (v->kind) {
    case JK_TRUE:
        wp_buf_append(out, "true", 4);
        return;
    case JK_FALSE:
        wp_buf_append(out, "false", 5);
        return;
    case JK_NUMBER:
    case JK_STRING:
        switch (col->vclass) {
        case VC_INT:
        case VC_FLOAT:
            /* NaN/Infinity (numeric-data-types-as-string) are not JSON numbers: keep the text. */
            if (json_number_text(v->s, v->len, &is_int) && number_fits_double(v->s, v->len))
                wp_buf_append(out, v->s, v->len);
            else
                put_string(out, v->s, v->len);
            return;
        case VC_INT8:
            if (json_number_text(v->s, v->len, &is_int) && is_int && int_text_within(v->s, v->len, INT53_TEXT))
                wp_buf_append(out, v->s, v->len);
            else
                put_string(out, v->s, v->len);
            return;
        case VC_BYTEA:
            /* A string of hex digits (checked by the parse); PostgreSQL's input form is \x<hex>. */
            wp_buf_reserve(out, v->len + 5);
            wp_buf_append(out, "\"\\\\x", 4);
            wp_buf_append(out, v->s, v->len);
            wp_buf_putc(out, '"');
            return;
        default:
            put_string(out, v->s, v->len);
            return;
        }
    default: /* JK_NULL; the parse admits no other kind */
        wp_buf_append(out, "null", 4);
        return;
    }
}

/* Appends {"name":value,...} for cols. */
static void put_row(wp_buf_t *out, const col_t *cols, size_t n)
{
    wp_buf_putc(out, '{');
    for (size_t i = 0; i < n; i++) {
        if (i)
            wp_buf_putc(out, ',');
        put_string(out, cols[i].name, cols[i].name_len);
        wp_buf_putc(out, ':');
        put_value(out, &cols[i]);
    }
    wp_buf_putc(out, '}');
}

/*
 * An upper bound of the bytes a row object {"name":value,...} of cols takes
 * in jsonb, whose limits count decoded strings, not JSON text.  Also returns
 * the largest value in *widest.
 */
static size_t jsonb_row_bound(const col_t *cols, size_t n, const col_t **widest)
{
    size_t total = JSONB_CONTAINER_EXTRA;
    for (size_t i = 0; i < n; i++) {
        const jval_t *v = cols[i].value;
        bool sized = v->kind == JK_NUMBER || v->kind == JK_STRING;
        total += JSONB_PAIR_EXTRA + cols[i].name_len + (sized ? v->len + 2 + JSONB_SCALAR_EXTRA : 0);
        if (sized && (*widest == NULL || v->len > (*widest)->value->len))
            *widest = &cols[i];
    }
    return total;
}

/* ---------------------------------------------------------------- errors */

static int fail(char *errbuf, size_t errlen, const char *fmt, ...) WP_PRINTF(3, 4);

/* Formats the reason for a rejected message into errbuf; always returns -1. */
static int fail(char *errbuf, size_t errlen, const char *fmt, ...)
{
    if (errbuf == NULL || errlen == 0)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
    /* Reasons quote the offending input, and vsnprintf may cut a character
     * in two: the reason is stored as PostgreSQL text. */
    wp_log_sanitize(errbuf);
    return -1;
}

/* ---------------------------------------------------------------- table cache */

static void shape_free(shape_t *s)
{
    wp_buf_free(&s->sig);
    wp_buf_free(&s->json);
    WP_FREE(s->oids);
    WP_FREE(s->positions);
}

static void table_free(table_entry_t *t)
{
    for (int i = 0; i < SHAPE_SLOTS; i++)
        shape_free(&t->shapes[i]);
    free(t->key);
    free(t);
}

static void tables_clear(wp_decoder_t *decoder)
{
    for (size_t i = 0; i < decoder->tables_cap; i++) {
        if (decoder->tables[i]) {
            table_free(decoder->tables[i]);
            decoder->tables[i] = NULL;
        }
    }
    decoder->ntables = 0;
}

static uint64_t table_hash(const char *schema, size_t slen, const char *table, size_t tlen)
{
    uint64_t h = fnv1a(FNV_OFFSET, schema, slen);
    h = fnv1a(h, "", 1);
    return fnv1a(h, table, tlen);
}

static bool table_is(const table_entry_t *t, uint64_t hash, const char *schema, size_t slen, const char *table,
                     size_t tlen)
{
    return t->hash == hash && t->key_len == slen + 1 + tlen && memcmp(t->key, schema, slen) == 0 &&
           t->key[slen] == '\0' && memcmp(t->key + slen + 1, table, tlen) == 0;
}

static void tables_grow(wp_decoder_t *decoder)
{
    size_t cap = decoder->tables_cap ? decoder->tables_cap * 2 : 64;
    table_entry_t **slots = wp_calloc(cap, sizeof *slots);
    for (size_t i = 0; i < decoder->tables_cap; i++) {
        table_entry_t *t = decoder->tables[i];
        if (t == NULL)
            continue;
        size_t j = (size_t)t->hash & (cap - 1);
        while (slots[j])
            j = (j + 1) & (cap - 1);
        slots[j] = t;
    }
    free(decoder->tables);
    decoder->tables = slots;
    decoder->tables_cap = cap;
}

/* The cache entry of schema.table, created if needed.  Never NULL. */
static table_entry_t *table_get(wp_decoder_t *decoder, const char *schema, size_t slen, const char *table,
                                size_t tlen)
{
    uint64_t hash = table_hash(schema, slen, table, tlen);
    if (decoder->tables_cap) {
        size_t j = (size_t)hash & (decoder->tables_cap - 1);
        while (decoder->tables[j]) {
            if (table_is(decoder->tables[j], hash, schema, slen, table, tlen))
                return decoder->tables[j];
            j = (j + 1) & (decoder->tables_cap - 1);
        }
    }
    if (decoder->ntables >= MAX_TABLES)
        tables_clear(decoder);
    if ((decoder->ntables + 1) * 2 > decoder->tables_cap)
        tables_grow(decoder);

    table_entry_t *t = wp_calloc(1, sizeof *t);
    t->hash = hash;
    t->key_len = slen + 1 + tlen;
    t->key = wp_malloc(t->key_len + 1);
    memcpy(t->key, schema, slen);
    t->key[slen] = '\0';
    memcpy(t->key + slen + 1, table, tlen);
    t->key[t->key_len] = '\0';
    t->ncols = -1;

    size_t j = (size_t)hash & (decoder->tables_cap - 1);
    while (decoder->tables[j])
        j = (j + 1) & (decoder->tables_cap - 1);
    decoder->tables[j] = t;
    decoder->ntables++;
    return t;
}

/* ---------------------------------------------------------------- the event parser */

/* The value of the hex escape digits p[0..4), or -1. */
static long hex4(const char *p)
{
    long v = 0;
    for (int k = 0; k < 4; k++) {
        int h = wp_hexval((unsigned char)p[k]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

/*
 * True when every \u escape in the raw string text p[0..len) (between its
 * quotes, escapes still in) that names a UTF-16 surrogate is a high one
 * followed by a low one.
 */
static bool surrogates_paired(const char *p, size_t len)
{
    const char *end = p + len;
    const char *q = p;
    while ((q = memchr(q, '\\', (size_t)(end - q))) != NULL) {
        if (end - q < 6 || q[1] != 'u') {
            q += 2; /* a two-character escape (or the end) */
            if (q >= end)
                break;
            continue;
        }
        long u = hex4(q + 2);
        if (u >= 0xDC00 && u <= 0xDFFF)
            return false; /* a low one without a high one */
        if (u >= 0xD800 && u <= 0xDBFF) {
            long low = end - q >= 12 && q[6] == '\\' && q[7] == 'u' ? hex4(q + 8) : -1;
            if (low < 0xDC00 || low > 0xDFFF)
                return false;
            q += 6;
        }
        q += 6;
        if (q >= end)
            break;
    }
    return true;
}

/* What the yajl callbacks share while one message is read. */
typedef struct sax {
    wp_decoder_t *decoder;
    yajl_handle yajl;
    const char *in; /* the message */
    size_t in_len;
    jkind_t top;    /* kind of the message's top-level value */
    int depth;      /* containers open: 1 the message, 2 a column array, 3 one of its entries */
    int skip;       /* > 0 while inside a container nobody reads: its nesting depth */
    field_t field;  /* depth 1: the key whose value comes next */
    int list;       /* depth >= 2: 0 "columns", 1 "identity" */
    col_t *entry;   /* depth 3: the entry being read */
    ckey_t ckey;    /* depth 3: the key whose value comes next */
    size_t mark;    /* where the previous token ended (bytes consumed after its callback) */
    char *errbuf;
    size_t errlen;
} sax_t;

/* Records why the message is rejected, at the current byte; returns 0 so yajl stops. */
static int sax_fail(sax_t *sax, const char *what)
{
    fail(sax->errbuf, sax->errlen, "invalid JSON at byte %zu: %s", yajl_get_bytes_consumed(sax->yajl), what);
    sax->errbuf = NULL; /* first reason wins */
    return 0;
}

/*
 * Checks a string (or key) yajl had to unescape: s lies outside the message
 * then.  Its raw text ends just before the current byte and starts at the
 * first '"' after the end of the previous token (sax->mark): only
 * whitespace, ':' and ',' can lie between two tokens.
 */
static int check_escaped(sax_t *sax, const char *s, size_t len)
{
    if (s >= sax->in && s < sax->in + sax->in_len)
        return 1; /* taken from the message as is: nothing was unescaped */
    if (memchr(s, '\0', len) != NULL)
        return sax_fail(sax, "string contains \\u0000, which jsonb cannot store");
    size_t end = yajl_get_bytes_consumed(sax->yajl);
    if (end == 0 || end > sax->in_len || sax->mark >= end || sax->in[end - 1] != '"')
        return 1;
    const char *open = memchr(sax->in + sax->mark, '"', end - 1 - sax->mark);
    if (open != NULL && !surrogates_paired(open + 1, (size_t)(sax->in + end - 1 - (open + 1))))
        return sax_fail(sax, "a \\u escape is an unpaired UTF-16 surrogate");
    return 1;
}

/* Keeps a scalar in *v, its text copied into decoder->text. */
static int keep(sax_t *sax, jval_t *v, jkind_t kind, const char *s, size_t len)
{
    wp_buf_t *text = &sax->decoder->text;
    v->kind = kind;
    if (kind != JK_NUMBER && kind != JK_STRING)
        return 1;
    if (kind == JK_STRING && !wp_utf8_valid((const unsigned char *)s, len))
        return sax_fail(sax, "not valid UTF-8 (wal2json passes message content through unchecked)");
    /* text was sized for the whole message up front: pointers into it must not move */
    if (text->cap - text->len < len + 1)
        return sax_fail(sax, "more text than the message holds (a yajl change?)");
    char *p = text->data + text->len;
    memcpy(p, s, len);
    p[len] = '\0';
    text->len += len + 1;
    v->s = p;
    v->len = len;
    return 1;
}

/* A new entry at the end of the current column array. */
static col_t *new_entry(sax_t *sax)
{
    col_list_t *l = &sax->decoder->lists[sax->list];
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 16;
        l->cols = wp_realloc(l->cols, l->cap * sizeof *l->cols);
    }
    col_t *c = &l->cols[l->n++];
    memset(c, 0, sizeof *c);
    return c;
}

/* Every callback ends here: remembers where its token ended, for check_escaped(). */
static int marked(sax_t *sax, int rc)
{
    sax->mark = yajl_get_bytes_consumed(sax->yajl);
    return rc;
}

static int on_scalar(sax_t *sax, jkind_t kind, const char *s, size_t len)
{
    if (sax->skip)
        return 1;
    switch (sax->depth) {
    case 0:
        sax->top = kind; /* a message that is no object */
        return 1;
    case 1:
        return sax->field == F_NONE ? 1 : keep(sax, &sax->decoder->fields[sax->field], kind, s, len);
    case 2:
        new_entry(sax)->not_object = true;
        return 1;
    default:
        return sax->ckey == CK_NONE ? 1 : keep(sax, &sax->entry->key[sax->ckey], kind, s, len);
    }
}

static int on_open(sax_t *sax, jkind_t kind)
{
    if (sax->skip) {
        sax->skip++;
        return 1;
    }
    switch (sax->depth) {
    case 0:
        sax->top = kind;
        if (kind == JK_OBJECT)
            sax->depth = 1;
        else
            sax->skip = 1;
        return 1;
    case 1:
        if (sax->field != F_NONE)
            sax->decoder->fields[sax->field].kind = kind;
        if (kind == JK_ARRAY && (sax->field == F_COLUMNS || sax->field == F_IDENTITY)) {
            sax->list = sax->field == F_COLUMNS ? 0 : 1;
            sax->decoder->lists[sax->list].n = 0;
            sax->depth = 2;
        } else {
            sax->skip = 1;
        }
        return 1;
    case 2: {
        col_t *c = new_entry(sax);
        if (kind == JK_OBJECT) {
            sax->entry = c;
            sax->ckey = CK_NONE;
            sax->depth = 3;
        } else {
            c->not_object = true;
            sax->skip = 1;
        }
        return 1;
    }
    default:
        if (sax->ckey != CK_NONE)
            sax->entry->key[sax->ckey].kind = kind;
        sax->skip = 1;
        return 1;
    }
}

static int on_close(void *ctx)
{
    sax_t *sax = ctx;
    if (sax->skip) {
        sax->skip--;
        return 1;
    }
    sax->depth--;
    sax->entry = NULL;
    sax->field = F_NONE;
    sax->ckey = CK_NONE;
    return 1;
}

/* Index of key[0..len) in keys[0..n), or -1 (F_NONE, CK_NONE). */
static int lookup_key(const known_key_t *keys, int n, const char *key, size_t len)
{
    for (int i = 0; i < n; i++) {
        if (keys[i].len == len && keys[i].name[0] == key[0] && memcmp(keys[i].name, key, len) == 0)
            return i;
    }
    return -1;
}

static int on_key(void *ctx, const unsigned char *key, size_t len)
{
    sax_t *sax = ctx;
    const char *k = (const char *)key;
    if (!check_escaped(sax, k, len))
        return 0;
    if (sax->skip)
        return marked(sax, 1);
    if (sax->depth == 1) {
        int f = lookup_key(field_keys, F_COUNT, k, len);
        sax->field = (field_t)f;
        if (f >= 0 && sax->decoder->fields[f].kind != JK_ABSENT)
            return sax_fail(sax, "duplicate object key");
    } else if (sax->depth == 3) {
        int f = lookup_key(column_keys, CK_COUNT, k, len);
        sax->ckey = (ckey_t)f;
        if (f >= 0 && sax->entry->key[f].kind != JK_ABSENT)
            return sax_fail(sax, "duplicate object key");
    }
    return marked(sax, 1);
}

static int on_null(void *ctx)
{
    return marked(ctx, on_scalar(ctx, JK_NULL, NULL, 0));
}

static int on_boolean(void *ctx, int b)
{
    return marked(ctx, on_scalar(ctx, b ? JK_TRUE : JK_FALSE, NULL, 0));
}

static int on_number(void *ctx, const char *s, size_t len)
{
    return marked(ctx, on_scalar(ctx, JK_NUMBER, s, len));
}

static int on_string(void *ctx, const unsigned char *s, size_t len)
{
    if (!check_escaped(ctx, (const char *)s, len))
        return 0;
    return marked(ctx, on_scalar(ctx, JK_STRING, (const char *)s, len));
}

static int on_start_map(void *ctx)
{
    return marked(ctx, on_open(ctx, JK_OBJECT));
}

static int on_start_array(void *ctx)
{
    return marked(ctx, on_open(ctx, JK_ARRAY));
}

static int on_end(void *ctx)
{
    return marked(ctx, on_close(ctx));
}

/* yajl_number takes every number as text, so yajl_integer and yajl_double are never called. */
static const yajl_callbacks callbacks = {
    .yajl_null = on_null,
    .yajl_boolean = on_boolean,
    .yajl_number = on_number,
    .yajl_string = on_string,
    .yajl_start_map = on_start_map,
    .yajl_map_key = on_key,
    .yajl_end_map = on_end,
    .yajl_start_array = on_start_array,
    .yajl_end_array = on_end,
};

/*
 * Reads data[0..len) with yajl into the decoder's fields and column lists.
 * Returns 0, or -1 with "invalid JSON at byte N: ..." in errbuf; N counts the
 * bytes read when the problem showed (the end of the message for a cut one).
 */
static int read_message(wp_decoder_t *decoder, const char *data, size_t len, jkind_t *top, char *errbuf,
                        size_t errlen)
{
    int rc = -1;
    sax_t sax = {.decoder = decoder, .in = data, .in_len = len, .field = F_NONE, .ckey = CK_NONE,
                 .errbuf = errbuf, .errlen = errlen};
    yajl_status st;
    size_t at;

    if (decoder->text.cap > TEXT_KEEP && len < TEXT_KEEP / 2)
        wp_buf_free(&decoder->text); /* a huge message is over: give its memory back */
    wp_buf_reset(&decoder->text);
    wp_buf_reserve(&decoder->text, len + 16);
    memset(decoder->fields, 0, sizeof decoder->fields);
    decoder->lists[0].n = 0;
    decoder->lists[1].n = 0;

    sax.yajl = yajl_alloc(&callbacks, wp_yajl_mem(), &sax);
    /* Checked strictly by keep(), and only where it matters: strings the decoder keeps. */
    yajl_config(sax.yajl, yajl_dont_validate_strings, 1);
    st = yajl_parse(sax.yajl, (const unsigned char *)data, len);
    at = yajl_get_bytes_consumed(sax.yajl);
    if (st == yajl_status_ok) {
        st = yajl_complete_parse(sax.yajl);
        at = len;
    }
    if (st == yajl_status_error) {
        unsigned char *e = yajl_get_error(sax.yajl, 0, NULL, 0);
        size_t n = strlen((char *)e);
        while (n > 0 && (e[n - 1] == '\n' || e[n - 1] == '.' || e[n - 1] == ' '))
            e[--n] = '\0';
        fail(errbuf, errlen, "invalid JSON at byte %zu: %s", at, (char *)e);
        yajl_free_error(sax.yajl, e);
        goto out;
    }
    if (st != yajl_status_ok)
        goto out; /* a callback stopped it and said why */
    *top = sax.top;
    rc = 0;
out:
    yajl_free(sax.yajl);
    return rc;
}

/* ---------------------------------------------------------------- validation */

/* Reads exactly n digits at *p (below end) into *v. */
static bool read_digits(const char **p, const char *end, int n, int64_t *v)
{
    *v = 0;
    for (int i = 0; i < n; i++, (*p)++) {
        if (*p >= end || !is_digit((unsigned char)**p))
            return false;
        *v = *v * 10 + (**p - '0');
    }
    return true;
}

static bool read_char(const char **p, const char *end, char c)
{
    if (*p >= end || **p != c)
        return false;
    (*p)++;
    return true;
}

/* Days from 1970-01-01 to y-m-d of the proleptic Gregorian calendar (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d)
{
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/*
 * Microseconds since 2000-01-01 00:00 UTC (timestamptz's binary form) of an
 * ISO timestamp as PostgreSQL prints a timestamptz under DateStyle ISO:
 * "YYYY-MM-DD HH:MM:SS[.ffffff]+HH[:MM[:SS]]" (or -HH...), years of 4 to 6 digits up to
 * PostgreSQL's last, 294276.
 */
static bool parse_timestamp(const char *s, size_t len, int64_t *out)
{
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const char *p = s, *end = s + len;
    int64_t y = 0, mo, d, h, mi, sec, frac = 0, oh, om = 0, os = 0, v;
    int ydigits = 0;

    while (p < end && is_digit((unsigned char)*p) && ydigits < 6) {
        y = y * 10 + (*p++ - '0');
        ydigits++;
    }
    if (ydigits < 4 || !read_char(&p, end, '-') || !read_digits(&p, end, 2, &mo) || !read_char(&p, end, '-') ||
        !read_digits(&p, end, 2, &d) || !read_char(&p, end, ' ') || !read_digits(&p, end, 2, &h) ||
        !read_char(&p, end, ':') || !read_digits(&p, end, 2, &mi) || !read_char(&p, end, ':') ||
        !read_digits(&p, end, 2, &sec))
        return false;
    if (p < end && *p == '.') {
        int n = 0;
        p++;
        while (p < end && is_digit((unsigned char)*p) && n < 6) {
            frac = frac * 10 + (*p++ - '0');
            n++;
        }
        if (n == 0)
            return false;
        for (; n < 6; n++)
            frac *= 10;
    }
    if (p >= end || (*p != '+' && *p != '-'))
        return false;
    int sign = *p++ == '-' ? -1 : 1;
    if (!read_digits(&p, end, 2, &oh))
        return false;
    if (read_char(&p, end, ':')) {
        if (!read_digits(&p, end, 2, &om))
            return false;
        if (read_char(&p, end, ':') && !read_digits(&p, end, 2, &os))
            return false;
    }
    if (p != end)
        return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    /* PostgreSQL's timestamps end in 294276 AD; a later year is no timestamp it prints (and would
     * overflow the microseconds below) */
    if (y > 294276 || mo < 1 || mo > 12 || d < 1 || d > mdays[mo - 1] + (mo == 2 && leap) || h > 23 || mi > 59 || sec > 59 ||
        oh > 15 || om > 59 || os > 59)
        return false;
    v = days_from_civil(y, mo, d) - days_from_civil(2000, 1, 1);
    v = ((v * 24 + h) * 60 + mi) * 60 + sec - sign * (oh * 3600 + om * 60 + os);
    *out = v * 1000000 + frac;
    return true;
}

static bool key_is(const char *key, size_t klen, const char *lit)
{
    size_t n = strlen(lit);
    return klen == n && memcmp(key, lit, n) == 0;
}

/* v is a JSON integer that fits int64 (not "-0"); sets *out. */
static bool jval_int64(const jval_t *v, int64_t *out)
{
    bool is_int;
    if (v->kind != JK_NUMBER || !json_number_text(v->s, v->len, &is_int) || !is_int ||
        !int_text_is_int64(v->s, v->len))
        return false;
    *out = (int64_t)strtoll(v->s, NULL, 10);
    return true;
}
/* Column type class from the type oid, or from the type name when the oid is absent. */
static vclass_t classify(int64_t typeoid, const char *type, size_t tlen)
{
    if (typeoid >= 0) {
        switch (typeoid) {
        case 16:
            return VC_BOOL;
        case 21:
        case 23:
        case 26:
            return VC_INT;
        case 20:
            return VC_INT8;
        case 700:
        case 701:
            return VC_FLOAT;
        case 1700:
            return VC_NUMERIC;
        case 17:
            return VC_BYTEA;
        default:
            return VC_OTHER;
        }
    }
    if (key_is(type, tlen, "numeric") || (tlen > 8 && memcmp(type, "numeric(", 8) == 0))
        return VC_NUMERIC;
    if (key_is(type, tlen, "integer") || key_is(type, tlen, "smallint") || key_is(type, tlen, "oid"))
        return VC_INT;
    if (key_is(type, tlen, "bigint"))
        return VC_INT8;
    if (key_is(type, tlen, "real") || key_is(type, tlen, "double precision"))
        return VC_FLOAT;
    if (key_is(type, tlen, "bytea"))
        return VC_BYTEA;
    if (key_is(type, tlen, "boolean"))
        return VC_BOOL;
    return VC_OTHER;
}

/*
 * Validates the column array list under what ("columns" or "identity"),
 * whose kind is kind.  Entries are numbered from 1 in reasons, like attnums.
 */
static int parse_columns(const char *what, jkind_t kind, col_list_t *list, char *errbuf, size_t errlen)
{
    if (kind != JK_ARRAY)
        return fail(errbuf, errlen, "\"%s\" is not an array", what);
    for (size_t i = 0; i < list->n; i++) {
        col_t *col = &list->cols[i];
        const jval_t *name = &col->key[CK_NAME];
        const jval_t *type = &col->key[CK_TYPE];
        const jval_t *typeoid = &col->key[CK_TYPEOID];
        const jval_t *value = &col->key[CK_VALUE];
        const jval_t *position = &col->key[CK_POSITION];

        if (col->not_object)
            return fail(errbuf, errlen, "\"%s\" entry %zu is not an object", what, i + 1);
        if (name->kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"%s\" entry %zu has no \"name\"", what, i + 1);
        if (name->kind != JK_STRING)
            return fail(errbuf, errlen, "\"%s\" entry %zu: \"name\" is not a string", what, i + 1);
        if (type->kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"%s\" entry %zu has no \"type\"", what, i + 1);
        if (type->kind != JK_STRING)
            return fail(errbuf, errlen, "\"%s\" entry %zu: \"type\" is not a string", what, i + 1);
        col->name = name->s;
        col->name_len = name->len;
        col->type = type->s;
        col->type_len = type->len;
        col->typeoid = -1;
        if (typeoid->kind != JK_ABSENT) {
            int64_t oid;
            if (!jval_int64(typeoid, &oid))
                return fail(errbuf, errlen, "\"%s\" entry %zu: \"typeoid\" is not an integer", what, i + 1);
            /* wal2json prints the unsigned OID with %d, so OIDs above 2^31 arrive negative. */
            if (oid < INT32_MIN || oid > (int64_t)UINT32_MAX)
                return fail(errbuf, errlen, "\"%s\" entry %zu: \"typeoid\" %" PRId64 " is not an OID", what, i + 1,
                            oid);
            col->typeoid = oid < 0 ? oid + (INT64_C(1) << 32) : oid;
        }
        col->position = -1;
        if (position->kind != JK_ABSENT) {
            /* an attnum: a positive int2 */
            if (!jval_int64(position, &col->position) || col->position < 1 || col->position > 32767)
                return fail(errbuf, errlen, "\"%s\" entry %zu: \"position\" is not an attribute number", what,
                            i + 1);
        }
        switch (value->kind) {
        case JK_ABSENT:
            return fail(errbuf, errlen, "\"%s\" entry %zu has no \"value\"", what, i + 1);
        case JK_ARRAY:
        case JK_OBJECT:
            return fail(errbuf, errlen, "\"%s\" entry %zu: \"value\" is not a string, number, boolean or null",
                        what, i + 1);
        default:
            break;
        }
        col->value = value;
        col->vclass = classify(col->typeoid, col->type, col->type_len);
        if (col->vclass == VC_BYTEA && value->kind != JK_NULL) {
            /* Anything but hex means the walsender ran with bytea_output=escape: wal2json
             * mangles that form (issue #301), so the value cannot be trusted. */
            bool hex = value->kind == JK_STRING && value->len % 2 == 0;
            for (size_t k = 0; hex && k < value->len; k++)
                hex = wp_hexval((unsigned char)value->s[k]) >= 0;
            if (!hex)
                return fail(errbuf, errlen, "\"%s\" entry %zu: bytea \"value\" is not hex (bytea_output=escape?)",
                            what, i + 1);
        }
    }
    return 0;
}


/* Looks name up among cols, starting at *hint (wal2json keeps attribute order). */
static bool has_column(const col_t *cols, size_t n, const col_t *c, size_t *hint)
{
    for (size_t k = 0; k < n; k++) {
        size_t j = (*hint + k) % n;
        if (cols[j].name_len == c->name_len && memcmp(cols[j].name, c->name, c->name_len) == 0) {
            *hint = j + 1;
            return true;
        }
    }
    return false;
}

/* Replaces col's value by its mask (filter.h); the text of a sha256 goes into decoder->mask_text (reserved). */
static void mask_value(wp_decoder_t *decoder, col_t *col, wp_filter_action_t action)
{
    jval_t *v = &col->key[CK_VALUE];
    const char *prefix = col->vclass == VC_BYTEA ? "\\x" : NULL; /* the hash input is the value's ::text */
    const char *text = v->s;
    size_t len = v->len;

    if (action == WP_FILTER_NULL) {
        *v = (jval_t){.kind = JK_NULL};
        return; /* the column keeps its type: NULL fits any */
    }
    col->type = "text";
    col->type_len = 4;
    col->typeoid = 25;
    col->vclass = VC_OTHER;
    if (v->kind == JK_NULL)
        return; /* NULL stays NULL */
    if (action == WP_FILTER_REDACT) {
        *v = (jval_t){.kind = JK_STRING, .s = WP_FILTER_REDACTED, .len = strlen(WP_FILTER_REDACTED)};
        return;
    }
    if (v->kind == JK_TRUE || v->kind == JK_FALSE) {
        text = v->kind == JK_TRUE ? "true" : "false";
        len = strlen(text);
    }
    char *out = decoder->mask_text.data + decoder->mask_text.len;
    wp_filter_sha256(decoder->filter, prefix, text, len, out);
    decoder->mask_text.len += WP_FILTER_SHA256_HEX + 1;
    *v = (jval_t){.kind = JK_STRING, .s = out, .len = WP_FILTER_SHA256_HEX};
}

/* Drops the excluded columns of list (its first *n entries) and masks the masked ones; *n becomes the count kept. */
static void filter_list(wp_decoder_t *decoder, const wp_filter_table_t *rule, col_list_t *list, size_t *n)
{
    size_t kept = 0;
    for (size_t i = 0; i < *n; i++) {
        col_t *col = &list->cols[i];
        wp_filter_action_t action = wp_filter_column(rule, col->name, col->name_len);
        if (action == WP_FILTER_DROP)
            continue;
        if (action != WP_FILTER_KEEP)
            mask_value(decoder, col, action);
        if (kept != i) {
            list->cols[kept] = *col;
            list->cols[kept].value = &list->cols[kept].key[CK_VALUE]; /* value points into its own entry */
        }
        kept++;
    }
    *n = kept;
    list->n = kept;
}

/* Applies the table's column rules, if any, to the message's "columns" and "identity". */
static void apply_filter(wp_decoder_t *decoder, size_t *ncols, size_t *nident)
{
    table_entry_t *t = decoder->table;
    if (!t->rule_known) {
        const char *schema = t->key;
        const char *table = t->key + strlen(t->key) + 1;
        t->rule = wp_filter_table(decoder->filter, schema, strlen(schema), table, strlen(table));
        t->rule_known = true;
    }
    if (t->rule == NULL)
        return;
    wp_buf_reset(&decoder->mask_text);
    wp_buf_reserve(&decoder->mask_text, (*ncols + *nident) * (WP_FILTER_SHA256_HEX + 1) + 1);
    filter_list(decoder, t->rule, &decoder->lists[0], ncols);
    if (decoder->has_ident)
        filter_list(decoder, t->rule, &decoder->lists[1], nident);
}

/*
 * "key" or "before"?  wal2json says nothing about the replica identity, so it
 * is inferred.  An identity that is the whole old row (REPLICA IDENTITY FULL)
 * is a "before" image; otherwise it is the key.
 *  - UPDATE: "before" when the identity has at least as many entries as
 *    "columns" and holds every column "columns" names ("columns" may lack
 *    unchanged TOAST columns; a FULL identity never does).
 *  - DELETE: "before" when the table's whole-row column count is known and
 *    the identity has exactly that many entries.  The count comes from the
 *    table's last INSERT, or from the identity of its last UPDATE judged
 *    "before".  Until one is seen a FULL delete is reported as "key".
 * A key that covers every column (say a two-column table whose primary key is
 * both) is reported as "before"; the two are the same row image then.
 * Also records what this message teaches about the table's column count.
 */
static void decide_identity(wp_decoder_t *decoder, wp_op_t op, size_t ncols, size_t nident)
{
    table_entry_t *t = decoder->table;
    decoder->ident_full = false;
    if (op == WP_OP_INSERT) {
        t->ncols = (int64_t)ncols;
        return;
    }
    if (!decoder->has_ident)
        return;
    if (op == WP_OP_UPDATE) {
        if (nident < ncols)
            return;
        size_t hint = 0;
        for (size_t i = 0; i < ncols; i++) {
            if (!has_column(decoder->lists[1].cols, nident, &decoder->lists[0].cols[i], &hint))
                return;
        }
        decoder->ident_full = true;
        t->ncols = (int64_t)nident;
        return;
    }
    if (op == WP_OP_DELETE)
        decoder->ident_full = t->ncols >= 0 && (int64_t)nident == t->ncols;
}

static int parse_action(const jval_t *action, wp_op_t *op, char *errbuf, size_t errlen)
{
    if (action->kind == JK_ABSENT)
        return fail(errbuf, errlen, "\"action\" is missing");
    if (action->kind != JK_STRING)
        return fail(errbuf, errlen, "\"action\" is not a string");
    if (action->len == 1) {
        switch (action->s[0]) {
        case 'B':
            *op = WP_OP_BEGIN;
            return 0;
        case 'C':
            *op = WP_OP_COMMIT;
            return 0;
        case 'I':
            *op = WP_OP_INSERT;
            return 0;
        case 'U':
            *op = WP_OP_UPDATE;
            return 0;
        case 'D':
            *op = WP_OP_DELETE;
            return 0;
        case 'T':
            *op = WP_OP_TRUNCATE;
            return 0;
        case 'M':
            *op = WP_OP_MESSAGE;
            return 0;
        default:
            break;
        }
    }
    return fail(errbuf, errlen, "unknown action \"%.32s\"", action->s);
}

static int parse_lsn_field(const char *what, const jval_t *v, wp_lsn_t *out, char *errbuf, size_t errlen)
{
    if (v->kind != JK_STRING)
        return fail(errbuf, errlen, "\"%s\" is not a string", what);
    if (!wp_lsn_parse(v->s, v->len, out))
        return fail(errbuf, errlen, "\"%s\" is not an LSN: \"%.40s\"", what, v->s);
    return 0;
}

/* Validates the kept fields of a message whose top-level value is of kind top into *c. */
static int parse_message(wp_decoder_t *decoder, jkind_t top, wp_change_t *c, char *errbuf, size_t errlen)
{
    const jval_t *f = decoder->fields;
    size_t ncols = 0;
    size_t nident = 0;

    if (top != JK_OBJECT)
        return fail(errbuf, errlen, "message is not a JSON object");
    if (parse_action(&f[F_ACTION], &c->op, errbuf, errlen) < 0)
        return -1;

    if (f[F_XID].kind != JK_ABSENT && f[F_XID].kind != JK_NULL) {
        if (!jval_int64(&f[F_XID], &c->xid))
            return fail(errbuf, errlen, "\"xid\" is not an integer or null");
        if (c->xid < 0)
            return fail(errbuf, errlen, "\"xid\" is negative");
        c->has_xid = true;
    }
    if (f[F_TIMESTAMP].kind != JK_ABSENT && f[F_TIMESTAMP].kind != JK_NULL) {
        if (f[F_TIMESTAMP].kind != JK_STRING)
            return fail(errbuf, errlen, "\"timestamp\" is not a string or null");
        if (!parse_timestamp(f[F_TIMESTAMP].s, f[F_TIMESTAMP].len, &c->commit_time))
            return fail(errbuf, errlen, "\"timestamp\" is not an ISO timestamp with a UTC offset: \"%.40s\" "
                        "(the walsender's DateStyle must be ISO)", f[F_TIMESTAMP].s);
        c->timestamp = f[F_TIMESTAMP].s;
    }
    if (f[F_LSN].kind != JK_ABSENT && parse_lsn_field("lsn", &f[F_LSN], &c->lsn, errbuf, errlen) < 0)
        return -1;

    switch (c->op) {
    case WP_OP_BEGIN:
    case WP_OP_COMMIT:
        if (f[F_NEXTLSN].kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"nextlsn\" is missing (include-lsn off?)");
        return parse_lsn_field("nextlsn", &f[F_NEXTLSN], &c->nextlsn, errbuf, errlen);
    case WP_OP_MESSAGE:
        if (f[F_TRANSACTIONAL].kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"transactional\" is missing");
        if (f[F_TRANSACTIONAL].kind != JK_TRUE && f[F_TRANSACTIONAL].kind != JK_FALSE)
            return fail(errbuf, errlen, "\"transactional\" is not a boolean");
        if (f[F_PREFIX].kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"prefix\" is missing");
        if (f[F_PREFIX].kind != JK_STRING)
            return fail(errbuf, errlen, "\"prefix\" is not a string");
        if (f[F_CONTENT].kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"content\" is missing");
        if (f[F_CONTENT].kind != JK_STRING)
            return fail(errbuf, errlen, "\"content\" is not a string");
        c->transactional = f[F_TRANSACTIONAL].kind == JK_TRUE;
        c->prefix = f[F_PREFIX].s;
        c->content = f[F_CONTENT].s;
        c->content_len = f[F_CONTENT].len;
        if (JSONB_CONTAINER_EXTRA + 3 * JSONB_PAIR_EXTRA + 26 + f[F_PREFIX].len + f[F_CONTENT].len +
                2 * JSONB_SCALAR_EXTRA >
            JSONB_MAX_BYTES)
            return fail(errbuf, errlen, "the message's content of %zu bytes is over jsonb's limit of %zu bytes",
                        f[F_CONTENT].len, JSONB_MAX_BYTES);
        return 0;
    default:
        break;
    }

    /* I, U, D, T */
    if (f[F_TABLE].kind == JK_ABSENT)
        return fail(errbuf, errlen, "\"table\" is missing");
    if (f[F_TABLE].kind != JK_STRING)
        return fail(errbuf, errlen, "\"table\" is not a string");
    if (f[F_SCHEMA].kind != JK_ABSENT && f[F_SCHEMA].kind != JK_STRING)
        return fail(errbuf, errlen, "\"schema\" is not a string");
    c->table = f[F_TABLE].s;
    c->schema = f[F_SCHEMA].kind == JK_STRING ? f[F_SCHEMA].s : NULL;
    if (c->op == WP_OP_TRUNCATE)
        return 0;

    if (c->op != WP_OP_DELETE) {
        if (f[F_COLUMNS].kind == JK_ABSENT)
            return fail(errbuf, errlen, "\"columns\" is missing");
        if (parse_columns("columns", f[F_COLUMNS].kind, &decoder->lists[0], errbuf, errlen) < 0)
            return -1;
        ncols = decoder->lists[0].n;
    }
    if (c->op != WP_OP_INSERT) {
        if (f[F_IDENTITY].kind == JK_ABSENT && c->op == WP_OP_DELETE)
            return fail(errbuf, errlen, "\"identity\" is missing");
        if (f[F_IDENTITY].kind != JK_ABSENT) {
            if (parse_columns("identity", f[F_IDENTITY].kind, &decoder->lists[1], errbuf, errlen) < 0)
                return -1;
            nident = decoder->lists[1].n;
            decoder->has_ident = true;
        }
    }
    c->ncolumns = ncols;
    c->nidentity = nident;
    decoder->table = table_get(decoder, c->schema ? c->schema : "", c->schema ? f[F_SCHEMA].len : 0, c->table,
                               f[F_TABLE].len);
    /* filtered first: the bound is of what is staged (an excluded column's size does not count, a mask's does) */
    if (decoder->filter) {
        apply_filter(decoder, &ncols, &nident);
        c->ncolumns = ncols;
        c->nidentity = nident;
    }
    /* the payload: {"after": row} and/or {"key"|"before": row}, each row an object of its own */
    const col_t *widest = NULL;
    size_t bound = JSONB_CONTAINER_EXTRA + 2 * (JSONB_PAIR_EXTRA + 6);
    if (c->op != WP_OP_DELETE)
        bound += jsonb_row_bound(decoder->lists[0].cols, ncols, &widest);
    if (decoder->has_ident)
        bound += jsonb_row_bound(decoder->lists[1].cols, nident, &widest);
    if (bound > JSONB_MAX_BYTES)
        return fail(errbuf, errlen,
                    "the change's payload would take up to %zu bytes as jsonb, over jsonb's limit of %zu bytes "
                    "(largest value: column \"%.64s\", %zu bytes)",
                    bound, JSONB_MAX_BYTES, widest ? widest->name : "", widest ? widest->value->len : 0);
    decide_identity(decoder, c->op, ncols, nident);
    return 0;
}

/* Forgets the previous message: its change, identity, table and rejected names. */
static void forget_message(wp_decoder_t *decoder)
{
    decoder->valid = false;
    decoder->has_ident = false;
    decoder->ident_full = false;
    decoder->table = NULL;
    decoder->rejected_schema = decoder->rejected_table = NULL;
}

/* ---------------------------------------------------------------- public API */

const char *wp_op_name(wp_op_t op)
{
    switch (op) {
    case WP_OP_BEGIN:
        return "begin";
    case WP_OP_COMMIT:
        return "commit";
    case WP_OP_INSERT:
        return "insert";
    case WP_OP_UPDATE:
        return "update";
    case WP_OP_DELETE:
        return "delete";
    case WP_OP_TRUNCATE:
        return "truncate";
    case WP_OP_MESSAGE:
        return "message";
    }
    return "unknown";
}

wp_decoder_t *wp_decoder_create(void)
{
    return wp_calloc(1, sizeof(wp_decoder_t));
}

void wp_decoder_destroy(wp_decoder_t *decoder)
{
    if (decoder == NULL)
        return;
    wp_buf_free(&decoder->text);
    wp_buf_free(&decoder->mask_text);
    free(decoder->lists[0].cols);
    free(decoder->lists[1].cols);
    tables_clear(decoder);
    free(decoder->tables);
    free(decoder);
}

int wp_decoder_parse(wp_decoder_t *decoder, const char *data, size_t len, wp_change_t *change, char *errbuf,
                     size_t errlen)
{
    int rc = -1;
    jkind_t top = JK_ABSENT;
    wp_change_t c;

    memset(change, 0, sizeof *change);
    memset(&c, 0, sizeof c);
    if (errbuf && errlen)
        errbuf[0] = '\0';

    forget_message(decoder); /* whatever the outcome, the previous message is gone now */

    if (len == 0) {
        fail(errbuf, errlen, "empty message");
        goto out;
    }
    if (read_message(decoder, data, len, &top, errbuf, errlen) < 0)
        goto out;
    if (parse_message(decoder, top, &c, errbuf, errlen) < 0) {
        decoder->has_ident = false;
        decoder->table = NULL;
        /* the table, when the message got that far, for the dead letter */
        decoder->rejected_schema = c.schema;
        decoder->rejected_table = c.table;
        goto out;
    }
    decoder->last = c;
    decoder->valid = true;
    *change = c;
    rc = 0;
out:
    return rc;
}

/* ---------------------------------------------------------------- changes decoded elsewhere */

/* Copies s[0..len) with a NUL into decoder->text (reserved by the caller: pointers into it hold). */
static const char *load_text(wp_decoder_t *decoder, const char *s, size_t len)
{
    wp_buf_t *text = &decoder->text;
    char *p = text->data + text->len;
    if (len)
        memcpy(p, s, len);
    p[len] = '\0';
    text->len += len + 1;
    return p;
}

/* Bytes load_text needs for the strings of cols. */
static size_t load_size(const wp_decoder_column_t *cols, size_t n)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += strlen(cols[i].name) + strlen(cols[i].type) + (cols[i].isnull ? 0 : cols[i].len) + 3;
    return total;
}

/* Fills list with cols as parse_columns() would have from wal2json's entries.  what names the list in reasons. */
static int load_columns(wp_decoder_t *decoder, const char *what, const wp_decoder_column_t *cols, size_t n,
                        bool positions, col_list_t *list, char *errbuf, size_t errlen)
{
    if (n > list->cap) {
        list->cap = n;
        list->cols = wp_realloc(list->cols, n * sizeof *list->cols);
    }
    list->n = n;
    for (size_t i = 0; i < n; i++) {
        const wp_decoder_column_t *in = &cols[i];
        col_t *col = &list->cols[i];
        memset(col, 0, sizeof *col);
        size_t name_len = strlen(in->name), type_len = strlen(in->type);
        if (!wp_utf8_valid((const unsigned char *)in->name, name_len))
            return fail(errbuf, errlen, "\"%s\" entry %zu: the column name is not valid UTF-8", what, i + 1);
        col->name = load_text(decoder, in->name, name_len);
        col->name_len = name_len;
        col->type = load_text(decoder, in->type, type_len);
        col->type_len = type_len;
        col->typeoid = in->typeoid;
        col->position = positions && in->position > 0 ? in->position : -1;
        col->vclass = classify(col->typeoid, col->type, col->type_len);
        jval_t *v = &col->key[CK_VALUE];
        col->value = v;
        if (in->isnull) {
            v->kind = JK_NULL;
            continue;
        }
        const char *s = in->text;
        size_t len = in->len;
        if (memchr(s, '\0', len) != NULL)
            return fail(errbuf, errlen, "\"%s\" entry %zu (\"%.64s\"): the value holds a NUL byte", what, i + 1,
                        col->name);
        if (!wp_utf8_valid((const unsigned char *)s, len))
            return fail(errbuf, errlen, "\"%s\" entry %zu (\"%.64s\"): the value is not valid UTF-8", what, i + 1,
                        col->name);
        if (col->vclass == VC_BOOL) {
            if (len != 1 || (s[0] != 't' && s[0] != 'f'))
                return fail(errbuf, errlen, "\"%s\" entry %zu (\"%.64s\"): boolean value is not t or f", what, i + 1,
                            col->name);
            v->kind = s[0] == 't' ? JK_TRUE : JK_FALSE;
            continue;
        }
        if (col->vclass == VC_BYTEA) {
            /* PostgreSQL prints \x<hex> (bytea_output=hex, pinned by the reader); wal2json drops the \x */
            bool hex = len >= 2 && s[0] == '\\' && s[1] == 'x' && len % 2 == 0;
            for (size_t k = 2; hex && k < len; k++)
                hex = wp_hexval((unsigned char)s[k]) >= 0;
            if (!hex)
                return fail(errbuf, errlen, "\"%s\" entry %zu (\"%.64s\"): bytea value is not \\x<hex> "
                            "(bytea_output=escape?)", what, i + 1, col->name);
            s += 2;
            len -= 2;
        }
        v->kind = JK_STRING;
        v->s = load_text(decoder, s, len);
        v->len = len;
    }
    return 0;
}

int wp_decoder_load(wp_decoder_t *decoder, const wp_change_t *change, const wp_decoder_column_t *cols, size_t ncols,
                    const wp_decoder_column_t *ident, size_t nident, bool has_ident, bool ident_full,
                    wp_change_t *out, char *errbuf, size_t errlen)
{
    wp_change_t c = *change;
    const char *schema = change->schema, *table = change->table;
    size_t need = 16;

    memset(out, 0, sizeof *out);
    if (errbuf && errlen)
        errbuf[0] = '\0';
    forget_message(decoder);
    c.schema = c.table = c.prefix = c.content = NULL;
    c.ncolumns = c.nidentity = 0;

    need += (schema ? strlen(schema) : 0) + (table ? strlen(table) : 0) + 2;
    if (change->op == WP_OP_MESSAGE)
        need += strlen(change->prefix) + change->content_len + 2;
    need += load_size(cols, ncols) + load_size(ident, nident);
    if (decoder->text.cap > TEXT_KEEP && need < TEXT_KEEP / 2)
        wp_buf_free(&decoder->text); /* a huge change is over: give its memory back */
    wp_buf_reset(&decoder->text);
    wp_buf_reserve(&decoder->text, need);
    decoder->lists[0].n = 0;
    decoder->lists[1].n = 0;

    if (schema)
        c.schema = load_text(decoder, schema, strlen(schema));
    if (table)
        c.table = load_text(decoder, table, strlen(table));
    if ((c.schema && !wp_utf8_valid((const unsigned char *)c.schema, strlen(c.schema))) ||
        (c.table && !wp_utf8_valid((const unsigned char *)c.table, strlen(c.table))))
        return fail(errbuf, errlen, "the table's name is not valid UTF-8");
    decoder->rejected_schema = c.schema;
    decoder->rejected_table = c.table;

    switch (c.op) {
    case WP_OP_BEGIN:
    case WP_OP_COMMIT:
        break;
    case WP_OP_MESSAGE: {
        /* like wal2json, which copies the content with strncpy: it ends at a NUL */
        const char *nul = memchr(change->content, '\0', change->content_len);
        size_t clen = nul ? (size_t)(nul - change->content) : change->content_len;
        if (!wp_utf8_valid((const unsigned char *)change->prefix, strlen(change->prefix)) ||
            !wp_utf8_valid((const unsigned char *)change->content, clen))
            return fail(errbuf, errlen, "not valid UTF-8 (a logical message's prefix or content)");
        c.prefix = load_text(decoder, change->prefix, strlen(change->prefix));
        c.content = load_text(decoder, change->content, clen);
        c.content_len = clen;
        if (JSONB_CONTAINER_EXTRA + 3 * JSONB_PAIR_EXTRA + 26 + strlen(c.prefix) + clen + 2 * JSONB_SCALAR_EXTRA >
            JSONB_MAX_BYTES)
            return fail(errbuf, errlen, "the message's content of %zu bytes is over jsonb's limit of %zu bytes",
                        clen, JSONB_MAX_BYTES);
        break;
    }
    case WP_OP_TRUNCATE:
        if (c.table == NULL)
            return fail(errbuf, errlen, "a truncate without a table");
        break;
    default: {
        if (c.table == NULL)
            return fail(errbuf, errlen, "a change without a table");
        if (c.op != WP_OP_DELETE && load_columns(decoder, "columns", cols, ncols, true, &decoder->lists[0], errbuf,
                                                 errlen) < 0)
            return -1;
        if (c.op == WP_OP_DELETE && !has_ident)
            return fail(errbuf, errlen, "\"identity\" is missing");
        if (has_ident && c.op != WP_OP_INSERT) {
            /* wal2json sends positions with the new row only, never with the identity */
            if (load_columns(decoder, "identity", ident, nident, false, &decoder->lists[1], errbuf, errlen) < 0)
                return -1;
            decoder->has_ident = true;
        }
        size_t nc = decoder->lists[0].n, ni = decoder->lists[1].n;
        decoder->table = table_get(decoder, c.schema ? c.schema : "", c.schema ? strlen(c.schema) : 0, c.table,
                                   strlen(c.table));
        if (decoder->filter)
            apply_filter(decoder, &nc, &ni);
        c.ncolumns = nc;
        c.nidentity = ni;
        const col_t *widest = NULL;
        size_t bound = JSONB_CONTAINER_EXTRA + 2 * (JSONB_PAIR_EXTRA + 6);
        if (c.op != WP_OP_DELETE)
            bound += jsonb_row_bound(decoder->lists[0].cols, nc, &widest);
        if (decoder->has_ident)
            bound += jsonb_row_bound(decoder->lists[1].cols, ni, &widest);
        if (bound > JSONB_MAX_BYTES) {
            decoder->has_ident = false;
            decoder->table = NULL;
            return fail(errbuf, errlen,
                        "the change's payload would take up to %zu bytes as jsonb, over jsonb's limit of %zu bytes "
                        "(largest value: column \"%.64s\", %zu bytes)",
                        bound, JSONB_MAX_BYTES, widest ? widest->name : "", widest ? widest->value->len : 0);
        }
        decoder->ident_full = decoder->has_ident && ident_full;
        if (c.op == WP_OP_INSERT)
            decoder->table->ncols = (int64_t)nc;
        break;
    }
    }
    decoder->rejected_schema = decoder->rejected_table = NULL;
    decoder->last = c;
    decoder->valid = true;
    *out = c;
    return 0;
}

void wp_decoder_set_rejected(wp_decoder_t *decoder, const char *schema, const char *table)
{
    size_t slen = schema ? strlen(schema) : 0, tlen = table ? strlen(table) : 0;
    decoder->valid = false;
    decoder->has_ident = false;
    decoder->table = NULL;
    wp_buf_reset(&decoder->text);
    wp_buf_reserve(&decoder->text, slen + tlen + 2);
    decoder->rejected_schema = schema ? load_text(decoder, schema, slen) : NULL;
    decoder->rejected_table = table ? load_text(decoder, table, tlen) : NULL;
    if ((schema && !wp_utf8_valid((const unsigned char *)schema, slen)) ||
        (table && !wp_utf8_valid((const unsigned char *)table, tlen)))
        decoder->rejected_schema = decoder->rejected_table = NULL; /* dead letters are text: unnamed then */
}

void wp_decoder_set_filter(wp_decoder_t *decoder, const wp_filter_t *filter)
{
    decoder->filter = filter;
    tables_clear(decoder); /* cached rules belong to the previous filter */
}

void wp_decoder_rejected_table(const wp_decoder_t *decoder, const char **schema, const char **table)
{
    *schema = decoder->rejected_schema;
    *table = decoder->rejected_table;
}

static const wp_change_t *current(const wp_decoder_t *decoder, const wp_change_t *change)
{
    if (!decoder->valid || change == NULL || change->op != decoder->last.op)
        return NULL;
    return &decoder->last;
}

void wp_decoder_payload(wp_decoder_t *decoder, const wp_change_t *change, wp_buf_t *out)
{
    const wp_change_t *c = current(decoder, change);
    if (c == NULL) {
        wp_buf_append(out, "{}", 2);
        return;
    }
    switch (c->op) {
    case WP_OP_INSERT:
        wp_buf_append(out, "{\"after\":", 9);
        put_row(out, decoder->lists[0].cols, c->ncolumns);
        wp_buf_putc(out, '}');
        return;
    case WP_OP_UPDATE:
        wp_buf_append(out, "{\"after\":", 9);
        put_row(out, decoder->lists[0].cols, c->ncolumns);
        if (decoder->has_ident) {
            wp_buf_puts(out, decoder->ident_full ? ",\"before\":" : ",\"key\":");
            put_row(out, decoder->lists[1].cols, c->nidentity);
        }
        wp_buf_putc(out, '}');
        return;
    case WP_OP_DELETE:
        wp_buf_puts(out, decoder->ident_full ? "{\"before\":" : "{\"key\":");
        put_row(out, decoder->lists[1].cols, c->nidentity);
        wp_buf_putc(out, '}');
        return;
    case WP_OP_MESSAGE:
        wp_buf_append(out, "{\"prefix\":", 10);
        put_string(out, c->prefix, strlen(c->prefix));
        wp_buf_append(out, ",\"content\":", 11);
        put_string(out, c->content, c->content_len);
        wp_buf_puts(out, c->transactional ? ",\"transactional\":true}" : ",\"transactional\":false}");
        return;
    default: /* T, and B/C which have no payload */
        wp_buf_append(out, "{}", 2);
        return;
    }
}

static bool shape_matches(const shape_t *s, const col_t *cols, size_t n)
{
    if (!s->used || s->ncols != n)
        return false;
    const char *p = s->sig.data;
    const char *end = p + s->sig.len;
    for (size_t i = 0; i < n; i++) {
        const col_t *col = &cols[i];
        if (s->oids[i] != col->typeoid || s->positions[i] != col->position)
            return false;
        if ((size_t)(end - p) < col->name_len + 1 || memcmp(p, col->name, col->name_len) != 0 ||
            p[col->name_len] != '\0')
            return false;
        p += col->name_len + 1;
        if ((size_t)(end - p) < col->type_len + 1 || memcmp(p, col->type, col->type_len) != 0 ||
            p[col->type_len] != '\0')
            return false;
        p += col->type_len + 1;
    }
    return p == end;
}

/* Fills slot s with the shape of cols: signature, JSON and id. */
static void shape_build(shape_t *s, const wp_change_t *c, const col_t *cols, size_t n)
{
    s->used = true;
    s->ncols = n;
    wp_buf_reset(&s->sig);
    wp_buf_reset(&s->json);
    if (n > s->oids_cap) {
        s->oids_cap = n;
        s->oids = wp_realloc(s->oids, n * sizeof *s->oids);
        s->positions = wp_realloc(s->positions, n * sizeof *s->positions);
    }
    wp_buf_putc(&s->json, '[');
    for (size_t i = 0; i < n; i++) {
        const col_t *col = &cols[i];
        s->oids[i] = col->typeoid;
        s->positions[i] = col->position;
        wp_buf_append(&s->sig, col->name, col->name_len);
        wp_buf_putc(&s->sig, '\0');
        wp_buf_append(&s->sig, col->type, col->type_len);
        wp_buf_putc(&s->sig, '\0');

        if (i)
            wp_buf_putc(&s->json, ',');
        wp_buf_append(&s->json, "{\"name\":", 8);
        put_string(&s->json, col->name, col->name_len);
        wp_buf_append(&s->json, ",\"type\":", 8);
        put_string(&s->json, col->type, col->type_len);
        wp_buf_append(&s->json, ",\"typeoid\":", 11);
        if (col->typeoid >= 0)
            wp_buf_put_i64(&s->json, col->typeoid);
        else
            wp_buf_append(&s->json, "null", 4);
        if (col->position >= 0) { /* only when wal2json sent it: shapes without positions keep their ids */
            wp_buf_append(&s->json, ",\"position\":", 12);
            wp_buf_put_i64(&s->json, col->position);
        }
        wp_buf_putc(&s->json, '}');
    }
    wp_buf_putc(&s->json, ']');

    /* Schema and table are NUL-free (the parse rejects \u0000), so NUL separates them. */
    const char *schema = c->schema ? c->schema : "";
    uint64_t h = fnv1a(FNV_OFFSET, schema, strlen(schema));
    h = fnv1a(h, "", 1);
    h = fnv1a(h, c->table, strlen(c->table));
    h = fnv1a(h, "", 1);
    h = fnv1a(h, s->json.data, s->json.len);
    s->id = (int64_t)(h & (uint64_t)INT64_MAX);
    if (s->id == 0) /* 0 means "no shape" to callers */
        s->id = 1;
}

int64_t wp_decoder_shape(wp_decoder_t *decoder, const wp_change_t *change, wp_buf_t *out)
{
    const wp_change_t *c = current(decoder, change);
    if (c == NULL || decoder->table == NULL)
        return 0;
    const col_t *cols;
    size_t n;
    switch (c->op) {
    case WP_OP_INSERT:
    case WP_OP_UPDATE:
        cols = decoder->lists[0].cols;
        n = c->ncolumns;
        break;
    case WP_OP_DELETE:
        cols = decoder->lists[1].cols;
        n = c->nidentity;
        break;
    default:
        return 0;
    }

    table_entry_t *t = decoder->table;
    shape_t *s = NULL;
    for (int i = 0; i < SHAPE_SLOTS && s == NULL; i++) {
        if (shape_matches(&t->shapes[i], cols, n))
            s = &t->shapes[i];
    }
    if (s == NULL) {
        s = &t->shapes[t->next_slot];
        t->next_slot = (t->next_slot + 1) % SHAPE_SLOTS;
        shape_build(s, c, cols, n);
    }
    wp_buf_append(out, s->json.data, s->json.len);
    return s->id;
}
