/*
 * plugins/kafka/envelope.h: Debezium-compatible encoding of walpipe sink events.
 *
 * A pure module (no Kafka, no I/O): one wp_sink_event_t in, 1..3 Kafka records out
 * (topic, key, value, and an optional header), each exactly as Debezium's PostgreSQL
 * connector with Kafka's JsonConverter writes it (schemas.enable on or off), so that a
 * consumer written for Debezium reads walpipe's topics unchanged.  README "Kafka events
 * (Debezium-compatible)" lists the type mapping and the known deviations.
 *
 * Ownership: every string in a wp_dbz_record_t is malloc'd by wp_dbz_encode and owned by
 * the caller, who releases each record with wp_dbz_record_free.  Nothing points into the
 * event: the event may be freed right after wp_dbz_encode returns.
 *
 * Thread safety: no shared state; the encoder may be called from any thread.
 */
#ifndef WP_DBZ_ENVELOPE_H
#define WP_DBZ_ENVELOPE_H

#include <stddef.h>
#include <stdint.h>

#include <walpipe/sink.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Debezium's decimal.handling.mode (precise is Debezium's default). */
typedef enum { WP_DBZ_DECIMAL_PRECISE = 0, WP_DBZ_DECIMAL_STRING, WP_DBZ_DECIMAL_DOUBLE } wp_dbz_decimal_t;

/* A zero-initialized struct plus topic_prefix is a valid configuration. */
typedef struct wp_dbz_options {
    const char *topic_prefix;    /* Debezium topic.prefix; also source.name (required) */
    const char *database;        /* source.db; NULL or "" when not configured */
    int schemas_enable;          /* 1: JsonConverter's {"schema":..,"payload":..}; 0: bare payload */
    wp_dbz_decimal_t decimal_mode;
    const char *unavailable_placeholder; /* NULL: "__debezium_unavailable_value" */
    /* (additive) processing time for ts_ms/ts_us/ts_ns, ns since the Unix epoch;
       0: read CLOCK_REALTIME at each call.  Tests inject a fixed value. */
    int64_t now_ns;
    /* (additive) optional memory of each table's whole column list, learnt from inserts and
       snapshot rows; NULL: none.  With it, an update that leaves out unchanged TOAST columns
       carries them with the placeholder, and deletes/truncates carry the table's full row schema
       (Debezium's Value schema) instead of only the key columns.  It also caches parsed column
       lists and generated schemas: about 4x faster per event (2.5x more with schemas.enable),
       and keeps the JSON generator between calls (at most 1 MB of it is kept).  Recommended.  Not thread-safe: one per session (wp_dbz_tables_new / wp_dbz_tables_free). */
    struct wp_dbz_tables *tables;
} wp_dbz_options_t;

/* One Kafka record.  Every pointer is malloc'd and owned by the caller (wp_dbz_record_free). */
typedef struct wp_dbz_record {
    char *topic;                   /* <prefix>.<schema>.<table> or <prefix>.message; Avro-sanitized like Debezium */
    char *key; size_t key_len;     /* NULL: null key */
    char *value; size_t value_len; /* NULL: tombstone */
    /* (additive) one Kafka header or NULL: Debezium's "__debezium.newkey" on the delete (and its
       tombstone) and "__debezium.oldkey" on the create of a primary-key change; the value is the
       other key as compact JSON (the key struct without schema) */
    char *header_name;
    char *header_value; size_t header_value_len;
} wp_dbz_record_t;

/* Encodes one event into 1..3 records written into out[0..n-1]:
 *   insert c, update u, snapshot r, truncate t, message m: 1 record;
 *   delete: d, then a tombstone when tombstones != 0;
 *   update that changes the key: d (header newkey), [tombstone, same header], c (header oldkey).
 * Returns n, or -1 with a one-line reason in err (out then holds nothing to free): a payload
 * that is not what walpipe stages, or a value Debezium cannot encode either (a timestamp past
 * int64 microseconds since 1970).
 * The caller provides out[3] and frees each of the n records with wp_dbz_record_free. */
int wp_dbz_encode(const wp_dbz_options_t *opt, const wp_sink_event_t *ev, int tombstones,
                  wp_dbz_record_t out[3], char *err, size_t errlen);

/* The table memory for wp_dbz_options_t.tables: NULL on out of memory; free with wp_dbz_tables_free. */
struct wp_dbz_tables *wp_dbz_tables_new(void);
void wp_dbz_tables_free(struct wp_dbz_tables *tables); /* NULL is a no-op */

/* Frees what a record holds and zeroes it; NULL and a zeroed record are fine. */
void wp_dbz_record_free(wp_dbz_record_t *r);

#ifdef __cplusplus
}
#endif

#endif /* WP_DBZ_ENVELOPE_H */
