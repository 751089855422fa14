/*
 * config.h: the walpipe configuration file (INI, parsed with libinih).
 *
 *   [walpipe]            optional: log_level, log_format
 *   [staging]            conninfo, batch_rows, batch_bytes, batch_ms, payload_gin_index, partitions_ahead
 *   [source NAME]        conninfo, slot, tables, status_interval_ms, snapshot, snapshot_workers,
 *                        exclude_tables, mask_salt (any number of sections)
 *   [table SOURCE.SCHEMA.TABLE]  optional, any number: include_columns | exclude_columns, mask
 *                        (column filters and masks of one captured table; see filter.h)
 *   [workers]            optional: count, claim_size, mirror_schema, mirror_table, max_attempts, retry_backoff_ms, resync
 *   [metrics]            optional: listen (PORT or HOST:PORT; a bare port listens on 127.0.0.1)
 *   [source NAME] also:  max_lag_bytes, max_lag_seconds, max_stall_seconds, min_safe_wal_size (lag guard)
 *   [sink NAME]          optional, any number: plugin (required), sources, tables, batch_events, plugin_dir,
 *                        and the plugin's own keys (kept as text, checked against the plugin's list when
 *                        the sink starts: src/sink/loader.c)
 *
 * Values may reference the environment as ${VAR}; an unset variable is an
 * error.  Unknown sections and keys are errors.  Every error names the file
 * and line and says what to change.  The loaded configuration is immutable.
 *
 * tables = public.orders, "My Schema"."Weird, Table", public."Orders"
 *   Each entry is schema.table.  Double-quote a name that holds dots, commas,
 *   spaces or quotes ("" inside quotes is one quote).  Names are taken as
 *   written, unquoted ones too: case is kept, not folded to lower case as SQL
 *   would, because wal2json matches table names case-sensitively.
 *
 * [table SOURCE.SCHEMA.TABLE] names one table of [source SOURCE] (schema and
 * table quoted as in tables); include_columns / exclude_columns list column
 * names the same way (one name each, no schema); mask = col:kind, ... with
 * kind sha256 (needs the source's mask_salt), redact or null.  Rules on key
 * columns are refused at start (base/filter.c), as keys live in the
 * source's catalog.
 *
 * Lines may be at most 199 characters (libinih's limit); put longer values
 * in an environment variable.  " ;" starts a comment, even inside a value.
 */
#ifndef WP_CONFIG_H
#define WP_CONFIG_H

#include "wp_setup.h"

typedef struct wp_table_ref {
    char *schema; /* unquoted identifier, case kept */
    char *table;
} wp_table_ref_t;

/* How a masked column's values are replaced (README "Filters and masking"); NULL stays NULL. */
typedef enum wp_mask_kind {
    WP_MASK_SHA256 = 0, /* hex SHA-256 of mask_salt || the value's text; staged as text */
    WP_MASK_REDACT,     /* the text "***"; staged as text */
    WP_MASK_NULL,       /* NULL; the column keeps its type */
} wp_mask_kind_t;

typedef struct wp_column_mask {
    char *column; /* as written, case kept */
    wp_mask_kind_t kind;
} wp_column_mask_t;

/* [table SOURCE.SCHEMA.TABLE]: what of one table's columns is staged.  Column names are taken as written. */
typedef struct wp_table_rule {
    char *schema;
    char *table;
    char **include; /* include_columns: only these are staged; NULL = all */
    size_t ninclude;
    char **exclude; /* exclude_columns: these are never staged */
    size_t nexclude;
    wp_column_mask_t *masks; /* mask = col:sha256|redact|null, ... */
    size_t nmasks;
    int line; /* line of the section header */
} wp_table_rule_t;

typedef struct wp_source_config {
    char *name;     /* section name: [source NAME]; [A-Za-z0-9_-], unique */
    char *conninfo; /* libpq conninfo; may hold a password: never log it */
    char *slot;     /* default "walpipe_<name>" lower-cased, with '-' turned into '_' */
    wp_table_ref_t *tables; /* include list (wal2json add-tables); NULL = all */
    size_t ntables;
    int status_interval_ms; /* feedback timer; default 1000 */
    bool snapshot_initial;  /* snapshot = initial (default) | never: copy existing rows when walpipe creates the slot */
    int snapshot_workers;   /* connections copying a snapshot in parallel; default 2 */
    size_t max_lag_bytes;   /* lag guard: warn when the slot retains more WAL (current - restart_lsn); default 1GB */
    int max_lag_seconds;    /* lag guard: warn when staging is this far behind the source's commits; default 300 */
    int max_stall_seconds;  /* lag guard: warn when confirmed_flush_lsn stands still this long while the source
                               writes; default 300 */
    size_t min_safe_wal_size; /* lag guard: warn when the slot's safe_wal_size drops below; default 1GB */
    int line;               /* line of the section header, for messages */
    wp_table_ref_t *exclude_tables; /* exclude_tables (wal2json filter-tables); NULL = none */
    size_t nexclude_tables;
    char *mask_salt;        /* salt of sha256 masks; a secret: never logged; NULL = unset */
    wp_table_rule_t *rules; /* the [table NAME.*.*] sections of this source */
    size_t nrules;
} wp_source_config_t;

