#!/usr/bin/env bash
# Debian packages the test suite needs on the host (expects a fresh `apt-get update`):
#   docker.io, iptables   the Docker engine (dockerd, containerd, runc) and its NAT rules
#   debootstrap           builds the local debian:bookworm-slim base image (no registry here)
#   redis-server          binary only: tests start their own servers on free ports
#   chromium              headless browser for the Playwright web UI tests
#   iproute2              `tc` for bandwidth shaping tests
# Services must not start on install (dockerd is started by start-docker.sh, redis by the
# tests), so a policy-rc.d that forbids it is put in place for the duration if none exists.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(docker.io iptables debootstrap redis-server chromium fonts-liberation iproute2)

if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
