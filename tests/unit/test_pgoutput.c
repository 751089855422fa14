/*
 * test_pgoutput.c: pgoutput protocol v1 messages, built by hand, into wal2json-equivalent changes.
 *
 * Each test builds binary messages the way pgoutput writes them, parses them
 * with a fake catalog (the describe callback), and checks the change, the
 * payload and the shape the decoder makes of them.  The bounds tests cut
 * every message at every length and feed seeded garbage: each must give a
 * clean result (a change, nothing, or a reason), never a read past its end
 * (run under ASan by the sanitized build).
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "decoder.h"
#include "mem.h"
#include "pgoutput.h"

/* ---- a message builder ---- */

static void u8(wp_buf_t *b, unsigned v)
{
    wp_buf_putc(b, (char)v);
}

static void u16(wp_buf_t *b, unsigned v)
{
    u8(b, (v >> 8) & 0xff);
    u8(b, v & 0xff);
}

static void u32(wp_buf_t *b, uint32_t v)
{
    u16(b, v >> 16);
    u16(b, v & 0xffff);
}

static void u64(wp_buf_t *b, uint64_t v)
{
    u32(b, (uint32_t)(v >> 32));
    u32(b, (uint32_t)v);
}

static void str(wp_buf_t *b, const char *s)
{
    wp_buf_append(b, s, strlen(s) + 1);
}

/* A tuple column: 'n', 'u', or text. */
static void col_text(wp_buf_t *b, const char *s)
{
    u8(b, 't');
    u32(b, (uint32_t)strlen(s));
    wp_buf_append(b, s, strlen(s));
}

/* Relation 16384 public.t (id int4 key, v text, f float8, ok bool, by bytea), identity ident. */
static void relation(wp_buf_t *b, uint32_t relid, const char *table, char ident)
{
    u8(b, 'R');
    u32(b, relid);
    str(b, "public");
    str(b, table);
    u8(b, (unsigned char)ident);
    u16(b, 5);
    const struct {
        unsigned flags;
        const char *name;
        uint32_t oid;
    } cols[] = {{1, "id", 23}, {0, "v", 25}, {0, "f", 701}, {0, "ok", 16}, {0, "by", 17}};
    for (int i = 0; i < 5; i++) {
        u8(b, ident == 'f' ? 1 : cols[i].flags);
        str(b, cols[i].name);
        u32(b, cols[i].oid);
        u32(b, i == 1 ? 0xffffffffu : 0xffffffffu); /* typmod -1 */
    }
}

/* A whole row of t: id, v, f, ok, by ("u" for v means unchanged TOAST, NULL for null). */
static void row(wp_buf_t *b, const char *id, const char *v, const char *f, const char *ok, const char *by)
{
    const char *vals[5] = {id, v, f, ok, by};
    u16(b, 5);
    for (int i = 0; i < 5; i++) {
        if (vals[i] == NULL)
            u8(b, 'n');
        else if (strcmp(vals[i], "\x01u") == 0)
            u8(b, 'u');
        else
            col_text(b, vals[i]);
    }
}

#define TOAST "\x01u"

/* ---- the fake catalog ---- */

static int describe_calls;
static bool describe_fails;

static int fake_describe(void *arg, uint32_t relid, wp_pgoutput_attr_t *attrs, size_t n, char *errbuf, size_t errlen)
{
    (void)arg;
    (void)relid;
    describe_calls++;
    if (describe_fails) {
        snprintf(errbuf, errlen, "catalog unreachable");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        const char *t = attrs[i].typeoid == 23 ? "integer" : attrs[i].typeoid == 25 ? "text"
                        : attrs[i].typeoid == 701 ? "double precision" : attrs[i].typeoid == 16 ? "boolean"
                        : "bytea";
        attrs[i].type = wp_strdup(t);
        attrs[i].attnum = (int)i + 2; /* as if a column was dropped before them */
    }
    return 0;
}

typedef struct fixture {
    wp_pgoutput_t *p;
    wp_decoder_t *d;
    wp_buf_t msg;
    wp_buf_t out;
    char err[WP_ERRLEN];
} fixture_t;

