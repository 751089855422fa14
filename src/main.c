/*
 * main.c: the walpipe command: argument parsing, signals, lifecycle.
 *
 *   walpipe run  --config FILE   stream every configured source into staging (and run the workers)
 *   walpipe init --config FILE   create or upgrade the staging schema
 *   walpipe work --config FILE   transform workers only, against the same staging database
 *   walpipe dlq list|retry|drop [--id N]... [--all] --config FILE
 *   walpipe verify --config FILE [--source S] [--table T]... [--resync]
 *   walpipe status --config FILE [--json] [--watch SECONDS]
 *   walpipe check --config FILE [--json]
 *   walpipe sink --config FILE [--sink NAME]
 *   walpipe replay --config FILE (--sink NAME | --mirror) --source S (--from LSN | --from-time TS) [--to LSN]
 *                  [--table T]...
 *
 * Signal handlers only call wp_stop_request(); each source notices it within
 * one poll interval, commits the batch in hand, acknowledges it and exits.
 */
#include "wp_setup.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <walpipe/lsn.h>
#include <walpipe/walpipe.h>

#include "check.h"
#include "config.h"
#include "dlq.h"
#include "exporter.h"
#include "lagguard.h"
#include "log.h"
#include "mem.h"
#include "migrate.h"
#include "pipeline.h"
#include "resync.h"
#include "sink.h"
#include "metrics.h"
#include "snapshot.h"
#include "source.h"
#include "status.h"
#include "verify.h"
#include "worker.h"

static void usage(FILE *out)
{
    fprintf(out,
            "walpipe %s: change data capture from PostgreSQL (wal2json) into a staging table, exactly once\n"
            "\n"
            "Usage:\n"
            "  walpipe run  --config FILE [--accept-gap SOURCE]...\n"
            "                               stream every [source] into walpipe.raw_events until SIGTERM/SIGINT;\n"
            "                               --accept-gap: where staging's checkpoint and the slot disagree (slot\n"
            "                               ahead, dropped or recreated), record the gap and go on instead of refusing\n"
            "  walpipe init --config FILE   create or upgrade the staging schema (idempotent)\n"
            "  walpipe snapshot --config FILE --source NAME [--table SCHEMA.TABLE]...\n"
            "                               resync a source's tables (default: its `tables`, or all): a truncate,\n"
            "                               then their current rows as 'snapshot' events, while `run` keeps streaming\n"
            "  walpipe work --config FILE [--workers N]\n"
            "                               transform workers only: apply raw_events to the mirror tables\n"
            "  walpipe dlq list|retry|drop [--id N]... [--all] --config FILE\n"
            "                               show, retry or drop dead letters (events that could not be applied)\n"
            "  walpipe verify --config FILE [--source NAME] [--table SCHEMA.TABLE]... [--resync]\n"
            "                [--range-rows N] [--wait SECONDS] [--json]\n"
            "                               compare each mirror with its source table by checksums over key ranges,\n"
            "                               at one source position the mirror has reached; exit 0 all equal, 1 not;\n"
            "                               --resync: re-snapshot the tables that differ and verify them again\n"
            "  walpipe status --config FILE [--json] [--watch SECONDS]\n"
            "                               every source's slot, lag, staged events and snapshot, the consumers'\n"
            "                               backlog, dead letters, diverged mirrors and staging; read only; exit 0\n"
            "                               when staging and every source answered, 1 when one did not\n"
            "  walpipe check --config FILE [--json]\n"
            "                               the production checklist: every source and staging, one line per check\n"
            "                               (pass, warn or fail, and the fix); exit 0 when nothing fails, 1 otherwise\n"
            "  walpipe sink --config FILE [--sink NAME]\n"
            "                               the [sink] sections only (all, or NAME): deliver staged events to their\n"
            "                               plugins (`run` runs them too)\n"
            "  walpipe replay --config FILE (--sink NAME | --mirror) --source S (--from LSN | --from-time TS)\n"
            "                [--to LSN] [--table SCHEMA.TABLE]...\n"
            "                               deliver a staged range again, in order, through the sink's plugin (as a\n"
            "                               replay; the sink's position does not move), or with --mirror hand it to\n"
            "                               the transform workers to apply to the mirrors again\n"
            "  walpipe --help | --version\n"
            "\n"
            "Exit status: 0 stopped cleanly, 1 a source, staging or a sink needs a fix (see the log), 2 bad usage or\n"
            "config.\n"
            "Configuration reference: README.md, section \"Configuration\".\n",
            WALPIPE_VERSION);
}

