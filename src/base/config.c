/*
 * config.c: loads the INI configuration file into an immutable wp_config_t.
 *
 * libinih splits lines into comments, section headers and key = value
 * pairs, but this module hands it the lines itself (read_line_cb) instead
 * of letting ini_parse read the file.  That is how it knows the line of
 * every key without INI_HANDLER_LINENO, and it avoids three traps of the
 * stock build: lines longer than INI_MAX_LINE would be split silently (the
 * tail of a conninfo would become a key of its own), section names are cut
 * at 49 bytes, and an empty section never reaches the handler.  So section
 * headers are handled in the reader, key = value pairs in the handler, and
 * leading whitespace is dropped so an indented key never turns into a
 * continuation of the previous value.
 *
 * Each key is described once in key_specs[]: section, type, field, range.
 *
 * Invariant: parsing stops at the first error.  The message starts with
 * "name:line: " (or "name: " when no line is to blame), says what to change,
 * and never contains the value of a conninfo key, which may hold a password.
 */
#include "wp_setup.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ini.h>
#include <libpq-fe.h>

#include "config.h"
#include "log.h"
#include "mem.h"

#define NAME_MAX_LEN 63 /* source names, slot names, identifiers (NAMEDATALEN - 1) */
#define SLOT_PREFIX "walpipe_"

typedef enum section_kind {
    SECTION_NONE,
    SECTION_WALPIPE,
    SECTION_STAGING,
    SECTION_SOURCE,
    SECTION_WORKERS,
    SECTION_TABLE, /* [table SOURCE.SCHEMA.TABLE] */
    SECTION_METRICS,
    SECTION_SINK, /* [sink NAME] */
} section_kind_t;

typedef enum key_type {
    TYPE_LOG_LEVEL,
    TYPE_CONNINFO,
    TYPE_INT,
    TYPE_BYTES,
    TYPE_BOOL,
    TYPE_SLOT,
    TYPE_TABLES,
    TYPE_SNAPSHOT,
    TYPE_RESYNC,  /* auto | off */
    TYPE_NAME,    /* an SQL identifier, taken as written (quoted when used) */
    TYPE_PATTERN, /* mirror table name pattern: {source}, {schema}, {table} */
    TYPE_EXCLUDE_TABLES, /* a tables list into exclude_tables */
    TYPE_SECRET,  /* a salt: never quoted back in a message */
    TYPE_COLUMNS, /* a list of column names into a char ** at offset, its count after it */
    TYPE_MASKS,   /* col:kind, ... */
    TYPE_LISTEN,  /* [metrics] listen: PORT, HOST:PORT or [IPV6]:PORT; only a port means 127.0.0.1 */
    TYPE_LOG_FORMAT, /* text | json */
    TYPE_PLUGIN,  /* a plugin name: letters, digits and '_' */
    TYPE_SOURCE_LIST, /* names of [source] sections into a char ** at offset, its count after it */
    TYPE_SINK_TABLES, /* a tables list into wp_sink_config_t.tables */
    TYPE_PATH,    /* a file or directory name, any non-empty text */
} key_type_t;

typedef struct key_spec {
    section_kind_t section;
    const char *name;
    key_type_t type;
    size_t offset; /* into wp_config_t, wp_source_config_t for SECTION_SOURCE, wp_table_rule_t for SECTION_TABLE,
                      wp_sink_config_t for SECTION_SINK */
    long long min, max;
} key_spec_t;

static const key_spec_t key_specs[] = {
    {SECTION_WALPIPE, "log_level", TYPE_LOG_LEVEL, offsetof(wp_config_t, log_level), 0, 0},
    {SECTION_STAGING, "conninfo", TYPE_CONNINFO, offsetof(wp_config_t, staging_conninfo), 0, 0},
    {SECTION_STAGING, "batch_rows", TYPE_INT, offsetof(wp_config_t, batch_rows), 1, 1000000},
    {SECTION_STAGING, "batch_bytes", TYPE_BYTES, offsetof(wp_config_t, batch_bytes), 64LL << 10, 1LL << 30},
    {SECTION_STAGING, "batch_ms", TYPE_INT, offsetof(wp_config_t, batch_ms), 1, 60000},
    {SECTION_STAGING, "payload_gin_index", TYPE_BOOL, offsetof(wp_config_t, payload_gin_index), 0, 0},
    {SECTION_STAGING, "partitions_ahead", TYPE_INT, offsetof(wp_config_t, partitions_ahead), 1, 365},
    {SECTION_SOURCE, "conninfo", TYPE_CONNINFO, offsetof(wp_source_config_t, conninfo), 0, 0},
    {SECTION_SOURCE, "slot", TYPE_SLOT, offsetof(wp_source_config_t, slot), 0, 0},
    {SECTION_SOURCE, "tables", TYPE_TABLES, 0, 0, 0},
    {SECTION_SOURCE, "status_interval_ms", TYPE_INT, offsetof(wp_source_config_t, status_interval_ms), 100, 60000},
    {SECTION_SOURCE, "snapshot", TYPE_SNAPSHOT, offsetof(wp_source_config_t, snapshot_initial), 0, 0},
    {SECTION_SOURCE, "snapshot_workers", TYPE_INT, offsetof(wp_source_config_t, snapshot_workers), 1, 16},
    {SECTION_WORKERS, "count", TYPE_INT, offsetof(wp_config_t, workers), 0, 64},
    {SECTION_WORKERS, "claim_size", TYPE_INT, offsetof(wp_config_t, claim_size), 1, 10000},
    {SECTION_WORKERS, "mirror_schema", TYPE_NAME, offsetof(wp_config_t, mirror_schema), 0, 0},
    {SECTION_WORKERS, "mirror_table", TYPE_PATTERN, offsetof(wp_config_t, mirror_table), 0, 0},
    {SECTION_WORKERS, "max_attempts", TYPE_INT, offsetof(wp_config_t, max_attempts), 1, 1000},
    {SECTION_WORKERS, "retry_backoff_ms", TYPE_INT, offsetof(wp_config_t, retry_backoff_ms), 10, 3600000},
    {SECTION_WORKERS, "resync", TYPE_RESYNC, offsetof(wp_config_t, resync_auto), 0, 0},
    {SECTION_SOURCE, "exclude_tables", TYPE_EXCLUDE_TABLES, 0, 0, 0},
    {SECTION_SOURCE, "mask_salt", TYPE_SECRET, offsetof(wp_source_config_t, mask_salt), 16, 0},
    {SECTION_TABLE, "include_columns", TYPE_COLUMNS, offsetof(wp_table_rule_t, include), 0, 0},
    {SECTION_TABLE, "exclude_columns", TYPE_COLUMNS, offsetof(wp_table_rule_t, exclude), 0, 0},
    {SECTION_TABLE, "mask", TYPE_MASKS, 0, 0, 0},
    {SECTION_METRICS, "listen", TYPE_LISTEN, offsetof(wp_config_t, metrics_listen), 0, 0},
    {SECTION_SOURCE, "max_lag_bytes", TYPE_BYTES, offsetof(wp_source_config_t, max_lag_bytes), 1LL << 20, 1LL << 40},
    {SECTION_SOURCE, "max_lag_seconds", TYPE_INT, offsetof(wp_source_config_t, max_lag_seconds), 1, 86400 * 7},
    {SECTION_SOURCE, "max_stall_seconds", TYPE_INT, offsetof(wp_source_config_t, max_stall_seconds), 1, 86400 * 7},
    {SECTION_SOURCE, "min_safe_wal_size", TYPE_BYTES, offsetof(wp_source_config_t, min_safe_wal_size), 0, 1LL << 40},
    {SECTION_WALPIPE, "log_format", TYPE_LOG_FORMAT, offsetof(wp_config_t, log_format), 0, 0},
    /* [sink NAME]: the core's keys; any other key is the plugin's (checked against its list at start) */
    {SECTION_SINK, "plugin", TYPE_PLUGIN, offsetof(wp_sink_config_t, plugin), 0, 0},
    {SECTION_SINK, "sources", TYPE_SOURCE_LIST, offsetof(wp_sink_config_t, sources), 0, 0},
    {SECTION_SINK, "tables", TYPE_SINK_TABLES, 0, 0, 0},
    {SECTION_SINK, "batch_events", TYPE_INT, offsetof(wp_sink_config_t, batch_events), 1, 100000},
    {SECTION_SINK, "plugin_dir", TYPE_PATH, offsetof(wp_sink_config_t, plugin_dir), 0, 0},
};
#define N_KEYS (sizeof key_specs / sizeof key_specs[0])
/* TYPE_COLUMNS stores the count right after the array */
_Static_assert(offsetof(wp_table_rule_t, ninclude) == offsetof(wp_table_rule_t, include) + sizeof(char **),
               "ninclude follows include");
