"""convert refuses bad inputs per crop and stops on a broken environment (issue 12, convert side)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from common.config import load_config
from common.errors import StageFailed
from common.ngff import NgffError, read_multiscales
from common.workdir import WorkDir
from stages.convert import run_convert
from stages.convert.crops import discover_crops
from tools.synthetic_cellmap import DATASET, GT_GROUP, SyntheticInfo, make_synthetic_cellmap

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "er_mem", "nuc"]


@pytest.fixture()
def synth(tmp_path: Path) -> SyntheticInfo:
    return make_synthetic_cellmap(tmp_path / "data")


def _gt(info: SyntheticInfo) -> Path:
    return info.root / DATASET / f"{DATASET}.zarr" / GT_GROUP


def _convert(info: SyntheticInfo, tmp: Path, crops: list[str], **keys: object):
    """Convert ``crops`` plus crop1 (a good one, so the stage itself succeeds); records of ``crops`` only."""
    wd = WorkDir.at(tmp / "w").ensure()
    cfg = load_config(
        wd.root,
        None,
        {
            "data_root": str(info.root),
            "resolution_nm": 4,
            "classes": CLASSES,
            "crops": [*crops, "1"],
            "convert": {"max_failed_fraction": 1.0},
            **keys,
        },
    )
    summary = run_convert(cfg, wd, workers=1, progress=False)
    return wd, [r for r in summary.records if r["crop"] in crops]


def _rewrite(arr_dir: Path, data: np.ndarray) -> None:
    """Replace a label array's data (and dtype) in place, keeping its attributes."""
    attrs = json.loads((arr_dir / ".zattrs").read_text()) if (arr_dir / ".zattrs").exists() else None
    shutil.rmtree(arr_dir)
    a = zarr.open_array(
        str(arr_dir), mode="w", shape=data.shape, chunks=data.shape, dtype=data.dtype, dimension_separator="/"
    )
    a[...] = data
    if attrs:
        a.attrs.update(attrs)


def test_crop_names_and_level_paths_stay_inside_their_group(synth: SyntheticInfo, tmp_path: Path) -> None:
    gt = _gt(synth)
    shutil.copytree(gt / "crop2", gt / "crop12\n")
    assert "12" not in {r.crop for r in discover_crops(synth.root)}  # fullmatch: a trailing newline is no crop
    attrs_path = gt / "crop2" / "ecs" / ".zattrs"
    attrs = json.loads(attrs_path.read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "../../crop1/all/s0"
    attrs_path.write_text(json.dumps(attrs))
    with pytest.raises(NgffError, match="not an array of this group"):
        read_multiscales(gt / "crop2" / "ecs")
    _, recs = _convert(synth, tmp_path, ["2"])
    assert recs[0]["status"] == "failed" and "not an array of this group" in recs[0]["reason"]


@pytest.mark.parametrize("kind", ["int16", "float", "nan", "f8-over-u8", "id-200", "wide-id"])
def test_label_dtypes_and_values_outside_the_encoding_fail_the_crop(
    synth: SyntheticInfo, tmp_path: Path, kind: str
) -> None:
    a = synth.labels["2"]["all"][0]
    s0 = _gt(synth) / "crop2" / "all" / "s0"
    want = "expected unsigned integers"
    if kind == "int16":
        _rewrite(s0, np.where(a == 1, -255, a).astype(np.int16))
    elif kind == "float":
        _rewrite(s0, np.where(a == 1, 1.7, a).astype(np.float64))
    elif kind == "nan":
        _rewrite(s0, np.where(a == 1, np.nan, a).astype(np.float32))
    elif kind == "f8-over-u8":  # metadata lies about the chunks
        meta = json.loads((s0 / ".zarray").read_text())
        meta["dtype"] = "<f8"
        (s0 / ".zarray").write_text(json.dumps(meta))
    elif kind == "id-200":
        _rewrite(s0, np.where(a == 1, 200, a).astype(np.uint8))
        want = "ids outside the class table: [200]"
    else:
        _rewrite(s0, np.where(a == 1, 300, a.astype(np.uint16)))
        want = "ids outside the class table: [300]"
    _, recs = _convert(synth, tmp_path, ["2"])
    rec = recs[0]
    assert rec["status"] == "failed" and want in rec["reason"], rec


def test_semantic_values_outside_the_encoding_fail_the_crop(synth: SyntheticInfo, tmp_path: Path) -> None:
    ecs = synth.labels["6"]["ecs"][0]
    _rewrite(_gt(synth) / "crop6" / "ecs" / "s0", np.where(ecs == 1, 7, ecs).astype(np.uint8))
    _, recs = _convert(synth, tmp_path, ["6"])
    rec = recs[0]
    assert rec["status"] == "failed" and "outside the semantic encoding {0, 1, 255}: [7]" in rec["reason"]


def test_a_declared_huge_label_is_refused_before_allocating(synth: SyntheticInfo, tmp_path: Path) -> None:
    """4000^3 label voxels (EM metadata big enough): refused from the available memory, nothing read."""
    zroot = synth.root / DATASET / f"{DATASET}.zarr"
    em = zroot / "recon-1/em/fibsem-uint8"
    for lv in ("s0", "s1", "s2"):  # metadata only: a huge, never-fetched EM
        meta = json.loads((em / lv / ".zarray").read_text())
        meta["shape"] = [8192, 8192, 8192]
        (em / lv / ".zarray").write_text(json.dumps(meta))
    s0 = _gt(synth) / "crop2" / "all" / "s0"
    for arr in (s0, _gt(synth) / "crop2" / "ecs" / "s0", _gt(synth) / "crop2" / "pm" / "s0"):
        meta = json.loads((arr / ".zarray").read_text())
        meta["shape"] = [4000, 4000, 4000]
        (arr / ".zarray").write_text(json.dumps(meta))
    _, recs = _convert(synth, tmp_path, ["2"])
    rec = recs[0]
    assert rec["status"] == "failed" and "too large" in rec["reason"] and "GiB available" in rec["reason"], rec


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EACCES])
def test_storage_errors_stop_the_stage(
    synth: SyntheticInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    import stages.convert.crops as crops

    def broken(path: object, *args: object, **kwargs: object) -> int:
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(crops, "write_nifti_gz", broken)
    with pytest.raises(StageFailed, match="a storage or permission error stops the stage"):
        _convert(synth, tmp_path, ["2", "6"])
    assert WorkDir.at(tmp_path / "w").marker("convert").status == "failed"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_pool_workers_die_with_their_parent(tmp_path: Path) -> None:
    data = make_synthetic_cellmap(tmp_path / "data", small=False, n_extra_crops=8, size=64)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("resolution_nm: 4\nclasses: [ecs, pm, mito_mem, mito_lum]\nconvert: {compress_level: 9}\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.convert",
            "--work-dir",
            str(tmp_path / "w"),
            "--config",
            str(cfg),
            "--data-root",
            str(data.root),
            "--workers",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.01)
    assert len(workers) >= 2, "the pool never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "pool workers outlived the killed convert process"
