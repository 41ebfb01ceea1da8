#!/usr/bin/env bash
# Start the head node of a Ray cluster for distjac jobs (run on the head machine).
#
#   RAY_AUTH_TOKEN_PATH=~/.ray/distjac_token scripts/ray_head.sh [NODE_IP]
#
# Token authentication is on: every node and every driver must use the same token
# (RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH). A token file is
# generated, readable by its owner only, when none exists. The dashboard (job
# submission) listens on loopback; reach it through an SSH tunnel, or set
# DASHBOARD_HOST=0.0.0.0 behind a firewall. Jobs' output.path must be a directory every
# node mounts at the same path (workers write their own parts).
set -euo pipefail
NODE_IP="${1:-$(hostname -I | awk '{print $1}')}"
PORT="${RAY_PORT:-6379}"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/distjac_token}"
if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
  mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
  (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
  echo "generated a cluster token in $RAY_AUTH_TOKEN_PATH; copy it to every node and driver" >&2
fi
chmod 600 "$RAY_AUTH_TOKEN_PATH" 2>/dev/null || true
exec ray start --head --node-ip-address="$NODE_IP" --port="$PORT" \
  --dashboard-host="${DASHBOARD_HOST:-127.0.0.1}" --dashboard-port="${DASHBOARD_PORT:-8265}" \
  ${RAY_START_ARGS:-}
