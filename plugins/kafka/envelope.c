/*
 * plugins/kafka/envelope.c: walpipe sink events -> Debezium-compatible Kafka records.
 *
 * Job: turn one wp_sink_event_t (a raw_events row: payload JSON, its shape, the table's
 * key columns) into the topic, key, value (and PK-change header) that Debezium's
 * PostgreSQL connector 3.1.3.Final writes through Kafka's JsonConverter, with
 * schemas.enable on or off.  The reference for every rule below is Debezium's source at
 * tag v3.1.3.Final (file names are cited where a rule comes from) and Kafka's
 * JsonConverter.asJsonSchema / convertToJson.
 *
 * Invariants:
 *  - Output is compact JSON whose object keys are in Debezium's field order, generated
 *    with yajl_gen (no tree, no reordering); the source block and the envelope's tail are
 *    written by hand as the same text (put_source, put_json_str: yajl's escaping exactly;
 *    tests/test_dbz_oracle.c holds it to the encoder as it was, byte for byte).  Strings are
 *    copied as UTF-8; yajl escapes '"', '\\' and control characters like Jackson does.
 *  - No value is rounded on the way except where Debezium rounds too: numbers are taken
 *    from the payload as text (yajl_tree keeps each number's text); numeric goes to the
 *    Decimal bytes from its decimal TEXT (exact big-integer conversion); only
 *    decimal.handling.mode=double and float columns go through a double, formatted as
 *    Java's Double.toString / Float.toString would (Jackson's output).
 *  - The module holds no global state; wp_dbz_tables_t (optional) is the only memory
 *    between calls and belongs to the caller's session.
 */
#include "envelope.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>


/* The Debezium release whose format this module reproduces; it is what source.version holds. */
#define DBZ_VERSION "3.1.3.Final"
#define DBZ_PLACEHOLDER "__debezium_unavailable_value"
#define SNAPSHOT_ALLOWED "true,first,first_in_data_collection,last_in_data_collection,last,false,incremental"
/* Kafka's topic name limit, as AbstractTopicNamingStrategy.MAX_NAME_LENGTH. */
#define TOPIC_MAX 249
#define TABLE_BUCKETS 1024
#define LIST_SLOTS 256

/* Connect (logical) types a column maps to: PostgresValueConverter.schemaBuilder. */
typedef enum kind {
    K_BOOL,
    K_INT16,
    K_INT32,
    K_INT64,
    K_FLOAT32,
    K_FLOAT64,
    K_DECIMAL,    /* numeric(p,s) / money: decimal.handling.mode decides */
    K_VARDECIMAL, /* numeric without typmod: VariableScaleDecimal in precise mode */
    K_DATE,
    K_TIME_MS,
    K_TIME_US,
    K_TS_MS,
    K_TS_US,
    K_TSTZ,
    K_TIMETZ,
    K_INTERVAL,
    K_JSON,
    K_UUID,
    K_XML,
    K_BYTES,
    K_STRING,
    K_SKIP, /* a type Debezium has no schema for (interval[], money[], xml[], ...): the column is left out */
} kind_t;

typedef struct ctype {
    kind_t kind;
    int precision; /* numeric(p,s): p; money: -1 (no precision parameter) */
    int scale;     /* numeric(p,s): s (negative allowed); money: 2; timestamptz: fraction digits (6 when none given) */
    bool money;
    bool array;
} ctype_t;

typedef struct col {
    const char *name; /* borrowed from the parsed column list */
    const char *type;
    ctype_t t;
    bool key; /* a key column: not optional in the Value schema (a primary key is NOT NULL) */
} col_t;

typedef struct collist {
    yajl_val tree;
    col_t *cols;
    size_t n;
    bool borrowed; /* held by the list cache (wp_dbz_tables_t): not freed by collist_free */
    struct list_slot *slot; /* its cache slot when borrowed (for the cached schema texts), else NULL */
} collist_t;

/* One remembered table: its whole column list (from an insert or snapshot row) as JSON text. */
typedef struct table_mem {
    struct table_mem *next;
    char *id; /* source \x1f schema \x1f table */
    char *columns;
} table_mem_t;

/* A generated schema text and the name it was generated under. */
typedef struct schema_text {
    char *name;
    char *text;
    size_t len;
} schema_text_t;

/* A parsed column list, keyed by its JSON text, the key list's text and the decimal mode,
   with the Key / Envelope schema texts last generated from it (schemas.enable). */
typedef struct list_slot {
    schema_text_t key_schema, value_schema;
    char *cols_text;
    char *key_text; /* NULL: no key list */
    uint64_t hash;
    int mode;
    uint64_t pinned; /* the encode call that uses it: not evicted during that call */
    collist_t list;
} list_slot_t;

struct wp_dbz_tables {
    table_mem_t *buckets[TABLE_BUCKETS];
    size_t count;
    /* parsing a column list is most of an event's cost: the same shapes come again and again */
    list_slot_t lists[LIST_SLOTS];
    uint64_t calls;
    yajl_gen gen; /* the generator of every call (allocating one per event was a tenth of its cost); NULL: none yet */
    list_slot_t *recent[4]; /* slots found last (a strcmp is cheaper than text_hash); NULL: none */
    unsigned next_recent;
};

/* What one encode call works with. */
typedef struct ctx {
    const wp_dbz_options_t *opt;
    const wp_sink_event_t *ev;
    int64_t now_ns;
    const char *placeholder;
    char *err;
    size_t errlen;
    bool failed;
    uint64_t call; /* this call's number in the session's table memory (0 without one) */
    /* column lists this call already found in the cache, by pointer (the event's texts do not
       change during a call, and a slot this call uses is not evicted during it) */
    struct {
        const char *json, *key_json;
        struct list_slot *slot;
    } memo[4];
    int nmemo;
} ctx_t;

static void set_err(ctx_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(ctx_t *c, const char *fmt, ...)
{
    if (c->failed)
        return;
    c->failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, c->errlen, fmt, ap);
    va_end(ap);
}

/* ---------------------------------------------------------------- text helpers */

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

static const char b64tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding (java.util.Base64.getEncoder, what JsonConverter writes for bytes). */
static char *base64(const unsigned char *p, size_t n)
{
    char *out = malloc(4 * ((n + 2) / 3) + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)p[i] << 16;
        if (i + 1 < n)
            v |= (unsigned)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        out[o++] = b64tab[(v >> 18) & 63];
        out[o++] = b64tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? b64tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? b64tab[v & 63] : '=';
    }
    out[o] = '\0';
    return out;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

static void gen_str(yajl_gen g, const char *s)
{
    yajl_gen_string(g, (const unsigned char *)s, strlen(s));
}

static void gen_key(yajl_gen g, const char *s)
{
    gen_str(g, s);
}

/* Decimal text of u into b (at least 21 bytes), two digits per division; returns its length. */
static size_t u64_text(char *b, uint64_t u)
{
    static const char pairs[] = "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
                                "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
                                "8081828384858687888990919293949596979899";
    char tmp[24];
    size_t n = sizeof tmp, len;
    while (u >= 100) {
        unsigned r = (unsigned)(u % 100);
        u /= 100;
        tmp[--n] = pairs[2 * r + 1];
        tmp[--n] = pairs[2 * r];
    }
    if (u >= 10) {
        tmp[--n] = pairs[2 * u + 1];
        tmp[--n] = pairs[2 * u];
    } else
        tmp[--n] = (char)('0' + u);
    len = sizeof tmp - n;
    memcpy(b, tmp + n, len);
    b[len] = '\0';
    return len;
}

/* Decimal text of v into b (at least 21 bytes), returning its length: snprintf was a fifth of the cost. */
static size_t i64_text(char *b, int64_t v)
{
    if (v < 0) {
        b[0] = '-';
        return 1 + u64_text(b + 1, (uint64_t)0 - (uint64_t)v);
    }
    return u64_text(b, (uint64_t)v);
}

static void gen_i64(yajl_gen g, int64_t v)
{
    char b[24];
    yajl_gen_number(g, b, i64_text(b, v));
}

/* ---------------------------------------------------------------- Java number formatting */

/*
 * Writes d as Java's Double.toString (is_float: Float.toString) does, which is what Jackson
 * prints for a Connect float64/float32: the shortest digits that read back to the same
 * value; plain notation for 1e-3 <= |d| < 1e7 with at least one fraction digit ("1.0"),
 * else d.dddE[-]n ("1.0E10", "1.234E-5").  NaN and infinities are Jackson's quoted
 * "NaN", "Infinity", "-Infinity" (QUOTE_NON_NUMERIC_NUMBERS is on by default).
 */
static void gen_java_double(yajl_gen g, double d, bool is_float)
{
    char digits[40], out[64];
    int exp10 = 0, nd = 0;

    if (isnan(d)) {
        gen_str(g, "NaN");
        return;
    }
    if (isinf(d)) {
        gen_str(g, d > 0 ? "Infinity" : "-Infinity");
        return;
    }
    if (d == 0) {
        yajl_gen_number(g, signbit(d) ? "-0.0" : "0.0", signbit(d) ? 4 : 3);
        return;
    }
    for (int p = 1; p <= 17; p++) {
        char e[48];
        snprintf(e, sizeof e, "%.*e", p - 1, d);
        bool same = is_float ? (strtof(e, NULL) == (float)d) : (strtod(e, NULL) == d);
        if (same || p == 17) {
            /* e: [-]D[.DDD]e[+-]XX */
            const char *q = e;
            if (*q == '-')
                q++;
            nd = 0;
            for (; *q && *q != 'e'; q++)
                if (isdigit((unsigned char)*q))
                    digits[nd++] = *q;
            digits[nd] = '\0';
            exp10 = atoi(q + 1);
            break;
        }
    }
    while (nd > 1 && digits[nd - 1] == '0')
        digits[--nd] = '\0';
    size_t o = 0;
    if (d < 0)
        out[o++] = '-';
    double a = fabs(d);
    if (a >= 1e-3 && a < 1e7) {
        if (exp10 >= 0) {
            for (int i = 0; i <= exp10; i++)
                out[o++] = i < nd ? digits[i] : '0';
            out[o++] = '.';
            if (nd > exp10 + 1)
                for (int i = exp10 + 1; i < nd; i++)
                    out[o++] = digits[i];
            else
                out[o++] = '0';
        } else {
            out[o++] = '0';
            out[o++] = '.';
            for (int i = 0; i < -exp10 - 1; i++)
                out[o++] = '0';
            for (int i = 0; i < nd; i++)
                out[o++] = digits[i];
        }
        out[o] = '\0';
    } else {
        out[o++] = digits[0];
        out[o++] = '.';
        if (nd > 1)
            for (int i = 1; i < nd; i++)
                out[o++] = digits[i];
        else
            out[o++] = '0';
        snprintf(out + o, sizeof out - o, "E%d", exp10);
    }
    yajl_gen_number(g, out, strlen(out));
}

/* ---------------------------------------------------------------- types */

/* Reads "(a[,b])" at p; returns the count of numbers read (0 when p is not '('). */
static int read_mods(const char *p, int *a, int *b)
{
    if (!p || *p != '(')
        return 0;
    char *end;
    long x = strtol(p + 1, &end, 10);
    if (end == p + 1)
        return 0;
    *a = (int)x;
    if (*end == ',') {
        long y = strtol(end + 1, &end, 10);
        *b = (int)y;
        return 2;
    }
    return 1;
}

