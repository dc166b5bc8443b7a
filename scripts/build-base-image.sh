#!/usr/bin/env bash
# Build dce-base:bookworm (Debian bookworm + python3) with debootstrap, so no
# container registry is needed. Skipped when the image already carries the
# hash of this script: the script is the image's only input.
set -euo pipefail

TAG=${1:-dce-base:bookworm}
LABEL=dce.base.script-sha256
hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)

if [[ $(docker image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$TAG" 2>/dev/null) == "$hash" ]]; then
  echo "up to date"
  exit 0
fi

# Use the mirror this host already reaches (it may be the only one allowed).
mirror=$(awk '/^(deb|URIs:)/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian\/?$/) { print $i; exit } }' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
security=$(awk '/^(deb|URIs:)/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\/.*\/debian-security\/?$/) { print $i; exit } }' \
  /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
security=${security:-http://deb.debian.org/debian-security}

if ! command -v debootstrap >/dev/null; then
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "debootstrap is missing: as root, apt-get install -y debootstrap" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

root=$(mktemp -d /var/tmp/dce-base.XXXXXX)
trap 'rm -rf "$root" "$root.log"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$root" "$mirror" > "$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; exit 1; }

# Debian's security and point-release updates, now and for every image's later apt installs: a
# package Debian has patched (openssl, python3, redis-server...) is never installed unpatched.
cat > "$root/etc/apt/sources.list" <<SOURCES
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
SOURCES
chroot "$root" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
  > "$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }

# Same trimming as Debian's -slim images, and keep later apt installs trimmed.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,linda}/* \
  "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/*.log "$root"/var/log/apt/*
cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
cat > "$root/etc/apt/apt.conf.d/docker-slim" <<'CFG'
APT::Install-Recommends "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
CFG

tar -C "$root" --numeric-owner -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c "LABEL $LABEL=$hash" \
  -c 'CMD ["bash"]' \
  - "$TAG" >/dev/null
echo "built"
