/*
 * test_config.c: the configuration file parser and conninfo redaction.
 *
 * Every conninfo in these tests carries the password PASSWORD so that each
 * error test can also check that no message ever quotes it.
 */
#include "wp_setup.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"

#define PASSWORD "s3cretPW"
#define STAGING "[staging]\nconninfo = host=stage password=" PASSWORD "\n"
#define SOURCE "[source app]\nconninfo = host=src password=" PASSWORD "\n"

static wp_config_t *parse(const char *text, char *err, size_t errlen)
{
    return wp_config_parse_string(text, "t.ini", err, errlen);
}

/*
 * Asserts that text is rejected with a message that starts with "t.ini:LINE: "
 * (or "t.ini: " when line is 0), contains needle, and has no password.
 */
static void expect_error_at(const char *text, int line, const char *needle, const char *where)
{
    char err[WP_ERRLEN];
    char prefix[32];
    wp_config_t *config = parse(text, err, sizeof err);

    if (config != NULL) {
        wp_config_destroy(config);
        fail_msg("%s: accepted:\n%s", where, text);
    }
    if (line > 0)
        snprintf(prefix, sizeof prefix, "t.ini:%d: ", line);
    else
        snprintf(prefix, sizeof prefix, "t.ini: ");
    if (strncmp(err, prefix, strlen(prefix)) != 0)
        fail_msg("%s: expected \"%s\" at the start of: %s", where, prefix, err);
    if (strstr(err, needle) == NULL)
        fail_msg("%s: expected \"%s\" in: %s", where, needle, err);
    if (strstr(err, PASSWORD) != NULL)
        fail_msg("%s: the password leaked into: %s", where, err);
}

#define expect_error(text, line, needle) expect_error_at(text, line, needle, __FILE__ ":" WP_STR(__LINE__))
#define WP_STR(x) WP_STR2(x)
#define WP_STR2(x) #x

static void test_full_config(void **state)
{
    (void)state;
    char err[WP_ERRLEN] = "x";
    const char *text = "; walpipe test configuration\n"                              /* 1 */
                       "# comments both ways\n"                                      /* 2 */
                       "[walpipe]\n"                                                 /* 3 */
                       "log_level = debug\n"                                         /* 4 */
                       "\n"                                                          /* 5 */
                       "[staging]\n"                                                 /* 6 */
                       "conninfo = host=stage dbname=cdc password=" PASSWORD "\n"    /* 7 */
                       "batch_rows = 500\n"                                          /* 8 */
                       "batch_bytes = 16MB\n"                                        /* 9 */
                       "batch_ms = 250 ; inline comment\n"                           /* 10 */
                       "payload_gin_index = yes\n"                                   /* 11 */
                       "partitions_ahead = 30\n"                                     /* 12 */
                       "[source app-db]\n"                                           /* 13 */
                       "conninfo = postgresql://cdc:" PASSWORD "@src:5433/app\n"     /* 14 */
                       "tables = public.orders, public.users\n"                      /* 15 */
                       "status_interval_ms = 100\n"                                  /* 16 */
                       "[source Billing]\n"                                          /* 17 */
                       "conninfo = host=billing\n"                                   /* 18 */
                       "slot = billing_slot\n";                                      /* 19 */
    wp_config_t *config = parse(text, err, sizeof err);

    if (config == NULL)
        fail_msg("%s", err);
    assert_string_equal(err, "");
    assert_string_equal(config->path, "t.ini");
    assert_int_equal(config->log_level, WP_LOG_DEBUG);
    assert_string_equal(config->staging_conninfo, "host=stage dbname=cdc password=" PASSWORD);
    assert_int_equal(config->batch_rows, 500);
    assert_int_equal(config->batch_bytes, 16 << 20);
    assert_int_equal(config->batch_ms, 250);
    assert_true(config->payload_gin_index);
    assert_int_equal(config->partitions_ahead, 30);
    assert_int_equal(config->nsources, 2);

    const wp_source_config_t *app = &config->sources[0];
    assert_string_equal(app->name, "app-db");
    assert_string_equal(app->conninfo, "postgresql://cdc:" PASSWORD "@src:5433/app");
    assert_string_equal(app->slot, "walpipe_app_db");
    assert_int_equal(app->ntables, 2);
    assert_string_equal(app->tables[0].schema, "public");
    assert_string_equal(app->tables[0].table, "orders");
    assert_string_equal(app->tables[1].schema, "public");
    assert_string_equal(app->tables[1].table, "users");
    assert_int_equal(app->status_interval_ms, 100);
    assert_int_equal(app->line, 13);

    const wp_source_config_t *billing = &config->sources[1];
    assert_string_equal(billing->name, "Billing");
    assert_string_equal(billing->conninfo, "host=billing");
    assert_string_equal(billing->slot, "billing_slot");
    assert_null(billing->tables);
    assert_int_equal(billing->ntables, 0);
    assert_int_equal(billing->status_interval_ms, 1000);
    assert_int_equal(billing->line, 17);
    wp_config_destroy(config);
}

static void test_defaults(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *config = parse(STAGING "[source Main-DB]\nconninfo = host=a\n", err, sizeof err);

    if (config == NULL)
        fail_msg("%s", err);
    assert_int_equal(config->log_level, WP_LOG_INFO);
    assert_int_equal(config->batch_rows, 10000);
    assert_int_equal(config->batch_bytes, 8 << 20);
    assert_int_equal(config->batch_ms, 50);
    assert_false(config->payload_gin_index);
    assert_int_equal(config->partitions_ahead, 7);
    assert_int_equal(config->nsources, 1);
    assert_string_equal(config->sources[0].slot, "walpipe_main_db");
    assert_null(config->sources[0].tables);
    assert_int_equal(config->sources[0].status_interval_ms, 1000);
    assert_true(config->sources[0].snapshot_initial);
    assert_int_equal(config->sources[0].snapshot_workers, 2);
    wp_config_destroy(config);
    wp_config_destroy(NULL);
}

