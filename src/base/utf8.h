/*
 * utf8.h: UTF-8 as PostgreSQL accepts it (shortest forms only, no UTF-16
 * surrogates, nothing above U+10FFFF), for every text walpipe writes.
 *
 * Invariant: what wp_utf8_clip and wp_utf8_scrub leave behind is valid UTF-8
 * by construction, so a reason, a log line or a dead letter cut to a size can
 * never be refused by the staging database for its encoding.
 */
#ifndef WP_UTF8_H
#define WP_UTF8_H

#include "wp_setup.h"

/* The length (1-4) of the valid character that starts s[0..len), or 0 if none starts there (len 0 too). */
size_t wp_utf8_char_len(const unsigned char *s, size_t len);

/* True when s[0..len) is valid UTF-8 (NUL bytes count as valid here). */
bool wp_utf8_valid(const unsigned char *s, size_t len);

/*
 * The length of the longest prefix of s[0..len), at most max bytes, that
 * ends on a character boundary.  s must be valid UTF-8; then the prefix is too.
 */
size_t wp_utf8_clip(const char *s, size_t len, size_t max);

/*
 * Makes the NUL-terminated s valid UTF-8 in place: each byte that does not
 * start a valid character becomes '?'; with controls, each ASCII control
 * character (and DEL) becomes ' ' as well.  Never changes the length.
 */
void wp_utf8_scrub(char *s, bool controls);

#endif /* WP_UTF8_H */
