#!/usr/bin/env bash
# Submit a distjac job to a running cluster with Ray's job API; the driver runs on the
# head and joins the cluster with --address auto.
#
#   RAY_AUTH_TOKEN_PATH=~/.ray/distjac_token scripts/submit_job.sh configs/scaling_reduce.yaml \
#       [--set output.path=/shared/results/scaling_reduce ...]
#
# RAY_ADDRESS is the dashboard's address (default http://127.0.0.1:8265, e.g. through
# `ssh -L 8265:127.0.0.1:8265 head`). distjac must be installed on every node (or add
# --runtime-env-json); output.path must be on a filesystem all nodes share. A job that
# stops (killed, node lost) resumes when submitted again with the same config.
set -euo pipefail
CONFIG="${1:?usage: scripts/submit_job.sh CONFIG [distjac run options...]}"
shift
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/distjac_token}"
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
  distjac run "$CONFIG" --address auto --no-progress "$@"
