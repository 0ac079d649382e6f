"""convert on the challenge's real crop geometry (tests/data/real_crops.csv, em_s0.csv).

Plans for every real train crop come from the geometry table alone; a sample of off-grid
crops (odd EM-s0 start phases, 1.74 / 2.62 nm z, labels coarser than EM s0, a nested
pair) is written with :mod:`tools.realgeom` and converted, then checked voxel for voxel
against an independent numpy computation; the overlap grouping and the split run on
the full real table.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.classes import DEFAULT_CLASSES
from common.config import load_config
from common.io import read_json
from common.ngff import Level
from common.workdir import WorkDir
from stages.convert import run_convert
from stages.convert.crops import CropProblem, box_nm, plan_geometry
from stages.convert.split import overlap_groups, overlapping_pairs, split_crops
from tools.realgeom import (
    RealCrop,
    RealGeomInfo,
    eligible,
    em_block,
    em_start,
    load_em_s0,
    load_real_crops,
    make_realgeom_tree,
)

TABLE = load_real_crops()
EM = load_em_s0()
TRAIN = [c for c in TABLE if c.split == "train"]
ELIG8 = [c for c in TRAIN if eligible(c)]
BIG = (10**7,) * 3  # EM shapes are not in the table; bounds are checked on the written trees


def _em_s0(ds: str) -> Level:
    e, t = EM[ds]
    return Level("s0", e, t, BIG)  # type: ignore[arg-type]


def _plan(c: RealCrop, target: tuple[float | None, float, float]):
    try:
        return plan_geometry(c.level, [_em_s0(c.dataset)], target)
    except CropProblem as exc:
        return exc


# ---- plans from the table ------------------------------------------------------------
def test_table_facts_and_every_box_on_em_s0_edges() -> None:
    assert len(TRAIN) == 289 and len(ELIG8) == 245
    assert len([c for c in TABLE if c.split == "test"]) == 413 - 397  # 16 test crops
    for c in TABLE:
        em_start(c, EM[c.dataset])  # raises when a box is off the EM s0 grid


def test_plan_at_8nm_converts_every_eligible_crop() -> None:
    plans = {c.crop: _plan(c, (None, 8.0, 8.0)) for c in ELIG8}
    bad = {k: p.reason for k, p in plans.items() if isinstance(p, CropProblem)}
    assert len(bad) <= 0.02 * len(ELIG8), bad
    assert bad == {}  # in fact all 245
    # the old rule (read the EM level of the target size directly) refused the boxes whose
    # EM-s0 start is not a multiple of the factor: 101 crops, mostly 2-4 nm cell culture
    old = [c for c in ELIG8 if any(s % plans[c.crop].em_factor[1] for s in em_start(c, EM[c.dataset]))]
    assert len(old) == 101
    # hela-2 crop 1 (cellmap-data.md §2): EM s0 598:698, 225:725, 6466:6966, pooled 2x, labels 4x
    p1 = plans["1"]
    assert [(s.start, s.stop) for s in p1.em_cut] == [(598, 698), (225, 725), (6466, 6966)]
    assert (p1.em_factor, p1.label_factor, p1.out.shape, p1.dropped) == (
        (2, 2, 2),
        (4, 4, 4),
        (50, 250, 250),
        (0, 0, 0),
    )
    np.testing.assert_allclose(p1.out.scale, (10.48, 8, 8))
    # voxel 0 centre = the box's first edge + half an output voxel
    np.testing.assert_allclose(p1.out.translation, [3132.21 - 1.31 + 5.24, 899 - 1 + 4, 25863 - 1 + 4])
    # every output is 8 nm in y/x; z follows the EM pyramid (EM s0 z x the y/x factor)
    for c in ELIG8:
        p = plans[c.crop]
        e = EM[c.dataset][0]
        assert p.out.scale[1:] == pytest.approx((8.0, 8.0)) and p.out.scale[0] == pytest.approx(e[0] * 8 / e[1])
    # label s0 coarser than EM s0 (cos7 238, 257: 8 nm labels on 2 nm EM): EM pooled 4x, labels copied
    assert (plans["238"].em_factor, plans["238"].label_factor) == ((4, 4, 4), (1, 1, 1))


def test_plan_at_4nm_where_em_s0_allows() -> None:
    """At 4 nm: every crop of a dataset with EM s0 <= 4 nm converts; the 8 nm-EM datasets are skipped with the reason."""
    elig4 = [c for c in TRAIN if eligible(c, max_nm=4.0)]
    plans = {c.crop: _plan(c, (None, 4.0, 4.0)) for c in elig4}
    allows = {ds for ds, (e, _) in EM.items() if e[1] <= 4.0}
    assert allows == {
        "jrc_cos7-1a",
        "jrc_cos7-1b",
        "jrc_ctl-id8-1",
        "jrc_fly-mb-1a",
        "jrc_fly-vnc-1",
        "jrc_hela-2",
        "jrc_hela-3",
        "jrc_jurkat-1",
        "jrc_macrophage-2",
        "jrc_mus-kidney-glomerulus-2",
        "jrc_mus-nacc-1",
        "jrc_sum159-1",
    }
    ok = [c for c in elig4 if c.dataset in allows]
    assert len(elig4) == 236 and len(ok) == 134
    assert all(not isinstance(plans[c.crop], CropProblem) for c in ok), [
        plans[c.crop] for c in ok if isinstance(plans[c.crop], CropProblem)
    ]
    for c in elig4:
        if c.dataset not in allows:
            p = plans[c.crop]
            assert isinstance(p, CropProblem) and p.status == "skipped" and "coarser than the target" in p.reason
    assert plans["1"].out.scale == pytest.approx((5.24, 4.0, 4.0)) and plans["1"].label_factor == (2, 2, 2)


def test_a_z_target_off_the_em_pyramid_is_refused_with_the_fix() -> None:
    hela = next(c for c in ELIG8 if c.crop == "1")
    p = _plan(hela, (8.0, 8.0, 8.0))
    assert isinstance(p, CropProblem) and p.status == "skipped" and "not a whole multiple of EM s0 z 5.24" in p.reason
    ok = _plan(hela, (10.48, 8.0, 8.0))
    assert not isinstance(ok, CropProblem) and ok.em_factor == (2, 2, 2)


# ---- overlap groups and the split on the real table -----------------------------------
def _cases(crops: list[RealCrop]) -> tuple[list[tuple[str, str, str]], dict[str, list[list[float]]]]:
    return [(c.case, c.dataset, c.crop) for c in crops], {c.case: box_nm(c.level) for c in crops}


def test_overlap_groups_on_the_real_table() -> None:
    cases, boxes = _cases(ELIG8)
    pairs = overlapping_pairs(cases, boxes)
    assert len(pairs) == 35
    groups = overlap_groups(cases, boxes)
    g238 = next(g for g in groups if "jrc_cos7-1b_crop238" in g)
    assert {f"jrc_cos7-1b_crop{i}" for i in (240, 245, 258, 259, 291)} <= set(g238)
    assert sum(len(g) for g in groups) == 245


def _sides(folds: dict[str, int | None], test: list[str]) -> dict[str, object]:
    return {**{c: f for c, f in folds.items() if f is not None}, **{c: "test" for c in test}}


def test_default_split_puts_no_overlapping_pair_on_both_sides(tmp_path: Path) -> None:
    cases, boxes = _cases(ELIG8)
    pairs = overlapping_pairs(cases, boxes)
    cfg = load_config(tmp_path, None, {}, dump=False)  # defaults: validation_fraction 0.15, seed 0
    sp = split_crops(tmp_path / "split.json", cases, cfg, boxes)
    side = _sides(sp.folds, sp.test)
    assert [p for p in pairs if side[p[0]] != side[p[1]]] == [] and sp.leaks == []
    assert 0 < Counter(side.values())[0] < 245
    stored = read_json(tmp_path / "split.json")
    assert stored["groups"] == [g for g in overlap_groups(cases, boxes) if len(g) > 1] and stored["leaks"] == []
    # the per-crop draw it replaces (no boxes known) does split overlapping pairs
    per_crop = split_crops(tmp_path / "old.json", cases, cfg)
    assert [p for p in pairs if per_crop.folds[p[0]] != per_crop.folds[p[1]]]
    # held-out labelled test groups: whole groups, disjoint from every fold
    cfg_t = load_config(tmp_path, None, {"split": {"test_fraction": 0.1}}, dump=False)
    st = split_crops(tmp_path / "t.json", cases, cfg_t, boxes)
    side = _sides(st.folds, st.test)
    assert 10 <= len(st.test) <= 45 and not set(st.test) & set(st.folds)
    assert [p for p in pairs if side[p[0]] != side[p[1]]] == []
    assert read_json(tmp_path / "t.json")["test"] == st.test


def test_a_given_datasplit_csv_with_overlap_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    crops = [c for c in ELIG8 if c.crop in ("240", "291", "1")]
    cases, boxes = _cases(crops)
    rows = []
    for c in crops:
        side = "validate" if c.crop == "291" else "train"
        rows.append(
            f'"{side}","/d/{c.dataset}/{c.dataset}.zarr","recon-1/em/fibsem-uint8",'
            f'"/d/{c.dataset}/{c.dataset}.zarr","recon-1/labels/groundtruth/crop{c.crop}/[ecs]"'
        )
    (tmp_path / "ds.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(tmp_path, None, {"split": {"datasplit_csv": str(tmp_path / "ds.csv")}}, dump=False)
    with caplog.at_level(logging.WARNING, logger="cellmap.convert"):
        sp = split_crops(tmp_path / "s.json", cases, cfg, boxes)
    assert sp.leaks == [["jrc_cos7-1b_crop240", "jrc_cos7-1b_crop291"]]
    assert "overlapping crops on both sides" in caplog.text


# ---- converted trees, checked voxel for voxel -----------------------------------------
SAMPLE = ["1", "116", "238", "240", "291", "155", "34", "183"]  # hela-2, ctl 1.74 nm, cos7 nested, jurkat, liver


def _mean_expected(c: RealCrop, em: tuple, f: tuple[int, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """Independent EM expectation: the box's EM s0 (from its translation), float block means, floor(+1/2)."""
    start = em_start(c, em)
    n_em = [round(n * l / e) for n, l, e in zip(c.shape, c.voxel_size, em[0])]
    out = tuple(n // k for n, k in zip(n_em, f))
    s0 = em_block(tuple(slice(s, s + o * k) for s, o, k in zip(start, out, f))).astype(np.float64)
    z, y, x = out
    means = s0.reshape(z, f[0], y, f[1], x, f[2]).mean(axis=(1, 3, 5))
    return np.floor(means + 0.5).astype(np.uint8), start


def _codes_expected(info: RealGeomInfo, crop: str) -> np.ndarray:
    """``all`` ids -> training codes for the 14 default classes, written out by hand."""
    a = info.labels[crop]
    annotated = info.classes[crop]
    code = {
        0: 0 if len(annotated) == len(DEFAULT_CLASSES) else 255,
        35: 0,
        50: 255,
        28: DEFAULT_CLASSES.index("nuc") + 1,
    }
    for i, name in enumerate(DEFAULT_CLASSES):
        code.setdefault(
            {
                "ecs": 1,
                "pm": 2,
                "mito_mem": 3,
                "mito_lum": 4,
                "mito_ribo": 5,
                "golgi_mem": 6,
                "golgi_lum": 7,
                "ves_mem": 8,
                "ves_lum": 9,
                "endo_mem": 10,
                "endo_lum": 11,
                "er_mem": 16,
                "er_lum": 17,
                "nuc": 37,
            }[name],
            i + 1,
        )
    return np.vectorize(lambda v: code[int(v)], otypes=[np.uint8])(a)


def _majority_expected(codes: np.ndarray, r: tuple[int, ...], out: tuple[int, ...]) -> np.ndarray:
    res = np.empty(out, np.uint8)
    for idx in np.ndindex(out):
        blk = codes[tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, r))].ravel().tolist()
        known = [v for v in blk if v != 255]
        res[idx] = (
            255 if 2 * (len(blk) - len(known)) > len(blk) else min(set(known), key=lambda v: (-known.count(v), v))
        )
    return res


