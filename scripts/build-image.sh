#!/usr/bin/env bash
# Builds the one tpi image (master, worker and web UI differ only by command) as tpi:latest
# from Dockerfile.worker, with build/wheelhouse/ (scripts/wheelhouse.sh) in the build context.
# Usage: bash scripts/build-image.sh [extra docker build args...]   (IMAGE=tpi:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-tpi:latest}
mkdir -p build/wheelhouse
docker build -f Dockerfile.worker -t "$IMAGE" "$@" .
docker image ls "$IMAGE"
