#!/bin/sh
# The walpipe container's entrypoint.  For `run` and `work` it first applies the staging
# schema (`walpipe init`, idempotent), retrying for up to $WALPIPE_INIT_WAIT seconds (default
# 120) while the staging database starts, then it becomes walpipe itself (exec, so SIGTERM
# reaches walpipe).  Any other command (init, snapshot, dlq, --version ...) runs as given.
# With WALPIPE_KAFKA_BROKERS=mock (compose.yaml's default) `run` first starts librdkafka's mock
# cluster in the background (a stand-in broker that keeps messages in memory, for trying the
# Kafka sink out) and points WALPIPE_KAFKA_BROKERS at it; set it to your brokers instead.
set -eu
case "${1:-}" in
  run|work)
    if [ "$1" = run ] && [ "${WALPIPE_KAFKA_BROKERS:-}" = mock ]; then
      rm -f /tmp/kafka-bootstrap
      kafka-mock --bootstrap-file /tmp/kafka-bootstrap 1 &
      i=0
      until [ -s /tmp/kafka-bootstrap ]; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then echo "walpipe-entrypoint: kafka-mock did not start" >&2; exit 1; fi
        sleep 0.1
      done
      WALPIPE_KAFKA_BROKERS=$(cat /tmp/kafka-bootstrap)
      export WALPIPE_KAFKA_BROKERS
      echo "walpipe-entrypoint: kafka sink to the mock broker at $WALPIPE_KAFKA_BROKERS" >&2
    fi
    config=/etc/walpipe/walpipe.conf
    prev=""
    for a in "$@"; do [ "$prev" = "--config" ] && config="$a"; prev="$a"; done
    deadline=$(( $(date +%s) + ${WALPIPE_INIT_WAIT:-120} ))
    until walpipe init --config "$config"; do
      if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "walpipe-entrypoint: staging not ready after ${WALPIPE_INIT_WAIT:-120} s" >&2
        exit 1
      fi
      sleep 1
    done
    ;;
esac
exec walpipe "$@"