def _check_converted(info: RealGeomInfo, wd: WorkDir, records: list[dict], target_yx: float) -> int:
    """Assert every converted crop against the independent expectation; returns how many."""
    n = 0
    for r in records:
        if r["status"] != "converted":
            continue
        c = info.crops[r["crop"]]
        em = info.em[c.dataset]
        fy = round(target_yx / em[0][1])
        f = (fy, fy, fy)  # z follows the y/x factor (resolution_nm given as one number)
        want_img, start = _mean_expected(c, em, f)
        img = nib.load(str(wd.nifti_dir / r["image"]))
        np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), want_img, err_msg=r["case"])
        spacing = [e * k for e, k in zip(em[0], f)]
        origin = [t + (s - 0.5) * e + o / 2 for t, s, e, o in zip(em[1], start, em[0], spacing)]
        np.testing.assert_allclose(np.diag(img.affine)[:3], spacing[::-1], rtol=1e-6)  # NIfTI holds float32
        np.testing.assert_allclose(img.affine[:3, 3], origin[::-1], rtol=1e-6)
        np.testing.assert_allclose(r["spacing"], spacing, rtol=1e-12)  # the report holds the exact values
        np.testing.assert_allclose(r["translation"], origin, rtol=1e-12)
        r_lab = tuple(round(o / l) for o, l in zip(spacing, c.voxel_size))
        want_lab = _majority_expected(_codes_expected(info, r["crop"]), r_lab, want_img.shape)
        lab = np.asarray(nib.load(str(wd.nifti_dir / r["label"])).dataobj).transpose(2, 1, 0)
        np.testing.assert_array_equal(lab, want_lab, err_msg=r["case"])
        n += 1
    return n


