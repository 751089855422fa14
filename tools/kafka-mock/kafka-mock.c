/*
 * kafka-mock: librdkafka's mock Kafka cluster (rdkafka_mock.h) as a process of its own,
 * so that walpipe and independent clients (kcat, confluent-kafka) talk to it over TCP
 * with the real protocol.  Test and demo tool; walpipe never links it.
 *
 *   kafka-mock [BROKERS]        (default 3 brokers)
 *   kafka-mock --bootstrap-file FILE [BROKERS]
 *                               writes the bootstrap address to FILE (whole, by a rename)
 *                               instead of stdout, reads no commands and runs until
 *                               SIGTERM/SIGINT: the container's stand-in broker
 *                               (docker/walpipe-entrypoint.sh)
 *
 * stdout line 1 is the bootstrap address (host:port,host:port,...).  Then one command
 * per stdin line; each is answered with one stdout line, "ok" or "error: <why>", so a
 * caller knows the fault is in place before it goes on:
 *   down <broker>                         broker id 1..N stops serving (connections dropped)
 *   up <broker>                           it serves again
 *   errors <apikey> <count> <errcode>     the next <count> requests of that ApiKey
 *                                         (Produce 0, Fetch 1, Metadata 3, InitProducerId 22)
 *                                         fail with <errcode> (rd_kafka_resp_err_t, e.g. -195
 *                                         = transport, 7 = request timed out)
 *   create <topic> <partitions>           creates a topic (auto-created topics get 4)
 *   ping                                  answers ok (a barrier)
 * Exits 0 on EOF of stdin or on SIGTERM/SIGINT; the cluster and its messages live only
 * as long as the process.
 */
#include <errno.h>
#include <signal.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* Runs one command line against the cluster; writes the one-line answer to stdout. */
static void run_command(rd_kafka_mock_cluster_t *mc, int brokers, char *line)
{
    char *argv[4] = {0};
    int argc = 0;
    char *save = NULL;
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;

    for (char *tok = strtok_r(line, " \t\r\n", &save); tok && argc < 4; tok = strtok_r(NULL, " \t\r\n", &save))
        argv[argc++] = tok;
    if (argc == 0)
        return;
    if ((strcmp(argv[0], "down") == 0 || strcmp(argv[0], "up") == 0) && argc == 2) {
        int id = atoi(argv[1]);
        if (id < 1 || id > brokers) {
            printf("error: broker %s is not one of 1..%d\n", argv[1], brokers);
            goto out;
        }
        err = argv[0][0] == 'd' ? rd_kafka_mock_broker_set_down(mc, id) : rd_kafka_mock_broker_set_up(mc, id);
    } else if (strcmp(argv[0], "errors") == 0 && argc == 4) {
        long cnt = atol(argv[2]);
        rd_kafka_resp_err_t errs[1024];
        if (cnt < 1 || cnt > 1024) {
            printf("error: count must be 1..1024\n");
            goto out;
        }
        for (long i = 0; i < cnt; i++)
            errs[i] = (rd_kafka_resp_err_t)atoi(argv[3]);
        rd_kafka_mock_push_request_errors_array(mc, (int16_t)atoi(argv[1]), (size_t)cnt, errs);
    } else if (strcmp(argv[0], "create") == 0 && argc == 3) {
        err = rd_kafka_mock_topic_create(mc, argv[1], atoi(argv[2]), 1);
    } else if (strcmp(argv[0], "ping") == 0 && argc == 1) {
        /* nothing: the answer is the barrier */
    } else {
        printf("error: unknown command '%s' (down N | up N | errors APIKEY COUNT ERR | create TOPIC PARTS | ping)\n",
               argv[0]);
        goto out;
    }
    if (err)
        printf("error: %s\n", rd_kafka_err2str(err));
    else
        printf("ok\n");
out:
    fflush(stdout);
}

int main(int argc, char **argv)
{
    const char *bootstrap_file = NULL;
    if (argc > 2 && strcmp(argv[1], "--bootstrap-file") == 0) {
        bootstrap_file = argv[2];
        argv += 2;
        argc -= 2;
    }
    int brokers = argc > 1 ? atoi(argv[1]) : 3;
    char errstr[512];
    char line[1024];
    rd_kafka_conf_t *conf = NULL;
    rd_kafka_t *rk = NULL;
    rd_kafka_mock_cluster_t *mc = NULL;
    struct sigaction sa;
    int rc = 1;

    if (brokers < 1 || brokers > 64) {
        fprintf(stderr, "usage: kafka-mock [--bootstrap-file FILE] [BROKERS 1..64]\n");
        return 2;
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: a blocked fgets returns on SIGTERM */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
        goto conf_error;
    /* the handle only hosts the cluster's thread; it never produces */
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!rk)
        goto conf_error;
    conf = NULL; /* owned by rk now */
    mc = rd_kafka_mock_cluster_new(rk, brokers);
    if (!mc) {
        fprintf(stderr, "kafka-mock: could not create the mock cluster\n");
        goto out;
    }
    if (bootstrap_file) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", bootstrap_file);
        FILE *f = fopen(tmp, "w");
        if (f == NULL || fprintf(f, "%s\n", rd_kafka_mock_cluster_bootstraps(mc)) < 0 || fclose(f) != 0 ||
            rename(tmp, bootstrap_file) != 0) {
            fprintf(stderr, "kafka-mock: could not write %s: %s\n", bootstrap_file, strerror(errno));
            goto out;
        }
        while (!stop_requested)
            pause(); /* returns on the signal */
        rc = 0;
        goto out;
    }
    printf("%s\n", rd_kafka_mock_cluster_bootstraps(mc));
    fflush(stdout);

    while (!stop_requested) {
        if (!fgets(line, sizeof line, stdin)) {
            if (ferror(stdin) && errno == EINTR && !stop_requested) {
                clearerr(stdin);
                continue;
            }
            break;
        }
        run_command(mc, brokers, line);
    }
    rc = 0;
    goto out;
conf_error:
    fprintf(stderr, "kafka-mock: %s\n", errstr);
out:
    if (mc)
        rd_kafka_mock_cluster_destroy(mc);
    if (rk)
        rd_kafka_destroy(rk);
    if (conf)
        rd_kafka_conf_destroy(conf);
    return rc;
}
