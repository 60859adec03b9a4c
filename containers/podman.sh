#!/usr/bin/env bash
# Podman as the Docker engine, for machines without a Docker daemon (CI, sandboxes, rootless hosts).
#
#   containers/podman.sh install   apt-get install podman and what it needs (Debian/Ubuntu, as root)
#   containers/podman.sh start     serve the Docker API on /var/run/docker.sock (docker, docker-compose and
#                                  the SageMaker SDK's local mode then work unchanged)
#   containers/podman.sh stop      stop that service
#
# Where crun's rlimits and cgroups are refused (containers inside containers), runc with cgroupfs works.
set -euo pipefail
SOCK=${DOCKER_SOCK:-/var/run/docker.sock}
PIDFILE=${PODMAN_PIDFILE:-/run/imgclf-podman-service.pid}

case "${1:-}" in
  install)
    missing=()
    for cmd in podman runc debootstrap docker-compose; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
    if [ ${#missing[@]} -gt 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap docker-compose >/dev/null
    fi
    mkdir -p /etc/containers
    if ! grep -qs imgclf /etc/containers/containers.conf; then
      cat >> /etc/containers/containers.conf <<'CONF'
# imgclf: runc + cgroupfs and fixed ulimits work where crun's cgroups and rlimits are refused
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
    fi
    # docker-compose and the docker CLI find the socket here.
    [ -f /etc/containers/registries.conf.d/imgclf.conf ] || {
      mkdir -p /etc/containers/registries.conf.d
      printf 'unqualified-search-registries = ["docker.io"]\n' > /etc/containers/registries.conf.d/imgclf.conf; }
    ;;
  start)
    if docker info >/dev/null 2>&1; then echo "a Docker API already answers on $SOCK"; exit 0; fi
    rm -f "$SOCK"
    nohup podman system service --time=0 "unix://$SOCK" >/tmp/imgclf-podman-service.log 2>&1 &
    echo $! > "$PIDFILE"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && { echo "podman serves the Docker API on $SOCK"; exit 0; }; sleep 0.5; done
    echo "error: podman system service did not answer on $SOCK; see /tmp/imgclf-podman-service.log" >&2; exit 1
    ;;
  stop)
    if [ -f "$PIDFILE" ]; then kill "$(cat "$PIDFILE")" 2>/dev/null || true; rm -f "$PIDFILE" "$SOCK"; fi
    ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
