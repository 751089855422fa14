/*
 * decoder.c: wal2json format-version-2 messages -> wp_change_t, payloads and shapes.
 *
 * The decoder owns three things: the jansson tree of the last message that
 * parsed (decoder->root), per-message scratch arrays reused from call to call,
 * and a small per-table cache (column count of the table's rows, for the
 * "key" vs "before" heuristic, and the table's recent shapes with their ids).
 *
 * Invariants:
 *  - After a successful wp_decoder_parse, root holds the message and every
 *    pointer in the returned wp_change_t and in decoder->cols/ident borrows
 *    from it until the next parse or wp_decoder_destroy.  After a failed
 *    parse the decoder holds no message (valid == false).
 *  - A message that parses has been validated completely, so
 *    wp_decoder_payload and wp_decoder_shape cannot fail on it and always
 *    write valid JSON that PostgreSQL accepts as jsonb.
 *  - No number is ever rounded.  jansson only sees integers it stores exactly
 *    (int64, other than "-0"): prepass() turns every other number token in a
 *    value position (but not where a string is required) into a JSON string
 *    holding the exact text wal2json printed.  The value rules then decide
 *    per column type whether that text goes out as a JSON number or as a
 *    JSON string.
 *  - Strings holding NUL (\u0000) are rejected: jsonb cannot store them.
 *
 * A decoder is used by one thread at a time; it has no global state.
 */
#include "wp_setup.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "decoder.h"
#include "log.h"

/* Shapes remembered per table: I, U without TOAST columns, D identity, one spare. */
#define SHAPE_SLOTS 4
/* The table cache is emptied when it reaches this many tables (it is only a cache). */
#define MAX_TABLES 16384
/* Bit stack of container kinds in prepass(); deeper containers are left alone. */
#define PREPASS_MAX_DEPTH 64
/* Largest integer a double holds exactly, as decimal text. */
#define INT53_TEXT "9007199254740992"
#define INT53 INT64_C(9007199254740992)

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

/* One entry of "columns" or "identity"; strings borrow from decoder->root. */
typedef struct col {
    const char *name;
    size_t name_len;
    const char *type;
    size_t type_len;
    int64_t typeoid; /* 0..UINT32_MAX, or -1 when "typeoid" is absent */
    json_t *value;
    vclass_t vclass;
} col_t;

typedef struct shape {
    bool used;
    size_t ncols;
    wp_buf_t sig;    /* per column: name NUL type NUL (names and types never hold NUL) */
    int64_t *oids;   /* ncols typeoids, -1 for absent */
    size_t oids_cap;
    wp_buf_t json;   /* [{"name":..,"type":..,"typeoid":N|null},...] */
    int64_t id;
} shape_t;

typedef struct table_entry {
    uint64_t hash;
    char *key; /* schema NUL table (absent schema as ""), owned */
    size_t key_len;
    int64_t ncols; /* columns of a whole row of the table as last seen, -1 unknown */
    shape_t shapes[SHAPE_SLOTS];
    unsigned next_slot; /* round-robin victim when no slot matches */
} table_entry_t;

/* A number token prepass() wrapped in quotes: offset and length in the original message. */
typedef struct wrap {
    size_t off;
    size_t len;
} wrap_t;

/*
 * Per-message arena for jansson's allocations (see "arena" below): the tree of
 * one message is built by bumping a pointer and thrown away in one step when
 * the next message is parsed, instead of thousands of malloc/free pairs.
 */
typedef struct arena_block {
    struct arena_block *next;
    size_t size, used;
    max_align_t data[];
} arena_block_t;

typedef struct arena {
    arena_block_t *head; /* newest block first */
} arena_t;

struct wp_decoder {
    arena_t arena;     /* owns the nodes of root when root came from wp_decoder_parse */
    json_t *root;      /* the last successful parse, or NULL */
    bool valid;        /* root and last describe a message */
    wp_change_t last;  /* what the last successful parse returned */
    col_t *cols;       /* "columns" of the last I/U */
    size_t cols_cap;
    col_t *ident;      /* "identity" of the last U/D */
    size_t ident_cap;
    bool has_ident;
    bool ident_full;   /* identity is the whole old row: "before", not "key" */
    table_entry_t *table; /* cache entry of the last I/U/D */