static int setup(void **state)
{
    fixture_t *f = wp_calloc(1, sizeof *f);
    f->p = wp_pgoutput_create(NULL, fake_describe, NULL);
    f->d = wp_decoder_create();
    describe_calls = 0;
    describe_fails = false;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture_t *f = *state;
    wp_pgoutput_destroy(f->p);
    wp_decoder_destroy(f->d);
    wp_buf_free(&f->msg);
    wp_buf_free(&f->out);
    free(f);
    return 0;
}

/* Parses f->msg (then empties it); returns the rc. */
static int parse(fixture_t *f, wp_change_t *c)
{
    int rc = wp_pgoutput_parse(f->p, f->d, f->msg.data, f->msg.len, c, f->err, sizeof f->err);
    wp_buf_reset(&f->msg);
    return rc;
}

static const char *payload(fixture_t *f, const wp_change_t *c)
{
    wp_buf_reset(&f->out);
    wp_decoder_payload(f->d, c, &f->out);
    wp_buf_putc(&f->out, '\0');
    return f->out.data;
}

static const char *shape(fixture_t *f, const wp_change_t *c)
{
    wp_buf_reset(&f->out);
    wp_decoder_shape(f->d, c, &f->out);
    wp_buf_putc(&f->out, '\0');
    return f->out.data;
}

static void begin(fixture_t *f)
{
    wp_change_t c;
    u8(&f->msg, 'B');
    u64(&f->msg, 0x1000);
    u64(&f->msg, 1000000); /* 2000-01-01 00:00:01 UTC */
    u32(&f->msg, 742);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_int_equal(c.op, WP_OP_BEGIN);
    assert_true(c.has_xid);
    assert_int_equal(c.xid, 742);
    assert_int_equal(c.commit_time, 1000000);
    assert_string_equal(c.timestamp, "2000-01-01 00:00:01.000000+00");
    assert_int_equal(c.lsn, 0x1000);
}

static void test_begin_commit(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    begin(f);
    u8(&f->msg, 'C');
    u8(&f->msg, 0);
    u64(&f->msg, 0x1000);
    u64(&f->msg, 0x1030);
    u64(&f->msg, 1000000);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_int_equal(c.op, WP_OP_COMMIT);
    assert_int_equal(c.lsn, 0x1000);
    assert_int_equal(c.nextlsn, 0x1030);
    assert_int_equal(c.xid, 742);
}

static void test_insert_like_wal2json(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    begin(f);
    relation(&f->msg, 16384, "t", 'd');
    assert_int_equal(parse(f, &c), WP_PGO_NONE);
    assert_int_equal(describe_calls, 0); /* asked when a row needs it */
    u8(&f->msg, 'I');
    u32(&f->msg, 16384);
    u8(&f->msg, 'N');
    row(&f->msg, "1", "h\xc3\xa9 \"q\"", "NaN", "t", "\\x00ff");
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_int_equal(c.op, WP_OP_INSERT);
    assert_string_equal(c.schema, "public");
    assert_string_equal(c.table, "t");
    assert_int_equal(c.xid, 742);
    assert_string_equal(payload(f, &c),
                        "{\"after\":{\"id\":1,\"v\":\"h\xc3\xa9 \\\"q\\\"\",\"f\":\"NaN\",\"ok\":true,\"by\":\"\\\\x00ff\"}}");
    assert_string_equal(shape(f, &c),
                        "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23,\"position\":2},"
                        "{\"name\":\"v\",\"type\":\"text\",\"typeoid\":25,\"position\":3},"
                        "{\"name\":\"f\",\"type\":\"double precision\",\"typeoid\":701,\"position\":4},"
                        "{\"name\":\"ok\",\"type\":\"boolean\",\"typeoid\":16,\"position\":5},"
                        "{\"name\":\"by\",\"type\":\"bytea\",\"typeoid\":17,\"position\":6}]");
    /* a second row: the relation is described once */
    u8(&f->msg, 'I');
    u32(&f->msg, 16384);
    u8(&f->msg, 'N');
    row(&f->msg, "2", NULL, "-1.5e-7", "f", NULL);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_string_equal(payload(f, &c), "{\"after\":{\"id\":2,\"v\":null,\"f\":-1.5e-7,\"ok\":false,\"by\":null}}");
    assert_int_equal(describe_calls, 1);
}