static bool starts(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/*
 * Maps a format_type name (what walpipe's shapes hold: "integer", "numeric(10,2)",
 * "timestamp(3) with time zone", "text[]", ...) to its Connect type, as
 * PostgresValueConverter.schemaBuilder (v3.1.3.Final) maps the type's OID with
 * time.precision.mode=adaptive, interval.handling.mode=numeric, binary.handling.mode=bytes,
 * hstore as its text (see README for what differs).
 */
static ctype_t classify(const char *type, wp_dbz_decimal_t mode)
{
    ctype_t t = {K_STRING, 0, 0, false, false};
    char base[128];
    size_t len = strlen(type);
    if (len >= sizeof base)
        return t;
    memcpy(base, type, len + 1);
    if (len > 2 && strcmp(base + len - 2, "[]") == 0) {
        t.array = true;
        base[len - 2] = '\0';
    }
    const char *paren = strchr(base, '(');
    int a = -1, b = 0;
    int nm = read_mods(paren, &a, &b);

    if (strcmp(base, "boolean") == 0 || strcmp(base, "bit") == 0 || strcmp(base, "bit(1)") == 0)
        t.kind = K_BOOL; /* bit(1): Debezium's boolean (Bits for longer, left as text here) */
    else if (strcmp(base, "smallint") == 0)
        t.kind = K_INT16;
    else if (strcmp(base, "integer") == 0)
        t.kind = K_INT32;
    else if (strcmp(base, "bigint") == 0 || strcmp(base, "oid") == 0)
        t.kind = K_INT64; /* PgOid.OID -> int64 */
    else if (strcmp(base, "real") == 0)
        t.kind = K_FLOAT32;
    else if (strcmp(base, "double precision") == 0)
        t.kind = K_FLOAT64;
    else if (strcmp(base, "numeric") == 0 || starts(base, "numeric(")) {
        if (mode == WP_DBZ_DECIMAL_STRING)
            t.kind = K_STRING;
        else if (mode == WP_DBZ_DECIMAL_DOUBLE)
            t.kind = K_FLOAT64;
        else if (nm == 0 || (a == 0 && b == 0))
            t.kind = K_VARDECIMAL; /* isVariableScaleDecimal: no typmod */
        else {
            t.kind = K_DECIMAL;
            t.precision = a;
            t.scale = nm == 2 ? b : 0;
        }
    } else if (strcmp(base, "money") == 0) {
        /* moneySchema: Decimal(scale money.fraction.digits = 2), no precision parameter */
        t.money = true;
        t.kind = mode == WP_DBZ_DECIMAL_STRING ? K_STRING : mode == WP_DBZ_DECIMAL_DOUBLE ? K_FLOAT64 : K_DECIMAL;
        t.precision = -1;
        t.scale = 2;
    } else if (strcmp(base, "date") == 0)
        t.kind = K_DATE;
    else if (starts(base, "time") && strstr(base, "with time zone") && !starts(base, "timestamp"))
        t.kind = K_TIMETZ;
    else if (starts(base, "timestamp") && strstr(base, "with time zone")) {
        t.kind = K_TSTZ;
        t.scale = nm ? a : 6; /* ZonedTimestamp fraction width: the column's scale (6 when none given) */
    } else if (starts(base, "timestamp")) {
        int p = nm ? a : 6;
        t.kind = p <= 3 ? K_TS_MS : K_TS_US;
    } else if (starts(base, "time")) {
        int p = nm ? a : 6;
        t.kind = p <= 3 ? K_TIME_MS : K_TIME_US;
    } else if (starts(base, "interval"))
        t.kind = K_INTERVAL;
    else if (strcmp(base, "json") == 0 || strcmp(base, "jsonb") == 0)
        t.kind = K_JSON;
    else if (strcmp(base, "uuid") == 0)
        t.kind = K_UUID;
    else if (strcmp(base, "xml") == 0)
        t.kind = K_XML;
    else if (strcmp(base, "bytea") == 0)
        t.kind = K_BYTES;

    if (t.array) {
        /* PostgresValueConverter has no array schema for these: Debezium leaves the column out. */
        if (t.kind == K_INTERVAL || t.money || t.kind == K_XML || strcmp(base, "name") == 0 ||
            starts(base, "bit varying") || strcmp(base, "point") == 0)
            t.kind = K_SKIP;
    }
    return t;
}

/* ---------------------------------------------------------------- column lists */

static void collist_free(collist_t *l)
{
    if (l->borrowed) {
        memset(l, 0, sizeof *l);
        return;
    }
    if (l->tree)
        yajl_tree_free(l->tree);
    free(l->cols);
    memset(l, 0, sizeof *l);
}

/* Parses [{"name":..,"type":..},..]; json NULL gives an empty list.  Returns 0 or -1 (err set). */
static int collist_parse(ctx_t *c, const char *json, const char *what, collist_t *l)
{
    char perr[128];
    memset(l, 0, sizeof *l);
    if (!json)
        return 0;
    l->tree = yajl_tree_parse(json, perr, sizeof perr);
    if (!l->tree || !YAJL_IS_ARRAY(l->tree)) {
        set_err(c, "%s is not a JSON array of columns", what);
        return -1;
    }
    size_t n = l->tree->u.array.len;
    l->cols = calloc(n ? n : 1, sizeof(col_t));
    if (!l->cols) {
        set_err(c, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        yajl_val e = l->tree->u.array.values[i];
        const char *pn[] = {"name", NULL}, *pt[] = {"type", NULL};
        yajl_val name = yajl_tree_get(e, pn, yajl_t_string);
        yajl_val type = yajl_tree_get(e, pt, yajl_t_string);
        if (!name || !type) {
            set_err(c, "%s entry %zu has no \"name\" or \"type\"", what, i + 1);
            return -1;
        }
        l->cols[i].name = YAJL_GET_STRING(name);
        l->cols[i].type = YAJL_GET_STRING(type);
        l->cols[i].t = classify(l->cols[i].type, c->opt->decimal_mode);
    }
    l->n = n;
    return 0;
}

static const col_t *collist_find(const collist_t *l, const char *name)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->cols[i].name, name) == 0)
            return &l->cols[i];
    return NULL;
}

static void schema_text_free(schema_text_t *st)
{
    free(st->name);
    free(st->text);
    memset(st, 0, sizeof *st);
}

/* A cheap hash of a column list's text: its length and up to 64 bytes spread over it (strcmp decides). */
static uint64_t text_hash(const char *s, uint64_t h)
{
    size_t n = strlen(s), step = n / 64 + 1;
    h = (h ^ n) * UINT64_C(1099511628211);
    for (size_t i = 0; i < n; i += step)
        h = (h ^ (unsigned char)s[i]) * UINT64_C(1099511628211);
    return h;
}

static bool same_text(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a && b && strcmp(a, b) == 0);
}

static void collist_memo(ctx_t *c, const char *json, const char *key_json, list_slot_t *slot)
{
    struct wp_dbz_tables *t = c->opt->tables;
    bool recent = false;
    for (int i = 0; i < 4; i++)
        recent = recent || t->recent[i] == slot;
    if (!recent)
        t->recent[t->next_recent++ % 4] = slot;
    if (c->nmemo < (int)(sizeof c->memo / sizeof c->memo[0])) {
        c->memo[c->nmemo].json = json;
        c->memo[c->nmemo].key_json = key_json;
        c->memo[c->nmemo++].slot = slot;
    }
}

/*
 * The column list json with each column's key flag set from the key list key_json (NULL: no
 * key; the same text: every column is a key column).  From the session's list cache when there
 * is one (then *out is borrowed until the end of this encode call), else parsed into *out.
 */
static int collist_load(ctx_t *c, const char *json, const char *key_json, const char *what, collist_t *out)
{
    struct wp_dbz_tables *t = c->opt->tables;
    collist_t keys = {0};
    list_slot_t *slot = NULL;
    int rc = -1;

    memset(out, 0, sizeof *out);
    if (!json)
        return 0;
    for (int i = 0; i < c->nmemo; i++)
        if (c->memo[i].json == json && c->memo[i].key_json == key_json) {
            *out = c->memo[i].slot->list;
            out->borrowed = true;
            out->slot = c->memo[i].slot;
            return 0;
        }
    for (int i = 0; t && i < 4; i++) {
        slot = t->recent[i];
        if (slot && slot->cols_text && slot->mode == (int)c->opt->decimal_mode && strcmp(slot->cols_text, json) == 0 &&
            same_text(slot->key_text, key_json)) {
            /* the same hit as through the hash below (one slot per text), without hashing */
            slot->pinned = c->call;
            *out = slot->list;
            out->borrowed = true;
            out->slot = slot;
            collist_memo(c, json, key_json, slot);
            return 0;
        }
    }
    slot = NULL;
    uint64_t h = text_hash(key_json ? key_json : "", text_hash(json, UINT64_C(14695981039346656037))) ^
                 (uint64_t)c->opt->decimal_mode;
    if (t) {
        slot = &t->lists[h % LIST_SLOTS];
        if (slot->cols_text && slot->hash == h && slot->mode == (int)c->opt->decimal_mode &&
            strcmp(slot->cols_text, json) == 0 && same_text(slot->key_text, key_json)) {
            slot->pinned = c->call;
            *out = slot->list;
            out->borrowed = true;
            out->slot = slot;
            collist_memo(c, json, key_json, slot);
            return 0;
        }
        if (slot->cols_text && slot->pinned == c->call)
            slot = NULL; /* in use by this call: parse without caching */
    }
    if (collist_parse(c, json, what, out) < 0)
        goto out;
    if (key_json && strcmp(key_json, json) == 0) {
        for (size_t i = 0; i < out->n; i++)
            out->cols[i].key = true;
    } else if (key_json) {
        if (collist_load(c, key_json, key_json, "key_columns", &keys) < 0)
            goto out;
        for (size_t i = 0; i < out->n; i++)
            out->cols[i].key = collist_find(&keys, out->cols[i].name) != NULL;
    }
    if (slot) {
        char *ct = strdup(json), *kt = key_json ? strdup(key_json) : NULL;
        if (ct && (kt || !key_json)) {
            /* evict what the slot held (not pinned by this call, checked above) */
            free(slot->cols_text);
            free(slot->key_text);
            slot->list.borrowed = false;
            collist_free(&slot->list);
            schema_text_free(&slot->key_schema);
            schema_text_free(&slot->value_schema);
            slot->cols_text = ct;
            slot->key_text = kt;
            slot->hash = h;
            slot->mode = (int)c->opt->decimal_mode;
            slot->pinned = c->call;
            slot->list = *out;
            out->borrowed = true;
            out->slot = slot;
            collist_memo(c, json, key_json, slot);
        } else {
            free(ct);
            free(kt);
        }
    }
    rc = 0;
out:
    collist_free(&keys);
    if (rc < 0)
        collist_free(out);
    return rc;
}

/* ---------------------------------------------------------------- table memory */

struct wp_dbz_tables *wp_dbz_tables_new(void)
{
    return calloc(1, sizeof(struct wp_dbz_tables));
}

void wp_dbz_tables_free(struct wp_dbz_tables *tables)
{
    if (!tables)
        return;
    if (tables->gen)
        yajl_gen_free(tables->gen);
    for (size_t b = 0; b < TABLE_BUCKETS; b++) {
        table_mem_t *t = tables->buckets[b];
        while (t) {
            table_mem_t *next = t->next;
            free(t->id);
            free(t->columns);
            free(t);
            t = next;
        }
    }
    for (size_t i = 0; i < LIST_SLOTS; i++) {
        free(tables->lists[i].cols_text);
        free(tables->lists[i].key_text);
        tables->lists[i].list.borrowed = false;
        collist_free(&tables->lists[i].list);
        schema_text_free(&tables->lists[i].key_schema);
        schema_text_free(&tables->lists[i].value_schema);
    }
    free(tables);
}

