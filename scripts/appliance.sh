#!/usr/bin/env bash
# Runs the appliance (compose.yaml): Redis, master, workers, web UI at http://localhost:8080.
# On first use it writes .env from .env.example with fresh random secrets (join token, Redis
# password, API key), because the master and workers refuse the public placeholders; an
# existing .env is used as it is. Then: docker compose up --build --scale worker=$WORKERS.
#   bash scripts/appliance.sh            # 4 workers
#   WORKERS=2 bash scripts/appliance.sh -d
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f .env ]; then
  umask 077
  cp .env.example .env
  for key in TPI_JOIN_TOKEN REDIS_PASSWORD TPI_API_KEY; do
    secret=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')   # about 31 characters
    sed -i "s|^$key=.*|$key=$secret|" .env
  done
  echo "wrote .env with fresh secrets (the API key: grep TPI_API_KEY .env)"
fi
exec docker compose up --build --scale "worker=${WORKERS:-4}" "$@"
