/*
 * utf8.c: strict UTF-8 checks, clipping at character boundaries, scrubbing
 * (see utf8.h).
 *
 * Invariant: one definition of "valid" for the whole program, the one the
 * staging database applies (PostgreSQL's pg_utf8_islegal).
 */
#include "wp_setup.h"

#include <string.h>

#include "utf8.h"

size_t wp_utf8_char_len(const unsigned char *s, size_t len)
{
    if (len == 0)
        return 0;
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t more;
    unsigned char lo = 0x80, hi = 0xBF; /* range of the first continuation byte */
    if (c >= 0xC2 && c <= 0xDF) {
        more = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        more = 2;
        if (c == 0xE0)
            lo = 0xA0; /* overlong */
        else if (c == 0xED)
            hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        more = 3;
        if (c == 0xF0)
            lo = 0x90; /* overlong */
        else if (c == 0xF4)
            hi = 0x8F; /* above U+10FFFF */
    } else {
        return 0;
    }
    if (len - 1 < more || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t k = 2; k <= more; k++)
        if ((s[k] & 0xC0) != 0x80)
            return 0;
    return more + 1;
}

bool wp_utf8_valid(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint64_t w;
        if (len - i >= 8 && (memcpy(&w, s + i, 8), (w & UINT64_C(0x8080808080808080)) == 0)) {
            i += 8; /* eight ASCII bytes */
            continue;
        }
        size_t n = wp_utf8_char_len(s + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

size_t wp_utf8_clip(const char *s, size_t len, size_t max)
{
    if (len <= max)
        return len;
    size_t n = max;
    /* step back over continuation bytes to the start of the character that max cuts */
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

void wp_utf8_scrub(char *s, bool controls)
{
    unsigned char *p = (unsigned char *)s;
    size_t len = strlen(s);
    unsigned char *end = p + len;
    while (p < end) {
        size_t n = wp_utf8_char_len(p, (size_t)(end - p));
        if (n == 0) {
            *p++ = '?';
            continue;
        }
        if (n == 1 && controls && (*p < 0x20 || *p == 0x7f))
            *p = ' ';
        p += n;
    }
}