_Static_assert(offsetof(wp_table_rule_t, nexclude) == offsetof(wp_table_rule_t, exclude) + sizeof(char **),
               "nexclude follows exclude");
_Static_assert(offsetof(wp_sink_config_t, nsources) == offsetof(wp_sink_config_t, sources) + sizeof(char **),
               "nsources follows sources");

static const char *const log_level_names[] = {"debug", "info", "warning", "error"};
static const char *const mask_kind_names[] = {"sha256", "redact", "null"}; /* by wp_mask_kind_t */

typedef struct source_state {
    int key_line[N_KEYS]; /* line where key_specs[i] was set; 0 = not set */
} source_state_t;

typedef struct parser {
    const char *name; /* file name for messages */
    const char *text;
    size_t len;
    size_t pos;
    int lineno; /* line last handed to inih */

    wp_config_t *config;
    source_state_t *states; /* parallel to config->sources */
    size_t sources_cap;

    section_kind_t section; /* section the current line belongs to */
    size_t source;          /* index into config->sources when SECTION_SOURCE */
    /* [table] sections: their source's name, rules and key lines; moved to their sources at the end */
    char **rule_sources;
    wp_table_rule_t *rules;
    source_state_t *rule_states;
    size_t nrules, rules_cap;
    size_t rule; /* index into rules when SECTION_TABLE */
    source_state_t *sink_states; /* parallel to config->sinks */
    size_t sinks_cap;
    size_t sink; /* index into config->sinks when SECTION_SINK */
    int walpipe_line;       /* header lines; 0 = section absent */
    int staging_line;
    int workers_line;
    int metrics_line;
    int global_key_line[N_KEYS];

    wp_buf_t value; /* current value after ${VAR} expansion */

    bool failed;
    int err_line;
    char err[1024];
} parser_t;

static void fail(parser_t *p, int line, const char *fmt, ...) WP_PRINTF(3, 4);

/* Records the first error only; later ones are consequences of it. */
static void fail(parser_t *p, int line, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (p->failed)
        return;
    p->failed = true;
    p->err_line = line;
    if (line > 0)
        n = snprintf(p->err, sizeof p->err, "%s:%d: ", p->name, line);
    else
        n = snprintf(p->err, sizeof p->err, "%s: ", p->name);
    if (n < 0 || (size_t)n >= sizeof p->err)
        return;
    va_start(ap, fmt);
    vsnprintf(p->err + n, sizeof p->err - (size_t)n, fmt, ap);
    va_end(ap);
}

static void set_error(char *errbuf, size_t errlen, const char *fmt, ...) WP_PRINTF(3, 4);

