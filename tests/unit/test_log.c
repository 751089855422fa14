/*
 * test_log.c: wp_log writes one line of valid UTF-8 per call, whatever the
 * message quotes (newlines and controls from a table name or a server
 * message, bytes that are not UTF-8), so no caller can forge a log line; in
 * the json format that line is one JSON object with exactly the four fields,
 * so no message can forge a field either.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "log.h"
#include "utf8.h"

/* Runs wp_log(level, "%s", msg) with stderr sent to a file; returns what was written (caller frees). */
static char *capture(wp_log_level_t level, const char *msg)
{
    char path[] = "/tmp/wp_test_log_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    int saved = dup(STDERR_FILENO);
    assert_true(saved >= 0);
    assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
    wp_log(level, "table %s says", msg);
    assert_int_equal(dup2(saved, STDERR_FILENO), STDERR_FILENO);
    close(saved);
    off_t size = lseek(fd, 0, SEEK_END);
    assert_true(size >= 0);
    char *out = calloc(1, (size_t)size + 1);
    assert_int_equal(pread(fd, out, (size_t)size, 0), size);
    close(fd);
    return out;
}

static size_t count_char(const char *s, char c)
{
    size_t n = 0;
    for (; *s; s++)
        n += *s == c;
    return n;
}

static void test_forged_lines(void **state)
{
    (void)state;
    char *out = capture(WP_LOG_ERROR, "x\n2026-01-01 00:00:00.000Z ERROR [main] forged\r\n\tbell\a");
    assert_int_equal(count_char(out, '\n'), 1);
    assert_int_equal(out[strlen(out) - 1], '\n');
    assert_non_null(strstr(out, "table x 2026-01-01 00:00:00.000Z ERROR [main] forged   bell  says\n"));
    assert_true(wp_utf8_valid((const unsigned char *)out, strlen(out)));
    free(out);
}

static void test_invalid_utf8(void **state)
{
    (void)state;
    char *out = capture(WP_LOG_WARNING, "\xff\xc3\x28 ok \xc3\xa9");
    assert_true(wp_utf8_valid((const unsigned char *)out, strlen(out)));
    assert_non_null(strstr(out, "table ?" "?( ok \xc3\xa9 says\n"));
    free(out);
}

/* A message longer than the line buffer is cut, and a character cut in two does not survive as a bad byte. */
static void test_long_message_cut(void **state)
{
    (void)state;
    size_t n = 3001;
    char *msg = malloc(n * 2 + 1);
    for (size_t i = 0; i < n; i++)
        memcpy(msg + 2 * i, "\xc3\xa9", 2);
    msg[n * 2] = '\0';
    for (int shift = 0; shift < 2; shift++) {
        char *out = capture(WP_LOG_ERROR, msg + shift);
        assert_int_equal(count_char(out, '\n'), 1);
        assert_true(wp_utf8_valid((const unsigned char *)out, strlen(out)));
        free(out);
    }
    free(msg);
}

/* Parses out as exactly one JSON object on one line with time, level, component and message; returns it. */
static json_t *parse_json_line(const char *out)
{
    assert_int_equal(count_char(out, '\n'), 1);
    assert_int_equal(out[strlen(out) - 1], '\n');
    assert_true(wp_utf8_valid((const unsigned char *)out, strlen(out)));
    json_error_t jerr;
    json_t *o = json_loads(out, JSON_REJECT_DUPLICATES, &jerr);
    if (o == NULL)
        fail_msg("not JSON (%s): %s", jerr.text, out);
    assert_true(json_is_object(o));
    assert_int_equal(json_object_size(o), 4);
    const char *keys[] = {"time", "level", "component", "message"};
    for (size_t i = 0; i < 4; i++)
        assert_true(json_is_string(json_object_get(o, keys[i])));
    /* 2026-11-30T09:37:58.123Z */
    const char *t = json_string_value(json_object_get(o, "time"));
    assert_int_equal(strlen(t), 24);
    assert_true(t[4] == '-' && t[10] == 'T' && t[19] == '.' && t[23] == 'Z');
    return o;
}

static void test_json_format(void **state)
{
    (void)state;
    wp_log_set_format(WP_LOG_FORMAT_JSON);
    /* a message that tries to close the string and forge a field, with a quote, backslashes, controls, bad bytes */
    char *out = capture(WP_LOG_WARNING, "x\",\"level\":\"error\"} \\n\\\"\n{\"time\":1}\t\a \xff\xc3\x28 \xc3\xa9");
    json_t *o = parse_json_line(out);
    assert_string_equal(json_string_value(json_object_get(o, "level")), "warning");
    assert_string_equal(json_string_value(json_object_get(o, "component")), "main");
    /* the message is the text format's scrubbed message, exactly */
    assert_string_equal(json_string_value(json_object_get(o, "message")),
                        "table x\",\"level\":\"error\"} \\n\\\" {\"time\":1}   ?" "?( \xc3\xa9 says");
    json_decref(o);
    free(out);

    /* the component is escaped too */
    wp_log_set_component("source \"q\\\"");
    out = capture(WP_LOG_ERROR, "m");
    o = parse_json_line(out);
    assert_string_equal(json_string_value(json_object_get(o, "component")), "source \"q\\\"");
    assert_string_equal(json_string_value(json_object_get(o, "level")), "error");
    json_decref(o);
    free(out);
    wp_log_set_component("main");
    wp_log_set_format(WP_LOG_FORMAT_TEXT);
}

/* The longest messages, all quotes (each escaped to two bytes) or cut mid-character, stay one whole object. */
static void test_json_long_message(void **state)
{
    (void)state;
    wp_log_set_format(WP_LOG_FORMAT_JSON);
    size_t n = 6000;
    char *msg = malloc(n + 1);
    memset(msg, '"', n);
    msg[n] = '\0';
    char *out = capture(WP_LOG_INFO, msg);
    json_t *o = parse_json_line(out);
    const char *m = json_string_value(json_object_get(o, "message"));
    assert_true(strlen(m) > 1000);
    assert_int_equal(strncmp(m, "table \"\"\"", 9), 0);
    json_decref(o);
    free(out);
    for (size_t i = 0; i + 1 < n; i += 2)
        memcpy(msg + i, "\xc3\xa9", 2);
    for (int shift = 0; shift < 2; shift++) {
        out = capture(WP_LOG_INFO, msg + shift);
        json_decref(parse_json_line(out));
        free(out);
    }
    free(msg);
    wp_log_set_format(WP_LOG_FORMAT_TEXT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forged_lines),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_long_message_cut),
        cmocka_unit_test(test_json_format),
        cmocka_unit_test(test_json_long_message),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
