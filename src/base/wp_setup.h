/*
 * wp_setup.h: the first include of every walpipe source file.
 *
 * Feature macros, the standard integer/bool headers and the few attribute
 * macros every module uses, and one tiny inline helper.  Nothing here
 * allocates or has state.
 */
#ifndef WP_SETUP_H
#define WP_SETUP_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define WP_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#define WP_NORETURN __attribute__((noreturn))
#define WP_UNUSED __attribute__((unused))

/* Unit tests compile some file-local helpers with external linkage. */
#ifdef WP_UNIT_TEST
#define WP_STATIC
#else
#define WP_STATIC static
#endif

#define WP_ERRLEN 512

/* The value of hex digit c, or -1 (LSNs, \u escapes, bytea hex). */
static inline int wp_hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

#endif /* WP_SETUP_H */
