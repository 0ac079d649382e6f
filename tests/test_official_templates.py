"""The official MONAI templates (research-contributions @21ed8e5) end to end, on a subset of classes.

Skipped unless ``CELLMAP_A3DS_OFFICIAL_TEMPLATES`` points at a local copy of
``auto3dseg/algorithm_templates`` (nothing is downloaded). The fixture configures the 14
CellMap classes while its crops hold only 6 of them, the case where the templates count
7 labels and dints used to keep ``output_classes: 7``.

Training: official segresnet trains on CPU; official dints and swinunetr hard-code
``torch.device('cuda')`` (docs: auto3dseg-facts §5), so they train and join the ensemble
only where CUDA is available, and their training test is skipped with that reason elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.classes import DEFAULT_CLASSES
from common.config import OFFICIAL_TEMPLATES_ENV

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("segresnet", "swinunetr", "dints")
CLASSES = list(DEFAULT_CLASSES)  # the challenge's 14 classes of the default config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get(OFFICIAL_TEMPLATES_ENV),
        reason=f"set {OFFICIAL_TEMPLATES_ENV} to a local copy of research-contributions@21ed8e5 "
        "auto3dseg/algorithm_templates to test the official templates",
    ),
]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, f"{argv}: rc {res.returncode}\n{res.stderr[-4000:]}"
    return res


def _hp(bundle: Path, name: str = "hyper_parameters.yaml") -> dict:
    return yaml.safe_load((bundle / "configs" / name).read_text())


def _output_classes(bundle: Path, algo: str) -> list[int]:
    if algo == "dints":
        return [
            _hp(bundle)["training"]["output_classes"],
            _hp(bundle, "hyper_parameters_search.yaml")["searching"]["output_classes"],
        ]
    return [_hp(bundle)["output_classes"]]


def _find(node: object, target: str) -> list[dict]:
    """Every dict with ``_target_ == target`` anywhere in a parsed config."""
    found: list[dict] = []
    if isinstance(node, dict):
        if node.get("_target_") == target:
            found.append(node)
        for v in node.values():
            found += _find(v, target)
    elif isinstance(node, list):
        for v in node:
            found += _find(v, target)
    return found


@pytest.fixture(scope="module")
def subset_wd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 classes configured, 6 present; 4 training cases (2 validation) + 1 labelled held-out case."""
    from tools.synthetic import make_blobs_dataset

    wd = tmp_path_factory.mktemp("official") / "work"
    make_blobs_dataset(wd, n_cases=4, shape=(32, 32, 32), n_classes=6, n_val=2, n_test=1, seed=1, unknown_label=None)
    (wd / "pipeline.yaml").write_text(
        f"classes: [{', '.join(CLASSES)}]\nunknown_label: 0\ntemplates: official\n"
        "train: {num_epochs: 1, auto_scale_allowed: false, roi_size: [32, 32, 32], num_workers: 0, cache_rate: 0}\n"
    )
    _run(["-m", "stages.analyze", "--work-dir", str(wd)])
    return wd


def test_all_three_pin_output_classes_on_a_subset_of_classes(subset_wd: Path, tmp_path: Path) -> None:
    wd = subset_wd
    stats = yaml.safe_load((wd / "datastats.yaml").read_text())
    assert len(stats["stats_summary"]["label_stats"]["labels"]) == 7  # what the templates would count
    _run(["-m", "stages.bundlegen", "--work-dir", str(wd)])
    for algo in ALGOS:
        b = wd / f"{algo}_0"
        assert _output_classes(b, algo) == [15] * len(_output_classes(b, algo))
        assert json.loads((b / "cellmap_bundle.json").read_text())["templates"] == "official"
    # the clip every official template normalises with is the analyze report's
    clip = json.loads((wd / "reports" / "analysis.json").read_text())["recommended"]["intensity_clip"]
    assert _hp(wd / "segresnet_0")["intensity_bounds"] == pytest.approx(clip)
    for algo in ("swinunetr", "dints"):
        for name in ("transforms_train.yaml", "transforms_infer.yaml"):
            scale = _find(yaml.safe_load((wd / f"{algo}_0" / "configs" / name).read_text()), "ScaleIntensityRanged")
            assert scale and [scale[0]["a_min"], scale[0]["a_max"]] == pytest.approx(clip)

    # the same templates given as a directory path (the case that failed: dints kept 7)
    other = tmp_path / "work"
    import shutil

    shutil.copytree(wd / "nifti_data", other / "nifti_data")
    for f in ("datastats.yaml", "datastats_by_case.yaml"):
        shutil.copy(wd / f, other / f)
    text = (
        (wd / "pipeline.yaml")
        .read_text()
        .replace("templates: official", f"templates: {os.environ[OFFICIAL_TEMPLATES_ENV]}")
    )
    (other / "pipeline.yaml").write_text(text + "algos: [dints]\n")
    _run(["-m", "stages.bundlegen", "--work-dir", str(other)])
    assert _output_classes(other / "dints_0", "dints") == [15, 15]
    assert json.loads((other / "dints_0" / "cellmap_bundle.json").read_text())["templates"] == "official"


@pytest.mark.parametrize("algo", ALGOS)
def test_train_one_epoch(subset_wd: Path, algo: str) -> None:
    if algo != "segresnet" and not _cuda():
        pytest.skip(f"official {algo} hard-codes torch.device('cuda'): trains only where CUDA is available")
    if not (subset_wd / f"{algo}_0" / "algo_object.json").is_file():
        _run(["-m", "stages.bundlegen", "--work-dir", str(subset_wd)])
    _run(["-m", "stages.train", "--work-dir", str(subset_wd), "--algo", algo])
    marker = json.loads((subset_wd / "markers" / f"train.{algo}_0.json").read_text())
    assert marker["status"] == "done" and isinstance(marker["details"]["best_metric"], float)


def test_ensemble_official_members(subset_wd: Path) -> None:
    trained = [a for a in ALGOS if (subset_wd / "markers" / f"train.{a}_0.json").is_file()]
    if "segresnet" not in trained:
        pytest.skip("needs test_train_one_epoch[segresnet] first")
    _run(["-m", "stages.ensemble", "--work-dir", str(subset_wd), "--n-best", "3"])
    rep = json.loads((subset_wd / "reports" / "ensemble.json").read_text())
    assert sorted(rep["members"]) == sorted(f"{a}_0" for a in trained)
    assert rep["scored_on"] == "testing" and rep["n_scored"] == 1  # the labelled held-out case
    assert list(rep["outputs"]) == ["synth_crop5"]
    for name in [*rep["members"], "ensemble"]:
        assert rep["scores"][name]["mean_dice"] is not None
