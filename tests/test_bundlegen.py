"""bundlegen stage: real MONAI BundleGen on a CPU-only machine, real templates, no mocks."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from common import algorithms
from common.config import OFFICIAL_TEMPLATES_ENV
from common.workdir import WorkDir
from stages.analyze.analyze import run_analyze_entry
from stages.bundlegen.__main__ import main as bundlegen_cli
from stages.bundlegen.bundlegen import BUILTIN_TEMPLATES, _forget_templates, run_bundlegen_entry
from tools.synthetic import make_blobs_dataset

ALGOS = algorithms.names()  # the builtin algorithms: every one gets a bundle by default


@pytest.fixture(autouse=True)
def _no_template_modules_left() -> Iterator[None]:
    """``algo_from_json`` imports this test's templates by name; later tests must not inherit them."""
    yield
    _forget_templates(BUILTIN_TEMPLATES, None)


def _analyzed(root: Path, pipeline_yaml: str, unknown_label: int | None) -> Path:
    """A small analysed work dir whose data never shows class 3 (so pinning matters)."""
    wd = root / "work"
    make_blobs_dataset(
        wd,
        n_cases=4,
        shape=(32, 32, 16),
        n_classes=3,
        n_val=1,
        seed=1,
        unknown_label=unknown_label,
        missing={i: (3,) for i in range(4)},
    )
    (wd / "pipeline.yaml").write_text(pipeline_yaml)
    run_analyze_entry(wd)
    return wd


@pytest.fixture(scope="module")
def analyzed_builtin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _analyzed(tmp_path_factory.mktemp("bg"), "classes: [ecs, pm, mito_mem]\nunknown_label: 255\n", 255)


def _hp(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "configs" / "hyper_parameters.yaml").read_text())


@pytest.mark.slow
def test_builtin_bundles_on_cpu_pinned_and_sized(analyzed_builtin: Path) -> None:
    from monai.auto3dseg.utils import algo_from_json

    wd = analyzed_builtin
    stats = yaml.safe_load((wd / "datastats.yaml").read_text())
    assert stats["stats_summary"]["label_stats"]["labels"] == [0, 1, 2]  # the data shows 3 labels
    assert run_bundlegen_entry(wd, target_gpu_mem_gb=24) == 0

    inp = yaml.safe_load((wd / "input.yaml").read_text())
    assert inp["modality"] == "ct" and inp["task"] == "segmentation" and inp["sigmoid"] is False
    assert inp["class_names"] == ["ecs", "pm", "mito_mem"] and inp["output_classes"] == 4
    assert inp["unknown_label"] == 255 and inp["target_gpu_mem_gb"] == 24.0
    assert inp["dataroot"] == str(wd / "nifti_data") and inp["datalist"] == str(wd / "nifti_data" / "datalist.json")
    w = WorkDir.at(wd)
    for algo in ALGOS:
        b = wd / f"{algo}_0"
        assert _hp(b)["output_classes"] == 4  # pinned, not the 3 labels seen
        assert _hp(b)["target_gpu_mem_gb"] == 24.0
        rec = json.loads((b / "cellmap_bundle.json").read_text())
        assert rec["templates"] == "builtin" and rec["output_classes"] == 4 and rec["target_gpu_mem_gb"] == 24.0
        assert rec["fold"] == 0 and rec["class_names"] == ["ecs", "pm", "mito_mem"]
        algo_obj, _ = algo_from_json(str(b / "algo_object.json"))
        assert type(algo_obj).__name__ == f"{algo.capitalize()}Algo"
        assert algo_obj.output_path == str(b)
        assert w.marker(f"bundlegen.{algo}_0").is_done()
    assert (wd / "algorithm_templates" / "segresnet" / "scripts" / "algo.py").is_file()
    assert w.marker("bundlegen").is_done()

    # rerun: nothing regenerated; --force regenerates
    rec_file = wd / "dints_0" / "cellmap_bundle.json"
    mtime = rec_file.stat().st_mtime_ns
    run_bundlegen_entry(wd, target_gpu_mem_gb=24)
    assert rec_file.stat().st_mtime_ns == mtime
    run_bundlegen_entry(wd, target_gpu_mem_gb=24, algos="dints", force=True)
    assert rec_file.stat().st_mtime_ns != mtime
    # a different GPU size is a different input: regenerated and recorded
    run_bundlegen_entry(wd, target_gpu_mem_gb=80, algos="segresnet")
    assert json.loads((wd / "segresnet_0" / "cellmap_bundle.json").read_text())["target_gpu_mem_gb"] == 80.0
    # ... but a bundle that holds a model is never regenerated implicitly (that would delete it)
    (wd / "dints_0" / "model").mkdir()
    (wd / "dints_0" / "model" / "progress.yaml").write_text("- {epoch: 1}\n")
    run_bundlegen_entry(wd, target_gpu_mem_gb=40, algos="dints")
    assert json.loads(rec_file.read_text())["target_gpu_mem_gb"] == 24.0
    assert (wd / "dints_0" / "model" / "progress.yaml").is_file()


def _one_line_error(result, rc: int = 2) -> str:  # noqa: ANN001 - click Result
    assert result.exit_code == rc, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: bundlegen: "), lines
    return lines[0]


