#!/usr/bin/env bash
# Starts dockerd in the background unless a daemon already answers, and waits until it does.
# Log: /var/log/tpi-dockerd.log. Storage driver: overlay2 (works on this ext4 root), override
# with DOCKER_STORAGE_DRIVER.
set -euo pipefail
if docker info >/dev/null 2>&1; then
  echo "dockerd already running"
else
  LOG=/var/log/tpi-dockerd.log
  setsid nohup dockerd --storage-driver="${DOCKER_STORAGE_DRIVER:-overlay2}" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "dockerd did not come up; last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
fi
docker version --format 'docker client {{.Client.Version}}, server {{.Server.Version}}'
docker info --format 'storage driver {{.Driver}}, cgroup driver {{.CgroupDriver}} v{{.CgroupVersion}}'
