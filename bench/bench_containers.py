"""How long the images take to build with podman, and how big they are.

* **convert** (always): cold (debootstrap + no layer cache) vs warm (everything cached, the CI
  rerun case) vs re-importing the cached base tarball. Own Debian tag, image prefix and cache
  dir, so it never touches the images of ``make images`` or the test cache; removes its images.
* **CUDA images** (base-cuda, train, ensemble; only with ``BENCH_CUDA_IMAGES=1``: ~2.8 GB of
  wheels, tens of minutes on 2 cores): cold (``--no-cache``, wheelhouse and Debian base present)
  then warm builds under the bench prefix, their sizes, what slimming removed, and the size the
  ensemble image saves by not carrying the training-only packages. Without it, the sizes of the
  ``make images`` CUDA images when they exist.

Needs podman + debootstrap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "bookworm-benchcold-slim"
PREFIX = "cellmap-a3ds-bench"
VERSION = "bench"


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(res.stdout + res.stderr)[-2000:]}")
    return round(time.perf_counter() - t0, 2)


def _timed_targets(cmd: list[str], env: dict[str, str]) -> tuple[float, dict[str, int]]:
    """Wall seconds of ``build.sh`` and its own per-target lines (``== built <image> in N s``)."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {(res.stdout + res.stderr)[-2000:]}")
    per = {}
    for line in res.stdout.splitlines():
        m = re.match(r"== built \S+/([\w-]+):\S+ in (\d+) s", line)
        if m:
            per[m.group(1)] = int(m.group(2))
    return round(time.perf_counter() - t0, 2), per


def _podman(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=600)