    wp_buf_t scratch;  /* prepass() output when it rewrote something */
    wrap_t *wraps;
    size_t nwraps;
    size_t wraps_cap;

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

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
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

/* jansson stores this integer literal exactly (fits int64 and is not "-0"). */
static bool int_text_exact_in_jansson(const char *s, size_t len)
{
    if (len == 2 && s[0] == '-' && s[1] == '0')
        return false;
    if (len > 0 && s[0] == '-')
        return int_text_within(s, len, "9223372036854775808");
    return int_text_within(s, len, "9223372036854775807");
}

/* Writes v in decimal into buf (at least 21 bytes); returns the length. */
static size_t format_i64(int64_t v, char *buf)
{
    char tmp[24];
    size_t n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t len = 0;
    if (v < 0)
        buf[len++] = '-';
    while (n)
        buf[len++] = tmp[--n];
    return len;
}

/* ---------------------------------------------------------------- JSON output */

/* Bytes that need escaping inside a JSON string: control characters, '"' and '\\'. */
static bool needs_escape(unsigned char c)
{
    return c < 0x20 || c == '"' || c == '\\';
}

/* Appends s[0..len) as a JSON string.  s is valid UTF-8 without NUL (jansson checked it). */
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
    const json_t *v = col->value;
    char num[24];
    size_t n;

    switch (json_typeof(v)) {
    case JSON_TRUE:
        wp_buf_append(out, "true", 4);
        return;
    case JSON_FALSE:
        wp_buf_append(out, "false", 5);
        return;
    case JSON_INTEGER: {
        json_int_t i = json_integer_value(v);
        n = format_i64((int64_t)i, num);
        if (col->vclass == VC_INT || col->vclass == VC_FLOAT ||
            (col->vclass == VC_INT8 && i >= -INT53 && i <= INT53))
            wp_buf_append(out, num, n);
        else
            put_string(out, num, n);
        return;
    }
    case JSON_STRING: {
        const char *s = json_string_value(v);
        size_t len = json_string_length(v);
        bool is_int;
        switch (col->vclass) {
        case VC_INT:
        case VC_FLOAT:
            /* NaN/Infinity (numeric-data-types-as-string) are not JSON numbers: keep the text. */
            if (json_number_text(s, len, &is_int) && number_fits_double(s, len))
                wp_buf_append(out, s, len);
            else
                put_string(out, s, len);
            return;
        case VC_INT8:
            if (json_number_text(s, len, &is_int) && is_int && int_text_within(s, len, INT53_TEXT))
                wp_buf_append(out, s, len);
            else
                put_string(out, s, len);
            return;
        case VC_BYTEA:
            /* Validated as hex digits by the parse; PostgreSQL's input form is \x<hex>. */
            wp_buf_reserve(out, len + 5);
            wp_buf_append(out, "\"\\\\x", 4);
            wp_buf_append(out, s, len);
            wp_buf_putc(out, '"');
            return;
        default:
            put_string(out, s, len);
            return;
        }
    }
    default: /* JSON_NULL; the parse admits no other kind */
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
    /* jansson quotes the offending input in its messages, and vsnprintf may cut a
     * character in two: the reason is stored as PostgreSQL text. */
    wp_log_sanitize(errbuf);
    return -1;
}

/* ---------------------------------------------------------------- prepass */

static void add_wrap(wp_decoder_t *decoder, size_t off, size_t len)
{
    if (decoder->nwraps == decoder->wraps_cap) {
        decoder->wraps_cap = decoder->wraps_cap ? decoder->wraps_cap * 2 : 16;
        decoder->wraps = wp_realloc(decoder->wraps, decoder->wraps_cap * sizeof *decoder->wraps);
    }
    decoder->wraps[decoder->nwraps].off = off;
    decoder->wraps[decoder->nwraps].len = len;
    decoder->nwraps++;
}

/*
 * True for the raw text (quotes included) of a key whose value the decoder
 * reads as text.  A number there must reach jansson unwrapped, so that the
 * field check says "is not a string" instead of taking the number's text as,
 * say, a column name.  A key holding an escape may spell any of them.
 */
static bool key_wants_string(const char *key, size_t len)
{
    static const char *const keys[] = {"\"action\"", "\"timestamp\"", "\"lsn\"",  "\"nextlsn\"", "\"schema\"",
                                       "\"table\"",  "\"name\"",      "\"type\"", "\"prefix\"",  "\"content\""};
    if (memchr(key, '\\', len) != NULL)
        return true;
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        if (len == strlen(keys[k]) && memcmp(key, keys[k], len) == 0)
            return true;
    }
    return false;
}