/* Accepted spellings and bounds of each typed key. */
static void test_values(void **state)
{
    (void)state;
    static const struct {
        const char *line;
        size_t bytes;
    } sizes[] = {
        {"batch_bytes = 65536", 65536},       {"batch_bytes = 64kB", 65536},
        {"batch_bytes = 8 MB", 8 << 20},      {"batch_bytes = 1GB", 1 << 30},
        {"batch_bytes = 1073741824", 1 << 30}, {"batch_bytes = 1024MB", 1 << 30},
    };
    static const struct {
        const char *word;
        bool value;
    } bools[] = {
        {"true", true}, {"on", true},   {"yes", true}, {"1", true},   {"TRUE", true},
        {"false", false}, {"off", false}, {"no", false}, {"0", false}, {"Off", false},
    };
    char text[512], err[WP_ERRLEN];

    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        snprintf(text, sizeof text, STAGING "%s\n" SOURCE, sizes[i].line);
        wp_config_t *config = parse(text, err, sizeof err);
        if (config == NULL)
            fail_msg("%s: %s", sizes[i].line, err);
        assert_int_equal(config->batch_bytes, sizes[i].bytes);
        wp_config_destroy(config);
    }
    for (int never = 0; never < 2; never++) {
        snprintf(text, sizeof text, STAGING SOURCE "snapshot = %s\nsnapshot_workers = 16\n", never ? "never" : "initial");
        wp_config_t *config = parse(text, err, sizeof err);
        if (config == NULL)
            fail_msg("snapshot: %s", err);
        assert_int_equal(config->sources[0].snapshot_initial, !never);
        assert_int_equal(config->sources[0].snapshot_workers, 16);
        wp_config_destroy(config);
    }
    for (size_t i = 0; i < sizeof bools / sizeof bools[0]; i++) {
        snprintf(text, sizeof text, STAGING "payload_gin_index=%s\n" SOURCE, bools[i].word);
        wp_config_t *config = parse(text, err, sizeof err);
        if (config == NULL)
            fail_msg("%s: %s", bools[i].word, err);
        assert_int_equal(config->payload_gin_index, bools[i].value);
        wp_config_destroy(config);
    }

    wp_config_t *config = parse("[walpipe]\nlog_level = warning\n" STAGING "batch_rows = 1000000\nbatch_ms = 1\n"
                                "partitions_ahead = 365\n" SOURCE "status_interval_ms = 60000\n",
                                err, sizeof err);
    if (config == NULL)
        fail_msg("%s", err);
    assert_int_equal(config->log_level, WP_LOG_WARNING);
    assert_int_equal(config->batch_rows, 1000000);
    assert_int_equal(config->batch_ms, 1);
    assert_int_equal(config->partitions_ahead, 365);
    assert_int_equal(config->sources[0].status_interval_ms, 60000);
    wp_config_destroy(config);
}

/* Layout libinih or editors produce: CRLF, BOM, indentation, "key: value". */
static void test_layout(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *config = parse("\xEF\xBB\xBF[staging]\r\n"
                                "    conninfo = host=stage\r\n"
                                "    batch_ms = 7\r\n"
                                "\t\r\n"
                                "  [source app]   ; the only source\n"
                                "\tconninfo: host=src\n"
                                "  slot = s1",
                                err, sizeof err);

    if (config == NULL)
        fail_msg("%s", err);
    assert_string_equal(config->staging_conninfo, "host=stage");
    assert_int_equal(config->batch_ms, 7);
    assert_string_equal(config->sources[0].conninfo, "host=src");
    assert_string_equal(config->sources[0].slot, "s1");
    assert_int_equal(config->sources[0].line, 5);
    wp_config_destroy(config);

    /* Longer than libinih's 49-byte section buffer: the name must survive whole. */
    const char *name = "a23456789b23456789c23456789d23456789e23456789f23456789g23456789";
    char text[512];
    snprintf(text, sizeof text, STAGING "[source %s]\nconninfo = host=x\nslot = long_one\n", name);
    config = parse(text, err, sizeof err);
    if (config == NULL)
        fail_msg("%s", err);
    assert_string_equal(config->sources[0].name, name);
    wp_config_destroy(config);

    /* ...but its default slot name would be too long for PostgreSQL. */
    snprintf(text, sizeof text, STAGING "[source %s]\nconninfo = host=x\n", name);
    expect_error(text, 3, "set slot =");
}