static void set_error(char *errbuf, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (errbuf == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
    /* Messages quote keys, values and file names as written: a stray control character (a
     * lone '\r', an escape sequence) would garble the terminal line, and "%.40s" or a short
     * errbuf can cut a UTF-8 character in two.  Found by tests/fuzz/fuzz_config.c. */
    wp_log_sanitize(errbuf);
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v';
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static bool is_alpha(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_source_name(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > NAME_MAX_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!is_alpha(s[i]) && !is_digit(s[i]) && s[i] != '_' && s[i] != '-')
            return false;
    return true;
}

static bool is_slot_name(const char *s)
{
    size_t n = strlen(s);

    if (n == 0 || n > NAME_MAX_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!(s[i] >= 'a' && s[i] <= 'z') && !is_digit(s[i]) && s[i] != '_')
            return false;
    return true;
}

/* "[staging]", "[source app]": the current section, for messages. */
static const char *section_label(const parser_t *p, char *buf, size_t size)
{
    switch (p->section) {
    case SECTION_WALPIPE:
        return "[walpipe]";
    case SECTION_STAGING:
        return "[staging]";
    case SECTION_WORKERS:
        return "[workers]";
    case SECTION_METRICS:
        return "[metrics]";
    case SECTION_SOURCE:
        snprintf(buf, size, "[source %s]", p->config->sources[p->source].name);
        return buf;
    case SECTION_TABLE:
        snprintf(buf, size, "[table %s.%s.%s]", p->rule_sources[p->rule], p->rules[p->rule].schema,
                 p->rules[p->rule].table);
        return buf;
    case SECTION_SINK:
        snprintf(buf, size, "[sink %s]", p->config->sinks[p->sink].name);
        return buf;
    case SECTION_NONE:
        break;
    }
    return "(no section)";
}

static wp_config_t *config_new(const char *path)
{
    wp_config_t *config = wp_calloc(1, sizeof *config);

    config->path = wp_strdup(path);
    config->log_level = WP_LOG_INFO;
    config->log_format = WP_LOG_FORMAT_TEXT;
    config->batch_rows = 10000;
    config->batch_bytes = (size_t)8 << 20;
    config->batch_ms = 50;
    config->payload_gin_index = false;
    config->partitions_ahead = 7;
    config->workers = 1;
    config->claim_size = 1000;
    config->mirror_schema = wp_strdup("analytics");
    config->mirror_table = wp_strdup("{schema}_{table}");
    config->max_attempts = 5;
    config->retry_backoff_ms = 1000;
    config->resync_auto = true;
    return config;
}

static void free_tables(wp_table_ref_t *tables, size_t ntables)
{
    for (size_t i = 0; i < ntables; i++) {
        free(tables[i].schema);
        free(tables[i].table);
    }
    free(tables);
}

static void free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

static void free_rule(wp_table_rule_t *rule)
{
    free(rule->schema);
    free(rule->table);
    free_names(rule->include, rule->ninclude);
    free_names(rule->exclude, rule->nexclude);
    for (size_t i = 0; i < rule->nmasks; i++)
        free(rule->masks[i].column);
    free(rule->masks);
}

void wp_config_destroy(wp_config_t *config)
{
    if (config == NULL)
        return;
    for (size_t i = 0; i < config->nsources; i++) {
        wp_source_config_t *source = &config->sources[i];
        free(source->name);
        free(source->conninfo);
        free(source->slot);
        free_tables(source->tables, source->ntables);
        free_tables(source->exclude_tables, source->nexclude_tables);
        free(source->mask_salt);
        for (size_t k = 0; k < source->nrules; k++)
            free_rule(&source->rules[k]);
        free(source->rules);
    }
    free(config->sources);
    for (size_t i = 0; i < config->nsinks; i++) {
        wp_sink_config_t *sink = &config->sinks[i];
        free(sink->name);
        free(sink->plugin);
        free_names(sink->sources, sink->nsources);
        free_tables(sink->tables, sink->ntables);
        free(sink->plugin_dir);
        for (size_t k = 0; k < sink->nkeys; k++) {
            free(sink->keys[k].key);
            free(sink->keys[k].value);
        }
        free(sink->keys);
    }
    free(config->sinks);
    free(config->staging_conninfo);
    free(config->mirror_schema);
    free(config->mirror_table);
    free(config->metrics_listen);
    free(config->path);
    free(config);
}

static void add_source(parser_t *p, const char *name, int line)
{
    wp_config_t *config = p->config;

    if (config->nsources == p->sources_cap) {
        p->sources_cap = p->sources_cap ? p->sources_cap * 2 : 4;
        config->sources = wp_realloc(config->sources, p->sources_cap * sizeof *config->sources);
        p->states = wp_realloc(p->states, p->sources_cap * sizeof *p->states);
    }
    wp_source_config_t *source = &config->sources[config->nsources];
    memset(source, 0, sizeof *source);
    source->name = wp_strdup(name);
    source->status_interval_ms = 1000;
    source->snapshot_initial = true;
    source->snapshot_workers = 2;
    source->max_lag_bytes = (size_t)1 << 30;
    source->max_lag_seconds = 300;
    source->max_stall_seconds = 300;
    source->min_safe_wal_size = (size_t)1 << 30;
    source->line = line;
    memset(&p->states[config->nsources], 0, sizeof p->states[0]);
    p->source = config->nsources;
    config->nsources++;
}

static bool parse_tables(parser_t *p, const char *key, const char *label, const char *s, wp_table_ref_t **out_tables,
                         size_t *nout);

static void add_sink(parser_t *p, const char *name, int line)
{
    wp_config_t *config = p->config;

    if (config->nsinks == p->sinks_cap) {
        p->sinks_cap = p->sinks_cap ? p->sinks_cap * 2 : 4;
        config->sinks = wp_realloc(config->sinks, p->sinks_cap * sizeof *config->sinks);
        p->sink_states = wp_realloc(p->sink_states, p->sinks_cap * sizeof *p->sink_states);
    }
    wp_sink_config_t *sink = &config->sinks[config->nsinks];
    memset(sink, 0, sizeof *sink);
    sink->name = wp_strdup(name);
    sink->batch_events = 1000;
    sink->line = line;
    memset(&p->sink_states[config->nsinks], 0, sizeof p->sink_states[0]);
    p->sink = config->nsinks;
    config->nsinks++;
}

/* "[table SOURCE.SCHEMA.TABLE]": s is the text after "table". */
static bool begin_table_section(parser_t *p, const char *s, int lineno)
{
    char source[NAME_MAX_LEN + 2];
    size_t n = 0;
    wp_table_ref_t *refs = NULL;
    size_t nrefs = 0;
    char label[96];

    while (is_space(*s))
        s++;
    while (s[n] != '\0' && s[n] != '.' && n <= NAME_MAX_LEN)
        n++;
    if (s[n] != '.' || n == 0) {
        fail(p, lineno, "[table] needs a source, a schema and a table; write [table SOURCE.SCHEMA.TABLE], e.g. "
             "[table app.public.users]");
        return false;
    }
    memcpy(source, s, n);
    source[n] = '\0';
    if (!is_source_name(source)) {
        fail(p, lineno, "invalid source name \"%s\" in [table]; it names a [source NAME] section", source);
        return false;
    }
    snprintf(label, sizeof label, "[table %s.*]", source);
    if (!parse_tables(p, "the section name", label, s + n + 1, &refs, &nrefs))
        return false;
    if (nrefs != 1) {
        free_tables(refs, nrefs);
        fail(p, lineno, "[table %s.*] names %zu tables; write one [table SOURCE.SCHEMA.TABLE] section per table",
             source, nrefs);
        return false;
    }
    for (size_t i = 0; i < p->nrules; i++) {
        if (strcmp(p->rule_sources[i], source) == 0 && strcmp(p->rules[i].schema, refs[0].schema) == 0 &&
            strcmp(p->rules[i].table, refs[0].table) == 0) {
            fail(p, lineno, "duplicate section [table %s.%s.%s] (first at line %d); merge the two sections", source,
                 refs[0].schema, refs[0].table, p->rules[i].line);
            free_tables(refs, nrefs);
            return false;
        }
    }
    if (p->nrules == p->rules_cap) {
        p->rules_cap = p->rules_cap ? p->rules_cap * 2 : 4;
        p->rules = wp_realloc(p->rules, p->rules_cap * sizeof *p->rules);
        p->rule_sources = wp_realloc(p->rule_sources, p->rules_cap * sizeof *p->rule_sources);
        p->rule_states = wp_realloc(p->rule_states, p->rules_cap * sizeof *p->rule_states);
    }
    wp_table_rule_t *rule = &p->rules[p->nrules];
    memset(rule, 0, sizeof *rule);
    rule->schema = refs[0].schema;
    rule->table = refs[0].table;
    rule->line = lineno;
    free(refs); /* the names moved to rule */
    p->rule_sources[p->nrules] = wp_strdup(source);
    memset(&p->rule_states[p->nrules], 0, sizeof p->rule_states[0]);
    p->rule = p->nrules++;
    p->section = SECTION_TABLE;
    return true;
}

/*
 * Handles a "[...]" line: checks the name and makes it the current section.
 * line holds the whole header with leading and trailing blanks removed.
 */
static bool begin_section(parser_t *p, const char *line)
{
    const char *close = strchr(line, ']');
    const char *rest;
    const char *start = line + 1;
    const char *end;
    char name[256];
    int lineno = p->lineno;

    if (close == NULL) {
        fail(p, lineno, "section header has no closing \"]\"; write [walpipe], [staging], [workers] or [source NAME]");
        return false;
    }
    for (rest = close + 1; is_space(*rest); rest++)
        ;
    if (*rest != '\0' && *rest != ';') {
        fail(p, lineno, "unexpected text after \"]\"; put each key = value on a line of its own");
        return false;
    }
    while (start < close && is_space(*start))
        start++;
    end = close;
    while (end > start && is_space(end[-1]))
        end--;
    snprintf(name, sizeof name, "%.*s", (int)(end - start), start);

    if (strcmp(name, "walpipe") == 0 || strcmp(name, "staging") == 0) {
        int *seen = name[0] == 'w' ? &p->walpipe_line : &p->staging_line;
        if (*seen) {
            fail(p, lineno, "duplicate section [%s] (first at line %d); merge the two sections", name, *seen);
            return false;
        }
        *seen = lineno;
        p->section = name[0] == 'w' ? SECTION_WALPIPE : SECTION_STAGING;
        return true;
    }
    if (strcmp(name, "workers") == 0) {
        if (p->workers_line) {
            fail(p, lineno, "duplicate section [workers] (first at line %d); merge the two sections", p->workers_line);
            return false;
        }
        p->workers_line = lineno;
        p->section = SECTION_WORKERS;
        return true;
    }
    if (strcmp(name, "metrics") == 0) {
        if (p->metrics_line) {
            fail(p, lineno, "duplicate section [metrics] (first at line %d); merge the two sections", p->metrics_line);
            return false;
        }
        p->metrics_line = lineno;
        p->section = SECTION_METRICS;
        return true;
    }
    if (strncmp(name, "source", 6) == 0 && (name[6] == '\0' || is_space(name[6]))) {
        const char *source_name = name + 6;
        while (is_space(*source_name))
            source_name++;
        if (*source_name == '\0') {
            fail(p, lineno, "[source] needs a name; write [source NAME]");
            return false;
        }
        if (!is_source_name(source_name)) {
            fail(p, lineno, "invalid source name \"%s\"; use 1 to %d letters, digits, '_' or '-'", source_name,
                 NAME_MAX_LEN);
            return false;
        }
        for (size_t i = 0; i < p->config->nsources; i++) {
            if (strcmp(p->config->sources[i].name, source_name) == 0) {
                fail(p, lineno, "duplicate section [source %s] (first at line %d); give each source a unique name",
                     source_name, p->config->sources[i].line);
                return false;
            }
        }
        add_source(p, source_name, lineno);
        p->section = SECTION_SOURCE;
        return true;
    }
    if (strncmp(name, "table", 5) == 0 && (name[5] == '\0' || is_space(name[5])))
        return begin_table_section(p, name + 5, lineno);
    if (strncmp(name, "sink", 4) == 0 && (name[4] == '\0' || is_space(name[4]))) {
        const char *sink_name = name + 4;
        while (is_space(*sink_name))
            sink_name++;
        if (*sink_name == '\0') {
            fail(p, lineno, "[sink] needs a name; write [sink NAME]");
            return false;
        }
        if (!is_source_name(sink_name)) {
            fail(p, lineno, "invalid sink name \"%s\"; use 1 to %d letters, digits, '_' or '-'", sink_name,
                 NAME_MAX_LEN);
            return false;
        }
        for (size_t i = 0; i < p->config->nsinks; i++) {
            if (strcmp(p->config->sinks[i].name, sink_name) == 0) {
                fail(p, lineno, "duplicate section [sink %s] (first at line %d); give each sink a unique name",
                     sink_name, p->config->sinks[i].line);
                return false;
            }
        }
        add_sink(p, sink_name, lineno);
        p->section = SECTION_SINK;
        return true;
    }
    fail(p, lineno,
         "unknown section [%s]; expected [walpipe], [staging], [workers], [metrics], [source NAME], "
         "[table SOURCE.SCHEMA.TABLE] or [sink NAME]",
         name);
    return false;
}

/*
 * The ini_reader: hands inih the next line of p->text, without its newline
 * and leading blanks.  Returns NULL at the end or after an error, which
 * makes ini_parse_stream return.
 */
static char *read_line_cb(char *str, int num, void *stream)
{
    parser_t *p = stream;
    const char *line;
    const char *nl;
    size_t n;

    if (p->failed || p->pos >= p->len)
        return NULL;
    line = p->text + p->pos;
    nl = memchr(line, '\n', p->len - p->pos);
    n = nl ? (size_t)(nl - line) : p->len - p->pos;
    p->pos += nl ? n + 1 : n;
    p->lineno++;

    if (p->lineno == 1 && n >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0) {
        line += 3;
        n -= 3;
    }
    while (n > 0 && is_space(line[0])) {
        line++;
        n--;
    }
    while (n > 0 && is_space(line[n - 1]))
        n--;
    if (memchr(line, '\0', n) != NULL) {
        fail(p, p->lineno, "line contains a NUL byte; the file must be text");
        return NULL;
    }
    if (num < 1 || n > (size_t)num - 1) {
        fail(p, p->lineno,
             "line is too long (%zu characters, at most %d allowed); put the long value in an environment "
             "variable and write ${VAR}",
             n, num - 1);
        return NULL;
    }
    memcpy(str, line, n);
    str[n] = '\0';
    if (n > 0 && str[0] == '[' && !begin_section(p, str))
        return NULL;
    return str;
}

/* Replaces each ${VAR} in value with the variable's value, into p->value. */
static bool expand_env(parser_t *p, const char *key, const char *label, const char *value)
{
    const char *s = value;

    wp_buf_reset(&p->value);
    wp_buf_append(&p->value, "", 0);
    while (*s) {
        if (s[0] != '$' || s[1] != '{') {
            wp_buf_putc(&p->value, *s++);
            continue;
        }
        const char *start = s + 2;
        const char *end = start;
        while (is_alpha(*end) || is_digit(*end) || *end == '_')
            end++;
        if (*end != '}' || end == start || is_digit(*start)) {
            /* The text is not quoted back: it may be part of a password. */
            fail(p, p->lineno,
                 "malformed \"${\" in the value of key \"%s\" in %s; write ${NAME} with a NAME of letters, "
                 "digits and '_' (a literal \"${\" can only come from an environment variable)",
                 key, label);
            return false;
        }
        char *var = wp_strndup(start, (size_t)(end - start));
        const char *env = getenv(var);
        if (env == NULL)
            fail(p, p->lineno, "environment variable \"%s\" is not set (referenced by key \"%s\" in %s)", var, key,
                 label);
        else
            wp_buf_puts(&p->value, env);
        free(var);
        if (env == NULL)
            return false;
        s = end + 1;
    }
    return true;
}

/* Accepts digits only (no sign, blanks or base prefix) within [min, max]. */
static bool parse_int(const char *s, long long min, long long max, long long *out)
{
    char *end;
    long long v;

    if (!is_digit(s[0]))
        return false;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return false;
    *out = v;
    return true;
}

/* A byte count with an optional kB, MB or GB suffix (1024-based, as in PostgreSQL). */
static bool parse_bytes(const char *s, long long min, long long max, long long *out)
{
    static const struct {
        const char *suffix;
        unsigned long long mult;
    } units[] = {{"", 1}, {"kB", 1ULL << 10}, {"MB", 1ULL << 20}, {"GB", 1ULL << 30}};
    char *end;
    unsigned long long v;

    if (!is_digit(s[0]))
        return false;
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0)
        return false;
    while (is_space(*end))
        end++;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(end, units[i].suffix) != 0)
            continue;
        if (v > (unsigned long long)max / units[i].mult)
            return false;
        v *= units[i].mult;
        if (v < (unsigned long long)min)
            return false;
        *out = (long long)v;
        return true;
    }
    return false;
}