def test_bad_algo_missing_datastats_and_official_errors(tmp_path: Path, blobs_work_dir: Path) -> None:
    runner = CliRunner()
    wd = str(blobs_work_dir)
    # missing datastats (no analyze yet)
    line = _one_line_error(runner.invoke(bundlegen_cli, ["--work-dir", wd]))
    assert "datastats.yaml: not found (run analyze first)" in line
    (blobs_work_dir / "datastats.yaml").write_text("stats_summary: {}\n")
    line = _one_line_error(runner.invoke(bundlegen_cli, ["--work-dir", wd, "--algos", "segresnet,unet"]))
    assert "unknown algorithm ['unet']" in line
    # official templates cannot ignore unknown_label 255
    cfg = tmp_path / "official.yaml"
    cfg.write_text("templates: official\n")
    line = _one_line_error(runner.invoke(bundlegen_cli, ["--work-dir", wd, "--config", str(cfg)]))
    assert "needs unknown_label: 0" in line
    # official without a templates directory
    cfg.write_text(f"templates: official\nunknown_label: 0\nofficial_templates_dir: {tmp_path / 'none'}\n")
    line = _one_line_error(runner.invoke(bundlegen_cli, ["--work-dir", wd, "--config", str(cfg)]))
    assert "official templates directory not found" in line and "never downloaded" in line
    assert not (blobs_work_dir / "segresnet_0").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get(OFFICIAL_TEMPLATES_ENV),
    reason=f"set {OFFICIAL_TEMPLATES_ENV} to a local copy of research-contributions@21ed8e5 "
    "auto3dseg/algorithm_templates to test the official templates",
)
def test_official_templates_offline_on_cpu(tmp_path: Path) -> None:
    from monai.auto3dseg.utils import algo_from_json

    wd = _analyzed(tmp_path, "classes: [ecs, pm, mito_mem]\nunknown_label: 0\ntemplates: official\n", None)
    assert run_bundlegen_entry(wd, target_gpu_mem_gb=80) == 0
    seg, swin, dints = (wd / f"{a}_0" for a in ("segresnet", "swinunetr", "dints"))
    assert _hp(seg)["output_classes"] == 4 and _hp(seg)["modality"] == "ct"
    assert _hp(swin)["output_classes"] == 4
    assert _hp(dints)["training"]["output_classes"] == 4
    search = yaml.safe_load((dints / "configs" / "hyper_parameters_search.yaml").read_text())
    assert search["searching"]["output_classes"] == 4
    # swinunetr generated without a GPU, sized for 80 GiB (batch 14, crops 28 per auto3dseg-facts)
    assert _hp(swin)["num_patches_per_iter"] == 14 and _hp(swin)["num_crops_per_image"] == 28
    assert _hp(swin)["use_pretrain"] is False
    # ct path: range scaling to the foreground percentiles, not the MRI normalisation
    assert "ScaleIntensityRanged" in (swin / "configs" / "transforms_train.yaml").read_text()
    assert "ScaleIntensityRanged" in (dints / "configs" / "transforms_train.yaml").read_text()
    for b in (seg, swin, dints):
        assert _hp(b)["mlflow_tracking_uri"] == f"sqlite:///{b / 'mlflow.db'}"
        rec = json.loads((b / "cellmap_bundle.json").read_text())
        assert rec["templates"] == "official" and rec["target_gpu_mem_gb"] == 80.0 and rec["output_classes"] == 4
        algo_obj, _ = algo_from_json(str(b / "algo_object.json"))
        assert algo_obj.device_setting["CMD_PREFIX"] == rec["interpreter"]


def test_bundle_statistics_equal_analyze_report(analyzed_builtin: Path) -> None:
    """Class shares (unknown excluded) and the intensity clip: one number in report and bundle."""
    import nibabel as nib

    wd = analyzed_builtin
    run_bundlegen_entry(wd, target_gpu_mem_gb=24, algos="segresnet")
    report = json.loads((wd / "reports" / "analysis.json").read_text())
    # ground truth from the label files themselves: unknown (255) is not background
    dl = json.loads((wd / "nifti_data" / "datalist.json").read_text())
    counts = np.zeros(4)
    for row in dl["training"]:
        lab = np.asarray(nib.load(str(wd / "nifti_data" / row["label"])).dataobj)
        counts += np.bincount(lab[lab != 255].ravel(), minlength=4)[:4]
    known_shares = counts / counts.sum()
    assert report["class_shares"] == pytest.approx(known_shares.tolist(), abs=1e-12)
    hp = _hp(wd / "segresnet_0")
    assert np.max(np.abs(np.asarray(hp["class_shares"]) - known_shares)) < 1e-6
    assert hp["intensity_bounds"] == report["recommended"]["intensity_clip"]  # the very same number
    # the data really has unknown voxels, so counting them as background would differ
    assert report["unknown"]["voxels"] > 0
    with_unknown_as_bg = (counts + np.array([report["unknown"]["voxels"], 0, 0, 0])) / (
        counts.sum() + report["unknown"]["voxels"]
    )
    assert abs(hp["class_shares"][0] - with_unknown_as_bg[0]) > 1e-3
