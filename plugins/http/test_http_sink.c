/*
 * test_http_sink.c: unit test of the http sink plugin through its ABI.
 *
 * Loads build/plugins/walpipe_sink_http.so with dlopen, as the core does, and
 * drives open/deliver/poll/close against an in-process libmicrohttpd receiver
 * that answers from a script (200, 500, 429 with Retry-After, 400, a redirect),
 * checks each request's signature and records what it received.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <jansson.h>
#include <microhttpd.h>
#include <openssl/hmac.h>

#include "walpipe/sink.h"

#define MAX_REQ 64
#define MAX_SCRIPT 16

typedef struct reply {
    unsigned status;
    const char *retry_after; /* NULL = none */
    const char *body;
} reply_t;

typedef struct request {
    char *body;
    size_t len;
    char signature[128];
    char timestamp[32];
    char idem[256];
    char content_type[64];
    char extra[64];
    double at; /* CLOCK_MONOTONIC seconds when answered */
    unsigned status;
} request_t;

typedef struct receiver {
    struct MHD_Daemon *daemon;
    unsigned port;
    pthread_mutex_t lock;
    reply_t script[MAX_SCRIPT]; /* replies for the first requests; then 200 */
    int nscript;
    request_t req[MAX_REQ];
    int nreq;
} receiver_t;