static bool parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "on", "yes", "1"};
    static const char *const no[] = {"false", "off", "no", "0"};

    for (size_t i = 0; i < sizeof yes / sizeof yes[0]; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return true;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return true;
        }
    }
    return false;
}

/*
 * Reads one identifier of a tables entry at *sp into *out (caller frees):
 * "quoted" with "" for a quote, or a run of letters, digits, '_', '$' and
 * non-ASCII bytes taken as written.
 */
static bool parse_ident(parser_t *p, const char *key, const char *label, size_t entry, const char **sp, char **out)
{
    const char *s = *sp;
    wp_buf_t ident = WP_BUF_INIT;
    bool ok = false;

    wp_buf_append(&ident, "", 0);
    if (*s == '"') {
        s++;
        for (;;) {
            if (*s == '\0') {
                fail(p, p->lineno, "entry %zu of %s in %s has an unterminated quoted name; close it with '\"'",
                     entry, key, label);
                goto out;
            }
            if (*s == '"' && s[1] == '"') {
                wp_buf_putc(&ident, '"');
                s += 2;
            } else if (*s == '"') {
                s++;
                break;
            } else {
                wp_buf_putc(&ident, *s++);
            }
        }
        if (ident.len == 0) {
            fail(p, p->lineno, "entry %zu of %s in %s has an empty quoted name \"\"; write schema.table", entry,
                 key, label);
            goto out;
        }
    } else {
        while (is_alpha(*s) || is_digit(*s) || *s == '_' || *s == '$' || (unsigned char)*s >= 0x80)
            wp_buf_putc(&ident, *s++);
        if (ident.len == 0) {
            if (*s == '*')
                fail(p, p->lineno,
                     "entry %zu of %s in %s uses a wildcard, which is not supported; list each schema.table, or "
                     "remove the tables key to capture all tables",
                     entry, key, label);
            else if (*s == '.' || *s == ',' || *s == '\0')
                fail(p, p->lineno, "entry %zu of %s in %s has an empty schema or table name; write schema.table",
                     entry, key, label);
            else
                fail(p, p->lineno,
                     "entry %zu of %s in %s has an unexpected '%c'; double-quote names that contain it, e.g. "
                     "public.\"my-table\"",
                     entry, key, label, *s);
            goto out;
        }
    }
    if (ident.len > NAME_MAX_LEN) {
        fail(p, p->lineno, "entry %zu of %s in %s has a name longer than %d bytes; PostgreSQL names are shorter",
             entry, key, label, NAME_MAX_LEN);
        goto out;
    }
    *out = ident.data;
    ident.data = NULL;
    *sp = s;
    ok = true;
out:
    wp_buf_free(&ident);
    return ok;
}

/* Parses "schema.table, ..." (the value of key) into *out and *nout. */
static bool parse_tables(parser_t *p, const char *key, const char *label, const char *s, wp_table_ref_t **out_tables,
                         size_t *nout)
{
    wp_table_ref_t *tables = NULL;
    size_t ntables = 0;
    char *names[2] = {NULL, NULL};
    size_t entry = 1;
    bool ok = false;

    while (is_space(*s))
        s++;
    if (*s == '\0') {
        fail(p, p->lineno, "%s in %s is empty; list schema.table names, or remove the key to capture all tables",
             key, label);
        goto out;
    }
    for (;; entry++) {
        size_t nnames = 0;

        while (is_space(*s))
            s++;
        if (*s == ',' || *s == '\0') {
            fail(p, p->lineno, "entry %zu of %s in %s is empty; remove the extra comma", entry, key, label);
            goto out;
        }
        for (;;) {
            if (nnames == 2) {
                fail(p, p->lineno,
                     "entry %zu of %s in %s has more than two dot-separated names; write schema.table "
                     "(double-quote names that contain a dot)",
                     entry, key, label);
                goto out;
            }
            if (!parse_ident(p, key, label, entry, &s, &names[nnames]))
                goto out;
            nnames++;
            while (is_space(*s))
                s++;
            if (*s != '.')
                break;
            s++;
            while (is_space(*s))
                s++;
        }
        if (*s != ',' && *s != '\0') {
            fail(p, p->lineno,
                 "entry %zu of %s in %s has an unexpected '%c'; separate entries with ',' and double-quote names "
                 "that contain it",
                 entry, key, label, *s);
            goto out;
        }
        if (nnames == 1) {
            fail(p, p->lineno, "table \"%s\" in %s of %s has no schema; write schema.table (e.g. public.%s)",
                 names[0], key, label, names[0]);
            goto out;
        }
        for (size_t i = 0; i < ntables; i++) {
            if (strcmp(tables[i].schema, names[0]) == 0 && strcmp(tables[i].table, names[1]) == 0) {
                fail(p, p->lineno, "table %s.%s is listed twice in %s of %s; remove one", names[0], names[1],
                     key, label);
                goto out;
            }
        }
        tables = wp_realloc(tables, (ntables + 1) * sizeof *tables);
        tables[ntables].schema = names[0];
        tables[ntables].table = names[1];
        ntables++;
        names[0] = names[1] = NULL;
        if (*s == '\0')
            break;
        s++; /* ',' */
    }
    *out_tables = tables;
    *nout = ntables;
    tables = NULL;
    ntables = 0;
    ok = true;
out:
    free(names[0]);
    free(names[1]);
    free_tables(tables, ntables);
    return ok;
}

