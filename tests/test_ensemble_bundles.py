"""Integration: the ensemble of three real, briefly trained builtin bundles (segresnet, swinunetr, dints).

analyze -> bundlegen -> ``python -m stages.train`` for each algorithm (1 epoch of 2 steps,
in parallel; the train stage writes the done marker with ``best_metric``) ->
``python -m stages.ensemble``. Inference goes through MONAI
(``algo_from_json`` -> ``BundleAlgo.get_inferer`` -> the bundle's ``InferClass``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.config import load_config
from common.workdir import WorkDir
from stages.ensemble.ensemble import run_ensemble
from tests.test_ensemble import _independent_scores

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("segresnet", "swinunetr", "dints")

pytestmark = pytest.mark.slow
_WARM: list[bool] = []  # set once every member ran in this process


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return env


def _run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=_env())
    assert res.returncode == 0, f"{argv}: rc {res.returncode}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def trained_wd(tmp_path_factory: pytest.TempPathFactory) -> WorkDir:
    from tools.synthetic import make_blobs_dataset

    root = tmp_path_factory.mktemp("bundles") / "work"
    make_blobs_dataset(root, n_cases=4, shape=(32, 32, 16), n_classes=3, n_val=2, seed=0)
    (root / "pipeline.yaml").write_text(
        "classes: [ecs, pm, mito_mem]\nunknown_label: 255\nresolution_nm: 8\n"
        "train: {num_epochs: 1, num_steps_per_epoch: 2, batch_size: 1, num_workers: 0, roi_size: [32, 32, 16],\n"
        "        network: {init_filters: 8, feature_size: 12, num_blocks: 4, num_depths: 3, channel_mul: 0.5}}\n"
    )
    py = sys.executable
    _run([py, "-m", "stages.analyze", "--work-dir", str(root), "--workers", "1", "--device", "cpu"])
    _run([py, "-m", "stages.bundlegen", "--work-dir", str(root)])
    wd = WorkDir.at(root)
    procs = {}
    for algo in ALGOS:  # the real train stage, three algorithms in parallel (mostly start-up time)
        procs[algo] = subprocess.Popen(
            [py, "-m", "stages.train", "--work-dir", str(root), "--algo", algo, "--gpus", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
    for algo, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"{algo} training failed:\n{out[-3000:]}"
        assert wd.marker(f"train.{algo}_0").is_done()
    return wd


class RssPeak:
    """Peak RSS of this process above its level at start, sampled every 2 ms."""

    def __init__(self) -> None:
        import psutil

        self._p = psutil.Process()
        self.base = self._p.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._p.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> RssPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


def test_three_builtin_bundles(trained_wd: WorkDir) -> None:
    wd = trained_wd
    py = sys.executable
    run_ensemble(load_config(wd.root), wd, n_best=3)  # in-process: also warms up the memory test
    _WARM.append(True)
    report = json.loads((wd.reports_dir / "ensemble.json").read_text())
    assert sorted(report["members"]) == sorted(f"{a}_0" for a in ALGOS)
    dl = json.loads(wd.datalist.read_text())
    val = [it for it in dl["training"] if it["fold"] == 0]
    preds, labels = {}, {}
    for it in val:
        out = wd.ensemble_dir / f"{it['case']}_ensemble.nii.gz"
        img = nib.load(str(wd.nifti_dir / it["image"]))
        got = nib.load(str(out))
        assert got.shape == img.shape and got.get_data_dtype() == np.uint8
        np.testing.assert_allclose(got.affine, img.affine)
        assert int(np.asarray(got.dataobj).max()) <= 3
        preds[it["case"]] = out
        labels[it["case"]] = wd.nifti_dir / it["label"]
    assert len(list(wd.ensemble_dir.glob("*_ensemble.nii.gz"))) == len(val)
    dice, iou = _independent_scores(preds, labels, 3, 255)
    for i, c in enumerate(["ecs", "pm", "mito_mem"]):
        assert report["scores"]["ensemble"]["per_class"][c]["dice"] == pytest.approx(dice[i], nan_ok=True)
        assert report["scores"]["ensemble"]["per_class"][c]["iou"] == pytest.approx(iou[i], nan_ok=True)
    # the member probabilities went to disk in float16, one file per member and case
    for a in ALGOS:
        files = sorted((wd.ensemble_dir / ".probs" / f"{a}_0").glob("*.npy"))
        assert len(files) == len(val)
        assert np.load(files[0], mmap_mode="r").dtype == np.float16
    assert (wd.reports_dir / "ensemble.png").is_file()

    # rerun: no-op, nothing rewritten
    files = [p for p in wd.ensemble_dir.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    res = _run([py, "-m", "stages.ensemble", "--work-dir", str(wd.root), "--n-best", "3"])
    assert "nothing to do" in res.stderr
    assert "| ensemble |" in res.stdout  # the score table is printed
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_peak_memory_1_vs_3_bundles(trained_wd: WorkDir) -> None:
    """In-process peak memory of the 3-member ensemble vs each member alone: <= +10%.

    Each member alone is the fair baseline: the 3-member peak may reach the largest
    member's model, but must not add the members up (one model and about two
    probability maps of one case at any time).
    """
    import shutil

    cfg = load_config(trained_wd.root)

    def measure(only: list[str]) -> tuple[int, int]:
        shutil.rmtree(trained_wd.ensemble_dir, ignore_errors=True)
        trained_wd.marker("ensemble").path.unlink(missing_ok=True)
        tracemalloc.start()
        with RssPeak() as rss:
            run_ensemble(cfg, trained_wd, n_best=3, only=only)
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return traced, rss.delta

    everyone = [f"{a}_0" for a in ALGOS]
    if not _WARM:  # warm-up: imports, torch kernels, every network class once
        measure(everyone)
    single = {a: measure([a]) for a in everyone}
    three = measure(everyone)
    print("peak (tracemalloc, rss delta) single", single, "three", three)
    # + 256 KiB: three members' Python bookkeeping (records, file lists) on tiny cases, where the
    # whole peak is ~1 MB; adding the members up would cost about the sum of the singles
    largest = max(t for t, _ in single.values())
    assert three[0] <= 1.10 * largest + 256 * 1024, (single, three)
    assert three[0] < 0.75 * sum(t for t, _ in single.values()), (single, three)
    # RSS also holds the allocator's retained pages (noisy): only a loose bound here; the
    # deterministic bound is tracemalloc's, and bench_ensemble measures both on big cases
    assert three[1] <= 1.10 * max(r for _, r in single.values()) + 64 * 2**20, (single, three)


def test_export_with_trained_bundles(trained_wd: WorkDir, tmp_path: Path) -> None:
    """All 413 rows of the real test manifest (real crop geometry, shapes shrunk) through the CLI
    with the three real bundles: every row whose class or parts are trained is written with the
    manifest's attributes; the others are listed as untrained with the fix (exit 0)."""
    import zarr

    from stages.ensemble.export import read_manifest
    from tests.export_realgeom import build_tree, real_test_crops, shrink, write_manifest

    crops = [shrink(c) for c in real_test_crops()]
    root = build_tree(tmp_path / "data", crops)
    manifest = tmp_path / "test_crop_manifest.csv"
    assert write_manifest(manifest, crops) == 413
    extra = tmp_path / "export.yaml"  # small halo: the shrunk crops are ~20 training voxels wide
    extra.write_text("ensemble: {export_block: 32, export_halo: 4}\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.ensemble",
            "--work-dir",
            str(trained_wd.root),
            "--skip-ensemble",
            "--config",
            str(extra),
            "--export-submission",
            str(manifest),
            "--data-root",
            str(root),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((trained_wd.reports_dir / "export.json").read_text())
    assert report["n_rows"] == 413 and report["failed"] == {}
    assert sorted(report["members"]) == sorted(f"{a}_0" for a in ALGOS)
    assert report["training_resolution_nm"] == [None, 8.0, 8.0]  # recorded by bundlegen
    trained = {"ecs", "pm", "mito_mem", "mito", "cell"}  # atoms and the groups holding them
    store = zarr.open_group(str(trained_wd.root / "submission" / "submission.zarr"), mode="r")
    for r in read_manifest(manifest):
        if r.class_label in trained:
            arr = store[f"crop{r.crop}"][r.class_label]
            assert arr.shape == r.shape
            assert (arr.attrs["voxel_size"], arr.attrs["translation"], arr.attrs["shape"]) == (
                list(r.voxel_size),
                list(r.translation),
                list(r.shape),
            )
        else:
            assert "to `classes:`" in report["untrained"][r.key]
    assert report["n_written"] + len(report["untrained"]) == 413 and report["n_written"] >= 30
    assert (trained_wd.root / "submission" / "submission.zip").is_file()