typedef struct upload {
    char *data;
    size_t len;
} upload_t;

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void copy_header(struct MHD_Connection *conn, const char *name, char *out, size_t outlen)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, name);
    snprintf(out, outlen, "%s", v ? v : "");
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_data_size, void **con_cls)
{
    receiver_t *rx = cls;
    upload_t *up = *con_cls;
    struct MHD_Response *resp;
    enum MHD_Result rc;
    reply_t reply = {200, NULL, "ok"};
    request_t *r;

    (void)url;
    (void)method;
    (void)version;
    if (up == NULL) {
        up = calloc(1, sizeof *up);
        *con_cls = up;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        up->data = realloc(up->data, up->len + *upload_data_size + 1);
        memcpy(up->data + up->len, upload_data, *upload_data_size);
        up->len += *upload_data_size;
        up->data[up->len] = '\0';
        *upload_data_size = 0;
        return MHD_YES;
    }
    pthread_mutex_lock(&rx->lock);
    if (rx->nreq < rx->nscript)
        reply = rx->script[rx->nreq];
    if (rx->nreq < MAX_REQ) {
        r = &rx->req[rx->nreq];
        r->body = up->data ? up->data : strdup("");
        r->len = up->len;
        up->data = NULL;
        copy_header(conn, "X-Walpipe-Signature", r->signature, sizeof r->signature);
        copy_header(conn, "X-Walpipe-Timestamp", r->timestamp, sizeof r->timestamp);
        copy_header(conn, "Idempotency-Key", r->idem, sizeof r->idem);
        copy_header(conn, "Content-Type", r->content_type, sizeof r->content_type);
        copy_header(conn, "X-Extra", r->extra, sizeof r->extra);
        r->at = mono();
        r->status = reply.status;
        rx->nreq++;
    }
    pthread_mutex_unlock(&rx->lock);
    free(up->data);
    free(up);
    *con_cls = NULL;
    resp = MHD_create_response_from_buffer(strlen(reply.body), (void *)reply.body, MHD_RESPMEM_PERSISTENT);
    if (reply.retry_after)
        MHD_add_response_header(resp, "Retry-After", reply.retry_after);
    if (reply.status / 100 == 3)
        MHD_add_response_header(resp, "Location", "http://127.0.0.1:1/elsewhere");
    rc = MHD_queue_response(conn, reply.status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static receiver_t *rx_start(const reply_t *script, int nscript)
{
    receiver_t *rx = calloc(1, sizeof *rx);
    const union MHD_DaemonInfo *info;
    pthread_mutex_init(&rx->lock, NULL);
    if (nscript > 0)
        memcpy(rx->script, script, (size_t)nscript * sizeof *script);
    rx->nscript = nscript;
    rx->daemon = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG, 0, NULL, NULL, handle, rx,
                                  MHD_OPTION_END);
    assert_non_null(rx->daemon);
    info = MHD_get_daemon_info(rx->daemon, MHD_DAEMON_INFO_BIND_PORT);
    rx->port = info->port;
    return rx;
}

static void rx_stop(receiver_t *rx)
{
    MHD_stop_daemon(rx->daemon);
    for (int i = 0; i < rx->nreq; i++)
        free(rx->req[i].body);
    pthread_mutex_destroy(&rx->lock);
    free(rx);
}

static int rx_count(receiver_t *rx)
{
    int n;
    pthread_mutex_lock(&rx->lock);
    n = rx->nreq;
    pthread_mutex_unlock(&rx->lock);
    return n;
}

/* --- the host the plugin sees ------------------------------------------ */

typedef struct host_data {
    const char *keys[16];
    const char *values[16];
    int n;
    char log[65536];
    size_t loglen;
} host_data_t;

static const char *cfg_get(const wp_sink_host_t *host, const char *key)
{
    host_data_t *hd = host->host_data;
    for (int i = 0; i < hd->n; i++)
        if (strcmp(hd->keys[i], key) == 0)
            return hd->values[i];
    return NULL;
}

static void host_log(const wp_sink_host_t *host, int level, const char *message)
{
    host_data_t *hd = host->host_data;
    int n = snprintf(hd->log + hd->loglen, sizeof hd->log - hd->loglen, "%d %s\n", level, message);
    if (n > 0 && hd->loglen + (size_t)n < sizeof hd->log)
        hd->loglen += (size_t)n;
}

static void set_key(host_data_t *hd, const char *k, const char *v)
{
    hd->keys[hd->n] = k;
    hd->values[hd->n] = v;
    hd->n++;
}

static const wp_sink_plugin_t *plugin;

static int setup_plugin(void **state)
{
    void *so = dlopen(WP_HTTP_PLUGIN, RTLD_NOW | RTLD_LOCAL);
    wp_sink_entry_fn entry;
    (void)state;
    if (so == NULL) {
        fprintf(stderr, "dlopen %s: %s\n", WP_HTTP_PLUGIN, dlerror());
        return -1;
    }
    *(void **)(&entry) = dlsym(so, WP_SINK_ENTRY_SYMBOL);
    if (entry == NULL)
        return -1;
    plugin = entry();
    return plugin && plugin->abi_version == WP_SINK_ABI_VERSION ? 0 : -1;
}

/* n events of source "src" with tickets first.., lsn 0/100*i, seq 1.. */
static void make_events(wp_sink_event_t *ev, size_t n, uint64_t first)
{
    for (size_t i = 0; i < n; i++) {
        memset(&ev[i], 0, sizeof ev[i]);
        ev[i].ticket = first + i;
        ev[i].source = "src";
        ev[i].lsn = 0x100000000ull + 0x100 * (first + i);
        ev[i].seq = 1;
        ev[i].op = "insert";
        ev[i].schema = "public";
        ev[i].table = "t";
        ev[i].xid = 700;
        ev[i].commit_us = 1700000000123456ll;
        ev[i].payload = "{\"after\":{\"id\":1,\"note\":\"h\\u00e9\"}}";
        ev[i].payload_len = strlen(ev[i].payload);
    }
}

/* Polls until durable reaches want or 20 s pass.  Returns the last poll's code. */
static int poll_until(void *st, uint64_t want, uint64_t *durable, char *err, size_t errlen)
{
    double end = mono() + 20;
    int rc = WP_SINK_OK;
    *durable = 0;
    while (mono() < end) {
        rc = plugin->poll(st, 100, durable, err, errlen);
        if (rc != WP_SINK_OK || *durable >= want)
            break;
    }
    return rc;
}

static void check_signature(const request_t *r, const char *secret)
{
    unsigned char md[32];
    unsigned int mdlen = 0;
    char hex[65], *signed_text = NULL;
    size_t n = strlen(r->timestamp) + 1 + r->len;
    signed_text = malloc(n + 1);
    snprintf(signed_text, n + 1, "%s.%s", r->timestamp, r->body);
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (unsigned char *)signed_text, n, md, &mdlen);
    for (unsigned i = 0; i < mdlen; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    assert_string_equal(r->signature + strlen("sha256="), hex);
    assert_memory_equal(r->signature, "sha256=", 7);
    free(signed_text);
}

static void test_batches_signed_in_order(void **state)
{
    receiver_t *rx = rx_start(NULL, 0);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[128], err[512] = "";
    wp_sink_event_t ev[10];
    uint64_t durable = 0;
    void *st = NULL;
    json_t *arr;
    json_error_t jerr;

    (void)state;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hook", rx->port);
    set_key(&hd, "url", url);
    set_key(&hd, "secret", "k3y-value");
    set_key(&hd, "post_events", "4");
    set_key(&hd, "header", "X-Extra: tok-123");
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 10, 1);
    assert_int_equal(plugin->deliver(st, ev, 10, err, sizeof err), WP_SINK_OK);
    assert_int_equal(poll_until(st, 10, &durable, err, sizeof err), WP_SINK_OK);
    assert_int_equal(durable, 10);
    assert_int_equal(rx_count(rx), 3);
    for (int i = 0; i < 3; i++) {
        check_signature(&rx->req[i], "k3y-value");
        assert_string_equal(rx->req[i].content_type, "application/json");
        assert_string_equal(rx->req[i].extra, "tok-123");
    }
    assert_string_equal(rx->req[0].idem, "src/1/100:1-1/400:1");
    assert_string_equal(rx->req[2].idem, "src/1/900:1-1/A00:1");
    arr = json_loads(rx->req[0].body, 0, &jerr);
    assert_non_null(arr);
    assert_int_equal(json_array_size(arr), 4);
    {
        json_t *e = json_array_get(arr, 0);
        assert_string_equal(json_string_value(json_object_get(e, "source")), "src");
        assert_string_equal(json_string_value(json_object_get(e, "lsn")), "1/100");
        assert_int_equal(json_integer_value(json_object_get(e, "seq")), 1);
        assert_string_equal(json_string_value(json_object_get(e, "op")), "insert");
        assert_string_equal(json_string_value(json_object_get(e, "schema")), "public");
        assert_string_equal(json_string_value(json_object_get(e, "table")), "t");
        assert_int_equal(json_integer_value(json_object_get(e, "xid")), 700);
        assert_string_equal(json_string_value(json_object_get(e, "commit_ts")), "2023-11-14T22:13:20.123456Z");
        assert_string_equal(json_string_value(json_object_get(json_object_get(json_object_get(e, "payload"), "after"),
                                                              "note")),
                            "h\xc3\xa9");
        assert_true(json_is_false(json_object_get(e, "replay")));
    }
    json_decref(arr);
    assert_null(strstr(hd.log, "k3y-value"));
    assert_null(strstr(hd.log, "tok-123"));
    plugin->close(st);
    rx_stop(rx);
}

