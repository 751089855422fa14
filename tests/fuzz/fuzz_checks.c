/*
 * fuzz_checks.c: what must hold for ANY input to the decoder and the config parser.
 *
 * Job: run one input through the public API exactly as walpipe does (the
 * reader's WP_ERRLEN reason buffer, the config loader's name) and check every
 * output against the promises in decoder.h and config.h.  The invariant of
 * this module is that it never reports a violation for behaviour those
 * headers allow: every check below quotes the promise it enforces.
 *
 * "jsonb accepts it" is modelled on PostgreSQL 15's json lexer and
 * numeric_in, whose limits were measured on PostgreSQL 15.18:
 *   1e131071 ok, 1e131072 / 10e131071 "value overflows numeric format"
 *   (weight > 32767 NBASE digits); 1e-16383 and 0.000e-16380 ok,
 *   1.5e-16383 / 0e-16384 overflow (display scale > 16383);
 *   0e1073741822 ok, 0e1073741823 overflow (|exponent| >= INT_MAX/2);
 *   "\u0000", "\ud800", "\udc00" rejected; "\ud800\udc00" ok.
 */
#include "wp_setup.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "config.h"
#include "decoder.h"
#include "fuzz_checks.h"
#include "mem.h"

#define JSONB_MAX_DEPTH 256
#define NUMERIC_DSCALE_MAX 0x3FFF
#define NUMERIC_WEIGHT_MAX 32767
#define NUMERIC_WEIGHT_MIN (-32768)
#define EXPONENT_LIMIT 1073741823L /* INT_MAX / 2 */
#define SMALL_ERRLEN 13            /* odd and short: reasons get cut mid-character */
#define CONFIG_NAME "fuzz.conf"

static void say(char *why, size_t whylen, const char *fmt, ...) WP_PRINTF(3, 4);

static void say(char *why, size_t whylen, const char *fmt, ...)
{
    va_list ap;

    if (why == NULL || whylen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
}

/* Records the violation, makes it the result (bad) and jumps to out; every check function has both. */
#define CHECK(cond, ...) \
    do { \
        if (!(cond)) { \
            say(why, whylen, __VA_ARGS__); \
            bad = why; \
            goto out; \
        } \
    } while (0)

void wp_fuzz_init(void)
{
    /* Referenced by walpipe.conf.example and the config seeds. */
    setenv("APP_PW", "fuzz-secret", 0);
    setenv("WP_FUZZ_DB", "dbname=app", 0);
    setenv("WP_FUZZ_EMPTY", "", 0);
}

/* ---------------------------------------------------------------- UTF-8 */

/*
 * Length of the valid UTF-8 sequence at s[0..len) (s[0] >= 0x80), or 0:
 * no overlong forms, no surrogates, nothing above U+10FFFF (what
 * PostgreSQL's pg_utf8_islegal accepts).
 */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;

    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        n = 2;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        n = 3;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        n = 4;
    else
        return 0;
    if (len < n)
        return 0;
    if (s[0] == 0xe0)
        lo = 0xa0;
    else if (s[0] == 0xed)
        hi = 0x9f;
    else if (s[0] == 0xf0)
        lo = 0x90;
    else if (s[0] == 0xf4)
        hi = 0x8f;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (size_t k = 2; k < n; k++)
        if ((s[k] & 0xc0) != 0x80)
            return 0;
    return n;
}