static void test_env_expansion(void **state)
{
    (void)state;
    char err[WP_ERRLEN];

    setenv("WP_TEST_HOST", "db.example.com", 1);
    setenv("WP_TEST_PW", PASSWORD, 1);
    setenv("WP_TEST_EMPTY", "", 1);
    setenv("WP_TEST_ROWS", "42", 1);
    setenv("WP_TEST_TABLES", "public.a, \"S\".\"T\"", 1);
    setenv("WP_TEST_LITERAL", "${WP_TEST_HOST}", 1);
    unsetenv("WP_TEST_UNSET");

    wp_config_t *config = parse("[staging]\n"
                                "conninfo = host=${WP_TEST_HOST} password=${WP_TEST_PW}${WP_TEST_EMPTY} x=$5 y=$ z=$}\n"
                                "batch_rows = ${WP_TEST_ROWS}\n"
                                "[source app]\n"
                                "conninfo = dbname=${WP_TEST_LITERAL}\n"
                                "tables = ${WP_TEST_TABLES}\n"
                                "slot = s_${WP_TEST_ROWS}\n",
                                err, sizeof err);
    /* x, y and z are not libpq keys, so check expansion on a conninfo-free key first. */
    if (config != NULL)
        fail_msg("unknown libpq keywords were accepted");
    assert_non_null(strstr(err, "t.ini:2: conninfo in [staging] is not a valid libpq connection string"));
    assert_null(strstr(err, PASSWORD));

    config = parse("[staging]\n"
                   "conninfo = host=${WP_TEST_HOST} password=${WP_TEST_PW}${WP_TEST_EMPTY} application_name=a$b$\n"
                   "batch_rows = ${WP_TEST_ROWS}\n"
                   "[source app]\n"
                   "conninfo = dbname=${WP_TEST_LITERAL}\n"
                   "tables = ${WP_TEST_TABLES}\n"
                   "slot = s_${WP_TEST_ROWS}\n",
                   err, sizeof err);
    if (config == NULL)
        fail_msg("%s", err);
    assert_string_equal(config->staging_conninfo, "host=db.example.com password=" PASSWORD " application_name=a$b$");
    assert_int_equal(config->batch_rows, 42);
    /* Expansion is not recursive: a value from the environment is used as is. */
    assert_string_equal(config->sources[0].conninfo, "dbname=${WP_TEST_HOST}");
    assert_int_equal(config->sources[0].ntables, 2);
    assert_string_equal(config->sources[0].tables[1].schema, "S");
    assert_string_equal(config->sources[0].tables[1].table, "T");
    assert_string_equal(config->sources[0].slot, "s_42");
    wp_config_destroy(config);

    expect_error(STAGING "[source app]\nconninfo = host=${WP_TEST_UNSET} password=" PASSWORD "\n", 4,
                 "environment variable \"WP_TEST_UNSET\" is not set (referenced by key \"conninfo\" in [source app])");
    expect_error(STAGING "batch_ms = ${WP_TEST_UNSET}\n" SOURCE, 3,
                 "environment variable \"WP_TEST_UNSET\" is not set (referenced by key \"batch_ms\" in [staging])");
    expect_error(STAGING "[source app]\nconninfo = password=" PASSWORD "${oops\n", 4, "malformed \"${\"");
    expect_error(STAGING "[source app]\nconninfo = password=${" PASSWORD "-x}\n", 4, "key \"conninfo\" in [source app]");
    expect_error(STAGING "[source app]\nconninfo = password=${}\n", 4, "malformed");
    expect_error(STAGING "[source app]\nconninfo = password=${1A}\n", 4, "malformed");
    /* An empty variable is allowed, but an empty conninfo is not. */
    expect_error(STAGING "[source app]\nconninfo = ${WP_TEST_EMPTY}\n", 4, "conninfo in [source app] is empty");
}

static void test_tables(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *config = parse(STAGING "[source app]\nconninfo = host=x\n"
                                        "tables = public.orders,\"My Schema\".\"Weird, Table\" , public.\"Orders\","
                                        "\"a\"\"b\".\"x.y\", Sales . Items,s.$t\n",
                                err, sizeof err);

    if (config == NULL)
        fail_msg("%s", err);
    const wp_source_config_t *source = &config->sources[0];
    static const char *const want[][2] = {
        {"public", "orders"}, {"My Schema", "Weird, Table"}, {"public", "Orders"},
        {"a\"b", "x.y"},      {"Sales", "Items"},            {"s", "$t"},
    };
    assert_int_equal(source->ntables, sizeof want / sizeof want[0]);
    for (size_t i = 0; i < source->ntables; i++) {
        assert_string_equal(source->tables[i].schema, want[i][0]);
        assert_string_equal(source->tables[i].table, want[i][1]);
    }
    wp_config_destroy(config);

#define T(list) STAGING "[source app]\nconninfo = host=x password=" PASSWORD "\ntables = " list "\n"
    expect_error(T("orders"), 5, "table \"orders\" in tables of [source app] has no schema; write schema.table");
    expect_error(T("public.a, users"), 5, "\"users\" in tables of [source app] has no schema");
    expect_error(T("public.a,,public.b"), 5, "entry 2 of tables in [source app] is empty");
    expect_error(T("public.a,"), 5, "entry 2 of tables in [source app] is empty");
    expect_error(T(", public.a"), 5, "entry 1 of tables in [source app] is empty");
    expect_error(T(""), 5, "tables in [source app] is empty");
    expect_error(T("db.public.a"), 5, "more than two dot-separated names");
    expect_error(T("public."), 5, "empty schema or table name");
    expect_error(T(".a"), 5, "empty schema or table name");
    expect_error(T("public.\"open"), 5, "unterminated quoted name");
    expect_error(T("public.\"\""), 5, "empty quoted name");
    expect_error(T("public.*"), 5, "wildcard");
    expect_error(T("public.my-table"), 5, "unexpected '-'");
    expect_error(T("public.\"a\"b"), 5, "unexpected 'b'");
    expect_error(T("public.a public.b"), 5, "unexpected 'p'");
    expect_error(T("public.a, public.a"), 5, "listed twice");
    expect_error(T("public.a234567890123456789012345678901234567890123456789012345678901234"), 5,
                 "longer than 63 bytes");
#undef T
}

static void test_section_errors(void **state)
{
    (void)state;
    expect_error(STAGING "[stagin]\n" SOURCE, 3,
                 "unknown section [stagin]; expected [walpipe], [staging], [workers], [metrics], [source NAME], "
                 "[table SOURCE.SCHEMA.TABLE] or [sink NAME]");
    expect_error(STAGING "[sourceapp]\n" SOURCE, 3, "unknown section [sourceapp]");
    expect_error(STAGING "\n[source]\n" SOURCE, 4, "[source] needs a name");
    expect_error(STAGING "[source a.b]\n", 3, "invalid source name \"a.b\"");
    expect_error(STAGING "[source a b]\n", 3, "invalid source name \"a b\"");
    expect_error(STAGING
                 "[source a234567890123456789012345678901234567890123456789012345678901234]\nconninfo = host=x\n",
                 3, "invalid source name");
    expect_error(STAGING SOURCE "\n[source app]\nconninfo = host=b\n", 6,
                 "duplicate section [source app] (first at line 3)");
    expect_error(STAGING SOURCE "[staging]\n", 5, "duplicate section [staging] (first at line 1)");
    expect_error("[walpipe]\n[walpipe]\n", 2, "duplicate section [walpipe]");
    expect_error(STAGING "[source app\n", 3, "no closing \"]\"");
    expect_error(STAGING "[source app] conninfo = x\n", 3, "unexpected text after \"]\"");
    expect_error("batch_ms = 5\n" STAGING SOURCE, 1, "key \"batch_ms\" comes before any section");
}

