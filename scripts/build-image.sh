#!/usr/bin/env bash
# Builds the one tpi image (master, worker and web UI differ only by command) as tpi:latest
# from Dockerfile.worker, with build/wheelhouse/ (scripts/wheelhouse.sh) in the build context.
# Usage: bash scripts/build-image.sh [extra docker build args...]   (IMAGE=tpi:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-tpi:latest}
if ! ls build/wheelhouse/torch-*.whl >/dev/null 2>&1; then
  bash scripts/wheelhouse.sh   # a fresh checkout: torch's CPU wheel from local disk, not the network
fi
docker build -f Dockerfile.worker -t "$IMAGE" "$@" .
docker image ls "$IMAGE"
