/*
 * test_log.c: wp_log writes one line of valid UTF-8 per call, whatever the
 * message quotes (newlines and controls from a table name or a server
 * message, bytes that are not UTF-8), so no caller can forge a log line.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forged_lines),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_long_message_cut),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
