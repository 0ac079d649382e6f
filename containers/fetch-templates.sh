#!/usr/bin/env bash
# Image-build helper: put the official MONAI Auto3DSeg algorithm templates (research-contributions
# `auto3dseg/algorithm_templates` at a pinned hash) into <dest>/<hash>, whose sub-folders are the
# algorithms (segresnet, segresnet2d, dints, swinunetr). Uses <local_dir>/<hash>.tar.gz when the
# build context carries one (offline builds), else downloads <url>. Nothing is fetched at run time.
#
# The archive's sha256 is REQUIRED (a release asset can be replaced; the image would silently bake
# other code): pass it as SHA256, or the word `unverified` to accept any archive (printed loudly).
#
# usage: fetch-templates.sh HASH URL LOCAL_DIR DEST SHA256|unverified
set -euo pipefail

hash="$1" url="$2" local_dir="$3" dest="$4" sha="${5:-}"
tarball="$local_dir/$hash.tar.gz"
if [[ -z "$sha" ]]; then
  echo "fetch-templates: no sha256 for $hash.tar.gz: pass ALGO_TEMPLATES_SHA256=<sha256 of the archive> (check it once with sha256sum), or ALGO_TEMPLATES_SHA256=unverified to accept any archive" >&2
  exit 2
fi
if [[ "$sha" != unverified && ! "$sha" =~ ^[0-9a-f]{64}$ ]]; then
  echo "fetch-templates: ALGO_TEMPLATES_SHA256 must be 64 hex digits or 'unverified', got '$sha'" >&2
  exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ ! -s "$tarball" ]]; then
  echo "fetch-templates: downloading $url"
  tarball="$work/$hash.tar.gz"
  python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
    "$url" "$tarball"
fi
if [[ "$sha" == unverified ]]; then
  echo "fetch-templates: WARNING: archive NOT verified; its sha256 is $(sha256sum "$tarball" | cut -d' ' -f1)" >&2
else
  echo "$sha  $tarball" | sha256sum --check --strict
fi

mkdir -p "$work/x"
tar -xzf "$tarball" -C "$work/x" --no-same-owner
src="$work/x"
# The release archive holds algorithm_templates/<algo>/ (MONAI extracts it the same way).
[[ -d "$src/algorithm_templates" ]] && src="$src/algorithm_templates"
found=0
for algo in "$src"/*/; do
  [[ -f "$algo/scripts/algo.py" ]] && found=$((found + 1))
done
if [[ "$found" -eq 0 ]]; then
  echo "fetch-templates: no <algo>/scripts/algo.py in $tarball" >&2
  exit 1
fi
mkdir -p "$dest"
rm -rf "${dest:?}/$hash"
cp -r "$src" "$dest/$hash"
chmod -R a+rX,go-w "$dest/$hash"
echo "fetch-templates: $found algorithms in $dest/$hash"
