/*
 * test_fuzz_regressions.c: every saved fuzz input, replayed in the normal suite.
 *
 * tests/data/fuzz-regressions/decoder/ and .../config/ hold inputs that
 * crashed a fuzz target or broke an invariant (each fixed in src/, see the
 * folder's README), plus seeds that reach edge paths.  Each file goes through
 * the very checks the libFuzzer targets run (tests/fuzz/fuzz_checks.c), so a
 * regression fails here with gcc and no clang; under WP_SANITIZE=1 ASan and
 * UBSan watch the same replay.  A few tests also pin what the fixes promise
 * and prove the checker itself rejects what PostgreSQL rejects.
 */
#include "wp_setup.h"

#include <dirent.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "decoder.h"
#include "fuzz_checks.h"
#include "mem.h"

#define REGRESSIONS WP_TEST_DATA "/fuzz-regressions/"

typedef const char *(*check_fn)(const uint8_t *data, size_t size, char *why, size_t whylen);

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    wp_buf_t b = WP_BUF_INIT;
    char chunk[4096];
    size_t n;

    if (f == NULL)
        fail_msg("cannot open %s", path);
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        wp_buf_append(&b, chunk, n);
    fclose(f);
    wp_buf_reserve(&b, 0);
    *len = b.len;
    return (uint8_t *)b.data;
}

/* Replays every file in REGRESSIONS/sub through check; returns how many there were. */
static size_t replay_dir(const char *sub, check_fn check)
{
    char dir[1024];
    char path[2048];
    char why[1024];
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    DIR *d;

    snprintf(dir, sizeof dir, "%s%s", REGRESSIONS, sub);
    d = opendir(dir);
    if (d == NULL)
        fail_msg("cannot open %s", dir);
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 32;
            names = wp_realloc(names, cap * sizeof *names);
        }
        names[n++] = wp_strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_names);
    for (size_t i = 0; i < n; i++) {
        size_t len;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        uint8_t *data = read_all(path, &len);
        /* An exact-size copy: ASan sees any read past the input's end. */
        uint8_t *exact = wp_malloc(len);
        if (len)
            memcpy(exact, data, len);
        const char *bad = check(exact, len, why, sizeof why);
        free(exact);
        free(data);
        if (bad != NULL)
            fail_msg("%s/%s: %s", sub, names[i], bad);
        free(names[i]);
    }
    free(names);
    return n;
}

static void test_replay_decoder(void **state)
{
    (void)state;
    /* At least the two fixed findings and the edge seeds must be there. */
    assert_true(replay_dir("decoder", wp_fuzz_check_decoder) >= 5);
}

static void test_replay_config(void **state)
{
    (void)state;
    assert_true(replay_dir("config", wp_fuzz_check_config) >= 3);
}

/* The checker must reject exactly what PostgreSQL 15.18's jsonb input rejected when measured. */
static void test_jsonb_model(void **state)
{
    static const struct {
        const char *json;
        bool ok;
    } cases[] = {
        {"[1e131071]", true},      {"[1e131072]", false},     {"[10e131071]", false},
        {"[0.1e131072]", true},    {"[-1e131071]", true},     {"[1e-16383]", true},
        {"[1e-16384]", false},     {"[1.5e-16383]", false},   {"[0e-16383]", true},
        {"[0e-16384]", false},     {"[0.000e-16380]", true},  {"[0.0000e-16380]", false},
        {"[0e1073741822]", true},  {"[0e1073741823]", false}, {"[1e1073741822]", false},
        {"[1E-0016383]", true},    {"[0e99999999]", true},    {"[\"\\u0000\"]", false},
        {"[\"\\ud800\"]", false},  {"[\"\\udc00\"]", false},  {"[\"\\ud800\\udc00\"]", true},
        {"[\"\\uFFFF\"]", true},   {"[\"\\u0001\"]", true},   {"[01]", false},
        {"[1.]", false},           {"[.5]", false},           {"[\"\x01\"]", false},
        {"[\"\xc3\"]", false},     {"[\"\xed\xa0\x80\"]", false}, {"{\"a\":1,\"a\":2}", true},
        {"[1] x", false},          {"", false},           {"{\"after\":{\"x\":1e999999}}", false},
    };
    char why[256];

    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        bool got = wp_fuzz_jsonb_accepts(cases[i].json, strlen(cases[i].json), why, sizeof why);
        if (got != cases[i].ok)
            fail_msg("%s: expected %s, got %s (%s)", cases[i].json, cases[i].ok ? "accepted" : "rejected",
                     got ? "accepted" : "rejected", got ? "" : why);
    }
}

