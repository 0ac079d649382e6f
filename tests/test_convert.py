"""The convert stage on the synthetic CellMap tree: exact cuts, labels, failures, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.config import load_config
from common.io import read_json
from common.workdir import WorkDir
from stages.convert import run_convert
from tools.synthetic_cellmap import DATASET, SyntheticInfo, em_block, make_synthetic_cellmap

CLASSES7 = ["ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "er_mem", "nuc"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticInfo:
    return make_synthetic_cellmap(tmp_path_factory.mktemp("cellmap") / "data")


def _run(tmp: Path, synth: SyntheticInfo, name: str = "work", **cfg_keys: object):
    """Convert with a failure budget that tolerates the fixture's deliberately malformed crops."""
    wd = WorkDir.at(tmp / name).ensure()
    keys = {
        "data_root": str(synth.root),
        "resolution_nm": 4,
        "classes": CLASSES7,
        "convert": {"max_failed_fraction": 1.0},
        **cfg_keys,
    }
    cfg = load_config(wd.root, None, keys)
    return cfg, wd, run_convert(cfg, wd, workers=1, progress=False)


def _block_mean(a: np.ndarray, f: tuple[int, ...]) -> np.ndarray:
    """Independent EM expectation: float mean of each block, then floor(mean + 1/2)."""
    out = np.empty(tuple(n // k for n, k in zip(a.shape, f)), np.uint8)
    for idx in np.ndindex(out.shape):
        blk = a[tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f))]
        out[idx] = int(np.floor(blk.astype(np.float64).mean() + 0.5))
    return out


def _majority(codes: np.ndarray, f: tuple[int, ...], unknown: int = 255) -> np.ndarray:
    """Independent label expectation: unknown if > half unknown, else the commonest known code (ties: smallest)."""
    out = np.empty(tuple(n // k for n, k in zip(codes.shape, f)), np.uint8)
    for idx in np.ndindex(out.shape):
        blk = codes[tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, f))].ravel().tolist()
        known = [v for v in blk if v != unknown]
        if 2 * (len(blk) - len(known)) > len(blk):
            out[idx] = unknown
        else:
            out[idx] = min(set(known), key=lambda v: (-known.count(v), v))
    return out