static void test_update_delete_identity(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    begin(f);
    relation(&f->msg, 1, "t", 'd');
    parse(f, &c);
    /* key unchanged: no old tuple; the key comes from the new row; a TOAST column is absent */
    u8(&f->msg, 'U');
    u32(&f->msg, 1);
    u8(&f->msg, 'N');
    row(&f->msg, "5", TOAST, "1", "t", NULL);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_string_equal(payload(f, &c), "{\"after\":{\"id\":5,\"f\":1,\"ok\":true,\"by\":null},\"key\":{\"id\":5}}");
    /* key changed: 'K' holds the old key (other columns null) */
    u8(&f->msg, 'U');
    u32(&f->msg, 1);
    u8(&f->msg, 'K');
    row(&f->msg, "5", NULL, NULL, NULL, NULL);
    u8(&f->msg, 'N');
    row(&f->msg, "6", "x", "2", "f", NULL);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_string_equal(payload(f, &c), "{\"after\":{\"id\":6,\"v\":\"x\",\"f\":2,\"ok\":false,\"by\":null},\"key\":{\"id\":5}}");
    /* delete by key; its shape is the identity's, without positions (as wal2json's) */
    u8(&f->msg, 'D');
    u32(&f->msg, 1);
    u8(&f->msg, 'K');
    row(&f->msg, "6", NULL, NULL, NULL, NULL);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_string_equal(payload(f, &c), "{\"key\":{\"id\":6}}");
    assert_string_equal(shape(f, &c), "[{\"name\":\"id\",\"type\":\"integer\",\"typeoid\":23}]");
    /* REPLICA IDENTITY FULL: the old row is "before", a new Relation replaces the old one */
    relation(&f->msg, 1, "t", 'f');
    assert_int_equal(parse(f, &c), WP_PGO_NONE);
    u8(&f->msg, 'D');
    u32(&f->msg, 1);
    u8(&f->msg, 'O');
    row(&f->msg, "7", "old", "Infinity", "f", "\\x");
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_string_equal(payload(f, &c),
                        "{\"before\":{\"id\":7,\"v\":\"old\",\"f\":\"Infinity\",\"ok\":false,\"by\":\"\\\\x\"}}");
    assert_int_equal(describe_calls, 2);
}

static void test_truncate_and_tables_left_out(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    wp_source_config_t source = {0};
    wp_table_ref_t excluded = {.schema = "public", .table = "skip"};
    source.exclude_tables = &excluded;
    source.nexclude_tables = 1;
    wp_pgoutput_destroy(f->p);
    f->p = wp_pgoutput_create(&source, fake_describe, NULL);
    begin(f);
    relation(&f->msg, 1, "a", 'd');
    parse(f, &c);
    relation(&f->msg, 2, "skip", 'd');
    parse(f, &c);
    relation(&f->msg, 3, "b", 'd');
    parse(f, &c);
    u8(&f->msg, 'I');
    u32(&f->msg, 2);
    u8(&f->msg, 'N');
    row(&f->msg, "1", NULL, NULL, NULL, NULL);
    assert_int_equal(parse(f, &c), WP_PGO_NONE); /* an excluded table's row: nothing */
    u8(&f->msg, 'T');
    u32(&f->msg, 3);
    u8(&f->msg, 1);
    u32(&f->msg, 1);
    u32(&f->msg, 2);
    u32(&f->msg, 3);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_int_equal(c.op, WP_OP_TRUNCATE);
    assert_string_equal(c.table, "a");
    assert_string_equal(payload(f, &c), "{}");
    assert_int_equal(wp_pgoutput_next(f->p, f->d, &c, f->err, sizeof f->err), WP_PGO_CHANGE);
    assert_string_equal(c.table, "b");
    assert_int_equal(c.xid, 742);
    assert_int_equal(wp_pgoutput_next(f->p, f->d, &c, f->err, sizeof f->err), WP_PGO_NONE);
}

