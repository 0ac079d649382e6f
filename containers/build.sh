#!/usr/bin/env bash
# Build the pipeline images with docker or podman (whichever works), offline:
#   base-cpu, base-cuda           containers/<base>/Dockerfile
#   convert analyze bundlegen     stages/<stage>/Dockerfile, FROM base-cpu
#   train ensemble                stages/<stage>/Dockerfile, FROM base-cuda
# Python wheels come from the host wheelhouse .whl/<stage>/ (containers/wheelhouse.py, pinned by
# containers/locks/<stage>.txt); the MONAI algorithm templates from .whl/templates/ when a local
# copy is given (ALGO_TEMPLATES_TARBALL), else the build downloads the pinned release.
#
# usage: containers/build.sh [TARGET...]      (default: all; bases are built when missing)
# env:   CONTAINER_CLI   docker|podman (default: docker if its daemon answers, else podman)
#        IMAGE_PREFIX    image names   (default: cellmap-a3ds)  -> cellmap-a3ds/<target>:<version>
#        VERSION         image tag     (default: the version in pyproject.toml)
#        PYTHON          Python 3.11 with pip, runs the wheelhouse (default: .venv/bin/python)
#        ALGO_TEMPLATES_TARBALL  local copy of <hash>.tar.gz for offline bundlegen/train builds
#        ALGO_TEMPLATES_SHA256   REQUIRED for bundlegen/train: sha256 of that archive (or `unverified`)
#        TORCH_FLAVOUR   train/ensemble torch: cu130 (default, PyPI's CUDA 13.0 wheel, driver >= 580)
#                        or cu126 (UNTESTED: CUDA 12.6 from download.pytorch.org, driver >= 525)
#        SLIM            1 (default): drop triton, test suites, headers from the GPU images; 0 keeps them
#        BUILD_ARGS      extra arguments for `build` (e.g. "--no-cache")
#        DEBIAN_TAG      Debian base tag (default: ARG DEBIAN_TAG of the base Dockerfile)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

pick_cli() {
  if [[ -n "${CONTAINER_CLI:-}" ]]; then echo "$CONTAINER_CLI"; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v podman >/dev/null 2>&1; then echo podman; return; fi
  echo "build.sh: neither a working docker nor podman found" >&2
  exit 2
}
cli="$(pick_cli)"
prefix="${IMAGE_PREFIX:-cellmap-a3ds}"
version="${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)}"
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
vcs_ref="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git --no-optional-locks -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  vcs_ref="${vcs_ref}-dirty"
fi
# The commit date, not "now" (SOURCE_DATE_EPOCH wins): rebuilding the same tree gives the same
# labels, so the layer cache and the image ids stay put.
epoch="${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}"
build_date="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || date -u -r "$epoch" +%Y-%m-%dT%H:%M:%SZ)"
algo_hash="21ed8e5"

cli_args=()
if [[ "$cli" == podman ]]; then
  # Dev/CI machines: crun fails on hybrid cgroups and default ulimits exceed the hard limits.
  # (only where runc exists: elsewhere, e.g. a laptop, podman's own defaults work)
  if [[ -z "${CONTAINERS_CONF:-}" ]] && command -v runc >/dev/null 2>&1; then
    export CONTAINERS_CONF="$root/containers/podman/containers.conf"
  fi
  cli_args=(--isolation chroot)
fi
read -r -a extra <<<"${BUILD_ARGS:-}"
images_dir="${IMAGES_DIR:-$root/images}"

image_exists() { "$cli" image inspect "$1" >/dev/null 2>&1; }

