/*
 * walpipe/lsn.h: PostgreSQL log sequence numbers as a value type.
 *
 * An LSN is a 64-bit WAL position, written "X/Y" in hex (high and low 32
 * bits).  0 (written 0/0) is InvalidXLogRecPtr: "no position".
 */
#ifndef WALPIPE_LSN_H
#define WALPIPE_LSN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint64_t wp_lsn_t;

#define WP_LSN_INVALID ((wp_lsn_t)0)
/* Enough for "FFFFFFFF/FFFFFFFF" plus NUL. */
#define WP_LSN_STRLEN 18

/*
 * Parses "X/Y" (1-8 hex digits each side, nothing else).  len is the number
 * of bytes to read from s (the text need not be NUL-terminated).  Returns
 * true and sets *out on success; false leaves *out untouched.
 */
bool wp_lsn_parse(const char *s, size_t len, wp_lsn_t *out);

/* Writes "X/Y" (upper-case hex, as PostgreSQL prints it) into buf; returns buf. */
char *wp_lsn_format(wp_lsn_t lsn, char buf[WP_LSN_STRLEN]);

#endif /* WALPIPE_LSN_H */