/* Names with quotes, backslashes and control characters stay JSON; a payload that is no object is refused. */
static void test_escaping_and_bad_payload(void **state)
{
    receiver_t *rx = rx_start(NULL, 0);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[128], err[512] = "";
    wp_sink_event_t ev[2];
    uint64_t durable = 0;
    void *st = NULL;
    json_t *arr, *e;
    json_error_t jerr;
    const char *odd = "we\"ird\\ta\tb\x01\xc3\xa9";

    (void)state;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hook", rx->port);
    set_key(&hd, "url", url);
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 2, 1);
    ev[0].table = odd;
    ev[0].xid = -1;
    ev[0].commit_us = 0;
    ev[0].replay = 1;
    ev[1].op = "message";
    ev[1].schema = NULL;
    ev[1].table = NULL;
    ev[1].seq = 0;
    ev[1].payload = " {\"prefix\":\"p\",\"content\":\"c\",\"transactional\":false}\n";
    ev[1].payload_len = strlen(ev[1].payload);
    assert_int_equal(plugin->deliver(st, ev, 2, err, sizeof err), WP_SINK_OK);
    assert_int_equal(poll_until(st, 2, &durable, err, sizeof err), WP_SINK_OK);
    arr = json_loads(rx->req[0].body, 0, &jerr);
    if (arr == NULL)
        fail_msg("body is not JSON: %s: %s", jerr.text, rx->req[0].body);
    e = json_array_get(arr, 0);
    assert_string_equal(json_string_value(json_object_get(e, "table")), odd);
    assert_true(json_is_null(json_object_get(e, "xid")));
    assert_true(json_is_null(json_object_get(e, "commit_ts")));
    assert_true(json_is_true(json_object_get(e, "replay")));
    e = json_array_get(arr, 1);
    assert_true(json_is_null(json_object_get(e, "schema")));
    assert_int_equal(json_integer_value(json_object_get(e, "seq")), 0);
    assert_string_equal(json_string_value(json_object_get(json_object_get(e, "payload"), "prefix")), "p");
    json_decref(arr);

    make_events(ev, 1, 3);
    ev[0].payload = "[1,2]";
    ev[0].payload_len = 5;
    assert_int_equal(plugin->deliver(st, ev, 1, err, sizeof err), WP_SINK_FATAL);
    assert_non_null(strstr(err, "not a JSON object"));
    plugin->close(st);
    rx_stop(rx);
}

