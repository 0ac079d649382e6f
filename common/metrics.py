"""The CellMap challenge's scores, written from its documented definition (numpy + scipy only).

Torch-free: used by the ensemble report and ``python -m stages.evaluate`` (the trainer's
validation carries its own copy of the pooled Dice). Definitions (the challenge's published
scorer at csc HEAD, which pools counts; docs/evaluation.md):

**Semantic classes.** TP/FP/FN voxels are summed over every crop (or case) of a class
first; then ``IoU = TP / (TP+FP+FN)`` and ``Dice = 2TP / (2TP+FP+FN)``. Unknown voxels of
the truth are excluded. A class with no truth and no prediction anywhere has no score
(``None``) and is left out of the means.

**Instance classes.** Per crop, each side is relabelled into connected components
(every distinct non-zero id split into its 26-connected parts, so a binary mask becomes
objects and a merged prediction stays one object). Truth and prediction objects are
matched one-to-one over every pair with IoU > 0 by a min-cost maximum matching (cost
``1 - IoU``; first as many matches as possible, then the smallest total cost; no 0.5
threshold). Pooled per class: ``F1 = 2TP / (2TP+FP+FN)`` with TP = matches, FP =
unmatched predictions, FN = unmatched truth objects. Each truth object gets a Hausdorff
distance in nm to its match (symmetric, over the voxel centres of both objects, capped)
or the cap ``min(voxel_size * shape) / 2`` when unmatched; it is normalised as
``1.01 ** (-d / ||voxel_size||)`` and averaged over every truth object of the class
(``H``). ``combined = sqrt(F1 * H)``. *Cutoff*: a crop whose prediction has
``nP / nG > 10 + 50 * exp(-nG / 5)`` objects is not matched at all (every truth object
unmatched, every prediction a false positive).

**Overall** = ``sqrt(mean instance combined * mean semantic IoU)`` over the scored
classes; when only one kind of class is scored, its mean alone. A class missing from a
submission counts all its truth as false negatives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HAUSDORFF_BASE = 1.01


# ---- semantic: label maps (train / ensemble) -----------------------------------------------
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_classes: int, unknown_label: int) -> np.ndarray:
    """``M[g, p]`` = voxels with ground truth ``g`` predicted as ``p`` (int64, ``n_classes``²).

    Voxels whose ground truth is ``unknown_label`` (when it is not 0) or outside
    ``0..n_classes-1`` are excluded.

    Args:
        pred: predicted labels, any integer dtype, same shape as ``gt``.
        gt: ground-truth labels.
        n_classes: number of label values including background.
        unknown_label: the ignore value; 0 means there is none.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {gt.shape}")
    g = gt.reshape(-1)
    p = pred.reshape(-1)
    valid = (g >= 0) & (g < n_classes)
    if unknown_label and unknown_label < n_classes:
        valid &= g != unknown_label
    p_valid = p[valid].astype(np.int64)
    if p_valid.size and (p_valid.min() < 0 or p_valid.max() >= n_classes):
        raise ValueError(f"prediction holds values outside 0..{n_classes - 1}")
    idx = g[valid].astype(np.int64) * n_classes + p_valid
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_scores(matrix: np.ndarray) -> dict[str, list[float]]:
    """Per foreground class (1..C-1): ``dice``, ``iou``, ``tp``, ``fp``, ``fn`` from a confusion matrix.

    NaN Dice/IoU for a class with no truth and no prediction.
    """
    m = np.asarray(matrix, dtype=np.float64)
    out: dict[str, list[float]] = {"dice": [], "iou": [], "tp": [], "fp": [], "fn": []}
    for c in range(1, m.shape[0]):
        tp = m[c, c]
        fp = m[:, c].sum() - tp
        fn = m[c, :].sum() - tp
        out["tp"].append(float(tp))
        out["fp"].append(float(fp))
        out["fn"].append(float(fn))
        out["dice"].append(dice_from_counts(tp, fp, fn))
        out["iou"].append(iou_from_counts(tp, fp, fn))
    return out


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """``2TP / (2TP+FP+FN)``; NaN when all three are 0."""
    d = 2 * tp + fp + fn
    return float(2 * tp / d) if d else math.nan


