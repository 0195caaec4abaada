#!/usr/bin/env bash
# start_local_cluster.sh - a one-machine Ray cluster for tests and single-machine users.
#
# Binds the head (GCS) and the dashboard / job API to 127.0.0.1 only (never 0.0.0.0 unless you
# set RAY_LOCAL_HOST yourself), and turns on Ray's token authentication (`ray get-auth-token`,
# Ray >= 2.52; an older Ray is refused): the token lives in $RAY_LOCAL_DIR/auth_token (0600).
# Writes $RAY_LOCAL_DIR/cluster.env; `source` it to talk to the cluster:
#     source ~/.dist-llm/ray-local/cluster.env
#     dist-llm submit ray experiment=smoke          # or: ray job submit -- python -m ...
# Stop with ray_jobs/stop_local_cluster.sh (same RAY_LOCAL_DIR); it stops only this cluster.
#
# Knobs (environment variables):
#   RAY_LOCAL_CPUS=2             CPUs the node offers (one Ray Train worker per CPU by default)
#   RAY_LOCAL_GPUS=0             GPUs the node offers
#   RAY_LOCAL_DIR=~/.dist-llm/ray-local   state: PID file, token, logs, Ray temp dir
#   RAY_LOCAL_PORT=6379          GCS port        RAY_LOCAL_DASHBOARD_PORT=8265  job API port
#   RAY_LOCAL_HOST=127.0.0.1     address to bind
#   RAY_LOCAL_AUTH=token         token (refuses a Ray without it) | disabled (explicitly off)
#   RAY_LOCAL_TIMEOUT=90         seconds to wait for the job API
#   RAY=ray                      the ray command (default: ray on PATH)
set -euo pipefail

CPUS=${RAY_LOCAL_CPUS:-2}
GPUS=${RAY_LOCAL_GPUS:-0}
DIR=${RAY_LOCAL_DIR:-$HOME/.dist-llm/ray-local}
PORT=${RAY_LOCAL_PORT:-6379}
DASH_PORT=${RAY_LOCAL_DASHBOARD_PORT:-8265}
HOST=${RAY_LOCAL_HOST:-127.0.0.1}
AUTH=${RAY_LOCAL_AUTH:-token}
TIMEOUT=${RAY_LOCAL_TIMEOUT:-90}
RAY=${RAY:-ray}

T0=$(date +%s%3N)
say() { local ms=$(( $(date +%s%3N) - T0 )); printf '[start-local-ray %d.%03ds] %s\n' $((ms / 1000)) $((ms % 1000)) "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }
tcp_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

command -v "$RAY" >/dev/null || die "'$RAY' not found: pip install 'ray[train]' (or set RAY=/path/to/ray)"
[[ "$CPUS" =~ ^[0-9]+$ && "$GPUS" =~ ^[0-9]+$ && "$PORT" =~ ^[0-9]+$ && "$DASH_PORT" =~ ^[0-9]+$ ]] \
    || die "RAY_LOCAL_CPUS/GPUS/PORT/DASHBOARD_PORT must be integers"
mkdir -p "$DIR"
chmod 700 "$DIR"
DIR=$(cd "$DIR" && pwd)

if [ -s "$DIR/ray.pid" ] && kill -0 "$(cat "$DIR/ray.pid")" 2>/dev/null; then
    say "already running (pid $(cat "$DIR/ray.pid")); see $DIR/cluster.env"
    exit 0
fi
if tcp_open "$HOST" "$PORT" || tcp_open "$HOST" "$DASH_PORT"; then
    die "port $PORT or $DASH_PORT on $HOST is in use (another Ray cluster?); set RAY_LOCAL_PORT/RAY_LOCAL_DASHBOARD_PORT"
fi

# ---------------------------------------------------------------- authentication
unset RAY_AUTH_TOKEN
# Token auth needs Ray >= 2.52 (pyproject pins that floor). An older Ray is refused instead of
# silently starting an open job API: anyone on this machine could run code as you. Turning auth
# off is an explicit choice (RAY_LOCAL_AUTH=disabled), never a fallback.
if [ "$AUTH" = disabled ]; then
    export RAY_AUTH_MODE=disabled
    say "WARNING: token authentication off (RAY_LOCAL_AUTH=disabled): any local user can submit jobs" \
        "to http://$HOST:$DASH_PORT"
elif "$RAY" get-auth-token --help >/dev/null 2>&1; then
    if [ ! -s "$DIR/auth_token" ]; then
        (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$DIR/auth_token")
    fi
    chmod 600 "$DIR/auth_token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/auth_token"
    say "token authentication on (token in $DIR/auth_token)"
else
    die "this Ray ($("$RAY" --version 2>&1)) has no token authentication (needs ray >= 2.52): pip install" \
        "'ray[default,train]>=2.52', or set RAY_LOCAL_AUTH=disabled to run without it on purpose"
fi

# ---------------------------------------------------------------- start
# `ray start --block` stays in the foreground and owns the cluster's processes; it runs in its
# own session so stop_local_cluster.sh can end exactly this cluster (process group + the
# DIST_LLM_RAY_CLUSTER marker every Ray process inherits), never `ray stop` (which ends every
# Ray process on the machine).
CLUSTER_ID="$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')"
echo "$CLUSTER_ID" > "$DIR/cluster.id"
mkdir -p "$DIR/tmp"
DIST_LLM_RAY_CLUSTER="$CLUSTER_ID" RAY_USAGE_STATS_ENABLED=0 setsid "$RAY" start --head --block \
    --node-ip-address="$HOST" --port="$PORT" \
    --dashboard-host="$HOST" --dashboard-port="$DASH_PORT" --include-dashboard=true \
    --num-cpus="$CPUS" --num-gpus="$GPUS" --temp-dir="$DIR/tmp" --disable-usage-stats \
    >"$DIR/ray-start.log" 2>&1 </dev/null &
echo $! > "$DIR/ray.pid"

end=$(( $(date +%s) + TIMEOUT ))
until tcp_open "$HOST" "$DASH_PORT"; do
    kill -0 "$(cat "$DIR/ray.pid")" 2>/dev/null || { tail -30 "$DIR/ray-start.log" >&2; die "ray start exited"; }
    [ "$(date +%s)" -lt "$end" ] || { tail -30 "$DIR/ray-start.log" >&2; die "job API not up after ${TIMEOUT}s"; }
    sleep 0.3
done
until "$RAY" job list --address "http://$HOST:$DASH_PORT" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { tail -30 "$DIR/ray-start.log" >&2; die "job API does not answer after ${TIMEOUT}s"; }
    sleep 0.5
done

{
    echo "# written by ray_jobs/start_local_cluster.sh; source this file to use the cluster"
    echo "export RAY_ADDRESS=http://$HOST:$DASH_PORT"
    echo "export RAY_GCS_ADDRESS=$HOST:$PORT"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    if [ "$RAY_AUTH_MODE" = token ]; then echo "export RAY_AUTH_TOKEN_PATH=$DIR/auth_token"; fi
} > "$DIR/cluster.env"
say "Ray head up (pid $(cat "$DIR/ray.pid")): GCS $HOST:$PORT, job API http://$HOST:$DASH_PORT, $CPUS CPU(s)"
say "use it: source $DIR/cluster.env"
