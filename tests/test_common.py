"""Config model, work_dir markers, atomic writes and the class mapping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.classes import DEFAULT_CLASSES, LabelMapping, check_class_names
from common.config import load_config
from common.errors import ConfigError
from common.io import atomic_path, atomic_write_json, remove_stale_tmp
from common.workdir import WorkDir

ROOT = Path(__file__).resolve().parents[1]


# ---- config -------------------------------------------------------------------------
def test_defaults_are_dumped_once_and_reused(tmp_path: Path) -> None:
    cfg = load_config(tmp_path)
    assert cfg.classes == list(DEFAULT_CLASSES) and cfg.output_classes == 15
    assert cfg.unknown_label == 255 and cfg.modality == "EM" and cfg.num_folds == 1
    dumped = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    assert dumped["classes"] == list(DEFAULT_CLASSES)
    # a later stage with a CLI override sees the file plus the flag, and does not rewrite it
    before = (tmp_path / "pipeline.yaml").read_bytes()
    cfg2 = load_config(tmp_path, overrides={"resolution_nm": [4, 4, 4], "data_root": None})
    assert cfg2.resolution_zyx == (4.0, 4.0, 4.0)
    assert (tmp_path / "pipeline.yaml").read_bytes() == before


def test_precedence_file_then_config_then_cli(tmp_path: Path) -> None:
    (tmp_path / "pipeline.yaml").write_text("resolution_nm: 8\nclasses: [ecs, pm]\ntrain: {num_epochs: 5}\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("resolution_nm: 4\ntrain: {batch_size: 2}\nsplit: {seed: 7}\n")
    cfg = load_config(tmp_path, extra, overrides={"target_gpu_mem_gb": 80})
    assert cfg.resolution_zyx == (None, 4.0, 4.0)
    assert cfg.classes == ["ecs", "pm"] and cfg.output_classes == 3
    assert cfg.train.given() == {"num_epochs": 5, "batch_size": 2}
    assert cfg.split.seed == 7 and cfg.split.validation_fraction == 0.15
    assert cfg.target_gpu_mem_gb == 80.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("resolutoin_nm: 8\n", "unknown key 'resolutoin_nm'"),
        ("resolution_nm: eight\n", "'resolution_nm' must be"),
        ("resolution_nm: [4, 4]\n", "one number or [z, y, x]"),
        ("classes: [ecs, mitochondria]\n", "unknown CellMap class 'mitochondria'"),
        ("classes: [mito, mito_mem]\n", "overlap"),
        ("unknown_label: 3\n", "'unknown_label' must be 0"),
        ("num_folds: two\n", "'num_folds' must be int"),
        ("split: {validation_fraction: 1.5}\n", "validation_fraction"),
        ("split: {sead: 1}\n", "unknown key 'split.sead'"),
        ("algos: [segresnet, unet]\n", "unknown algorithm"),
        ("train: [1, 2]\n", "'train' must be dict"),
        ("resolution_nm: [8\n", "invalid YAML at line"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "wd", f)
    msg = str(exc.value)
    assert fragment in msg and str(f) in msg and "\n" not in msg
    assert not (tmp_path / "wd" / "pipeline.yaml").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path, tmp_path / "nope.yaml")


# ---- atomic writes and markers --------------------------------------------------------
def test_atomic_path_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_killed_writer_leaves_no_partial_final_file(tmp_path: Path) -> None:
    target = tmp_path / "big.json"
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from common.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()
    assert remove_stale_tmp(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_marker_lifecycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    wd = WorkDir.at(tmp_path).ensure()
    m = wd.marker("train.dints_0")
    assert m.status is None and not m.is_done()
    m.start("abc", algo="dints")
    data = m.read()
    assert data["status"] == "running" and data["end"] is None
    assert data["slurm"]["slurm_job_id"] == "4242" and data["versions"]["python"]
    m.done(best_metric=0.8)
    data = m.read()
    assert data["status"] == "done" and data["end"] and data["duration_s"] >= 0
    assert data["details"] == {"algo": "dints", "best_metric": 0.8}
    assert m.is_done("abc") and not m.is_done("other")
    m2 = wd.marker("convert")
    m2.start("d")
    m2.fail("crop7: unreadable chunk\ntraceback...")
    assert m2.read()["reason"] == "crop7: unreadable chunk"
    assert [x.name for x in wd.markers()] == ["convert", "train.dints_0"]


def test_unwritable_work_dir_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/cellmap-not-writable")  # root ignores permission bits
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = ro / "wd"
    from common.errors import PipelineError

    with pytest.raises(PipelineError, match="work dir is not writable"):
        WorkDir.at(target).ensure()


def test_atomic_json_roundtrip(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a" / "b.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"a": [1, 2], "b": 1}


# ---- classes --------------------------------------------------------------------------
def test_all_map_ids_map_by_atom_sets() -> None:
    m = LabelMapping(DEFAULT_CLASSES, unknown_label=255)
    lut = m.lookup_table()
    nuc = DEFAULT_CLASSES.index("nuc") + 1
    assert lut[0] == 0
    assert lut[1] == 1 and lut[3] == 3 and lut[17] == DEFAULT_CLASSES.index("er_lum") + 1
    for nuc_part in (20, 25, 29, 37, 52, 53, 54, 65):  # atoms and groups inside nuc
        assert lut[nuc_part] == nuc, nuc_part
    for spanning in (40, 41, 42, 50, 51, 60, 64, 255):  # groups spanning classes -> unknown
        assert lut[spanning] == 255, spanning
    for outside in (35, 55, 12, 46):  # cyto, mt, lyso_mem, eres -> background
        assert lut[outside] == 0, outside
    assert lut[200] == 255  # not in the table: never silently background


def test_unknown_folded_into_background() -> None:
    lut = LabelMapping(("mito_mem", "mito_lum", "mito_ribo"), unknown_label=0).lookup_table()
    assert lut[50] == 0 and lut[3] == 1 and lut[5] == 3
    # with all three mito parts configured, group 50 lies inside no single class: unknown (=0 here)
    lut2 = LabelMapping(("mito",), unknown_label=255).lookup_table()
    assert lut2[50] == 1 and lut2[3] == 1 and lut2[60] == 255


def test_class_name_checks() -> None:
    check_class_names(list(DEFAULT_CLASSES))
    with pytest.raises(ValueError, match="overlap"):
        check_class_names(["nuc", "ne_mem"])
    with pytest.raises(ValueError, match="unknown"):
        check_class_names(["ecs", "foo"])
    assert np.unique(LabelMapping(DEFAULT_CLASSES).lookup_table()).size > 3
