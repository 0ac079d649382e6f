"""Build the convert image for real with podman and run it (issue 6).

The Debian base is made locally (debootstrap minbase + ``podman import``, tagged as the
``debian:<tag>`` the Dockerfiles name; no registry), the Python wheels come from the host
wheelhouse, and the image runs as its non-root user with only the data root (read-only) and the
work dir bound, each at its host path, no network and a read-only root filesystem. Its outputs
must equal a native run of the same command.

Needs podman, buildah-capable storage, runc and debootstrap (``.ci/run`` installs them). The
debootstrapped rootfs is cached in ``~/.cache/cellmap-auto3dseg/`` (about 40 s the first time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.podman]

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "cellmap-a3ds-test"
VERSION = "test"
IMAGE = f"{PREFIX}/convert:{VERSION}"
CONF = ROOT / "containers" / "podman" / "containers.conf"


def _env() -> dict[str, str]:
    return dict(
        os.environ,
        CONTAINERS_CONF=str(CONF),
        CONTAINER_CLI="podman",
        IMAGE_PREFIX=PREFIX,
        VERSION=VERSION,
        PYTHON=sys.executable,
        IMAGES_DIR=str(ROOT / "build" / "test-images"),
    )


def _run(cmd: list[str], timeout: float = 900, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


def _debian_tag() -> str:
    for line in (ROOT / "containers" / "base-cpu" / "Dockerfile").read_text().splitlines():
        if line.startswith("ARG DEBIAN_TAG="):
            return line.split("=", 1)[1]
    raise AssertionError("no ARG DEBIAN_TAG in containers/base-cpu/Dockerfile")


@pytest.fixture(scope="module")
def convert_image() -> str:
    """Make the Debian base (cached) and build base-cpu + convert; returns the image name."""
    missing = [t for t in ("podman", "debootstrap", "runc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run apt-installs them)")
    if not (ROOT / "stages" / "convert" / "__main__.py").exists():
        pytest.skip("stages/convert has not landed yet")
    debian = f"docker.io/library/debian:{_debian_tag()}"
    if os.geteuid() != 0 and _run(["podman", "image", "exists", debian]).returncode != 0:
        pytest.skip(f"debootstrap needs root to make {debian} (run as root or import it first)")
    t0 = time.perf_counter()
    base = _run([str(ROOT / "containers" / "make-base.sh")])
    assert base.returncode == 0, base.stdout + base.stderr
    assert _run(["podman", "image", "exists", debian]).returncode == 0, f"{debian} not made"
    t1 = time.perf_counter()
    build = _run([str(ROOT / "containers" / "build.sh"), "base-cpu", "convert"])
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    sizes = (ROOT / "build" / "test-images" / "sizes.md").read_text()
    assert f"`{IMAGE}` |" in sizes and "missing" not in sizes, sizes
    t2 = time.perf_counter()
    print(f"\npodman: base image {t1 - t0:.1f} s, base-cpu + convert build {t2 - t1:.1f} s")
    return IMAGE


def _podman_run(
    image: str, args: list[str], binds: tuple[str, ...] = (), entrypoint: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``podman run`` the way the clusters run a stage: no network, read-only root, given binds."""
    cmd = ["podman", "run", "--rm", "--network", "none", "--read-only"]
    for b in binds:
        cmd += ["-v", b]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return _run(cmd + [image] + args, timeout=300)