static void test_key_errors(void **state)
{
    (void)state;
    expect_error(STAGING "batch_row = 5\n" SOURCE, 3,
                 "unknown key \"batch_row\" in [staging]; valid keys are: conninfo, batch_rows, batch_bytes, batch_ms, "
                 "payload_gin_index, partitions_ahead");
    expect_error(STAGING SOURCE "password = " PASSWORD "\n", 5, "unknown key \"password\" in [source app]");
    expect_error("[walpipe]\nloglevel = info\n", 2, "valid keys are: log_level");
    expect_error(STAGING "= 5\n", 3, "missing key name");
    expect_error(STAGING "batch_ms = 5\nbatch_rows = 5\nbatch_ms = 6\n" SOURCE, 5,
                 "duplicate key \"batch_ms\" in [staging] (first set at line 3)");
    expect_error(STAGING SOURCE "conninfo = host=other password=" PASSWORD "\n", 5,
                 "duplicate key \"conninfo\" in [source app] (first set at line 4)");
    expect_error(STAGING "just some words\n" SOURCE, 3, "expected \"key = value\", a [section] header or a comment");
    /* A syntax error is reported even when a later line also fails. */
    expect_error(STAGING "oops\nbogus = 1\n" SOURCE, 3, "expected \"key = value\"");
    /* ...and a key error before it wins. */
    expect_error(STAGING "bogus = 1\noops\n" SOURCE, 3, "unknown key \"bogus\"");
}

static void test_value_errors(void **state)
{
    (void)state;
    expect_error("[walpipe]\nlog_level = verbose\n", 2, "log_level in [walpipe] must be debug, info, warning or error");
    expect_error(STAGING "batch_rows = 0\n" SOURCE, 3, "batch_rows in [staging] must be an integer from 1 to 1000000");
    expect_error(STAGING "batch_rows = 1000001\n" SOURCE, 3, "from 1 to 1000000 (got \"1000001\")");
    expect_error(STAGING "batch_rows = ten\n" SOURCE, 3, "(got \"ten\")");
    expect_error(STAGING "batch_rows = -5\n" SOURCE, 3, "from 1 to 1000000");
    expect_error(STAGING "batch_rows = 5x\n" SOURCE, 3, "from 1 to 1000000");
    expect_error(STAGING "batch_rows = 99999999999999999999999\n" SOURCE, 3, "from 1 to 1000000");
    expect_error(STAGING "batch_rows =\n" SOURCE, 3, "(got \"\")");
    expect_error(STAGING "batch_ms = 60001\n" SOURCE, 3, "batch_ms in [staging] must be an integer from 1 to 60000");
    expect_error(STAGING "partitions_ahead = 366\n" SOURCE, 3, "from 1 to 365");
    expect_error(STAGING SOURCE "status_interval_ms = 99\n", 5,
                 "status_interval_ms in [source app] must be an integer from 100 to 60000");
    expect_error(STAGING "batch_bytes = 63kB\n" SOURCE, 3, "batch_bytes in [staging] must be a size from 64kB to 1GB");
    expect_error(STAGING "batch_bytes = 1073741825\n" SOURCE, 3, "from 64kB to 1GB");
    expect_error(STAGING "batch_bytes = 2GB\n" SOURCE, 3, "from 64kB to 1GB");
    expect_error(STAGING "batch_bytes = 8mb\n" SOURCE, 3, "kB, MB or GB");
    expect_error(STAGING "batch_bytes = 8 TB\n" SOURCE, 3, "kB, MB or GB");
    expect_error(STAGING "batch_bytes = 18446744073709551615GB\n" SOURCE, 3, "from 64kB to 1GB");
    expect_error(STAGING "batch_bytes = 99999999999999999999999\n" SOURCE, 3, "from 64kB to 1GB");
    expect_error(STAGING SOURCE "snapshot = sometimes\n", 5, "snapshot in [source app] must be initial or never");
    expect_error(STAGING SOURCE "snapshot_workers = 0\n", 5, "snapshot_workers in [source app] must be an integer from 1 to 16");
    expect_error(STAGING "payload_gin_index = maybe\n" SOURCE, 3,
                 "payload_gin_index in [staging] must be true or false (or on/off, yes/no, 1/0) (got \"maybe\")");
    expect_error(STAGING SOURCE "slot = Bad-Slot\n", 5, "slot in [source app] must be a replication slot name");
    expect_error(STAGING SOURCE "slot =\n", 5, "replication slot name");
    expect_error(STAGING SOURCE "slot = a234567890123456789012345678901234567890123456789012345678901234\n", 5,
                 "1 to 63 lower-case letters");
    expect_error("[staging]\nconninfo = host=x password=" PASSWORD " nosuchkey=1\n" SOURCE, 2,
                 "conninfo in [staging] is not a valid libpq connection string");
    expect_error("[staging]\nconninfo = host=x password='" PASSWORD "\n" SOURCE, 2, "not a valid libpq");
    expect_error("[staging]\nconninfo = postgresql://u:" PASSWORD "@h:notaport/db?bad=1\n" SOURCE, 2,
                 "not a valid libpq");
    expect_error("[staging]\nconninfo =\n" SOURCE, 2, "conninfo in [staging] is empty");
}

