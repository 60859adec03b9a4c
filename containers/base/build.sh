#!/usr/bin/env bash
# Build the Python base image from Debian's packages with debootstrap: no Docker Hub needed.
#
#   containers/base/build.sh [IMAGE]       (make base-image; default IMAGE localhost/imgclf-python:3.11-bookworm)
#
# DOCKER (docker or podman), DEBIAN_MIRROR (an apt mirror, http) and EXTRA_CA (a PEM bundle to trust, default
# the build machine's /etc/ssl/certs/ca-certificates.crt) can be set. Needs root for debootstrap.
set -euo pipefail
IMAGE=${1:-localhost/imgclf-python:3.11-bookworm}
DOCKER=${DOCKER:-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
EXTRA_CA=${EXTRA_CA:-/etc/ssl/certs/ca-certificates.crt}
here=$(cd "$(dirname "$0")" && pwd)
command -v debootstrap >/dev/null || { echo "error: debootstrap not found: apt-get install debootstrap" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root: run as root or with sudo" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --arch=amd64 bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; echo "error: debootstrap from $MIRROR failed" >&2; exit 1; }
mirror_host=${MIRROR%/debian}
printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
  "$MIRROR" "$MIRROR" "$mirror_host/debian" > "$work/rootfs/etc/apt/sources.list"
tar -C "$work/rootfs" -c . | $DOCKER import - localhost/imgclf-debian:bookworm >/dev/null
mkdir "$work/context"
cp "$here/Dockerfile" "$work/context/"
if [ -f "$EXTRA_CA" ]; then cp "$EXTRA_CA" "$work/context/extra-ca.crt"; else : > "$work/context/extra-ca.crt"; fi
$DOCKER build --platform linux/amd64 -t "$IMAGE" "$work/context"
echo "base image $IMAGE ready: make build PYTHON_IMAGE=$IMAGE"
