/*
 * fuzz_checks.h: the invariants walpipe's two parsers must keep for any input.
 *
 * One implementation serves two callers: the libFuzzer targets in this folder
 * (which abort on a violation, so libFuzzer saves the input) and the cmocka
 * test tests/unit/test_fuzz_regressions.c (which replays every saved input
 * under the normal build).  Both therefore run exactly the same code path.
 *
 * Each check returns NULL when every invariant held, or a one-line
 * description of the first violation, written into why (caller-owned,
 * whylen bytes).  A crash, leak or sanitizer report is of course a violation
 * too; the checks do not catch those, the sanitizers do.
 */
#ifndef WP_FUZZ_CHECKS_H
#define WP_FUZZ_CHECKS_H

#include "wp_setup.h"

/* Sets the environment variables the config seeds reference (${APP_PW}, ...).  Idempotent. */
void wp_fuzz_init(void);

/*
 * Decodes data[0..size) as one wal2json message, then, when it holds '\n',
 * each line as one message through the same decoder (its per-table cache
 * carries over between messages, as in a replication session).
 */
const char *wp_fuzz_check_decoder(const uint8_t *data, size_t size, char *why, size_t whylen);

/* Parses data[0..size) (cut at its first NUL, as a C string) as a configuration file. */
const char *wp_fuzz_check_config(const uint8_t *data, size_t size, char *why, size_t whylen);

/*
 * True when s[0..len) is one JSON text that PostgreSQL 15's jsonb input
 * accepts: RFC 8259 grammar, valid UTF-8, no \u0000, no lone surrogate
 * escape, every number within numeric's limits.  Exposed for its own test.
 */
bool wp_fuzz_jsonb_accepts(const char *s, size_t len, char *why, size_t whylen);

#endif /* WP_FUZZ_CHECKS_H */