static bool is_number_char(unsigned char c)
{
    return is_digit(c) || c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E';
}

/*
 * Lets jansson load data without losing any number.  Every number token in a
 * value position (after ':' inside an object, after '[' or ',' inside an
 * array) that jansson would reject ("too big integer"), round (reals) or
 * change ("-0") is wrapped in double quotes, so it arrives as a string holding
 * the exact text.  Only value positions are touched, so no malformed message
 * becomes well-formed; anything malformed is left for jansson to reject.
 * Nor is the value of a key the decoder reads as text (key_wants_string):
 * wrapped, "name": 1.5 would pass as the column name "1.5" (found by
 * tests/fuzz/fuzz_decoder.c).
 *
 * Sets *out to data itself when nothing needed wrapping (the common case: no
 * copy), else to decoder->scratch.  decoder->wraps records what was wrapped,
 * so error positions can be mapped back to the original bytes.
 */
static void prepass(wp_decoder_t *decoder, const char *data, size_t len, const char **out, size_t *outlen)
{
    uint64_t objbits = 0; /* bit d-1 set: the container at depth d is an object */
    size_t depth = 0;
    char prev = 0; /* last structural byte outside strings ('0' after a number) */
    size_t copied = 0;
    size_t i = 0;
    size_t str_off = 0; /* the last string, quotes included: the key when prev is ':' */
    size_t str_len = 0;

    decoder->nwraps = 0;
    while (i < len) {
        unsigned char c = (unsigned char)data[i];
        if (c == '"') {
            str_off = i;
            for (i++; i < len; i++) {
                if (data[i] == '\\')
                    i++;
                else if (data[i] == '"')
                    break;
            }
            i++;
            str_len = (i < len ? i : len) - str_off;
            prev = '"';
            continue;
        }
        if (c == '-' || is_digit(c)) {
            size_t start = i;
            while (i < len && is_number_char((unsigned char)data[i]))
                i++;
            bool tracked = depth >= 1 && depth <= PREPASS_MAX_DEPTH;
            bool in_object = tracked && ((objbits >> (depth - 1)) & 1);
            bool in_array = tracked && !in_object;
            bool value_pos = (in_object && prev == ':' && !key_wants_string(data + str_off, str_len)) ||
                             (in_array && (prev == '[' || prev == ','));
            bool is_int;
            if (value_pos && json_number_text(data + start, i - start, &is_int) &&
                !(is_int && int_text_exact_in_jansson(data + start, i - start))) {
                if (decoder->nwraps == 0)
                    wp_buf_reset(&decoder->scratch);
                wp_buf_reserve(&decoder->scratch, (start - copied) + (i - start) + 2);
                wp_buf_append(&decoder->scratch, data + copied, start - copied);
                wp_buf_putc(&decoder->scratch, '"');
                wp_buf_append(&decoder->scratch, data + start, i - start);
                wp_buf_putc(&decoder->scratch, '"');
                copied = i;
                add_wrap(decoder, start, i - start);
            }
            prev = '0';
            continue;
        }
        switch (c) {
        case '{':
        case '[':
            depth++;
            if (depth <= PREPASS_MAX_DEPTH) {
                uint64_t bit = UINT64_C(1) << (depth - 1);
                objbits = c == '{' ? (objbits | bit) : (objbits & ~bit);
            }
            prev = (char)c;
            break;
        case '}':
        case ']':
            if (depth)
                depth--;
            prev = (char)c;
            break;
        case ' ':
        case '\t':
        case '\n':
        case '\r':
            break;
        default:
            prev = (char)c;
            break;
        }
        i++;
    }

    if (decoder->nwraps == 0) {
        *out = data;
        *outlen = len;
        return;
    }
    wp_buf_append(&decoder->scratch, data + copied, len - copied);
    *out = decoder->scratch.data;
    *outlen = decoder->scratch.len;
}

