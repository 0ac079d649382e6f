#!/usr/bin/env bash
# Save stage images as docker archives, images/<stage>.tar, for `apptainer build
# <stage>.sif docker-archive:images/<stage>.tar` on a cluster without docker or podman.
#
# usage: containers/save.sh [STAGE...]     (default: every image of `python -m common.pipeline images`)
# env:   CONTAINER_CLI, IMAGE_PREFIX, VERSION, IMAGES_DIR as in build.sh / sif.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
prefix="${IMAGE_PREFIX:-cellmap-a3ds}"
version="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}"
out="${IMAGES_DIR:-images}"
cli="${CONTAINER_CLI:-}"
if [[ -z "$cli" ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then cli=docker; else cli=podman; fi
fi
fmt=()
if [[ "$cli" == podman ]]; then
  fmt=(--format docker-archive)
fi
mkdir -p "$out"

stages=("$@")
# default: every stage image of the pipeline definition (common/pipeline.py; stdlib only)
[[ ${#stages[@]} -gt 0 ]] || mapfile -t stages < <("${PYTHON:-python3}" -m common.pipeline images)
[[ ${#stages[@]} -gt 0 ]] || { echo "$(basename "$0"): cannot list the images (python3 -m common.pipeline images)" >&2; exit 2; }
for stage in "${stages[@]}"; do
  image="$prefix/$stage:$version"
  rm -f "$out/$stage.tar.tmp"
  "$cli" save ${fmt[@]+"${fmt[@]}"} -o "$out/$stage.tar.tmp" "$image"
  mv -f "$out/$stage.tar.tmp" "$out/$stage.tar"
  ls -l "$out/$stage.tar"
done