/* source \x1f schema \x1f table: into buf (cap bytes) when it fits, else malloc'd (free it when
   it is not buf); NULL on out of memory.  No snprintf: this runs for every event. */
static char *table_id(const wp_sink_event_t *ev, char *buf, size_t cap)
{
    size_t ls = strlen(ev->source), lc = strlen(ev->schema), lt = strlen(ev->table), n = ls + lc + lt + 3;
    char *id = n <= cap ? buf : malloc(n);
    if (id) {
        memcpy(id, ev->source, ls);
        id[ls] = '\x1f';
        memcpy(id + ls + 1, ev->schema, lc);
        id[ls + 1 + lc] = '\x1f';
        memcpy(id + ls + 2 + lc, ev->table, lt);
        id[n - 1] = '\0';
    }
    return id;
}

static size_t table_hash(const char *id)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (const unsigned char *p = (const unsigned char *)id; *p; p++)
        h = (h ^ *p) * UINT64_C(1099511628211);
    return (size_t)(h % TABLE_BUCKETS);
}

static const char *tables_get(struct wp_dbz_tables *tables, const wp_sink_event_t *ev)
{
    if (!tables)
        return NULL;
    char buf[256];
    char *id = table_id(ev, buf, sizeof buf);
    const char *found = NULL;
    if (!id)
        return NULL;
    for (table_mem_t *t = tables->buckets[table_hash(id)]; t; t = t->next)
        if (strcmp(t->id, id) == 0) {
            found = t->columns;
            break;
        }
    if (id != buf)
        free(id);
    return found;
}

/* Remembers columns as the table's whole column list (best effort: out of memory forgets). */
static void tables_put(struct wp_dbz_tables *tables, const wp_sink_event_t *ev, const char *columns)
{
    if (!tables || !columns)
        return;
    char buf[256];
    char *id = table_id(ev, buf, sizeof buf);
    char *copy = NULL;
    if (!id)
        return;
    size_t h = table_hash(id);
    for (table_mem_t *t = tables->buckets[h]; t; t = t->next)
        if (strcmp(t->id, id) == 0 && strcmp(t->columns, columns) == 0)
            goto out; /* known as it is: nothing to copy */
    copy = strdup(columns);
    if (!copy)
        goto out;
    for (table_mem_t *t = tables->buckets[h]; t; t = t->next)
        if (strcmp(t->id, id) == 0) {
            free(t->columns);
            t->columns = copy;
            copy = NULL;
            goto out;
        }
    table_mem_t *t = malloc(sizeof *t);
    char *kept = id == buf ? strdup(id) : id;
    if (!t || !kept) {
        free(t);
        if (kept != id)
            free(kept);
        goto out;
    }
    t->id = kept;
    t->columns = copy;
    t->next = tables->buckets[h];
    tables->buckets[h] = t;
    tables->count++;
    copy = NULL;
    if (id != buf)
        id = buf; /* kept: the table memory owns it now */
out:
    if (id != buf)
        free(id);
    free(copy);
}

/* ---------------------------------------------------------------- value conversion */

/* The text form of a payload value: a number's text as printed, a string, "t"/"f"; NULL for null. */
static const char *val_text(yajl_val v)
{
    if (!v || YAJL_IS_NULL(v))
        return NULL;
    if (YAJL_IS_STRING(v))
        return YAJL_GET_STRING(v);
    if (YAJL_IS_NUMBER(v))
        return v->u.number.r;
    if (YAJL_IS_TRUE(v))
        return "t";
    if (YAJL_IS_FALSE(v))
        return "f";
    return NULL;
}

/*
 * Unscaled value of the decimal text s at scale, as BigInteger.toByteArray does it (big-endian
 * two's complement, fewest bytes that keep the sign), into out (malloc'd) and *n.  vscale: a
 * VariableScaleDecimal (stripTrailingZeros, scale >= 0; *scale_out gets the scale).
 * Returns 0, 1 when s is NaN/Infinity (no value), -1 when s is no decimal.
 */
static int decimal_bytes(const char *s, int scale, bool vscale, unsigned char **out, size_t *n, int *scale_out)
{
    bool neg = false;
    const char *p = s;
    if (*p == '-' || *p == '+')
        neg = *p++ == '-';
    if (strcmp(p, "NaN") == 0 || strcmp(p, "Infinity") == 0 || strcmp(s, "NaN") == 0)
        return 1;
    const char *ip = p;
    size_t ni = 0, nf = 0;
    while (isdigit((unsigned char)ip[ni]))
        ni++;
    const char *fp = ip + ni;
    if (*fp == '.') {
        fp++;
        while (isdigit((unsigned char)fp[nf]))
            nf++;
        if (fp[nf] != '\0')
            return -1;
    } else if (*fp != '\0')
        return -1;
    if (ni + nf == 0)
        return -1;
    if (vscale) {
        while (nf > 0 && fp[nf - 1] == '0')
            nf--;
        scale = (int)nf;
    }
    if (scale_out)
        *scale_out = scale;
    if (scale < 0) {
        /* numeric(p,-s) (PostgreSQL 15): the last s integer digits are zeros the unscaled value drops */
        size_t drop = (size_t)-scale;
        ni = ni > drop ? ni - drop : 0;
        if (ni == 0) {
            ip = "0";
            ni = 1;
        }
    }
    /* digits = int part + fraction cut/padded to scale (PostgreSQL prints exactly the column's scale) */
    size_t nd = ni + (size_t)(scale > 0 ? scale : 0);
    char *dig = malloc(nd + 1);
    if (!dig)
        return -1;
    memcpy(dig, ip, ni);
    for (size_t i = 0; i < (size_t)(scale > 0 ? scale : 0); i++)
        dig[ni + i] = i < nf ? fp[i] : '0';
    /* magnitude, big-endian base 256: mag = mag * 10 + digit */
    size_t cap = nd / 2 + 2, len = 1;
    unsigned char *mag = calloc(cap, 1);
    if (!mag) {
        free(dig);
        return -1;
    }
    for (size_t i = 0; i < nd; i++) {
        unsigned carry = (unsigned)(dig[i] - '0');
        for (size_t k = 0; k < len; k++) {
            unsigned v = mag[cap - 1 - k] * 10u + carry;
            mag[cap - 1 - k] = (unsigned char)(v & 0xff);
            carry = v >> 8;
        }
        if (carry)
            mag[cap - 1 - len++] = (unsigned char)carry;
    }
    free(dig);
    unsigned char *m = mag + cap - len;
    while (len > 1 && m[0] == 0) {
        m++;
        len--;
    }
    bool zero = len == 1 && m[0] == 0;
    /* two's complement with a sign bit: one more byte when the top bit is taken */
    unsigned char *r = malloc(len + 1);
    if (!r) {
        free(mag);
        return -1;
    }
    size_t rl;
    if (!neg || zero) {
        if (m[0] & 0x80) {
            r[0] = 0;
            memcpy(r + 1, m, len);
            rl = len + 1;
        } else {
            memcpy(r, m, len);
            rl = len;
        }
    } else {
        /* -m: invert and add one over len+1 bytes (leading 0x00 of m becomes 0xff) */
        r[0] = 0xff;
        for (size_t i = 0; i < len; i++)
            r[i + 1] = (unsigned char)~m[i];
        for (size_t i = len + 1; i-- > 0;) {
            if (++r[i] != 0)
                break;
        }
        /* drop redundant leading 0xff bytes (keep the sign bit) */
        size_t off = 0;
        while (off + 1 < len + 1 && r[off] == 0xff && (r[off + 1] & 0x80))
            off++;
        memmove(r, r + off, len + 1 - off);
        rl = len + 1 - off;
    }
    free(mag);
    *out = r;
    *n = rl;
    return 0;
}

/* Money text ("$1,234.56", "-$0.50") -> plain decimal text in buf. */
static const char *money_plain(const char *s, char *buf, size_t cap)
{
    size_t o = 0;
    for (const char *p = s; *p && o + 1 < cap; p++)
        if (isdigit((unsigned char)*p) || *p == '.' || *p == '-')
            buf[o++] = *p;
    buf[o] = '\0';
    return buf;
}

/* Days from civil (proleptic Gregorian), Howard Hinnant's algorithm. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d)
{
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const unsigned yoe = (unsigned)(y - era * 400);
    const unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d)
{
    z += 719468;
    const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    const unsigned doe = (unsigned)(z - era * 146097);
    const unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    const unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    const unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

/* "YYYY-MM-DD" at *p (DateStyle ISO; " BC" handled by the caller); advances *p. */
static bool parse_date(const char **p, int64_t *days)
{
    char *end;
    long y = strtol(*p, &end, 10);
    if (end == *p || *end != '-')
        return false;
    long m = strtol(end + 1, &end, 10);
    if (*end != '-')
        return false;
    long d = strtol(end + 1, &end, 10);
    /* PostgreSQL's range is 4713 BC to 5874897 AD; the bound keeps the microsecond arithmetic in int64 */
    if (m < 1 || m > 12 || d < 1 || d > 31 || y < 0 || y > 5874897)
        return false;
    if (strncmp(end, " BC", 3) == 0) {
        y = 1 - y;
        end += 3;
    }
    *days = days_from_civil(y, (unsigned)m, (unsigned)d);
    *p = end;
    return true;
}

/* "HH:MM:SS[.ffffff]" at *p -> microseconds of the day; advances *p. */
static bool parse_time(const char **p, int64_t *us)
{
    const char *s = *p;
    if (!(isdigit((unsigned char)s[0]) && isdigit((unsigned char)s[1]) && s[2] == ':' && isdigit((unsigned char)s[3]) &&
          isdigit((unsigned char)s[4]) && s[5] == ':' && isdigit((unsigned char)s[6]) && isdigit((unsigned char)s[7])))
        return false;
    int64_t h = (s[0] - '0') * 10 + (s[1] - '0');
    int64_t mi = (s[3] - '0') * 10 + (s[4] - '0');
    int64_t se = (s[6] - '0') * 10 + (s[7] - '0');
    s += 8;
    int64_t frac = 0;
    int nf = 0;
    if (*s == '.') {
        s++;
        while (isdigit((unsigned char)*s)) {
            if (nf < 6) {
                frac = frac * 10 + (*s - '0');
                nf++;
            }
            s++;
        }
    }
    for (; nf < 6; nf++)
        frac *= 10;
    *us = ((h * 60 + mi) * 60 + se) * 1000000 + frac;
    *p = s;
    return true;
}

/* "+HH[:MM[:SS]]" at *p -> seconds east of UTC; advances *p. */
static bool parse_offset(const char **p, int64_t *secs)
{
    const char *s = *p;
    if (*s != '+' && *s != '-')
        return false;
    int sign = *s == '-' ? -1 : 1;
    s++;
    int64_t parts[3] = {0, 0, 0};
    for (int i = 0; i < 3; i++) {
        if (!isdigit((unsigned char)s[0]) || !isdigit((unsigned char)s[1]))
            return false;
        parts[i] = (s[0] - '0') * 10 + (s[1] - '0');
        s += 2;
        if (*s != ':')
            break;
        s++;
    }
    *secs = sign * (parts[0] * 3600 + parts[1] * 60 + parts[2]);
    *p = s;
    return true;
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q--;
    return q;
}

/* Appends Java's ISO_LOCAL_DATE of days: "YYYY-MM-DD", "+10000-..", "-0001-..". */
static size_t fmt_date(char *out, size_t cap, int64_t days)
{
    int64_t y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    if (y > 9999)
        return (size_t)snprintf(out, cap, "+%" PRId64 "-%02u-%02u", y, m, d);
    if (y < 0)
        return (size_t)snprintf(out, cap, "-%04" PRId64 "-%02u-%02u", -y, m, d);
    return (size_t)snprintf(out, cap, "%04" PRId64 "-%02u-%02u", y, m, d);
}

