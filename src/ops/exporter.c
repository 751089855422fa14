/*
 * exporter.c: GET /metrics over HTTP with libmicrohttpd.
 *
 * Job: bind [metrics] listen (a bare port means 127.0.0.1: listeners are on
 * loopback unless the operator names another address), answer GET /metrics
 * with wp_metrics_render's text, 404 anything else, 405 other methods.
 *
 * Invariant: the handler runs on MHD's thread and only reads the registry
 * (atomics and its mutexes); it never touches a database, so a scrape costs
 * microseconds and cannot stall capture.  No label carries a conninfo.
 */
#include "wp_setup.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "exporter.h"
#include "log.h"
#include "mem.h"
#include "metrics.h"

struct wp_exporter {
    struct MHD_Daemon *daemon;
};

static enum MHD_Result answer(struct MHD_Connection *conn, unsigned int status, const char *type, char *body,
                              size_t len)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (resp == NULL) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result rc = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                              const char *version, const char *upload_data, size_t *upload_size, void **con_cls)
{
    (void)cls;
    (void)version;
    (void)upload_data;
    (void)upload_size;
    (void)con_cls;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return answer(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", wp_strdup("only GET\n"), 9);
    if (strcmp(url, "/metrics") != 0)
        return answer(conn, MHD_HTTP_NOT_FOUND, "text/plain", wp_strdup("see /metrics\n"), 13);
    wp_buf_t out = WP_BUF_INIT;
    wp_metrics_render(&out);
    wp_buf_append(&out, "", 0);
    return answer(conn, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", out.data, out.len);
}

wp_exporter_t *wp_exporter_start(const wp_config_t *config, bool *failed)
{
    *failed = false;
    if (config->metrics_listen == NULL)
        return NULL;
    char host[64];
    int port;
    if (wp_config_parse_listen(config->metrics_listen, host, sizeof host, &port) != 0) {
        *failed = true; /* the configuration checked it already */
        return NULL;
    }
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    if (strchr(host, ':')) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a6->sin6_addr) != 1)
            goto bad;
        flags |= MHD_USE_IPv6;
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a4->sin_addr) != 1)
            goto bad;
    }
    wp_exporter_t *exporter = wp_calloc(1, sizeof *exporter);
    exporter->daemon = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, handle, NULL, MHD_OPTION_SOCK_ADDR,
                                        (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_LIMIT, (unsigned int)16,
                                        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)10, MHD_OPTION_END);
    if (exporter->daemon == NULL) {
        wp_error("metrics: could not listen on %s port %d (in use, or not an address of this machine); hint: set "
                 "[metrics] listen to a free port",
                 host, port);
        free(exporter);
        *failed = true;
        return NULL;
    }
    wp_info("metrics: serving /metrics on %s%s%s:%d%s", strchr(host, ':') ? "[" : "", host,
            strchr(host, ':') ? "]" : "", port,
            strcmp(host, "127.0.0.1") == 0 || strcmp(host, "::1") == 0 ? "" : " (not loopback: firewall it)");
    return exporter;
bad:
    wp_error("metrics: \"%s\" is not a numeric IP address; set [metrics] listen = HOST:PORT", host);
    *failed = true;
    return NULL;
}

void wp_exporter_stop(wp_exporter_t *exporter)
{
    if (exporter == NULL)
        return;
    MHD_stop_daemon(exporter->daemon);
    free(exporter);
}