/* Maps a byte position in prepass() output back to the original message. */
static size_t original_position(const wp_decoder_t *decoder, size_t pos)
{
    size_t shift = 0;
    for (size_t k = 0; k < decoder->nwraps; k++) {
        size_t open = decoder->wraps[k].off + 2 * k; /* where the inserted '"' sits */
        if (pos <= open)
            break;
        if (pos >= open + decoder->wraps[k].len + 2)
            shift += 2;
        else
            shift += 1;
    }
    return pos - shift;
}

/* ---------------------------------------------------------------- table cache */

static void shape_free(shape_t *s)
{
    wp_buf_free(&s->sig);
    wp_buf_free(&s->json);
    WP_FREE(s->oids);
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

/* ---------------------------------------------------------------- validation */

static bool key_is(const char *key, size_t klen, const char *lit)
{
    size_t n = strlen(lit);
    return klen == n && memcmp(key, lit, n) == 0;
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
 * Validates the array under what ("columns" or "identity") into *cols
 * (grown as needed).  Entries are numbered from 1 in reasons, like attnums.
 */
static int parse_columns(const char *what, const json_t *arr, col_t **cols, size_t *cap, size_t *ncols,
                         char *errbuf, size_t errlen)
{
    if (!json_is_array(arr))
        return fail(errbuf, errlen, "\"%s\" is not an array", what);
    size_t n = json_array_size(arr);
    if (n > *cap) {
        *cap = n < 16 ? 16 : n;
        *cols = wp_realloc(*cols, *cap * sizeof **cols);
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *entry = json_array_get(arr, i);
        const json_t *name = NULL;
        const json_t *type = NULL;
        const json_t *typeoid = NULL;
        json_t *value = NULL;
        col_t *col = &(*cols)[i];

        if (!json_is_object(entry))
            return fail(errbuf, errlen, "\"%s\" entry %zu is not an object", what, i + 1);
        for (void *it = json_object_iter((json_t *)entry); it; it = json_object_iter_next((json_t *)entry, it)) {
            const char *key = json_object_iter_key(it);
            size_t klen = json_object_iter_key_len(it);
            if (key_is(key, klen, "name"))
                name = json_object_iter_value(it);
            else if (key_is(key, klen, "type"))
                type = json_object_iter_value(it);
            else if (key_is(key, klen, "typeoid"))
                typeoid = json_object_iter_value(it);
            else if (key_is(key, klen, "value"))
                value = json_object_iter_value(it);
        }
        if (name == NULL)
            return fail(errbuf, errlen, "\"%s\" entry %zu has no \"name\"", what, i + 1);
        if (!json_is_string(name))
            return fail(errbuf, errlen, "\"%s\" entry %zu: \"name\" is not a string", what, i + 1);
        if (type == NULL)
            return fail(errbuf, errlen, "\"%s\" entry %zu has no \"type\"", what, i + 1);
        if (!json_is_string(type))
            return fail(errbuf, errlen, "\"%s\" entry %zu: \"type\" is not a string", what, i + 1);
        col->name = json_string_value(name);
        col->name_len = json_string_length(name);
        col->type = json_string_value(type);
        col->type_len = json_string_length(type);
        col->typeoid = -1;
        if (typeoid) {
            if (!json_is_integer(typeoid))
                return fail(errbuf, errlen, "\"%s\" entry %zu: \"typeoid\" is not an integer", what, i + 1);
            json_int_t oid = json_integer_value(typeoid);
            /* wal2json prints the unsigned OID with %d, so OIDs above 2^31 arrive negative. */
            if (oid < INT32_MIN || oid > (json_int_t)UINT32_MAX)
                return fail(errbuf, errlen, "\"%s\" entry %zu: \"typeoid\" %" PRId64 " is not an OID", what, i + 1,
                            (int64_t)oid);
            col->typeoid = oid < 0 ? (int64_t)oid + (INT64_C(1) << 32) : (int64_t)oid;
        }
        if (value == NULL)
            return fail(errbuf, errlen, "\"%s\" entry %zu has no \"value\"", what, i + 1);
        switch (json_typeof(value)) {
        case JSON_NULL:
        case JSON_TRUE:
        case JSON_FALSE:
        case JSON_INTEGER:
        case JSON_STRING:
            break;
        default:
            return fail(errbuf, errlen, "\"%s\" entry %zu: \"value\" is not a string, integer, boolean or null",
                        what, i + 1);
        }
        col->value = value;
        col->vclass = classify(col->typeoid, col->type, col->type_len);
        if (col->vclass == VC_BYTEA && !json_is_null(value)) {
            /* Anything but hex means the walsender ran with bytea_output=escape: wal2json
             * mangles that form (issue #301), so the value cannot be trusted. */
            const char *s = json_string_value(value);
            size_t len = json_string_length(value);
            bool hex = s != NULL && len % 2 == 0;
            for (size_t k = 0; hex && k < len; k++)
                hex = hexval((unsigned char)s[k]) >= 0;
            if (!hex)
                return fail(errbuf, errlen, "\"%s\" entry %zu: bytea \"value\" is not hex (bytea_output=escape?)",
                            what, i + 1);
        }
    }
    *ncols = n;
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
            if (!has_column(decoder->ident, nident, &decoder->cols[i], &hint))
                return;
        }
        decoder->ident_full = true;
        t->ncols = (int64_t)nident;
        return;
    }
    if (op == WP_OP_DELETE)
        decoder->ident_full = t->ncols >= 0 && (int64_t)nident == t->ncols;
}

