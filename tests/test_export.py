"""Challenge export round trip on the synthetic CellMap fixture's two-crop manifest."""

from __future__ import annotations

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
    from common.synthetic_cellmap import make_synthetic_cellmap

    return make_synthetic_cellmap(tmp_path_factory.mktemp("data") / "root")


def _expected_labels(em: np.ndarray) -> np.ndarray:
    """Label of each EM value under :func:`band_factory`: intensity bands of 8 grey values."""
    return (em.astype(np.int64) // 8) % (len(CLASSES) + 1)


def band_factory(member, wd, cfg):  # noqa: ANN001, ANN201
    """A position-sensitive predictor: soft one-hot of the intensity band (fine-grained, so
    every class occurs in a small crop and a wrong cut changes the masks)."""
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


def test_export_round_trip(cellmap_root, tmp_path: Path) -> None:  # noqa: ANN001
    info = cellmap_root
    manifest = tmp_path / "test_crop_manifest.csv"
    text = info.manifest.read_text()
    # a third crop at a voxel size no EM level has: it must fail with a reason, the others not
    manifest.write_text(text.rstrip("\n") + "\n903,jrc_synth-1,ecs,[5;5;5],[100;100;100],[4;4;4]\n")
    rows = read_manifest(manifest)
    assert len(rows) == 3 and len({r.voxel_size for r in rows}) == 3

    wd = WorkDir.at(tmp_path / "work").ensure()
    # trained at 4 nm = EM s0: crop901 (EM s0 voxel) is cut exactly; crop902 (EM s1 voxel) is
    # predicted on EM s0 and mapped back to its manifest grid
    wd.config_file.write_text(f"classes: [{', '.join(CLASSES)}]\ndata_root: {info.root}\nresolution_nm: 4\n")
    add_trained_bundle(wd, "segresnet_0", 0.9)
    add_trained_bundle(wd, "dints_0", 0.8)
    cfg = load_config(wd.root)
    summary = run_export(cfg, wd, manifest, predictor_factory=band_factory)
    assert summary["n_written"] == 2
    assert list(summary["failed"]) == ["crop903"]
    assert "no EM level at voxel size [5, 5, 5]" in summary["failed"]["crop903"]
    assert wd.marker("ensemble.export").status == "failed"

    store = zarr.open_group(str(wd.root / "submission" / "submission.zarr"), mode="r")
    assert sorted(store.group_keys()) == ["crop901", "crop902"]
    em_root = info.root / "jrc_synth-1" / "jrc_synth-1.zarr" / "recon-1/em/fibsem-uint8"
    for box in info.test_boxes:
        crop = store[f"crop{box['crop']}"]
        # plain single-scale arrays, listed by array_keys() as the scorer does
        assert list(crop.array_keys()) == [box["class_label"]]
        arr = crop[box["class_label"]]
        row = next(r for r in rows if r.crop == box["crop"])
        assert arr.dtype == np.uint8 and arr.shape == row.shape
        assert arr.attrs["voxel_size"] == list(row.voxel_size)
        assert arr.attrs["translation"] == list(row.translation)
        assert arr.attrs["shape"] == list(row.shape)
        got = arr[...]
        assert set(np.unique(got)) <= {0, 1}
        em = zarr.open_array(str(em_root / box["em_level"]), mode="r")
        block = em[tuple(slice(a, b) for a, b in box["em_cut"])]
        cls = CLASSES.index(box["class_label"]) + 1
        if box["em_level"] == "s0":
            # exact cut at the manifest place: the mask is the prediction on exactly that EM
            want = (_expected_labels(block) == cls).astype(np.uint8)
            assert want.any() and not want.all()  # the check can tell a wrong place
            np.testing.assert_array_equal(got, want)
            # one voxel off along z would not match
            shifted = em[tuple(slice(a + (i == 0), b + (i == 0)) for i, (a, b) in enumerate(box["em_cut"]))]
            assert not np.array_equal(got, _expected_labels(shifted) == cls)
        else:
            # predicted on EM s0 (2x finer): each manifest voxel covers 2x2x2 s0 voxels and takes
            # the label of one of them
            assert "EM s0" in summary["inputs"][f"crop{box['crop']}"]
            s0 = zarr.open_array(str(em_root / "s0"), mode="r")
            fine = _expected_labels(s0[tuple(slice(2 * a, 2 * b) for a, b in box["em_cut"])]) == cls
            nz, ny, nx = got.shape
            cells = fine.reshape(nz, 2, ny, 2, nx, 2)
            assert ((got == 1) <= cells.any(axis=(1, 3, 5))).all()
            assert ((got == 0) <= (~cells).any(axis=(1, 3, 5))).all()
            assert got.any()

    # export_at: manifest predicts crop902 on its own grid (EM s1), exactly
    with open(wd.config_file, "a") as fh:
        fh.write("ensemble: {export_at: manifest}\n")
    summary = run_export(load_config(wd.root), wd, manifest, predictor_factory=band_factory)
    box = info.test_boxes[1]
    em = zarr.open_array(str(em_root / box["em_level"]), mode="r")
    block = em[tuple(slice(a, b) for a, b in box["em_cut"])]
    got = zarr.open_array(str(wd.root / "submission" / "submission.zarr" / "crop902" / "nuc"), mode="r")[...]
    np.testing.assert_array_equal(got, (_expected_labels(block) == CLASSES.index("nuc") + 1).astype(np.uint8))

    with zipfile.ZipFile(wd.root / "submission" / "submission.zip") as zf:
        names = zf.namelist()
    assert "submission.zarr/crop901/ecs/.zarray" in names
    assert "submission.zarr/crop902/nuc/.zattrs" in names


def test_export_cli_bad_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("crop,dataset\n1,x\n")
    wd = tmp_path / "w"
    wd.mkdir()
    res = subprocess.run([sys.executable, "-m", "stages.ensemble.export", "--work-dir", str(wd),
                          "--manifest", str(bad), "--data-root", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    assert res.returncode == 2
    assert "header must be crop_name,dataset" in res.stderr