/* One key = value of a [sink NAME] section that is the plugin's, not the core's (host->config_get). */
typedef struct wp_sink_key {
    char *key;
    char *value; /* after ${VAR} expansion; may be a secret: never logged */
    int line;
} wp_sink_key_t;

/* [sink NAME]: a consumer of raw_events with its own position, fed to a plugin (include/walpipe/sink.h). */
typedef struct wp_sink_config {
    char *name;             /* section name; [A-Za-z0-9_-], unique among sinks */
    char *plugin;           /* plugin = NAME: loads walpipe_sink_NAME.so; [A-Za-z0-9_] */
    char **sources;         /* sources = a, b: names of [source] sections; NULL = every source */
    size_t nsources;
    wp_table_ref_t *tables; /* tables = schema.table, ...: only these tables' events; NULL = all */
    size_t ntables;
    int batch_events;       /* events read from staging and delivered per batch; default 1000 */
    char *plugin_dir;       /* where walpipe_sink_NAME.so is looked for first; NULL = not set */
    wp_sink_key_t *keys;    /* every other key, for the plugin */
    size_t nkeys;
    int line;               /* line of the section header */
} wp_sink_config_t;

typedef enum wp_log_level {
    WP_LOG_DEBUG = 0,
    WP_LOG_INFO = 1,
    WP_LOG_WARNING = 2,
    WP_LOG_ERROR = 3,
} wp_log_level_t;

typedef enum wp_log_format {
    WP_LOG_FORMAT_TEXT = 0, /* "TIME LEVEL [component] message" */
    WP_LOG_FORMAT_JSON = 1, /* one JSON object per line: time, level, component, message */
} wp_log_format_t;

typedef struct wp_config {
    char *path;
    wp_log_level_t log_level;     /* [walpipe] log_level = debug|info|warning|error; default info */
    wp_log_format_t log_format;   /* [walpipe] log_format = text|json; default text */
    char *staging_conninfo;       /* required */
    int batch_rows;               /* default 10000 */
    size_t batch_bytes;           /* default 8MB; accepts kB/MB/GB suffixes */
    int batch_ms;                 /* default 50 */
    bool payload_gin_index;       /* default false */
    int partitions_ahead;         /* daily partitions created ahead; default 7 */
    int workers;                  /* [workers] count: transform workers `run` starts; default 1, 0 = none */
    int claim_size;               /* events a worker claims per transaction; default 1000 */
    char *mirror_schema;          /* schema of the mirror tables; default "analytics" */
    char *mirror_table;           /* mirror table name pattern; default "{schema}_{table}" */
    int max_attempts;             /* automatic apply attempts before a dead letter is parked; default 5 */
    int retry_backoff_ms;         /* delay before the first retry, doubled per attempt; default 1000 */
    bool resync_auto;             /* resync = auto (default): `run` re-snapshots a diverged mirror's table | off */
    char *metrics_listen;         /* [metrics] listen: address of the Prometheus /metrics listener; NULL = off */
    wp_source_config_t *sources;
    size_t nsources;
    wp_sink_config_t *sinks;      /* [sink NAME] sections, in file order */
    size_t nsinks;
} wp_config_t;

/*
 * Loads and validates the file at path.  Returns a new configuration the
 * caller frees with wp_config_destroy, or NULL with "file:line: problem; fix"
 * written into errbuf: one printable line (quoted control characters become
 * ' ', bytes that are not valid UTF-8 become '?').
 */
wp_config_t *wp_config_load(const char *path, char *errbuf, size_t errlen);

/* As wp_config_load, on text held in memory; name is used in messages. */
wp_config_t *wp_config_parse_string(const char *text, const char *name, char *errbuf, size_t errlen);

/* Frees everything; NULL is a no-op. */
void wp_config_destroy(wp_config_t *config);

/*
 * Parses a `tables` list ("schema.table, ...", same syntax as the key) given
 * outside the file, e.g. on the command line.  Returns 0 and a new array the
 * caller frees with wp_config_free_tables, or -1 with the problem in errbuf.
 */
int wp_config_parse_tables(const char *text, wp_table_ref_t **tables, size_t *ntables, char *errbuf, size_t errlen);
void wp_config_free_tables(wp_table_ref_t *tables, size_t ntables);

/*
 * Returns a copy of conninfo safe to log: host, port, dbname and user only
 * (never password or other keys).  Caller frees.
 */
char *wp_config_conninfo_redacted(const char *conninfo);

/*
 * Splits a [metrics] listen value: "9187" (host 127.0.0.1), "HOST:9187" or
 * "[::1]:9187" (numeric addresses only).  Returns 0, or -1 if malformed.
 */
int wp_config_parse_listen(const char *value, char *host, size_t hostlen, int *port);

#endif /* WP_CONFIG_H */
