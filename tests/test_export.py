"""Challenge export round trip on the synthetic CellMap fixture's two-crop manifest.

A position-sensitive predictor of image *files* (what a bundle's InferClass is) goes
through the NIfTI window adapter, so axis order, affine and block seams are checked
against an independent numpy computation on the EM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from common.config import load_config
from common.workdir import WorkDir
from stages.ensemble.export import read_manifest, run_export
from tests.test_ensemble import add_trained_bundle

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ecs", "pm", "nuc"]


@pytest.fixture(scope="module")
def cellmap_root(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from tools.synthetic_cellmap import make_synthetic_cellmap

    return make_synthetic_cellmap(tmp_path_factory.mktemp("data") / "root")


def _expected_labels(em: np.ndarray) -> np.ndarray:
    """Label of each EM value under :func:`band_factory`: intensity bands of 8 grey values."""
    return (np.rint(em).astype(np.int64) // 8) % (len(CLASSES) + 1)


def band_factory(member, wd, cfg):  # noqa: ANN001, ANN201
    """Soft one-hot of the intensity band, from the NIfTI file it is given ([C, X, Y, Z])."""
    n = cfg.output_classes

    def predict(image: Path) -> np.ndarray:
        import nibabel as nib

        img = np.asarray(nib.load(str(image)).dataobj)
        lab = _expected_labels(img)
        p = np.full((n, *img.shape), 0.1 / (n - 1), dtype=np.float32)
        for c in range(n):
            p[c][lab == c] = 0.9
        return p

    return predict


def _work_dir(tmp_path: Path, data_root: Path) -> WorkDir:
    wd = WorkDir.at(tmp_path / "work").ensure()
    # today's resolution_nm differs from the bundles' record: the record wins
    wd.config_file.write_text(
        f"classes: [{', '.join(CLASSES)}]\ndata_root: {data_root}\nresolution_nm: 8\n"
        "ensemble: {export_block: 8, export_halo: 2}\n"
    )
    for name, score in (("segresnet_0", 0.9), ("dints_0", 0.8)):
        add_trained_bundle(wd, name, score)
        (wd.root / name / "cellmap_bundle.json").write_text(json.dumps({"resolution_nm": [6, 4, 4]}))
    return wd


def test_export_round_trip(cellmap_root, tmp_path: Path) -> None:  # noqa: ANN001
    info = cellmap_root
    manifest = tmp_path / "test_crop_manifest.csv"
    text = info.manifest.read_text()
    # crop903 does not lie on EM s0 edges: it fails with the reason, the others are written
    manifest.write_text(text.rstrip("\n") + "\n903,jrc_synth-1,ecs,[5;5;5],[100;100;100],[4;4;4]\n")
    rows = read_manifest(manifest)
    assert len(rows) == 3
    wd = _work_dir(tmp_path, info.root)
    summary = run_export(load_config(wd.root), wd, manifest, predictor_factory=band_factory)
    assert summary["n_written"] == 2
    assert list(summary["failed"]) == ["crop903/ecs"] and "off-grid" in summary["failed"]["crop903/ecs"]
    assert wd.marker("ensemble.export").status == "failed"
    assert summary["training_resolution_nm"] == [6.0, 4.0, 4.0]

    store = zarr.open_group(str(wd.root / "submission" / "submission.zarr"), mode="r")
    assert sorted(store.group_keys()) == ["crop901", "crop902"]
    s0 = zarr.open_array(str(info.root / "jrc_synth-1" / "jrc_synth-1.zarr" / "recon-1/em/fibsem-uint8/s0"), mode="r")
    for box in info.test_boxes:
        crop = store[f"crop{box['crop']}"]
        assert list(crop.array_keys()) == [box["class_label"]]
        arr = crop[box["class_label"]]
        row = next(r for r in rows if r.crop == box["crop"])
        assert arr.shape == row.shape
        # nuc is an instance class: connected-component ids, never uint8
        assert arr.dtype == (np.uint16 if box["class_label"] == "nuc" else np.uint8)
        assert (arr.attrs["voxel_size"], arr.attrs["translation"], arr.attrs["shape"]) == (
            list(row.voxel_size),
            list(row.translation),
            list(row.shape),
        )
        got = (arr[...] > 0).astype(np.uint8)
        cls = CLASSES.index(box["class_label"]) + 1
        if box["em_level"] == "s0":
            # the manifest grid is the training grid: the mask is the prediction on exactly that EM
            block = s0[tuple(slice(a, b) for a, b in box["em_cut"])]
            want = (_expected_labels(block) == cls).astype(np.uint8)
            assert want.any() and not want.all()
            np.testing.assert_array_equal(got, want)
            shifted = s0[tuple(slice(a + (i == 0), b + (i == 0)) for i, (a, b) in enumerate(box["em_cut"]))]
            assert not np.array_equal(got, _expected_labels(shifted) == cls)
        else:
            # 2x coarser: the footprint average of the 2x2x2 training voxels' probabilities, then
            # argmax (= the band with most votes, ties to the lower label)
            fine = _expected_labels(s0[tuple(slice(2 * a, 2 * b) for a, b in box["em_cut"])])
            nz, ny, nx = got.shape
            votes = np.stack(
                [(fine == c).reshape(nz, 2, ny, 2, nx, 2).sum(axis=(1, 3, 5)) for c in range(len(CLASSES) + 1)]
            )
            want = (votes.argmax(0) == cls).astype(np.uint8)
            assert want.any()
            np.testing.assert_array_equal(got, want)
            assert "block mean" not in summary["inputs"][f"crop{box['crop']}"]  # s0 is the training grid
    with zipfile.ZipFile(wd.root / "submission" / "submission.zip") as zf:
        names = zf.namelist()
    assert "submission.zarr/crop901/ecs/.zarray" in names
    assert "submission.zarr/crop902/nuc/.zattrs" in names


def test_export_cli_bad_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("crop,dataset\n1,x\n")
    wd = tmp_path / "w"
    wd.mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.ensemble.export",
            "--work-dir",
            str(wd),
            "--manifest",
            str(bad),
            "--data-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ},
    )
    assert res.returncode == 2
    assert "header must be crop_name,dataset" in res.stderr


def test_export_cli_unknown_member_is_bad_input(cellmap_root, tmp_path: Path) -> None:  # noqa: ANN001
    wd = _work_dir(tmp_path, cellmap_root.root)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.ensemble",
            "--work-dir",
            str(wd.root),
            "--skip-ensemble",
            "--export-submission",
            str(cellmap_root.manifest),
            "--members",
            "swinunetr_0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 2, res.stderr
    assert "--members: swinunetr_0 is not a trained bundle" in res.stderr