static void test_messages(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    u8(&f->msg, 'M');
    u8(&f->msg, 0);
    u64(&f->msg, 0x2000);
    str(&f->msg, "app");
    u32(&f->msg, 5);
    wp_buf_append(&f->msg, "ab\0cd", 5);
    assert_int_equal(parse(f, &c), WP_PGO_CHANGE);
    assert_int_equal(c.op, WP_OP_MESSAGE);
    assert_false(c.transactional);
    assert_false(c.has_xid);
    assert_null(c.timestamp);
    assert_int_equal(c.lsn, 0x2000);
    /* cut at the NUL, as wal2json cuts it */
    assert_string_equal(payload(f, &c), "{\"prefix\":\"app\",\"content\":\"ab\",\"transactional\":false}");
    begin(f);
    u8(&f->msg, 'M');
    u8(&f->msg, 1);
    u64(&f->msg, 0x2100);
    str(&f->msg, "p");
    u32(&f->msg, 2);
    wp_buf_append(&f->msg, "\xff\xfe", 2);
    assert_int_equal(parse(f, &c), WP_PGO_BAD); /* not UTF-8: a dead letter, as with wal2json */
    assert_non_null(strstr(f->err, "UTF-8"));
}

static void test_bad_values_are_dead_letters(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    const char *schema, *table;
    begin(f);
    relation(&f->msg, 1, "t", 'd');
    parse(f, &c);
    const char *bad[][4] = {
        {"1", "\xc0\xaf", "0", "t"}, /* overlong UTF-8 */
        {"1", "x", "0", "yes"},      /* a bool pgoutput never prints */
        {"1", "x", "0", "t"},        /* with bytea 'zz' below */
    };
    for (int i = 0; i < 3; i++) {
        u8(&f->msg, 'I');
        u32(&f->msg, 1);
        u8(&f->msg, 'N');
        row(&f->msg, bad[i][0], bad[i][1], bad[i][2], bad[i][3], i == 2 ? "zz" : NULL);
        assert_int_equal(parse(f, &c), WP_PGO_BAD);
        wp_decoder_rejected_table(f->d, &schema, &table);
        assert_string_equal(table, "t");
    }
    /* a row of a relation nobody described */
    u8(&f->msg, 'I');
    u32(&f->msg, 99);
    u8(&f->msg, 'N');
    row(&f->msg, "1", NULL, NULL, NULL, NULL);
    assert_int_equal(parse(f, &c), WP_PGO_BAD);
    assert_non_null(strstr(f->err, "no Relation message described"));
    /* a catalog that cannot be read is no property of the message: retry */
    relation(&f->msg, 2, "u", 'd');
    parse(f, &c);
    describe_fails = true;
    u8(&f->msg, 'I');
    u32(&f->msg, 2);
    u8(&f->msg, 'N');
    row(&f->msg, "1", NULL, NULL, NULL, NULL);
    assert_int_equal(parse(f, &c), WP_PGO_RETRY);
    assert_string_equal(f->err, "catalog unreachable");
}