/* Fixed: config errors echoed control characters of the input (a lone '\r' in a key name). */
static void test_config_error_is_printable(void **state)
{
    char err[WP_ERRLEN];
    (void)state;
    const char *text = "[staging]\nconninf\r\x1b[2Jx = 1\n";
    wp_config_t *cfg = wp_config_parse_string(text, "t.ini", err, sizeof err);
    assert_null(cfg);
    assert_string_equal(err, "t.ini:2: unknown key \"conninf  [2Jx\" in [staging]; valid keys are: conninfo, "
                             "batch_rows, batch_bytes, batch_ms, payload_gin_index, partitions_ahead");
    /* A cut UTF-8 character becomes '?': "\xc3\xa9" cut after its first byte. */
    char small[27];
    cfg = wp_config_parse_string("[staging]\n\xc3\xa9 = 1\n", "t.ini", small, sizeof small);
    assert_null(cfg);
    assert_string_equal(small, "t.ini:2: unknown key \"\xc3\xa9\" ");
    cfg = wp_config_parse_string("[staging]\n\xc3\xa9 = 1\n", "t.ini", small, 24);
    assert_null(cfg);
    assert_string_equal(small, "t.ini:2: unknown key \"?");
}

/* Payload of a one-column insert of type (typeoid) with value, as wp_decoder_payload writes it. */
static void expect_payload(const char *type, const char *typeoid, const char *value, const char *want)
{
    char msg[512];
    char err[WP_ERRLEN];
    wp_change_t c;
    wp_buf_t b = WP_BUF_INIT;
    wp_decoder_t *d = wp_decoder_create();

    snprintf(msg, sizeof msg,
             "{\"action\":\"I\",\"xid\":1,\"lsn\":\"0/1\",\"schema\":\"s\",\"table\":\"t\",\"columns\":"
             "[{\"name\":\"a\",\"type\":\"%s\",\"typeoid\":%s,\"value\":%s}]}",
             type, typeoid, value);
    if (wp_decoder_parse(d, msg, strlen(msg), &c, err, sizeof err) != 0)
        fail_msg("%s: %s", msg, err);
    wp_decoder_payload(d, &c, &b);
    if (strcmp(b.data, want) != 0)
        fail_msg("%s %s: expected %s, got %s", type, value, want, b.data);
    wp_buf_free(&b);
    wp_decoder_destroy(d);
}

/*
 * Fixed: an int2/int4/oid/float4/float8 value went out as a bare number whatever its size, so a
 * forged 1e400 was no double and 1e-99999 made jsonb (and so the whole staging COPY) fail.
 */