/* Appends "HH:MM:SS" and the fraction: width > 0 exactly width digits; else Java's ISO (trailing zeros cut). */
static size_t fmt_time(char *out, size_t cap, int64_t us_of_day, int width)
{
    int64_t s = us_of_day / 1000000, f = us_of_day % 1000000;
    size_t o = (size_t)snprintf(out, cap, "%02" PRId64 ":%02" PRId64 ":%02" PRId64, s / 3600, s / 60 % 60, s % 60);
    char fr[8];
    snprintf(fr, sizeof fr, "%06" PRId64, f);
    if (width > 0 && width <= 9) {
        /* appendFraction(NANO_OF_SECOND, w, w): w digits of the nanoseconds */
        char nine[16];
        snprintf(nine, sizeof nine, "%s000", fr);
        o += (size_t)snprintf(out + o, cap - o, ".%.*s", width, nine);
    } else if (f != 0) {
        int n = 6;
        while (n > 0 && fr[n - 1] == '0')
            n--;
        o += (size_t)snprintf(out + o, cap - o, ".%.*s", n, fr);
    }
    return o;
}

/*
 * Interval text (IntervalStyle postgres: "1 year 2 mons 3 days 04:05:06.789", "-1 days +02:00:00")
 * -> MicroDuration, computed exactly as MicroDuration.durationMicros does from pgjdbc's
 * PGInterval fields (doubles, months of 365.25/12 days, truncated to long).
 */
static bool parse_interval(const char *s, int64_t *out)
{
    double years = 0, months = 0, days = 0, hours = 0, minutes = 0, seconds = 0;
    const char *p = s;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        const char *q = p;
        if (*q == '+' || *q == '-')
            q++;
        if (isdigit((unsigned char)q[0]) && isdigit((unsigned char)q[1]) && q[2] == ':') {
            int sign = *p == '-' ? -1 : 1;
            char *end;
            long h = strtol(q, &end, 10);
            long mi = strtol(end + 1, &end, 10);
            double se = 0;
            if (*end == ':')
                se = strtod(end + 1, &end);
            hours = sign * (double)h;
            minutes = sign * (double)mi;
            /* PGInterval.setSeconds splits into whole seconds and Math.round'ed micros;
               getSeconds() adds them back: whole + micros / 1e6 */
            double signed_se = sign * se;
            double whole = trunc(signed_se);
            double micros = floor((signed_se - whole) * 1e6 + 0.5);
            seconds = whole + micros / 1e6;
            p = end;
            continue;
        }
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p)
            return false;
        while (*end == ' ')
            end++;
        if (starts(end, "year"))
            years = (double)v;
        else if (starts(end, "mon"))
            months = (double)v;
        else if (starts(end, "day"))
            days = (double)v;
        else
            return false;
        while (*end && *end != ' ')
            end++;
        p = end;
    }
    double days_per_month = 365.25 / 12.0;
    double number_of_days = ((years * 12) + months) * days_per_month + days;
    double number_of_seconds = (((number_of_days * 24 + hours) * 60) + minutes) * 60 + seconds;
    double us = number_of_seconds * 1e6;
    if (!(us > -9.2e18 && us < 9.2e18))
        return false; /* beyond int64 (Java's (long) would saturate; PostgreSQL's intervals stay within) */
    *out = (int64_t)us;
    return true;
}

static void gen_placeholder(ctx_t *c, yajl_gen g, const ctype_t *t);

/* Writes one scalar (element) value of type t given its PostgreSQL text s (non-NULL). */
static void gen_scalar(ctx_t *c, yajl_gen g, const ctype_t *t, const char *s, const char *col)
{
    switch (t->kind) {
    case K_BOOL:
        yajl_gen_bool(g, strcmp(s, "t") == 0 || strcmp(s, "true") == 0 || strcmp(s, "1") == 0);
        return;
    case K_INT16:
    case K_INT32:
    case K_INT64: {
        const char *p = s;
        if (*p == '-')
            p++;
        if (!*p || strspn(p, "0123456789") != strlen(p)) {
            set_err(c, "column \"%s\": \"%.40s\" is not an integer", col, s);
            yajl_gen_null(g);
            return;
        }
        yajl_gen_number(g, s, strlen(s));
        return;
    }
    case K_FLOAT32:
    case K_FLOAT64: {
        char buf[128];
        const char *txt = t->money ? money_plain(s, buf, sizeof buf) : s;
        if (strcmp(s, "NaN") == 0)
            gen_str(g, "NaN");
        else if (strcmp(s, "Infinity") == 0)
            gen_str(g, "Infinity");
        else if (strcmp(s, "-Infinity") == 0)
            gen_str(g, "-Infinity");
        else {
            char *end;
            errno = 0;
            double d = strtod(txt, &end);
            if (end == txt || *end) {
                set_err(c, "column \"%s\": \"%.40s\" is not a number", col, s);
                yajl_gen_null(g);
                return;
            }
            gen_java_double(g, d, t->kind == K_FLOAT32);
        }
        return;
    }
    case K_DECIMAL:
    case K_VARDECIMAL: {
        char buf[256];
        const char *txt = s;
        if (t->money) {
            if (strlen(s) >= sizeof buf) {
                set_err(c, "column \"%s\": money value too long", col);
                yajl_gen_null(g);
                return;
            }
            txt = money_plain(s, buf, sizeof buf);
        }
        unsigned char *bytes = NULL;
        size_t n = 0;
        int scale = t->scale;
        int rc = decimal_bytes(txt, t->scale, t->kind == K_VARDECIMAL, &bytes, &n, &scale);
        if (rc == 1) {
            /* NaN/Infinity: no Decimal value (Debezium stops with an error in precise mode) */
            yajl_gen_null(g);
            return;
        }
        if (rc < 0) {
            set_err(c, "column \"%s\": \"%.40s\" is not a decimal number", col, s);
            yajl_gen_null(g);
            return;
        }
        char *b64 = base64(bytes, n);
        free(bytes);
        if (!b64) {
            set_err(c, "out of memory");
            yajl_gen_null(g);
            return;
        }
        if (t->kind == K_VARDECIMAL) {
            yajl_gen_map_open(g);
            gen_key(g, "scale");
            gen_i64(g, scale);
            gen_key(g, "value");
            gen_str(g, b64);
            yajl_gen_map_close(g);
        } else
            gen_str(g, b64);
        free(b64);
        return;
    }
    case K_DATE: {
        const char *p = s;
        int64_t days;
        if (strcmp(s, "infinity") == 0 || strcmp(s, "-infinity") == 0) {
            /* DateTimeFormat: PostgresValueConverter.POSITIVE_INFINITY_LOCAL_DATE (-5877611-06-21) and
               NEGATIVE_INFINITY_LOCAL_DATE (-5877611-06-22), as epoch days */
            gen_i64(g, days_from_civil(-5877611, 6, s[0] == '-' ? 22 : 21));
            return;
        }
        if (!parse_date(&p, &days) || *p) {
            set_err(c, "column \"%s\": \"%.40s\" is not a date", col, s);
            yajl_gen_null(g);
            return;
        }
        gen_i64(g, days);
        return;
    }
    case K_TIME_MS:
    case K_TIME_US: {
        const char *p = s;
        int64_t us;
        if (!parse_time(&p, &us)) {
            set_err(c, "column \"%s\": \"%.40s\" is not a time", col, s);
            yajl_gen_null(g);
            return;
        }
        gen_i64(g, t->kind == K_TIME_MS ? us / 1000 : us);
        return;
    }
    case K_TS_MS:
    case K_TS_US:
    case K_TSTZ: {
        const char *p = s;
        int64_t days, us, off = 0;
        if (strcmp(s, "infinity") == 0 || strcmp(s, "-infinity") == 0) {
            /* convertTimestampWithZone: "infinity" / "-infinity"; convertTimestampToLocalDateTime: pgjdbc's
               PGStatement.DATE_POSITIVE_INFINITY / DATE_NEGATIVE_INFINITY taken as microseconds */
            int64_t inf_us = s[0] == '-' ? INT64_C(-9223372036832400000) : INT64_C(9223372036825200000);
            if (t->kind == K_TSTZ)
                gen_str(g, s);
            else
                gen_i64(g, t->kind == K_TS_US ? inf_us : floor_div(inf_us, 1000));
            return;
        }
        bool bc = strstr(s, " BC") != NULL;
        if (!parse_date(&p, &days) || *p != ' ' || (p++, !parse_time(&p, &us))) {
            set_err(c, "column \"%s\": \"%.40s\" is not a timestamp", col, s);
            yajl_gen_null(g);
            return;
        }
        if (t->kind == K_TSTZ && !parse_offset(&p, &off)) {
            set_err(c, "column \"%s\": \"%.40s\" has no UTC offset", col, s);
            yajl_gen_null(g);
            return;
        }
        if (bc) {
            /* "YYYY-MM-DD HH:MM:SS[+TZ] BC": the era comes last, after the time */
            int64_t y;
            unsigned m, d;
            civil_from_days(days, &y, &m, &d);
            days = days_from_civil(1 - y, m, d);
        }
        int64_t epoch_us;
        if (__builtin_mul_overflow(days, 86400 * INT64_C(1000000), &epoch_us) ||
            __builtin_add_overflow(epoch_us, us - off * INT64_C(1000000), &epoch_us)) {
            /* after 294247 AD microseconds since 1970 leave int64 (Debezium's conversion fails too) */
            set_err(c, "column \"%s\": \"%.40s\" is beyond int64 microseconds since 1970", col, s);
            yajl_gen_null(g);
            return;
        }
        if (t->kind == K_TS_US)
            gen_i64(g, epoch_us);
        else if (t->kind == K_TS_MS)
            gen_i64(g, floor_div(epoch_us, 1000));
        else {
            char out[80];
            int64_t d = floor_div(epoch_us, 86400 * INT64_C(1000000));
            int64_t tod = epoch_us - d * 86400 * INT64_C(1000000);
            size_t o = fmt_date(out, sizeof out, d);
            out[o++] = 'T';
            o += fmt_time(out + o, sizeof out - o, tod, t->scale);
            snprintf(out + o, sizeof out - o, "Z");
            gen_str(g, out);
        }
        return;
    }
    case K_TIMETZ: {
        const char *p = s;
        int64_t us, off;
        if (!parse_time(&p, &us) || !parse_offset(&p, &off)) {
            set_err(c, "column \"%s\": \"%.40s\" is not a time with time zone", col, s);
            yajl_gen_null(g);
            return;
        }
        int64_t day = 86400 * INT64_C(1000000);
        int64_t utc = ((us - off * INT64_C(1000000)) % day + day) % day;
        char out[48];
        size_t o = fmt_time(out, sizeof out, utc, 0);
        snprintf(out + o, sizeof out - o, "Z");
        gen_str(g, out);
        return;
    }
    case K_INTERVAL: {
        int64_t us;
        if (!parse_interval(s, &us)) {
            set_err(c, "column \"%s\": \"%.60s\" is not an interval (IntervalStyle postgres)", col, s);
            yajl_gen_null(g);
            return;
        }
        gen_i64(g, us);
        return;
    }
    case K_BYTES: {
        /* walpipe's payload: "\x" + hex (decoder.c); array elements print as "\\x.." unescaped to "\x.." */
        const char *h = s;
        if (h[0] == '\\' && h[1] == 'x')
            h += 2;
        size_t hn = strlen(h);
        if (hn % 2) {
            set_err(c, "column \"%s\": bytea is not hex", col);
            yajl_gen_null(g);
            return;
        }
        unsigned char *bytes = malloc(hn / 2 + 1);
        if (!bytes) {
            set_err(c, "out of memory");
            yajl_gen_null(g);
            return;
        }
        for (size_t i = 0; i < hn / 2; i++) {
            int hi = hexval((unsigned char)h[2 * i]), lo = hexval((unsigned char)h[2 * i + 1]);
            if (hi < 0 || lo < 0) {
                free(bytes);
                set_err(c, "column \"%s\": bytea is not hex", col);
                yajl_gen_null(g);
                return;
            }
            bytes[i] = (unsigned char)(hi << 4 | lo);
        }
        char *b64 = base64(bytes, hn / 2);
        free(bytes);
        if (!b64) {
            set_err(c, "out of memory");
            yajl_gen_null(g);
            return;
        }
        gen_str(g, b64);
        free(b64);
        return;
    }
    case K_SKIP:
        yajl_gen_null(g);
        return;
    default: /* K_STRING, K_JSON, K_UUID, K_XML: the text as it is; money in string mode as toPlainString */
        if (t->money) {
            char buf[256];
            gen_str(g, strlen(s) < sizeof buf ? money_plain(s, buf, sizeof buf) : s);
        } else
            gen_str(g, s);
        return;
    }
}