def _nii(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def run4(synth: SyntheticInfo, tmp_path_factory: pytest.TempPathFactory):
    return _run(tmp_path_factory.mktemp("run4"), synth)


def test_every_crop_has_its_status_and_reason(synth: SyntheticInfo, run4) -> None:
    _, wd, summary = run4
    got = {r["crop"]: r for r in summary.records}
    assert set(got) == set(synth.crops)
    for crop, ex in synth.crops.items():
        assert got[crop]["status"] == ex.status, (crop, got[crop]["reason"])
        assert ex.reason in got[crop]["reason"], (crop, got[crop]["reason"])
        assert "\n" not in got[crop]["reason"]
    report = read_json(wd.reports_dir / "convert.json")
    assert report["counts"] == {"converted": 3, "skipped": 1, "failed": 7}
    assert "3 converted" in summary.text() and "crop5: EM never fetched" in summary.text()
    md = (wd.reports_dir / "convert.md").read_text()
    assert "| jrc_synth-1_crop8 | failed |" in md and (wd.reports_dir / "convert.png").stat().st_size > 0


def test_cuts_equal_the_expected_em_voxels_and_affine_holds_spacing(synth: SyntheticInfo, run4) -> None:
    _, wd, summary = run4
    for r in summary.records:
        if r["status"] != "converted":
            continue
        ex = synth.crops[r["crop"]]
        # the box is always cut from EM s0; a label s1 at the EM voxel means label s0 pooled 2x
        assert (r["label_level"], r["em_level"], r["em_factor"]) == ("s0", "s0", [1, 1, 1])
        assert r["label_factor"] == ([2, 2, 2] if ex.label_level == "s1" else [1, 1, 1])
        assert [tuple(c) for c in r["em_cut"]] == list(ex.em_cut)
        image, aff = _nii(wd.nifti_dir / r["image"])
        expected = em_block(ex.em_level_index(), tuple(slice(a, b) for a, b in ex.em_cut))
        assert image.dtype == np.uint8
        np.testing.assert_array_equal(image, expected.transpose(2, 1, 0))  # NIfTI is (x, y, z)
        np.testing.assert_allclose(np.diag(aff)[:3], ex.scale[::-1])
        np.testing.assert_allclose(aff[:3, 3], ex.translation[::-1])
        label, laff = _nii(wd.nifti_dir / r["label"])
        assert label.shape == image.shape and label.dtype == np.uint8
        np.testing.assert_array_equal(laff, aff)


def _label(wd: WorkDir, summary, crop: str) -> np.ndarray:
    rec = next(r for r in summary.records if r["crop"] == crop)
    return _nii(wd.nifti_dir / rec["label"])[0].transpose(2, 1, 0)  # back to (z, y, x)


def test_label_maps_and_unknown_voxels(synth: SyntheticInfo, run4) -> None:
    _, wd, summary = run4
    ids = {c: i + 1 for i, c in enumerate(CLASSES7)}
    # crop1 (label s0 at half the EM voxel, pooled 2x2x2): pm, er_mem, nuc are not annotated
    # there, so a 0 in `all` is unknown; cyto (35) is a true negative for every class; the
    # mito group 50 is unknown. Codes are made at s0, then each block takes the block rule.
    a = synth.labels["1"]["all"][0]
    codes = np.select(
        [a == 1, a == 3, a == 4, a == 35, a == 50, a == 0],
        [ids["ecs"], ids["mito_mem"], ids["mito_lum"], 0, 255, 255],
        -1,
    )
    assert (codes >= 0).all()
    want = _majority(codes.astype(np.uint8), (2, 2, 2))
    assert {0, 255, ids["ecs"], ids["mito_mem"]} <= set(np.unique(want).tolist())
    np.testing.assert_array_equal(_label(wd, summary, "1"), want)
    # crop2: only ecs and pm annotated
    a = synth.labels["2"]["all"][0]
    np.testing.assert_array_equal(_label(wd, summary, "2"), np.select([a == 1, a == 2], [1, 2], 255))
    # crop6: no `all`; every configured class annotated, so 0 is background; semantic 255
    # is unknown; nuc instance ids 255 and 300 are objects (class nuc), not unknown.
    arr = {k: v[0] for k, v in synth.labels["6"].items()}
    lab = _label(wd, summary, "6")
    assert (lab[arr["nuc"] > 0] == ids["nuc"]).all() and (arr["nuc"] == 255).any() and (arr["nuc"] > 255).any()
    assert (lab[arr["ecs"] == 1] == ids["ecs"]).all() and (lab[arr["ecs"] == 255] == 255).all()
    assert (lab[arr["pm"] == 1] == ids["pm"]).all() and (lab[arr["er_mem"] == 1] == ids["er_mem"]).all()
    none = (arr["ecs"] == 0) & (arr["pm"] == 0) & (arr["nuc"] == 0) & (arr["er_mem"] == 0)
    assert none.any() and (lab[none] == 0).all()
    rec = next(r for r in summary.records if r["crop"] == "6")
    assert rec["class_voxels"]["nuc"] == int((arr["nuc"] > 0).sum())
    assert rec["unknown_fraction"] == pytest.approx((lab == 255).mean(), abs=1e-6)
    assert rec["annotated"] == CLASSES7


def test_fully_annotated_crop_and_unknown_label_zero(synth: SyntheticInfo, tmp_path: Path) -> None:
    classes = ["ecs", "mito_mem", "mito_lum", "mito_ribo"]
    _, wd, summary = _run(tmp_path, synth, classes=classes, crops=[1])
    a = synth.labels["1"]["all"][0]
    want = _majority(
        np.select([a == 1, a == 3, a == 4, a == 50], [1, 2, 3, 255], 0).astype(np.uint8), (2, 2, 2)
    )  # 0 and 35: background
    np.testing.assert_array_equal(_label(wd, summary, "1"), want)
    _, wd0, summary0 = _run(tmp_path, synth, name="w0", classes=classes, crops=[1], unknown_label=0)
    np.testing.assert_array_equal(_label(wd0, summary0, "1"), np.where(want == 255, 0, want))


def test_coarse_crop_converts_at_its_resolution(synth: SyntheticInfo, tmp_path: Path) -> None:
    _, wd, summary = _run(tmp_path, synth, resolution_nm=16, crops=[1, 2, 3])
    got = {r["crop"]: r for r in summary.records}
    ex = synth.coarse_crop3
    r3 = got["3"]
    # crop3 sits on EM s2 voxels: cut on EM s0 (4x the s2 range) and block-mean 4x4x4
    assert r3["status"] == "converted" and (r3["em_level"], r3["em_factor"], r3["label_factor"]) == (
        "s0",
        [4, 4, 4],
        [1, 1, 1],
    )
    assert [tuple(c) for c in r3["em_cut"]] == [(4 * a, 4 * b) for a, b in ex.em_cut]
    image, aff = _nii(wd.nifti_dir / r3["image"])
    s0 = em_block(0, tuple(slice(4 * a, 4 * b) for a, b in ex.em_cut))
    np.testing.assert_array_equal(image, _block_mean(s0, (4, 4, 4)).transpose(2, 1, 0))
    np.testing.assert_allclose(np.diag(aff)[:3], [16, 16, 24])
    np.testing.assert_allclose(aff[:3, 3], ex.translation[::-1])
    # crop1 (4x6x5 EM s0 voxels) keeps one whole 4x4x4 block; the partial rest is dropped and recorded
    assert got["1"]["status"] == "converted" and got["1"]["shape"] == [1, 1, 1]
    assert got["1"]["dropped_em_voxels"] == [0, 2, 1]
    assert r3["class_voxels"]["nuc"] == int((synth.labels["3"]["all"][0] > 0).sum())


def test_rerun_is_a_noop(synth: SyntheticInfo, tmp_path: Path) -> None:
    cfg, wd, first = _run(tmp_path, synth)
    files = sorted(
        p
        for p in wd.root.rglob("*")
        if p.is_file() and "markers/convert.json" not in str(p) and not str(p).endswith(".log")
    )
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    second = run_convert(cfg, wd, workers=1, progress=False)
    assert second.converted_now == [] and len(first.converted_now) == 3
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert after == before
    assert wd.marker("convert").is_done()


def test_datalist_format_split_and_testing(synth: SyntheticInfo, tmp_path: Path) -> None:
    _, wd, _ = _run(tmp_path, synth, split={"test_crops": [2], "seed": 3})
    dl = read_json(wd.datalist)
    assert [t["case"] for t in dl["testing"]] == [f"{DATASET}_crop2"]
    assert {t["case"] for t in dl["training"]} == {f"{DATASET}_crop1", f"{DATASET}_crop6"}
    for item in dl["training"]:
        assert set(item) == {"image", "label", "case", "fold"}
        assert (wd.nifti_dir / item["image"]).is_file() and not Path(item["image"]).is_absolute()
    assert sorted(i["fold"] for i in dl["training"]) == [0, 1]  # >= 1 validation, >= 1 training
    assert json.loads((wd.nifti_dir / "split.json").read_text())["split"]["method"] == "draw"


def test_monai_loads_the_pair_with_spacing(synth: SyntheticInfo, run4) -> None:
    from monai.transforms import LoadImaged

    _, wd, _ = run4
    item = read_json(wd.datalist)["training"][0]
    paths = {k: str(wd.nifti_dir / item[k]) for k in ("image", "label")}
    out = LoadImaged(keys=["image", "label"], image_only=False)(paths)
    rec = next(r for r in read_json(wd.reports_dir / "convert.json")["crops"] if r["case"] == item["case"])
    assert tuple(out["image"].shape) == tuple(rec["shape"][::-1])
    np.testing.assert_allclose(out["image"].pixdim[:3].numpy(), rec["spacing"][::-1])


def test_manifest_boxes_cut_exactly(synth: SyntheticInfo) -> None:
    """The two challenge-format test rows land on-grid inside the EM at their level."""
    import zarr

    from common.ngff import Level, em_cut, find_em_level, read_em_block, read_multiscales

    lines = synth.manifest.read_text().splitlines()
    assert lines[0] == "crop_name,dataset,class_label,voxel_size,translation,shape" and len(lines) == 3
    em_group = synth.root / DATASET / f"{DATASET}.zarr" / "recon-1/em/fibsem-uint8"
    levels = read_multiscales(em_group)
    for line, box in zip(lines[1:], synth.test_boxes):
        crop, ds, cls, vs, tr, sh = line.split(",")
        vec = lambda t: [float(x) for x in t.strip("[]").split(";")]  # noqa: E731
        lv = Level("", tuple(vec(vs)), tuple(vec(tr)), tuple(int(x) for x in vec(sh)))
        assert (crop, ds, cls) == (box["crop"], box["dataset"], box["class_label"]) and lv == box["box"]
        em = find_em_level(levels, lv.scale)
        assert em is not None and em.path == box["em_level"]
        cut = em_cut(lv, em)
        assert [(s.start, s.stop) for s in cut] == list(box["em_cut"])
        block = read_em_block(zarr.open_array(str(em_group / em.path), mode="r"), cut)
        np.testing.assert_array_equal(block, em_block(int(em.path[1:]), cut))
    assert synth.test_boxes[0]["box"].scale != synth.test_boxes[1]["box"].scale


def test_big_crops_convert_exactly(tmp_path: Path) -> None:
    info = make_synthetic_cellmap(tmp_path / "data", small=False, n_extra_crops=3, extra_crop_shape=(10, 12, 16))
    wd = WorkDir.at(tmp_path / "w").ensure()
    classes = ["ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "nuc"]
    cfg = load_config(wd.root, None, {"data_root": str(info.root), "resolution_nm": 4, "classes": classes})
    summary = run_convert(cfg, wd, workers=2, progress=False)
    assert summary.count("converted") == 3
    for r in summary.records:
        ex = info.crops[r["crop"]]
        image, aff = _nii(wd.nifti_dir / r["image"])
        np.testing.assert_array_equal(image, em_block(0, tuple(slice(a, b) for a, b in ex.em_cut)).transpose(2, 1, 0))
        np.testing.assert_allclose(aff[:3, 3], ex.translation[::-1])
        label = _nii(wd.nifti_dir / r["label"])[0].transpose(2, 1, 0)
        assert set(np.unique(label)) <= {0, 1, 2, 3, 4, 5, 6, 255}
        assert r["class_voxels"]["nuc"] == int((label == 6).sum()) and r["unknown_fraction"] > 0  # group 50


def test_target_finer_than_em_s0_is_skipped_naming_sizes(synth: SyntheticInfo, tmp_path: Path) -> None:
    """crop1's s0 (half the EM voxel) at 2 nm: no EM that fine, so the crop is skipped and the stage exits 1."""
    from common.errors import StageFailed

    with pytest.raises(StageFailed, match="no crop converted"):
        _run(tmp_path, synth, resolution_nm=2, crops=[1])
    rec = read_json(tmp_path / "work" / "reports" / "convert.json")["crops"][0]
    assert rec["status"] == "skipped" and "EM s0 [6, 4, 4] nm is coarser than the target [?, 2, 2]" in rec["reason"]
    assert WorkDir.at(tmp_path / "work").marker("convert").status == "failed"


def test_failure_budget_fails_the_stage_with_reasons(synth: SyntheticInfo, tmp_path: Path) -> None:
    """The fixture's 7 malformed crops are 70 % of the eligible ones: over the default 2 % budget."""
    from common.errors import StageFailed

    with pytest.raises(
        StageFailed, match=r"7 of 10 eligible crops failed \(70.0 % > convert.max_failed_fraction 2 %\)"
    ):
        _run(tmp_path, synth, convert={})
    wd = WorkDir.at(tmp_path / "work")
    rep = read_json(wd.reports_dir / "convert.json")
    assert rep["by_dataset"] == {DATASET: {"converted": 3, "skipped": 1, "failed": 7}}
    assert rep["failed_fraction"] == 0.7 and rep["max_failed_fraction"] == 0.02
    kinds = {f["reason"]: f["cases"] for f in rep["failure_reasons"]}
    assert kinds["EM never fetched"] == [f"{DATASET}_crop5"] and kinds["off-grid"] == [f"{DATASET}_crop8"]
    md = (wd.reports_dir / "convert.md").read_text()
    assert f"| {DATASET} | 3 | 1 | 7 |" in md and "| off-grid | 1 |" in md
    assert wd.marker("convert").status == "failed"
    assert read_json(wd.datalist)["training"]  # what converted is still listed (nothing produced is lost)
