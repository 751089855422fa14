/*
 * payload.h: a staged event's payload (raw_events.payload, jsonb text) read
 * into column name/value pairs, values kept as their exact text.
 *
 * Read by yajl's event parser (no tree is built), like the capture side's
 * decoder: numbers arrive as the text jsonb printed, never rounded.
 */
#ifndef WP_PAYLOAD_H
#define WP_PAYLOAD_H

#include "wp_setup.h"

#include "mem.h"

/* One "name": value of a payload object.  value is the text form, NULL for JSON null. */
typedef struct wp_jfield {
    const char *name;
    const char *value;
} wp_jfield_t;

typedef struct wp_jobject {
    bool present;
    wp_jfield_t *fields;
    size_t n;
} wp_jobject_t;

/*
 * A raw_events payload: {"after": {...}, "key": {...}, "before": {...}},
 * any of them absent.  Values keep their exact text: strings unescaped,
 * numbers as written (jsonb prints them exactly), true/false as such.
 * Other top-level members (a message's "prefix", ...) are skipped.  Owns
 * every string it points to; reusable across parses.
 */
typedef struct wp_payload {
    wp_jobject_t after, key, before;
    wp_buf_t arena;
    wp_jfield_t *fields;
    size_t fields_cap;
} wp_payload_t;

/*
 * Parses text (NUL-terminated) into p, replacing what p held.  Returns 0, or
 * -1 with a reason in err: not JSON, not an object, a column value that is
 * not a scalar, a string holding \u0000, an unpaired UTF-16 surrogate or
 * bytes that are not UTF-8.
 */
int wp_payload_parse(wp_payload_t *p, const char *text, char *err, size_t errlen);
void wp_payload_free(wp_payload_t *p);

/*
 * The field named name in o, or NULL.  *hint is where to start looking (the
 * index after the previous hit), so looking up columns in the order the
 * payload lists them is linear; start it at 0.
 */
const wp_jfield_t *wp_jobject_get(const wp_jobject_t *o, const char *name, size_t *hint);

#endif /* WP_PAYLOAD_H */
