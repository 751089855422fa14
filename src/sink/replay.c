/*
 * replay.c: `walpipe replay`: staged history delivered again through a sink's plugin.
 */
#include "wp_setup.h"

#include "log.h"
#include "sink.h"

int wp_replay_command(const wp_config_t *config, const wp_replay_opts_t *opts)
{
    (void)config;
    (void)opts;
    wp_error("replay is not available yet");
    return 1;
}
