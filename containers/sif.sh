#!/usr/bin/env bash
# Turn stage images into Apptainer SIFs, images/<stage>.sif, with `apptainer build`:
#   - from the local docker daemon:  docker-daemon:<image>:<tag>   (CONTAINER_CLI=docker)
#   - else from a saved archive:     docker-archive:images/<stage>.tar
#     (written here with `podman save` when missing, or copied from a machine that has docker:
#      `make save` there, then `make sif` on the cluster, where only apptainer is needed).
#
# usage: containers/sif.sh [STAGE...]      (default: every image of `python -m common.pipeline images`)
# env:   APPTAINER      apptainer binary (default: apptainer; tests put a stand-in here)
#        CONTAINER_CLI  docker|podman|none (default: docker if its daemon answers, else podman
#                       if installed, else none = archives only)
#        IMAGE_PREFIX, VERSION as in build.sh; IMAGES_DIR (default: images)
# Set APPTAINER_CACHEDIR and APPTAINER_TMPDIR to scratch on the cluster: SIF builds need GBs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
apptainer="${APPTAINER:-apptainer}"
prefix="${IMAGE_PREFIX:-cellmap-a3ds}"
version="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}"
out="${IMAGES_DIR:-images}"
cli="${CONTAINER_CLI:-}"
if [[ -z "$cli" ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then cli=docker
  elif command -v podman >/dev/null 2>&1; then cli=podman
  else cli=none; fi
fi
command -v "$apptainer" >/dev/null 2>&1 || {
  echo "sif.sh: $apptainer not found (build SIFs on the cluster: make save here, make sif there)" >&2
  exit 2
}
mkdir -p "$out"

stages=("$@")
# default: every stage image of the pipeline definition (common/pipeline.py; stdlib only)
[[ ${#stages[@]} -gt 0 ]] || mapfile -t stages < <("${PYTHON:-python3}" -m common.pipeline images)
[[ ${#stages[@]} -gt 0 ]] || { echo "$(basename "$0"): cannot list the images (python3 -m common.pipeline images)" >&2; exit 2; }
for stage in "${stages[@]}"; do
  image="$prefix/$stage:$version"
  archive="$out/$stage.tar"
  if [[ "$cli" == docker ]]; then
    source="docker-daemon:$image"
  else
    if [[ ! -s "$archive" ]]; then
      [[ "$cli" == podman ]] || { echo "sif.sh: no $archive and no docker/podman to write it" >&2; exit 2; }
      CONTAINER_CLI=podman "$root/containers/save.sh" "$stage"
    fi
    source="docker-archive:$archive"
  fi
  echo "== $apptainer build $out/$stage.sif $source"
  # Build next to the target and rename: a failed build never leaves a partial <stage>.sif.
  rm -f "$out/$stage.sif.tmp"
  "$apptainer" build --force "$out/$stage.sif.tmp" "$source"
  mv -f "$out/$stage.sif.tmp" "$out/$stage.sif"
  ls -l "$out/$stage.sif"
done
