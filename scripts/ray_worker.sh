#!/usr/bin/env bash
# Join a worker node to a distjac Ray cluster (run on each worker machine).
#
#   RAY_AUTH_TOKEN_PATH=~/.ray/distjac_token scripts/ray_worker.sh HEAD_IP [NODE_IP]
#
# Uses the head's token (same RAY_AUTH_TOKEN or token file). GPUs are detected by Ray;
# distjac puts one worker on each GPU a node offers (engine.device: auto).
set -euo pipefail
HEAD_IP="${1:?usage: scripts/ray_worker.sh HEAD_IP [NODE_IP]}"
NODE_IP="${2:-$(hostname -I | awk '{print $1}')}"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/distjac_token}"
if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
  echo "no cluster token: copy the head's $RAY_AUTH_TOKEN_PATH here or set RAY_AUTH_TOKEN" >&2
  exit 2
fi
exec ray start --address="$HEAD_IP:${RAY_PORT:-6379}" --node-ip-address="$NODE_IP" ${RAY_START_ARGS:-}
