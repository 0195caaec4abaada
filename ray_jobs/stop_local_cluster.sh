#!/usr/bin/env bash
# stop_local_cluster.sh - stop the cluster started by start_local_cluster.sh (same RAY_LOCAL_DIR).
# Ends only that cluster's processes: the `ray start --block` process group from ray.pid, then any
# process that still carries the cluster's DIST_LLM_RAY_CLUSTER marker (workers, job drivers).
# Never `ray stop` (that ends every Ray process on the machine). Idempotent.
set -uo pipefail
DIR=${RAY_LOCAL_DIR:-$HOME/.dist-llm/ray-local}
WAIT=${RAY_LOCAL_STOP_WAIT:-10}
say() { echo "[stop-local-ray] $*"; }
[ -d "$DIR" ] || { say "nothing to stop ($DIR does not exist)"; exit 0; }

marked_pids() {  # processes whose environment carries this cluster's marker
    local id p
    id=$(cat "$DIR/cluster.id" 2>/dev/null) || return 0
    [ -n "$id" ] || return 0
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = "$$" ] && continue
        if { tr '\0' '\n' < "/proc/$p/environ"; } 2>/dev/null | grep -qx "DIST_LLM_RAY_CLUSTER=$id"; then echo "$p"; fi
    done
}

pid=$(cat "$DIR/ray.pid" 2>/dev/null || true)
if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "ray.*start"; then
    say "stopping ray start (pid $pid) and its process group"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
fi
# `ray start --block` ends the processes it started on SIGTERM; give it WAIT seconds, then TERM
# whatever still carries the marker (workers, job drivers), then KILL.
end=$(( $(date +%s) + WAIT ))
while [ -n "$(marked_pids)" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.5; done
left=$(marked_pids | tr '\n' ' ')
if [ -n "${left// /}" ]; then
    say "SIGTERM to what is left: $left"
    # shellcheck disable=SC2086
    kill -TERM $left 2>/dev/null
    for _ in $(seq 1 10); do [ -z "$(marked_pids)" ] && break; sleep 0.5; done
    left=$(marked_pids | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
        say "SIGKILL to what is left: $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null
    fi
fi
rm -f "$DIR/ray.pid" "$DIR/cluster.env"
say "done"
