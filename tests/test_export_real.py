"""Export of every row of the real test manifest (real geometry, shrunk shapes, sparse EM).

The tree keeps each real test crop's dataset, voxel size and translation (half-EM-voxel
crops 557/558/560/561/986, anisotropic z 1.74/3.48/6.96/13.92 nm, 16 and 32 nm crops, a box
at the volume origin) with shapes shrunk; the EM is the real EM s0 grid of each dataset,
written only near the crops. Predictors are plugged in as arrays -> probabilities on the
training grid: "perfect" ones return the truth, so what is measured is the export itself.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from common.blockwise import axis_weights, block_mean, needed_range
from common.classes import CELLMAP_CLASSES, INSTANCE_CLASSES, atoms
from common.config import load_config
from common.ngff import Level, read_multiscales
from common.workdir import WorkDir
from stages.ensemble.export import ManifestRow, em_reader, plan_class, plan_em, read_manifest, run_export
from tests.export_realgeom import (
    EM_GROUP,
    Crop,
    build_tree,
    real_test_crops,
    shrink,
    write_manifest,
)
from tests.test_ensemble import add_trained_bundle

ROOT = Path(__file__).resolve().parents[1]
REAL_MANIFEST = Path("/work/shared/data/cellmap-challenge/test_crop_manifest.csv")
ID_NAME = {cid: n for n, (cid, inc) in CELLMAP_CLASSES.items()}
HALF_EM = {"557", "558", "560", "561", "986"}


def atom_classes_for(names: set[str]) -> list[str]:
    """Atomic classes whose union makes every class in ``names`` (a model that can write all rows)."""
    ids = sorted(set().union(*(atoms(n) for n in names)))
    return [ID_NAME[i] for i in ids]


def centres(win: Level) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, y, x = (t + np.arange(n) * s for t, s, n in zip(win.translation, win.scale, win.shape))
    return z[:, None, None], y[None, :, None], x[None, None, :]


def onehot_predictor(label_fn, n: int):  # noqa: ANN001, ANN201
    """Perfect predictor: one-hot of the truth at each training voxel centre."""

    def predict(em: np.ndarray, win: Level) -> np.ndarray:
        assert em.shape == win.shape and em.dtype == np.float32
        lab = np.broadcast_to(label_fn(*centres(win)), win.shape)
        return np.stack([(lab == c) for c in range(n)]).astype(np.float32)

    return predict


def fraction_predictor(label_fn, n: int, ss: int = 4):  # noqa: ANN001, ANN201
    """Perfect predictor: the fraction of each class inside each training voxel (ss^3 samples)."""

    def predict(em: np.ndarray, win: Level) -> np.ndarray:
        out = np.zeros((n, *win.shape), dtype=np.float32)
        offs = (np.arange(ss) + 0.5) / ss - 0.5
        for dz in offs:
            for dy in offs:
                for dx in offs:
                    z, y, x = centres(win)
                    lab = np.broadcast_to(
                        label_fn(z + dz * win.scale[0], y + dy * win.scale[1], x + dx * win.scale[2]), win.shape
                    )
                    for c in range(n):
                        out[c] += lab == c
        return out / ss**3

    return predict


def make_wd(tmp: Path, classes: list[str], res: list[float], data_root: Path, block: int = 16) -> WorkDir:
    wd = WorkDir.at(tmp / "work").ensure()
    wd.config_file.write_text(
        f"classes: [{', '.join(classes)}]\ndata_root: {data_root}\n"
        f"resolution_nm: 16\nensemble: {{export_block: {block}, export_halo: 2}}\n"
    )
    for name, score in (("segresnet_0", 0.9), ("dints_0", 0.8)):
        add_trained_bundle(wd, name, score)
        (wd.root / name / "cellmap_bundle.json").write_text(json.dumps({"resolution_nm": res}))
    return wd


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Crop]]:
    crops = [shrink(c) for c in real_test_crops()]
    root = build_tree(tmp_path_factory.mktemp("realgeom") / "data", crops)
    return root, crops


def test_manifest_rows_are_the_real_ones(tmp_path: Path) -> None:
    crops = real_test_crops()
    m = tmp_path / "m.csv"
    assert write_manifest(m, crops) == 413
    ours = {(r.crop, r.class_label, r.geometry) for r in read_manifest(m)}
    assert len(ours) == 413 and len({r[0] for r in ours}) == 16
    if REAL_MANIFEST.is_file():  # the committed geometry table is the challenge's manifest
        assert ours == {(r.crop, r.class_label, r.geometry) for r in read_manifest(REAL_MANIFEST)}


def test_em_reader_is_the_block_mean_of_em_s0_in_the_box_phase(real_tree) -> None:  # noqa: ANN001
    root, crops = real_tree
    for c in crops:
        row = ManifestRow(c.crop, c.dataset, "ecs", c.voxel_size, c.translation, c.shape)
        plan = plan_em(root, row, (None, 8.0, 8.0))
        group = root / c.dataset / f"{c.dataset}.zarr" / EM_GROUP
        s0 = read_multiscales(group)[0]
        s0_arr = zarr.open_array(str(group / "s0"), mode="r")
        f = [round(t / e) for t, e in zip(plan.grid.scale, s0.scale)]
        assert plan.grid.scale[1:] == (8.0, 8.0) and abs(plan.grid.scale[0] - s0.scale[0] * f[1]) < 1e-9
        # the training grid's first voxel starts at the box's first edge
        for t, s, bt, bs in zip(plan.grid.translation, plan.grid.scale, c.translation, c.voxel_size):
            assert abs((t - s / 2) - (bt - bs / 2)) < 1e-6
        # independent: EM s0 from the box start, block mean in the box phase
        a0 = [
            round((bt - bs / 2 - (st - ss / 2)) / ss)
            for bt, bs, st, ss in zip(c.translation, c.voxel_size, s0.translation, s0.scale)
        ]
        n = [3, 4, 5]
        want = block_mean(np.asarray(s0_arr[tuple(slice(a, a + k * ff) for a, k, ff in zip(a0, n, f))]), f)
        got = em_reader(plan, row)((0, 0, 0), tuple(n))
        tol = 0.0 if plan.level.path == "s0" else 0.5  # a coarser level holds the rounded block mean
        np.testing.assert_allclose(got, want, atol=tol)
        if c.crop in HALF_EM:
            assert any(v < e for v, e in zip(c.voxel_size, s0.scale))


def test_plan_class_groups_and_fixes() -> None:
    classes = ["ecs", "pm", "mito_mem", "mito_lum", "er_mem", "nuc"]
    assert plan_class("mito", classes).labels == (3, 4)
    assert "partial" in plan_class("mito", classes).note  # mito_ribo not trained
    assert plan_class("mito", classes).instance
    assert plan_class("nuc", classes).labels == (6,) and plan_class("nuc", classes).note == ""
    assert not plan_class("ecs", classes).instance
    with pytest.raises(Exception, match="add .*to `classes:`"):
        plan_class("ne_mem", classes)  # inside nuc, cannot be derived from it
    with pytest.raises(Exception, match="not a CellMap class"):
        plan_class("foo", classes)


def test_every_real_test_row_written(real_tree, tmp_path: Path) -> None:  # noqa: ANN001
    root, crops = real_tree
    manifest = tmp_path / "test_crop_manifest.csv"
    assert write_manifest(manifest, crops) == 413
    names = {cls for c in crops for cls in c.classes}
    classes = atom_classes_for(names)
    n = len(classes) + 1

    def label_fn(z, y, x):  # noqa: ANN001, ANN202
        return ((z // 40).astype(np.int64) + 3 * (y // 48).astype(np.int64) + 7 * (x // 56).astype(np.int64)) % n

    wd = make_wd(tmp_path, classes, [8.0], root, block=32)
    s = run_export(
        load_config(wd.root), wd, manifest, array_predictor_factory=lambda m, w, c: onehot_predictor(label_fn, n)
    )
    assert s["failed"] == {} and s["untrained"] == {}
    assert s["n_written"] == 413 and s["training_resolution_nm"] == [None, 8.0, 8.0]
    store = zarr.open_group(str(wd.root / "submission" / "submission.zarr"), mode="r")
    with zipfile.ZipFile(wd.root / "submission" / "submission.zip") as zf:
        zipped = set(zf.namelist())
    for r in read_manifest(manifest):
        arr = store[f"crop{r.crop}"][r.class_label]
        assert arr.shape == r.shape
        assert arr.attrs["voxel_size"] == list(r.voxel_size)
        assert arr.attrs["translation"] == list(r.translation)
        assert arr.attrs["shape"] == list(r.shape)
        assert f"submission.zarr/crop{r.crop}/{r.class_label}/.zarray" in zipped
        if r.class_label in INSTANCE_CLASSES:
            assert arr.dtype in (np.uint16, np.uint32)
            k = s["written"][r.key]["instances"]
            v = arr[...]
            assert v.max() == k and len(np.unique(v[v > 0])) == k
        else:
            assert arr.dtype == np.uint8 and set(np.unique(arr[...])) <= {0, 1}
    # the list of keys the scorer reads: plain arrays, no groups
    assert sorted(store["crop557"].array_keys()) == sorted(next(c for c in crops if c.crop == "557").classes)
    assert wd.marker("ensemble.export").status == "done"
    # a rerun with the same inputs is a no-op
    mtime = (wd.root / "submission" / "submission.zip").stat().st_mtime_ns
    run_export(load_config(wd.root), wd, manifest, array_predictor_factory=lambda m, w, c: 1 / 0)
    assert (wd.root / "submission" / "submission.zip").stat().st_mtime_ns == mtime


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _truth_at(label_fn, row: ManifestRow):  # noqa: ANN001, ANN202
    return np.broadcast_to(label_fn(*centres(row.box)), row.shape)


def test_perfect_predictor_scores_on_finer_and_coarser_crops(real_tree, tmp_path: Path) -> None:  # noqa: ANN001
    """Truth constant over training-resolution blocks -> IoU >= 0.99 per class after the export."""
    root, crops = real_tree
    classes = ["ecs", "pm", "mito_mem"]
    n = len(classes) + 1
    real = {c.crop: c for c in real_test_crops()}
    fine = shrink(real["557"], 320)  # 1.74/2/2 nm, half the EM s0 voxel
    coarse = shrink(real["980"], 640)  # 13.92/16/16 nm, 2x the training voxel
    coarse32 = shrink(real["985"], 800)  # 32 nm, 4x
    sel = [fine, coarse, coarse32]
    tree = build_tree(tmp_path / "data", sel)
    wd = make_wd(tmp_path, classes, [8.0], tree)
    plans = {
        c.crop: plan_em(
            tree, ManifestRow(c.crop, c.dataset, "ecs", c.voxel_size, c.translation, c.shape), (None, 8.0, 8.0)
        )
        for c in sel
    }

    # truth constant over training voxels (and over the coarse crops' voxels): regions cut by
    # planes on multiples of 4 training voxels in each crop's own phase, 3 classes + background
    def per_crop_fn(c: Crop):  # noqa: ANN202
        g = plans[c.crop].grid

        def fn(z, y, x):  # noqa: ANN001, ANN202
            iz, iy, ix = (
                np.floor((v - (t - s / 2)) / s + 1e-9).astype(np.int64)
                for v, t, s in zip((z, y, x), g.translation, g.scale)
            )
            out = np.where(ix < 16, 1, np.where(iy < 20, 2, np.where((iz >= 8) & (iz < 28), 3, 0)))
            return np.where((ix >= 28) & (iy >= 28), 1, out)

        return fn

    scores = {}
    for c in sel:
        fn = per_crop_fn(c)
        m = tmp_path / f"m{c.crop}.csv"
        write_manifest(m, [c], lambda _: classes)
        s = run_export(
            load_config(wd.root),
            wd,
            m,
            out_dir=tmp_path / f"out{c.crop}",
            array_predictor_factory=lambda mm, w, cc, fn=fn: onehot_predictor(fn, n),
        )
        assert s["n_written"] == 3, s
        row = read_manifest(m)[0]
        truth = _truth_at(fn, row)
        store = zarr.open_group(str(tmp_path / f"out{c.crop}" / "submission.zarr"), mode="r")
        for k, cls in enumerate(classes, start=1):
            got = store[f"crop{c.crop}"][cls][...].astype(bool)
            assert (truth == k).any()
            scores[(c.crop, cls)] = _iou(got, truth == k)
    print("perfect-predictor IoU:", {f"{a}/{b}": round(v, 4) for (a, b), v in scores.items()})
    assert min(scores.values()) >= 0.99, scores


def test_interpolation_and_footprint_beat_nearest(real_tree, tmp_path: Path) -> None:  # noqa: ANN001
    """Realistic truth (spheres in world space, not aligned to any grid): the export's
    probability interpolation beats copying the nearest training label on a finer crop, and
    the footprint average beats one sub-voxel on a coarser crop."""
    real = {c.crop: c for c in real_test_crops()}
    fine = shrink(real["557"], 240)
    coarse = shrink(real["985"], 480)
    rng = np.random.default_rng(0)

    def spheres(c: Crop, r_nm: tuple[float, float], k: int):  # noqa: ANN202
        lo = np.array(c.translation)
        hi = lo + np.array(c.shape) * np.array(c.voxel_size)
        cen = lo + rng.random((k, 3)) * (hi - lo)
        rad = r_nm[0] + rng.random(k) * (r_nm[1] - r_nm[0])
        cls = rng.integers(1, 3, k)

        def fn(z, y, x):  # noqa: ANN001, ANN202
            out = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.int64)
            for cc, rr, kk in zip(cen, rad, cls):
                out[(z - cc[0]) ** 2 + (y - cc[1]) ** 2 + (x - cc[2]) ** 2 <= rr**2] = kk
            return out

        return fn

    classes = ["ecs", "pm"]
    n = 3
    results = {}
    for c, radii, k_sph, ss in ((fine, (12.0, 40.0), 30, 4), (coarse, (40.0, 120.0), 12, 2)):
        tree = build_tree(tmp_path / f"data{c.crop}", [c])
        wd = make_wd(tmp_path / c.crop, classes, [8.0], tree)
        fn = spheres(c, radii, k_sph)
        m = tmp_path / f"m{c.crop}.csv"
        write_manifest(m, [c], lambda _: classes)
        out = tmp_path / f"out{c.crop}"
        s = run_export(
            load_config(wd.root),
            wd,
            m,
            out_dir=out,
            array_predictor_factory=lambda mm, w, cc: fraction_predictor(fn, n, ss),
        )
        assert s["n_written"] == 2
        row = read_manifest(m)[0]
        plan = plan_em(tree, row, (None, 8.0, 8.0))
        g = plan.grid
        rng_t = [
            needed_range(o, ot, 0, k, ts, tt)
            for o, ot, k, ts, tt in zip(row.voxel_size, row.translation, row.shape, g.scale, g.translation)
        ]
        win = g.window(tuple(a for a, _ in rng_t), tuple(b for _, b in rng_t))
        prob_t = fraction_predictor(fn, n, ss)(np.zeros(win.shape, np.float32), win)
        lab_t = prob_t.argmax(0)
        # nearest training voxel of each manifest voxel centre ("one sub-voxel" when coarser)
        idx = [
            np.clip(np.floor((t + np.arange(k) * o - (wt - ws / 2)) / ws).astype(int), 0, w - 1)
            for t, o, k, wt, ws, w in zip(
                row.translation, row.voxel_size, row.shape, win.translation, win.scale, win.shape
            )
        ]
        nearest = lab_t[np.ix_(*idx)]
        if c is fine:
            truth = _truth_at(fn, row)
        else:  # coarse truth: the majority over each voxel's footprint (how a coarse label is made)
            truth = fraction_predictor(fn, n, ss=4)(np.zeros(row.shape, np.float32), row.box).argmax(0)
        store = zarr.open_group(str(out / "submission.zarr"), mode="r")
        for k, cls in enumerate(classes, start=1):
            got = store[f"crop{c.crop}"][cls][...].astype(bool)
            results[(c.crop, cls)] = (_iou(got, truth == k), _iou(nearest == k, truth == k))
        # the weights are what the docstring says: footprint rows sum to 1 and nest exactly
        w = axis_weights(row.voxel_size[1], row.translation[1], 0, 2, g.scale[1], g.translation[1], 0, 12)
        np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    print("export vs nearest IoU:", {f"{a}/{b}": tuple(round(x, 4) for x in v) for (a, b), v in results.items()})
    for key, (ours, near) in results.items():
        assert ours > near, (key, ours, near)


def test_unfetched_em_fails_with_the_fetch_command(tmp_path: Path) -> None:
    real = {c.crop: c for c in real_test_crops()}
    sel = [shrink(real["985"]), shrink(real["558"])]
    tree = build_tree(tmp_path / "data", sel, unfetched={"985"})
    m = tmp_path / "m.csv"
    write_manifest(m, sel, lambda _: ["ecs", "nuc", "mito"])
    wd = make_wd(tmp_path, ["ecs", "mito_mem"], [8.0], tree)
    s = run_export(
        load_config(wd.root),
        wd,
        m,
        array_predictor_factory=lambda mm, w, c: onehot_predictor(lambda z, y, x: (z // 50) % 3, 3),
    )
    # crop 985 (32 nm) has EM only at s2/s3: no silent prediction at 4x the training voxel
    assert set(s["failed"]) == {"crop985/ecs", "crop985/mito"}
    assert "csc fetch-data --crops 985 --fetch-all-em-resolutions" in s["failed"]["crop985/ecs"]
    assert "never fetched" in s["failed"]["crop985/ecs"]
    # nuc is not trained: a reason naming the fix, not a failure
    assert set(s["untrained"]) == {"crop985/nuc", "crop558/nuc"}
    assert "to `classes:`" in s["untrained"]["crop558/nuc"]
    assert s["n_written"] == 2 and "mito_mem" in s["written"]["crop558/mito"]["note"]
    assert wd.marker("ensemble.export").status == "failed"
    # --members restricts the ensemble; an unknown member is bad input
    s = run_export(
        load_config(wd.root),
        wd,
        m,
        members=["dints_0"],
        out_dir=tmp_path / "o2",
        array_predictor_factory=lambda mm, w, c: onehot_predictor(lambda z, y, x: (z // 50) % 3, 3),
    )
    assert s["members"] == ["dints_0"]
    with pytest.raises(Exception, match="not a trained bundle"):
        run_export(load_config(wd.root), wd, m, members=["nope_0"])


def test_members_disagreeing_on_resolution_and_unrecorded(tmp_path: Path) -> None:
    real = {c.crop: c for c in real_test_crops()}
    sel = [shrink(real["558"])]
    tree = build_tree(tmp_path / "data", sel)
    m = tmp_path / "m.csv"
    write_manifest(m, sel, lambda _: ["ecs"])
    wd = make_wd(tmp_path, ["ecs"], [8.0], tree)
    (wd.root / "dints_0" / "cellmap_bundle.json").write_text(json.dumps({"resolution_nm": [4]}))
    with pytest.raises(Exception, match="different resolutions"):
        run_export(load_config(wd.root), wd, m)
    (wd.root / "dints_0" / "cellmap_bundle.json").write_text("{}")
    with pytest.raises(Exception, match="training resolution is not recorded"):
        run_export(load_config(wd.root), wd, m, members=["dints_0"])


def _one_row_manifest(path: Path, crop_name: str, cls: str) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["crop_name", "dataset", "class_label", "voxel_size", "translation", "shape"])
        w.writerow([crop_name, "jrc_mus-kidney", cls, "[8;8;8]", "[4;4;4]", "[4;4;4]"])
    return path


@pytest.mark.parametrize(
    "crop_name,cls",
    [
        ("crop901/../../..", "ecs"),
        ("../901", "ecs"),
        ("901\n", "ecs"),
        ("901", "a/b"),
        ("901", ".."),
        ("901", "ecs/../../x"),
        ("crop 901", "ecs"),
        ("/etc", "ecs"),
    ],
)
def test_path_traversal_refused(tmp_path: Path, crop_name: str, cls: str) -> None:
    with pytest.raises(Exception, match="refused") as exc:
        read_manifest(_one_row_manifest(tmp_path / "m.csv", crop_name, cls))
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value).replace(repr(crop_name), "")


def test_path_traversal_cli_exit_2_writes_nothing(tmp_path: Path) -> None:
    m = _one_row_manifest(tmp_path / "m.csv", "crop901/../../..", "ecs")
    wd = tmp_path / "w"
    wd.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.ensemble.export",
            "--work-dir",
            str(wd),
            "--manifest",
            str(m),
            "--data-root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "refused crop_name 'crop901/../../..'" in lines[0], res.stderr
    assert victim.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "victim.txt", "w"]


def test_inside_refuses_escapes(tmp_path: Path) -> None:
    from stages.ensemble.export import inside

    assert inside(tmp_path, "crop1", "ecs") == (tmp_path / "crop1" / "ecs").resolve()
    for bad in (("..",), ("crop1", "..", ".."), ("/etc",), (".",)):
        with pytest.raises(Exception, match="outside"):
            inside(tmp_path, *bad)


def test_blockwise_instances_equal_whole_volume_components(tmp_path: Path) -> None:
    from scipy import ndimage

    from common.blockwise import BlockwiseInstances, iter_blocks

    rng = np.random.default_rng(1)
    mask = ndimage.binary_opening(rng.random((30, 41, 37)) > 0.55)
    ref, _ = ndimage.label(mask)
    sizes = np.bincount(ref.ravel())
    keep = sizes >= 5
    keep[0] = False
    inst = BlockwiseInstances(tmp_path / "tmp.zarr", mask.shape, (8, 8, 8), min_voxels=5)
    for sl in iter_blocks(mask.shape, (11, 14, 13)):  # blocks not aligned with the chunks
        inst.add(sl, mask[sl])
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=mask.shape, chunks=(8, 8, 8), dtype=np.uint16)
    k = inst.finish(lambda dtype: out if dtype == np.uint16 else None)
    got = out[...]
    assert k == int(keep.sum()) and got.max() == k and not (tmp_path / "tmp.zarr").exists()
    # same partition: every kept reference component maps to exactly one id and back
    kept = keep[ref]
    assert ((got > 0) == kept).all()
    pairs = {(a, b) for a, b in zip(ref[kept].ravel(), got[kept].ravel())}
    assert len(pairs) == k == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_training_voxel_not_a_multiple_of_em_s0_fails_the_crop(tmp_path: Path) -> None:
    real = {c.crop: c for c in real_test_crops()}
    sel = [shrink(real["557"]), shrink(real["558"])]  # ctl EM s0 z 3.48 nm; kidney 8 nm
    tree = build_tree(tmp_path / "data", sel)
    m = tmp_path / "m.csv"
    write_manifest(m, sel, lambda _: ["ecs"])
    wd = make_wd(tmp_path, ["ecs"], [8.0, 8.0, 8.0], tree)  # isotropic 8 nm: 8 / 3.48 is not whole
    s = run_export(
        load_config(wd.root),
        wd,
        m,
        array_predictor_factory=lambda mm, w, c: onehot_predictor(lambda z, y, x: (z // 50) % 2, 2),
    )
    assert list(s["failed"]) == ["crop557/ecs"] and "not a whole multiple of EM s0" in s["failed"]["crop557/ecs"]
    assert s["n_written"] == 1


def test_em_level_path_escaping_its_group_is_refused(tmp_path: Path) -> None:
    import shutil

    real = {c.crop: c for c in real_test_crops()}
    sel = [shrink(real["558"])]
    tree = build_tree(tmp_path / "data", sel)
    group = tree / "jrc_mus-kidney" / "jrc_mus-kidney.zarr" / EM_GROUP
    shutil.copytree(group / "s0", group.parent / "elsewhere" / "s0")  # real data, outside the group
    attrs = json.loads((group / ".zattrs").read_text())
    attrs["multiscales"][0]["datasets"][0]["path"] = "../elsewhere/s0"
    (group / ".zattrs").write_text(json.dumps(attrs))
    m = tmp_path / "m.csv"
    write_manifest(m, sel, lambda _: ["ecs"])
    wd = make_wd(tmp_path, ["ecs"], [8.0], tree)
    s = run_export(
        load_config(wd.root),
        wd,
        m,
        array_predictor_factory=lambda mm, w, c: onehot_predictor(lambda z, y, x: (z // 50) % 2, 2),
    )
    reason = s["failed"]["crop558/ecs"]
    assert s["n_written"] == 0 and "'../elsewhere/s0' is not an array of this group" in reason, reason
