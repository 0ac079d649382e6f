"""How long the convert image takes to build with podman: cold (debootstrap + no layer cache) vs
warm (everything cached, the CI rerun case) vs re-importing the cached base tarball.

Uses its own Debian tag, image prefix and cache dir, so it never touches the images of
``make images`` or the test cache; removes its images afterwards. Needs podman + debootstrap.
"""

from __future__ import annotations

import os
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
    env = dict(os.environ, CONTAINERS_CONF=str(ROOT / "containers" / "podman" / "containers.conf"),
               CONTAINER_CLI="podman", CELLMAP_A3DS_CACHE=str(work / "cache"), IMAGE_PREFIX=PREFIX,
               VERSION=VERSION, PYTHON=sys.executable)
    debian = f"docker.io/library/debian:{TAG}"
    images = [f"{PREFIX}/convert:{VERSION}", f"{PREFIX}/base-cpu:{VERSION}", debian]
    for img in images:
        _podman(["rmi", "--force", img], env)
    make_base = [str(ROOT / "containers" / "make-base.sh"), TAG]
    build = [str(ROOT / "containers" / "build.sh"), "base-cpu", "convert"]
    tag_arg = f"--build-arg DEBIAN_TAG={TAG}"
    try:
        base_cold = _timed(make_base, env)  # debootstrap + tar + import
        build_cold = _timed(build, dict(env, BUILD_ARGS=f"--no-cache {tag_arg}"))
        build_warm = _timed(build, dict(env, BUILD_ARGS=tag_arg))
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
    }
