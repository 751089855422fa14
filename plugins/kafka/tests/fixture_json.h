/*
 * fixture_json.h: what the encoder's unit tests share for reading their JSON fixtures
 * (the .json files in fixtures/) with yajl's tree: file reading, lookups and compact re-serialisation.
 * Ownership: returned strings are malloc'ed and the caller's to free.
 */
#ifndef WP_FIXTURE_JSON_H
#define WP_FIXTURE_JSON_H

#include <yajl/yajl_gen.h>
#include <yajl/yajl_tree.h>

#include <walpipe/sink.h>

/* The whole file as a NUL-terminated string, or NULL. */
char *fx_read_file(const char *path);
/* obj[key] when obj is an object, else NULL. */
yajl_val fx_get(yajl_val obj, const char *key);
/* v's string, or NULL when v is not a string. */
const char *fx_str_or_null(yajl_val v);
/* Writes v to g, numbers by their text. */
void fx_dump(yajl_gen g, yajl_val v);
/* g's text so far (a copy); g is cleared and reset for the next document. */
char *fx_gen_text(yajl_gen g);
/* Compact JSON text of v, numbers by their text (what an event's payload would be); NULL for null. */
char *fx_to_text(yajl_val v);
/* ev from a fixture's "event" object e; its payload, columns and key_columns are malloc'ed texts,
   freed by fx_event_free. */
void fx_event(yajl_val e, uint64_t ticket, wp_sink_event_t *ev);
void fx_event_free(wp_sink_event_t *ev);

#endif
