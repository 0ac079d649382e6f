"""The challenge metric (common/metrics.py) on hand-computed cases, and the evaluate stage.

Geometry: voxel size (z, y, x) = (2, 4, 4) nm (anisotropic like the real 2.62/2/2 crops),
so ||v|| = sqrt(4 + 16 + 16) = 6 nm; crops of (32, 16, 16) voxels = (64, 64, 64) nm, so an
unmatched object sits at the cap min(64, 64, 64) / 2 = 32 nm. Every expected number below
is worked out by hand from the documented definition, not read back from the code.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common import metrics as M

VS = (2.0, 4.0, 4.0)
SHAPE = (32, 16, 16)
NORM = 6.0  # ||(2, 4, 4)||
CAP = 32.0


def box(x0: int, x1: int, value: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """A 4 (z) x 4 (y) x (x1-x0) (x) block at z, y 0..4, written into ``out``."""
    a = np.zeros(SHAPE, dtype=np.uint16) if out is None else out
    a[0:4, 0:4, x0:x1] = value
    return a


def h(d: float) -> float:
    return 1.01 ** (-d / NORM)


def test_perfect() -> None:
    truth = box(0, 4, 1)
    box(8, 12, 2, truth)
    c = M.instance_counts(truth.copy(), truth, VS)
    s = M.instance_scores(c)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)
    assert s["f1"] == 1.0 and s["normalized_hausdorff"] == 1.0 and s["combined"] == 1.0
    assert M.semantic_counts(truth > 0, truth > 0) == (128, 0, 0)


def test_empty_prediction_and_missing_label() -> None:
    truth = box(0, 4, 1)
    box(8, 12, 2, truth)
    assert M.distance_cap(VS, SHAPE) == CAP
    for pred in (np.zeros(SHAPE, np.uint8), None):  # an empty array and a missing array score alike
        s = M.instance_scores(M.instance_counts(pred, truth, VS))
        assert (s["tp"], s["fp"], s["fn"]) == (0, 0, 2)
        assert s["f1"] == 0.0
        assert s["normalized_hausdorff"] == pytest.approx(h(CAP))  # both objects at the cap
        assert s["combined"] == 0.0
        tp, fp, fn = M.semantic_counts(pred, truth)
        assert (tp, fp, fn) == (0, 0, 128)
        assert M.iou_from_counts(tp, fp, fn) == 0.0


def test_split_instance() -> None:
    # truth: one 4x4x8 object (128 voxels); prediction: two touching objects of 64 voxels each
    truth = box(0, 8, 1)
    pred = box(0, 4, 1)
    box(4, 8, 2, pred)
    s = M.instance_scores(M.instance_counts(pred, truth, VS))
    # one match (IoU 64/128 = 0.5 with either half), the other half is a false positive
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["f1"] == pytest.approx(2 / 3)  # 2*1 / (2*1 + 1 + 0)
    # farthest truth voxel from the matched half: 4 voxels along x = 16 nm
    assert s["mean_hausdorff_nm"] == pytest.approx(16.0)
    assert s["normalized_hausdorff"] == pytest.approx(h(16.0))
    assert s["combined"] == pytest.approx(math.sqrt(2 / 3 * h(16.0)))
    assert M.semantic_counts(pred, truth) == (128, 0, 0)  # semantically perfect


def test_merged_instances() -> None:
    # truth: two 64-voxel objects at x 0..4 and 5..9; prediction: one object x 0..9 (144 voxels)
    truth = box(0, 4, 1)
    box(5, 9, 2, truth)
    pred = box(0, 9, 7)
    assert M.match_objects(*M.connected_objects(truth)[:1], *M.connected_objects(pred)[:1], 2, 1)[0][
        2
    ] == pytest.approx(64 / 144)
    s = M.instance_scores(M.instance_counts(pred, truth, VS))
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1)
    assert s["f1"] == pytest.approx(2 / 3)
    # matched: farthest prediction voxel 5 voxels (20 nm) from its object; unmatched: cap 32 nm
    assert s["mean_hausdorff_nm"] == pytest.approx((20.0 + CAP) / 2)
    assert s["normalized_hausdorff"] == pytest.approx((h(20.0) + h(CAP)) / 2)
    assert s["combined"] == pytest.approx(math.sqrt(2 / 3 * (h(20.0) + h(CAP)) / 2))
    tp, fp, fn = M.semantic_counts(pred, truth)
    assert (tp, fp, fn) == (128, 16, 0)
    assert M.iou_from_counts(tp, fp, fn) == pytest.approx(8 / 9)


def test_shifted() -> None:
    truth = box(0, 4, 1)
    pred = box(1, 5, 1)
    s = M.instance_scores(M.instance_counts(pred, truth, VS))
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0) and s["f1"] == 1.0
    assert s["mean_hausdorff_nm"] == pytest.approx(4.0)  # one voxel along x
    assert s["combined"] == pytest.approx(math.sqrt(h(4.0)))
    tp, fp, fn = M.semantic_counts(pred, truth)
    assert (tp, fp, fn) == (48, 16, 16)
    assert M.iou_from_counts(tp, fp, fn) == pytest.approx(0.6)
    assert M.dice_from_counts(tp, fp, fn) == pytest.approx(0.75)


def test_matching_is_maximum_then_min_cost() -> None:
    # along one line: T1 = 0..10, T2 = 10..14, P1 = 4..12, P2 = 0..3.
    # IoU(T1,P1) = 6/12 = .5, IoU(T2,P1) = 2/10 = .2, IoU(T1,P2) = 3/10 = .3.
    # Greedy by IoU would take T1-P1 and leave T2 unmatched; the maximum matching has two.
    t = np.zeros((1, 1, 16), np.int64)
    p = np.zeros((1, 1, 16), np.int64)
    t[..., 0:10], t[..., 10:14] = 1, 2
    p[..., 4:12], p[..., 0:3] = 1, 2
    got = M.match_objects(t, p, 2, 2)
    assert [(a, b) for a, b, _ in got] == [(1, 2), (2, 1)]
    assert [iou for *_, iou in got] == pytest.approx([0.3, 0.2])


def test_cutoff_and_unknown_and_overall() -> None:
    truth = box(0, 4, 1)  # nG = 1: cutoff at nP > 10 + 50 e^-0.2 = 50.9
    pred = np.zeros(SHAPE, np.uint16)
    pred[16:32:2, 8:16:2, 0:16:2] = 1  # 8*4*8 = 256 isolated voxels = 256 objects
    assert M.cutoff_exceeded(1, 51) and not M.cutoff_exceeded(1, 50)
    s = M.instance_scores(M.instance_counts(pred, truth, VS, crop="crop1"))
    assert (s["tp"], s["fp"], s["fn"]) == (0, 256, 1) and s["cutoff_crops"] == ["crop1"]
    # unknown truth voxels are left out of both sides
    unknown = np.zeros(SHAPE, bool)
    unknown[:, :, 2:] = True
    assert M.semantic_counts(box(0, 8, 1), box(0, 4, 1), unknown) == (32, 0, 0)
    o = M.overall_score({"ecs": 0.64, "pm": None}, {"nuc": 0.25})
    assert o["overall"] == pytest.approx(math.sqrt(0.64 * 0.25)) and o["mean_semantic_iou"] == 0.64
    assert M.overall_score({"ecs": 0.5}, {})["overall"] == 0.5


def test_pooled_not_averaged_over_cases() -> None:
    # case 1: TP 1 FN 0 (Dice 1); case 2: TP 0 FN 3 (Dice 0). Pooled: 2*1/(2+3) = 0.4, not 0.5
    g1, p1 = np.array([[[1]]]), np.array([[[1]]])
    g2, p2 = np.array([[[1, 1, 1]]]), np.array([[[0, 0, 0]]])
    m = M.confusion_matrix(p1, g1, 2, 0) + M.confusion_matrix(p2, g2, 2, 0)
    assert M.pooled_dice(m)[0] == pytest.approx(0.4)
    assert M.summarize(m, ["ecs"])["mean_iou"] == pytest.approx(0.25)


# ---- the evaluate stage on zarr stores ------------------------------------------------------
def _truth_zarr(root: Path, arrays: dict[tuple[str, str], np.ndarray]) -> Path:
    """The challenge's groundtruth layout: <ds>.zarr/recon-1/labels/groundtruth/crop<id>/<class>/s0."""
    import zarr

    path = root / "jrc_test.zarr"
    g = zarr.open_group(str(path), mode="w")
    gt = g.require_group("recon-1/labels/groundtruth")
    g.require_group("recon-1/em/fibsem-uint8")  # not a crop: skipped by the walk
    for (crop, cls), a in arrays.items():
        cg = gt.require_group(crop).require_group(cls)
        cg.attrs["multiscales"] = [
            {
                "version": "0.4",
                "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
                "datasets": [
                    {
                        "path": "s0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": list(VS)},
                            {"type": "translation", "translation": [1.0, 2.0, 2.0]},
                        ],
                    }
                ],
            }
        ]
        cg.create_dataset("s0", data=a, chunks=(16, 16, 16))
    return path