static int parse_action(const json_t *action, wp_op_t *op, char *errbuf, size_t errlen)
{
    if (action == NULL)
        return fail(errbuf, errlen, "\"action\" is missing");
    if (!json_is_string(action))
        return fail(errbuf, errlen, "\"action\" is not a string");
    const char *s = json_string_value(action);
    size_t len = json_string_length(action);
    if (len == 1) {
        switch (s[0]) {
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
    return fail(errbuf, errlen, "unknown action \"%.32s\"", s);
}

static int parse_lsn_field(const char *what, const json_t *v, wp_lsn_t *out, char *errbuf, size_t errlen)
{
    if (!json_is_string(v))
        return fail(errbuf, errlen, "\"%s\" is not a string", what);
    if (!wp_lsn_parse(json_string_value(v), json_string_length(v), out))
        return fail(errbuf, errlen, "\"%s\" is not an LSN: \"%.40s\"", what, json_string_value(v));
    return 0;
}

/* The top-level fields the decoder reads; NULL when absent. */
typedef struct fields {
    const json_t *action, *xid, *timestamp, *lsn, *nextlsn, *schema, *table, *columns, *identity, *transactional,
        *prefix, *content;
} fields_t;

static void collect_fields(json_t *root, fields_t *f)
{
    memset(f, 0, sizeof *f);
    for (void *it = json_object_iter(root); it; it = json_object_iter_next(root, it)) {
        const char *k = json_object_iter_key(it);
        size_t n = json_object_iter_key_len(it);
        const json_t *v = json_object_iter_value(it);
        if (key_is(k, n, "action"))
            f->action = v;
        else if (key_is(k, n, "xid"))
            f->xid = v;
        else if (key_is(k, n, "timestamp"))
            f->timestamp = v;
        else if (key_is(k, n, "lsn"))
            f->lsn = v;
        else if (key_is(k, n, "nextlsn"))
            f->nextlsn = v;
        else if (key_is(k, n, "schema"))
            f->schema = v;
        else if (key_is(k, n, "table"))
            f->table = v;
        else if (key_is(k, n, "columns"))
            f->columns = v;
        else if (key_is(k, n, "identity"))
            f->identity = v;
        else if (key_is(k, n, "transactional"))
            f->transactional = v;
        else if (key_is(k, n, "prefix"))
            f->prefix = v;
        else if (key_is(k, n, "content"))
            f->content = v;
    }
}

/* Validates the fields of root into *c and the decoder's column arrays. */
static int parse_message(wp_decoder_t *decoder, json_t *root, wp_change_t *c, char *errbuf, size_t errlen)
{
    fields_t f;
    size_t ncols = 0;
    size_t nident = 0;

    if (!json_is_object(root))
        return fail(errbuf, errlen, "message is not a JSON object");
    collect_fields(root, &f);
    if (parse_action(f.action, &c->op, errbuf, errlen) < 0)
        return -1;

    if (f.xid && !json_is_null(f.xid)) {
        if (!json_is_integer(f.xid))
            return fail(errbuf, errlen, "\"xid\" is not an integer or null");
        if (json_integer_value(f.xid) < 0)
            return fail(errbuf, errlen, "\"xid\" is negative");
        c->has_xid = true;
        c->xid = (int64_t)json_integer_value(f.xid);
    }
    if (f.timestamp && !json_is_null(f.timestamp)) {
        if (!json_is_string(f.timestamp))
            return fail(errbuf, errlen, "\"timestamp\" is not a string or null");
        c->timestamp = json_string_value(f.timestamp);
    }
    if (f.lsn && parse_lsn_field("lsn", f.lsn, &c->lsn, errbuf, errlen) < 0)
        return -1;

    switch (c->op) {
    case WP_OP_BEGIN:
    case WP_OP_COMMIT:
        if (f.nextlsn == NULL)
            return fail(errbuf, errlen, "\"nextlsn\" is missing (include-lsn off?)");
        return parse_lsn_field("nextlsn", f.nextlsn, &c->nextlsn, errbuf, errlen);
    case WP_OP_MESSAGE:
        if (f.transactional == NULL)
            return fail(errbuf, errlen, "\"transactional\" is missing");
        if (!json_is_boolean(f.transactional))
            return fail(errbuf, errlen, "\"transactional\" is not a boolean");
        if (f.prefix == NULL)
            return fail(errbuf, errlen, "\"prefix\" is missing");
        if (!json_is_string(f.prefix))
            return fail(errbuf, errlen, "\"prefix\" is not a string");
        if (f.content == NULL)
            return fail(errbuf, errlen, "\"content\" is missing");
        if (!json_is_string(f.content))
            return fail(errbuf, errlen, "\"content\" is not a string");
        c->transactional = json_is_true(f.transactional);
        c->prefix = json_string_value(f.prefix);
        c->content = json_string_value(f.content);
        c->content_len = json_string_length(f.content);
        return 0;
    default:
        break;
    }

    /* I, U, D, T */
    if (f.table == NULL)
        return fail(errbuf, errlen, "\"table\" is missing");
    if (!json_is_string(f.table))
        return fail(errbuf, errlen, "\"table\" is not a string");
    if (f.schema && !json_is_string(f.schema))
        return fail(errbuf, errlen, "\"schema\" is not a string");
    c->table = json_string_value(f.table);
    c->schema = f.schema ? json_string_value(f.schema) : NULL;
    if (c->op == WP_OP_TRUNCATE)
        return 0;

    if (c->op != WP_OP_DELETE) {
        if (f.columns == NULL)
            return fail(errbuf, errlen, "\"columns\" is missing");
        if (parse_columns("columns", f.columns, &decoder->cols, &decoder->cols_cap, &ncols, errbuf, errlen) < 0)
            return -1;
    }
    if (c->op != WP_OP_INSERT) {
        if (f.identity == NULL && c->op == WP_OP_DELETE)
            return fail(errbuf, errlen, "\"identity\" is missing");
        if (f.identity) {
            if (parse_columns("identity", f.identity, &decoder->ident, &decoder->ident_cap, &nident, errbuf,
                              errlen) < 0)
                return -1;
            decoder->has_ident = true;
        }
    }
    c->ncolumns = ncols;
    c->nidentity = nident;
    decoder->table = table_get(decoder, c->schema ? c->schema : "", f.schema ? json_string_length(f.schema) : 0,
                               c->table, json_string_length(f.table));
    decide_identity(decoder, c->op, ncols, nident);
    return 0;
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

/* ---- arena ------------------------------------------------------------------------------- */

/*
 * jansson takes one process-wide pair of allocation functions.  They serve
 * from an arena only while a decoder has made it current for this thread
 * (tl_alloc: during json_loadb), and skip freeing pointers that lie in the
 * arena whose tree is being released (tl_owner).  Everything else goes to
 * malloc/free, so jansson trees built elsewhere are unaffected.
 */
#define ARENA_BLOCK (64 * 1024)

static __thread arena_t *tl_alloc;
static __thread const arena_t *tl_owner;
static pthread_once_t alloc_once = PTHREAD_ONCE_INIT;

static void *arena_malloc(size_t n)
{
    arena_t *a = tl_alloc;
    if (a == NULL)
        return malloc(n);
    n = (n + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
    arena_block_t *b = a->head;
    if (b == NULL || b->used + n > b->size) {
        size_t size = n > ARENA_BLOCK / 4 ? n : ARENA_BLOCK;
        b = malloc(sizeof *b + size);
        if (b == NULL)
            return NULL;
        b->size = size;
        b->used = 0;
        b->next = a->head;
        a->head = b;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    return p;
}

static bool arena_owns(const arena_t *a, const void *p)
{
    for (const arena_block_t *b = a->head; b; b = b->next)
        if ((const char *)p >= (const char *)b->data && (const char *)p < (const char *)b->data + b->size)
            return true;
    return false;
}

static void arena_free(void *p)
{
    if (p == NULL || (tl_owner && arena_owns(tl_owner, p)))
        return;
    free(p);
}

/* Drops everything allocated; keeps one standard block for the next message. */
static void arena_reset(arena_t *a)
{
    arena_block_t *keep = NULL;
    for (arena_block_t *b = a->head, *n; b; b = n) {
        n = b->next;
        if (keep == NULL && b->size == ARENA_BLOCK) {
            keep = b;
            continue;
        }
        free(b);
    }
    if (keep) {
        keep->used = 0;
        keep->next = NULL;
    }
    a->head = keep;
}

static void set_alloc_funcs(void)
{
    json_set_alloc_funcs(arena_malloc, arena_free);
}

/* Releases the decoder's current tree and, with it, the arena's contents. */
static void release_root(wp_decoder_t *decoder)
{
    tl_owner = &decoder->arena;
    json_decref(decoder->root);
    tl_owner = NULL;
    decoder->root = NULL;
    arena_reset(&decoder->arena);
}

wp_decoder_t *wp_decoder_create(void)
{
    pthread_once(&alloc_once, set_alloc_funcs);
    wp_decoder_t *decoder = wp_calloc(1, sizeof *decoder);
    return decoder;
}

void wp_decoder_destroy(wp_decoder_t *decoder)
{
    if (decoder == NULL)
        return;
    release_root(decoder);
    free(decoder->arena.head);
    free(decoder->cols);
    free(decoder->ident);
    wp_buf_free(&decoder->scratch);
    free(decoder->wraps);
    tables_clear(decoder);
    free(decoder->tables);
    free(decoder);
}

/* Validates root (ownership passes to the decoder) and makes it the current message. */
static int adopt(wp_decoder_t *decoder, json_t *root, wp_change_t *change, char *errbuf, size_t errlen)
{
    wp_change_t c;
    memset(&c, 0, sizeof c);
    if (parse_message(decoder, root, &c, errbuf, errlen) < 0) {
        json_decref(root);
        decoder->has_ident = false;
        decoder->table = NULL;
        return -1;
    }
    decoder->root = root; /* c borrows from it from now on */
    decoder->last = c;
    decoder->valid = true;
    *change = c;
    return 0;
}

int wp_decoder_parse(wp_decoder_t *decoder, const char *data, size_t len, wp_change_t *change, char *errbuf,
                     size_t errlen)
{
    int rc = -1;
    json_t *root = NULL;
    json_error_t jerr;
    const char *text;
    size_t textlen;

    memset(change, 0, sizeof *change);
    if (errbuf && errlen)
        errbuf[0] = '\0';

    /* Whatever the outcome, the previous message is released now. */
    release_root(decoder);
    decoder->valid = false;
    decoder->has_ident = false;
    decoder->ident_full = false;
    decoder->table = NULL;

    if (len == 0) {
        fail(errbuf, errlen, "empty message");
        goto out;
    }
    prepass(decoder, data, len, &text, &textlen);
    tl_alloc = &decoder->arena;
    tl_owner = &decoder->arena;
    root = json_loadb(text, textlen, JSON_REJECT_DUPLICATES, &jerr);
    tl_alloc = NULL;
    if (root == NULL) {
        size_t pos = jerr.position < 0 ? 0 : original_position(decoder, (size_t)jerr.position);
        if (json_error_code(&jerr) == json_error_null_character ||
            json_error_code(&jerr) == json_error_null_byte_in_key)
            fail(errbuf, errlen, "invalid JSON at byte %zu: string contains \\u0000, which jsonb cannot store", pos);
        else if (json_error_code(&jerr) == json_error_invalid_utf8)
            fail(errbuf, errlen, "invalid JSON at byte %zu: not valid UTF-8 (wal2json passes message content "
                                 "through unchecked): %s", pos, jerr.text);
        else
            fail(errbuf, errlen, "invalid JSON at byte %zu: %s", pos, jerr.text);
        goto out;
    }
    rc = adopt(decoder, root, change, errbuf, errlen);
    root = NULL;
out:
    json_decref(root);
    tl_owner = NULL;
    return rc;
}

int wp_decoder_adopt(wp_decoder_t *decoder, json_t *root, wp_change_t *change, char *errbuf, size_t errlen)
{
    memset(change, 0, sizeof *change);
    if (errbuf && errlen)
        errbuf[0] = '\0';
    release_root(decoder);
    decoder->valid = false;
    decoder->has_ident = false;
    decoder->ident_full = false;
    decoder->table = NULL;
    /* root was built with malloc: nothing of it lives in the arena */
    return adopt(decoder, root, change, errbuf, errlen);
}

/* The decoder's last change, if change is it; NULL otherwise. */
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
        put_row(out, decoder->cols, c->ncolumns);
        wp_buf_putc(out, '}');
        return;
    case WP_OP_UPDATE:
        wp_buf_append(out, "{\"after\":", 9);
        put_row(out, decoder->cols, c->ncolumns);
        if (decoder->has_ident) {
            wp_buf_puts(out, decoder->ident_full ? ",\"before\":" : ",\"key\":");
            put_row(out, decoder->ident, c->nidentity);
        }
        wp_buf_putc(out, '}');
        return;
    case WP_OP_DELETE:
        wp_buf_puts(out, decoder->ident_full ? "{\"before\":" : "{\"key\":");
        put_row(out, decoder->ident, c->nidentity);
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
        if (s->oids[i] != col->typeoid)
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
    char num[24];

    s->used = true;
    s->ncols = n;
    wp_buf_reset(&s->sig);
    wp_buf_reset(&s->json);
    if (n > s->oids_cap) {
        s->oids_cap = n;
        s->oids = wp_realloc(s->oids, n * sizeof *s->oids);
    }
    wp_buf_putc(&s->json, '[');
    for (size_t i = 0; i < n; i++) {
        const col_t *col = &cols[i];
        s->oids[i] = col->typeoid;
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
            wp_buf_append(&s->json, num, format_i64(col->typeoid, num));
        else
            wp_buf_append(&s->json, "null", 4);
        wp_buf_putc(&s->json, '}');
    }
    wp_buf_putc(&s->json, ']');

    /* Schema and table are NUL-free (jansson rejects \u0000), so NUL separates them. */
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
        cols = decoder->cols;
        n = c->ncolumns;
        break;
    case WP_OP_DELETE:
        cols = decoder->ident;
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
