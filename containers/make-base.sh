#!/usr/bin/env bash
# Make a Debian bookworm base image locally (no registry pulls): debootstrap a minbase rootfs,
# `podman import` it and tag it as the Debian tag our Dockerfiles name in `FROM`, so unchanged
# `FROM debian:<tag>` lines resolve to it. The rootfs tarball is cached outside the repo, so
# reruns only re-import (seconds).
#
# usage: containers/make-base.sh [TAG]      (default: the DEBIAN_TAG default in base-cpu/Dockerfile)
# env:   CELLMAP_A3DS_CACHE  cache dir      (default: ${XDG_CACHE_HOME:-$HOME/.cache}/cellmap-auto3dseg)
#        DEBIAN_MIRROR       apt mirror     (default: http://deb.debian.org/debian)
#        CONTAINER_CLI       podman|docker  (default: podman)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tag="${1:-$(sed -n 's/^ARG DEBIAN_TAG=//p' "$here/base-cpu/Dockerfile" | head -n 1)}"
cache="${CELLMAP_A3DS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cellmap-auto3dseg}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
cli="${CONTAINER_CLI:-podman}"
image="docker.io/library/debian:${tag}"
tarball="$cache/debian-bookworm-minbase.tar"

if [[ -z "$tag" ]]; then
  echo "make-base.sh: cannot read ARG DEBIAN_TAG from $here/base-cpu/Dockerfile" >&2
  exit 2
fi

if "$cli" image exists "$image" 2>/dev/null; then
  echo "make-base.sh: $image already present"
  exit 0
fi

mkdir -p "$cache"
if [[ ! -s "$tarball" ]]; then
  command -v debootstrap >/dev/null || { echo "make-base.sh: debootstrap not installed" >&2; exit 2; }
  work="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "make-base.sh: debootstrap --variant=minbase bookworm from $mirror"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
  }
  # Same trimming as the official slim images: no apt lists, caches, docs or man pages.
  rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin \
    "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/usr/share/doc/"* \
    "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/locale/"*
  tar --numeric-owner -C "$work/rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"  # atomic: a crash never leaves a half tarball under the final name
fi

"$cli" import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$image" >/dev/null
echo "make-base.sh: imported $tarball as $image"