# A build context per target holding only what its Dockerfile copies (hard links, so it is
# instant): the docker CLI sends the whole context to the daemon, and .whl/ holds GBs of wheels
# for the other stages. Paths inside it are the repository's, so the Dockerfiles read as if the
# context were the repository root.
make_context() {  # make_context <target> <path>...; prints the context dir
  local ctx="$root/build/context/$1" p
  shift
  rm -rf "$ctx"
  mkdir -p "$ctx"
  for p in "$@"; do
    mkdir -p "$ctx/$(dirname "$p")"
    cp -al "$p" "$ctx/$p" 2>/dev/null || cp -R "$p" "$ctx/$p"
  done
  find "$ctx" -name __pycache__ -type d -prune -exec rm -rf {} +
  echo "$ctx"
}

# The repository paths a Dockerfile COPYs from the context (every stage of it, not --from), less
# the lock and wheelhouse, which build_stage places under the names the Dockerfile expects.
dockerfile_sources() {  # dockerfile_sources <Dockerfile>
  awk '$1 == "COPY" && $2 !~ /^--from/ {
         for (i = 2; i < NF; i++) {
           s = $i; sub(/\/$/, "", s)
           if (s ~ /^--/ || s ~ /^containers\/locks\// || (s ~ /^\.whl\// && s != ".whl/templates")) continue
           print s
         }
       }' "$1" | sort -u
}

build() {  # build <target> <dockerfile> <context> [--build-arg ...]
  local target="$1" dockerfile="$2" ctx="$3"
  shift 3
  local t0=$SECONDS out steps cached secs
  echo "== build $prefix/$target:$version ($cli, $dockerfile)"
  out="$(mktemp)"
  "$cli" build ${cli_args[@]+"${cli_args[@]}"} ${extra[@]+"${extra[@]}"} \
    --build-arg "VERSION=$version" --build-arg "VCS_REF=$vcs_ref" --build-arg "BUILD_DATE=$build_date" \
    "$@" -f "$ctx/$dockerfile" -t "$prefix/$target:$version" "$ctx" 2>&1 | tee "$out"
  secs=$((SECONDS - t0))
  # One JSON line per build (read by bench/bench_containers.py): how long, and how many steps
  # came from the layer cache (all = a warm rebuild, none but FROM = a cold one).
  steps="$(grep -c 'STEP [0-9]*/[0-9]*:' "$out" || true)"
  cached="$(grep -c 'Using cache' "$out" || true)"
  mkdir -p "$images_dir"
  printf '{"image": "%s", "seconds": %d, "steps": %d, "cached_steps": %d, "build_args": "%s", "date": "%s"}\n' \
    "$prefix/$target:$version" "$secs" "$steps" "$cached" "${BUILD_ARGS:-}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    >>"$images_dir/build-times.jsonl"
  rm -f "$out"
  echo "== built $prefix/$target:$version in $secs s ($cached of $steps steps cached)"
}

build_base() {  # build_base <base-cpu|base-cuda>
  local df="containers/$1/Dockerfile" tag digest debian base_args=()
  tag="${DEBIAN_TAG:-$(sed -n 's/^ARG DEBIAN_TAG=//p' "$df" | head -n 1)}"
  digest="$(sed -n 's/^ARG DEBIAN_DIGEST=//p' "$df" | head -n 1)"
  debian="docker.io/library/debian:$tag"
  if "$cli" pull -q "$debian@$digest" >/dev/null 2>&1; then
    # Registry reachable: FROM the tag pinned by its digest (the Dockerfile's default DEBIAN_REF).
    base_args=(--build-arg "BASE_DIGEST=$digest")
  else
    # No registry (dev/CI): debootstrap the Debian base locally; it cannot have the registry's
    # digest, so it is pinned by its local image id, recorded in the base.digest label.
    if [[ "$cli" == podman ]] && ! image_exists "$debian"; then
      CONTAINER_CLI=podman "$root/containers/make-base.sh" "$tag"
    fi
    base_args=(--build-arg "DEBIAN_TAG=$tag" --build-arg "DEBIAN_REF=$debian"
               --build-arg "BASE_DIGEST=$("$cli" image inspect --format '{{.Id}}' "$debian" 2>/dev/null || echo unknown)")
    echo "== $1: FROM $debian (local, no registry digest)"
  fi
  build "$1" "$df" "$(make_context "$1" "$df")" "${base_args[@]}"
}