def iou_from_counts(tp: float, fp: float, fn: float) -> float:
    """``TP / (TP+FP+FN)``; NaN when all three are 0."""
    d = tp + fp + fn
    return float(tp / d) if d else math.nan


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the values that are neither None nor NaN (NaN when there are none)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(sum(vals) / len(vals)) if vals else math.nan


def none_if_nan(v: float | None) -> float | None:
    """JSON-friendly: ``None`` for NaN."""
    return None if v is None or math.isnan(v) else float(v)


def summarize(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Pooled scores of one model from its pooled confusion matrix.

    Returns:
        ``{"per_class": {name: {dice, iou, tp, fp, fn}}, "mean_dice", "mean_iou"}``; unscored
        values (no truth and no prediction) are ``None``.
    """
    s = class_scores(matrix)
    return {
        "per_class": {
            name: {
                "dice": none_if_nan(s["dice"][i]),
                "iou": none_if_nan(s["iou"][i]),
                "tp": s["tp"][i],
                "fp": s["fp"][i],
                "fn": s["fn"][i],
            }
            for i, name in enumerate(class_names)
        },
        "mean_dice": none_if_nan(nanmean(s["dice"])),
        "mean_iou": none_if_nan(nanmean(s["iou"])),
    }


def pooled_dice(matrix: np.ndarray) -> np.ndarray:
    """Per foreground class pooled Dice (NaN: no truth and no prediction), what selection uses."""
    return np.asarray(class_scores(matrix)["dice"], dtype=np.float64)


# ---- semantic: one binary class -------------------------------------------------------------
def semantic_counts(
    pred: np.ndarray | None, truth: np.ndarray, unknown: np.ndarray | None = None
) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` voxels of one binary class; ``pred=None`` is a missing label (all FN).

    Args:
        pred: predicted mask (non-zero = class).
        truth: true mask (non-zero = class).
        unknown: voxels to leave out (truth unknown), or None.
    """
    t = np.asarray(truth) != 0
    keep = None if unknown is None else ~np.asarray(unknown, dtype=bool)
    if keep is not None:
        t = t & keep
    if pred is None:
        return 0, 0, int(t.sum())
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    p = np.asarray(pred) != 0
    if keep is not None:
        p = p & keep
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


# ---- instance ------------------------------------------------------------------------------
def connected_objects(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel ``ids`` so each object is one 26-connected part of one non-zero id (1..n).

    Two touching objects with different ids stay apart; one id in two parts becomes two.
    """
    from scipy import ndimage

    arr = np.asarray(ids)
    structure = np.ones((3,) * arr.ndim, dtype=bool)
    if arr.dtype == bool or (arr.size and int(arr.max(initial=0)) <= 1 and int(arr.min(initial=0)) >= 0):
        out, n = ndimage.label(arr != 0, structure=structure)
        return out.astype(np.int64, copy=False), int(n)
    # compact ids first: find_objects allocates one entry per id value
    values, compact = np.unique(arr, return_inverse=True)
    compact = compact.reshape(arr.shape)
    if values[0] <= 0:  # background (and any negative value) -> 0
        compact = np.where(values[compact] > 0, compact - (np.searchsorted(values, 1) - 1), 0)
    else:
        compact = compact + 1
    out = np.zeros(arr.shape, dtype=np.int64)
    n = 0
    for v, sl in enumerate(ndimage.find_objects(compact), start=1):
        if sl is None:
            continue
        lab, k = ndimage.label(compact[sl] == v, structure=structure)
        if k:
            view = out[sl]
            m = lab > 0
            view[m] = lab[m] + n
            n += k
    return out, n


def match_objects(truth: np.ndarray, pred: np.ndarray, n_truth: int, n_pred: int) -> list[tuple[int, int, float]]:
    """One-to-one matching of objects (ids 1..n) over pairs with IoU > 0.

    Maximum number of matches, then minimum total cost ``1 - IoU`` (each connected part of
    the overlap graph is solved on its own with ``linear_sum_assignment``; a non-overlapping
    pair costs more than any set of real matches, so it is only chosen when nothing else is
    left, and then dropped).

    Returns:
        ``[(truth id, pred id, IoU)]``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n_truth == 0 or n_pred == 0:
        return []
    t = truth.reshape(-1)
    p = pred.reshape(-1)
    both = (t > 0) & (p > 0)
    if not both.any():
        return []
    pair = t[both].astype(np.int64) * (n_pred + 1) + p[both].astype(np.int64)
    keys, inter = np.unique(pair, return_counts=True)
    ti, pi = keys // (n_pred + 1), keys % (n_pred + 1)
    size_t = np.bincount(t, minlength=n_truth + 1)
    size_p = np.bincount(p, minlength=n_pred + 1)
    iou = inter / (size_t[ti] + size_p[pi] - inter)
    # connected parts of the bipartite overlap graph (truth nodes 0..nT-1, pred nodes nT..)
    g = coo_matrix((np.ones(len(ti)), (ti - 1, n_truth + pi - 1)), shape=(n_truth + n_pred,) * 2)
    _, comp = connected_components(g, directed=False)
    edge_comp = comp[ti - 1]
    matches: list[tuple[int, int, float]] = []
    for c in np.unique(edge_comp):
        sel = edge_comp == c
        ts, ps = np.unique(ti[sel]), np.unique(pi[sel])
        if len(ts) == 1 and len(ps) == 1:
            matches.append((int(ts[0]), int(ps[0]), float(iou[sel][0])))
            continue
        big = float(min(len(ts), len(ps)) + 1)
        cost = np.full((len(ts), len(ps)), big)
        r = np.searchsorted(ts, ti[sel])
        q = np.searchsorted(ps, pi[sel])
        cost[r, q] = 1.0 - iou[sel]
        rows, cols = linear_sum_assignment(cost)
        for a, b in zip(rows, cols):
            if cost[a, b] < big:
                matches.append((int(ts[a]), int(ps[b]), float(1.0 - cost[a, b])))
    return sorted(matches)


def hausdorff_nm(a: np.ndarray, b: np.ndarray, voxel_size: Sequence[float]) -> float:
    """Symmetric Hausdorff distance in nm between two non-empty masks (voxel centres)."""
    from scipy import ndimage

    both = a | b
    sl = ndimage.find_objects(both.astype(np.uint8))[0]
    a, b = a[sl], b[sl]
    vs = [float(v) for v in voxel_size]
    d_to_b = ndimage.distance_transform_edt(~b, sampling=vs)
    d_to_a = ndimage.distance_transform_edt(~a, sampling=vs)
    return float(max(d_to_b[a].max(initial=0.0), d_to_a[b].max(initial=0.0)))


def distance_cap(voxel_size: Sequence[float], shape: Sequence[int]) -> float:
    """The distance of an unmatched truth object: ``min(voxel_size * shape) / 2`` nm."""
    return float(min(float(v) * int(n) for v, n in zip(voxel_size, shape)) / 2.0)


def normalized_distance(d: float, voxel_size: Sequence[float]) -> float:
    """``1.01 ** (-d / ||voxel_size||)``: 1 for a perfect boundary, toward 0 far away."""
    norm = float(np.linalg.norm(np.asarray(voxel_size, dtype=np.float64)))
    return float(HAUSDORFF_BASE ** (-d / norm))


def cutoff_exceeded(n_truth: int, n_pred: int) -> bool:
    """The challenge's instance cutoff: ``nP / nG > 10 + 50 * exp(-nG / 5)``."""
    if n_pred == 0:
        return False
    if n_truth == 0:
        return True
    return n_pred / n_truth > 10.0 + 50.0 * math.exp(-n_truth / 5.0)


@dataclass
class InstanceCounts:
    """One instance class's counts, summable over crops."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    n_truth: int = 0
    n_pred: int = 0
    h_sum: float = 0.0  # sum of normalised distances over truth objects
    d_sum: float = 0.0  # sum of distances (nm), for the report
    cutoff_crops: list[str] = field(default_factory=list)

    def add(self, other: InstanceCounts) -> None:
        """Pool another crop's counts into these."""
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.n_truth += other.n_truth
        self.n_pred += other.n_pred
        self.h_sum += other.h_sum
        self.d_sum += other.d_sum
        self.cutoff_crops += other.cutoff_crops


def instance_counts(
    pred: np.ndarray | None, truth: np.ndarray, voxel_size: Sequence[float], crop: str = ""
) -> InstanceCounts:
    """Match one crop's objects and count; ``pred=None`` is a missing label (all FN, at the cap)."""
    t, n_t = connected_objects(truth)
    cap = distance_cap(voxel_size, truth.shape)
    h_cap = normalized_distance(cap, voxel_size)
    if pred is None:
        return InstanceCounts(fn=n_t, n_truth=n_t, h_sum=n_t * h_cap, d_sum=n_t * cap)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    p, n_p = connected_objects(pred)
    if cutoff_exceeded(n_t, n_p):
        return InstanceCounts(
            fp=n_p,
            fn=n_t,
            n_truth=n_t,
            n_pred=n_p,
            h_sum=n_t * h_cap,
            d_sum=n_t * cap,
            cutoff_crops=[crop] if crop else ["?"],
        )
    from scipy import ndimage

    matches = match_objects(t, p, n_t, n_p)
    out = InstanceCounts(tp=len(matches), fp=n_p - len(matches), fn=n_t - len(matches), n_truth=n_t, n_pred=n_p)
    boxes_t, boxes_p = ndimage.find_objects(t), ndimage.find_objects(p)
    for ti, pi, _ in matches:
        bt, bp = boxes_t[ti - 1], boxes_p[pi - 1]
        win = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(bt, bp))
        d = min(hausdorff_nm(t[win] == ti, p[win] == pi, voxel_size), cap)
        out.d_sum += d
        out.h_sum += normalized_distance(d, voxel_size)
    n_unmatched = n_t - len(matches)
    out.d_sum += n_unmatched * cap
    out.h_sum += n_unmatched * h_cap
    return out


def instance_scores(c: InstanceCounts) -> dict[str, Any]:
    """F1, mean normalised distance, combined score of one class's pooled counts."""
    f1 = dice_from_counts(c.tp, c.fp, c.fn)  # 2TP/(2TP+FP+FN) over objects
    h = c.h_sum / c.n_truth if c.n_truth else (0.0 if c.n_pred else math.nan)
    combined = math.sqrt(f1 * h) if not (math.isnan(f1) or math.isnan(h)) else math.nan
    return {
        "f1": none_if_nan(f1),
        "normalized_hausdorff": none_if_nan(h),
        "mean_hausdorff_nm": (c.d_sum / c.n_truth) if c.n_truth else None,
        "combined": none_if_nan(combined),
        "tp": c.tp,
        "fp": c.fp,
        "fn": c.fn,
        "n_truth": c.n_truth,
        "n_pred": c.n_pred,
        "cutoff_crops": list(c.cutoff_crops),
    }


# ---- overall -------------------------------------------------------------------------------
def overall_score(
    semantic_iou: Mapping[str, float | None], instance_combined: Mapping[str, float | None]
) -> dict[str, Any]:
    """``sqrt(mean instance combined * mean semantic IoU)`` over scored classes.

    A kind with no scored class drops out (the other's mean is the overall score).
    """
    sem = nanmean(semantic_iou.values())
    ins = nanmean(instance_combined.values())
    if math.isnan(sem) and math.isnan(ins):
        overall = math.nan
    elif math.isnan(ins):
        overall = sem
    elif math.isnan(sem):
        overall = ins
    else:
        overall = math.sqrt(sem * ins)
    return {
        "overall": none_if_nan(overall),
        "mean_semantic_iou": none_if_nan(sem),
        "mean_instance_combined": none_if_nan(ins),
    }
