"""Fill the host wheelhouse ``.whl/<target>/`` that an image build installs from, offline.

``pip`` inside ``podman build`` cannot verify TLS on the dev/CI machines (intercepting proxy), and
cluster login nodes may have no PyPI at all, so the images never download anything: the host
runs ``pip download`` into the build context and the Dockerfile installs with
``pip install --no-index --find-links --require-hashes``.

The lock ``containers/locks/<target>.txt`` pins every distribution (transitive ones included)
that the image installs, each with the ``--hash=sha256:`` of its wheel. When it exists it is the
only input (reproducible builds); ``--relock`` resolves again from the ``pyproject.toml``
dependency group of the stage plus ``constraints.txt`` and rewrites it.

Torch flavours (:data:`TORCH_FLAVOUR`): convert has no torch; analyze and bundlegen get the CPU
wheel (``2.13.0+cpu``, from the machine's pip configuration or ``TORCH_INDEX_URL``); train and
ensemble get ``cu130``, **the plain PyPI wheel ``torch==2.13.0``, which is the CUDA 13.0 build**
(its CUDA libraries are PyPI wheels too; host driver >= 580). It is resolved with the machine's
pip configuration ignored (``pip --isolated``; only ``--cert`` is kept), because a local
``2.13.0+cpu`` in a find-links folder would outrank it. ``TORCH_FLAVOUR=cu126`` (UNTESTED: the
PyTorch index is not reachable from the dev machines) resolves ``+cu126`` from
``download.pytorch.org`` for sites whose driver is older than 580; its lock and wheelhouse are
``<stage>-cu126.txt`` and ``.whl/<stage>-cu126/``.

Usage::

    python -m containers.wheelhouse convert            # .whl/convert/ from containers/locks/convert.txt
    python -m containers.wheelhouse train --relock     # resolve again (CUDA 13 torch), rewrite the lock
    TORCH_FLAVOUR=cu126 python -m containers.wheelhouse train --relock   # UNTESTED CUDA 12.6 flavour
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = ROOT / "containers" / "locks"
WHEEL_ROOT = ROOT / ".whl"

#: Which torch build each stage image gets by default ("" = the stage needs no torch).
TORCH_FLAVOUR = {"convert": "", "analyze": "cpu", "bundlegen": "cpu", "train": "cu130", "ensemble": "cu130"}
#: The CUDA flavours a GPU stage may be built with (``TORCH_FLAVOUR`` env / make variable).
CUDA_FLAVOURS = ("cu130", "cu126")
#: The flavour whose lock and wheelhouse carry no suffix (``train.txt``, ``.whl/train/``).
DEFAULT_CUDA = "cu130"
#: Extra indexes by flavour; ``TORCH_INDEX_URL`` overrides (empty = none: the plain PyPI wheel for
#: cu130, the machine's pip configuration for cpu, e.g. a local folder holding ``+cpu`` wheels).
TORCH_INDEX = {"cpu": "", "cu130": "", "cu126": "https://download.pytorch.org/whl/cu126"}
#: The torch pin per flavour: PyPI's plain 2.13.0 is the CUDA 13.0 build.
TORCH_PIN = {"cpu": "torch==2.13.0+cpu", "cu130": "torch==2.13.0", "cu126": "torch==2.13.0+cu126"}
#: Resolve with the machine's pip configuration ignored (it may rank a local +cpu wheel first).
ISOLATED = {"cu130", "cu126"}
STAGES = tuple(TORCH_FLAVOUR)
#: Debian bookworm's python3, which every image runs.
IMAGE_PYTHON = (3, 11)
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def flavour_of(stage: str) -> str:
    """The torch flavour ``stage`` is built with (``TORCH_FLAVOUR`` switches the GPU stages)."""
    default = TORCH_FLAVOUR[stage]
    if default not in CUDA_FLAVOURS:
        return default
    wanted = os.environ.get("TORCH_FLAVOUR") or DEFAULT_CUDA
    if wanted not in CUDA_FLAVOURS:
        raise SystemExit(f"wheelhouse: TORCH_FLAVOUR={wanted!r}: use one of {', '.join(CUDA_FLAVOURS)}")
    return wanted


def lock_name(stage: str, flavour: str | None = None) -> str:
    """``train`` for the default flavour, ``train-cu126`` for another (lock + wheelhouse name)."""
    flavour = flavour_of(stage) if flavour is None else flavour
    return stage if flavour in ("", "cpu", DEFAULT_CUDA) else f"{stage}-{flavour}"


def stage_requirements(stage: str, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The core dependencies plus the ``[project.optional-dependencies]`` group of ``stage``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = project.get("optional-dependencies", {})
    if stage not in groups:
        raise SystemExit(f"wheelhouse: pyproject.toml has no dependency group {stage!r}")
    return list(project["dependencies"]) + list(groups[stage])


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def read_lock(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """``{normalised name: (version, [sha256, ...])}`` of a lock file."""
    out: dict[str, tuple[str, list[str]]] = {}
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        pin, *opts = line.split()
        name, version = pin.split("==")
        out[_norm(name)] = (version, [o.split(":", 1)[1] for o in opts if o.startswith("--hash=sha256:")])
    return out


def _wheels(wheel_dir: Path) -> dict[str, Path]:
    """``{"name==version": wheel}`` of a folder (normalised names)."""
    have = {}
    for whl in sorted(wheel_dir.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        have[f"{_norm(name)}=={version}"] = whl
    return have


def missing_wheels(lock: Path, wheel_dir: Path) -> list[str]:
    """The ``name==version`` pins of ``lock`` that have no wheel in ``wheel_dir``."""
    have = _wheels(wheel_dir)
    return [f"{n}=={v}" for n, (v, _) in read_lock(lock).items() if f"{n}=={v}" not in have]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(args: list[str], dest: Path, flavour: str) -> None:
    index = os.environ.get("TORCH_INDEX_URL", TORCH_INDEX.get(flavour, ""))
    cmd = [sys.executable, "-m", "pip"]
    if flavour in ISOLATED:
        # Ignore pip.conf/PIP_* (a local find-links +cpu wheel would win) but keep the CA bundle.
        cert = os.environ.get("PIP_CERT") or (CA_BUNDLE if Path(CA_BUNDLE).is_file() else "")
        cmd += ["--isolated"] + (["--cert", cert] if cert else [])
    cmd += ["download", "--quiet", "--only-binary", ":all:", "--dest", str(dest)]
    if index:
        cmd += ["--extra-index-url", index]
    # Wheels already in the folder are reused, so a rebuild needs no network.
    cmd += ["--find-links", str(dest)] + args
    subprocess.run(cmd, check=True)


def write_lock(lock: Path, stage: str, flavour: str, pins: list[str], wheel_dir: Path) -> None:
    """Write ``name==version --hash=sha256:<wheel>`` lines (atomically)."""
    have = _wheels(wheel_dir)
    lines = []
    for pin in sorted(pins):
        name, version = pin.split("==")
        whl = have.get(f"{_norm(name)}=={version}")
        if whl is None:
            raise SystemExit(f"wheelhouse: resolved {pin} but {wheel_dir} has no wheel for it")
        lines.append(f"{name}=={version} --hash=sha256:{sha256(whl)}")
    env = f"TORCH_FLAVOUR={flavour} " if flavour != TORCH_FLAVOUR[stage] else ""
    header = (
        f"# Lock for the {stage} image ({flavour or 'no'} torch): every distribution it installs, with the\n"
        f"# sha256 of its wheel. Generated by `{env}python -m containers.wheelhouse {stage} --relock`\n"
        f"# from pyproject.toml [{stage}] + constraints.txt; installed with --require-hashes.\n"
    )
    if flavour == "cu126":
        header += "# UNTESTED flavour (CUDA 12.6 wheels from download.pytorch.org, for drivers < 580).\n"
    tmp = lock.with_suffix(".tmp")
    tmp.write_text(header + "\n".join(lines) + "\n")
    tmp.replace(lock)


def build(stage: str, relock: bool = False) -> Path:
    """Fill ``.whl/<lock name>/`` (and write the lock if missing or ``relock``); returns the folder."""
    flavour = flavour_of(stage)
    name = lock_name(stage, flavour)
    dest = WHEEL_ROOT / name
    dest.mkdir(parents=True, exist_ok=True)
    lock = LOCK_DIR / f"{name}.txt"
    if lock.exists() and not relock:
        if not missing_wheels(lock, dest):
            return dest  # complete: no pip, no network (pip would still query every index)
        pins = [f"{n}=={v}" for n, (v, _) in read_lock(lock).items()]
        _pip_download(["--no-deps"] + pins, dest, flavour)
        if missing := missing_wheels(lock, dest):
            raise SystemExit(f"wheelhouse: no wheel for {', '.join(missing)} in {dest}")
        bad = [
            f"{n}=={v}"
            for n, (v, hashes) in read_lock(lock).items()
            if hashes and sha256(_wheels(dest)[f"{n}=={v}"]) not in hashes
        ]
        if bad:
            raise SystemExit(f"wheelhouse: {dest}: wheels whose sha256 is not in {lock.name}: {', '.join(bad)}")
        return dest
    with tempfile.TemporaryDirectory(dir=WHEEL_ROOT) as tmp:
        fresh = Path(tmp)
        reqs = stage_requirements(stage)
        if flavour:
            reqs = [r for r in reqs if not r.startswith("torch")] + [TORCH_PIN[flavour]]
        for whl in dest.glob("*.whl"):  # seed from the old wheelhouse without pinning to it
            os.link(whl, fresh / whl.name)
        _pip_download(["-c", str(ROOT / "constraints.txt")] + reqs, fresh, flavour)
        resolved = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--isolated",
                "install",
                "--dry-run",
                "--quiet",
                "--ignore-installed",
                "--no-index",
                "--find-links",
                str(fresh),
                "--report",
                "-",
                "-c",
                str(ROOT / "constraints.txt"),
            ]
            + reqs,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        report = json.loads(resolved)
        pins = [f"{_norm(item['metadata']['name'])}=={item['metadata']['version']}" for item in report["install"]]
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        write_lock(lock, stage, flavour, pins, fresh)
        wanted = set(pins)
        for key, whl in _wheels(fresh).items():
            if key in wanted and not (dest / whl.name).exists():
                os.link(whl, dest / whl.name)
        for key, whl in _wheels(dest).items():  # keep the build context to what the lock installs
            if key not in wanted:
                whl.unlink()
    return dest


def main(argv: list[str] | None = None) -> int:
    if sys.version_info[:2] != IMAGE_PYTHON:
        # pip resolves binary wheels for the running interpreter; the images run Debian's 3.11.
        raise SystemExit(
            f"wheelhouse: run with Python {IMAGE_PYTHON[0]}.{IMAGE_PYTHON[1]} "
            f"(the images' python3), not {sys.version.split()[0]}"
        )
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", choices=STAGES)
    ap.add_argument("--relock", action="store_true", help="resolve again and rewrite the lock")
    ns = ap.parse_args(argv)
    for t in ns.targets:
        print(f"wheelhouse: {build(t, ns.relock)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
