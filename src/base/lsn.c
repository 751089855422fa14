/*
 * lsn.c: parsing and printing PostgreSQL log sequence numbers.
 *
 * Invariant: wp_lsn_parse accepts exactly the texts PostgreSQL prints
 * ("%X/%X": 1-8 hex digits, '/', 1-8 hex digits) plus their lower-case
 * spellings, reads no byte past len, and on failure never touches *out.
 */
#include "wp_setup.h"

#include <walpipe/lsn.h>

/*
 * Reads 1-8 hex digits from s[*pos..len) into *out and advances *pos past
 * them.  Returns false if there are none or more than 8.
 */
static bool parse_half(const char *s, size_t len, size_t *pos, uint32_t *out)
{
    uint32_t v = 0;
    size_t start = *pos;
    size_t i = start;

    while (i < len && wp_hexval((unsigned char)s[i]) >= 0) {
        if (i - start == 8)
            return false;
        v = (v << 4) | (uint32_t)wp_hexval((unsigned char)s[i]);
        i++;
    }
    if (i == start)
        return false;
    *pos = i;
    *out = v;
    return true;
}

bool wp_lsn_parse(const char *s, size_t len, wp_lsn_t *out)
{
    uint32_t hi, lo;
    size_t pos = 0;

    if (s == NULL)
        return false;
    if (!parse_half(s, len, &pos, &hi))
        return false;
    if (pos >= len || s[pos] != '/')
        return false;
    pos++;
    if (!parse_half(s, len, &pos, &lo))
        return false;
    if (pos != len)
        return false;
    *out = ((wp_lsn_t)hi << 32) | lo;
    return true;
}

char *wp_lsn_format(wp_lsn_t lsn, char buf[WP_LSN_STRLEN])
{
    /* "%X/%X" by hand: this runs for every staged row */
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (int half = 1; half >= 0; half--) {
        uint32_t v = (uint32_t)(lsn >> (32 * half));
        int shift = 28;
        while (shift > 0 && ((v >> shift) & 0xF) == 0)
            shift -= 4;
        for (; shift >= 0; shift -= 4)
            buf[n++] = hex[(v >> shift) & 0xF];
        if (half)
            buf[n++] = '/';
    }
    buf[n] = '\0';
    return buf;
}
