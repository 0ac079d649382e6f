"""``stages.predict``: block-wise prediction of a zarr ROI or a NIfTI volume (shared engine with the export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from common.errors import PipelineError
from common.nifti import save_nifti, zyx_to_affine
from common.workdir import WorkDir
from stages.predict.predict import run_predict
from tests.export_realgeom import em_value
from tests.test_ensemble import add_trained_bundle

ROOT = Path(__file__).resolve().parents[1]
E0 = (3.48, 4.0, 4.0)  # jrc_ctl-id8-1's EM s0: anisotropic z, training grid 6.96/8/8
SHAPE = (36, 50, 44)


def band(bundle: Path, wd: WorkDir):  # noqa: ANN201
    """Pointwise predictor: softmax over distance to 3 grey levels (no context: seams are exact)."""
    levels = np.array([90, 130, 170], dtype=np.float32)

    def predict(em: np.ndarray, win) -> np.ndarray:  # noqa: ANN001
        p = np.stack([-((em - lv) ** 2) / 300.0 for lv in levels]).astype(np.float32)
        p = np.exp(p - p.max(0, keepdims=True))
        return p / p.sum(0, keepdims=True)

    return predict


@pytest.fixture
def setup(tmp_path: Path) -> tuple[WorkDir, Path]:
    wd = WorkDir.at(tmp_path / "work").ensure()
    for name in ("segresnet_0", "dints_0"):
        add_trained_bundle(wd, name, 0.5)
        (wd.root / name / "cellmap_bundle.json").write_text(json.dumps({"resolution_nm": [8], "output_classes": 3}))
    group = tmp_path / "em.zarr"
    g = zarr.open_group(str(group), mode="w")
    z, y, x = (
        np.arange(SHAPE[0])[:, None, None] * E0[0],
        np.arange(SHAPE[1])[None, :, None] * E0[1],
        np.arange(SHAPE[2])[None, None, :] * E0[2],
    )
    g.create_dataset("s0", data=em_value(z, y, x), chunks=(16, 16, 16))
    from common.ngff import Level, multiscales_attrs

    g.attrs.update(multiscales_attrs([Level("s0", E0, (0.0, 0.0, 0.0), SHAPE)]))
    return wd, group


ROI = "10:110,13:190,30:161"  # world nm; starts inside voxels, odd phase


def test_predict_blockwise_equals_whole_with_ome_geometry(setup, tmp_path: Path) -> None:  # noqa: ANN001
    wd, group = setup
    a = run_predict(
        wd.root, group, tmp_path / "a", roi=ROI, block_t=8, halo=2, probabilities=True, array_predictor_factory=band
    )
    b = run_predict(
        wd.root, group, tmp_path / "b", roi=ROI, block_t=128, halo=2, probabilities=True, array_predictor_factory=band
    )
    assert a["complete"] and a["n_blocks"] > 8 and b["n_blocks"] == 1
    la = zarr.open_array(str(tmp_path / "a" / "s0"), mode="r")[...]
    lb = zarr.open_array(str(tmp_path / "b" / "s0"), mode="r")[...]
    np.testing.assert_array_equal(la, lb)  # no seams
    pa = zarr.open_array(str(tmp_path / "a" / "probabilities" / "s0"), mode="r")[...].astype(int)
    pb = zarr.open_array(str(tmp_path / "b" / "probabilities" / "s0"), mode="r")[...].astype(int)
    assert np.abs(pa - pb).max() <= 1
    assert len(np.unique(la)) == 3
    # the ROI: voxel centres inside [10, 110) x [13, 190) x [30, 161) nm
    want_start = [int(np.ceil(lo / s)) for lo, s in zip((10, 13, 30), E0)]
    want_stop = [int(np.ceil(hi / s)) for hi, s in zip((110, 190, 161), E0)]
    assert la.shape == tuple(b - a for a, b in zip(want_start, want_stop))
    # OME-Zarr 0.4 label image, read from the JSON as any reader would
    attrs = json.loads((tmp_path / "a" / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [ax["name"] for ax in ms["axes"]] == ["z", "y", "x"]
    assert "image-label" in attrs
    t0 = [a * s for a, s in zip(want_start, E0)]
    for k, ds in enumerate(ms["datasets"]):
        sc, tr = (t[t["type"]] for t in ds["coordinateTransformations"])
        assert np.allclose(sc, [s * 2**k for s in E0])
        assert np.allclose(tr, [t + (2**k - 1) * s / 2 for t, s in zip(t0, E0)])
        arr = zarr.open_array(str(tmp_path / "a" / ds["path"]), mode="r")
        if k:
            np.testing.assert_array_equal(arr[...], la[:: 2**k, :: 2**k, :: 2**k])
    assert len(ms["datasets"]) >= 2
    # nothing of another stage touched
    assert not (wd.root / "reports").exists() and sorted(p.name for p in wd.markers_dir.iterdir()) == [
        "train.dints_0.json",
        "train.segresnet_0.json",
    ]


def test_predict_shards_and_resume(setup, tmp_path: Path) -> None:  # noqa: ANN001
    wd, group = setup
    ref = run_predict(wd.root, group, tmp_path / "ref", roi=ROI, block_t=8, halo=2, array_predictor_factory=band)
    out = tmp_path / "sharded"
    s0 = run_predict(wd.root, group, out, roi=ROI, block_t=8, halo=2, shard="0/2", array_predictor_factory=band)
    assert not s0["complete"] and not (out / "predict.json").exists()
    s1 = run_predict(wd.root, group, out, roi=ROI, block_t=8, halo=2, shard="1/2", array_predictor_factory=band)
    assert s1["complete"] and ref["n_blocks"] == s1["n_blocks"]
    np.testing.assert_array_equal(
        zarr.open_array(str(out / "s0"), mode="r")[...], zarr.open_array(str(tmp_path / "ref" / "s0"), mode="r")[...]
    )

    # killed after 3 blocks, then rerun: only the remaining blocks are predicted
    calls = []

    def dies(bundle: Path, wd_: WorkDir):  # noqa: ANN202
        inner = band(bundle, wd_)

        def predict(em, win):  # noqa: ANN001, ANN202
            calls.append(1)
            if len(calls) > 6:  # two members per block
                raise KeyboardInterrupt
            return inner(em, win)

        return predict

    res = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_predict(wd.root, group, res, roi=ROI, block_t=8, halo=2, array_predictor_factory=dies)
    assert len(list((res / ".ledger").iterdir())) == 3
    calls.clear()
    counted = []

    def counting(bundle: Path, wd_: WorkDir):  # noqa: ANN202
        inner = band(bundle, wd_)

        def predict(em, win):  # noqa: ANN001, ANN202
            counted.append(1)
            return inner(em, win)

        return predict

    done = run_predict(wd.root, group, res, roi=ROI, block_t=8, halo=2, array_predictor_factory=counting)
    assert done["complete"] and len(counted) == 2 * (ref["n_blocks"] - 3)
    np.testing.assert_array_equal(
        zarr.open_array(str(res / "s0"), mode="r")[...], zarr.open_array(str(tmp_path / "ref" / "s0"), mode="r")[...]
    )
    with pytest.raises(PipelineError, match="holds another prediction"):
        run_predict(wd.root, group, res, roi="10:60,13:90,30:100", array_predictor_factory=band)
    with pytest.raises(PipelineError, match="holds no voxel"):
        run_predict(wd.root, group, tmp_path / "x", roi="1e6:2e6,0:10,0:10", array_predictor_factory=band)


def test_predict_nifti_in_nifti_out(setup, tmp_path: Path) -> None:  # noqa: ANN001
    wd, group = setup
    em = zarr.open_array(str(group / "s0"), mode="r")[...]
    aff = zyx_to_affine(E0, (100.0, 40.0, 20.0))
    img = tmp_path / "vol_image.nii.gz"
    save_nifti(img, np.ascontiguousarray(em.transpose(2, 1, 0)), aff)
    s = run_predict(wd.root, img, tmp_path / "o", block_t=16, halo=2, array_predictor_factory=band)
    assert s["complete"]
    out = nib.load(str(tmp_path / "o" / "labels.nii.gz"))
    assert out.shape == em.shape[::-1] and np.allclose(out.affine, aff)
    z = zarr.open_array(str(tmp_path / "o" / "s0"), mode="r")[...]
    np.testing.assert_array_equal(np.asarray(out.dataobj).transpose(2, 1, 0), z)


def test_predict_cli_bad_shard_exit_2(setup, tmp_path: Path) -> None:  # noqa: ANN001
    wd, group = setup
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.predict",
            "--work-dir",
            str(wd.root),
            "--input",
            str(group),
            "--out",
            str(tmp_path / "o"),
            "--shard",
            "2/2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2 and "--shard: expected I/N" in r.stderr
