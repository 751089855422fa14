/*
 * plugins/http/http.c: the http sink plugin (webhooks).
 *
 * Job: POST the events the core delivers, in batches of up to post_events
 * events of one source, as a JSON array to one URL, signed with HMAC-SHA256,
 * and report a batch durable only when the receiver answered it with a 2xx.
 *
 * Invariant: batches leave in delivery order, one request in flight at a
 * time, and a failed batch is sent again, the same events, before any later
 * one.  The durable ticket reported to the core is the last ticket of the
 * last batch a 2xx answered, so the sink's position never passes an event
 * the receiver has not accepted, and a receiver sees each source's events in
 * (lsn, seq) order (with repeats after a failure).
 *
 * Request: POST url, body [event,...] (event_render's object), headers
 *   Content-Type: application/json
 *   X-Walpipe-Timestamp: <unix seconds, new at each attempt>
 *   X-Walpipe-Signature: sha256=<hex HMAC-SHA256(secret, timestamp "." body)>
 *   Idempotency-Key: <source>/<first lsn>:<seq>-<last lsn>:<seq>
 *   and the configured extra header.
 *
 * Failures (what class and why):
 *   5xx, 408, 429, a timeout, a refused or dropped connection: passing; the
 *     plugin retries the same batch itself, with capped exponential backoff
 *     (a 429's or 503's Retry-After is honoured), holding the position.
 *     Retrying inside the plugin rather than returning WP_SINK_RETRY keeps
 *     the batch boundaries (so the Idempotency-Key repeats exactly), avoids
 *     re-reading the backlog from staging, and lets Retry-After be obeyed to
 *     the millisecond.  poll keeps returning OK meanwhile; each failed
 *     attempt logs one warning, so a receiver that is down is visible.
 *   other 4xx, a 3xx, a certificate the CA bundle does not verify, an
 *     unusable URL: fatal; the receiver refuses the events or is not the one
 *     configured, and retrying would not change that.  The error carries
 *     the status and the start of the response body.
 *
 * Guarantee: at least once.  A receiver may see a batch again (a 2xx lost
 * on the way back, a timeout after the receiver stored it, a restart of
 * walpipe before the position was saved), so it dedupes on each event's
 * (source, lsn, seq), which never changes.  Exactly once over HTTP needs the
 * receiver's help (that dedupe, or storing the position with the data): the
 * plugin cannot learn what a receiver already holds.
 *
 * Secrets: the secret, the extra header's value and a URL's userinfo and
 * query are never logged nor put into an error message.
 *
 * Threads: the core calls one session from one thread; curl_global_init runs
 * once per process under pthread_once.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "walpipe/sink.h"

#define HTTP_BODY_KEEP 512          /* bytes of a response body kept for messages */
#define HTTP_BODY_SHOW 200          /* of which shown in an error */
#define HTTP_BACKOFF_MIN_MS 100
#define HTTP_RETRY_AFTER_MAX_S 3600 /* a Retry-After beyond an hour is taken as an hour */

/* One queued event, rendered when delivered (the core's memory is gone after deliver). */
typedef struct http_entry {
    uint64_t ticket;
    char *json;   /* owned: the event as one compact JSON object */
    size_t len;
    char *source; /* owned */
    uint64_t lsn;
    int32_t seq;
} http_entry_t;

typedef struct http_sink {
    const wp_sink_host_t *host;
    /* configuration */
    char *url;
    char *url_log;      /* scheme://host[:port]/path, no userinfo, no query: safe to log */
    char *secret;       /* owned, cleansed on close; NULL = unsigned */
    size_t secret_len;
    char *header;       /* the extra "Name: value" header or NULL; its value is never logged */
    long timeout_ms;
    size_t post_events;
    long max_backoff_ms;
    int tls_verify;
    /* curl */
    CURL *easy;
    CURLM *multi;
    struct curl_slist *headers; /* of the request in flight */
    int in_flight;
    char errbuf[CURL_ERROR_SIZE];
    char resp[HTTP_BODY_KEEP + 1];
    size_t resp_len;
    /* HMAC */
    EVP_MAC *mac;
    /* queue: entries [head, head + count) of q */
    http_entry_t *q;
    size_t head, count, cap;
    /* the batch being sent: the first batch_n entries of the queue, body owned */
    size_t batch_n;
    char *body;
    size_t body_len;
    int attempts;       /* failed attempts of the current batch */
    int64_t retry_at;   /* monotonic ms before which the batch is not sent again */
    uint64_t durable;
    unsigned rng;
    char fatal[512];    /* set once a request failed for good: the session sends nothing more */
} http_sink_t;