static void test_missing_errors(void **state)
{
    (void)state;
    expect_error("", 0, "missing [staging] section");
    expect_error("; nothing here\n" SOURCE, 0, "missing [staging] section");
    expect_error("[walpipe]\n\n[staging]\nbatch_ms = 5\n" SOURCE, 3, "[staging] has no conninfo; add conninfo =");
    expect_error(STAGING, 0, "no [source NAME] section; add at least one");
    expect_error(STAGING SOURCE "[source empty]\n", 5, "[source empty] has no conninfo");
    expect_error(STAGING "[source b]\nslot = x\n" SOURCE, 3, "[source b] has no conninfo");
}

static void test_slot_clashes(void **state)
{
    (void)state;
    /* Two names that map to the same default slot. */
    expect_error(STAGING "[source a-b]\nconninfo = host=x\n[source a_b]\nconninfo = host=y\n", 5,
                 "[source a_b] uses slot \"walpipe_a_b\", which [source a-b] (line 3) already uses");
    expect_error(STAGING "[source App]\nconninfo = host=x\n[source app]\nconninfo = host=y\n", 5,
                 "slot \"walpipe_app\"");
    /* An explicit slot clashing with a default one is blamed on its line. */
    expect_error(STAGING SOURCE "[source other]\nconninfo = host=y\n\nslot = walpipe_app\n", 8,
                 "[source other] uses slot \"walpipe_app\", which [source app] (line 3) already uses");
}

/* Lines longer than libinih's buffer are refused, never split into a second "key". */
static void test_long_line(void **state)
{
    (void)state;
    char text[1024];
    char filler[300];

    memset(filler, 'h', sizeof filler - 1);
    filler[sizeof filler - 1] = '\0';
    snprintf(text, sizeof text, STAGING "[source app]\nconninfo = host=%.180s password=" PASSWORD "\n", filler);
    expect_error(text, 4, "line is too long");

    /* 199 characters still fit. */
    snprintf(text, sizeof text, STAGING "[source app]\nconninfo = host=%.*s\n", 199 - 16, filler);
    char err[WP_ERRLEN];
    wp_config_t *config = parse(text, err, sizeof err);
    if (config == NULL)
        fail_msg("%s", err);
    assert_int_equal(strlen(config->sources[0].conninfo), 199 - 11);
    wp_config_destroy(config);
    snprintf(text, sizeof text, STAGING "[source app]\nconninfo = host=%.*s\n", 200 - 16, filler);
    expect_error(text, 4, "at most 199 allowed");
}

static void test_small_errbuf(void **state)
{
    (void)state;
    char err[8];
    wp_config_t *config = parse("[nope]\n", err, sizeof err);
    assert_null(config);
    assert_string_equal(err, "t.ini:1");
    assert_null(parse("[nope]\n", NULL, 0));
}

static void test_load_file(void **state)
{
    (void)state;
    char path[] = "/tmp/walpipe-test-config-XXXXXX";
    char err[WP_ERRLEN];
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *f = fdopen(fd, "w");
    assert_non_null(f);
    fputs(STAGING "batch_ms = 9\n" SOURCE, f);
    fclose(f);

    wp_config_t *config = wp_config_load(path, err, sizeof err);
    if (config == NULL)
        fail_msg("%s", err);
    assert_string_equal(config->path, path);
    assert_int_equal(config->batch_ms, 9);
    assert_string_equal(config->sources[0].slot, "walpipe_app");
    wp_config_destroy(config);

    f = fopen(path, "w");
    assert_non_null(f);
    fputs(STAGING "batch_ms = 0\n" SOURCE, f);
    fclose(f);
    assert_null(wp_config_load(path, err, sizeof err));
    char want[128];
    snprintf(want, sizeof want, "%s:3: batch_ms in [staging] must be an integer from 1 to 60000", path);
    assert_non_null(strstr(err, want));
    unlink(path);

    assert_null(wp_config_load(path, err, sizeof err));
    snprintf(want, sizeof want, "could not open \"%s\": No such file or directory", path);
    assert_string_equal(err, want);
}

static void test_redacted(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"host=h port=5432 dbname=d user=u password=" PASSWORD " sslmode=require", "host=h port=5432 dbname=d user=u"},
        {"password=" PASSWORD " user=u host=h", "host=h user=u"},
        {"postgresql://cdc:" PASSWORD "@db.example.com:5433/app?sslmode=require",
         "host=db.example.com port=5433 dbname=app user=cdc"},
        {"postgresql://h1,h2/app?password=" PASSWORD, "host=h1,h2 dbname=app"},
        {"dbname='my db' user='o\\'brien' password=" PASSWORD, "dbname='my db' user='o\\'brien'"},
        {"dbname='host=h password=" PASSWORD "'", "dbname=(hidden)"},
        {"dbname=postgresql://u:" PASSWORD "@h/db", "dbname=(hidden)"},
        {"host=x dbname=postgres://u:" PASSWORD "@h:5433/db user=v", "host=x dbname=(hidden) user=v"},
        {"postgresql://u:" PASSWORD "@h/db?password=" PASSWORD "&dbname=postgresql%3A%2F%2Fu%3A" PASSWORD "%40h%2Fdb",
         "host=h dbname=(hidden) user=u"},
        {"password=" PASSWORD, ""},
        {"", ""},
        {"host=h password='" PASSWORD, "(unparsable conninfo)"},
        {"host=h bogus=" PASSWORD, "(unparsable conninfo)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *redacted = wp_config_conninfo_redacted(cases[i][0]);
        assert_non_null(redacted);
        assert_string_equal(redacted, cases[i][1]);
        assert_null(strstr(redacted, PASSWORD));
        free(redacted);
    }
}

