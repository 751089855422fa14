/*
 * plugins/kafka/envelope.c: Debezium-compatible encoding of walpipe sink events
 * (see envelope.h).  STUB: the API compiles; the encoder follows.
 */
#include "envelope.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int wp_dbz_encode(const wp_dbz_options_t *opt, const wp_sink_event_t *ev, int tombstones,
                  wp_dbz_record_t out[3], char *err, size_t errlen)
{
    (void)opt; (void)ev; (void)tombstones;
    memset(out, 0, 3 * sizeof *out);
    snprintf(err, errlen, "wp_dbz_encode: not implemented yet");
    return -1;
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

struct wp_dbz_tables {
    int unused;
};

struct wp_dbz_tables *wp_dbz_tables_new(void)
{
    return calloc(1, sizeof(struct wp_dbz_tables));
}

void wp_dbz_tables_free(struct wp_dbz_tables *tables)
{
    free(tables);
}
