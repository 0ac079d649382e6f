"""The built train and ensemble images (CUDA torch) proven without a GPU (issue 10).

Runs only where ``make images IMAGES="train ensemble"`` has built them (podman; ~2.8 GB of CUDA
wheels, minutes of build), and says so when it skips; ``make test-images-cuda`` runs it. CI does
not build these images. Every container runs the way the clusters run a stage: non-root
(uid 10001), read-only root filesystem, no network, the work dir bound at its host path.

* ``--help`` equals the bare command's; torch is PyPI's CUDA 13.0 build; the official templates
  are at the baked path;
* ``train --gpus 1`` in the image (CUDA torch, no driver bound) is exit 2 with one line;
* one short CPU epoch (``--gpus 0``) of a segresnet bundle inside the image gives exactly the
  weights (``torch.equal``) of the same epoch run natively;
* the ensemble image ensembles that bundle, with the same predictions as a native ensemble.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.podman]

ROOT = Path(__file__).resolve().parents[1]
PREFIX = os.environ.get("IMAGE_PREFIX", "cellmap-a3ds")
VERSION = (
    os.environ.get("VERSION")
    or yaml.safe_load(
        "\n".join(
            ln for ln in (ROOT / "pyproject.toml").read_text().splitlines() if ln.startswith("version = ")
        ).replace(" = ", ": ")
    )["version"]
)
TRAIN, ENSEMBLE = f"{PREFIX}/train:{VERSION}", f"{PREFIX}/ensemble:{VERSION}"
CONF = ROOT / "containers" / "podman" / "containers.conf"
TEMPLATES = "/opt/monai-algo-templates/21ed8e5"
TRAIN_CFG = {
    "num_epochs": 1,
    "num_steps_per_epoch": 3,
    "batch_size": 2,
    "num_workers": 0,
    "roi_size": [32, 32, 16],
    "network": {"init_filters": 8, "blocks_down": [1, 2, 2, 4]},
}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if shutil.which("runc"):
        env["CONTAINERS_CONF"] = str(CONF)
    return env


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _podman(
    image: str, args: list[str], binds: tuple[Path, ...] = (), entrypoint: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    cmd = ["podman", "run", "--rm", "--network", "none", "--read-only"]
    for b in binds:
        cmd += ["-v", f"{b}:{b}"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return _run(cmd + [image] + args, timeout=timeout)


@pytest.fixture(scope="module")
def images() -> tuple[str, str]:
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (.ci/run apt-installs it)")
    missing = [i for i in (TRAIN, ENSEMBLE) if _run(["podman", "image", "exists", i]).returncode != 0]
    if missing:
        pytest.skip(
            f'{", ".join(missing)} not built here: run `make images IMAGES="train ensemble"` '
            "(downloads ~2.8 GB of CUDA wheels, see docs/containers.md), then `make test-images-cuda`"
        )
    for image in (TRAIN, ENSEMBLE):
        why = _stale(image)
        if why:
            pytest.skip(
                f"{image} {why}: it cannot be compared with this tree's native run; rebuild it "
                'from a clean checkout with `make images IMAGES="train ensemble"`, then `make test-images-cuda`'
            )
    return TRAIN, ENSEMBLE


def _stale(image: str) -> str | None:
    """Why ``image`` was not built from this tree's code (None when it was).

    The native run and the run inside the image must execute the same code, or "equal weights"
    proves nothing: the image's ``org.opencontainers.image.revision`` must be a clean commit
    whose copied packages equal the working tree's.
    """
    res = _run(
        ["podman", "image", "inspect", image, "--format", '{{index .Labels "org.opencontainers.image.revision"}}']
    )
    rev = res.stdout.strip()
    if res.returncode != 0 or not rev or rev == "<no value>":
        return "carries no source revision label"
    if rev.endswith("-dirty"):
        return f"was built from uncommitted changes ({rev})"
    diff = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--quiet", rev, "--", "common", "stages", "bench"],
        capture_output=True,
        text=True,
    )
    if diff.returncode == 1:
        return f"was built from {rev}, and common/, stages/ or bench/ changed since"
    if diff.returncode != 0:
        return f"was built from {rev}, which this checkout does not have"
    return None


def test_train_image_contents(images: tuple[str, str]) -> None:
    """--help as natively; CUDA 13.0 torch; templates baked; non-root; slimmed; mlflow only in train."""
    train, ensemble = images
    res = _podman(train, ["--help"])
    native = _run([sys.executable, "-m", "stages.train", "--help"])
    assert res.returncode == 0 and res.stdout == native.stdout, res.stderr
    probe = (
        "import importlib.util as u, os, torch; print(torch.__version__, torch.version.cuda, os.getuid(), "
        "[m for m in ('triton', 'mlflow', 'tensorboard') if u.find_spec(m)])"
    )
    got = {img: _podman(img, ["-c", probe], entrypoint="python") for img in images}
    assert got[train].returncode == 0, got[train].stderr
    # PyPI's plain torch==2.13.0 (the lock's pin) reports itself as the CUDA 13.0 build
    assert got[train].stdout.split(None, 3)[:3] == ["2.13.0+cu130", "13.0", "10001"]
    assert got[train].stdout.split(None, 3)[3].strip() == "['mlflow', 'tensorboard']"
    assert got[ensemble].stdout.split(None, 3)[3].strip() == "[]", "no training-only packages in ensemble"
    algos = _podman(
        train, ["-c", f"ls {TEMPLATES}/*/scripts/algo.py; echo $CELLMAP_A3DS_OFFICIAL_TEMPLATES"], entrypoint="sh"
    )
    assert algos.returncode == 0, algos.stderr
    lines = algos.stdout.split()
    assert lines[-1] == TEMPLATES
    assert sorted(Path(p).parts[4] for p in lines[:-1]) == ["dints", "segresnet", "segresnet2d", "swinunetr"]


def test_train_gpus_1_in_image_without_driver(images: tuple[str, str], tmp_path: Path) -> None:
    """The image's torch has CUDA but no driver is bound (no --nv / --gpus): exit 2, one line."""
    wd = tmp_path / "wd"
    wd.mkdir(mode=0o777)
    wd.chmod(0o777)
    res = _podman(images[0], ["--work-dir", str(wd), "--algo", "segresnet", "--gpus", "1"], binds=(wd,))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA driver (libcuda.so.1 not found)" in lines[0], res.stderr
    assert "CUDA 13.0 (driver >= 580)" in lines[0] and "--gpus 0" in lines[0]


