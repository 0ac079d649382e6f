"""Fill the host wheelhouse ``.whl/<target>/`` that an image build installs from, offline.

``pip`` inside ``podman build`` cannot verify TLS on the dev/CI machines (intercepting proxy), and
cluster login nodes may have no PyPI at all, so the images never download anything: the host
runs ``pip wheel`` into the build context and the Dockerfile installs with
``pip install --no-index --find-links``.

The lock ``containers/locks/<target>.txt`` pins every distribution (transitive ones included)
that the image installs. When it exists it is the only input (reproducible builds); ``--relock``
resolves again from the ``pyproject.toml`` dependency group of the stage plus ``constraints.txt``
and rewrites it.

Usage::

    python -m containers.wheelhouse convert            # .whl/convert/ from containers/locks/convert.txt
    python -m containers.wheelhouse train --relock     # resolve again (CUDA torch), rewrite the lock
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "containers" / "locks"
WHEEL_ROOT = ROOT / ".whl"

#: Which torch build each stage image gets ("" = the stage needs no torch).
TORCH_FLAVOUR = {"convert": "", "analyze": "cpu", "bundlegen": "cpu", "train": "cu126", "ensemble": "cu126"}
#: PyTorch wheel indexes by flavour; ``TORCH_INDEX_URL`` overrides (empty = use the pip config only,
#: e.g. a machine whose pip config already points at a local torch wheel).
TORCH_INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "cu126": "https://download.pytorch.org/whl/cu126",
}
STAGES = tuple(TORCH_FLAVOUR)
#: Debian bookworm's python3, which every image runs.
IMAGE_PYTHON = (3, 11)


def stage_requirements(stage: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The core dependencies plus the ``[project.optional-dependencies]`` group of ``stage``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = project.get("optional-dependencies", {})
    if stage not in groups:
        raise SystemExit(f"wheelhouse: pyproject.toml has no dependency group {stage!r}")
    return list(project["dependencies"]) + list(groups[stage])


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def missing_wheels(lock: Path, wheel_dir: Path) -> list[str]:
    """The ``name==version`` pins of ``lock`` that have no wheel in ``wheel_dir``."""
    have = set()
    for whl in wheel_dir.glob("*.whl"):
        name, version = whl.name.split("-")[:2]
        have.add(f"{_norm(name)}=={version}")
    pins = [ln.strip() for ln in lock.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [p for p in pins if f"{_norm(p.split('==')[0])}=={p.split('==')[1]}" not in have]


def _pip_wheel(args: list[str], dest: Path, torch_index: str) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest)]
    if torch_index:
        cmd += ["--extra-index-url", torch_index]
    # Wheels already in the wheelhouse are reused, so a rebuild needs no network.
    cmd += ["--find-links", str(dest)] + args
    subprocess.run(cmd, check=True)


def build(stage: str, relock: bool = False) -> Path:
    """Fill ``.whl/<stage>/`` (and write the lock if missing or ``relock``); returns the folder."""
    flavour = TORCH_FLAVOUR[stage]
    torch_index = os.environ.get("TORCH_INDEX_URL", TORCH_INDEX.get(flavour, "")) if flavour else ""
    dest = WHEEL_ROOT / stage
    dest.mkdir(parents=True, exist_ok=True)
    lock = LOCK_DIR / f"{stage}.txt"
    if lock.exists() and not relock:
        if not missing_wheels(lock, dest):
            return dest  # complete: no pip, no network (pip would still query every index)
        _pip_wheel(["--no-deps", "-r", str(lock)], dest, torch_index)
        if missing := missing_wheels(lock, dest):
            raise SystemExit(f"wheelhouse: no wheel for {', '.join(missing)} in {dest}")
        return dest
    with tempfile.TemporaryDirectory(dir=WHEEL_ROOT) as tmp:
        fresh = Path(tmp)
        reqs = stage_requirements(stage)
        if flavour:
            # The constraint says 2.13.0; the flavoured index provides 2.13.0+cpu / +cu126, which
            # PEP 440 ranks above the plain release, so pip picks it.
            reqs = [r for r in reqs if not r.startswith("torch")] + ["torch==2.13.0"]
        for whl in dest.glob("*.whl"):  # seed from the old wheelhouse without pinning to it
            shutil.copy2(whl, fresh)
        _pip_wheel(["-c", str(ROOT / "constraints.txt")] + reqs, fresh, torch_index)
        resolved = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
             "--no-index", "--find-links", str(fresh), "--report", "-",
             "-c", str(ROOT / "constraints.txt")] + reqs,
            check=True, capture_output=True, text=True,
        ).stdout
        report = json.loads(resolved)
        pins = sorted(
            f"{item['metadata']['name'].lower().replace('_', '-')}=={item['metadata']['version']}"
            for item in report["install"]
        )
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Lock for the {stage} image: every distribution it installs. Generated by\n"
            f"# `python -m containers.wheelhouse {stage} --relock` from pyproject.toml [{stage}] +"
            " constraints.txt.\n"
        )
        tmp_lock = lock.with_suffix(".tmp")
        tmp_lock.write_text(header + "\n".join(pins) + "\n")
        tmp_lock.replace(lock)
        wanted = {p.split("==")[0] for p in pins}
        for whl in fresh.glob("*.whl"):
            name = _norm(whl.name.split("-")[0])
            if name in wanted and not (dest / whl.name).exists():
                shutil.copy2(whl, dest / whl.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    if sys.version_info[:2] != IMAGE_PYTHON:
        # pip resolves binary wheels for the running interpreter; the images run Debian's 3.11.
        raise SystemExit(f"wheelhouse: run with Python {IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]} "
                         f"(the images' python3), not {sys.version.split()[0]}")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", choices=STAGES)
    ap.add_argument("--relock", action="store_true", help="resolve again and rewrite the lock")
    ns = ap.parse_args(argv)
    for t in ns.targets:
        print(f"wheelhouse: {build(t, ns.relock)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