/*
 * Parses one PostgreSQL array literal ("{1,2,NULL}", "{\"a b\",c}", "[0:1]={..}"), writing each
 * element through gen_scalar as a JSON array (nested braces as nested arrays).  Returns the
 * position after the closing brace, or NULL when s is no array literal.
 */
static const char *gen_array_text(ctx_t *c, yajl_gen g, const ctype_t *elem, const char *s, const char *col)
{
    const char *p = s;
    if (*p == '[') {
        p = strchr(p, '=');
        if (!p)
            return NULL;
        p++;
    }
    if (*p != '{')
        return NULL;
    p++;
    yajl_gen_array_open(g);
    char *buf = malloc(strlen(s) + 1);
    if (!buf)
        return NULL;
    while (*p && *p != '}') {
        if (*p == '{') {
            p = gen_array_text(c, g, elem, p, col);
            if (!p)
                goto bad;
        } else if (*p == '"') {
            size_t o = 0;
            p++;
            while (*p && *p != '"') {
                if (*p == '\\' && p[1])
                    p++;
                buf[o++] = *p++;
            }
            if (*p != '"')
                goto bad;
            p++;
            buf[o] = '\0';
            gen_scalar(c, g, elem, buf, col);
        } else {
            size_t o = 0;
            while (*p && *p != ',' && *p != '}')
                buf[o++] = *p++;
            buf[o] = '\0';
            if (strcmp(buf, "NULL") == 0)
                yajl_gen_null(g);
            else
                gen_scalar(c, g, elem, buf, col);
        }
        if (*p == ',')
            p++;
    }
    if (*p != '}')
        goto bad;
    free(buf);
    yajl_gen_array_close(g);
    return p + 1;
bad:
    free(buf);
    return NULL;
}

/* Writes a column value (v: the payload's JSON value, NULL/null: SQL NULL). */
static void gen_value(ctx_t *c, yajl_gen g, const col_t *col, yajl_val v)
{
    const char *s = val_text(v);
    if (!s) {
        yajl_gen_null(g);
        return;
    }
    if (col->t.array) {
        ctype_t elem = col->t;
        elem.array = false;
        /* numeric[] elements keep the array's own decimal handling (numericSchema(column)) */
        if (!gen_array_text(c, g, &elem, s, col->name))
            set_err(c, "column \"%s\": \"%.40s\" is not an array literal", col->name, s);
        return;
    }
    gen_scalar(c, g, &col->t, s, col->name);
}

/*
 * The unchanged-TOAST placeholder for a column of type t (UnchangedToastedPlaceholder,
 * UnchangedToastedReplicationMessageColumn and PostgresValueConverter, v3.1.3.Final): text-like
 * values the placeholder text, bytea its bytes; text/varchar/char/json[] a one-element array,
 * integer[]/date[] and bigint[] the placeholder's bytes as numbers, bytea[] its bytes in a
 * one-element array, uuid[] UUID.nameUUIDFromBytes(placeholder) in a one-element array (computed
 * for the default placeholder only; a configured one is written as text there).  Debezium has
 * no valid placeholder for other types (its converter fails): they go out null.
 */
static void gen_placeholder(ctx_t *c, yajl_gen g, const ctype_t *t)
{
    const char *ph = c->placeholder;
    if (t->array) {
        switch (t->kind) {
        case K_STRING:
        case K_JSON:
            yajl_gen_array_open(g);
            gen_str(g, ph);
            yajl_gen_array_close(g);
            return;
        case K_INT32:
        case K_DATE:
        case K_INT64:
            yajl_gen_array_open(g);
            for (const unsigned char *p = (const unsigned char *)ph; *p; p++)
                gen_i64(g, (signed char)*p); /* Java's (int) of a byte: signed */
            yajl_gen_array_close(g);
            return;
        case K_BYTES: {
            char *b64 = base64((const unsigned char *)ph, strlen(ph));
            yajl_gen_array_open(g);
            gen_str(g, b64 ? b64 : "");
            yajl_gen_array_close(g);
            free(b64);
            return;
        }
        case K_UUID:
            yajl_gen_array_open(g);
            /* md5("__debezium_unavailable_value") with version 3 and the IETF variant */
            gen_str(g, strcmp(ph, DBZ_PLACEHOLDER) == 0 ? "b68a35a7-17ad-35b3-af2a-ae46edb4545a" : ph);
            yajl_gen_array_close(g);
            return;
        default:
            yajl_gen_null(g);
            return;
        }
    }
    switch (t->kind) {
    case K_STRING:
    case K_JSON:
    case K_XML:
    case K_UUID:
        gen_str(g, ph);
        return;
    case K_BYTES: {
        char *b64 = base64((const unsigned char *)ph, strlen(ph));
        gen_str(g, b64 ? b64 : "");
        free(b64);
        return;
    }
    default:
        yajl_gen_null(g);
        return;
    }
}

/* ---------------------------------------------------------------- schemas (JsonConverter.asJsonSchema) */

/* Opens a field schema: writes "type" (the caller adds fields/items, then calls schema_tail). */
static void schema_type(yajl_gen g, const char *type)
{
    yajl_gen_map_open(g);
    gen_key(g, "type");
    gen_str(g, type);
}

/* optional, name, version, doc, parameters (one pair or none), field; closes the map. */
static void schema_tail(yajl_gen g, bool optional, const char *name, int version, const char *doc, const char *pk1,
                        const char *pv1, const char *pk2, const char *pv2, const char *field)
{
    gen_key(g, "optional");
    yajl_gen_bool(g, optional);
    if (name) {
        gen_key(g, "name");
        gen_str(g, name);
    }
    if (version) {
        gen_key(g, "version");
        gen_i64(g, version);
    }
    if (doc) {
        gen_key(g, "doc");
        gen_str(g, doc);
    }
    if (pk1) {
        gen_key(g, "parameters");
        yajl_gen_map_open(g);
        gen_key(g, pk1);
        gen_str(g, pv1);
        if (pk2) {
            gen_key(g, pk2);
            gen_str(g, pv2);
        }
        yajl_gen_map_close(g);
    }
    if (field) {
        gen_key(g, "field");
        gen_str(g, field);
    }
    yajl_gen_map_close(g);
}

static void schema_simple(yajl_gen g, const char *type, bool optional, const char *field)
{
    schema_type(g, type);
    schema_tail(g, optional, NULL, 0, NULL, NULL, NULL, NULL, NULL, field);
}