/*
 * Parses the names before the first ':' or ',' of a column-list entry: one
 * identifier, "quoted" when it holds anything but letters, digits, '_', '$'.
 */
static bool parse_column(parser_t *p, const char *key, const char *label, size_t entry, const char **sp, char **out)
{
    while (is_space(**sp))
        (*sp)++;
    if (**sp == ',' || **sp == '\0' || **sp == ':') {
        fail(p, p->lineno, "entry %zu of %s in %s has no column name; write a column name (remove an extra comma)",
             entry, key, label);
        return false;
    }
    if (!parse_ident(p, key, label, entry, sp, out))
        return false;
    while (is_space(**sp))
        (*sp)++;
    if (**sp == '.') {
        fail(p, p->lineno, "entry %zu of %s in %s is not a column name (\"%s.\"); the table is named by the section, "
             "write the bare column name (double-quote a name that holds a dot)",
             entry, key, label, *out);
        free(*out);
        *out = NULL;
        return false;
    }
    return true;
}

/* Parses "col, "Odd col", ..." into a new array at *out (count *nout). */
static bool parse_column_list(parser_t *p, const char *key, const char *label, const char *s, char ***out,
                              size_t *nout)
{
    char **names = NULL;
    size_t n = 0;
    bool ok = false;

    while (is_space(*s))
        s++;
    if (*s == '\0') {
        fail(p, p->lineno, "%s in %s is empty; list column names, or remove the key", key, label);
        goto out;
    }
    for (size_t entry = 1;; entry++) {
        char *name = NULL;
        if (!parse_column(p, key, label, entry, &s, &name))
            goto out;
        for (size_t i = 0; i < n; i++) {
            if (strcmp(names[i], name) == 0) {
                fail(p, p->lineno, "column \"%s\" is listed twice in %s of %s; remove one", name, key, label);
                free(name);
                goto out;
            }
        }
        names = wp_realloc(names, (n + 1) * sizeof *names);
        names[n++] = name;
        if (*s == '\0')
            break;
        if (*s != ',') {
            fail(p, p->lineno,
                 "entry %zu of %s in %s has an unexpected '%c'; separate columns with ',' and double-quote names "
                 "that contain it",
                 entry, key, label, *s);
            goto out;
        }
        s++;
    }
    *out = names;
    *nout = n;
    names = NULL;
    n = 0;
    ok = true;
out:
    free_names(names, n);
    return ok;
}

/* Parses "col:kind, ..." into rule->masks. */
static bool parse_masks(parser_t *p, const char *label, const char *s, wp_table_rule_t *rule)
{
    wp_column_mask_t *masks = NULL;
    size_t n = 0;
    bool ok = false;

    while (is_space(*s))
        s++;
    if (*s == '\0') {
        fail(p, p->lineno, "mask in %s is empty; write mask = column:sha256|redact|null, ..., or remove the key",
             label);
        goto out;
    }
    for (size_t entry = 1;; entry++) {
        char *name = NULL;
        char kind[16];
        size_t klen = 0;
        size_t k;

        if (!parse_column(p, "mask", label, entry, &s, &name))
            goto out;
        if (*s != ':') {
            fail(p, p->lineno, "entry %zu of mask in %s (column \"%s\") has no kind; write %s:sha256, :redact or :null",
                 entry, label, name, name);
            free(name);
            goto out;
        }
        s++;
        while (is_space(*s))
            s++;
        while (is_alpha(*s) || is_digit(*s)) {
            if (klen < sizeof kind - 1)
                kind[klen++] = *s;
            s++;
        }
        kind[klen] = '\0';
        for (k = 0; k < sizeof mask_kind_names / sizeof mask_kind_names[0]; k++)
            if (strcmp(kind, mask_kind_names[k]) == 0)
                break;
        if (k == sizeof mask_kind_names / sizeof mask_kind_names[0]) {
            fail(p, p->lineno, "unknown mask kind \"%s\" for column \"%s\" in %s; use sha256, redact or null", kind,
                 name, label);
            free(name);
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            if (strcmp(masks[i].column, name) == 0) {
                fail(p, p->lineno, "column \"%s\" is masked twice in %s; keep one mask", name, label);
                free(name);
                goto out;
            }
        }
        masks = wp_realloc(masks, (n + 1) * sizeof *masks);
        masks[n].column = name;
        masks[n].kind = (wp_mask_kind_t)k;
        n++;
        while (is_space(*s))
            s++;
        if (*s == '\0')
            break;
        if (*s != ',') {
            fail(p, p->lineno, "entry %zu of mask in %s has an unexpected '%c'; separate entries with ','", entry,
                 label, *s);
            goto out;
        }
        s++;
    }
    rule->masks = masks;
    rule->nmasks = n;
    masks = NULL;
    n = 0;
    ok = true;
out:
    for (size_t i = 0; i < n; i++)
        free(masks[i].column);
    free(masks);
    return ok;
}

/*
 * A mirror table name pattern: text with {source}, {schema} and {table}
 * placeholders; it must hold {table} so that two tables never share a mirror.
 */
static bool check_pattern(parser_t *p, const key_spec_t *spec, const char *label, const char *value)
{
    bool has_table = false;

    for (const char *s = value; *s; s++) {
        if (*s == '}') {
            fail(p, p->lineno, "%s in %s has a '}' without '{'; placeholders are {source}, {schema} and {table}",
                 spec->name, label);
            return false;
        }
        if (*s != '{')
            continue;
        const char *end = strchr(s, '}');
        size_t n = end ? (size_t)(end - s - 1) : 0;
        if (end && n == 5 && strncmp(s + 1, "table", 5) == 0)
            has_table = true;
        else if (!end || !((n == 6 && strncmp(s + 1, "source", 6) == 0) || (n == 6 && strncmp(s + 1, "schema", 6) == 0))) {
            fail(p, p->lineno, "%s in %s has an unknown placeholder; use {source}, {schema} and {table} (got \"%.60s\")",
                 spec->name, label, value);
            return false;
        }
        s = end;
    }
    if (!has_table) {
        fail(p, p->lineno, "%s in %s must contain {table}, or two tables would share one mirror (got \"%.60s\")",
             spec->name, label, value);
        return false;
    }
    return true;
}

/* Stores the expanded value of one key into base (a wp_config_t or wp_source_config_t). */
static bool names_have(char *const *names, size_t n, const char *name);

