#!/usr/bin/env bash
# arm64 emulation on this amd64 machine, to build and run linux/arm64 images (the worker image
# for a Raspberry Pi): Debian's QEMU user-mode emulator registered as the binfmt_misc handler
# of aarch64 ELF binaries. Debian registers it with the F (fix-binary) flag: the kernel opens
# the emulator once, so containers and chroots run arm64 binaries without a copy of QEMU inside.
# Needs root. Idempotent; does nothing on an arm64 machine.
set -euo pipefail
if [ "$(uname -m)" = aarch64 ]; then
  echo "native arm64: no emulation needed"
  exit 0
fi
if [ ! -x /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
  apt-get install -y -q --no-install-recommends qemu-user-static binfmt-support
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64
echo "arm64 emulation: $(head -n 2 /proc/sys/fs/binfmt_misc/qemu-aarch64 | tr '\n' ' ')"