static void on_stop_signal(int sig)
{
    (void)sig;
    wp_stop_request();
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* True if name is among the --accept-gap arguments. */
static bool listed(const char *name, const char *const *names, int n)
{
    for (int i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return true;
    return false;
}

static int cmd_run(wp_config_t *config, const char *const *accept_gap, int naccept_gap)
{
    int rc = WP_EXIT_OK;
    bool failed;
    /* plugins first: a sink that cannot load (no plugin, a key it does not know) is a configuration error */
    wp_sinks_t *sinks = wp_sinks_start(config, NULL);
    if (sinks == NULL)
        return WP_EXIT_CONFIG;
    wp_exporter_t *exporter = wp_exporter_start(config, &failed);
    if (failed) {
        wp_stop_request();
        wp_sinks_stop(sinks);
        return WP_EXIT_FATAL;
    }
    wp_source_t **sources = wp_calloc(config->nsources, sizeof *sources);
    wp_info("walpipe %s starting with %zu source(s)", WALPIPE_VERSION, config->nsources);
    wp_lagguard_t *guard = wp_lagguard_start(config, true);
    for (size_t i = 0; i < config->nsources; i++) {
        char *where = wp_config_conninfo_redacted(config->sources[i].conninfo);
        wp_info("source \"%s\": %s, slot \"%s\"", config->sources[i].name, where, config->sources[i].slot);
        free(where);
        sources[i] = wp_source_start(config, &config->sources[i],
                                     listed(config->sources[i].name, accept_gap, naccept_gap));
        if (sources[i] == NULL)
            rc = WP_EXIT_FATAL;
    }
    wp_workers_t *workers = wp_workers_start(config, config->workers, true);
    /* beside the sources' readers and stagers: a resync never holds up streaming */
    wp_resyncer_t *resyncer = wp_resyncer_start(config);
    for (size_t i = 0; i < config->nsources; i++) {
        if (sources[i] && wp_source_join(sources[i]) != 0)
            rc = WP_EXIT_FATAL;
    }
    wp_stop_request(); /* a source that ended on a fatal error ends the resyncer too */
    wp_resyncer_stop(resyncer);
    wp_workers_stop(workers);
    if (wp_sinks_stop(sinks) != 0) /* after the sources: each flushes and saves its position */
        rc = WP_EXIT_FATAL;            /* a sink that stopped on a fatal error needs a fix too */
    wp_lagguard_stop(guard);
    wp_exporter_stop(exporter);
    free(sources);
    wp_info("walpipe stopped%s", rc == WP_EXIT_OK ? "" : " after an error");
    return rc;
}

static int cmd_work(wp_config_t *config, int workers)
{
    if (workers <= 0)
        workers = config->workers > 0 ? config->workers : 1;
    bool failed;
    /* `work` may share its config (and so the port) with a `run` on the same machine: metrics are then its loss */
    wp_exporter_t *exporter = wp_exporter_start(config, &failed);
    if (failed)
        wp_warn("walpipe work goes on without metrics; give it a config of its own with another [metrics] listen");
    wp_info("walpipe %s starting %d transform worker(s)", WALPIPE_VERSION, workers);
    wp_lagguard_t *guard = wp_lagguard_start(config, false); /* staging's gauges: backlog, dead letters */
    wp_workers_t *pool = wp_workers_start(config, workers, false);
    wp_workers_wait(pool);
    int rc = wp_workers_stop(pool) == 0 ? WP_EXIT_OK : WP_EXIT_FATAL;
    wp_lagguard_stop(guard);
    wp_exporter_stop(exporter);
    wp_info("walpipe stopped%s", rc == WP_EXIT_OK ? "" : " after an error");
    return rc;
}

static int cmd_sink(wp_config_t *config, const char *only)
{
    if (config->nsinks == 0) {
        fprintf(stderr, "walpipe: %s has no [sink NAME] section\n", config->path);
        return WP_EXIT_CONFIG;
    }
    bool found = only == NULL;
    for (size_t i = 0; i < config->nsinks && !found; i++)
        found = strcmp(config->sinks[i].name, only) == 0;
    if (!found) {
        fprintf(stderr, "walpipe: %s has no [sink %s] section\n", config->path, only);
        return WP_EXIT_CONFIG;
    }
    bool failed;
    wp_exporter_t *exporter = wp_exporter_start(config, &failed);
    if (failed)
        wp_warn("walpipe sink goes on without metrics; give it a config of its own with another [metrics] listen");
    wp_info("walpipe %s starting sinks", WALPIPE_VERSION);
    wp_sinks_t *sinks = wp_sinks_start(config, only);
    if (sinks == NULL) {
        wp_exporter_stop(exporter);
        return WP_EXIT_CONFIG;
    }
    wp_sinks_wait(sinks);
    int rc = wp_sinks_stop(sinks) == 0 ? WP_EXIT_OK : WP_EXIT_FATAL;
    wp_exporter_stop(exporter);
    wp_info("walpipe stopped%s", rc == WP_EXIT_OK ? "" : " after an error");
    return rc;
}

/* Parses a positive integer argument of option opt; false after printing why not. */
static bool parse_count(const char *opt, const char *s, long long max, long long *out)
{
    char *end;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 1 || v > max) {
        fprintf(stderr, "walpipe: %s needs a number from 1 to %lld (got \"%s\")\n", opt, max, s);
        return false;
    }
    *out = v;
    return true;
}

int main(int argc, char **argv)
{
    int rc = WP_EXIT_CONFIG;
    const char *command = NULL, *config_path = NULL, *action = NULL;
    wp_config_t *config = NULL;
    char err[WP_ERRLEN];
    const char **accept_gap = wp_calloc((size_t)argc, sizeof *accept_gap);
    int naccept_gap = 0;
    const char **tables = wp_calloc((size_t)argc, sizeof *tables);
    int ntables = 0;
    const char *source_name = NULL;
    const char *sink_name = NULL, *from = NULL, *from_time = NULL, *to = NULL;
    bool replay_mirror = false;

    /* first thing: a SIGTERM that arrives while the configuration loads still means "stop cleanly" */
    install_signals();
    int64_t *ids = wp_calloc((size_t)argc, sizeof *ids);
    size_t nids = 0;
    bool all = false;
    long long workers = 0;
    bool resync = false, json = false;
    long long range_rows = 10000, wait_seconds = 300, watch_seconds = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            rc = WP_EXIT_OK;
            goto out;
        } else if (strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-V") == 0) {
            printf("walpipe %s\n", WALPIPE_VERSION);
            rc = WP_EXIT_OK;
            goto out;
        } else if (strcmp(argv[i], "--config") == 0 || strcmp(argv[i], "-c") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "walpipe: %s needs a file name\n", argv[i]);
                goto out;
            }
            config_path = argv[++i];
        } else if (strncmp(argv[i], "--config=", 9) == 0) {
            config_path = argv[i] + 9;
        } else if (strcmp(argv[i], "--accept-gap") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "walpipe: --accept-gap needs a source name\n");
                goto out;
            }
            accept_gap[naccept_gap++] = argv[++i];
        } else if (strcmp(argv[i], "--sink") == 0 || strcmp(argv[i], "--from") == 0 ||
                   strcmp(argv[i], "--from-time") == 0 || strcmp(argv[i], "--to") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "walpipe: %s needs a value\n", argv[i]);
                goto out;
            }
            const char **slot = strcmp(argv[i], "--sink") == 0        ? &sink_name
                                : strcmp(argv[i], "--from") == 0      ? &from
                                : strcmp(argv[i], "--from-time") == 0 ? &from_time
                                                                      : &to;
            *slot = argv[++i];
        } else if (strcmp(argv[i], "--mirror") == 0) {
            replay_mirror = true;
        } else if (strcmp(argv[i], "--source") == 0 || strcmp(argv[i], "--table") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "walpipe: %s needs a name\n", argv[i]);
                goto out;
            }
            if (strcmp(argv[i], "--source") == 0)
                source_name = argv[++i];
            else
                tables[ntables++] = argv[++i];
        } else if ((strcmp(argv[i], "--id") == 0 || strcmp(argv[i], "--workers") == 0) && i + 1 < argc) {
            long long v;
            if (!parse_count(argv[i], argv[i + 1], argv[i][2] == 'i' ? INT64_MAX : 64, &v))
                goto out;
            if (argv[i][2] == 'i')
                ids[nids++] = v;
            else
                workers = v;
            i++;
        } else if ((strcmp(argv[i], "--range-rows") == 0 || strcmp(argv[i], "--wait") == 0) && i + 1 < argc) {
            if (!parse_count(argv[i], argv[i + 1], argv[i][2] == 'r' ? 100000000 : 86400,
                             argv[i][2] == 'r' ? &range_rows : &wait_seconds))
                goto out;
            i++;
        } else if (strcmp(argv[i], "--watch") == 0 && i + 1 < argc) {
            if (!parse_count(argv[i], argv[i + 1], 86400, &watch_seconds))
                goto out;
            i++;
        } else if (strcmp(argv[i], "--resync") == 0) {
            resync = true;
        } else if (strcmp(argv[i], "--json") == 0) {
            json = true;
        } else if (strcmp(argv[i], "--all") == 0) {
            all = true;
        } else if (argv[i][0] != '-' && command == NULL) {
            command = argv[i];
        } else if (argv[i][0] != '-' && command && strcmp(command, "dlq") == 0 && action == NULL) {
            action = argv[i];
        } else {
            fprintf(stderr, "walpipe: unknown argument \"%s\"; try walpipe --help\n", argv[i]);
            goto out;
        }
    }
    if (command == NULL ||
        (strcmp(command, "run") != 0 && strcmp(command, "init") != 0 && strcmp(command, "snapshot") != 0 &&
         strcmp(command, "work") != 0 && strcmp(command, "dlq") != 0 && strcmp(command, "verify") != 0 &&
         strcmp(command, "status") != 0 && strcmp(command, "check") != 0 && strcmp(command, "sink") != 0 &&
         strcmp(command, "replay") != 0)) {
        if (command)
            fprintf(stderr, "walpipe: unknown command \"%s\"\n", command);
        usage(stderr);
        goto out;
    }
    if (strcmp(command, "snapshot") == 0 && source_name == NULL) {
        fprintf(stderr, "walpipe: snapshot needs --source NAME\n");
        goto out;
    }
    if ((source_name || ntables) && strcmp(command, "snapshot") != 0 && strcmp(command, "verify") != 0 &&
        strcmp(command, "replay") != 0) {
        fprintf(stderr, "walpipe: --source and --table go with the snapshot, verify and replay commands\n");
        goto out;
    }
    if (sink_name && strcmp(command, "sink") != 0 && strcmp(command, "replay") != 0) {
        fprintf(stderr, "walpipe: --sink goes with the sink and replay commands\n");
        goto out;
    }
    if ((from || from_time || to) && strcmp(command, "replay") != 0) {
        fprintf(stderr, "walpipe: --from, --from-time and --to go with the replay command\n");
        goto out;
    }
    if (replay_mirror && strcmp(command, "replay") != 0) {
        fprintf(stderr, "walpipe: --mirror goes with the replay command\n");
        goto out;
    }
    wp_replay_opts_t ro = {.sink = sink_name, .source = source_name, .from_time = from_time,
                           .tables = tables, .ntables = ntables, .mirror = replay_mirror};
    if (strcmp(command, "replay") == 0) {
        if ((sink_name == NULL) == !replay_mirror || source_name == NULL || (from == NULL) == (from_time == NULL)) {
            fprintf(stderr, "walpipe: replay needs one of --sink NAME or --mirror, --source NAME and one of --from LSN "
                            "or --from-time TIMESTAMP\n");
            goto out;
        }
        if ((from && !wp_lsn_parse(from, strlen(from), &ro.from)) || (to && !wp_lsn_parse(to, strlen(to), &ro.to))) {
            fprintf(stderr, "walpipe: --from and --to need an LSN like 0/16B3748 (got \"%s\")\n",
                    from && !wp_lsn_parse(from, strlen(from), &ro.from) ? from : to);
            goto out;
        }
    }
    if (resync && strcmp(command, "verify") != 0) {
        fprintf(stderr, "walpipe: --resync goes with the verify command\n");
        goto out;
    }
    if (json && strcmp(command, "verify") != 0 && strcmp(command, "check") != 0 &&
        strcmp(command, "status") != 0) {
        fprintf(stderr, "walpipe: --json goes with the verify, check and status commands\n");
        goto out;
    }
    if (watch_seconds && strcmp(command, "status") != 0) {
        fprintf(stderr, "walpipe: --watch goes with the status command\n");
        goto out;
    }
    if (config_path == NULL) {
        fprintf(stderr, "walpipe: %s needs --config FILE\n", command);
        goto out;
    }
    config = wp_config_load(config_path, err, sizeof err);
    if (config == NULL) {
        fprintf(stderr, "walpipe: %s\n", err);
        goto out;
    }
    for (int i = 0; i < naccept_gap; i++) {
        bool known = false;
        for (size_t k = 0; k < config->nsources; k++)
            known = known || strcmp(config->sources[k].name, accept_gap[i]) == 0;
        if (!known) {
            fprintf(stderr, "walpipe: --accept-gap names source \"%s\", which %s does not configure\n", accept_gap[i],
                    config_path);
            goto out;
        }
    }
    wp_log_set_level(config->log_level);
    wp_log_set_format(config->log_format);
    if (strcmp(command, "init") == 0)
        rc = wp_migrate_apply(config) == 0 ? WP_EXIT_OK : WP_EXIT_FATAL;
    else if (strcmp(command, "snapshot") == 0)
        rc = wp_snapshot_command(config, source_name, tables, ntables);
    else if (strcmp(command, "work") == 0)
        rc = cmd_work(config, (int)workers);
    else if (strcmp(command, "status") == 0)
        rc = wp_status_command(config, json, (long)watch_seconds);
    else if (strcmp(command, "dlq") == 0)
        rc = wp_dlq_command(config, action, ids, nids, all);
    else if (strcmp(command, "verify") == 0) {
        wp_verify_opts_t vo = {.source = source_name,
                               .tables = tables,
                               .ntables = ntables,
                               .resync = resync,
                               .json = json,
                               .range_rows = (long)range_rows,
                               .wait_seconds = (long)wait_seconds};
        rc = wp_verify_command(config, &vo);
    } else if (strcmp(command, "check") == 0)
        rc = wp_check_command(config, json);
    else if (strcmp(command, "sink") == 0)
        rc = cmd_sink(config, sink_name);
    else if (strcmp(command, "replay") == 0)
        rc = wp_replay_command(config, &ro);
    else
        rc = cmd_run(config, accept_gap, naccept_gap);
out:
    wp_metrics_reset();
    free(ids);
    wp_config_destroy(config);
    free(accept_gap);
    free(tables);
    return rc;
}
