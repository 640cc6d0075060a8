#!/usr/bin/env bash
# Docker CLI plugins Debian 12 lacks: Compose v2 (`docker compose`; Debian 12 only packages
# Compose v1) and buildx (so `docker build` uses BuildKit, like `docker compose build`, and the
# two share one build cache). Both binaries come from Debian 13 (trixie)'s packages
# docker-compose and docker-buildx: downloaded with apt using a trixie source list in a separate
# apt state directory (the host's apt configuration is left untouched), unpacked with
# dpkg-deb -x, and copied to /usr/local/lib/docker/cli-plugins/.
set -euo pipefail
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
if docker compose version >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
  docker compose version
  docker buildx version
  exit 0
fi

MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
STATE=/var/tmp/tpi-apt-trixie
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$STATE/lists/partial" "$STATE/cache/archives/partial" "$STATE/sources.list.d"
: >"$STATE/status"
cat >"$STATE/sources.list.d/trixie.sources" <<SOURCES
Types: deb
URIs: $MIRROR
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
APT=(apt-get -q
  -o "Dir::State=$STATE" -o "Dir::State::Lists=$STATE/lists" -o "Dir::State::status=$STATE/status"
  -o "Dir::Cache=$STATE/cache" -o "APT::Sandbox::User=root"
  -o "Dir::Etc::SourceList=$STATE/sources.list.d/none.list" -o "Dir::Etc::SourceParts=$STATE/sources.list.d")
"${APT[@]}" update
(cd "$WORK" && "${APT[@]}" download docker-compose docker-buildx)
for plugin in docker-compose docker-buildx; do
  dpkg-deb -x "$WORK/${plugin}"_*.deb "$WORK/root"
  install -D -m 755 "$WORK/root/usr/libexec/docker/cli-plugins/$plugin" "$PLUGIN_DIR/$plugin"
done
docker compose version
docker buildx version