/* poll hands a durable batch back at once (the next one sent); flush waits for all. */
static void test_poll_returns_when_durable_moves(void **state)
{
    receiver_t *rx = rx_start(NULL, 0);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[128], err[512] = "";
    wp_sink_event_t ev[3];
    uint64_t durable = 0;
    void *st = NULL;

    (void)state;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hook", rx->port);
    set_key(&hd, "url", url);
    set_key(&hd, "post_events", "1");
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 3, 1);
    assert_int_equal(plugin->deliver(st, ev, 3, err, sizeof err), WP_SINK_OK);
    assert_int_equal(plugin->poll(st, 10000, &durable, err, sizeof err), WP_SINK_OK);
    assert_int_equal(durable, 1);
    assert_int_equal(plugin->flush(st, 10000, &durable, err, sizeof err), WP_SINK_OK);
    assert_int_equal(durable, 3);
    assert_int_equal(rx_count(rx), 3);
    plugin->close(st);
    rx_stop(rx);
}

static void test_retries_hold_position(void **state)
{
    reply_t script[] = {{500, NULL, "down"}, {429, "1", "slow down"}, {503, NULL, ""}};
    receiver_t *rx = rx_start(script, 3);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[160], err[512] = "";
    wp_sink_event_t ev[3];
    uint64_t durable = 99;
    void *st = NULL;

    (void)state;
    /* userinfo and query are credentials: never in a log line */
    snprintf(url, sizeof url, "http://bob:pa55w0rd@127.0.0.1:%u/hook?token=qu3ry", rx->port);
    set_key(&hd, "url", url);
    set_key(&hd, "secret", "k3y-value");
    set_key(&hd, "max_backoff_ms", "200");
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 3, 1);
    assert_int_equal(plugin->deliver(st, ev, 3, err, sizeof err), WP_SINK_OK);
    /* while the receiver fails, the position holds */
    while (rx_count(rx) < 3) {
        assert_int_equal(plugin->poll(st, 50, &durable, err, sizeof err), WP_SINK_OK);
        assert_int_equal(durable, 0);
    }
    assert_int_equal(poll_until(st, 3, &durable, err, sizeof err), WP_SINK_OK);
    assert_int_equal(durable, 3);
    assert_int_equal(rx_count(rx), 4);
    /* the same batch each time: same key, re-signed with a new timestamp */
    for (int i = 1; i < 4; i++) {
        assert_string_equal(rx->req[i].idem, rx->req[0].idem);
        assert_string_equal(rx->req[i].body, rx->req[0].body);
        check_signature(&rx->req[i], "k3y-value");
    }
    /* Retry-After: 1 was honoured although max_backoff_ms is 200 */
    assert_true(rx->req[2].at - rx->req[1].at >= 0.95);
    assert_non_null(strstr(hd.log, "HTTP 500: down"));
    assert_non_null(strstr(hd.log, "127.0.0.1"));
    assert_null(strstr(hd.log, "pa55w0rd"));
    assert_null(strstr(hd.log, "bob"));
    assert_null(strstr(hd.log, "qu3ry"));
    assert_null(strstr(hd.log, "k3y-value"));
    plugin->close(st);
    rx_stop(rx);
}

static void test_4xx_is_fatal(void **state)
{
    reply_t script[] = {{500, NULL, ""}, {400, NULL, "column \"x\" unknown\n"}};
    receiver_t *rx = rx_start(script, 2);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[128], err[512] = "";
    wp_sink_event_t ev[2];
    uint64_t durable = 0;
    void *st = NULL;

    (void)state;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hook", rx->port);
    set_key(&hd, "url", url);
    set_key(&hd, "max_backoff_ms", "100");
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 2, 1);
    assert_int_equal(plugin->deliver(st, ev, 2, err, sizeof err), WP_SINK_OK);
    assert_int_equal(poll_until(st, 2, &durable, err, sizeof err), WP_SINK_FATAL);
    assert_int_equal(durable, 0);
    assert_non_null(strstr(err, "HTTP 400"));
    assert_non_null(strstr(err, "column \"x\" unknown"));
    assert_null(strchr(err, '\n'));
    /* final: a flush after it sends nothing and says the same */
    err[0] = '\0';
    assert_int_equal(plugin->flush(st, 300, &durable, err, sizeof err), WP_SINK_FATAL);
    assert_non_null(strstr(err, "HTTP 400"));
    assert_int_equal(rx_count(rx), 2);
    plugin->close(st);
    rx_stop(rx);
}