def _work_dir(base: Path, dest: Path) -> Path:
    """A copy of the analysed data with its own bundle (bundles hold absolute paths)."""
    from common.config import load_config
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen

    shutil.copytree(base, dest)
    (dest / "pipeline.yaml").write_text(
        yaml.safe_dump(
            {
                "classes": ["ecs", "pm", "mito_mem"],
                "unknown_label": 255,
                "resolution_nm": 8,
                "algos": ["segresnet"],
                "num_folds": 1,
                "templates": "builtin",
                "train": TRAIN_CFG,
            }
        )
    )
    run_bundlegen(WorkDir.at(dest), load_config(dest))
    for p in [dest, *dest.rglob("*")]:  # the image's user (10001) writes here, as any cluster user would
        p.chmod(0o777 if p.is_dir() else 0o666)
    return dest


@pytest.fixture(scope="module")
def trained(images: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same segresnet epoch (CPU, --gpus 0) in the train image and natively."""
    from monai.apps.auto3dseg import DataAnalyzer

    from tools.synthetic import make_blobs_dataset

    tmp = tmp_path_factory.mktemp("images_cuda")
    tmp.chmod(0o755)
    base = tmp / "base"
    # classes missing from some cases and an unknown slab, like real crops
    dl = make_blobs_dataset(
        base, n_cases=4, shape=(40, 36, 22), n_classes=3, n_val=1, seed=3, missing={1: (2,), 3: (1, 3)}
    )
    DataAnalyzer(
        str(dl), str(base / "nifti_data"), output_path=str(base / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    out = {}
    for name in ("container", "native"):
        wd = _work_dir(base, tmp / f"work_{name}")
        args = ["--work-dir", str(wd), "--algo", "segresnet", "--gpus", "0"]
        if name == "container":
            res = _podman(images[0], args, binds=(wd,), timeout=900)
        else:
            res = _run([sys.executable, "-m", "stages.train", *args], timeout=900)
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
        out[name] = wd
    return out


def test_cpu_epoch_in_image_equals_native(trained: dict[str, Path]) -> None:
    import torch

    files = {}
    for name, wd in trained.items():
        model = wd / "segresnet_0" / "model"
        files[name] = torch.load(model / "model_final.pt", weights_only=True, map_location="cpu")["state_dict"]
        assert json.loads((wd / "markers" / "train.segresnet_0.json").read_text())["status"] == "done"
    assert (trained["container"] / "segresnet_0" / "model" / "model_final.pt").stat().st_uid == 10001
    c, n = files["container"], files["native"]
    assert c.keys() == n.keys() and len(c) > 10
    diff = {k: float((c[k].float() - n[k].float()).abs().max()) for k in c if not torch.equal(c[k], n[k])}
    assert not diff, f"{len(diff)} of {len(c)} tensors differ; max |diff| {max(diff.values()):.3g}"
    rows = [
        json.loads(ln)
        for ln in (trained["container"] / "segresnet_0" / "model" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [0] and rows[0]["steps"] == TRAIN_CFG["num_steps_per_epoch"]


def test_ensemble_image_ensembles_the_bundle(images: tuple[str, str], trained: dict[str, Path]) -> None:
    """The ensemble image on the container-trained work dir = the native ensemble on the native one."""
    preds = {}
    for name, wd in trained.items():
        args = ["--work-dir", str(wd), "--n-best", "1"]
        if name == "container":
            res = _podman(images[1], args, binds=(wd,), timeout=900)
        else:
            res = _run([sys.executable, "-m", "stages.ensemble", *args], timeout=900)
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
        report = json.loads((wd / "reports" / "ensemble.json").read_text())
        assert report["members"] == ["segresnet_0"]
        preds[name] = {
            p.name: np.asarray(nib.load(str(p)).dataobj)
            for p in sorted((wd / "ensemble_output").glob("*_ensemble.nii.gz"))
        }
        assert preds[name], f"{name}: no ensemble_output/*_ensemble.nii.gz"
    assert preds["container"].keys() == preds["native"].keys()
    for k in preds["native"]:
        np.testing.assert_array_equal(preds["container"][k], preds["native"][k], err_msg=k)