/* True when s[0..len) is valid UTF-8; *ctl is set when it holds a C0 control or DEL. */
static bool utf8_valid(const char *str, size_t len, bool *ctl)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;

    *ctl = false;
    while (i < len) {
        if (s[i] < 0x80) {
            if (s[i] < 0x20 || s[i] == 0x7f)
                *ctl = true;
            i++;
            continue;
        }
        size_t n = utf8_seq(s + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

/* ---------------------------------------------------------------- jsonb acceptance */

typedef struct jv {
    const unsigned char *s;
    size_t len;
    size_t pos;
    char *why;
    size_t whylen;
} jv_t;

static bool jv_fail(jv_t *v, const char *what)
{
    say(v->why, v->whylen, "jsonb would reject byte %zu: %s", v->pos, what);
    return false;
}

static void jv_ws(jv_t *v)
{
    while (v->pos < v->len &&
           (v->s[v->pos] == ' ' || v->s[v->pos] == '\t' || v->s[v->pos] == '\n' || v->s[v->pos] == '\r'))
        v->pos++;
}

static bool jv_lit(jv_t *v, const char *lit)
{
    size_t n = strlen(lit);
    if (v->len - v->pos < n || memcmp(v->s + v->pos, lit, n) != 0)
        return jv_fail(v, "bad literal");
    v->pos += n;
    return true;
}

static int jv_hex4(jv_t *v)
{
    int cp = 0;
    if (v->len - v->pos < 4)
        return -1;
    for (int k = 0; k < 4; k++) {
        unsigned char c = v->s[v->pos + (size_t)k];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return -1;
        cp = cp * 16 + d;
    }
    v->pos += 4;
    return cp;
}

static bool jv_string(jv_t *v)
{
    v->pos++; /* '"' */
    for (;;) {
        if (v->pos >= v->len)
            return jv_fail(v, "unterminated string");
        unsigned char c = v->s[v->pos];
        if (c == '"') {
            v->pos++;
            return true;
        }
        if (c < 0x20)
            return jv_fail(v, "raw control character in string");
        if (c >= 0x80) {
            size_t n = utf8_seq(v->s + v->pos, v->len - v->pos);
            if (n == 0)
                return jv_fail(v, "invalid UTF-8 in string");
            v->pos += n;
            continue;
        }
        v->pos++;
        if (c != '\\')
            continue;
        if (v->pos >= v->len)
            return jv_fail(v, "string ends in '\\'");
        c = v->s[v->pos++];
        if (strchr("\"\\/bfnrt", c) != NULL && c != '\0')
            continue;
        if (c != 'u')
            return jv_fail(v, "bad escape");
        int cp = jv_hex4(v);
        if (cp < 0)
            return jv_fail(v, "bad \\u escape");
        if (cp == 0)
            return jv_fail(v, "\\u0000 (jsonb cannot store NUL)");
        if (cp >= 0xdc00 && cp <= 0xdfff)
            return jv_fail(v, "lone low surrogate escape");
        if (cp >= 0xd800 && cp <= 0xdbff) {
            if (v->len - v->pos < 2 || v->s[v->pos] != '\\' || v->s[v->pos + 1] != 'u')
                return jv_fail(v, "high surrogate escape not followed by \\u");
            v->pos += 2;
            int lo = jv_hex4(v);
            if (lo < 0xdc00 || lo > 0xdfff)
                return jv_fail(v, "high surrogate escape not followed by a low one");
        }
    }
}

static bool is_dig(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* A JSON number that numeric_in (what jsonb stores numbers as) accepts. */
static bool jv_number(jv_t *v)
{
    size_t int_digits = 0, frac_digits = 0;
    long first_sig = -1; /* index of the first non-zero digit among int+frac digits */
    long ndig = 0;
    long exponent = 0;

    if (v->s[v->pos] == '-')
        v->pos++;
    if (v->pos >= v->len || !is_dig(v->s[v->pos]))
        return jv_fail(v, "'-' without digits");
    if (v->s[v->pos] == '0') {
        v->pos++;
        int_digits = 1;
        ndig = 1;
    } else {
        while (v->pos < v->len && is_dig(v->s[v->pos])) {
            if (first_sig < 0 && v->s[v->pos] != '0')
                first_sig = ndig;
            ndig++;
            int_digits++;
            v->pos++;
        }
    }
    if (v->pos < v->len && v->s[v->pos] == '.') {
        v->pos++;
        if (v->pos >= v->len || !is_dig(v->s[v->pos]))
            return jv_fail(v, "'.' without digits");
        while (v->pos < v->len && is_dig(v->s[v->pos])) {
            if (first_sig < 0 && v->s[v->pos] != '0')
                first_sig = ndig;
            ndig++;
            frac_digits++;
            v->pos++;
        }
    }
    if (v->pos < v->len && (v->s[v->pos] == 'e' || v->s[v->pos] == 'E')) {
        bool neg = false;
        v->pos++;
        if (v->pos < v->len && (v->s[v->pos] == '+' || v->s[v->pos] == '-'))
            neg = v->s[v->pos++] == '-';
        if (v->pos >= v->len || !is_dig(v->s[v->pos]))
            return jv_fail(v, "exponent without digits");
        while (v->pos < v->len && is_dig(v->s[v->pos])) {
            if (exponent < 100000000000L) /* saturates like strtol, far past the limit */
                exponent = exponent * 10 + (v->s[v->pos] - '0');
            v->pos++;
        }
        if (neg)
            exponent = -exponent;
    }
    if (exponent >= EXPONENT_LIMIT || exponent <= -EXPONENT_LIMIT)
        return jv_fail(v, "numeric exponent out of range");
    long dscale = (long)frac_digits - exponent;
    if (dscale > NUMERIC_DSCALE_MAX)
        return jv_fail(v, "numeric display scale above 16383");
    if (first_sig >= 0) {
        long d = (long)int_digits - 1 - first_sig + exponent; /* decimal exponent of the leading digit */
        long weight = d >= 0 ? d / 4 : -((-d - 1) / 4 + 1);
        if (weight > NUMERIC_WEIGHT_MAX || weight < NUMERIC_WEIGHT_MIN)
            return jv_fail(v, "numeric weight out of range");
    }
    return true;
}

static bool jv_value(jv_t *v, int depth)
{
    jv_ws(v);
    if (v->pos >= v->len)
        return jv_fail(v, "value expected");
    if (depth > JSONB_MAX_DEPTH)
        return jv_fail(v, "nested too deeply");
    unsigned char c = v->s[v->pos];
    switch (c) {
    case '"':
        return jv_string(v);
    case 't':
        return jv_lit(v, "true");
    case 'f':
        return jv_lit(v, "false");
    case 'n':
        return jv_lit(v, "null");
    case '[':
    case '{': {
        unsigned char close = c == '[' ? ']' : '}';
        v->pos++;
        jv_ws(v);
        if (v->pos < v->len && v->s[v->pos] == close) {
            v->pos++;
            return true;
        }
        for (;;) {
            if (c == '{') {
                jv_ws(v);
                if (v->pos >= v->len || v->s[v->pos] != '"')
                    return jv_fail(v, "object key expected");
                if (!jv_string(v))
                    return false;
                jv_ws(v);
                if (v->pos >= v->len || v->s[v->pos] != ':')
                    return jv_fail(v, "':' expected");
                v->pos++;
            }
            if (!jv_value(v, depth + 1))
                return false;
            jv_ws(v);
            if (v->pos < v->len && v->s[v->pos] == ',') {
                v->pos++;
                continue;
            }
            if (v->pos < v->len && v->s[v->pos] == close) {
                v->pos++;
                return true;
            }
            return jv_fail(v, "',' or closing bracket expected");
        }
    }
    default:
        if (c == '-' || is_dig(c))
            return jv_number(v);
        return jv_fail(v, "unexpected byte");
    }
}

bool wp_fuzz_jsonb_accepts(const char *s, size_t len, char *why, size_t whylen)
{
    jv_t v = {(const unsigned char *)s, len, 0, why, whylen};

    if (!jv_value(&v, 0))
        return false;
    jv_ws(&v);
    if (v.pos != v.len)
        return jv_fail(&v, "text after the JSON value");
    return true;
}

/* ---------------------------------------------------------------- decoder */

/* A failed parse's reason: what dead_letters.reason (TEXT) can store and a person can read. */
static const char *check_reason(const char *err, size_t errlen, char *why, size_t whylen)
{
    const char *bad = NULL;
    bool ctl;
    size_t n = strnlen(err, errlen);

    CHECK(n < errlen, "reason is not NUL-terminated within its %zu-byte buffer", errlen);
    CHECK(n > 0 || errlen == 1, "failed parse left an empty reason");
    CHECK(utf8_valid(err, n, &ctl), "reason is not valid UTF-8: %s", err);
    CHECK(!ctl, "reason holds a control character: %s", err);
out:
    return bad;
}

/* decoder.h: "on a failed parse the decoder holds no message": payload {} and no shape. */
static const char *check_no_message(wp_decoder_t *d, const wp_change_t *c, char *why, size_t whylen)
{
    const char *bad = NULL;
    wp_buf_t b = WP_BUF_INIT;

    wp_decoder_payload(d, c, &b);
    CHECK(b.len == 2 && memcmp(b.data, "{}", 2) == 0, "payload after a failed parse is %s, not {}", b.data);
    wp_buf_reset(&b);
    CHECK(wp_decoder_shape(d, c, &b) == 0 && b.len == 0, "shape after a failed parse is not 0");
out:
    wp_buf_free(&b);
    return bad;
}

/* The message's field key, when present, is a JSON string (or null, if null_ok). */
static bool field_is_string(const json_t *obj, const char *key, bool required, bool null_ok)
{
    const json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return !required;
    return json_is_string(v) || (null_ok && json_is_null(v));
}

/*
 * decoder.h: "The decoder validates the whole message": a field it reads as
 * text was a JSON string in the message, not a number it turned into one.
 * in is the message parsed by jansson with every number as a double.
 */
static const char *check_string_fields(const json_t *in, const wp_change_t *c, char *why, size_t whylen)
{
    const char *bad = NULL;
    static const char *const arrays[] = {"columns", "identity"};

    CHECK(field_is_string(in, "action", true, false), "accepted an \"action\" that is not a JSON string");
    CHECK(field_is_string(in, "timestamp", false, true), "accepted a \"timestamp\" that is not a JSON string");
    CHECK(field_is_string(in, "lsn", false, false), "accepted an \"lsn\" that is not a JSON string");
    switch (c->op) {
    case WP_OP_BEGIN:
    case WP_OP_COMMIT:
        CHECK(field_is_string(in, "nextlsn", true, false), "accepted a \"nextlsn\" that is not a JSON string");
        break;
    case WP_OP_MESSAGE:
        CHECK(field_is_string(in, "prefix", true, false) && field_is_string(in, "content", true, false),
              "accepted a \"prefix\" or \"content\" that is not a JSON string");
        break;
    default:
        CHECK(field_is_string(in, "table", true, false) && field_is_string(in, "schema", false, false),
              "accepted a \"table\" or \"schema\" that is not a JSON string");
        for (size_t a = 0; a < 2; a++) {
            const json_t *arr = json_object_get(in, arrays[a]);
            if ((c->op == WP_OP_TRUNCATE) || (a == 0 && c->op == WP_OP_DELETE) ||
                (a == 1 && c->op == WP_OP_INSERT))
                continue;
            for (size_t i = 0; i < json_array_size(arr); i++) {
                const json_t *e = json_array_get(arr, i);
                CHECK(field_is_string(e, "name", true, false) && field_is_string(e, "type", true, false),
                      "%s entry %zu: accepted a \"name\" or \"type\" that is not a JSON string", arrays[a], i + 1);
            }
        }
        break;
    }
out:
    return bad;
}

/* True when text is exactly one number strtod reads as x (both are how JSON readers see it). */
static bool text_is_number(const char *text, double x)
{
    char *end;
    double y = strtod(text, &end);
    return end != text && *end == '\0' && y == x;
}

/*
 * decoder.h's value rules, as a reader of the payload sees them: every entry
 * of the message's array in (parsed with all numbers as doubles) is a member
 * of the payload row out, with the same value: null, the same boolean, the
 * same text as a string (bytea as "\\x" + text), or a number (bare, or as a
 * string when it is too big for one) equal to the text.
 */
static const char *check_row(const json_t *in, const json_t *out, const char *what, char *why, size_t whylen)
{
    const char *bad = NULL;
    size_t n = json_array_size(in);

    for (size_t i = 0; i < n; i++) {
        const char *name = json_string_value(json_object_get(json_array_get(in, i), "name"));
        CHECK(name != NULL, "%s entry %zu: a name that is not a JSON string was accepted", what, i + 1);
        for (size_t k = 0; k < i; k++) /* a repeated name keeps only one member: nothing to compare */
            if (strcmp(name, json_string_value(json_object_get(json_array_get(in, k), "name"))) == 0)
                goto out;
    }
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_array_get(in, i);
        const char *name = json_string_value(json_object_get(e, "name"));
        const json_t *iv = json_object_get(e, "value");
        const json_t *ov = json_object_get(out, name);
        bool same = false;

        CHECK(ov != NULL, "%s entry %zu (\"%.60s\") is missing from the payload", what, i + 1, name);
        switch (json_typeof(iv)) {
        case JSON_NULL:
        case JSON_TRUE:
        case JSON_FALSE:
            same = json_typeof(ov) == json_typeof(iv);
            break;
        case JSON_REAL:
            same = (json_is_real(ov) && json_real_value(ov) == json_real_value(iv)) ||
                   (json_is_string(ov) && text_is_number(json_string_value(ov), json_real_value(iv)));
            break;
        case JSON_STRING: {
            const char *is = json_string_value(iv);
            size_t il = json_string_length(iv);
            if (json_is_string(ov)) {
                const char *os = json_string_value(ov);
                size_t ol = json_string_length(ov);
                same = (ol == il && memcmp(os, is, il) == 0) ||
                       (ol == il + 2 && memcmp(os, "\\x", 2) == 0 && memcmp(os + 2, is, il) == 0);
            } else if (json_is_real(ov)) {
                same = text_is_number(is, json_real_value(ov));
            }
            break;
        }
        default:
            break;
        }
        CHECK(same, "%s entry %zu (\"%.60s\") changed its value", what, i + 1, name);
    }
out:
    return bad;
}

static const char *check_payload(wp_decoder_t *d, const wp_change_t *c, const uint8_t *data, size_t size,
                                 char *why, size_t whylen)
{
    const char *bad = NULL;
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_t again = WP_BUF_INIT;
    json_t *root = NULL;
    json_t *in = NULL;
    json_error_t jerr;
    const json_t *v;

    wp_decoder_payload(d, c, &b);
    CHECK(b.data != NULL && strlen(b.data) == b.len, "payload is empty or holds a NUL byte");
    wp_decoder_payload(d, c, &again);
    CHECK(again.len == b.len && memcmp(again.data, b.data, b.len) == 0, "payload differs on a second call");
    /* decoder.h: "always write valid JSON that PostgreSQL accepts as jsonb". */
    if (!wp_fuzz_jsonb_accepts(b.data, b.len, why, whylen)) {
        size_t n = strlen(why);
        snprintf(why + n, whylen - n, " in payload %.200s", b.data);
        bad = why;
        goto out;
    }
    /* decoder.h: numbers are int2/int4/oid/float4/float8 "(their text form round-trips through a
     * double)" or int8 within 2^53, so any JSON reader gets them as a finite double. */
    root = json_loadb(b.data, b.len, JSON_DECODE_INT_AS_REAL, &jerr);
    CHECK(root != NULL, "jansson rejects the payload (%s at %d): %.200s", jerr.text, jerr.position, b.data);
    CHECK(json_is_object(root), "payload is not an object: %.200s", b.data);

    switch (c->op) {
    case WP_OP_INSERT:
        CHECK(json_object_size(root) == 1 && json_is_object(json_object_get(root, "after")),
              "insert payload is not {\"after\":{...}}: %.200s", b.data);
        CHECK(json_object_size(json_object_get(root, "after")) <= c->ncolumns, "more values than columns");
        break;
    case WP_OP_UPDATE: {
        size_t n = json_is_object(json_object_get(root, "key")) + json_is_object(json_object_get(root, "before"));
        CHECK(json_is_object(json_object_get(root, "after")) && n <= 1 && json_object_size(root) == 1 + n,
              "update payload is not {\"after\":{...}[,\"key\"|\"before\":{...}]}: %.200s", b.data);
        break;
    }
    case WP_OP_DELETE: {
        size_t n = json_is_object(json_object_get(root, "key")) + json_is_object(json_object_get(root, "before"));
        CHECK(n == 1 && json_object_size(root) == 1, "delete payload is not {\"key\"|\"before\":{...}}: %.200s",
              b.data);
        break;
    }
    case WP_OP_MESSAGE:
        CHECK(json_object_size(root) == 3, "message payload has %zu keys", json_object_size(root));
        v = json_object_get(root, "prefix");
        CHECK(json_is_string(v) && strcmp(json_string_value(v), c->prefix) == 0, "prefix does not round-trip");
        v = json_object_get(root, "content");
        CHECK(json_is_string(v) && json_string_length(v) == c->content_len &&
                  memcmp(json_string_value(v), c->content, c->content_len) == 0,
              "content does not round-trip");
        v = json_object_get(root, "transactional");
        CHECK(json_is_boolean(v) && json_is_true(v) == c->transactional, "transactional does not round-trip");
        break;
    default: /* T has {}, B/C have no payload and get {} */
        CHECK(b.len == 2 && memcmp(b.data, "{}", 2) == 0, "%s payload is %.200s, not {}", wp_op_name(c->op),
              b.data);
        break;
    }

    /* The fields and row images against the message itself, when jansson reads it with every
     * number as a double (a number too big for one leaves this part out). */
    in = json_loadb((const char *)data, size, JSON_DECODE_INT_AS_REAL | JSON_REJECT_DUPLICATES, &jerr);
    if (in != NULL)
        bad = check_string_fields(in, c, why, whylen);
    if (in != NULL && bad == NULL &&
        (c->op == WP_OP_INSERT || c->op == WP_OP_UPDATE || c->op == WP_OP_DELETE)) {
        const json_t *ident = json_object_get(in, "identity");
        const json_t *old_row = json_object_get(root, "key") ? json_object_get(root, "key")
                                                             : json_object_get(root, "before");
        if (c->op != WP_OP_DELETE)
            bad = check_row(json_object_get(in, "columns"), json_object_get(root, "after"), "columns", why, whylen);
        if (bad == NULL && ident != NULL && c->op != WP_OP_INSERT) {
            CHECK(old_row != NULL, "the message has an identity, the payload no key or before");
            bad = check_row(ident, old_row, "identity", why, whylen);
        }
    }
out:
    json_decref(in);
    json_decref(root);
    wp_buf_free(&b);
    wp_buf_free(&again);
    return bad;
}

static const char *check_shape(wp_decoder_t *d, const wp_change_t *c, char *why, size_t whylen)
{
    const char *bad = NULL;
    wp_buf_t b = WP_BUF_INIT;
    wp_buf_t again = WP_BUF_INIT;
    json_t *root = NULL;
    json_error_t jerr;
    bool has_shape = c->op == WP_OP_INSERT || c->op == WP_OP_UPDATE || c->op == WP_OP_DELETE;

    int64_t id = wp_decoder_shape(d, c, &b);
    int64_t id2 = wp_decoder_shape(d, c, &again); /* the second call is served from the cache */
    if (!has_shape) {
        CHECK(id == 0 && b.len == 0 && id2 == 0, "%s has a shape", wp_op_name(c->op));
        goto out;
    }
    CHECK(id > 0, "shape id %lld is not positive", (long long)id);
    CHECK(id2 == id && again.len == b.len && memcmp(again.data, b.data, b.len) == 0,
          "shape differs on a second call");
    CHECK(strlen(b.data) == b.len, "shape holds a NUL byte");
    if (!wp_fuzz_jsonb_accepts(b.data, b.len, why, whylen)) {
        bad = why;
        goto out;
    }
    root = json_loadb(b.data, b.len, 0, &jerr);
    CHECK(root != NULL && json_is_array(root), "shape is not a JSON array (%s): %.200s", jerr.text, b.data);
    size_t want = c->op == WP_OP_DELETE ? c->nidentity : c->ncolumns;
    CHECK(json_array_size(root) == want, "shape has %zu entries, the change %zu", json_array_size(root), want);
    for (size_t i = 0; i < want; i++) {
        const json_t *e = json_array_get(root, i);
        const json_t *oid = json_object_get(e, "typeoid");
        const json_t *pos = json_object_get(e, "position"); /* only when wal2json sent positions */
        CHECK(json_is_object(e) && json_object_size(e) == (pos ? 4u : 3u) &&
                  json_is_string(json_object_get(e, "name")) && json_is_string(json_object_get(e, "type")),
              "shape entry %zu is not {name,type,typeoid[,position]}", i + 1);
        CHECK(pos == NULL || (json_is_integer(pos) && json_integer_value(pos) >= 1 &&
                              json_integer_value(pos) <= 32767),
              "shape entry %zu has a position that is not an attribute number", i + 1);
        CHECK(json_is_null(oid) || (json_is_integer(oid) && json_integer_value(oid) >= 0 &&
                                    json_integer_value(oid) <= (json_int_t)UINT32_MAX),
              "shape entry %zu has a typeoid that is not an OID", i + 1);
    }
out:
    json_decref(root);
    wp_buf_free(&b);
    wp_buf_free(&again);
    return bad;
}

static const char *check_change(const wp_change_t *c, char *why, size_t whylen)
{
    const char *bad = NULL;

    CHECK(c->op >= WP_OP_BEGIN && c->op <= WP_OP_MESSAGE, "op %d out of range", (int)c->op);
    CHECK(strcmp(wp_op_name(c->op), "unknown") != 0, "op has no name");
    CHECK(!c->has_xid || c->xid >= 0, "negative xid accepted");
    switch (c->op) {
    case WP_OP_INSERT:
    case WP_OP_UPDATE:
    case WP_OP_DELETE:
    case WP_OP_TRUNCATE:
        CHECK(c->table != NULL, "%s without a table", wp_op_name(c->op));
        break;
    case WP_OP_MESSAGE:
        CHECK(c->prefix != NULL && c->content != NULL, "message without prefix or content");
        break;
    default:
        break;
    }
out:
    return bad;
}

/*
 * One message: parsed from an exact-size heap copy that is scribbled over and
 * freed before the outputs are produced, so ASan catches any read past the
 * message and any output that borrows from the input instead of the decoder.
 */
static const char *check_message(wp_decoder_t *d, wp_change_t *prev, const uint8_t *data, size_t size, char *why,
                                 size_t whylen)
{
    const char *bad = NULL;
    char err[WP_ERRLEN];
    char small[SMALL_ERRLEN];
    wp_change_t c;
    wp_buf_t stale = WP_BUF_INIT;
    char *copy = wp_malloc(size);

    if (size)
        memcpy(copy, data, size);
    memset(err, 0x5a, sizeof err);
    memset(&c, 0xa5, sizeof c);
    int rc = wp_decoder_parse(d, copy, size, &c, err, sizeof err);
    if (size)
        memset(copy, 'Z', size);
    WP_FREE(copy);
    CHECK(rc == 0 || rc == -1, "wp_decoder_parse returned %d", rc);

    /* A change from an earlier message must never reach freed memory (decoder.h: its pointers
     * stay valid until the next parse; the decoder must notice when handed a stale one). */
    wp_decoder_payload(d, prev, &stale);
    if (!wp_fuzz_jsonb_accepts(stale.data, stale.len, why, whylen)) {
        bad = why;
        goto out;
    }

    if (rc != 0) {
        bad = check_reason(err, sizeof err, why, whylen);
        if (bad == NULL)
            bad = check_no_message(d, &c, why, whylen);
        if (bad == NULL) {
            /* The same message with a reason buffer that cuts it short. */
            copy = wp_malloc(size ? size : 1);
            if (size)
                memcpy(copy, data, size);
            memset(small, 0x5a, sizeof small);
            rc = wp_decoder_parse(d, copy, size, &c, small, sizeof small);
            WP_FREE(copy);
            CHECK(rc == -1, "the same message failed, then parsed");
            bad = check_reason(small, sizeof small, why, whylen);
        }
        memset(prev, 0, sizeof *prev);
        goto out;
    }
    CHECK(err[0] == '\0', "successful parse left a reason: %.100s", err);
    bad = check_change(&c, why, whylen);
    if (bad == NULL)
        bad = check_payload(d, &c, data, size, why, whylen);
    if (bad == NULL)
        bad = check_shape(d, &c, why, whylen);
    *prev = c;
out:
    wp_buf_free(&stale);
    return bad;
}

const char *wp_fuzz_check_decoder(const uint8_t *data, size_t size, char *why, size_t whylen)
{
    const char *bad = NULL;
    wp_decoder_t *d = wp_decoder_create();
    wp_change_t prev;

    memset(&prev, 0, sizeof prev);
    bad = check_message(d, &prev, data, size, why, whylen);
    if (bad != NULL || memchr(data, '\n', size) == NULL)
        goto out;
    /* A session: one message per line through the same decoder, as the reader feeds it. */
    for (size_t start = 0; start <= size && bad == NULL;) {
        const uint8_t *nl = memchr(data + start, '\n', size - start);
        size_t end = nl ? (size_t)(nl - data) : size;
        bad = check_message(d, &prev, data + start, end - start, why, whylen);
        start = end + 1;
    }
out:
    wp_decoder_destroy(d);
    return bad;
}

/* ---------------------------------------------------------------- config */

static bool is_source_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63)
        return false;
    return strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == n;
}