def _convert(info: RealGeomInfo, tmp: Path, name: str, workers: int = 1, **keys: object):
    wd = WorkDir.at(tmp / name).ensure()
    cfg = load_config(wd.root, None, {"data_root": str(info.root), **keys})
    return wd, run_convert(cfg, wd, workers=workers, progress=False)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> RealGeomInfo:
    return make_realgeom_tree(tmp_path_factory.mktemp("realgeom") / "data", SAMPLE)


def test_sample_of_off_grid_crops_voxel_for_voxel_at_8_and_4_nm(sample: RealGeomInfo, tmp_path: Path) -> None:
    odd = [c for c in sample.crops.values() if any(s % 2 for s in em_start(c, sample.em[c.dataset]))]
    assert len(odd) >= 5  # odd EM-s0 start phases: the crops the old converter refused
    assert any(c.voxel_size[0] == 1.74 for c in sample.crops.values())
    wd, s8 = _convert(sample, tmp_path, "w8", resolution_nm=8)
    assert s8.count("converted") == len(SAMPLE), s8.text()
    assert _check_converted(sample, wd, s8.records, 8.0) == len(SAMPLE)
    assert any(any(r["dropped_em_voxels"]) for r in s8.records)  # partial blocks occur and are recorded
    wd4, s4 = _convert(sample, tmp_path, "w4", resolution_nm=4, convert={"max_failed_fraction": 0.0})
    got = {r["crop"]: r for r in s4.records}
    assert got["183"]["status"] == "skipped" and "coarser than the target" in got["183"]["reason"]  # mus-liver: 8 nm EM
    assert got["238"]["status"] == "skipped" and "coarser than target resolution" in got["238"]["reason"]  # 8 nm labels
    assert _check_converted(sample, wd4, s4.records, 4.0) == len(SAMPLE) - 2


