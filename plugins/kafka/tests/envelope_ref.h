/* envelope_ref.h: the reference encoder (envelope_ref.c): same contract as envelope.h's functions. */
#ifndef WP_DBZ_ENVELOPE_REF_H
#define WP_DBZ_ENVELOPE_REF_H

#include "envelope.h"

int wp_dbz_ref_encode(const wp_dbz_options_t *opt, const wp_sink_event_t *ev, int tombstones,
                      wp_dbz_record_t out[3], char *err, size_t errlen);
struct wp_dbz_tables *wp_dbz_ref_tables_new(void);
void wp_dbz_ref_tables_free(struct wp_dbz_tables *tables);
void wp_dbz_ref_record_free(wp_dbz_record_t *r);

#endif
