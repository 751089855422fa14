/*
 * encoder.c: one decoded change -> one raw_events row in COPY text format.
 *
 * Column order is the stager's COPY column list: source, event_type, payload,
 * lsn, xid, commit_ts, seq, schema_name, table_name, shape_id.
 *
 * Invariant: every row that references a shape_id either follows a segment
 * that carried that shape, or carries it itself; shapes are recorded with
 * ON CONFLICT DO NOTHING, so a shape sent twice (after a restart) is harmless.
 */
#include "wp_setup.h"

#include <stdlib.h>
#include <string.h>

#include "encoder.h"

struct wp_encoder {
    char *source_copy; /* the source name, COPY-escaped */
    wp_buf_t payload;
    wp_buf_t shape;
    int64_t *shape_ids; /* open addressing set of shape ids sent; 0 = empty */
    size_t shapes_cap, shapes_count;
};

wp_encoder_t *wp_encoder_create(const char *source_name)
{
    wp_encoder_t *encoder = wp_calloc(1, sizeof *encoder);
    wp_buf_t name = WP_BUF_INIT;
    wp_copy_escape(&name, source_name, strlen(source_name));
    encoder->source_copy = name.data;
    return encoder;
}

void wp_encoder_destroy(wp_encoder_t *encoder)
{
    if (encoder == NULL)
        return;
    free(encoder->source_copy);
    wp_buf_free(&encoder->payload);
    wp_buf_free(&encoder->shape);
    free(encoder->shape_ids);
    free(encoder);
}

void wp_copy_escape(wp_buf_t *out, const char *s, size_t len)
{
    wp_buf_reserve(out, len + len / 8 + 8);
    size_t start = 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i], e;
        switch (c) {
        case '\\': e = '\\'; break;
        case '\t': e = 't'; break;
        case '\n': e = 'n'; break;
        case '\r': e = 'r'; break;
        default: continue;
        }
        wp_buf_append(out, s + start, i - start);
        wp_buf_putc(out, '\\');
        wp_buf_putc(out, e);
        start = i + 1;
    }
    wp_buf_append(out, s + start, len - start);
}

static void copy_text_or_null(wp_buf_t *out, const char *s)
{
    if (s)
        wp_copy_escape(out, s, strlen(s));
    else
        wp_buf_puts(out, "\\N");
}

/* Adds id to the set; returns true if it was not there yet. */
static bool shape_first_seen(wp_encoder_t *encoder, int64_t id)
{
    if (id == 0)
        return false;
    if ((encoder->shapes_count + 1) * 2 > encoder->shapes_cap) {
        size_t cap = encoder->shapes_cap ? encoder->shapes_cap * 2 : 64;
        int64_t *ids = wp_calloc(cap, sizeof *ids);
        for (size_t i = 0; i < encoder->shapes_cap; i++) {
            if (encoder->shape_ids[i] == 0)
                continue;
            size_t j = (size_t)encoder->shape_ids[i] & (cap - 1);
            while (ids[j])
                j = (j + 1) & (cap - 1);
            ids[j] = encoder->shape_ids[i];
        }
        free(encoder->shape_ids);
        encoder->shape_ids = ids;
        encoder->shapes_cap = cap;
    }
    size_t j = (size_t)id & (encoder->shapes_cap - 1);
    while (encoder->shape_ids[j]) {
        if (encoder->shape_ids[j] == id)
            return false;
        j = (j + 1) & (encoder->shapes_cap - 1);
    }
    encoder->shape_ids[j] = id;
    encoder->shapes_count++;
    return true;
}

void wp_encoder_add(wp_encoder_t *encoder, wp_segment_t *segment, wp_decoder_t *decoder, const wp_change_t *change,
                    const char *event_type, wp_lsn_t lsn, int seq)
{
    wp_buf_t *out = &segment->copy;
    char lsntext[WP_LSN_STRLEN];
    int64_t shape_id = 0;

    if (change->op == WP_OP_INSERT || change->op == WP_OP_UPDATE || change->op == WP_OP_DELETE) {
        wp_buf_reset(&encoder->shape);
        shape_id = wp_decoder_shape(decoder, change, &encoder->shape);
        if (shape_first_seen(encoder, shape_id)) {
            wp_shape_t *shape = wp_calloc(1, sizeof *shape);
            shape->id = shape_id;
            shape->schema = wp_strdup(change->schema ? change->schema : "");
            shape->table = wp_strdup(change->table);
            shape->columns = wp_strndup(encoder->shape.data, encoder->shape.len);
            shape->first_lsn = lsn;
            shape->next = segment->shapes;
            segment->shapes = shape;
        }
    }
    wp_buf_reset(&encoder->payload);
    wp_decoder_payload(decoder, change, &encoder->payload);

    wp_buf_puts(out, encoder->source_copy);
    wp_buf_putc(out, '\t');
    wp_buf_puts(out, event_type ? event_type : wp_op_name(change->op));
    wp_buf_putc(out, '\t');
    wp_copy_escape(out, encoder->payload.data, encoder->payload.len);
    wp_buf_putc(out, '\t');
    wp_buf_puts(out, wp_lsn_format(lsn, lsntext));
    wp_buf_putc(out, '\t');
    if (change->has_xid)
        wp_buf_put_i64(out, change->xid);
    else
        wp_buf_puts(out, "\\N");
    wp_buf_putc(out, '\t');
    copy_text_or_null(out, change->timestamp);
    wp_buf_putc(out, '\t');
    wp_buf_put_i64(out, seq);
    wp_buf_putc(out, '\t');
    copy_text_or_null(out, change->schema);
    wp_buf_putc(out, '\t');
    copy_text_or_null(out, change->table);
    if (shape_id) {
        wp_buf_putc(out, '\t');
        wp_buf_put_i64(out, shape_id);
        wp_buf_putc(out, '\n');
    } else
        wp_buf_puts(out, "\t\\N\n");
    segment->rows++;
}