def test_image_metadata(convert_image: str) -> None:
    """OCI labels from the build args, non-root user, no torch/MONAI in the convert image."""
    res = _run(["podman", "image", "inspect", convert_image])
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)[0]
    labels = info["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert labels["org.opencontainers.image.created"].endswith("Z")
    assert info["Config"]["User"] == "10001:10001"
    assert info["Config"]["Entrypoint"] == ["python", "-m", "stages.convert"]
    uid = _podman_run(convert_image, ["-u"], entrypoint="id")
    assert uid.returncode == 0 and uid.stdout.strip() == "10001", uid.stdout + uid.stderr
    env = _podman_run(convert_image, [], entrypoint="env").stdout.splitlines()
    assert f"CELLMAP_A3DS_IMAGE_VERSION={VERSION}" in env
    assert "PYTHONNOUSERSITE=1" in env and "PYTHONSAFEPATH=1" in env and "OMP_NUM_THREADS=1" in env
    probe = "import importlib.util as u; print([m for m in ('torch', 'monai') if u.find_spec(m)])"
    res = _podman_run(convert_image, ["-c", probe], entrypoint="python")
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_help_in_container(convert_image: str, tmp_path: Path) -> None:
    """``podman run IMAGE --help`` is ``python -m stages.convert --help``, also when run from a
    directory holding another ``stages/`` package (Apptainer keeps the caller's cwd)."""
    decoy = tmp_path / "stages" / "convert"
    decoy.mkdir(parents=True)
    (tmp_path / "stages" / "__init__.py").write_text("")
    (decoy / "__init__.py").write_text("")
    (decoy / "__main__.py").write_text("print('DECOY')\n")
    for p in [tmp_path, *tmp_path.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    res = _run(
        [
            "podman",
            "run",
            "--rm",
            "--network",
            "none",
            "--read-only",
            "-v",
            f"{tmp_path}:{tmp_path}:ro",
            "-w",
            str(tmp_path),
            convert_image,
            "--help",
        ],
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "DECOY" not in res.stdout
    native = subprocess.run(
        [sys.executable, "-m", "stages.convert", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.stdout == native.stdout


def test_convert_in_container_matches_native(convert_image: str, tmp_path: Path) -> None:
    """Convert the synthetic CellMap fixture inside the image (non-root, bind-mounted work dir at
    its host path) and natively; the outputs on the host must be the same."""
    from tools.synthetic_cellmap import make_synthetic_cellmap

    data = tmp_path / "data"
    make_synthetic_cellmap(data)
    os.chmod(tmp_path, 0o755)
    for p in [data, *data.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    runs = {}
    for name in ("container", "native"):
        wd = tmp_path / f"work_{name}"
        wd.mkdir()
        wd.chmod(0o777)  # the image's user (10001) writes here, as any cluster user would
        # the fixture's malformed crops fail by design: allow them, so both runs finish (exit 0)
        (wd / "pipeline.yaml").write_text("resolution_nm: 4\nconvert: {max_failed_fraction: 1.0}\n")
        args = ["--work-dir", str(wd), "--data-root", str(data), "--workers", "1"]
        if name == "container":
            res = _podman_run(convert_image, args, binds=(f"{data}:{data}:ro", f"{wd}:{wd}"))
        else:
            res = subprocess.run(
                [sys.executable, "-m", "stages.convert", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
            )
        runs[name] = (wd, res)
    (cwd, cres), (nwd, nres) = runs["container"], runs["native"]
    assert cres.returncode == nres.returncode, cres.stderr[-3000:]
    assert cres.returncode == 0, cres.stderr[-3000:]

    datalist = json.loads((cwd / "nifti_data" / "datalist.json").read_text())
    assert datalist == json.loads((nwd / "nifti_data" / "datalist.json").read_text())
    assert datalist["training"], "the fixture has convertible crops"
    assert json.loads((cwd / "markers" / "convert.json").read_text())["status"] == "done"
    niftis = sorted(p.name for p in (cwd / "nifti_data").glob("*.nii.gz"))
    assert niftis == sorted(p.name for p in (nwd / "nifti_data").glob("*.nii.gz"))
    assert len(niftis) == 2 * len(datalist["training"] + datalist.get("testing", []))
    for name in niftis:
        a, b = nib.load(cwd / "nifti_data" / name), nib.load(nwd / "nifti_data" / name)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine)
        assert (cwd / "nifti_data" / name).stat().st_uid == 10001, "written by the non-root user"
    assert not list(cwd.rglob("*.tmp*")), "no partial files left behind"
