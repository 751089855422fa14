/*
 * walpipe/walpipe.h: version and process-wide constants shared by the
 * daemon, its tests and plugins.
 */
#ifndef WALPIPE_WALPIPE_H
#define WALPIPE_WALPIPE_H

#define WALPIPE_VERSION "0.1.0"

/* Exit codes of the walpipe command. */
#define WP_EXIT_OK 0     /* done, or stopped by SIGTERM/SIGINT after a clean flush */
#define WP_EXIT_FATAL 1  /* a source or staging hit an error that retrying cannot fix */
#define WP_EXIT_CONFIG 2 /* bad command line or configuration file */

#endif /* WALPIPE_WALPIPE_H */