def run(work: Path) -> dict:
    """Cold, warm and cached-base timings of ``containers/build.sh base-cpu convert``."""
    for tool in ("podman", "debootstrap", "runc"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not installed (see .ci/run)")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(
        os.environ,
        CONTAINERS_CONF=str(ROOT / "containers" / "podman" / "containers.conf"),
        CONTAINER_CLI="podman",
        CELLMAP_A3DS_CACHE=str(work / "cache"),
        IMAGE_PREFIX=PREFIX,
        VERSION=VERSION,
        PYTHON=sys.executable,
    )
    debian = f"docker.io/library/debian:{TAG}"
    images = [f"{PREFIX}/convert:{VERSION}", f"{PREFIX}/base-cpu:{VERSION}", debian]
    for img in images:
        _podman(["rmi", "--force", img], env)
    make_base = [str(ROOT / "containers" / "make-base.sh"), TAG]
    build = [str(ROOT / "containers" / "build.sh"), "base-cpu", "convert"]
    env["DEBIAN_TAG"] = TAG
    try:
        base_cold = _timed(make_base, env)  # debootstrap + tar + import
        build_cold = _timed(build, dict(env, BUILD_ARGS="--no-cache"))
        build_warm = _timed(build, env)
        _podman(["untag", debian], env)
        base_cached = _timed(make_base, env)  # import of the cached rootfs tarball only
        size = _podman(["image", "inspect", "--format", "{{.Size}}", images[0]], env).stdout.strip()
    finally:
        for img in images:
            _podman(["rmi", "--force", img], env)
        shutil.rmtree(work / "cache", ignore_errors=True)
    cold = base_cold + build_cold
    warm = base_cached + build_warm
    return {
        "convert": {
            "what": "podman build of base-cpu + convert (containers/build.sh), this machine",
            "base_debootstrap_s": base_cold,
            "base_import_from_cache_s": base_cached,
            "build_no_cache_s": build_cold,
            "build_cached_s": build_warm,
            "cold_total_s": round(cold, 2),
            "warm_total_s": round(warm, 2),
            "cold_over_warm": round(cold / warm, 2),
            "convert_image_mb": round(int(size) / 1e6, 1) if size.isdigit() else None,
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "cuda_images": cuda_images(env),
    }


def _size_mb(image: str, env: dict[str, str]) -> float | None:
    out = _podman(["image", "inspect", "--format", "{{.Size}}", image], env).stdout.strip()
    return round(int(out) / 1e6, 1) if out.isdigit() else None


def training_only_mb() -> float:
    """Installed MB of the distributions the train lock has and the ensemble lock has not
    (mlflow, tensorboard and their dependencies), from the wheels in ``.whl/train``."""
    import zipfile

    from containers import wheelhouse

    locks = ROOT / "containers" / "locks"
    extra = set(wheelhouse.read_lock(locks / "train.txt")) - set(wheelhouse.read_lock(locks / "ensemble.txt"))
    total = 0
    for whl in (ROOT / ".whl" / "train").glob("*.whl"):
        if wheelhouse._norm(whl.name.split("-")[0]) in extra:
            total += sum(i.file_size for i in zipfile.ZipFile(whl).infolist())
    return round(total / 1e6, 1)


def _from_steps(target: str) -> int:
    """FROM lines of a target's Dockerfile (podman never reports them as cached)."""
    df = ROOT / ("containers" if target.startswith("base-") else "stages") / target / "Dockerfile"
    return sum(1 for ln in df.read_text().splitlines() if ln.startswith("FROM "))


def logged_builds(log: Path, targets: tuple[str, ...]) -> dict:
    """The last ``make images`` build of each kind per target, from build.sh's log:
    ``warm`` (every step but FROM cached), ``cold`` (no step cached beyond a trivial one per
    stage) or ``partial``: ``{target: {"warm": {"seconds", "steps", "cached_steps", "date"}}}``."""
    out: dict = {}
    if not log.is_file():
        return out
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        target = rec["image"].split("/")[-1].split(":")[0]
        if target not in targets or not rec["steps"]:
            continue
        froms = _from_steps(target)
        kind = (
            "warm"
            if rec["cached_steps"] >= rec["steps"] - froms
            else "cold"
            if rec["cached_steps"] <= froms
            else "partial"
        )
        out.setdefault(target, {})[kind] = {k: rec[k] for k in ("seconds", "steps", "cached_steps", "date")}
    return out


def cuda_images(env: dict[str, str]) -> dict:
    """Cold and warm builds of base-cuda + train + ensemble (opt-in), else the existing sizes."""
    env = {k: v for k, v in env.items() if k not in ("DEBIAN_TAG", "IMAGE_PREFIX", "VERSION", "CELLMAP_A3DS_CACHE")}
    version = [
        ln.split('"')[1] for ln in (ROOT / "pyproject.toml").read_text().splitlines() if ln.startswith("version = ")
    ][0]
    targets = ("base-cuda", "train", "ensemble")
    out: dict = {"training_only_packages_mb": training_only_mb() if (ROOT / ".whl" / "train").is_dir() else None}
    if os.environ.get("BENCH_CUDA_IMAGES") != "1":
        out["sizes_mb"] = {t: _size_mb(f"cellmap-a3ds/{t}:{version}", env) for t in targets}
        out["builds_logged"] = logged_builds(ROOT / "images" / "build-times.jsonl", targets)
        out["skipped"] = "set BENCH_CUDA_IMAGES=1 to time cold and warm builds (~2.8 GB wheels, tens of minutes)"
        return out
    env = dict(
        env,
        IMAGE_PREFIX=PREFIX,
        VERSION=VERSION,
        ALGO_TEMPLATES_SHA256=os.environ.get("ALGO_TEMPLATES_SHA256", "unverified"),
    )
    build = [str(ROOT / "containers" / "build.sh"), *targets]
    images = [f"{PREFIX}/{t}:{VERSION}" for t in targets]
    try:
        for img in images:
            _podman(["rmi", "--force", img], env)
        cold, cold_per = _timed_targets(build, dict(env, BUILD_ARGS="--no-cache"))
        warm, warm_per = _timed_targets(build, env)
        sizes = {t: _size_mb(img, env) for t, img in zip(targets, images)}
    finally:
        for img in images:
            _podman(["rmi", "--force", img], env)
    out.update(
        what="podman build of base-cuda + train + ensemble (containers/build.sh), wheelhouse present",
        cold_no_cache_s=cold,
        warm_cached_s=warm,
        cold_per_image_s=cold_per,
        warm_per_image_s=warm_per,
        cold_over_warm=round(cold / warm, 2),
        sizes_mb=sizes,
        load_avg_1m=round(os.getloadavg()[0], 2),
    )
    return out
