"""Losses and metrics that ignore the unknown label.

Unknown voxels (``label == unknown_label``) are masked out of every term: the Dice sums, the
cross-entropy / focal average and the validation Dice. Changing the prediction or the image at
unknown voxels therefore changes neither the loss nor the metric (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def split_unknown(label: torch.Tensor, unknown_label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(class ids with unknown set to 0, known-voxel mask)``, both ``[B, 1, ...]``."""
    lab = label.long()
    if unknown_label:
        known = lab != unknown_label
        lab = torch.where(known, lab, torch.zeros_like(lab))
    else:
        known = torch.ones_like(lab, dtype=torch.bool)
    return lab, known


class MaskedSegLoss(torch.nn.Module):
    """Soft Dice (per class, batch-pooled) plus weighted cross-entropy or focal loss.

    Args:
        num_classes: output channels (background included).
        unknown_label: label value to ignore (0: none).
        class_weights: per-class weights of the CE/focal term and of the Dice mean.
        kind: ``dicece`` or ``dicefocal``.
        gamma: focal exponent.
    """

    def __init__(
        self,
        num_classes: int,
        unknown_label: int = 255,
        class_weights: Sequence[float] | None = None,
        kind: str = "dicece",
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if kind not in ("dicece", "dicefocal"):
            raise ValueError(f"loss must be dicece or dicefocal, got {kind!r}")
        self.num_classes = num_classes
        self.unknown_label = unknown_label
        self.kind = kind
        self.gamma = gamma
        w = torch.ones(num_classes) if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if w.numel() != num_classes:
            raise ValueError(f"class_weights has {w.numel()} values for {num_classes} classes")
        self.register_buffer("weight", w)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        lab, known = split_unknown(label, self.unknown_label)
        logits = logits.float()
        mask = known.float()
        n_known = mask.sum().clamp_min(1.0)
        w = self.weight.to(logits.device)
        logp = F.log_softmax(logits, dim=1)
        # cross-entropy / focal, averaged over known voxels (weighted like torch's CE)
        tgt = lab[:, 0]
        nll = -logp.gather(1, lab).squeeze(1)
        if self.kind == "dicefocal":
            pt = torch.exp(-nll)
            nll = (1 - pt) ** self.gamma * nll
        vw = w[tgt] * mask[:, 0]
        ce = (nll * vw).sum() / vw.sum().clamp_min(1e-6) if n_known > 0 else logits.sum() * 0
        # soft Dice over known voxels, pooled over the batch
        prob = logp.exp() * mask
        onehot = F.one_hot(tgt, self.num_classes).movedim(-1, 1).float() * mask
        dims = [0] + list(range(2, logits.ndim))
        inter = (prob * onehot).sum(dims)
        denom = prob.sum(dims) + onehot.sum(dims)
        dice = 1.0 - (2 * inter + 1e-5) / (denom + 1e-5)
        dice = (dice * w).sum() / w.sum()
        return dice + ce


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int, unknown_label: int) -> torch.Tensor:
    """Hard Dice of each foreground class 1..C-1 over known voxels; NaN where a class is
    absent from both prediction and label.

    Args:
        pred: class ids ``[1, ...]`` or ``[...]``.
        label: class ids, same shape, may hold ``unknown_label``.
    """
    lab, known = split_unknown(label, unknown_label)
    pred = pred.long().reshape(lab.shape)
    out = torch.full((num_classes - 1,), float("nan"))
    for c in range(1, num_classes):
        p = (pred == c) & known
        g = (lab == c) & known
        denom = p.sum() + g.sum()
        if denom > 0:
            out[c - 1] = (2.0 * (p & g).sum() / denom).float().cpu()
    return out