/* post_events, not batch_events: that one is the core's (events read from staging per batch) */
static const char *const http_keys[] = {
    "url", "secret", "timeout_ms", "post_events", "max_backoff_ms", "header", "tls_verify", "ca_file", NULL,
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_OK;

static void curl_init_once(void)
{
    curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int64_t ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        abort();
    return p;
}

static char *xstrdup(const char *s)
{
    char *p = strdup(s);
    if (p == NULL)
        abort();
    return p;
}

__attribute__((format(printf, 3, 4))) static void logf_(const http_sink_t *sink, int level, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    sink->host->log(sink->host, level, line);
}

__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void lsn_text(uint64_t lsn, char *out, size_t outlen)
{
    snprintf(out, outlen, "%X/%X", (unsigned)(lsn >> 32), (unsigned)(lsn & 0xffffffffu));
}

/* --- configuration ------------------------------------------------------ */

static int parse_long(const char *key, const char *text, long lo, long hi, long *out, char *err, size_t errlen)
{
    char *end = NULL;
    long v;
    errno = 0;
    v = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
        set_err(err, errlen, "%s = \"%s\" is not an integer from %ld to %ld", key, text, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_bool(const char *key, const char *text, int *out, char *err, size_t errlen)
{
    static const char *const yes[] = {"on", "true", "yes", "1"};
    static const char *const no[] = {"off", "false", "no", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(text, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(text, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    set_err(err, errlen, "%s = \"%s\" is not on or off", key, text);
    return -1;
}

/*
 * Checks url (http or https, a host) and returns a form safe to log in *log
 * (malloc'd): scheme://host[:port]/path, without userinfo or query, which may
 * hold credentials.  Returns 0, or -1 with err set.
 */
static int url_check(const char *url, char **log, char *err, size_t errlen)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
    int rc = -1;
    size_t n;

    *log = NULL;
    if (u == NULL)
        abort();
    if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
        /* the URL itself is not shown: it may hold a password */
        set_err(err, errlen, "url is not a valid absolute http:// or https:// URL");
        goto out;
    }
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        set_err(err, errlen, "url scheme \"%s\" is not http or https", scheme);
        goto out;
    }
    if (curl_url_get(u, CURLUPART_PORT, &port, 0) != CURLUE_OK)
        port = NULL;
    if (curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK)
        path = NULL;
    n = strlen(scheme) + strlen(host) + (port ? strlen(port) : 0) + (path ? strlen(path) : 0) + 8;
    *log = xmalloc(n);
    snprintf(*log, n, "%s://%s%s%s%s", scheme, host, port ? ":" : "", port ? port : "", path ? path : "/");
    rc = 0;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_url_cleanup(u);
    return rc;
}

/* "Name: value" with a token name and no CR/LF: anything else could split the request. */
static int header_check(const char *h, char *err, size_t errlen)
{
    const char *colon = strchr(h, ':');
    if (colon == NULL || colon == h || strpbrk(h, "\r\n") != NULL) {
        set_err(err, errlen, "header must be one \"Name: value\" line");
        return -1;
    }
    for (const char *p = h; p < colon; p++) {
        if (*p <= ' ' || *p >= 127 || strchr("()<>@,;:\\\"/[]?={}", *p) != NULL) {
            set_err(err, errlen, "header name \"%.*s\" is not a valid HTTP header name", (int)(colon - h), h);
            return -1;
        }
    }
    return 0;
}

/* --- events ------------------------------------------------------------- */

/* A growable text buffer; abort on OOM like every allocation here. */
typedef struct strbuf {
    char *data;
    size_t len, cap;
} strbuf_t;

static void sb_reserve(strbuf_t *sb, size_t more)
{
    if (sb->len + more + 1 <= sb->cap)
        return;
    while (sb->len + more + 1 > sb->cap)
        sb->cap = sb->cap ? sb->cap * 2 : 256;
    sb->data = realloc(sb->data, sb->cap);
    if (sb->data == NULL)
        abort();
}

static void sb_add(strbuf_t *sb, const char *s, size_t n)
{
    sb_reserve(sb, n);
    memcpy(sb->data + sb->len, s, n);
    sb->len += n;
    sb->data[sb->len] = '\0';
}

static void sb_str(strbuf_t *sb, const char *s)
{
    sb_add(sb, s, strlen(s));
}

/* s as a JSON string (the core's text is valid UTF-8: only quotes, backslashes and controls need escapes), or null */
static void sb_json_string(strbuf_t *sb, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    const char *run;
    if (s == NULL) {
        sb_str(sb, "null");
        return;
    }
    sb_add(sb, "\"", 1);
    for (run = s; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        sb_add(sb, run, (size_t)(s - run));
        run = s + 1;
        switch (c) {
        case '"': sb_add(sb, "\\\"", 2); break;
        case '\\': sb_add(sb, "\\\\", 2); break;
        case '\n': sb_add(sb, "\\n", 2); break;
        case '\r': sb_add(sb, "\\r", 2); break;
        case '\t': sb_add(sb, "\\t", 2); break;
        default: {
            char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            sb_add(sb, u, 6);
        }
        }
    }
    sb_add(sb, run, (size_t)(s - run));
    sb_add(sb, "\"", 1);
}

/*
 * Renders one event as one compact JSON object into *out (malloc'd, owned by
 * the caller), *len its length:
 *   {"source":..,"lsn":"X/X","seq":N,"op":..,"schema":..,"table":..,"xid":N|null,
 *    "commit_ts":"YYYY-MM-DDTHH:MM:SS.ffffffZ"|null,"payload":{..},"replay":bool}
 * The payload is raw_events.payload, JSON text PostgreSQL printed: spliced as it is,
 * not parsed again (that was more than half of the plugin's time).  Returns 0, or -1
 * with err set when the payload is not a JSON object at all.
 */
static int event_render(const wp_sink_event_t *ev, char **out, size_t *len, char *err, size_t errlen)
{
    strbuf_t sb = {0};
    const char *p = ev->payload ? ev->payload : "{}";
    size_t plen = ev->payload ? ev->payload_len : 2;
    char text[96];

    *out = NULL;
    while (plen > 0 && (p[plen - 1] == ' ' || p[plen - 1] == '\n' || p[plen - 1] == '\t' || p[plen - 1] == '\r'))
        plen--;
    while (plen > 0 && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) {
        p++;
        plen--;
    }
    if (plen < 2 || p[0] != '{' || p[plen - 1] != '}') {
        set_err(err, errlen, "event of source \"%s\" at %X/%X seq %d: payload is not a JSON object", ev->source,
                (unsigned)(ev->lsn >> 32), (unsigned)ev->lsn, (int)ev->seq);
        return -1;
    }
    sb_reserve(&sb, 256 + plen);
    sb_str(&sb, "{\"source\":");
    sb_json_string(&sb, ev->source);
    lsn_text(ev->lsn, text, sizeof text);
    sb_str(&sb, ",\"lsn\":\"");
    sb_str(&sb, text);
    snprintf(text, sizeof text, "\",\"seq\":%d,\"op\":", (int)ev->seq);
    sb_str(&sb, text);
    sb_json_string(&sb, ev->op);
    sb_str(&sb, ",\"schema\":");
    sb_json_string(&sb, ev->schema);
    sb_str(&sb, ",\"table\":");
    sb_json_string(&sb, ev->table);
    if (ev->xid >= 0)
        snprintf(text, sizeof text, ",\"xid\":%" PRId64 ",\"commit_ts\":", ev->xid);
    else
        snprintf(text, sizeof text, ",\"xid\":null,\"commit_ts\":");
    sb_str(&sb, text);
    if (ev->commit_us > 0) {
        time_t secs = (time_t)(ev->commit_us / 1000000);
        struct tm tm;
        char day[40];
        gmtime_r(&secs, &tm);
        strftime(day, sizeof day, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(text, sizeof text, "\"%s.%06dZ\"", day, (int)(ev->commit_us % 1000000));
        sb_str(&sb, text);
    } else {
        sb_str(&sb, "null");
    }
    sb_str(&sb, ",\"payload\":");
    sb_add(&sb, p, plen);
    sb_str(&sb, ev->replay ? ",\"replay\":true}" : ",\"replay\":false}");
    *out = sb.data;
    *len = sb.len;
    return 0;
}

static void queue_push(http_sink_t *sink, const wp_sink_event_t *ev, char *json, size_t len)
{
    http_entry_t *e;
    if (sink->head > 0 && sink->head + sink->count == sink->cap) {
        memmove(sink->q, sink->q + sink->head, sink->count * sizeof *sink->q);
        sink->head = 0;
    }
    if (sink->head + sink->count == sink->cap) {
        sink->cap = sink->cap ? sink->cap * 2 : 1024;
        sink->q = realloc(sink->q, sink->cap * sizeof *sink->q);
        if (sink->q == NULL)
            abort();
    }
    e = &sink->q[sink->head + sink->count++];
    e->ticket = ev->ticket;
    e->json = json;
    e->len = len;
    e->source = xstrdup(ev->source);
    e->lsn = ev->lsn;
    e->seq = ev->seq;
}

/* Drops the current batch from the queue's head (it was accepted). */
static void batch_pop(http_sink_t *sink)
{
    for (size_t i = 0; i < sink->batch_n; i++) {
        http_entry_t *e = &sink->q[sink->head + i];
        free(e->json);
        free(e->source);
    }
    sink->head += sink->batch_n;
    sink->count -= sink->batch_n;
    if (sink->count == 0)
        sink->head = 0;
    sink->batch_n = 0;
    free(sink->body);
    sink->body = NULL;
    sink->body_len = 0;
    sink->attempts = 0;
}

/* Forms the next batch from the queue's head: up to post_events events of the head's source. */
static void batch_build(http_sink_t *sink)
{
    const http_entry_t *first = &sink->q[sink->head];
    size_t n = 0, len = 2;
    char *p;

    while (n < sink->count && n < sink->post_events && strcmp(sink->q[sink->head + n].source, first->source) == 0) {
        len += sink->q[sink->head + n].len + 1;
        n++;
    }
    sink->body = xmalloc(len + 1);
    p = sink->body;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        const http_entry_t *e = &sink->q[sink->head + i];
        if (i > 0)
            *p++ = ',';
        memcpy(p, e->json, e->len);
        p += e->len;
    }
    *p++ = ']';
    *p = '\0';
    sink->body_len = (size_t)(p - sink->body);
    sink->batch_n = n;
    sink->attempts = 0;
}

/* "<source> <first lsn>:<seq>..<last lsn>:<seq>" of the current batch, for messages. */
static void batch_describe(const http_sink_t *sink, char *out, size_t outlen)
{
    const http_entry_t *a = &sink->q[sink->head], *b = &sink->q[sink->head + sink->batch_n - 1];
    char la[32], lb[32];
    lsn_text(a->lsn, la, sizeof la);
    lsn_text(b->lsn, lb, sizeof lb);
    snprintf(out, outlen, "%zu events of source \"%s\" %s:%d..%s:%d", sink->batch_n, a->source, la, (int)a->seq, lb,
             (int)b->seq);
}

/* --- the request -------------------------------------------------------- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg)
{
    http_sink_t *sink = arg;
    size_t n = size * nmemb, room = HTTP_BODY_KEEP - sink->resp_len;
    if (room > 0) {
        size_t take = n < room ? n : room;
        memcpy(sink->resp + sink->resp_len, data, take);
        sink->resp_len += take;
        sink->resp[sink->resp_len] = '\0';
    }
    return n;
}

/* hex HMAC-SHA256(secret, timestamp "." body) into hex (65 bytes).  Returns 0 or -1. */
static int sign(http_sink_t *sink, const char *timestamp, char *hex)
{
    EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(sink->mac);
    unsigned char md[EVP_MAX_MD_SIZE];
    size_t mdlen = 0;
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    int rc = -1;

    if (ctx == NULL || EVP_MAC_init(ctx, (const unsigned char *)sink->secret, sink->secret_len, params) != 1 ||
        EVP_MAC_update(ctx, (const unsigned char *)timestamp, strlen(timestamp)) != 1 ||
        EVP_MAC_update(ctx, (const unsigned char *)".", 1) != 1 ||
        EVP_MAC_update(ctx, (const unsigned char *)sink->body, sink->body_len) != 1 ||
        EVP_MAC_final(ctx, md, &mdlen, sizeof md) != 1 || mdlen != 32)
        goto out;
    for (size_t i = 0; i < mdlen; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    rc = 0;
out:
    EVP_MAC_CTX_free(ctx);
    OPENSSL_cleanse(md, sizeof md);
    return rc;
}

static struct curl_slist *add_header(struct curl_slist *list, const char *h)
{
    struct curl_slist *l = curl_slist_append(list, h);
    if (l == NULL)
        abort();
    return l;
}

/* Sends the current batch (built if none).  Returns WP_SINK_OK or WP_SINK_FATAL with err. */
static int request_start(http_sink_t *sink, char *err, size_t errlen)
{
    const http_entry_t *a, *b;
    char line[512], la[32], lb[32], ts[32], hex[65];
    CURLMcode mrc;

    if (sink->batch_n == 0)
        batch_build(sink);
    a = &sink->q[sink->head];
    b = &sink->q[sink->head + sink->batch_n - 1];
    lsn_text(a->lsn, la, sizeof la);
    lsn_text(b->lsn, lb, sizeof lb);

    curl_slist_free_all(sink->headers);
    sink->headers = NULL;
    sink->headers = add_header(sink->headers, "Content-Type: application/json");
    sink->headers = add_header(sink->headers, "Expect:"); /* no 100-continue round trip */
    /* the batch's identity: the same events give the same key (the same boundaries, which
       hold across retries in a session but not across sessions: dedupe per event) */
    snprintf(line, sizeof line, "Idempotency-Key: %s/%s:%d-%s:%d", a->source, la, (int)a->seq, lb, (int)b->seq);
    sink->headers = add_header(sink->headers, line);
    snprintf(ts, sizeof ts, "%lld", (long long)time(NULL));
    snprintf(line, sizeof line, "X-Walpipe-Timestamp: %s", ts);
    sink->headers = add_header(sink->headers, line);
    if (sink->secret != NULL) {
        if (sign(sink, ts, hex) != 0) {
            set_err(err, errlen, "could not compute the HMAC-SHA256 signature (libcrypto)");
            return WP_SINK_FATAL;
        }
        snprintf(line, sizeof line, "X-Walpipe-Signature: sha256=%s", hex);
        sink->headers = add_header(sink->headers, line);
    }
    if (sink->header != NULL)
        sink->headers = add_header(sink->headers, sink->header);

    sink->resp_len = 0;
    sink->resp[0] = '\0';
    sink->errbuf[0] = '\0';
    curl_easy_setopt(sink->easy, CURLOPT_HTTPHEADER, sink->headers);
    curl_easy_setopt(sink->easy, CURLOPT_POSTFIELDS, sink->body);
    curl_easy_setopt(sink->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)sink->body_len);
    mrc = curl_multi_add_handle(sink->multi, sink->easy);
    if (mrc != CURLM_OK) {
        set_err(err, errlen, "could not start a request: %s", curl_multi_strerror(mrc));
        return WP_SINK_FATAL;
    }
    sink->in_flight = 1;
    return WP_SINK_OK;
}

/* Printable ASCII copy of the start of the response body (a log line stays one valid line). */
static void body_start(const http_sink_t *sink, char *out, size_t outlen)
{
    size_t n = 0;
    for (size_t i = 0; i < sink->resp_len && i < HTTP_BODY_SHOW && n + 1 < outlen; i++) {
        unsigned char c = (unsigned char)sink->resp[i];
        out[n++] = (c >= 32 && c < 127) ? (char)c : ' ';
    }
    out[n] = '\0';
    if (sink->resp_len > HTTP_BODY_SHOW && n + 4 < outlen)
        strcat(out, "...");
}

static void schedule_retry(http_sink_t *sink, const char *why, long retry_after_s)
{
    char what[256];
    int64_t delay = HTTP_BACKOFF_MIN_MS;
    sink->attempts++;
    for (int i = 1; i < sink->attempts && delay < sink->max_backoff_ms; i++)
        delay *= 2;
    if (delay > sink->max_backoff_ms)
        delay = sink->max_backoff_ms;
    delay = delay / 2 + (int64_t)(rand_r(&sink->rng) % (unsigned)(delay / 2 + 1)); /* jitter: [d/2, d] */
    if (retry_after_s > 0) {
        if (retry_after_s > HTTP_RETRY_AFTER_MAX_S)
            retry_after_s = HTTP_RETRY_AFTER_MAX_S;
        if (retry_after_s * 1000 > delay)
            delay = retry_after_s * 1000;
    }
    sink->retry_at = now_ms() + delay;
    batch_describe(sink, what, sizeof what);
    logf_(sink, WP_SINK_LOG_WARN, "POST of %s to %s failed (attempt %d): %s; sending again in %lld ms%s", what,
          sink->url_log, sink->attempts, why, (long long)delay, retry_after_s > 0 ? " (Retry-After)" : "");
}

/* Handles the end of the request in flight.  Returns WP_SINK_OK (accepted or retry scheduled) or FATAL. */
static int request_done(http_sink_t *sink, CURLcode cc, char *err, size_t errlen)
{
    long status = 0;
    char why[CURL_ERROR_SIZE + 64], body[HTTP_BODY_SHOW + 8], what[256];
    curl_off_t retry_after = 0;

    curl_multi_remove_handle(sink->multi, sink->easy);
    sink->in_flight = 0;
    batch_describe(sink, what, sizeof what);
    if (cc != CURLE_OK) {
        const char *detail = sink->errbuf[0] ? sink->errbuf : curl_easy_strerror(cc);
        switch (cc) {
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
        case CURLE_SSL_CERTPROBLEM:
        case CURLE_SSL_ISSUER_ERROR:
        case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
            set_err(err, errlen,
                    "TLS verification of %s failed: %s; give the CA that signed the receiver's certificate "
                    "in ca_file (tls_verify = off only for a test)",
                    sink->url_log, detail);
            return WP_SINK_FATAL;
        case CURLE_UNSUPPORTED_PROTOCOL:
        case CURLE_URL_MALFORMAT:
            set_err(err, errlen, "cannot POST to %s: %s; fix url", sink->url_log, detail);
            return WP_SINK_FATAL;
        default:
            snprintf(why, sizeof why, "%s", detail);
            schedule_retry(sink, why, 0);
            return WP_SINK_OK;
        }
    }
    curl_easy_getinfo(sink->easy, CURLINFO_RESPONSE_CODE, &status);
    if (status >= 200 && status < 300) {
        if (sink->attempts > 0)
            logf_(sink, WP_SINK_LOG_INFO, "POST of %s to %s accepted (HTTP %ld) after %d failed attempts", what,
                  sink->url_log, status, sink->attempts);
        sink->durable = sink->q[sink->head + sink->batch_n - 1].ticket;
        batch_pop(sink);
        return WP_SINK_OK;
    }
    body_start(sink, body, sizeof body);
    if (status == 408 || status == 429 || (status >= 500 && status < 600)) {
        if (curl_easy_getinfo(sink->easy, CURLINFO_RETRY_AFTER, &retry_after) != CURLE_OK)
            retry_after = 0;
        snprintf(why, sizeof why, "HTTP %ld%s%s", status, body[0] ? ": " : "", body);
        schedule_retry(sink, why, (long)retry_after);
        return WP_SINK_OK;
    }
    if (status >= 300 && status < 400) {
        set_err(err, errlen,
                "%s answered HTTP %ld (a redirect, not followed: POSTs must not be redirected); "
                "set url to the receiver's final address",
                sink->url_log, status);
        return WP_SINK_FATAL;
    }
    set_err(err, errlen,
            "%s refused %s: HTTP %ld%s%s; the receiver rejects these events: fix the receiver or the sink's "
            "configuration (url, secret, header), then restart the sink",
            sink->url_log, what, status, body[0] ? ": " : "", body);
    return WP_SINK_FATAL;
}

/*
 * Serves the requests until deadline (monotonic ms), or until the queue is
 * empty.  A batch that ends is followed at once by the next.  With early, it
 * returns as soon as a batch became durable, the next one already sent: the
 * core then saves the position and reads more from staging while the receiver
 * works (without it the core saw an empty queue and slept until the next
 * NOTIFY, up to 1 s, with a backlog waiting).
 */
static int pump_once(http_sink_t *sink, int64_t deadline, int early, char *err, size_t errlen)
{
    uint64_t before = sink->durable;

    if (sink->fatal[0] != '\0') {
        /* refused for good: a flush at stop must not send the refused batch again */
        set_err(err, errlen, "%s", sink->fatal);
        return WP_SINK_FATAL;
    }
    for (;;) {
        int64_t now = now_ms();
        int running = 0, left = 0, rc;
        CURLMsg *msg;

        if (!sink->in_flight) {
            if (sink->count == 0)
                return WP_SINK_OK;
            if (sink->retry_at > now) {
                if (now >= deadline)
                    return WP_SINK_OK;
                sleep_ms((sink->retry_at < deadline ? sink->retry_at : deadline) - now);
                continue;
            }
            rc = request_start(sink, err, errlen);
            if (rc != WP_SINK_OK)
                return rc;
            if (early && sink->durable != before) {
                /* put the next batch on the wire; its end is read by the next call */
                if (curl_multi_perform(sink->multi, &running) != CURLM_OK) {
                    set_err(err, errlen, "curl_multi_perform failed");
                    return WP_SINK_FATAL;
                }
                return WP_SINK_OK;
            }
        }
        if (curl_multi_perform(sink->multi, &running) != CURLM_OK) {
            set_err(err, errlen, "curl_multi_perform failed");
            return WP_SINK_FATAL;
        }
        while ((msg = curl_multi_info_read(sink->multi, &left)) != NULL) {
            if (msg->msg == CURLMSG_DONE) {
                rc = request_done(sink, msg->data.result, err, errlen);
                if (rc != WP_SINK_OK)
                    return rc;
            }
        }
        if (!sink->in_flight)
            continue;
        now = now_ms();
        if (now >= deadline)
            return WP_SINK_OK;
        curl_multi_poll(sink->multi, NULL, 0, (int)(deadline - now < 1000 ? deadline - now : 1000), NULL);
    }
}

/* pump_once, and a fatal answer is final for the session (it is kept and returned again). */
static int pump(http_sink_t *sink, int64_t deadline, int early, char *err, size_t errlen)
{
    int rc = pump_once(sink, deadline, early, err, errlen);
    if (rc == WP_SINK_FATAL)
        snprintf(sink->fatal, sizeof sink->fatal, "%s", err);
    return rc;
}

/* --- the ABI ------------------------------------------------------------ */

static void http_close(void *state)
{
    http_sink_t *sink = state;
    if (sink == NULL)
        return;
    if (sink->in_flight)
        curl_multi_remove_handle(sink->multi, sink->easy);
    curl_easy_cleanup(sink->easy);
    curl_multi_cleanup(sink->multi);
    curl_slist_free_all(sink->headers);
    for (size_t i = 0; i < sink->count; i++) {
        free(sink->q[sink->head + i].json);
        free(sink->q[sink->head + i].source);
    }
    free(sink->q);
    free(sink->body);
    EVP_MAC_free(sink->mac);
    if (sink->secret != NULL) {
        OPENSSL_cleanse(sink->secret, sink->secret_len);
        free(sink->secret);
    }
    if (sink->header != NULL) {
        OPENSSL_cleanse(sink->header, strlen(sink->header));
        free(sink->header);
    }
    free(sink->url);
    free(sink->url_log);
    free(sink);
}

static int http_open(const wp_sink_host_t *host, void **state, char *err, size_t errlen)
{
    http_sink_t *sink = NULL;
    const char *v;
    long n;
    int rc = WP_SINK_FATAL;

    *state = NULL;
    pthread_once(&curl_once, curl_init_once);
    if (curl_init_rc != CURLE_OK) {
        set_err(err, errlen, "libcurl did not initialise: %s", curl_easy_strerror(curl_init_rc));
        goto out;
    }
    sink = calloc(1, sizeof *sink);
    if (sink == NULL)
        abort();
    sink->host = host;
    sink->timeout_ms = 10000;
    sink->post_events = 500;
    sink->max_backoff_ms = 30000;
    sink->tls_verify = 1;
    sink->rng = (unsigned)time(NULL) ^ (unsigned)getpid();

    v = host->config_get(host, "url");
    if (v == NULL || *v == '\0') {
        set_err(err, errlen, "url is required: the receiver's address, e.g. url = https://example.com/hook");
        goto out;
    }
    if (url_check(v, &sink->url_log, err, errlen) != 0)
        goto out;
    sink->url = xstrdup(v);
    v = host->config_get(host, "secret");
    if (v != NULL && *v != '\0') {
        sink->secret = xstrdup(v);
        sink->secret_len = strlen(v);
    }
    v = host->config_get(host, "header");
    if (v != NULL) {
        if (header_check(v, err, errlen) != 0)
            goto out;
        sink->header = xstrdup(v);
    }
    v = host->config_get(host, "timeout_ms");
    if (v != NULL) {
        if (parse_long("timeout_ms", v, 1, 3600000, &n, err, errlen) != 0)
            goto out;
        sink->timeout_ms = n;
    }
    v = host->config_get(host, "post_events");
    if (v != NULL) {
        if (parse_long("post_events", v, 1, 100000, &n, err, errlen) != 0)
            goto out;
        sink->post_events = (size_t)n;
    }
    v = host->config_get(host, "max_backoff_ms");
    if (v != NULL) {
        if (parse_long("max_backoff_ms", v, HTTP_BACKOFF_MIN_MS, 3600000, &n, err, errlen) != 0)
            goto out;
        sink->max_backoff_ms = n;
    }
    v = host->config_get(host, "tls_verify");
    if (v != NULL && parse_bool("tls_verify", v, &sink->tls_verify, err, errlen) != 0)
        goto out;

    sink->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    sink->easy = curl_easy_init();
    sink->multi = curl_multi_init();
    if (sink->mac == NULL || sink->easy == NULL || sink->multi == NULL) {
        set_err(err, errlen, "could not set up libcurl or libcrypto's HMAC");
        goto out;
    }
    curl_easy_setopt(sink->easy, CURLOPT_URL, sink->url);
    curl_easy_setopt(sink->easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(sink->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(sink->easy, CURLOPT_TIMEOUT_MS, sink->timeout_ms);
    curl_easy_setopt(sink->easy, CURLOPT_CONNECTTIMEOUT_MS, sink->timeout_ms);
    curl_easy_setopt(sink->easy, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(sink->easy, CURLOPT_USERAGENT, "walpipe-http-sink/1");
    curl_easy_setopt(sink->easy, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(sink->easy, CURLOPT_WRITEDATA, sink);
    curl_easy_setopt(sink->easy, CURLOPT_ERRORBUFFER, sink->errbuf);
    curl_easy_setopt(sink->easy, CURLOPT_POST, 1L);
    v = host->config_get(host, "ca_file");
    if (v != NULL && *v != '\0') {
        if (access(v, R_OK) != 0) {
            set_err(err, errlen, "ca_file \"%s\" cannot be read: %s", v, strerror(errno));
            goto out;
        }
        curl_easy_setopt(sink->easy, CURLOPT_CAINFO, v);
    }
    if (!sink->tls_verify) {
        curl_easy_setopt(sink->easy, CURLOPT_SSL_VERIFYPEER, 0L);
        curl_easy_setopt(sink->easy, CURLOPT_SSL_VERIFYHOST, 0L);
        logf_(sink, WP_SINK_LOG_WARN,
              "tls_verify = off: the receiver's certificate is NOT checked, so anyone on the path can pose as %s "
              "and read every event; give its CA in ca_file instead",
              sink->url_log);
    }
    if (sink->secret == NULL)
        logf_(sink, WP_SINK_LOG_WARN, "no secret: requests to %s are not signed (set secret to sign them)",
              sink->url_log);
    logf_(sink, WP_SINK_LOG_INFO, "posting to %s, %zu events per request, timeout %ld ms", sink->url_log,
          sink->post_events, sink->timeout_ms);
    *state = sink;
    sink = NULL;
    rc = WP_SINK_OK;
out:
    http_close(sink);
    return rc;
}

static int http_deliver(void *state, const wp_sink_event_t *events, size_t n, char *err, size_t errlen)
{
    http_sink_t *sink = state;
    if (sink->fatal[0] != '\0') {
        set_err(err, errlen, "%s", sink->fatal);
        return WP_SINK_FATAL;
    }
    for (size_t i = 0; i < n; i++) {
        char *json = NULL;
        size_t len = 0;
        if (event_render(&events[i], &json, &len, err, errlen) != 0)
            return WP_SINK_FATAL;
        queue_push(sink, &events[i], json, len);
    }
    return WP_SINK_OK;
}

static int http_poll(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen)
{
    http_sink_t *sink = state;
    int rc = pump(sink, now_ms() + (timeout_ms > 0 ? timeout_ms : 0), 1, err, errlen);
    *durable = sink->durable;
    return rc;
}

static int http_flush(void *state, int timeout_ms, uint64_t *durable, char *err, size_t errlen)
{
    http_sink_t *sink = state;
    int rc = pump(sink, now_ms() + (timeout_ms > 0 ? timeout_ms : 0), 0, err, errlen);
    *durable = sink->durable;
    return rc;
}

static const wp_sink_plugin_t http_plugin = {
    .abi_version = WP_SINK_ABI_VERSION,
    .name = "http",
    .keys = http_keys,
    .open = http_open,
    .deliver = http_deliver,
    .poll = http_poll,
    .flush = http_flush,
    .close = http_close,
};

WP_SINK_EXPORT const wp_sink_plugin_t *wp_sink_plugin_entry(void);
WP_SINK_EXPORT const wp_sink_plugin_t *wp_sink_plugin_entry(void)
{
    return &http_plugin;
}