static bool is_slot_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63)
        return false;
    return strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789_") == n;
}

static const char *check_config_ok(const wp_config_t *cfg, char *why, size_t whylen)
{
    const char *bad = NULL;
    char *redacted = NULL;

    CHECK(strcmp(cfg->path, CONFIG_NAME) == 0, "path is \"%s\"", cfg->path);
    CHECK(cfg->log_level >= WP_LOG_DEBUG && cfg->log_level <= WP_LOG_ERROR, "log_level out of range");
    CHECK(cfg->staging_conninfo != NULL && cfg->staging_conninfo[0] != '\0', "no staging conninfo");
    CHECK(cfg->batch_rows >= 1 && cfg->batch_rows <= 1000000, "batch_rows %d out of range", cfg->batch_rows);
    CHECK(cfg->batch_bytes >= ((size_t)64 << 10) && cfg->batch_bytes <= ((size_t)1 << 30),
          "batch_bytes %zu out of range", cfg->batch_bytes);
    CHECK(cfg->batch_ms >= 1 && cfg->batch_ms <= 60000, "batch_ms %d out of range", cfg->batch_ms);
    CHECK(cfg->partitions_ahead >= 1 && cfg->partitions_ahead <= 365, "partitions_ahead out of range");
    CHECK(cfg->nsources >= 1 && cfg->sources != NULL, "no source");
    for (size_t i = 0; i < cfg->nsources; i++) {
        const wp_source_config_t *s = &cfg->sources[i];
        CHECK(s->name != NULL && is_source_name(s->name), "source %zu has an invalid name", i + 1);
        CHECK(s->conninfo != NULL && s->conninfo[0] != '\0', "[source %s] has no conninfo", s->name);
        CHECK(s->slot != NULL && is_slot_name(s->slot), "[source %s] has an invalid slot", s->name);
        CHECK(s->status_interval_ms >= 100 && s->status_interval_ms <= 60000, "status_interval_ms out of range");
        CHECK(s->line > 0, "[source %s] has no line", s->name);
        CHECK((s->tables == NULL) == (s->ntables == 0), "[source %s]: tables and ntables disagree", s->name);
        for (size_t j = 0; j < s->ntables; j++) {
            const wp_table_ref_t *t = &s->tables[j];
            CHECK(t->schema && t->table && t->schema[0] && t->table[0] && strlen(t->schema) <= 63 &&
                      strlen(t->table) <= 63,
                  "[source %s]: table entry %zu is empty or too long", s->name, j + 1);
            for (size_t k = 0; k < j; k++)
                CHECK(strcmp(t->schema, s->tables[k].schema) != 0 || strcmp(t->table, s->tables[k].table) != 0,
                      "[source %s]: table entry %zu listed twice", s->name, j + 1);
        }
        for (size_t k = 0; k < i; k++) {
            CHECK(strcmp(s->name, cfg->sources[k].name) != 0, "two sources named %s", s->name);
            CHECK(strcmp(s->slot, cfg->sources[k].slot) != 0, "two sources share slot %s", s->slot);
        }
        /* config.h: the redacted form keeps host, port, dbname and user only. */
        redacted = wp_config_conninfo_redacted(s->conninfo);
        CHECK(redacted != NULL && strstr(redacted, "password=") == NULL, "redacted conninfo shows a password");
        WP_FREE(redacted);
    }
out:
    free(redacted);
    return bad;
}