/* The commented sample shipped at the top of the repository is a valid configuration. */
/* [workers]: defaults, every key, and the errors of each. */
static void test_workers(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *c = parse(STAGING SOURCE, err, sizeof err);

    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->workers, 1);
    assert_int_equal(c->claim_size, 1000);
    assert_string_equal(c->mirror_schema, "analytics");
    assert_string_equal(c->mirror_table, "{schema}_{table}");
    assert_int_equal(c->max_attempts, 5);
    assert_int_equal(c->retry_backoff_ms, 1000);
    assert_true(c->resync_auto);
    wp_config_destroy(c);

    c = parse(STAGING SOURCE "[workers]\ncount = 0\nclaim_size = 50\nmirror_schema = My Mirror\n"
                             "mirror_table = {source}__{schema}.{table}\nmax_attempts = 9\nretry_backoff_ms = 250\n"
                             "resync = off\n",
              err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->workers, 0);
    assert_int_equal(c->claim_size, 50);
    assert_string_equal(c->mirror_schema, "My Mirror");
    assert_string_equal(c->mirror_table, "{source}__{schema}.{table}");
    assert_int_equal(c->max_attempts, 9);
    assert_int_equal(c->retry_backoff_ms, 250);
    assert_false(c->resync_auto);
    wp_config_destroy(c);

    /* the section may come first, and {table} alone is enough */
    c = parse("[workers]\nmirror_table = {table}\n" STAGING SOURCE, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_string_equal(c->mirror_table, "{table}");
    wp_config_destroy(c);

    expect_error(STAGING SOURCE "[workers]\ncount = 65\n", 6, "count in [workers] must be an integer from 0 to 64");
    expect_error(STAGING SOURCE "[workers]\nclaim_size = 0\n", 6, "claim_size in [workers] must be an integer from 1");
    expect_error(STAGING SOURCE "[workers]\nmax_attempts = -1\n", 6, "max_attempts in [workers] must be an integer");
    expect_error(STAGING SOURCE "[workers]\nretry_backoff_ms = 5\n", 6, "retry_backoff_ms in [workers] must be");
    expect_error(STAGING SOURCE "[workers]\nworkers = 2\n", 6,
                 "unknown key \"workers\" in [workers]; valid keys are: count, claim_size, mirror_schema, mirror_table, "
                 "max_attempts, retry_backoff_ms, resync");
    expect_error(STAGING SOURCE "[workers]\nresync = sometimes\n", 6, "resync in [workers] must be auto or off");
    expect_error(STAGING SOURCE "[workers]\nmirror_schema = "
                                "a234567890123456789012345678901234567890123456789012345678901234\n",
                 6, "mirror_schema in [workers] must be a name of 1 to 63 bytes");
    expect_error(STAGING SOURCE "[workers]\nmirror_table = {schema}_x\n", 6, "must contain {table}");
    expect_error(STAGING SOURCE "[workers]\nmirror_table = {tabel}\n", 6, "unknown placeholder");
    expect_error(STAGING SOURCE "[workers]\nmirror_table = {table\n", 6, "unknown placeholder");
    expect_error(STAGING SOURCE "[workers]\nmirror_table = t}{table}\n", 6, "'}' without '{'");
    expect_error(STAGING SOURCE "[workers]\ncount = 1\n[workers]\n", 7, "duplicate section [workers] (first at line 5)");
}

static void test_example_file(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    setenv("APP_PW", "example-secret", 1);
    setenv("MASK_SALT", "example-salt-0123456789", 1);
    wp_config_t *c = wp_config_load(WP_TEST_DATA "/../../walpipe.conf.example", err, sizeof err);
    if (c == NULL)
        fail_msg("walpipe.conf.example: %s", err);
    assert_int_equal(c->nsources, 1);
    assert_string_equal(c->sources[0].slot, "walpipe_app");
    assert_int_equal(c->sources[0].ntables, 2);
    assert_int_equal(c->batch_rows, 10000);
    assert_int_equal(c->batch_bytes, 8 * 1024 * 1024);
    assert_int_equal(c->workers, 1);
    assert_string_equal(c->mirror_schema, "analytics");
    assert_int_equal(c->sources[0].nexclude_tables, 1);
    assert_int_equal(c->sources[0].nrules, 1);
    assert_int_equal(c->sources[0].rules[0].nmasks, 3);
    assert_string_equal(c->metrics_listen, "127.0.0.1:9187");
    assert_int_equal(c->sources[0].max_lag_bytes, 1024 * 1024 * 1024);
    assert_int_equal(c->sources[0].max_stall_seconds, 300);
    assert_int_equal(c->log_format, WP_LOG_FORMAT_TEXT);
    assert_int_equal(c->nsinks, 1);
    assert_string_equal(c->sinks[0].plugin, "jsonl");
    assert_int_equal(c->sinks[0].nkeys, 3);
    wp_config_destroy(c);
}

#define SALT "0123456789abcdef-salt"

