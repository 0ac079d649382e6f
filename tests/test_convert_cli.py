"""convert as a command: exit codes, shards + merge, SIGKILL then rerun, the split."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.config import load_config
from common.io import TMP_MARK, read_json
from common.workdir import WorkDir
from stages.convert import run_convert
from stages.convert.split import update_split
from tools.synthetic_cellmap import SyntheticInfo, make_synthetic_cellmap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticInfo:
    return make_synthetic_cellmap(tmp_path_factory.mktemp("cellmap") / "data")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stages.convert", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _outputs(wd: Path) -> dict[str, bytes]:
    """Every file a user reads: NIfTI pairs, datalist, split, report."""
    files = [*(wd / "nifti_data").glob("*"), wd / "reports" / "convert.json"]
    return {p.name: p.read_bytes() for p in files if p.is_file()}


# ---- exit codes -------------------------------------------------------------------------
def _one_error_line(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error: convert:")]
    assert len(errs) == 1, res.stderr
    for n in needles:
        assert n in errs[0], errs[0]


def test_bad_inputs_exit_2_with_one_line(synth: SyntheticInfo, tmp_path: Path) -> None:
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("resolution_nm: 4\nclasess: [ecs]\n")
    _one_error_line(
        _cli("--work-dir", str(tmp_path / "w1"), "--config", str(bad_cfg), "--data-root", str(synth.root)),
        "bad.yaml",
        "unknown key 'clasess'",
    )
    _one_error_line(
        _cli("--work-dir", str(tmp_path / "w2"), "--data-root", str(tmp_path / "nope")), "nope", "data_root not found"
    )
    (tmp_path / "empty").mkdir()
    _one_error_line(_cli("--work-dir", str(tmp_path / "w3"), "--data-root", str(tmp_path / "empty")), "no crops found")
    (tmp_path / "afile").write_text("x")
    _one_error_line(
        _cli("--work-dir", str(tmp_path / "afile" / "w"), "--data-root", str(synth.root)), "work dir is not writable"
    )
    cc = tmp_path / "cc.yaml"
    cc.write_text("convert: {compress_level: 12}\n")
    _one_error_line(
        _cli("--work-dir", str(tmp_path / "w5"), "--config", str(cc), "--data-root", str(synth.root)), "compress_level"
    )


def test_no_crop_converted_exits_1_with_report(synth: SyntheticInfo, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("resolution_nm: 4\ncrops: [4, 8]\n")
    res = _cli(
        "--work-dir", str(tmp_path / "w"), "--config", str(cfg), "--data-root", str(synth.root), "--workers", "1"
    )
    assert res.returncode == 1, res.stderr
    assert "0 converted" in res.stdout and "crop8: off-grid" in res.stdout
    assert read_json(tmp_path / "w/reports/convert.json")["counts"]["failed"] == 2


def test_plan_writes_nothing_and_the_budget_fails_the_stage(synth: SyntheticInfo, tmp_path: Path) -> None:
    import json

    wd = tmp_path / "w"
    plan = _cli("--work-dir", str(wd), "--data-root", str(synth.root), "--plan", "--plan-json", "-")
    assert plan.returncode == 0, plan.stderr
    rows = {r["crop"]: r for r in json.loads(plan.stdout)["crops"]}
    assert (
        rows["1"]["status"] == "convert"
        and rows["1"]["em_factor"] == [2, 2, 2]
        and rows["1"]["label_factor"] == [4, 4, 4]
    )
    assert rows["5"]["status"] == "failed" and "never fetched" in rows["5"]["reason"]
    assert rows["3"]["status"] == "skipped"
    assert not wd.exists()  # no work dir, no pipeline.yaml, no log
    table = _cli("--work-dir", str(wd), "--data-root", str(synth.root), "--plan")
    assert table.returncode == 0 and "OVER the 2 % budget" in table.stdout and "jrc_synth-1_crop1 " in table.stdout
    assert not wd.exists()
    res = _cli("--work-dir", str(wd), "--data-root", str(synth.root), "--workers", "1")
    assert res.returncode == 1, res.stderr
    assert "convert.max_failed_fraction 2 %" in res.stderr and "crop8: off-grid" in res.stdout
    assert (wd / "nifti_data" / "datalist.json").is_file()


# ---- shards -----------------------------------------------------------------------------
def test_shards_then_merge_equal_one_run(synth: SyntheticInfo, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    # the fixture holds 7 deliberately malformed crops: lift the failure budget
    cfg.write_text(
        "resolution_nm: 4\nclasses: [ecs, pm, mito_mem, mito_lum, mito_ribo, er_mem, nuc]\n"
        "convert: {max_failed_fraction: 1.0}\n"
    )
    common = ["--config", str(cfg), "--data-root", str(synth.root)]
    one = _cli("--work-dir", str(tmp_path / "one"), *common, "--workers", "2")
    assert one.returncode == 0, one.stderr
    for i in range(3):
        res = _cli("--work-dir", str(tmp_path / "sh"), *common, "--shard", f"{i}/3", "--workers", "1")
        assert res.returncode == 0, res.stderr
        assert not (tmp_path / "sh/nifti_data/datalist.json").exists()
        assert WorkDir.at(tmp_path / "sh").marker(f"convert.shard-{i}-of-3").is_done()
    merged = _cli("--work-dir", str(tmp_path / "sh"), *common, "--merge")
    assert merged.returncode == 0, merged.stderr
    assert "(0 now)" in merged.stdout  # the shards did all the work
    assert _outputs(tmp_path / "sh") == _outputs(tmp_path / "one")
    assert (tmp_path / "sh/nifti_data/datalist.json").read_bytes() == (
        tmp_path / "one/nifti_data/datalist.json"
    ).read_bytes()


# ---- SIGKILL mid-way, then rerun -----------------------------------------------------------
@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    data = make_synthetic_cellmap(tmp_path / "data", small=False, n_extra_crops=6, size=80)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("resolution_nm: 4\nclasses: [ecs, pm, mito_mem, mito_lum]\nconvert: {compress_level: 9}\n")
    ref = WorkDir.at(tmp_path / "ref").ensure()
    run_convert(load_config(ref.root, cfg, {"data_root": str(data.root)}), ref, workers=1, progress=False)

    wd = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "stages.convert",
        "--work-dir",
        str(wd),
        "--config",
        str(cfg),
        "--data-root",
        str(data.root),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    nifti, records = wd / "nifti_data", wd / "markers" / "convert"
    seen_tmp = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        # kill while a file is being written, once at least one crop is complete
        if records.is_dir() and any(records.iterdir()) and any(p.name.startswith(TMP_MARK) for p in nifti.iterdir()):
            seen_tmp = True
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "convert finished before it could be killed"
    assert seen_tmp
    finals = [p for p in nifti.glob("*.nii.gz") if not p.name.startswith(TMP_MARK)]
    assert 0 < len(finals) < 12  # mid-way: some crops written, not all
    for p in finals:  # no partial file under a final name
        assert np.asarray(nib.load(str(p)).dataobj).size > 0
    assert not (nifti / "datalist.json").exists()
    assert WorkDir.at(wd).marker("convert").status == "running"

    res = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert res.returncode == 0, res.stderr
    assert not [p for p in nifti.iterdir() if p.name.startswith(TMP_MARK)]
    assert _outputs(wd) == _outputs(ref.root)


# ---- the split ------------------------------------------------------------------------------
def _cases(names: list[str]) -> list[tuple[str, str, str]]:
    return [(f"ds_crop{n}", "ds", n) for n in names]


def test_split_is_stored_and_adding_crops_never_reshuffles(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, None, {"split": {"validation_fraction": 0.3, "seed": 7}}, dump=False)
    path = tmp_path / "split.json"
    first = update_split(path, _cases([str(i) for i in range(10)]), cfg)
    assert 0 in first.values() and 1 in first.values()
    more = update_split(path, _cases([str(i) for i in range(25)]), cfg)
    assert {k: more[k] for k in first} == first
    cfg.split.seed = 8  # a changed config does not silently reshuffle a stored split
    assert update_split(path, _cases([str(i) for i in range(25)]), cfg) == more


def test_kfold_and_two_crops_get_a_validation_fold(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, None, {"num_folds": 3}, dump=False)
    folds = update_split(tmp_path / "k.json", _cases([str(i) for i in range(9)]), cfg)
    assert sorted(folds.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    cfg1 = load_config(tmp_path, None, {"split": {"validation_fraction": 0.0}}, dump=False)
    assert sorted(update_split(tmp_path / "d.json", _cases(["1", "2"]), cfg1).values()) == [0, 1]


def test_datasplit_csv(tmp_path: Path) -> None:
    csv = tmp_path / "datasplit.csv"
    csv.write_text(
        '"train","/d/ds/ds.zarr","recon-1/em/fibsem-uint8","/d/ds/ds.zarr","recon-1/labels/groundtruth/crop1/[ecs,pm]"\n'
        '"validate","/d/ds/ds.zarr","recon-1/em/fibsem-uint8","/d/ds/ds.zarr","recon-1/labels/groundtruth/crop2/[ecs]"\n'
    )
    cfg = load_config(tmp_path, None, {"split": {"datasplit_csv": str(csv)}}, dump=False)
    folds = update_split(tmp_path / "s.json", _cases(["1", "2", "3"]), cfg)
    assert folds == {"ds_crop1": 1, "ds_crop2": 0, "ds_crop3": None}
    csv.write_text('"train","a","b"\n')
    from common.errors import PipelineError

    with pytest.raises(PipelineError, match="datasplit.csv:1"):
        update_split(tmp_path / "t.json", _cases(["1"]), cfg)
