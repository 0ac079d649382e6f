"""analyze stage: real NIfTI blob data, real MONAI DataAnalyzer, no mocks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from common.config import load_config
from common.errors import StageFailed
from common.workdir import WorkDir
from stages.analyze.__main__ import main as analyze_cli
from stages.analyze.analyze import CaseItem, check_complete, run_analyze, run_analyze_entry
from tools.synthetic import make_blobs_dataset

PNG = b"\x89PNG\r\n\x1a\n"


def _labels_images(wd: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    dl = json.loads((wd / "nifti_data" / "datalist.json").read_text())
    out = []
    for row in dl["training"]:
        img = np.asanyarray(nib.load(wd / "nifti_data" / row["image"]).dataobj)
        lab = np.asanyarray(nib.load(wd / "nifti_data" / row["label"]).dataobj)
        out.append((img, lab))
    return out


def test_analyze_writes_monai_stats_without_unknown(blobs_work_dir: Path) -> None:
    from monai.bundle import ConfigParser

    wd = blobs_work_dir
    assert run_analyze_entry(wd) == 0

    stats = ConfigParser.load_config_file(str(wd / "datastats.yaml"))  # MONAI's own reader
    summary = stats["stats_summary"]
    assert summary["n_cases"] == 6
    assert [int(v) for v in summary["label_stats"]["labels"]] == [0, 1, 2, 3]  # 255 is not a label
    by_case = ConfigParser.load_config_file(str(wd / "datastats_by_case.yaml"))["stats_by_cases"]
    assert len(by_case) == 6
    for row in by_case:  # the original label files, not the temporary label view
        assert Path(row["label_filepath"]).parent == wd / "nifti_data"
        assert 255 not in [int(v) for v in row["label_stats"]["labels"]]
    assert not (wd / ".analyze_tmp").exists()

    # MONAI's foreground percentiles exclude unknown voxels: compare with numpy per case
    pairs = _labels_images(wd)
    lows = [np.percentile(img[(lab >= 1) & (lab <= 3)], 0.5) for img, lab in pairs]
    ours = yaml.safe_load((wd / "datastats.yaml").read_text())["cellmap_stats"]
    assert ours["monai_foreground_percentiles"][0] == pytest.approx(np.mean(lows), rel=1e-3)
    fg = summary["image_foreground_stats"]["intensity"]  # replaced by the pooled clip below

    report = json.loads((wd / "reports" / "analysis.json").read_text())
    pooled = np.concatenate([img[(lab >= 1) & (lab <= 3)] for img, lab in pairs])
    lo, hi = report["recommended"]["intensity_clip"]
    assert lo == pytest.approx(np.percentile(pooled, 0.5), abs=1.0)  # 1-unit histogram bins
    assert hi == pytest.approx(np.percentile(pooled, 99.5), abs=1.0)
    assert [fg["percentile_00_5"], fg["percentile_99_5"]] == [lo, hi]  # what every template reads
    assert report["unknown"]["voxels"] == sum(int((lab == 255).sum()) for _, lab in pairs)
    for name in ("analysis_classes.png", "analysis_intensity.png", "analysis_geometry.png"):
        assert (wd / "reports" / name).read_bytes()[:8] == PNG
    assert "intensity clip range" in (wd / "reports" / "analysis.md").read_text()
    assert WorkDir.at(wd).marker("analyze").is_done()

    # rerun: nothing to do, nothing rewritten
    mtime = (wd / "datastats.yaml").stat().st_mtime_ns
    assert run_analyze_entry(wd) == 0
    assert (wd / "datastats.yaml").stat().st_mtime_ns == mtime


def test_report_shares_by_class_id_when_cases_lack_classes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wd = tmp_path / "w"
    # case 0 lacks class 2; class 3 never occurs: MONAI's positional pooling mixes these up
    make_blobs_dataset(
        wd, n_cases=4, shape=(24, 24, 16), n_classes=3, n_val=1, seed=3, missing={0: (2, 3), 1: (3,), 2: (3,), 3: (3,)}
    )
    (wd / "pipeline.yaml").write_text("classes: [ecs, pm, mito_mem]\nunknown_label: 255\n")
    with caplog.at_level(logging.WARNING):
        run_analyze_entry(wd)
    assert "'mito_mem' never occurs" in caplog.text

    report = json.loads((wd / "reports" / "analysis.json").read_text())
    pairs = _labels_images(wd)
    counts = np.zeros(4, dtype=np.int64)
    for _, lab in pairs:
        counts += np.bincount(lab[lab != 255].ravel(), minlength=4)[:4]
    shares = counts / counts.sum()
    got = {c["id"]: c for c in report["classes"]}
    for cid in range(4):
        assert got[cid]["voxels"] == counts[cid]
        assert got[cid]["share"] == pytest.approx(shares[cid])
    assert got[2]["cases_absent"] == ["synth_crop1"]
    assert got[3]["cases_present"] == 0
    assert report["absent_classes"] == ["mito_mem"]
    w = report["recommended"]["class_weights"]
    assert w["background"] == pytest.approx(1.0)
    assert w["pm"] == pytest.approx(shares.max() / shares[2], rel=1e-5)
    assert w["mito_mem"] is None
    assert report["recommended"]["class_weights_by_label"][3] == 1.0
    stats = yaml.safe_load((wd / "datastats.yaml").read_text())
    assert stats["stats_summary"]["label_stats"]["labels"] == [0, 1, 2]  # what MONAI saw


def test_corrupt_image_fails_naming_the_case(blobs_work_dir: Path) -> None:
    wd = blobs_work_dir
    bad = wd / "nifti_data" / "synth_crop3_image.nii.gz"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated gzip stream
    result = CliRunner().invoke(analyze_cli, ["--work-dir", str(wd)])
    assert result.exit_code == 1
    err = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "synth_crop3" in err[0]
    assert not (wd / "datastats.yaml").exists()
    marker = WorkDir.at(wd).marker("analyze").read()
    assert marker["status"] == "failed" and "synth_crop3" in marker["reason"]


def test_cases_dropped_by_monai_are_named(tmp_path: Path) -> None:
    items = [CaseItem(f"c{i}", tmp_path / f"c{i}_image.nii.gz", tmp_path / f"c{i}_label.nii.gz") for i in range(3)]
    result = {
        "failed": {},
        "by_case": [{"image_filepath": str(items[0].image)}, {"image_filepath": str(items[2].image)}],
    }
    with pytest.raises(StageFailed, match=r"c1 \(dropped by MONAI"):
        check_complete(items, result)


@pytest.mark.slow
def test_sharded_and_parallel_equal_unsharded(blobs_work_dir: Path) -> None:
    wd = blobs_work_dir
    run_analyze_entry(wd, workers=1)
    ref_stats = (wd / "datastats.yaml").read_text()
    ref_by_case = yaml.safe_load((wd / "datastats_by_case.yaml").read_text())
    ref_report = json.loads((wd / "reports" / "analysis.json").read_text())

    def same_as_reference() -> None:
        assert yaml.safe_load((wd / "datastats.yaml").read_text()) == yaml.safe_load(ref_stats)
        assert yaml.safe_load((wd / "datastats_by_case.yaml").read_text()) == ref_by_case
        rep = json.loads((wd / "reports" / "analysis.json").read_text())
        rep.pop("generated_at"), ref_report.pop("generated_at", None)
        assert rep == ref_report

    for p in ("datastats.yaml", "datastats_by_case.yaml"):
        (wd / p).unlink()
    cfg = load_config(wd)
    w = WorkDir.at(wd)
    for i in range(3):
        run_analyze(w, cfg, shard=(i, 3))
    assert sorted(p.name for p in (wd / "analyze_shards" / "n3").iterdir()) == [
        "datastats_by_case_0.yaml",
        "datastats_by_case_1.yaml",
        "datastats_by_case_2.yaml",
        "shard_0.json",
        "shard_1.json",
        "shard_2.json",
    ]
    run_analyze(w, cfg, merge=True)
    same_as_reference()

    run_analyze(w, cfg, workers=2, force=True)  # two processes, merged the same way
    same_as_reference()


def test_merge_without_shards_and_bad_flags_are_one_line_errors(blobs_work_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(analyze_cli, ["--work-dir", str(blobs_work_dir), "--merge"])
    assert r.exit_code == 2 and "no shard results" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(analyze_cli, ["--work-dir", str(blobs_work_dir), "--shard", "3/2"])
    assert r.exit_code == 2 and "--shard 3/2" in r.stderr
    # one shard of two is not enough to merge
    assert runner.invoke(analyze_cli, ["--work-dir", str(blobs_work_dir), "--shard", "0/2"]).exit_code == 0
    r = runner.invoke(analyze_cli, ["--work-dir", str(blobs_work_dir), "--merge"])
    assert r.exit_code == 2 and "shards [1] of 2" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(analyze_cli, ["--work-dir", str(empty)])
    assert r.exit_code == 2 and "datalist.json: datalist not found" in r.stderr
    shutil.rmtree(empty)


def test_foreground_empty_case_does_not_move_the_clip_and_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A case without class voxels: MONAI's mean of per-case percentiles drops, ours does not."""
    yaml_text = "classes: [ecs, pm, mito_mem]\nunknown_label: 255\n"
    ref, with_empty = tmp_path / "ref", tmp_path / "empty"
    # same seed: the first three cases are identical, the fourth holds background and unknown only
    make_blobs_dataset(ref, n_cases=3, shape=(24, 24, 16), n_classes=3, n_val=1, seed=5)
    make_blobs_dataset(with_empty, n_cases=4, shape=(24, 24, 16), n_classes=3, n_val=1, seed=5, missing={3: (1, 2, 3)})
    for wd in (ref, with_empty):
        (wd / "pipeline.yaml").write_text(yaml_text)
    run_analyze_entry(ref)
    with caplog.at_level(logging.WARNING):
        run_analyze_entry(with_empty)
    assert "no class voxel" in caplog.text and "synth_crop4" in caplog.text

    r0 = json.loads((ref / "reports" / "analysis.json").read_text())
    r1 = json.loads((with_empty / "reports" / "analysis.json").read_text())
    assert r1["foreground_empty_cases"] == ["synth_crop4"] and r0["foreground_empty_cases"] == []
    assert r1["recommended"]["intensity_clip"] == r0["recommended"]["intensity_clip"]
    assert "synth_crop4" in (with_empty / "reports" / "analysis.md").read_text()
    s1 = yaml.safe_load((with_empty / "datastats.yaml").read_text())
    # what the templates read is the pooled clip; MONAI's own mean moved (kept for reference)
    fg = s1["stats_summary"]["image_foreground_stats"]["intensity"]
    assert [fg["percentile_00_5"], fg["percentile_99_5"]] == r1["recommended"]["intensity_clip"]
    monai0 = yaml.safe_load((ref / "datastats.yaml").read_text())["cellmap_stats"]["monai_foreground_percentiles"]
    monai1 = s1["cellmap_stats"]["monai_foreground_percentiles"]
    assert monai1[1] < monai0[1] - 1.0  # the empty case dragged MONAI's upper bound toward 0
    assert s1["cellmap_stats"]["foreground_empty_cases"] == ["synth_crop4"]