ensure_base() {
  image_exists "$prefix/$1:$version" || build_base "$1"
}

prepare_templates() {
  mkdir -p .whl/templates
  if [[ -n "${ALGO_TEMPLATES_TARBALL:-}" ]]; then
    cp -f "$ALGO_TEMPLATES_TARBALL" ".whl/templates/$algo_hash.tar.gz"
  fi
  # COPY needs the folder to hold something even when the build downloads the templates.
  echo "Put $algo_hash.tar.gz here for an offline build (ALGO_TEMPLATES_TARBALL does it)." \
    >.whl/templates/README
}

build_stage() {
  local stage="$1" base ctx name flavour="" stage_args=()
  # the base (cpu or cuda) comes from the pipeline definition (common/pipeline.py)
  base="$("$python" -m common.pipeline base "$stage")" || { echo "build.sh: unknown target $stage" >&2; exit 2; }
  [[ "$base" == base-cuda ]] && flavour="${TORCH_FLAVOUR:-cu130}"
  if [[ "$stage" == bundlegen || "$stage" == train ]]; then
    if [[ -z "${ALGO_TEMPLATES_SHA256:-}" ]]; then
      echo "build.sh: $stage bakes the official templates: set ALGO_TEMPLATES_SHA256 to the sha256 of $algo_hash.tar.gz (check it once with sha256sum), or to 'unverified'" >&2
      exit 2
    fi
    stage_args+=(--build-arg "ALGO_TEMPLATES_SHA256=$ALGO_TEMPLATES_SHA256")
  fi
  name="$stage"
  if [[ -n "$flavour" ]]; then
    stage_args+=(--build-arg "TORCH_FLAVOUR=$flavour" --build-arg "SLIM=${SLIM:-1}")
    [[ "$flavour" == cu130 ]] || name="$stage-$flavour"  # e.g. locks/train-cu126.txt, .whl/train-cu126/
  fi
  ensure_base "$base"
  TORCH_FLAVOUR="$flavour" "$python" -m containers.wheelhouse "$stage"
  prepare_templates
  local sources
  mapfile -t sources < <(dockerfile_sources "stages/$stage/Dockerfile")
  ctx="$(make_context "$stage" "${sources[@]}")"
  # The lock and wheelhouse of the flavour, under the names the Dockerfile copies.
  mkdir -p "$ctx/containers/locks" "$ctx/.whl"
  cp -l "containers/locks/$name.txt" "$ctx/containers/locks/$stage.txt" 2>/dev/null \
    || cp "containers/locks/$name.txt" "$ctx/containers/locks/$stage.txt"
  cp -al ".whl/$name" "$ctx/.whl/$stage" 2>/dev/null || cp -R ".whl/$name" "$ctx/.whl/$stage"
  build "$stage" "stages/$stage/Dockerfile" "$ctx" --build-arg "BASE_IMAGE=$prefix/$base:$version" \
    ${stage_args[@]+"${stage_args[@]}"}
}

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then  # both bases, then every stage image of the pipeline definition
  mapfile -t targets < <("$python" -m common.pipeline images)
  [[ ${#targets[@]} -gt 0 ]] || { echo "build.sh: cannot list the images (python -m common.pipeline images)" >&2; exit 2; }
  targets=(base-cpu base-cuda "${targets[@]}")
fi
for t in "${targets[@]}"; do
  case "$t" in
    base-cpu | base-cuda) build_base "$t" ;;
    *) build_stage "$t" ;;
  esac
done

echo "== image sizes"
"$python" -m containers.sizes --cli "$cli" --prefix "$prefix" --version "$version" \
  --out "$images_dir" "${targets[@]}"