/* Every message cut at every length, and seeded garbage: clean results only. */
static void test_bounds(void **state)
{
    fixture_t *f = *state;
    wp_change_t c;
    wp_buf_t all[8];
    size_t n = 0;
    for (size_t i = 0; i < 8; i++)
        all[i] = (wp_buf_t)WP_BUF_INIT;
    relation(&all[n++], 1, "t", 'f');
    u8(&all[n], 'I');
    u32(&all[n], 1);
    u8(&all[n], 'N');
    row(&all[n++], "1", "v", "2", "t", "\\x01");
    u8(&all[n], 'U');
    u32(&all[n], 1);
    u8(&all[n], 'O');
    row(&all[n], "1", "v", "2", "t", NULL);
    u8(&all[n], 'N');
    row(&all[n++], "1", TOAST, "2", "t", NULL);
    u8(&all[n], 'D');
    u32(&all[n], 1);
    u8(&all[n], 'O');
    row(&all[n++], "1", "v", "2", "t", NULL);
    u8(&all[n], 'T');
    u32(&all[n], 2);
    u8(&all[n], 0);
    u32(&all[n], 1);
    u32(&all[n++], 1);
    u8(&all[n], 'M');
    u8(&all[n], 1);
    u64(&all[n], 7);
    str(&all[n], "p");
    u32(&all[n], 3);
    wp_buf_append(&all[n++], "abc", 3);
    u8(&all[n], 'B');
    u64(&all[n], 1);
    u64(&all[n], 2);
    u32(&all[n++], 3);
    u8(&all[n], 'C');
    u8(&all[n], 0);
    u64(&all[n], 1);
    u64(&all[n], 2);
    u64(&all[n++], 3);
    /* the relation first, whole, so that the rows reach their tuples */
    assert_int_equal(wp_pgoutput_parse(f->p, f->d, all[0].data, all[0].len, &c, f->err, sizeof f->err),
                     WP_PGO_NONE);
    for (size_t m = 0; m < n; m++) {
        for (size_t cut = 0; cut < all[m].len; cut++) {
            /* a copy of exactly cut bytes: ASan sees any read past it */
            char *copy = wp_malloc(cut ? cut : 1);
            memcpy(copy, all[m].data, cut);
            int rc = wp_pgoutput_parse(f->p, f->d, copy, cut, &c, f->err, sizeof f->err);
            free(copy);
            if (rc != WP_PGO_BAD)
                fail_msg("message %zu cut at %zu of %zu: rc %d", m, cut, all[m].len, rc);
            assert_true(f->err[0] != '\0');
        }
        /* and one byte too many */
        wp_buf_putc(&all[m], 'x');
        if (m > 0 && all[m].data[0] != 'M') /* a message's extra byte is content: its length says otherwise */
            assert_int_equal(wp_pgoutput_parse(f->p, f->d, all[m].data, all[m].len, &c, f->err, sizeof f->err),
                             WP_PGO_BAD);
    }
    /* the relation table must still hold after cut Relation messages: re-describe and parse a whole row */
    assert_int_equal(wp_pgoutput_parse(f->p, f->d, all[0].data, all[0].len - 1, &c, f->err, sizeof f->err),
                     WP_PGO_NONE);
    unsigned seed = 12345;
    for (int round = 0; round < 20000; round++) {
        unsigned char buf[64];
        size_t len = (seed = seed * 1103515245u + 12345u) % sizeof buf;
        for (size_t i = 0; i < len; i++)
            buf[i] = (unsigned char)((seed = seed * 1103515245u + 12345u) >> 16);
        if (len > 0) /* mostly known kinds */
            buf[0] = (unsigned char)"BCRIUDTMOYx"[buf[0] % 11];
        char *copy = wp_malloc(len ? len : 1);
        memcpy(copy, buf, len);
        int rc = wp_pgoutput_parse(f->p, f->d, copy, len, &c, f->err, sizeof f->err);
        while (rc == WP_PGO_CHANGE && c.op == WP_OP_TRUNCATE)
            rc = wp_pgoutput_next(f->p, f->d, &c, f->err, sizeof f->err);
        free(copy);
        assert_true(rc == WP_PGO_CHANGE || rc == WP_PGO_NONE || rc == WP_PGO_BAD);
    }
    for (size_t i = 0; i < 8; i++)
        wp_buf_free(&all[i]);
}

/*
 * The commit end predicted from a Begin's final_lsn: a 46-byte record,
 * MAXALIGNed, in its page; crossing a page, after the next page's header
 * (24 bytes, 40 on a 16 MB segment's first page).  test_pgoutput.py checks
 * the rule against a server's commit end LSNs.
 */
static void test_predict_end(void **state)
{
    (void)state;
    assert_int_equal(wp_pgoutput_predict_end(0x1000028), 0x1000058);  /* room to spare */
    assert_int_equal(wp_pgoutput_predict_end(0x1003FD0), 0x1004000);  /* ends at the page's end */
    assert_int_equal(wp_pgoutput_predict_end(0x1003FD8), 0x1004020);  /* 40 bytes here, 6 after the header */
    assert_int_equal(wp_pgoutput_predict_end(0x1003FF8), 0x1004040);  /* 8 here, 38 -> 40 after it */
    assert_int_equal(wp_pgoutput_predict_end(0x1FFFFF8), 0x2000050);  /* onto a segment's first page */
    assert_int_equal(wp_pgoutput_predict_end(0x5000000028), 0x5000000058);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_begin_commit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_insert_like_wal2json, setup, teardown),
        cmocka_unit_test_setup_teardown(test_update_delete_identity, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncate_and_tables_left_out, setup, teardown),
        cmocka_unit_test_setup_teardown(test_messages, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_values_are_dead_letters, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bounds, setup, teardown),
        cmocka_unit_test(test_predict_end),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
