/*
 * loader.h: finds, loads and checks a sink plugin (include/walpipe/sink.h).
 *
 * walpipe_sink_<plugin>.so is looked for, in order, in: the sink's
 * plugin_dir key, $WALPIPE_PLUGIN_DIR, <the walpipe executable's
 * directory>/plugins, and WP_PLUGIN_INSTALL_DIR (compiled in).
 */
#ifndef WP_SINK_LOADER_H
#define WP_SINK_LOADER_H

#include "wp_setup.h"

#include <walpipe/sink.h>

#include "config.h"

typedef struct wp_plugin {
    void *handle;                   /* dlopen's; owned */
    const wp_sink_plugin_t *plugin; /* the plugin's table, valid while handle is open */
    char *path;                     /* the file it was loaded from; owned */
} wp_plugin_t;

/*
 * Loads sink's plugin, checks its ABI version and every plugin key of the
 * [sink NAME] section against the plugin's list.  Returns a plugin the
 * caller frees with wp_plugin_unload, or NULL with one line in err saying
 * what is wrong and the fix (logs nothing).
 */
wp_plugin_t *wp_plugin_load(const wp_config_t *config, const wp_sink_config_t *sink, char *err, size_t errlen);

/* Closes the library; NULL is a no-op. */
void wp_plugin_unload(wp_plugin_t *plugin);

#endif /* WP_SINK_LOADER_H */