static bool apply_value(parser_t *p, const key_spec_t *spec, const char *label, char *base, const char *value)
{
    char *field = base + spec->offset;
    long long n;

    switch (spec->type) {
    case TYPE_LOG_LEVEL:
        for (size_t i = 0; i < sizeof log_level_names / sizeof log_level_names[0]; i++) {
            if (strcasecmp(value, log_level_names[i]) == 0) {
                *(wp_log_level_t *)field = (wp_log_level_t)i;
                return true;
            }
        }
        fail(p, p->lineno, "log_level in %s must be debug, info, warning or error (got \"%.40s\")", label, value);
        return false;

    case TYPE_CONNINFO: {
        char *errmsg = NULL;
        PQconninfoOption *opts;

        if (value[0] == '\0') {
            fail(p, p->lineno,
                 "conninfo in %s is empty; write a libpq connection string such as \"host=db dbname=app user=walpipe\"",
                 label);
            return false;
        }
        /* libpq's message is not passed on: it can quote part of a password. */
        opts = PQconninfoParse(value, &errmsg);
        PQconninfoFree(opts);
        PQfreemem(errmsg);
        if (opts == NULL) {
            fail(p, p->lineno,
                 "conninfo in %s is not a valid libpq connection string (value not shown, it may hold a password); "
                 "check its key names and quoting",
                 label);
            return false;
        }
        *(char **)field = wp_strdup(value);
        return true;
    }

    case TYPE_INT:
        if (!parse_int(value, spec->min, spec->max, &n)) {
            fail(p, p->lineno, "%s in %s must be an integer from %lld to %lld (got \"%.40s\")", spec->name, label,
                 spec->min, spec->max, value);
            return false;
        }
        *(int *)field = (int)n;
        return true;

    case TYPE_BYTES:
        if (!parse_bytes(value, spec->min, spec->max, &n)) {
            if (spec->min == 64LL << 10 && spec->max == 1LL << 30)
                fail(p, p->lineno,
                     "%s in %s must be a size from 64kB to 1GB: a number of bytes, or a number followed by kB, MB or "
                     "GB (got \"%.40s\")",
                     spec->name, label, value);
            else
                fail(p, p->lineno,
                     "%s in %s must be a size from %lld to %lld bytes: a number of bytes, or a number followed by kB, "
                     "MB or GB (got \"%.40s\")",
                     spec->name, label, spec->min, spec->max, value);
            return false;
        }
        *(size_t *)field = (size_t)n;
        return true;

    case TYPE_BOOL:
        if (!parse_bool(value, (bool *)field)) {
            fail(p, p->lineno, "%s in %s must be true or false (or on/off, yes/no, 1/0) (got \"%.40s\")", spec->name,
                 label, value);
            return false;
        }
        return true;

    case TYPE_SLOT:
        if (!is_slot_name(value)) {
            fail(p, p->lineno,
                 "slot in %s must be a replication slot name: 1 to %d lower-case letters, digits or '_' (got "
                 "\"%.70s\")",
                 label, NAME_MAX_LEN, value);
            return false;
        }
        *(char **)field = wp_strdup(value);
        return true;

    case TYPE_TABLES:
        return parse_tables(p, spec->name, label, value, &((wp_source_config_t *)(void *)base)->tables,
                            &((wp_source_config_t *)(void *)base)->ntables);

    case TYPE_SNAPSHOT:
        if (strcmp(value, "initial") != 0 && strcmp(value, "never") != 0) {
            fail(p, p->lineno, "snapshot in %s must be initial or never (got \"%.40s\")", label, value);
            return false;
        }
        *(bool *)field = strcmp(value, "initial") == 0;
        return true;

    case TYPE_LOG_FORMAT:
        if (strcmp(value, "text") != 0 && strcmp(value, "json") != 0) {
            fail(p, p->lineno, "log_format in %s must be text or json (got \"%.40s\")", label, value);
            return false;
        }
        *(wp_log_format_t *)field = strcmp(value, "json") == 0 ? WP_LOG_FORMAT_JSON : WP_LOG_FORMAT_TEXT;
        return true;

    case TYPE_RESYNC:
        if (strcmp(value, "auto") != 0 && strcmp(value, "off") != 0) {
            fail(p, p->lineno, "resync in %s must be auto or off (got \"%.40s\")", label, value);
            return false;
        }
        *(bool *)field = strcmp(value, "auto") == 0;
        return true;

    case TYPE_NAME:
        if (value[0] == '\0' || strlen(value) > NAME_MAX_LEN) {
            fail(p, p->lineno, "%s in %s must be a name of 1 to %d bytes (it is used quoted, case kept)", spec->name,
                 label, NAME_MAX_LEN);
            return false;
        }
        free(*(char **)field);
        *(char **)field = wp_strdup(value);
        return true;

    case TYPE_LISTEN: {
        char host[64];
        int port;
        if (wp_config_parse_listen(value, host, sizeof host, &port) != 0) {
            fail(p, p->lineno,
                 "listen in %s must be PORT, HOST:PORT or [IPV6]:PORT with a port from 1 to 65535 and a numeric "
                 "address (got \"%.60s\"); e.g. listen = 127.0.0.1:9187",
                 label, value);
            return false;
        }
        free(*(char **)field);
        *(char **)field = wp_strdup(value);
        return true;
    }

    case TYPE_PATTERN:
        if (!check_pattern(p, spec, label, value))
            return false;
        free(*(char **)field);
        *(char **)field = wp_strdup(value);
        return true;

    case TYPE_EXCLUDE_TABLES:
        return parse_tables(p, spec->name, label, value, &((wp_source_config_t *)(void *)base)->exclude_tables,
                            &((wp_source_config_t *)(void *)base)->nexclude_tables);

    case TYPE_SECRET:
        /* the value is a secret: no message quotes it */
        if (strlen(value) < (size_t)spec->min) {
            fail(p, p->lineno,
                 "%s in %s is shorter than %lld bytes; use a random secret, e.g. the output of `openssl rand -hex "
                 "16`, through an environment variable: %s = ${NAME}",
                 spec->name, label, spec->min, spec->name);
            return false;
        }
        *(char **)field = wp_strdup(value);
        return true;

    case TYPE_COLUMNS:
        return parse_column_list(p, spec->name, label, value, (char ***)(void *)field,
                                 (size_t *)(void *)(field + sizeof(char **)));

    case TYPE_MASKS:
        return parse_masks(p, label, value, (wp_table_rule_t *)(void *)base);

    case TYPE_PLUGIN:
        if (value[0] == '\0' || strlen(value) > NAME_MAX_LEN || strspn(value, "abcdefghijklmnopqrstuvwxyz"
                                                                              "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") !=
                                                                       strlen(value)) {
            fail(p, p->lineno, "plugin in %s must be a plugin name of letters, digits and '_' (got \"%.40s\"), e.g. "
                 "plugin = jsonl", label, value);
            return false;
        }
        *(char **)field = wp_strdup(value);
        return true;

    case TYPE_SOURCE_LIST: {
        char ***names = (char ***)(void *)field;
        size_t *count = (size_t *)(void *)(field + sizeof(char **));
        const char *s = value;
        for (;;) {
            while (is_space(*s))
                s++;
            size_t len = strcspn(s, ",");
            while (len > 0 && is_space(s[len - 1]))
                len--;
            char *name = wp_strndup(s, len);
            if (!is_source_name(name)) {
                fail(p, p->lineno, "entry %zu of %s in %s is not a source name (\"%.40s\"); list [source NAME] "
                     "names separated by commas", *count + 1, spec->name, label, name);
                free(name);
                return false;
            }
            if (names_have(*names, *count, name)) {
                fail(p, p->lineno, "source \"%s\" is listed twice in %s of %s", name, spec->name, label);
                free(name);
                return false;
            }
            *names = wp_realloc(*names, (*count + 1) * sizeof **names);
            (*names)[(*count)++] = name;
            s += strcspn(s, ",");
            if (*s != ',')
                return true;
            s++;
        }
    }

    case TYPE_SINK_TABLES:
        return parse_tables(p, spec->name, label, value, &((wp_sink_config_t *)(void *)base)->tables,
                            &((wp_sink_config_t *)(void *)base)->ntables);

    case TYPE_PATH:
        if (value[0] == '\0') {
            fail(p, p->lineno, "%s in %s is empty; give a directory, or remove the key", spec->name, label);
            return false;
        }
        *(char **)field = wp_strdup(value);
        return true;
    }
    return false;
}

/*
 * A key of [sink NAME] that is not the core's: kept as text for the plugin.
 * Whether the plugin knows it is checked when the sink starts (loader.c),
 * as only the plugin has the list.
 */
static bool add_sink_key(parser_t *p, const char *label, const char *name, const char *value)
{
    wp_sink_config_t *sink = &p->config->sinks[p->sink];

    if (strlen(name) > NAME_MAX_LEN ||
        strspn(name, "abcdefghijklmnopqrstuvwxyz0123456789_.") != strlen(name)) {
        fail(p, p->lineno, "invalid key \"%.64s\" in %s; keys are lower-case letters, digits, '_' and '.'", name,
             label);
        return false;
    }
    for (size_t i = 0; i < sink->nkeys; i++) {
        if (strcmp(sink->keys[i].key, name) == 0) {
            fail(p, p->lineno, "duplicate key \"%s\" in %s (first set at line %d); keep only one", name, label,
                 sink->keys[i].line);
            return false;
        }
    }
    if (!expand_env(p, name, label, value))
        return false;
    sink->keys = wp_realloc(sink->keys, (sink->nkeys + 1) * sizeof *sink->keys);
    sink->keys[sink->nkeys].key = wp_strdup(name);
    sink->keys[sink->nkeys].value = wp_strdup(p->value.data);
    sink->keys[sink->nkeys].line = p->lineno;
    sink->nkeys++;
    return true;
}