@pytest.mark.slow
def test_whole_real_train_geometry_converts_at_8nm(tmp_path: Path) -> None:
    """Every eligible train crop (245, shapes shrunk): >= 98 % convert at 8 nm and all that EM s0 allows at
    4 nm, each equal to the independent expectation."""
    info = make_realgeom_tree(tmp_path / "data", hi=16)  # 8..16 label voxels per axis: CI time
    assert len(info.crops) == 245
    wd, summary = _convert(info, tmp_path, "w", workers=2, resolution_nm=8)
    assert summary.count("converted") >= 0.98 * 245, summary.text()
    assert _check_converted(info, wd, summary.records, 8.0) == summary.count("converted")
    rep = read_json(wd.reports_dir / "convert.json")
    assert sum(v["converted"] for v in rep["by_dataset"].values()) == summary.count("converted")
    assert rep["split"]["leaks"] == []
    # 4 nm on the same tree: every crop with label s0 <= 4 nm in a dataset whose EM s0 allows it
    wd4, s4 = _convert(info, tmp_path, "w4", workers=2, resolution_nm=4)
    want4 = {c.crop for c in info.crops.values() if max(c.voxel_size) <= 4 and info.em[c.dataset][0][1] <= 4}
    assert len(want4) == 134 and {r["crop"] for r in s4.records if r["status"] == "converted"} == want4
    assert s4.count("failed") == 0
    assert _check_converted(info, wd4, s4.records, 4.0) == 134
