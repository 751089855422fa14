#!/bin/sh
# The walpipe container's entrypoint.  For `run` and `work` it first applies the staging
# schema (`walpipe init`, idempotent), retrying for up to $WALPIPE_INIT_WAIT seconds (default
# 120) while the staging database starts, then it becomes walpipe itself (exec, so SIGTERM
# reaches walpipe).  Any other command (init, snapshot, dlq, --version ...) runs as given.
set -eu
case "${1:-}" in
  run|work)
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
