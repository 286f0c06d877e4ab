#!/usr/bin/env bash
# Starts Porten on this machine in the foreground: the hub (uvicorn, one process per core), this
# node's Celery worker, beat and Flower (behind a login: scripts/flower.sh).
# Ctrl-C stops all of them (and the engines the node started).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export PORTEN_PORT="${PORTEN_PORT:-8000}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
export DJANGO_SETTINGS_MODULE=porten.settings
VAR_DIR="${PORTEN_VAR_DIR:-$PWD/var}"
mkdir -p "$VAR_DIR/logs" "$VAR_DIR/redis"

pids=()
# Parts that may stop without taking the stack down (Flower): stopped with the rest, not watched.
optional_pids=()
stopping=0
cleanup() {
  [ "$stopping" -eq 1 ] && return
  stopping=1
  echo; echo "porten: stopping..."
  kill -TERM "${pids[@]}" ${optional_pids[@]+"${optional_pids[@]}"} 2>/dev/null || true
  wait "${pids[@]}" ${optional_pids[@]+"${optional_pids[@]}"} 2>/dev/null || true
  "$PY" manage.py stop_node_engines || true
  echo "porten: stopped."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
  case "$REDIS_URL" in
    redis://127.0.0.1:*|redis://localhost:*)
      port="$(echo "$REDIS_URL" | sed -E 's#redis://[^:]+:([0-9]+).*#\1#')"
      echo "porten: starting a local Redis on port $port (data in $VAR_DIR/redis)"
      redis-server --port "$port" --bind 127.0.0.1 --dir "$VAR_DIR/redis" --save 60 1 --loglevel warning &
      pids+=($!)
      for _ in $(seq 50); do redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && break; sleep 0.1; done ;;
    *) echo "porten: Redis at $REDIS_URL does not answer" >&2; exit 1 ;;
  esac
fi

"$PY" manage.py migrate --noinput -v0
"$PY" manage.py porten_setup

HUB_PROCESSES="${PORTEN_HUB_PROCESSES:-$(nproc)}"
# The hub processes' metrics files (porten/metrics.py), emptied at each start: a scrape sums every
# file there. Exported to uvicorn only: Flower has Prometheus metrics of its own that must stay out.
METRICS_DIR="${PROMETHEUS_MULTIPROC_DIR:-$VAR_DIR/metrics}"
mkdir -p "$METRICS_DIR"
rm -f "$METRICS_DIR"/*.db "$METRICS_DIR"/porten-hub-*.pid
PROMETHEUS_MULTIPROC_DIR="$METRICS_DIR" \
  .venv/bin/uvicorn porten.asgi:application --host "${PORTEN_HOST:-127.0.0.1}" --port "$PORTEN_PORT" \
  --workers "$HUB_PROCESSES" --loop uvloop --http httptools --lifespan on --no-server-header &
pids+=($!)
"$PY" manage.py node_worker --hub &
pids+=($!)
.venv/bin/celery -A porten beat --loglevel WARNING -s "$VAR_DIR/celerybeat-schedule" &
pids+=($!)
# Flower is for looking, not serving: a taken port means no Flower, not no Porten.
flower_line="Flower: not started"
if scripts/flower.sh --check; then
  scripts/flower.sh >"$VAR_DIR/logs/flower.log" 2>&1 &
  optional_pids+=($!)
  flower_line="Flower http://${PORTEN_FLOWER_HOST:-127.0.0.1}:${PORTEN_FLOWER_PORT:-5555}/"
fi

# Say "up" once this node is online: before its first heartbeat a cold request has nowhere to go.
if ! "$PY" manage.py wait_for_node --timeout 120; then
  echo "porten: this node is not online yet; cold requests get 503 no_capacity until it is (logs in $VAR_DIR/logs)" >&2
fi

cat <<MSG

porten: up. Playground http://127.0.0.1:$PORTEN_PORT/playground/  Admin http://127.0.0.1:$PORTEN_PORT/admin/
        API http://127.0.0.1:$PORTEN_PORT/v1  Fleet http://127.0.0.1:$PORTEN_PORT/fleet/  $flower_line
        (Ctrl-C stops everything)

MSG
# Any one part dying takes the whole stack down, so nothing runs half-started.
wait -n "${pids[@]}"