/* config.h: "file:line: problem; fix" on one line, printable: valid UTF-8 without control characters. */
static const char *check_config_error(const char *err, size_t errlen, char *why, size_t whylen)
{
    const char *bad = NULL;
    size_t n = strnlen(err, errlen);
    size_t prefix = strlen(CONFIG_NAME ":");
    bool ctl;

    CHECK(n < errlen, "error is not NUL-terminated within its %zu-byte buffer", errlen);
    CHECK(strncmp(err, CONFIG_NAME ":", n < prefix ? n : prefix) == 0, "error does not start with the file name: %s",
          err);
    CHECK(n > prefix + 1 || n == errlen - 1, "error says nothing after the file name: %s", err);
    CHECK(utf8_valid(err, n, &ctl), "error is not valid UTF-8: %s", err);
    CHECK(!ctl, "error holds a control character: %s", err);
out:
    return bad;
}

const char *wp_fuzz_check_config(const uint8_t *data, size_t size, char *why, size_t whylen)
{
    const char *bad = NULL;
    char err[WP_ERRLEN];
    char small[SMALL_ERRLEN];
    char *text = wp_strndup((const char *)data, size);
    wp_config_t *cfg = NULL;

    memset(err, 0x5a, sizeof err);
    cfg = wp_config_parse_string(text, CONFIG_NAME, err, sizeof err);
    if (cfg != NULL) {
        CHECK(err[0] == '\0', "accepted, but left an error: %.100s", err);
        bad = check_config_ok(cfg, why, whylen);
        goto out;
    }
    bad = check_config_error(err, sizeof err, why, whylen);
    if (bad != NULL)
        goto out;
    /* The same text with an error buffer that cuts the message short. */
    memset(small, 0x5a, sizeof small);
    cfg = wp_config_parse_string(text, CONFIG_NAME, small, sizeof small);
    CHECK(cfg == NULL, "the same text failed, then parsed");
    bad = check_config_error(small, sizeof small, why, whylen);
out:
    wp_config_destroy(cfg);
    free(text);
    return bad;
}
