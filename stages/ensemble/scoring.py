"""Per-class Dice and IoU from confusion matrices, with unknown voxels excluded.

Counts are pooled over cases (summed confusion matrices) before the ratios are taken,
like the CellMap challenge pools TP/FP/FN per class. A class with no ground truth and
no prediction anywhere has no score (NaN) and is left out of the mean over classes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


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
    valid = g < n_classes
    if unknown_label and unknown_label < n_classes:
        valid &= g != unknown_label
    p_valid = p[valid].astype(np.int64)
    if p_valid.size and (p_valid.min() < 0 or p_valid.max() >= n_classes):
        raise ValueError(f"prediction holds values outside 0..{n_classes - 1}")
    idx = g[valid].astype(np.int64) * n_classes + p_valid
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_scores(matrix: np.ndarray) -> dict[str, list[float]]:
    """Per foreground class (1..C-1): ``dice``, ``iou``, ``tp``, ``fp``, ``fn`` from a confusion matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    out: dict[str, list[float]] = {"dice": [], "iou": [], "tp": [], "fp": [], "fn": []}
    for c in range(1, m.shape[0]):
        tp = m[c, c]
        fp = m[:, c].sum() - tp
        fn = m[c, :].sum() - tp
        denom = tp + fp + fn
        out["dice"].append(float(2 * tp / (2 * tp + fp + fn)) if denom else math.nan)
        out["iou"].append(float(tp / denom) if denom else math.nan)
        out["tp"].append(float(tp))
        out["fp"].append(float(fp))
        out["fn"].append(float(fn))
    return out


def nanmean(values: list[float]) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


def summarize(matrix: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Scores of one model: per class (by name) and their means over scored classes.

    Unscored values (no ground truth and no prediction) are ``None`` (JSON ``null``).
    """
    s = class_scores(matrix)
    return {
        "per_class": {
            name: {"dice": _none_if_nan(s["dice"][i]), "iou": _none_if_nan(s["iou"][i]),
                   "tp": s["tp"][i], "fp": s["fp"][i], "fn": s["fn"][i]}
            for i, name in enumerate(class_names)
        },
        "mean_dice": _none_if_nan(nanmean(s["dice"])),
        "mean_iou": _none_if_nan(nanmean(s["iou"])),
    }
