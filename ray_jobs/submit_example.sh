#!/usr/bin/env bash
# submit_example.sh - submit a small training run to a Ray cluster, two ways.
#
#   ray_jobs/start_local_cluster.sh && source ~/.dist-llm/ray-local/cluster.env   # a local cluster
#   ray_jobs/submit_example.sh                       # RAY_ADDRESS=http://<head>:8265 for your own
#
# Run from the repository root. For a multi-node cluster, point output_dir (and the data) at
# storage every node sees: output_dir=/shared/runs
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS=http://<head>:8265 (or source the cluster.env of start_local_cluster.sh)}"
OUT=${OUT:-$PWD/runs}

# 1. through dist-llm (composes and validates the config first, uploads this repository as the
#    job's working directory, prints the submission id)
dist-llm submit ray launcher.ray.num_workers=2 launcher.ray.cpus_per_worker=1 launcher.ray.max_failures=2 \
    experiment=smoke name=ray-smoke output_dir="$OUT"

# 2. by hand, with the Ray CLI: the same entrypoint every launcher uses
ray job submit --address "$RAY_ADDRESS" --working-dir . --no-wait \
    --runtime-env-json '{"excludes": ["/.git", "/.venv", "/runs", "/data"], "env_vars": {"DIST_LLM_JOB_ID": "by-hand-1"}}' \
    -- python -m dist_llm.cli.main train launcher=ray launcher.ray.num_workers=2 \
       experiment=smoke name=ray-by-hand output_dir="$OUT"

echo "follow a job:  ray job logs --follow --address \"$RAY_ADDRESS\" <submission id>"
echo "list jobs:     ray job list --address \"$RAY_ADDRESS\""
