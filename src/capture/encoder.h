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
 * segment: event_type (NULL = the change's own op name), lsn, seq.  A table
 * shape this encoder has not seen yet is added to segment->shapes, so that the
 * stager records it in the same transaction as the row.
 */
void wp_encoder_add(wp_encoder_t *encoder, wp_segment_t *segment, wp_decoder_t *decoder, const wp_change_t *change,
                    const char *event_type, wp_lsn_t lsn, int seq);


#endif /* WP_ENCODER_H */