/* The ini_handler: one key = value line of the current section. */
static int handle_key_cb(void *user, const char *section, const char *name, const char *value)
{
    parser_t *p = user;
    const key_spec_t *spec = NULL;
    char labelbuf[96];
    const char *label;
    int *key_line;
    char *base;

    (void)section; /* inih truncates long names; p->section is the real one */
    if (p->failed)
        return 0;
    if (p->section == SECTION_NONE) {
        fail(p, p->lineno,
             "key \"%s\" comes before any section; put it under [walpipe], [staging], [workers] or [source NAME]",
             name);
        return 0;
    }
    label = section_label(p, labelbuf, sizeof labelbuf);
    if (name[0] == '\0') {
        fail(p, p->lineno, "missing key name before \"=\" in %s; write key = value", label);
        return 0;
    }
    for (size_t i = 0; i < N_KEYS; i++) {
        if (key_specs[i].section == p->section && strcmp(key_specs[i].name, name) == 0) {
            spec = &key_specs[i];
            break;
        }
    }
    if (spec == NULL && p->section == SECTION_SINK)
        return add_sink_key(p, label, name, value) ? 1 : 0;
    if (spec == NULL) {
        char valid[256] = "";
        size_t used = 0;
        for (size_t i = 0; i < N_KEYS && used < sizeof valid; i++) {
            if (key_specs[i].section == p->section) {
                int n = snprintf(valid + used, sizeof valid - used, "%s%s", used ? ", " : "", key_specs[i].name);
                used += n > 0 ? (size_t)n : 0;
            }
        }
        fail(p, p->lineno, "unknown key \"%.64s\" in %s; valid keys are: %s", name, label, valid);
        return 0;
    }

    if (p->section == SECTION_SOURCE) {
        key_line = p->states[p->source].key_line;
        base = (char *)&p->config->sources[p->source];
    } else if (p->section == SECTION_TABLE) {
        key_line = p->rule_states[p->rule].key_line;
        base = (char *)&p->rules[p->rule];
    } else if (p->section == SECTION_SINK) {
        key_line = p->sink_states[p->sink].key_line;
        base = (char *)&p->config->sinks[p->sink];
    } else {
        key_line = p->global_key_line;
        base = (char *)p->config;
    }
    if (key_line[spec - key_specs]) {
        fail(p, p->lineno, "duplicate key \"%s\" in %s (first set at line %d); keep only one", name, label,
             key_line[spec - key_specs]);
        return 0;
    }
    key_line[spec - key_specs] = p->lineno;

    if (!expand_env(p, name, label, value))
        return 0;
    if (!apply_value(p, spec, label, base, p->value.data))
        return 0;
    return 1;
}

/* "walpipe_" + name, lower-cased, with '-' turned into '_'. */
static char *default_slot(const char *name)
{
    char *slot = wp_malloc(strlen(SLOT_PREFIX) + strlen(name) + 1);
    char *d = slot;

    memcpy(d, SLOT_PREFIX, strlen(SLOT_PREFIX));
    d += strlen(SLOT_PREFIX);
    for (const char *s = name; *s; s++)
        *d++ = *s == '-' ? '_' : (*s >= 'A' && *s <= 'Z') ? (char)(*s - 'A' + 'a') : *s;
    *d = '\0';
    return slot;
}

/* The line where key name of section was set in key_line (0 = not set). */
static int key_line_of(const int *key_line, section_kind_t section, const char *name)
{
    for (size_t i = 0; i < N_KEYS; i++)
        if (key_specs[i].section == section && strcmp(key_specs[i].name, name) == 0)
            return key_line[i];
    return 0;
}

static bool names_have(char *const *names, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return true;
    return false;
}

static bool refs_have(const wp_table_ref_t *refs, size_t n, const char *schema, const char *table)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(refs[i].schema, schema) == 0 && strcmp(refs[i].table, table) == 0)
            return true;
    return false;
}

/*
 * Checks the [table] sections against each other and their sources, and
 * moves each rule to its source.  What needs the source's catalog (is a
 * filtered column part of the table's key?) is checked at start (filter.c).
 */
static void check_rules(parser_t *p)
{
    wp_config_t *config = p->config;

    for (size_t i = 0; i < config->nsources; i++) {
        const wp_source_config_t *source = &config->sources[i];
        for (size_t k = 0; k < source->nexclude_tables; k++) {
            const wp_table_ref_t *t = &source->exclude_tables[k];
            if (refs_have(source->tables, source->ntables, t->schema, t->table)) {
                fail(p, key_line_of(p->states[i].key_line, SECTION_SOURCE, "exclude_tables"),
                     "table %s.%s is in both tables and exclude_tables of [source %s]; remove it from one", t->schema,
                     t->table, source->name);
                return;
            }
        }
    }
    for (size_t r = 0; r < p->nrules; r++) {
        wp_table_rule_t *rule = &p->rules[r];
        const int *lines = p->rule_states[r].key_line;
        wp_source_config_t *source = NULL;
        size_t si;
        char label[256];

        snprintf(label, sizeof label, "[table %s.%s.%s]", p->rule_sources[r], rule->schema, rule->table);
        for (si = 0; si < config->nsources; si++) {
            if (strcmp(config->sources[si].name, p->rule_sources[r]) == 0) {
                source = &config->sources[si];
                break;
            }
        }
        if (source == NULL) {
            fail(p, rule->line, "%s names source \"%s\", which has no [source %s] section; fix the name or add the "
                 "source", label, p->rule_sources[r], p->rule_sources[r]);
            return;
        }
        if (refs_have(source->exclude_tables, source->nexclude_tables, rule->schema, rule->table)) {
            fail(p, rule->line, "%s: the table is in exclude_tables of [source %s], so it is never captured; remove "
                 "the section or the exclusion", label, source->name);
            return;
        }
        if (source->tables && !refs_have(source->tables, source->ntables, rule->schema, rule->table)) {
            fail(p, rule->line, "%s: the table is not in tables of [source %s], so it is never captured; add it "
                 "there or remove the section", label, source->name);
            return;
        }
        if (rule->include && rule->exclude) {
            int a = key_line_of(lines, SECTION_TABLE, "include_columns");
            int b = key_line_of(lines, SECTION_TABLE, "exclude_columns");
            fail(p, a > b ? a : b, "%s sets both include_columns (line %d) and exclude_columns (line %d); keep one: "
                 "include_columns lists the columns kept, exclude_columns those dropped", label, a, b);
            return;
        }
        if (!rule->include && !rule->exclude && !rule->masks) {
            fail(p, rule->line, "%s has no include_columns, exclude_columns or mask; add one or remove the section",
                 label);
            return;
        }
        int mask_line = key_line_of(lines, SECTION_TABLE, "mask");
        for (size_t m = 0; m < rule->nmasks; m++) {
            const wp_column_mask_t *mask = &rule->masks[m];
            if (names_have(rule->exclude, rule->nexclude, mask->column)) {
                fail(p, mask_line, "column \"%s\" of %s is both excluded and masked; an excluded column is never "
                     "staged: remove it from mask or from exclude_columns", mask->column, label);
                return;
            }
            if (rule->include && !names_have(rule->include, rule->ninclude, mask->column)) {
                fail(p, mask_line, "column \"%s\" of %s is masked but not in include_columns, so it is never "
                     "staged; add it to include_columns or remove its mask", mask->column, label);
                return;
            }
            if (mask->kind == WP_MASK_SHA256 && source->mask_salt == NULL) {
                fail(p, mask_line, "column \"%s\" of %s is masked with sha256 but [source %s] (line %d) has no "
                     "mask_salt; add mask_salt = ${NAME} there (a random secret of at least 16 bytes)",
                     mask->column, label, source->name, source->line);
                return;
            }
        }
        /* move the rule to its source */
        source->rules = wp_realloc(source->rules, (source->nrules + 1) * sizeof *source->rules);
        source->rules[source->nrules++] = *rule;
        memset(rule, 0, sizeof *rule);
    }
}

