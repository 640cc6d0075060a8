#!/usr/bin/env bash
# Makes the local base image debian:bookworm-slim (nothing can be pulled on this machine)
# with debootstrap from the host's Debian mirror, unless the image exists already.
# Users elsewhere pull the real image; the Dockerfiles are the same for both.
#
# BASE_ARCH=arm64 makes the base of the arm64 image instead, as debian-arm64:bookworm-slim
# (one tag holds one architecture here), with debootstrap --arch=arm64: its second stage runs
# arm64 binaries, so it needs the emulation of .ci/enable-arm64-emulation.sh.
#
# Differences from the official image, on purpose:
#  - the host's CA bundle is baked in (/usr/local/share/tpi-host-ca/ca-certificates.crt) and
#    /etc/pip.conf points pip at it: pip inside containers only works here when it trusts it;
#  - apt uses the host's sources (bookworm, bookworm-updates, bookworm-security).
set -euo pipefail
HOST_ARCH=$(dpkg --print-architecture)
ARCH=${BASE_ARCH:-$HOST_ARCH}
if [ "$ARCH" = "$HOST_ARCH" ]; then
  IMAGE=${BASE_IMAGE:-debian:bookworm-slim}
else
  IMAGE=${BASE_IMAGE:-debian-$ARCH:bookworm-slim}
fi
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE already present"
  exit 0
fi

MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /var/tmp/tpi-rootfs.XXXXXX)
cleanup() {
  # Never delete through a mount that debootstrap may have left behind (/proc, /dev, ...).
  awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
  rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

debootstrap --variant=minbase --arch="$ARCH" bookworm "$ROOTFS" "$MIRROR"

# Slim like the official image: no docs, man pages or translations, now or from later
# installs, and apt deletes the .debs it downloads (so `apt-get install` leaves no cache).
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/{man,groff,info,locale,lintian,linda}/*
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
printf 'Acquire::Languages "none";\n' >"$ROOTFS/etc/apt/apt.conf.d/docker-no-languages"
printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$ROOTFS/etc/apt/apt.conf.d/docker-autoremove-suggests"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  cp /etc/apt/sources.list.d/debian.sources "$ROOTFS/etc/apt/sources.list.d/debian.sources"
  rm -f "$ROOTFS/etc/apt/sources.list"
fi

install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$ROOTFS/usr/local/share/tpi-host-ca/ca-certificates.crt"
printf '[global]\ncert = /usr/local/share/tpi-host-ca/ca-certificates.crt\n' >"$ROOTFS/etc/pip.conf"

chroot "$ROOTFS" apt-get clean
awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l
rm -rf --one-file-system "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log "$ROOTFS"/dev/*

if [ "$ARCH" = "$HOST_ARCH" ]; then
  tar --numeric-owner -C "$ROOTFS" -c . | docker import -c 'CMD ["bash"]' - "$IMAGE"
else
  # `docker import --platform` is ignored by this Docker (20.10, not experimental): the image
  # would say amd64. A FROM scratch build for the platform records it; ADD of a local tar
  # unpacks it with its owners and modes.
  CONTEXT=$(mktemp -d /var/tmp/tpi-base-context.XXXXXX)
  tar --numeric-owner -C "$ROOTFS" -cf "$CONTEXT/rootfs.tar" .
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["bash"]\n' >"$CONTEXT/Dockerfile"
  docker build --platform "linux/$ARCH" -t "$IMAGE" "$CONTEXT"
  rm -rf "$CONTEXT"
fi
docker image ls "$IMAGE"