static void test_decoder_number_bounds(void **state)
{
    (void)state;
    expect_payload("double precision", "701", "1e400", "{\"after\":{\"a\":\"1e400\"}}");
    expect_payload("integer", "23", "1e-99999", "{\"after\":{\"a\":\"1e-99999\"}}");
    expect_payload("real", "700", "\"0e-16384\"", "{\"after\":{\"a\":\"0e-16384\"}}");
    expect_payload("double precision", "701", "1.00000000000000000000000000000000000000000000000000000000000000000",
                   "{\"after\":{\"a\":\"1.00000000000000000000000000000000000000000000000000000000000000000\"}}");
    /* What PostgreSQL prints for these types stays a number, extremes included. */
    expect_payload("double precision", "701", "1.7976931348623157e+308",
                   "{\"after\":{\"a\":1.7976931348623157e+308}}");
    expect_payload("double precision", "701", "-2.2250738585072014e-308",
                   "{\"after\":{\"a\":-2.2250738585072014e-308}}");
    expect_payload("double precision", "701", "5e-324", "{\"after\":{\"a\":5e-324}}");
    expect_payload("real", "700", "-3.4028235e+38", "{\"after\":{\"a\":-3.4028235e+38}}");
    expect_payload("double precision", "701", "-0", "{\"after\":{\"a\":-0}}");
    expect_payload("oid", "26", "4294967295", "{\"after\":{\"a\":4294967295}}");
    expect_payload("integer", "23", "-2147483648", "{\"after\":{\"a\":-2147483648}}");
}

/* The reason wp_decoder_parse gives for msg, which must fail. */
static void expect_reason(const char *msg, const char *want)
{
    char err[WP_ERRLEN];
    wp_change_t c;
    wp_decoder_t *d = wp_decoder_create();

    if (wp_decoder_parse(d, msg, strlen(msg), &c, err, sizeof err) == 0)
        fail_msg("accepted: %s", msg);
    if (strstr(err, want) == NULL)
        fail_msg("expected \"%s\" in: %s", want, err);
    wp_decoder_destroy(d);
}

/*
 * Fixed: the number pre-pass (gone since the decoder reads numbers as text with yajl) turned a
 * non-int64 number into a string wherever a value stood, so "name": -1e-400 passed as the column
 * name "-1e-400" (and likewise table, type, prefix, ...).  A number is never a string field.
 */
static void test_decoder_string_fields(void **state)
{
    (void)state;
    expect_reason("{\"action\":\"I\",\"lsn\":\"0/1\",\"table\":\"t\",\"columns\":"
                  "[{\"name\":-1e-400,\"type\":\"text\",\"value\":\"x\"}]}",
                  "\"columns\" entry 1: \"name\" is not a string");
    expect_reason("{\"action\":\"I\",\"lsn\":\"0/1\",\"table\":\"t\",\"columns\":"
                  "[{\"name\":\"a\",\"type\":1.5,\"value\":\"x\"}]}",
                  "\"columns\" entry 1: \"type\" is not a string");
    expect_reason("{\"action\":\"T\",\"lsn\":\"0/1\",\"table\":99999999999999999999}",
                  "\"table\" is not a string");
    expect_reason("{\"action\":\"T\",\"lsn\":\"0/1\",\"schema\":-0,\"table\":\"t\"}", "\"schema\" is not a string");
    expect_reason("{\"action\":\"M\",\"lsn\":\"0/1\",\"transactional\":false,\"prefix\":\"p\",\"content\":2.5}",
                  "\"content\" is not a string");
    expect_reason("{\"action\":\"B\",\"timestamp\":1e3,\"lsn\":\"0/1\",\"nextlsn\":\"0/2\"}",
                  "\"timestamp\" is not a string or null");
    /* An escaped key is read as one of these too. */
    expect_reason("{\"action\":\"T\",\"lsn\":\"0/1\",\"t\\u0061ble\":0.5}", "\"table\" is not a string");
    /* Values and unknown fields keep their exact numbers. */
    expect_payload("numeric", "1700", "-1e-400", "{\"after\":{\"a\":\"-1e-400\"}}");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_replay_decoder),
        cmocka_unit_test(test_replay_config),
        cmocka_unit_test(test_jsonb_model),
        cmocka_unit_test(test_config_error_is_printable),
        cmocka_unit_test(test_decoder_number_bounds),
        cmocka_unit_test(test_decoder_string_fields),
    };
    wp_fuzz_init();
    return cmocka_run_group_tests(tests, NULL, NULL);
}