/* Checks what no single line can: required keys, defaults, slot clashes. */
static void check_complete(parser_t *p)
{
    wp_config_t *config = p->config;

    if (p->staging_line == 0) {
        fail(p, 0, "missing [staging] section; add one with conninfo = <libpq connection string>");
        return;
    }
    if (config->staging_conninfo == NULL) {
        fail(p, p->staging_line, "[staging] has no conninfo; add conninfo = <libpq connection string>");
        return;
    }
    if (config->nsources == 0) {
        fail(p, 0, "no [source NAME] section; add at least one, with conninfo = <libpq connection string>");
        return;
    }
    for (size_t i = 0; i < config->nsources; i++) {
        wp_source_config_t *source = &config->sources[i];
        if (source->conninfo == NULL) {
            fail(p, source->line, "[source %s] has no conninfo; add conninfo = <libpq connection string>",
                 source->name);
            return;
        }
        if (source->slot == NULL) {
            source->slot = default_slot(source->name);
            if (!is_slot_name(source->slot)) {
                fail(p, source->line,
                     "the default slot name for [source %s] is longer than %d characters; set slot = <name>",
                     source->name, NAME_MAX_LEN);
                return;
            }
        }
    }
    for (size_t i = 0; i < config->nsinks; i++) {
        const wp_sink_config_t *sink = &config->sinks[i];
        if (sink->plugin == NULL) {
            fail(p, sink->line, "[sink %s] has no plugin; add plugin = jsonl (or kafka, http, or the NAME of a "
                 "walpipe_sink_NAME.so)", sink->name);
            return;
        }
        for (size_t k = 0; k < sink->nsources; k++) {
            bool known = false;
            for (size_t j = 0; j < config->nsources; j++)
                known = known || strcmp(config->sources[j].name, sink->sources[k]) == 0;
            if (!known) {
                fail(p, key_line_of(p->sink_states[i].key_line, SECTION_SINK, "sources"),
                     "sources of [sink %s] names \"%s\", which has no [source %s] section; fix the name or add the "
                     "source", sink->name, sink->sources[k], sink->sources[k]);
                return;
            }
        }
    }
    size_t slot_key = 0;
    while (key_specs[slot_key].type != TYPE_SLOT)
        slot_key++;
    for (size_t i = 1; i < config->nsources; i++) {
        const wp_source_config_t *source = &config->sources[i];
        for (size_t j = 0; j < i; j++) {
            const wp_source_config_t *other = &config->sources[j];
            if (strcmp(source->slot, other->slot) != 0)
                continue;
            int line = p->states[i].key_line[slot_key] ? p->states[i].key_line[slot_key] : source->line;
            fail(p, line,
                 "[source %s] uses slot \"%s\", which [source %s] (line %d) already uses; set a different slot = "
                 "in one of them",
                 source->name, source->slot, other->name, other->line);
            return;
        }
    }
}

static wp_config_t *parse_text(const char *text, size_t len, const char *name, char *errbuf, size_t errlen)
{
    parser_t p;
    wp_config_t *result = NULL;
    int rc;

    memset(&p, 0, sizeof p);
    p.name = name;
    p.text = text;
    p.len = len;
    p.config = config_new(name);

    rc = ini_parse_stream(read_line_cb, &p, handle_key_cb, &p);
    if (rc > 0 && (!p.failed || rc < p.err_line)) {
        /* inih's own complaint: a line that is neither comment, [section] nor key = value. */
        p.failed = false;
        fail(&p, rc, "expected \"key = value\", a [section] header or a comment");
    } else if (rc < 0) {
        p.failed = false;
        fail(&p, 0, "could not parse the file (libinih error %d)", rc);
    }
    if (!p.failed)
        check_complete(&p);
    if (!p.failed)
        check_rules(&p);
    if (p.failed) {
        set_error(errbuf, errlen, "%s", p.err);
        goto out;
    }
    result = p.config;
    p.config = NULL;
out:
    wp_config_destroy(p.config);
    free(p.states);
    free(p.sink_states);
    for (size_t i = 0; i < p.nrules; i++) {
        free_rule(&p.rules[i]);
        free(p.rule_sources[i]);
    }
    free(p.rules);
    free(p.rule_sources);
    free(p.rule_states);
    wp_buf_free(&p.value);
    return result;
}

wp_config_t *wp_config_parse_string(const char *text, const char *name, char *errbuf, size_t errlen)
{
    set_error(errbuf, errlen, "%s", "");
    return parse_text(text, strlen(text), name ? name : "(string)", errbuf, errlen);
}

wp_config_t *wp_config_load(const char *path, char *errbuf, size_t errlen)
{
    wp_config_t *config = NULL;
    wp_buf_t text = WP_BUF_INIT;
    FILE *file;

    set_error(errbuf, errlen, "%s", "");
    file = fopen(path, "r");
    if (file == NULL) {
        set_error(errbuf, errlen, "could not open \"%s\": %s", path, strerror(errno));
        goto out;
    }
    for (;;) {
        wp_buf_reserve(&text, 4096);
        size_t n = fread(text.data + text.len, 1, text.cap - text.len - 1, file);
        text.len += n;
        text.data[text.len] = '\0';
        if (n == 0)
            break;
    }
    if (ferror(file)) {
        set_error(errbuf, errlen, "could not read \"%s\": %s", path, strerror(errno));
        goto out;
    }
    config = parse_text(text.data, text.len, path, errbuf, errlen);
out:
    if (file != NULL)
        fclose(file);
    wp_buf_free(&text);
    return config;
}

/* Appends a conninfo value, single-quoted when libpq would need it. */
static void put_conninfo_value(wp_buf_t *out, const char *val)
{
    bool quote = val[0] == '\0' || strpbrk(val, " \t\n\r\f\v'\\") != NULL;

    if (!quote) {
        wp_buf_puts(out, val);
        return;
    }
    wp_buf_putc(out, '\'');
    for (const char *s = val; *s; s++) {
        if (*s == '\'' || *s == '\\')
            wp_buf_putc(out, '\\');
        wp_buf_putc(out, *s);
    }
    wp_buf_putc(out, '\'');
}

char *wp_config_conninfo_redacted(const char *conninfo)
{
    static const char *const keep[] = {"host", "port", "dbname", "user"};
    wp_buf_t out = WP_BUF_INIT;
    PQconninfoOption *opts;
    char *errmsg = NULL;
    char *result = NULL;

    opts = PQconninfoParse(conninfo ? conninfo : "", &errmsg);
    if (opts == NULL) {
        result = wp_strdup("(unparsable conninfo)");
        goto out;
    }
    wp_buf_append(&out, "", 0);
    for (size_t k = 0; k < sizeof keep / sizeof keep[0]; k++) {
        for (const PQconninfoOption *opt = opts; opt->keyword != NULL; opt++) {
            /* A URI with several hosts and no ports yields port=",": not set either. */
            if (strcmp(opt->keyword, keep[k]) != 0 || opt->val == NULL || opt->val[strspn(opt->val, ",")] == '\0')
                continue;
            if (out.len > 0)
                wp_buf_putc(&out, ' ');
            wp_buf_printf(&out, "%s=", opt->keyword);
            /*
             * libpq expands a dbname holding '=' or starting with a URI
             * prefix as a whole conninfo, password included: never shown.
             */
            if (strchr(opt->val, '=') != NULL || strncmp(opt->val, "postgresql://", 13) == 0 ||
                strncmp(opt->val, "postgres://", 11) == 0)
                wp_buf_puts(&out, "(hidden)");
            else
                put_conninfo_value(&out, opt->val);
        }
    }
    result = out.data;
    out.data = NULL;
out:
    PQconninfoFree(opts);
    PQfreemem(errmsg);
    wp_buf_free(&out);
    return result;
}

int wp_config_parse_tables(const char *text, wp_table_ref_t **tables, size_t *ntables, char *errbuf, size_t errlen)
{
    parser_t p;
    wp_source_config_t source;
    memset(&p, 0, sizeof p);
    memset(&source, 0, sizeof source);
    p.name = "--table";
    *tables = NULL;
    *ntables = 0;
    if (!parse_tables(&p, "tables", "the command line", text, &source.tables, &source.ntables)) {
        set_error(errbuf, errlen, "%s", p.err);
        return -1;
    }
    *tables = source.tables;
    *ntables = source.ntables;
    return 0;
}

void wp_config_free_tables(wp_table_ref_t *tables, size_t ntables)
{
    free_tables(tables, ntables);
}

int wp_config_parse_listen(const char *value, char *host, size_t hostlen, int *port)
{
    const char *colon = strrchr(value, ':');
    const char *portstr = colon ? colon + 1 : value;
    size_t n = colon ? (size_t)(colon - value) : 0;
    long long v;
    if (!parse_int(portstr, 1, 65535, &v))
        return -1;
    if (colon == NULL) {
        snprintf(host, hostlen, "127.0.0.1"); /* listeners are on loopback unless told otherwise */
    } else {
        const char *h = value;
        if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
            h++;
            n -= 2;
        }
        if (n == 0 || n >= hostlen)
            return -1;
        memcpy(host, h, n);
        host[n] = '\0';
        for (size_t i = 0; i < n; i++)
            if (!(is_digit(host[i]) || host[i] == '.' || host[i] == ':' || (host[i] >= 'a' && host[i] <= 'f') ||
                  (host[i] >= 'A' && host[i] <= 'F')))
                return -1;
    }
    *port = (int)v;
    return 0;
}
