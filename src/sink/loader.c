/*
 * loader.c: finds, loads and checks a sink plugin.
 *
 * Job: dlopen walpipe_sink_<plugin>.so from the first directory that has it
 * (loader.h gives the order), check that it exports the ABI entry and speaks
 * WP_SINK_ABI_VERSION, and refuse a [sink NAME] key that neither the core nor
 * the plugin knows, naming the key, the section and the line.
 *
 * Invariant: a plugin is used only after every check passed; every refusal
 * names the file (or the directories searched) and the fix.
 */
#include "wp_setup.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loader.h"
#include "mem.h"

#ifndef WP_PLUGIN_INSTALL_DIR
#define WP_PLUGIN_INSTALL_DIR "/usr/local/lib/walpipe/plugins"
#endif

/* <dir of /proc/self/exe>/plugins into buf; false when it cannot be told. */
static bool exe_plugin_dir(char *buf, size_t size)
{
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return false;
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash == NULL)
        return false;
    *slash = '\0';
    return snprintf(buf, size, "%s/plugins", exe) < (int)size;
}

static bool plugin_has_key(const wp_sink_plugin_t *plugin, const char *key)
{
    for (const char *const *k = plugin->keys; k && *k; k++)
        if (strcmp(*k, key) == 0)
            return true;
    return false;
}

wp_plugin_t *wp_plugin_load(const wp_config_t *config, const wp_sink_config_t *sink, char *err, size_t errlen)
{
    const char *dirs[4];
    size_t ndirs = 0;
    char exedir[PATH_MAX];
    char file[PATH_MAX + 64];
    char searched[1024] = "";
    size_t used = 0;
    void *handle = NULL;
    wp_plugin_t *result = NULL;

    if (sink->plugin_dir)
        dirs[ndirs++] = sink->plugin_dir;
    if (getenv("WALPIPE_PLUGIN_DIR") && getenv("WALPIPE_PLUGIN_DIR")[0])
        dirs[ndirs++] = getenv("WALPIPE_PLUGIN_DIR");
    if (exe_plugin_dir(exedir, sizeof exedir))
        dirs[ndirs++] = exedir;
    dirs[ndirs++] = WP_PLUGIN_INSTALL_DIR;

    for (size_t i = 0; i < ndirs && handle == NULL; i++) {
        snprintf(file, sizeof file, "%s/walpipe_sink_%s.so", dirs[i], sink->plugin);
        int n = snprintf(searched + used, sizeof searched - used, "%s%s", used ? ", " : "", dirs[i]);
        if (n > 0 && (size_t)n < sizeof searched - used)
            used += (size_t)n;
        if (access(file, F_OK) != 0)
            continue;
        handle = dlopen(file, RTLD_NOW | RTLD_LOCAL);
        if (handle == NULL) {
            snprintf(err, errlen, "[sink %s]: could not load plugin %s: %s; rebuild it (cmake --build build) or fix "
                     "its libraries", sink->name, file, dlerror());
            goto out;
        }
    }
    if (handle == NULL) {
        snprintf(err, errlen, "[sink %s]: no plugin \"%s\" (walpipe_sink_%s.so) in %s; build it (plugins/%s/, "
                 "cmake --build build), or point plugin_dir or WALPIPE_PLUGIN_DIR at the directory that has it",
                 sink->name, sink->plugin, sink->plugin, searched, sink->plugin);
        goto out;
    }
    wp_sink_entry_fn entry;
    *(void **)&entry = dlsym(handle, WP_SINK_ENTRY_SYMBOL);
    const wp_sink_plugin_t *plugin = entry ? entry() : NULL;
    if (plugin == NULL) {
        snprintf(err, errlen, "[sink %s]: %s is not a walpipe sink plugin (no %s() entry, or it returned NULL)",
                 sink->name, file, WP_SINK_ENTRY_SYMBOL);
        goto out;
    }
    if (plugin->abi_version != WP_SINK_ABI_VERSION) {
        snprintf(err, errlen, "[sink %s]: plugin %s speaks sink ABI version %u, this walpipe version %d; rebuild the "
                 "plugin against this walpipe's include/walpipe/sink.h", sink->name, file, plugin->abi_version,
                 WP_SINK_ABI_VERSION);
        goto out;
    }
    if (!plugin->open || !plugin->deliver || !plugin->poll || !plugin->flush || !plugin->close) {
        snprintf(err, errlen, "[sink %s]: plugin %s lacks one of open, deliver, poll, flush, close", sink->name, file);
        goto out;
    }
    for (size_t i = 0; i < sink->nkeys; i++) {
        if (plugin_has_key(plugin, sink->keys[i].key))
            continue;
        char valid[512] = "plugin, sources, tables, batch_events, plugin_dir";
        size_t vlen = strlen(valid);
        for (const char *const *k = plugin->keys; k && *k && vlen < sizeof valid; k++) {
            int n = snprintf(valid + vlen, sizeof valid - vlen, ", %s", *k);
            vlen += n > 0 ? (size_t)n : 0;
        }
        snprintf(err, errlen, "%s:%d: unknown key \"%s\" in [sink %s] (plugin %s); valid keys are: %s",
                 config->path ? config->path : "config", sink->keys[i].line, sink->keys[i].key, sink->name,
                 sink->plugin, valid);
        goto out;
    }
    result = wp_calloc(1, sizeof *result);
    result->handle = handle;
    result->plugin = plugin;
    result->path = wp_strdup(file);
    handle = NULL;
out:
    if (handle)
        dlclose(handle);
    return result;
}

void wp_plugin_unload(wp_plugin_t *plugin)
{
    if (plugin == NULL)
        return;
    dlclose(plugin->handle);
    free(plugin->path);
    free(plugin);
}