def _submission(path: Path, arrays: dict[tuple[str, str], np.ndarray]) -> Path:
    """The challenge's submission: submission.zarr/crop<id>/<class> plain arrays (zip or directory)."""
    import zarr

    store = (
        zarr.ZipStore(str(path), mode="w")
        if path.suffix == ".zip"
        else zarr.DirectoryStore(str(path / "submission.zarr"))
    )
    g = zarr.group(store=store)
    for (crop, cls), a in arrays.items():
        arr = g.require_group(crop).create_dataset(cls, data=a, chunks=(16, 16, 16))
        arr.attrs.update(voxel_size=list(VS), translation=[1.0, 2.0, 2.0], shape=list(a.shape))
    if hasattr(store, "close"):
        store.close()
    return path


def test_evaluate_stage_reproduces_hand_computed_scores(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stages.evaluate.__main__ import main as evaluate_cli

    ecs1, ecs1_pred = box(0, 4, 1), box(1, 5, 1)  # shifted: TP 48, FP 16, FN 16
    ecs1[20:24, 8:12, 8:12] = 255  # unknown truth ...
    ecs1_pred[20:24, 8:12, 8:12] = 1  # ... where a prediction is not a false positive
    nuc1 = box(0, 4, 1)
    box(5, 9, 2, nuc1)  # two objects, merged in the prediction
    mito2 = box(0, 4, 3)
    box(8, 12, 9, mito2)
    truth = _truth_zarr(
        tmp_path,
        {("crop1", "ecs"): ecs1, ("crop1", "nuc"): nuc1, ("crop2", "ecs"): box(0, 4, 1), ("crop2", "mito"): mito2},
    )
    pred = {
        ("crop1", "ecs"): ecs1_pred.astype(np.uint8),
        ("crop1", "nuc"): box(0, 9, 1).astype(np.uint32),
        ("crop2", "ecs"): box(0, 4, 1).astype(np.uint8),
    }  # crop2/mito is missing
    sub_zip = _submission(tmp_path / "submission.zip", pred)
    res = CliRunner().invoke(
        evaluate_cli, ["--truth", str(truth), "--submission", str(sub_zip), "--out", str(tmp_path / "out")]
    )
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "out" / "evaluation.json").read_text())

    # by hand: ecs pooled over both crops TP 48+64, FP 16, FN 16
    assert (r["semantic"]["ecs"]["tp"], r["semantic"]["ecs"]["fp"], r["semantic"]["ecs"]["fn"]) == (112, 16, 16)
    assert r["semantic"]["ecs"]["iou"] == pytest.approx(112 / 144)
    nuc_combined = math.sqrt(2 / 3 * (h(20.0) + h(CAP)) / 2)  # the merged case
    assert r["instance"]["nuc"]["combined"] == pytest.approx(nuc_combined)
    # missing mito: both objects false negatives at the cap
    assert (r["instance"]["mito"]["tp"], r["instance"]["mito"]["fn"]) == (0, 2) and r["instance"]["mito"][
        "combined"
    ] == 0
    assert r["missing_in_submission"] == ["crop2/mito"]
    assert r["overall"] == pytest.approx(math.sqrt(112 / 144 * (nuc_combined + 0.0) / 2))
    md = (tmp_path / "out" / "evaluation.md").read_text()
    assert "| nuc | instance |" in md and "crop2/mito" in md
    assert (tmp_path / "out" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(sub_zip) as z:  # the submission really is a zarr inside a zip
        assert "crop1/ecs/.zarray" in z.namelist()

    # the same predictions as a folder holding submission.zarr score the same
    folder = _submission(tmp_path / "pred_folder", pred)
    res = CliRunner().invoke(
        evaluate_cli, ["--truth", str(truth), "--submission", str(folder), "--out", str(tmp_path / "out2")]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out2" / "evaluation.json").read_text())["overall"] == r["overall"]


def test_evaluate_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stages.evaluate.__main__ import main as evaluate_cli

    truth = _truth_zarr(tmp_path, {("crop1", "ecs"): box(0, 4, 1)})
    wrong = _submission(tmp_path / "s.zip", {("crop1", "ecs"): np.zeros((8, 8, 8), np.uint8)})
    for sub, needle in ((wrong, "has shape [8, 8, 8], the truth [32, 16, 16]"), (tmp_path / "nope.zip", "not found")):
        res = CliRunner().invoke(
            evaluate_cli, ["--truth", str(truth), "--submission", str(sub), "--out", str(tmp_path / "o")]
        )
        assert res.exit_code == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], res.output


def test_trainer_validation_is_the_pooled_score(tmp_path: Path) -> None:
    """training.trainer.validate selects on pooled per-class Dice, not the mean of per-case Dice."""
    import torch

    from common.nifti import save_nifti, spacing_affine
    from training.trainer import validate

    class Oracle(torch.nn.Module):
        """Predicts the class whose value the (range-scaled) image holds: the image is the prediction."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x * 3.0
            return torch.cat([-((v - c) ** 2) for c in range(3)], dim=1) * 10.0

    aff = spacing_affine((8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
    # case A: class 1 (512 voxels) right, class 2 (8 voxels) missed; unknown voxels predicted as 1
    lab_a = np.zeros((16, 16, 16), np.uint8)
    lab_a[0:8, 0:8, 0:8] = 1
    lab_a[12:14, 12:14, 12:14] = 2
    lab_a[:, :, 15] = 255
    img_a = np.where(lab_a == 1, 1, 0).astype(np.float32)
    img_a[:, :, 15] = 1
    # case B: class 2 (100 voxels) right, no class 1 anywhere
    lab_b = np.zeros((16, 16, 16), np.uint8)
    lab_b[0:4, 0:5, 0:5] = 2
    img_b = np.where(lab_b == 2, 2, 0).astype(np.float32)
    items = []
    for name, img, lab in (("a", img_a, lab_a), ("b", img_b, lab_b)):
        save_nifti(tmp_path / f"{name}_image.nii.gz", img, aff)
        save_nifti(tmp_path / f"{name}_label.nii.gz", lab, aff)
        items.append({"image": str(tmp_path / f"{name}_image.nii.gz"), "label": str(tmp_path / f"{name}_label.nii.gz")})
    cfg = {
        "intensity_bounds": [0.0, 3.0],
        "unknown_label": 255,
        "roi_size": [16, 16, 16],
        "output_classes": 3,
        "amp": False,
        "sw_batch_size": 1,
        "sw_overlap": 0.25,
    }
    dice = validate(Oracle(), cfg, items, torch.device("cpu"))
    # pooled by hand: class 1 TP 512 (unknown voxels excluded); class 2 TP 100, FN 8 -> 200 / 208
    assert dice[0] == pytest.approx(1.0)
    assert dice[1] == pytest.approx(200 / 208)  # the per-case mean would be (0 + 1) / 2 = 0.5