static void test_redirect_is_fatal(void **state)
{
    reply_t script[] = {{308, NULL, ""}};
    receiver_t *rx = rx_start(script, 1);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[128], err[512] = "";
    wp_sink_event_t ev[1];
    uint64_t durable = 0;
    void *st = NULL;

    (void)state;
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hook", rx->port);
    set_key(&hd, "url", url);
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 1, 1);
    assert_int_equal(plugin->deliver(st, ev, 1, err, sizeof err), WP_SINK_OK);
    assert_int_equal(poll_until(st, 1, &durable, err, sizeof err), WP_SINK_FATAL);
    assert_non_null(strstr(err, "HTTP 308"));
    assert_non_null(strstr(err, "redirect"));
    plugin->close(st);
    rx_stop(rx);
}

/* A receiver that is not there: connection refused is retried, the position holds. */
static void test_refused_is_retried(void **state)
{
    receiver_t *rx = rx_start(NULL, 0);
    host_data_t hd = {0};
    wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
    char url[128], err[512] = "";
    wp_sink_event_t ev[1];
    uint64_t durable = 0;
    void *st = NULL;
    unsigned port = rx->port;

    (void)state;
    rx_stop(rx); /* the port is now closed */
    snprintf(url, sizeof url, "http://127.0.0.1:%u/hook", port);
    set_key(&hd, "url", url);
    set_key(&hd, "max_backoff_ms", "100");
    assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_OK);
    make_events(ev, 1, 1);
    assert_int_equal(plugin->deliver(st, ev, 1, err, sizeof err), WP_SINK_OK);
    while (strstr(hd.log, "attempt 2") == NULL) {
        assert_int_equal(plugin->poll(st, 50, &durable, err, sizeof err), WP_SINK_OK);
        assert_int_equal(durable, 0);
    }
    plugin->close(st);
}

static void test_config_refused(void **state)
{
    struct {
        const char *key, *value, *expect;
    } cases[] = {
        {NULL, NULL, "url is required"},
        {"url", "ftp://127.0.0.1/x", "not http or https"},
        {"url", "not a url", "not a valid"},
        {"timeout_ms", "10s", "timeout_ms"},
        {"post_events", "0", "post_events"},
        {"tls_verify", "maybe", "tls_verify"},
        {"header", "X-A: b\r\nX-B: c", "one \"Name: value\" line"},
        {"ca_file", "/nonexistent/ca.pem", "cannot be read"},
    };
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        host_data_t hd = {0};
        wp_sink_host_t host = {WP_SINK_ABI_VERSION, "t", cfg_get, host_log, &hd};
        char err[512] = "";
        void *st = (void *)1;
        if (cases[i].key && strcmp(cases[i].key, "url") != 0)
            set_key(&hd, "url", "http://127.0.0.1:9/x");
        if (cases[i].key)
            set_key(&hd, cases[i].key, cases[i].value);
        assert_int_equal(plugin->open(&host, &st, err, sizeof err), WP_SINK_FATAL);
        assert_null(st);
        if (strstr(err, cases[i].expect) == NULL)
            fail_msg("case %zu: \"%s\" lacks \"%s\"", i, err, cases[i].expect);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batches_signed_in_order), cmocka_unit_test(test_escaping_and_bad_payload),
        cmocka_unit_test(test_poll_returns_when_durable_moves),
        cmocka_unit_test(test_retries_hold_position),
        cmocka_unit_test(test_4xx_is_fatal),             cmocka_unit_test(test_redirect_is_fatal),
        cmocka_unit_test(test_refused_is_retried),       cmocka_unit_test(test_config_refused),
    };
    return cmocka_run_group_tests(tests, setup_plugin, NULL);
}