static void test_filters(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *c = parse(STAGING "[table app.public.users]\n"                    /* 3 */
                                   "exclude_columns = ssn, \"Date of birth\"\n"    /* 4 */
                                   "mask = email:sha256, phone : redact,notes:null\n" /* 5 */
                                   "[source app]\n"                                  /* 6 */
                                   "conninfo = host=src password=" PASSWORD "\n"
                                   "exclude_tables = public.audit, \"odd.schema\".\"a, b\"\n"
                                   "mask_salt = " SALT "\n"
                                   "[table app.\"odd.schema\".\"Keep\"]\n"
                                   "include_columns = id, \"Name\"\n",
                           err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    const wp_source_config_t *s = &c->sources[0];
    assert_int_equal(s->nexclude_tables, 2);
    assert_string_equal(s->exclude_tables[1].schema, "odd.schema");
    assert_string_equal(s->exclude_tables[1].table, "a, b");
    assert_string_equal(s->mask_salt, SALT);
    assert_int_equal(s->nrules, 2);
    const wp_table_rule_t *r = &s->rules[0];
    assert_string_equal(r->table, "users");
    assert_int_equal(r->nexclude, 2);
    assert_string_equal(r->exclude[1], "Date of birth");
    assert_null(r->include);
    assert_int_equal(r->nmasks, 3);
    assert_string_equal(r->masks[1].column, "phone");
    assert_int_equal(r->masks[0].kind, WP_MASK_SHA256);
    assert_int_equal(r->masks[1].kind, WP_MASK_REDACT);
    assert_int_equal(r->masks[2].kind, WP_MASK_NULL);
    assert_string_equal(s->rules[1].schema, "odd.schema");
    assert_string_equal(s->rules[1].table, "Keep");
    assert_int_equal(s->rules[1].ninclude, 2);
    assert_string_equal(s->rules[1].include[1], "Name");
    wp_config_destroy(c);

#define SRC SOURCE "mask_salt = " SALT "\n"   /* lines 3, 4, 5 */
    expect_error(STAGING SRC "[table nosuch.public.t]\nmask = a:null\n", 6,
                 "[table nosuch.public.t] names source \"nosuch\", which has no [source nosuch] section");
    expect_error(STAGING SRC "[table app.public.t]\ninclude_columns = a\nexclude_columns = b\n", 8,
                 "sets both include_columns (line 7) and exclude_columns (line 8); keep one");
    expect_error(STAGING SRC "[table app.public.t]\nexclude_columns = a, b\nmask = b:redact\n", 8,
                 "column \"b\" of [table app.public.t] is both excluded and masked");
    expect_error(STAGING SRC "[table app.public.t]\ninclude_columns = a\nmask = b:redact\n", 8,
                 "column \"b\" of [table app.public.t] is masked but not in include_columns");
    expect_error(STAGING SRC "[table app.public.t]\nmask = b:md5\n", 7,
                 "unknown mask kind \"md5\" for column \"b\" in [table app.public.t]; use sha256, redact or null");
    expect_error(STAGING SRC "[table app.public.t]\nmask = b\n", 7, "(column \"b\") has no kind");
    expect_error(STAGING SRC "[table app.public.t]\nmask = b:null, b:redact\n", 7, "column \"b\" is masked twice");
    expect_error(STAGING SRC "[table app.public.t]\nexclude_columns = a,,b\n", 7, "entry 2 of exclude_columns");
    expect_error(STAGING SRC "[table app.public.t]\nexclude_columns = a, a\n", 7, "column \"a\" is listed twice");
    expect_error(STAGING SRC "[table app.public.t]\nexclude_columns = t.a\n", 7, "write the bare column name");
    expect_error(STAGING SRC "[table app.public.t]\n", 6, "has no include_columns, exclude_columns or mask");
    expect_error(STAGING SRC "[table app.public.t]\nmask = a:null\n[table app.public.t]\n", 8,
                 "duplicate section [table app.public.t] (first at line 6)");
    expect_error(STAGING SRC "[table app.t]\n", 6, "has no schema");
    expect_error(STAGING SRC "[table app]\n", 6, "write [table SOURCE.SCHEMA.TABLE]");
    expect_error(STAGING SRC "[table app.public.t]\nkey_columns = a\n", 7, "unknown key \"key_columns\"");
    /* sha256 needs a salt; a salt is never quoted back */
    expect_error(STAGING SOURCE "[table app.public.t]\nmask = e:sha256\n", 6,
                 "column \"e\" of [table app.public.t] is masked with sha256 but [source app] (line 3) has no mask_salt");
    expect_error(STAGING SOURCE "mask_salt = shortsalt99\n", 5, "mask_salt in [source app] is shorter than 16 bytes");
    if (strstr(err, "shortsalt99") != NULL)
        fail_msg("the salt leaked into: %s", err);
    /* excluded or uncaptured tables cannot have column rules */
    expect_error(STAGING SRC "exclude_tables = public.t\n[table app.public.t]\nmask = a:null\n", 7,
                 "the table is in exclude_tables of [source app], so it is never captured");
    expect_error(STAGING SRC "tables = public.u\n[table app.public.t]\nmask = a:null\n", 7,
                 "the table is not in tables of [source app]");
    expect_error(STAGING SRC "tables = public.u\nexclude_tables = public.u\n", 7,
                 "table public.u is in both tables and exclude_tables of [source app]");
    expect_error(STAGING SRC "exclude_tables = audit\n", 6, "table \"audit\" in exclude_tables of [source app] has no schema");
#undef SRC
}

/* [walpipe] log_format = text | json; text when absent */
static void test_log_format(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    wp_config_t *c = parse(STAGING SOURCE, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->log_format, WP_LOG_FORMAT_TEXT);
    wp_config_destroy(c);
    c = parse("[walpipe]\nlog_format = json\n" STAGING SOURCE, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->log_format, WP_LOG_FORMAT_JSON);
    wp_config_destroy(c);
    c = parse("[walpipe]\nlog_format = text\nlog_level = debug\n" STAGING SOURCE, err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->log_format, WP_LOG_FORMAT_TEXT);
    wp_config_destroy(c);
    expect_error("[walpipe]\nlog_format = JSONL\n" STAGING SOURCE, 2, "log_format in [walpipe] must be text or json");
    expect_error(STAGING "log_format = json\n" SOURCE, 3, "unknown key \"log_format\" in [staging]");
}

static void test_observe_keys(void **state)
{
    (void)state;
    char err[WP_ERRLEN], host[64];
    int port = 0;
    wp_config_t *c = wp_config_parse_string(STAGING SOURCE, "t.conf", err, sizeof err);
    assert_non_null(c);
    assert_null(c->metrics_listen); /* off unless set */
    assert_int_equal(c->sources[0].max_lag_bytes, 1024 * 1024 * 1024);
    assert_int_equal(c->sources[0].max_lag_seconds, 300);
    assert_int_equal(c->sources[0].max_stall_seconds, 300);
    assert_int_equal(c->sources[0].min_safe_wal_size, 1024 * 1024 * 1024);
    wp_config_destroy(c);
    c = wp_config_parse_string(STAGING SOURCE "max_lag_bytes = 2MB\nmax_lag_seconds = 7\nmax_stall_seconds = 9\n"
                               "min_safe_wal_size = 0\n[metrics]\nlisten = 9300\n",
                               "t.conf", err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->sources[0].max_lag_bytes, 2 * 1024 * 1024);
    assert_int_equal(c->sources[0].max_lag_seconds, 7);
    assert_int_equal(c->sources[0].max_stall_seconds, 9);
    assert_int_equal(c->sources[0].min_safe_wal_size, 0);
    assert_string_equal(c->metrics_listen, "9300");
    wp_config_destroy(c);
    assert_int_equal(wp_config_parse_listen("9300", host, sizeof host, &port), 0);
    assert_string_equal(host, "127.0.0.1"); /* a bare port listens on loopback */
    assert_int_equal(port, 9300);
    assert_int_equal(wp_config_parse_listen("0.0.0.0:80", host, sizeof host, &port), 0);
    assert_string_equal(host, "0.0.0.0");
    assert_int_equal(wp_config_parse_listen("[::1]:9187", host, sizeof host, &port), 0);
    assert_string_equal(host, "::1");
    assert_int_equal(wp_config_parse_listen("localhost:9187", host, sizeof host, &port), -1);
    assert_int_equal(wp_config_parse_listen("127.0.0.1:0", host, sizeof host, &port), -1);
    assert_int_equal(wp_config_parse_listen(":9187", host, sizeof host, &port), -1);
    expect_error(STAGING SOURCE "[metrics]\nlisten = localhost:http\n", 6, "listen in [metrics] must be PORT");
    expect_error(STAGING SOURCE "max_lag_bytes = 1kB\n", 5, "max_lag_bytes in [source app] must be a size from");
    expect_error(STAGING SOURCE "[metrics]\n[metrics]\n", 6, "duplicate section [metrics]");
}

static void test_sinks(void **state)
{
    (void)state;
    char err[WP_ERRLEN];
    setenv("WP_TEST_SINK_TOKEN", "tok3n", 1);
    wp_config_t *c = wp_config_parse_string(STAGING SOURCE "[source b]\nconninfo = host=b\n"
                                            "[sink audit]\nplugin = jsonl\npath = /tmp/a.jsonl\n"
                                            "[sink k]\nplugin = kafka\nsources = b, app\n"
                                            "tables = public.orders, \"S\".\"T, x\"\nbatch_events = 50\n"
                                            "plugin_dir = /opt/p\nbootstrap.servers = h:9092\ntoken = ${WP_TEST_SINK_TOKEN}\n",
                                            "t.conf", err, sizeof err);
    if (c == NULL)
        fail_msg("%s", err);
    assert_int_equal(c->nsinks, 2);
    const wp_sink_config_t *a = &c->sinks[0], *k = &c->sinks[1];
    assert_string_equal(a->name, "audit");
    assert_string_equal(a->plugin, "jsonl");
    assert_null(a->sources); /* every source */
    assert_null(a->tables);  /* every table */
    assert_int_equal(a->batch_events, 1000);
    assert_null(a->plugin_dir);
    assert_int_equal(a->nkeys, 1);
    assert_string_equal(a->keys[0].key, "path");
    assert_string_equal(a->keys[0].value, "/tmp/a.jsonl");
    assert_int_equal(a->keys[0].line, 9);
    assert_int_equal(k->nsources, 2);
    assert_string_equal(k->sources[0], "b");
    assert_string_equal(k->sources[1], "app");
    assert_int_equal(k->ntables, 2);
    assert_string_equal(k->tables[1].schema, "S");
    assert_string_equal(k->tables[1].table, "T, x");
    assert_int_equal(k->batch_events, 50);
    assert_string_equal(k->plugin_dir, "/opt/p");
    assert_int_equal(k->nkeys, 2);
    assert_string_equal(k->keys[0].key, "bootstrap.servers");
    assert_string_equal(k->keys[1].value, "tok3n"); /* ${VAR} expanded for the plugin */
    wp_config_destroy(c);

    expect_error(STAGING SOURCE "[sink a]\npath = x\n", 5, "[sink a] has no plugin; add plugin = jsonl");
    expect_error(STAGING SOURCE "[sink a]\nplugin = ../evil\n", 6, "plugin in [sink a] must be a plugin name");
    expect_error(STAGING SOURCE "[sink a]\nplugin = jsonl\nsources = app, nope\n", 7,
                 "sources of [sink a] names \"nope\", which has no [source nope] section");
    expect_error(STAGING SOURCE "[sink a]\nplugin = jsonl\nsources = app, app\n", 7, "listed twice");
    expect_error(STAGING SOURCE "[sink a]\nplugin = jsonl\npath = x\npath = y\n", 8,
                 "duplicate key \"path\" in [sink a] (first set at line 7)");
    expect_error(STAGING SOURCE "[sink a]\nplugin = jsonl\nPath = x\n", 7, "invalid key \"Path\" in [sink a]");
    expect_error(STAGING SOURCE "[sink a]\nplugin = jsonl\nbatch_events = 0\n", 7, "batch_events in [sink a]");
    expect_error(STAGING SOURCE "[sink a]\nplugin = jsonl\n[sink a]\n", 7, "duplicate section [sink a]");
    expect_error(STAGING SOURCE "[sink]\n", 5, "[sink] needs a name");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full_config),   cmocka_unit_test(test_defaults),     cmocka_unit_test(test_values),
        cmocka_unit_test(test_layout),        cmocka_unit_test(test_env_expansion), cmocka_unit_test(test_tables),
        cmocka_unit_test(test_section_errors), cmocka_unit_test(test_key_errors),   cmocka_unit_test(test_value_errors),
        cmocka_unit_test(test_missing_errors), cmocka_unit_test(test_slot_clashes), cmocka_unit_test(test_long_line),
        cmocka_unit_test(test_small_errbuf),  cmocka_unit_test(test_load_file),    cmocka_unit_test(test_redacted), cmocka_unit_test(test_example_file),
        cmocka_unit_test(test_workers),       cmocka_unit_test(test_filters),
        cmocka_unit_test(test_log_format),
        cmocka_unit_test(test_observe_keys),
        cmocka_unit_test(test_sinks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
