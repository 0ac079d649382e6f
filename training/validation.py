"""Validation of the training loop: per-class Dice pooled over the validation fold.

The confusion matrix and the pooled Dice are deliberately small copies of
``common.metrics.confusion_matrix`` / ``pooled_dice`` (same numbers; ``tests/test_evaluate.py``
checks the selection metric): this package is copied into every trained bundle and must run
without this repository.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .data import build_transforms
from .distributed import dist_info


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_classes: int, unknown_label: int) -> np.ndarray:
    """``M[g, p]`` = voxels with ground truth ``g`` predicted as ``p``; unknown (when not 0) and
    out-of-range truth excluded."""
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


def pooled_dice(matrix: np.ndarray) -> np.ndarray:
    """Per foreground class ``2TP / (2TP+FP+FN)`` of a confusion matrix (NaN: no truth and no prediction)."""
    m = np.asarray(matrix, dtype=np.float64)
    out = []
    for c in range(1, m.shape[0]):
        tp = m[c, c]
        fp = m[:, c].sum() - tp
        fn = m[c, :].sum() - tp
        d = 2 * tp + fp + fn
        out.append(float(2 * tp / d) if d else math.nan)
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def validate(
    model: torch.nn.Module, cfg: dict[str, Any], items: list[dict[str, str]], device: torch.device
) -> np.ndarray:
    """Per-class Dice pooled over the validation fold (the challenge's score; NaN: class absent everywhere).

    TP/FP/FN are summed over every validation case (all ranks) before the ratio, unknown voxels
    excluded; the mean over classes is the selection metric.
    """
    from monai.inferers import sliding_window_inference

    rank, world = dist_info()
    xf = build_transforms(cfg, train=False)
    n_cls = int(cfg["output_classes"])
    matrix = np.zeros((n_cls, n_cls), dtype=np.int64)
    model.eval()
    amp = bool(cfg.get("amp", True)) and device.type == "cuda"
    for it in items[rank::world]:
        d = xf(it)
        img = d["image"][None].to(device)
        with torch.autocast(device.type, enabled=amp):
            logits = sliding_window_inference(
                img,
                [int(r) for r in cfg["roi_size"]],
                int(cfg.get("sw_batch_size", 1)),
                model,
                overlap=float(cfg.get("sw_overlap", 0.25)),
                mode="gaussian",
            )
        assert isinstance(logits, torch.Tensor)  # the network returns one tensor in eval mode
        pred = logits.argmax(1).cpu().numpy()
        label = np.asarray(d["label"]).astype(np.int64).reshape(pred.shape)
        matrix += confusion_matrix(pred, label, n_cls, int(cfg.get("unknown_label", 0)))
    if world > 1:
        both = torch.as_tensor(matrix, dtype=torch.float64).to(device)
        torch.distributed.all_reduce(both)
        matrix = both.cpu().numpy().astype(np.int64)
    model.train()
    return pooled_dice(matrix)
