#!/usr/bin/env bash
# stop_local_slurm.sh - stop the daemons that start_local_slurm.sh started, by their
# PID files under /run/slurm-local (never by process name). Idempotent.
# First cancels every job still known to slurmctld and waits for the nodes to drain
# their steps, so no slurmstepd/job processes are left behind.
set -uo pipefail

RUN=/run/slurm-local
WAIT=${SLURM_LOCAL_STOP_WAIT:-30}

say() { echo "[stop-local-slurm] $*"; }
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }

pid_alive() {  # pid_alive PIDFILE NAME
    local f=$1 name=$2 p comm
    [ -s "$f" ] || return 1
    p=$(cat "$f" 2>/dev/null) || return 1
    [[ "$p" =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$p/comm" 2>/dev/null) || return 1
    [[ "$comm" == "$name"* ]]
}

# stop_pidfiles NAME PIDFILE...: SIGTERM every live NAME process named in the PID
# files (checked against /proc/PID/comm, so a reused PID is never hit), wait up to
# 20 s for all of them, SIGKILL what is left, remove the PID files.
stop_pidfiles() {
    local name=$1 f p pids=()
    shift
    for f in "$@"; do
        if pid_alive "$f" "$name"; then
            p=$(cat "$f"); pids+=("$p")
            kill -TERM "$p" 2>/dev/null
        elif [ -e "$f" ]; then
            say "$name: stale PID file $f removed"
        fi
        rm -f "$f"
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    for _ in $(seq 1 100); do
        alive=0
        for p in "${pids[@]}"; do [ -d "/proc/$p" ] && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    for p in "${pids[@]}"; do
        if [ -d "/proc/$p" ]; then
            say "$name (pid $p) ignored SIGTERM for 20 s, sending SIGKILL"
            kill -KILL "$p" 2>/dev/null
        fi
    done
    say "$name stopped (pid ${pids[*]})"
}

# 1. cancel all jobs while slurmctld and the slurmds are still up
if pid_alive "$RUN/slurmctld.pid" slurmctld && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        end=$(( $(date +%s) + WAIT ))
        while [ "$(date +%s)" -lt "$end" ]; do
            left=$(squeue -h -o '%A %t' 2>/dev/null | grep -vc ' CD$' || true)
            busy=$(sinfo -h -N -o '%t' 2>/dev/null | grep -Ec 'alloc|mix|comp' || true)
            [ "$left" = 0 ] && [ "$busy" = 0 ] && break
            sleep 0.5
        done
        [ "$left" = 0 ] && [ "$busy" = 0 ] || say "warning: jobs/nodes still busy after ${WAIT}s"
    fi
fi

# 2. daemons: all slurmd and slurmctld together, then slurmdbd, MariaDB, munged
shopt -s nullglob
stop_pidfiles slurmd "$RUN"/slurmd-*.pid &
stop_pidfiles slurmctld "$RUN/slurmctld.pid" &
wait
stop_pidfiles slurmdbd "$RUN/slurmdbd.pid"
stop_pidfiles mariadbd "$RUN/mysql/mariadbd.pid"
# munged only if start_local_slurm.sh started it (it copies munged's PID here)
if pid_alive "$RUN/munged.pid" munged; then
    stop_pidfiles munged "$RUN/munged.pid"
    rm -f /run/munge/munged.pid
else
    rm -f "$RUN/munged.pid"
fi
say "done"
