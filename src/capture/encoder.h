/*
 * encoder.h: decoded changes -> raw_events rows in binary COPY format.
 *
 * Shared by the reader (streamed changes) and the snapshot (copied rows), so
 * a row lands in raw_events the same way whichever path brought it.
 */
#ifndef WP_ENCODER_H
#define WP_ENCODER_H

#include "wp_setup.h"

#include "decoder.h"
#include "pipeline.h"

typedef struct wp_encoder wp_encoder_t;

/* One encoder per thread and source; source_name is copied. */
wp_encoder_t *wp_encoder_create(const char *source_name);
void wp_encoder_destroy(wp_encoder_t *encoder); /* NULL is a no-op */

/*
 * Appends the raw_events row of change (the decoder's last parsed change) to
 * segment: event_type (NULL = the change's own op name), lsn, seq.  The
 * row's table shape is in segment->shapes (once per segment) with the offset
 * of the row's shape_id field, so that the stager records the shape in the
 * same transaction as the row and can correct the id (pipeline.h).
 */
void wp_encoder_add(wp_encoder_t *encoder, wp_segment_t *segment, wp_decoder_t *decoder, const wp_change_t *change,
                    const char *event_type, wp_lsn_t lsn, int seq);

/*
 * Appends a raw_events row walpipe makes itself (no source change behind
 * it, so no xid, commit time or shape): event_type, payload (JSON text),
 * lsn, seq, schema and table.  A resync's truncate is one (snapshot.c).
 */
void wp_encoder_add_event(wp_encoder_t *encoder, wp_segment_t *segment, const char *event_type, const char *payload,
                          wp_lsn_t lsn, int seq, const char *schema, const char *table);

/* Rewrites the shape_id of every row of segment that uses shape (shape->refs) to id. */
void wp_encoder_set_shape_id(wp_segment_t *segment, const wp_shape_t *shape, int64_t id);

#endif /* WP_ENCODER_H */