/* The schema of one scalar Connect type t (no array), named field (NULL inside "items"). */
static void schema_scalar(yajl_gen g, const ctype_t *t, bool optional, const char *field)
{
    char ps[16], pp[16];
    switch (t->kind) {
    case K_BOOL:
        schema_simple(g, "boolean", optional, field);
        return;
    case K_INT16:
        schema_simple(g, "int16", optional, field);
        return;
    case K_INT32:
        schema_simple(g, "int32", optional, field);
        return;
    case K_INT64:
        schema_simple(g, "int64", optional, field);
        return;
    case K_FLOAT32:
        schema_simple(g, "float", optional, field);
        return;
    case K_FLOAT64:
        schema_simple(g, "double", optional, field);
        return;
    case K_DECIMAL:
        /* Kafka Decimal.builder(scale) then SpecialValueDecimal's connect.decimal.precision */
        snprintf(ps, sizeof ps, "%d", t->scale);
        snprintf(pp, sizeof pp, "%d", t->precision);
        schema_type(g, "bytes");
        schema_tail(g, optional, "org.apache.kafka.connect.data.Decimal", 1, NULL, "scale", ps,
                    t->precision >= 0 ? "connect.decimal.precision" : NULL, pp, field);
        return;
    case K_VARDECIMAL:
        /* SchemaFactory.datatypeVariableScaleDecimalSchema */
        schema_type(g, "struct");
        gen_key(g, "fields");
        yajl_gen_array_open(g);
        schema_simple(g, "int32", false, "scale");
        schema_simple(g, "bytes", false, "value");
        yajl_gen_array_close(g);
        schema_tail(g, optional, "io.debezium.data.VariableScaleDecimal", 1, "Variable scaled decimal", NULL, NULL, NULL,
                    NULL, field);
        return;
    case K_DATE:
        schema_type(g, "int32");
        schema_tail(g, optional, "io.debezium.time.Date", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_TIME_MS:
        schema_type(g, "int32");
        schema_tail(g, optional, "io.debezium.time.Time", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_TIME_US:
        schema_type(g, "int64");
        schema_tail(g, optional, "io.debezium.time.MicroTime", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_TS_MS:
        schema_type(g, "int64");
        schema_tail(g, optional, "io.debezium.time.Timestamp", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_TS_US:
        schema_type(g, "int64");
        schema_tail(g, optional, "io.debezium.time.MicroTimestamp", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_TSTZ:
        schema_type(g, "string");
        schema_tail(g, optional, "io.debezium.time.ZonedTimestamp", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_TIMETZ:
        schema_type(g, "string");
        schema_tail(g, optional, "io.debezium.time.ZonedTime", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_INTERVAL:
        schema_type(g, "int64");
        schema_tail(g, optional, "io.debezium.time.MicroDuration", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_JSON:
        schema_type(g, "string");
        schema_tail(g, optional, "io.debezium.data.Json", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_UUID:
        schema_type(g, "string");
        schema_tail(g, optional, "io.debezium.data.Uuid", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_XML:
        schema_type(g, "string");
        schema_tail(g, optional, "io.debezium.data.Xml", 1, NULL, NULL, NULL, NULL, NULL, field);
        return;
    case K_BYTES:
        schema_simple(g, "bytes", optional, field);
        return;
    default:
        schema_simple(g, "string", optional, field);
        return;
    }
}

static void schema_column(yajl_gen g, const col_t *col)
{
    bool optional = !col->key;
    if (col->t.array) {
        ctype_t elem = col->t;
        elem.array = false;
        schema_type(g, "array");
        gen_key(g, "items");
        schema_scalar(g, &elem, true, NULL);
        schema_tail(g, optional, NULL, 0, NULL, NULL, NULL, NULL, NULL, col->name);
        return;
    }
    schema_scalar(g, &col->t, optional, col->name);
}

/* A struct schema of the columns (Key: not optional; Value: optional), named. */
static void schema_row(yajl_gen g, const collist_t *cols, bool optional, const char *name, const char *field)
{
    schema_type(g, "struct");
    gen_key(g, "fields");
    yajl_gen_array_open(g);
    for (size_t i = 0; i < cols->n; i++)
        if (cols->cols[i].t.kind != K_SKIP)
            schema_column(g, &cols->cols[i]);
    yajl_gen_array_close(g);
    schema_tail(g, optional, name, 0, NULL, NULL, NULL, NULL, NULL, field);
}

/* io.debezium.connector.postgresql.Source (PostgresSourceInfoStructMaker + SchemaFactory.sourceInfoSchemaBuilder). */
static void schema_source(yajl_gen g)
{
    schema_type(g, "struct");
    gen_key(g, "fields");
    yajl_gen_array_open(g);
    schema_simple(g, "string", false, "version");
    schema_simple(g, "string", false, "connector");
    schema_simple(g, "string", false, "name");
    schema_simple(g, "int64", false, "ts_ms");
    /* SchemaFactory.snapshotRecordSchema: Enum, optional, default "false" */
    schema_type(g, "string");
    gen_key(g, "optional");
    yajl_gen_bool(g, 1);
    gen_key(g, "name");
    gen_str(g, "io.debezium.data.Enum");
    gen_key(g, "version");
    gen_i64(g, 1);
    gen_key(g, "parameters");
    yajl_gen_map_open(g);
    gen_key(g, "allowed");
    gen_str(g, SNAPSHOT_ALLOWED);
    yajl_gen_map_close(g);
    gen_key(g, "default");
    gen_str(g, "false");
    gen_key(g, "field");
    gen_str(g, "snapshot");
    yajl_gen_map_close(g);
    schema_simple(g, "string", false, "db");
    schema_simple(g, "string", true, "sequence");
    schema_simple(g, "int64", true, "ts_us");
    schema_simple(g, "int64", true, "ts_ns");
    schema_simple(g, "string", false, "schema");
    schema_simple(g, "string", false, "table");
    schema_simple(g, "int64", true, "txId");
    schema_simple(g, "int64", true, "lsn");
    schema_simple(g, "int64", true, "xmin");
    yajl_gen_array_close(g);
    schema_tail(g, false, "io.debezium.connector.postgresql.Source", 1, NULL, NULL, NULL, NULL, NULL, "source");
}

/* SchemaFactory.transactionBlockSchema: event.block, optional. */
static void schema_transaction(yajl_gen g)
{
    schema_type(g, "struct");
    gen_key(g, "fields");
    yajl_gen_array_open(g);
    schema_simple(g, "string", false, "id");
    schema_simple(g, "int64", false, "total_order");
    schema_simple(g, "int64", false, "data_collection_order");
    yajl_gen_array_close(g);
    schema_tail(g, true, "event.block", 1, NULL, NULL, NULL, NULL, NULL, "transaction");
}

/* ---------------------------------------------------------------- payload parts */

static int64_t now_ns(const wp_dbz_options_t *opt)
{
    if (opt->now_ns)
        return opt->now_ns;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Copies a string literal to o and returns the end. */
#define PUT_LIT(o, lit) ((char *)memcpy((o), (lit), sizeof(lit) - 1) + sizeof(lit) - 1)

/*
 * Writes s at o as a JSON string exactly as yajl_gen_string does (yajl_string_encode without
 * escape_solidus, no UTF-8 validation): '"' and '\\' escaped, \b \f \n \r \t by name, other
 * bytes below 0x20 as \u00XX with upper-case hex, everything else as it is.  Returns the end;
 * o needs room for 6 * strlen(s) + 2 bytes.  (test_dbz_oracle checks it against yajl.)
 */
static char *put_json_str(char *o, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    *o++ = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char ch = *p;
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            *o++ = (char)ch;
            continue;
        }
        *o++ = '\\';
        switch (ch) {
        case '"':
            *o++ = '"';
            break;
        case '\\':
            *o++ = '\\';
            break;
        case '\b':
            *o++ = 'b';
            break;
        case '\f':
            *o++ = 'f';
            break;
        case '\n':
            *o++ = 'n';
            break;
        case '\r':
            *o++ = 'r';
            break;
        case '\t':
            *o++ = 't';
            break;
        default:
            o = PUT_LIT(o, "u00");
            *o++ = hex[ch >> 4];
            *o++ = hex[ch & 15];
        }
    }
    *o++ = '"';
    return o;
}

/*
 * The source block (SourceInfo / AbstractSourceInfoStructMaker.commonStruct, v3.1.3.Final),
 * written by hand into o (room: source_room()) instead of through yajl_gen: it is the same
 * compact text yajl_gen writes for it (the constant keys as literals, the strings through
 * put_json_str, the numbers as gen_i64 writes them), at a tenth of the cost.  Returns the end.
 */
static size_t source_room(const ctx_t *c, const char *schema, const char *table)
{
    const char *db = c->opt->database ? c->opt->database : "";
    return 6 * (strlen(c->opt->topic_prefix) + strlen(db) + strlen(schema) + strlen(table)) + 400;
}

static char *put_source(const ctx_t *c, char *o, const char *schema, const char *table, bool snapshot)
{
    const wp_sink_event_t *ev = c->ev;
    /* source ts: the commit time; Debezium takes Instant.now() when it has none */
    int64_t ts_us = ev->commit_us ? ev->commit_us : c->now_ns / 1000;
    o = PUT_LIT(o, "{\"version\":\"" DBZ_VERSION "\",\"connector\":\"postgresql\",\"name\":");
    o = put_json_str(o, c->opt->topic_prefix);
    o = PUT_LIT(o, ",\"ts_ms\":");
    o += i64_text(o, floor_div(ts_us, 1000));
    if (snapshot)
        o = PUT_LIT(o, ",\"snapshot\":\"true\",\"db\":");
    else
        o = PUT_LIT(o, ",\"snapshot\":\"false\",\"db\":");
    o = put_json_str(o, c->opt->database ? c->opt->database : "");
    /* SourceInfo.sequence(): ["<lastCommitLsn>","<lsn>"] with null for an unknown last commit */
    o = PUT_LIT(o, ",\"sequence\":\"[null,\\\"");
    o += u64_text(o, ev->lsn);
    o = PUT_LIT(o, "\\\"]\",\"ts_us\":");
    o += i64_text(o, ts_us);
    o = PUT_LIT(o, ",\"ts_ns\":");
    o += i64_text(o, ts_us * 1000);
    o = PUT_LIT(o, ",\"schema\":");
    o = put_json_str(o, schema);
    o = PUT_LIT(o, ",\"table\":");
    o = put_json_str(o, table);
    o = PUT_LIT(o, ",\"txId\":");
    if (ev->xid >= 0)
        o += i64_text(o, ev->xid);
    else
        o = PUT_LIT(o, "null");
    o = PUT_LIT(o, ",\"lsn\":");
    o += i64_text(o, (int64_t)ev->lsn);
    o = PUT_LIT(o, ",\"xmin\":null}");
    return o;
}

/*
 * Emits text (compact JSON the caller wrote by hand) into g in a value position.  yajl has no
 * "raw" call; yajl_gen_number writes its text unchecked, with the separator before it, and
 * leaves g expecting the next key: so text may be one value, or one value followed by more
 * ",key:value" members of the same object (then the caller closes the object through g).
 */
static void gen_raw(yajl_gen g, const char *text, size_t len)
{
    yajl_gen_number(g, text, len);
}

/* "source":{..} as a value of the map g is in (the key written by the caller). */
static void gen_source(ctx_t *c, yajl_gen g, const char *schema, const char *table, bool snapshot)
{
    char stack[1024];
    size_t room = source_room(c, schema, table);
    char *buf = room <= sizeof stack ? stack : malloc(room);
    if (!buf) {
        set_err(c, "out of memory");
        return;
    }
    char *o = put_source(c, buf, schema, table, snapshot);
    gen_raw(g, buf, (size_t)(o - buf));
    if (buf != stack)
        free(buf);
}

/*
 * The end of a row change's value from its source on: source:{..}, transaction:null, op, ts_ms,
 * ts_us, ts_ns as members of the envelope g is in (the "source" key written by the caller; the
 * caller closes the map).  One hand-written text for what is the same in every envelope.
 */
static void gen_envelope_tail(ctx_t *c, yajl_gen g, const char *op)
{
    const wp_sink_event_t *ev = c->ev;
    char stack[1024];
    size_t room = source_room(c, ev->schema, ev->table) + 6 * strlen(op) + 200;
    char *buf = room <= sizeof stack ? stack : malloc(room);
    if (!buf) {
        set_err(c, "out of memory");
        return;
    }
    char *o = put_source(c, buf, ev->schema, ev->table, strcmp(op, "r") == 0);
    o = PUT_LIT(o, ",\"transaction\":null,\"op\":");
    o = put_json_str(o, op);
    o = PUT_LIT(o, ",\"ts_ms\":");
    o += i64_text(o, floor_div(c->now_ns, 1000000));
    o = PUT_LIT(o, ",\"ts_us\":");
    o += i64_text(o, floor_div(c->now_ns, 1000));
    o = PUT_LIT(o, ",\"ts_ns\":");
    o += i64_text(o, c->now_ns);
    gen_raw(g, buf, (size_t)(o - buf));
    if (buf != stack)
        free(buf);
}

/* How a row image treats a column it does not hold. */
typedef enum { MISSING_NULL, MISSING_TOAST } missing_t;

/*
 * {col:value,...} over cols from image (a payload object).  A column image lacks is, with
 * MISSING_TOAST, an unchanged TOAST value: taken from old (the REPLICA IDENTITY FULL old row)
 * when that holds it, as PostgresChangeRecordEmitter.columnValues does, else the placeholder.
 */
static void gen_row_old(ctx_t *c, yajl_gen g, const collist_t *cols, yajl_val image, missing_t missing, yajl_val old)
{
    yajl_gen_map_open(g);
    for (size_t i = 0; i < cols->n; i++) {
        const col_t *col = &cols->cols[i];
        if (col->t.kind == K_SKIP)
            continue;
        gen_key(g, col->name);
        const char *path[] = {col->name, NULL};
        yajl_val v = image ? yajl_tree_get(image, path, yajl_t_any) : NULL;
        if (!v && image && missing == MISSING_TOAST) {
            yajl_val o = old ? yajl_tree_get(old, path, yajl_t_any) : NULL;
            if (o)
                gen_value(c, g, col, o);
            else
                gen_placeholder(c, g, &col->t);
        } else
            gen_value(c, g, col, v);
    }
    yajl_gen_map_close(g);
}

static void gen_row(ctx_t *c, yajl_gen g, const collist_t *cols, yajl_val image, missing_t missing)
{
    gen_row_old(c, g, cols, image, missing, NULL);
}

/* ---------------------------------------------------------------- records */

/* Copies the generator's text into *out (length *len) and clears it for the next document. */
static int take(ctx_t *c, yajl_gen g, char **out, size_t *len)
{
    const unsigned char *buf;
    size_t n;
    if (yajl_gen_get_buf(g, &buf, &n) != yajl_gen_status_ok) {
        set_err(c, "JSON generation failed");
        return -1;
    }
    *out = dup_n((const char *)buf, n);
    if (!*out) {
        set_err(c, "out of memory");
        return -1;
    }
    *len = n;
    yajl_gen_clear(g);
    yajl_gen_reset(g, NULL);
    return 0;
}

/* Debezium's sanitizedTopicName: [A-Za-z0-9._-] kept, every other UTF-16 unit '_', at most 249. */
static char *topic_name(const char *prefix, const char *schema, const char *table)
{
    size_t n = strlen(prefix) + (schema ? strlen(schema) + strlen(table) + 2 : strlen(".message"));
    char *raw = malloc(n + 1);
    if (!raw)
        return NULL;
    size_t lp = strlen(prefix), o0 = lp;
    memcpy(raw, prefix, lp);
    if (schema) {
        size_t ls = strlen(schema), lt = strlen(table);
        raw[o0++] = '.';
        memcpy(raw + o0, schema, ls);
        o0 += ls;
        raw[o0++] = '.';
        memcpy(raw + o0, table, lt);
        o0 += lt;
    } else {
        memcpy(raw + o0, ".message", 8);
        o0 += 8;
    }
    raw[o0] = '\0';
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *)raw; *p;) {
        unsigned ch = *p;
        if (ch < 0x80) {
            raw[o++] = (isalnum(ch) || ch == '.' || ch == '_' || ch == '-') ? (char)ch : '_';
            p++;
            continue;
        }
        /* a multibyte UTF-8 sequence: one '_' per UTF-16 unit (two above U+FFFF) */
        int len = ch >= 0xf0 ? 4 : ch >= 0xe0 ? 3 : 2;
        raw[o++] = '_';
        if (len == 4)
            raw[o++] = '_';
        for (int k = 0; k < len && *p; k++)
            p++;
    }
    raw[o > TOPIC_MAX ? TOPIC_MAX : o] = '\0';
    if (strcmp(raw, ".") == 0)
        raw[0] = '_';
    else if (strcmp(raw, "..") == 0)
        raw[0] = raw[1] = '_';
    return raw;
}

/* The key record text: {"schema":<Key>,"payload":{..}} or the bare struct. */
typedef struct names {
    char value[1024], envelope[1024], key[1024];
} names_t;

/* Which schema a record carries. */
typedef enum { SCHEMA_KEY, SCHEMA_ENVELOPE } schema_kind_t;

static void gen_envelope_schema(yajl_gen g, const collist_t *cols, const names_t *nm)
{
    /* SchemaFactory.datatypeEnvelopeSchema via TableSchemaBuilder: before, after, source, transaction, op, ts_* */
    schema_type(g, "struct");
    gen_key(g, "fields");
    yajl_gen_array_open(g);
    schema_row(g, cols, true, nm->value, "before");
    schema_row(g, cols, true, nm->value, "after");
    schema_source(g);
    schema_transaction(g);
    schema_simple(g, "string", false, "op");
    schema_simple(g, "int64", true, "ts_ms");
    schema_simple(g, "int64", true, "ts_us");
    schema_simple(g, "int64", true, "ts_ns");
    yajl_gen_array_close(g);
    schema_tail(g, false, nm->envelope, 2, NULL, NULL, NULL, NULL, NULL, NULL);
}

/*
 * Wraps the payload text the generator g holds as JsonConverter does with schemas.enable:
 * {"schema":<schema of cols>,"payload":<payload>} into *out.  The schema text is generated once
 * per column list and name and kept in the list's cache slot (it is most of such a record).
 */
static int take_with_schema(ctx_t *c, yajl_gen g, const collist_t *cols, const names_t *nm, schema_kind_t kind,
                            char **out, size_t *len)
{
    const char *name = kind == SCHEMA_KEY ? nm->key : nm->envelope;
    schema_text_t *cached = cols->slot ? (kind == SCHEMA_KEY ? &cols->slot->key_schema : &cols->slot->value_schema)
                                       : NULL;
    schema_text_t fresh = {0};
    const schema_text_t *st = cached;
    char *payload = NULL;
    size_t plen;
    int rc = -1;

    if (take(c, g, &payload, &plen) < 0)
        goto out;
    if (!st || !st->name || strcmp(st->name, name) != 0) {
        yajl_gen sg = yajl_gen_alloc(NULL);
        if (!sg) {
            set_err(c, "out of memory");
            goto out;
        }
        if (kind == SCHEMA_KEY)
            schema_row(sg, cols, false, nm->key, NULL);
        else
            gen_envelope_schema(sg, cols, nm);
        rc = take(c, sg, &fresh.text, &fresh.len);
        yajl_gen_free(sg);
        if (rc < 0)
            goto out;
        rc = -1;
        fresh.name = strdup(name);
        if (!fresh.name) {
            set_err(c, "out of memory");
            goto out;
        }
        if (cached) {
            schema_text_free(cached);
            *cached = fresh;
            memset(&fresh, 0, sizeof fresh);
            st = cached;
        } else
            st = &fresh;
    }
    static const char head[] = "{\"schema\":", mid[] = ",\"payload\":";
    size_t n = sizeof head - 1 + st->len + sizeof mid - 1 + plen + 1;
    char *r = malloc(n + 1);
    if (!r) {
        set_err(c, "out of memory");
        goto out;
    }
    size_t o = 0;
    memcpy(r + o, head, sizeof head - 1);
    o += sizeof head - 1;
    memcpy(r + o, st->text, st->len);
    o += st->len;
    memcpy(r + o, mid, sizeof mid - 1);
    o += sizeof mid - 1;
    memcpy(r + o, payload, plen);
    o += plen;
    r[o++] = '}';
    r[o] = '\0';
    *out = r;
    *len = o;
    rc = 0;
out:
    free(payload);
    schema_text_free(&fresh);
    return rc;
}

/* The key record text: {"schema":<Key>,"payload":{..}} or the bare struct. */
static int make_key(ctx_t *c, yajl_gen g, const collist_t *keycols, yajl_val image, const names_t *nm, char **out,
                    size_t *len)
{
    gen_row(c, g, keycols, image, MISSING_NULL);
    if (c->opt->schemas_enable)
        return take_with_schema(c, g, keycols, nm, SCHEMA_KEY, out, len);
    return take(c, g, out, len);
}


/* The value record text of a row change (op c/u/d/r/t). */
static int make_value(ctx_t *c, yajl_gen g, const collist_t *cols, const names_t *nm, const char *op, yajl_val before,
                      missing_t before_missing, yajl_val after, missing_t after_missing, yajl_val toast_old, char **out,
                      size_t *len)
{
    yajl_gen_map_open(g);
    gen_key(g, "before");
    if (before)
        gen_row(c, g, cols, before, before_missing);
    else
        yajl_gen_null(g);
    gen_key(g, "after");
    if (after)
        gen_row_old(c, g, cols, after, after_missing, toast_old);
    else
        yajl_gen_null(g);
    gen_key(g, "source");
    gen_envelope_tail(c, g, op); /* source, transaction, op, ts_ms, ts_us, ts_ns */
    yajl_gen_map_close(g);
    if (c->opt->schemas_enable)
        return take_with_schema(c, g, cols, nm, SCHEMA_ENVELOPE, out, len);
    return take(c, g, out, len);
}

/* Equal JSON scalars (the payload's key values: numbers by text, strings, bools, null). */
static bool same_value(yajl_val a, yajl_val b)
{
    const char *x = val_text(a), *y = val_text(b);
    if (!x || !y)
        return !x && !y;
    return strcmp(x, y) == 0 && (a->type == b->type);
}

/* A logical decoding message (LogicalDecodingMessageMonitor, PostgresSchemaFactory). */
static int encode_message(ctx_t *c, yajl_gen g, yajl_val payload, wp_dbz_record_t *r)
{
    const char *pp[] = {"prefix", NULL}, *pc[] = {"content", NULL};
    const char *prefix = val_text(yajl_tree_get(payload, pp, yajl_t_any));
    const char *content = val_text(yajl_tree_get(payload, pc, yajl_t_any));
    bool sch = c->opt->schemas_enable;
    char *b64 = NULL;
    int rc = -1;

    r->topic = topic_name(c->opt->topic_prefix, NULL, NULL);
    if (!r->topic)
        goto oom;
    if (sch) {
        yajl_gen_map_open(g);
        gen_key(g, "schema");
        schema_type(g, "struct");
        gen_key(g, "fields");
        yajl_gen_array_open(g);
        schema_simple(g, "string", true, "prefix");
        yajl_gen_array_close(g);
        schema_tail(g, false, "io.debezium.connector.postgresql.MessageKey", 1, NULL, NULL, NULL, NULL, NULL, NULL);
        gen_key(g, "payload");
    }
    yajl_gen_map_open(g);
    gen_key(g, "prefix");
    prefix ? gen_str(g, prefix) : yajl_gen_null(g);
    yajl_gen_map_close(g);
    if (sch)
        yajl_gen_map_close(g);
    if (take(c, g, &r->key, &r->key_len) < 0)
        goto out;

    if (content) {
        b64 = base64((const unsigned char *)content, strlen(content));
        if (!b64)
            goto oom;
    }
    if (sch) {
        yajl_gen_map_open(g);
        gen_key(g, "schema");
        schema_type(g, "struct");
        gen_key(g, "fields");
        yajl_gen_array_open(g);
        schema_simple(g, "string", false, "op");
        schema_simple(g, "int64", true, "ts_ms");
        schema_source(g);
        schema_transaction(g);
        schema_type(g, "struct");
        gen_key(g, "fields");
        yajl_gen_array_open(g);
        schema_simple(g, "string", true, "prefix");
        schema_simple(g, "bytes", true, "content");
        yajl_gen_array_close(g);
        schema_tail(g, false, "io.debezium.connector.postgresql.Message", 1, NULL, NULL, NULL, NULL, NULL, "message");
        yajl_gen_array_close(g);
        schema_tail(g, false, "io.debezium.connector.postgresql.MessageValue", 1, NULL, NULL, NULL, NULL, NULL, NULL);
        gen_key(g, "payload");
    }
    yajl_gen_map_open(g);
    gen_key(g, "op");
    gen_str(g, "m");
    gen_key(g, "ts_ms");
    gen_i64(g, floor_div(c->now_ns, 1000000));
    gen_key(g, "source");
    gen_source(c, g, "", "", false);
    gen_key(g, "transaction");
    yajl_gen_null(g);
    gen_key(g, "message");
    yajl_gen_map_open(g);
    gen_key(g, "prefix");
    prefix ? gen_str(g, prefix) : yajl_gen_null(g);
    gen_key(g, "content");
    b64 ? gen_str(g, b64) : yajl_gen_null(g);
    yajl_gen_map_close(g);
    yajl_gen_map_close(g);
    if (sch)
        yajl_gen_map_close(g);
    if (take(c, g, &r->value, &r->value_len) < 0)
        goto out;
    rc = 1;
    goto out;
oom:
    set_err(c, "out of memory");
out:
    free(b64);
    return rc;
}

/* A header: name and the key struct as compact JSON (JsonConverter with schemas.enable=false). */
static int make_header(ctx_t *c, yajl_gen g, wp_dbz_record_t *r, const char *name, const collist_t *keycols,
                       yajl_val image)
{
    r->header_name = strdup(name);
    if (!r->header_name) {
        set_err(c, "out of memory");
        return -1;
    }
    gen_row(c, g, keycols, image, MISSING_NULL);
    return take(c, g, &r->header_value, &r->header_value_len);
}

/* Whether a column of type t can be left out of an UPDATE as an unchanged TOAST value (varlena). */
static bool toastable(const ctype_t *t)
{
    if (t->array)
        return true;
    switch (t->kind) {
    case K_STRING:
    case K_JSON:
    case K_XML:
    case K_BYTES:
    case K_VARDECIMAL:
        return true;
    case K_DECIMAL:
        return !t->money;
    default:
        return false;
    }
}

/*
 * Decides the Value schema's columns: the event's own, or the remembered whole column list when
 * the event's columns are all in it (same name and type): then an UPDATE's absent columns are
 * unchanged TOAST values and a DELETE's absent columns are null.  For an UPDATE the memory is
 * stale (a column was dropped since the table's last insert) when a column it lacks cannot be
 * TOASTed at all (integer, timestamp, ...): the event's own columns are used then.
 */
static int value_columns(ctx_t *c, const collist_t *evcols, bool is_update, collist_t *out, bool *from_memory)
{
    *from_memory = false;
    const char *mem = tables_get(c->opt->tables, c->ev);
    if (mem) {
        collist_t m;
        if (collist_load(c, mem, c->ev->key_columns, "remembered columns", &m) < 0)
            return -1;
        bool fits = true;
        for (size_t i = 0; i < evcols->n && fits; i++) {
            const col_t *f = collist_find(&m, evcols->cols[i].name);
            fits = f && strcmp(f->type, evcols->cols[i].type) == 0;
        }
        for (size_t i = 0; i < m.n && fits && is_update; i++)
            if (!collist_find(evcols, m.cols[i].name))
                fits = toastable(&m.cols[i].t);
        if (fits) {
            *out = m;
            *from_memory = true;
            return 0;
        }
        collist_free(&m);
    }
    return collist_load(c, c->ev->columns, c->ev->key_columns, "columns", out);
}

static int encode_row(ctx_t *c, yajl_gen g, yajl_val payload, int tombstones, wp_dbz_record_t out[3])
{
    const wp_sink_event_t *ev = c->ev;
    const char *op = ev->op;
    collist_t evcols = {0}, cols = {0}, keycols = {0};
    names_t nm;
    int n = -1;
    bool from_memory = false;
    const char *pa[] = {"after", NULL}, *pb[] = {"before", NULL}, *pk[] = {"key", NULL};
    yajl_val after = yajl_tree_get(payload, pa, yajl_t_object);
    yajl_val before = yajl_tree_get(payload, pb, yajl_t_object);
    yajl_val oldkey = yajl_tree_get(payload, pk, yajl_t_object);
    yajl_val old_image = before ? before : oldkey; /* the old row (FULL) or its key (DEFAULT) */

    if (!ev->schema || !ev->table) {
        set_err(c, "%s event without schema or table", op);
        goto out;
    }
    if (c->opt->schemas_enable) {
        /* the schema names: only a record with its schema carries them (3 snprintf per event) */
        snprintf(nm.value, sizeof nm.value, "%s.%s.%s.Value", c->opt->topic_prefix, ev->schema, ev->table);
        snprintf(nm.envelope, sizeof nm.envelope, "%s.%s.%s.Envelope", c->opt->topic_prefix, ev->schema, ev->table);
        snprintf(nm.key, sizeof nm.key, "%s.%s.%s.Key", c->opt->topic_prefix, ev->schema, ev->table);
    } else
        nm.value[0] = nm.envelope[0] = nm.key[0] = '\0';

    if (collist_load(c, ev->columns, ev->key_columns, "columns", &evcols) < 0 ||
        collist_load(c, ev->key_columns, ev->key_columns, "key_columns", &keycols) < 0)
        goto out;

    bool is_insert = strcmp(op, "insert") == 0, is_snapshot = strcmp(op, "snapshot") == 0;
    bool is_update = strcmp(op, "update") == 0, is_delete = strcmp(op, "delete") == 0;
    bool is_truncate = strcmp(op, "truncate") == 0;
    if (!is_insert && !is_snapshot && !is_update && !is_delete && !is_truncate) {
        set_err(c, "unknown op \"%s\"", op);
        goto out;
    }
    if (is_insert || is_snapshot) {
        tables_put(c->opt->tables, ev, ev->columns);
        if (collist_load(c, ev->columns, ev->key_columns, "columns", &cols) < 0)
            goto out;
    } else if (value_columns(c, &evcols, is_update, &cols, &from_memory) < 0)
        goto out;

    char *topic = topic_name(c->opt->topic_prefix, ev->schema, ev->table);
    if (!topic) {
        set_err(c, "out of memory");
        goto out;
    }
    out[0].topic = topic;
    bool has_key = keycols.n > 0;

    if (is_truncate) {
        /* key null; before and after null */
        if (make_value(c, g, &cols, &nm, "t", NULL, MISSING_NULL, NULL, MISSING_NULL, NULL, &out[0].value,
                       &out[0].value_len) < 0)
            goto out;
        n = 1;
        goto out;
    }
    if (is_insert || is_snapshot) {
        if (!after) {
            set_err(c, "%s payload has no \"after\"", op);
            goto out;
        }
        if (has_key && make_key(c, g, &keycols, after, &nm, &out[0].key, &out[0].key_len) < 0)
            goto out;
        if (make_value(c, g, &cols, &nm, is_insert ? "c" : "r", NULL, MISSING_NULL, after, MISSING_NULL, NULL,
                       &out[0].value, &out[0].value_len) < 0)
            goto out;
        n = 1;
        goto out;
    }
    if (is_delete) {
        if (!old_image) {
            set_err(c, "delete payload has neither \"key\" nor \"before\"");
            goto out;
        }
        if (has_key && make_key(c, g, &keycols, old_image, &nm, &out[0].key, &out[0].key_len) < 0)
            goto out;
        if (make_value(c, g, &cols, &nm, "d", old_image, MISSING_NULL, NULL, MISSING_NULL, NULL, &out[0].value,
                       &out[0].value_len) < 0)
            goto out;
        n = 1;
        if (tombstones) {
            out[1].topic = strdup(topic);
            if (!out[1].topic) {
                set_err(c, "out of memory");
                n = -1;
                goto out;
            }
            if (has_key) {
                out[1].key = dup_n(out[0].key, out[0].key_len);
                out[1].key_len = out[0].key_len;
                if (!out[1].key) {
                    set_err(c, "out of memory");
                    n = -1;
                    goto out;
                }
            }
            n = 2;
        }
        goto out;
    }
    /* update */
    if (!after) {
        set_err(c, "update payload has no \"after\"");
        goto out;
    }
    /* TOAST: a column absent from "after" is an unchanged TOAST value when the Value schema's
       columns came from the table memory; without it the column is simply not there */
    missing_t after_missing = from_memory ? MISSING_TOAST : MISSING_NULL;
    bool key_changed = false;
    if (has_key && old_image) {
        for (size_t i = 0; i < keycols.n && !key_changed; i++) {
            const char *path[] = {keycols.cols[i].name, NULL};
            yajl_val o = yajl_tree_get(old_image, path, yajl_t_any);
            yajl_val a = yajl_tree_get(after, path, yajl_t_any);
            if (o && a && !same_value(o, a))
                key_changed = true;
        }
    }
    if (!key_changed) {
        if (has_key && make_key(c, g, &keycols, after, &nm, &out[0].key, &out[0].key_len) < 0)
            goto out;
        if (make_value(c, g, &cols, &nm, "u", old_image, MISSING_NULL, after, after_missing, before, &out[0].value,
                       &out[0].value_len) < 0)
            goto out;
        n = 1;
        goto out;
    }
    /* RelationalChangeRecordEmitter.emitUpdateAsPrimaryKeyChangeRecord: delete (header newkey),
       tombstone, create (header oldkey) */
    int i = 0;
    if (make_key(c, g, &keycols, old_image, &nm, &out[i].key, &out[i].key_len) < 0 ||
        make_value(c, g, &cols, &nm, "d", old_image, MISSING_NULL, NULL, MISSING_NULL, NULL, &out[i].value,
                   &out[i].value_len) < 0 ||
        make_header(c, g, &out[i], "__debezium.newkey", &keycols, after) < 0)
        goto fail;
    i++;
    if (tombstones) {
        /* EventDispatcher builds the tombstone from the delete record: same key, same headers */
        out[i].topic = strdup(topic);
        out[i].key = dup_n(out[0].key, out[0].key_len);
        out[i].key_len = out[0].key_len;
        out[i].header_name = strdup(out[0].header_name);
        out[i].header_value = dup_n(out[0].header_value, out[0].header_value_len);
        out[i].header_value_len = out[0].header_value_len;
        if (!out[i].topic || !out[i].key || !out[i].header_name || !out[i].header_value) {
            set_err(c, "out of memory");
            goto fail;
        }
        i++;
    }
    out[i].topic = strdup(topic);
    if (!out[i].topic) {
        set_err(c, "out of memory");
        goto fail;
    }
    if (make_key(c, g, &keycols, after, &nm, &out[i].key, &out[i].key_len) < 0 ||
        make_value(c, g, &cols, &nm, "c", NULL, MISSING_NULL, after, after_missing, before, &out[i].value,
                   &out[i].value_len) < 0 ||
        make_header(c, g, &out[i], "__debezium.oldkey", &keycols, old_image) < 0)
        goto fail;
    n = i + 1;
    goto out;
fail:
    n = -1;
out:
    collist_free(&evcols);
    collist_free(&cols);
    collist_free(&keycols);
    return n;
}

int wp_dbz_encode(const wp_dbz_options_t *opt, const wp_sink_event_t *ev, int tombstones, wp_dbz_record_t out[3],
                  char *err, size_t errlen)
{
    ctx_t c = {.opt = opt, .ev = ev, .err = err, .errlen = errlen};
    yajl_gen g = NULL;
    yajl_val payload = NULL;
    char perr[128];
    int n = -1;

    memset(out, 0, 3 * sizeof *out);
    if (errlen)
        err[0] = '\0';
    if (!opt || !opt->topic_prefix || !*opt->topic_prefix || !ev || !ev->op || !ev->source) {
        set_err(&c, "wp_dbz_encode: topic_prefix, event, op and source are required");
        return -1;
    }
    c.now_ns = now_ns(opt);
    if (opt->tables)
        c.call = ++opt->tables->calls;
    c.placeholder = opt->unavailable_placeholder ? opt->unavailable_placeholder : DBZ_PLACEHOLDER;
    payload = yajl_tree_parse(ev->payload ? ev->payload : "{}", perr, sizeof perr);
    if (!payload || !YAJL_IS_OBJECT(payload)) {
        set_err(&c, "payload of (%s, %" PRIu64 ", %d) is not a JSON object", ev->source, ev->lsn, (int)ev->seq);
        goto out;
    }
    if (opt->tables && opt->tables->gen) {
        g = opt->tables->gen; /* empty: every document is taken (take) or this call's start clears it */
        yajl_gen_clear(g);
        yajl_gen_reset(g, NULL);
    } else
        g = yajl_gen_alloc(NULL);
    if (!g) {
        set_err(&c, "out of memory");
        goto out;
    }
    if (opt->tables)
        opt->tables->gen = g;
    if (strcmp(ev->op, "message") == 0)
        n = encode_message(&c, g, payload, &out[0]);
    else
        n = encode_row(&c, g, payload, tombstones, out);
    if (c.failed)
        n = -1;
out:
    if (n < 0)
        for (int i = 0; i < 3; i++)
            wp_dbz_record_free(&out[i]);
    if (g && opt->tables) {
        /* kept for the next call, unless a big record grew its buffer (it keeps its capacity) */
        size_t big = 0;
        for (int i = 0; i < (n > 0 ? n : 0); i++)
            big = out[i].value_len > big ? out[i].value_len : big;
        if (big > (1u << 20)) {
            yajl_gen_free(g);
            opt->tables->gen = NULL;
        }
    } else if (g)
        yajl_gen_free(g);
    yajl_tree_free(payload);
    return n;
}

void wp_dbz_record_free(wp_dbz_record_t *r)
{
    if (!r)
        return;
    free(r->topic);
    free(r->key);
    free(r->value);
    free(r->header_name);
    free(r->header_value);
    memset(r, 0, sizeof *r);
}
