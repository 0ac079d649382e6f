"""Losses and metrics that ignore the unknown label.

Unknown voxels (``label == unknown_label``) are masked out of every term: the Dice sums, the
cross-entropy / focal average and the validation Dice. Changing the prediction or the image at
unknown voxels therefore changes neither the loss nor the metric (tested).

``train: {loss: ...}`` selects one of :data:`LOSSES`:

* ``dicece`` (default, the official segresnet/swinunetr loss): soft Dice + cross-entropy,
  no class weights unless ``loss_weights`` gives some.
* ``focal``: focal loss (gamma 2) only, class-weighted.
* ``dicefocal`` (the official dints loss, weighted as in the project's design document):
  soft Dice + focal, class-weighted.

Class weights of the CE/focal term (``loss_weights``): ``auto`` (default) = none for
``dicece`` and :func:`share_weights` (``max share / class share``, clipped to
``[1, loss_weight_max]``) for ``focal``/``dicefocal``; ``none``; or an explicit list.
The Dice term is an unweighted mean over classes (Dice is already per-class normalised).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

LOSSES = ("dicece", "focal", "dicefocal")
DEFAULT_WEIGHT_MAX = 20.0


def share_weights(
    shares: Sequence[float] | None, num_classes: int, max_weight: float = DEFAULT_WEIGHT_MAX
) -> list[float] | None:
    """``max share / class share`` per class id, clipped to ``[1, max_weight]``.

    The commonest class gets 1; a class with no known voxel gets 1 (nothing to weigh).
    ``None`` when no shares are known.
    """
    if shares is None:
        return None
    s = [float(v) for v in shares][:num_classes] + [0.0] * max(0, num_classes - len(shares))
    top = max(s)
    if not top > 0:
        return None
    return [round(min(max_weight, top / v), 6) if v > 0 else 1.0 for v in s]


def loss_class_weights(cfg: dict[str, Any]) -> list[float] | None:
    """The CE/focal class weights a bundle config asks for (see the module docstring).

    Reads the shares only from ``cfg["class_shares"]`` (filled by bundlegen from analyze's
    statistics), so a better share estimate upstream changes the weights here.
    """
    kind = str(cfg.get("loss", "dicece"))
    spec = cfg.get("loss_weights", "auto")
    n = int(cfg["output_classes"])
    if spec is None or spec == "none":
        return None
    if isinstance(spec, (list, tuple)):
        if len(spec) != n:
            raise ValueError(f"loss_weights has {len(spec)} values for {n} classes")
        return [float(v) for v in spec]
    if spec != "auto":
        raise ValueError(f"loss_weights must be auto, none or a list, got {spec!r}")
    if kind == "dicece":
        return None
    return share_weights(cfg.get("class_shares"), n, float(cfg.get("loss_weight_max", DEFAULT_WEIGHT_MAX)))


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
    """Soft Dice (per class, batch-pooled) and/or weighted cross-entropy or focal loss.

    Args:
        num_classes: output channels (background included).
        unknown_label: label value to ignore (0: none).
        class_weights: per-class weights of the CE/focal term (``None``: all 1).
        kind: one of :data:`LOSSES`.
        gamma: focal exponent.
    """

    weight: torch.Tensor  # per-class weights, a registered buffer

    def __init__(
        self,
        num_classes: int,
        unknown_label: int = 255,
        class_weights: Sequence[float] | None = None,
        kind: str = "dicece",
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
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
        w = self.weight.to(logits.device)
        logp = F.log_softmax(logits, dim=1)
        tgt = lab[:, 0]
        # cross-entropy / focal, averaged over known voxels (weighted like torch's CE)
        nll = -logp.gather(1, lab).squeeze(1)
        if self.kind in ("focal", "dicefocal"):
            pt = torch.exp(-nll)
            nll = (1 - pt) ** self.gamma * nll
        vw = w[tgt] * mask[:, 0]
        ce = (nll * vw).sum() / vw.sum().clamp_min(1e-6)
        if self.kind == "focal":
            return ce
        # soft Dice over known voxels, pooled over the batch, mean over classes
        prob = logp.exp() * mask
        onehot = F.one_hot(tgt, self.num_classes).movedim(-1, 1).float() * mask
        dims = [0] + list(range(2, logits.ndim))
        inter = (prob * onehot).sum(dims)
        denom = prob.sum(dims) + onehot.sum(dims)
        dice = (1.0 - (2 * inter + 1e-5) / (denom + 1e-5)).mean()
        return dice + ce


def deep_supervision_loss(
    loss_fn: torch.nn.Module, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor
) -> torch.Tensor:
    """The official segresnet's deep-supervision loss: MONAI's ``DeepSupervisionLoss`` (weights
    1, 1/2, 1/4, ... floored at 1/16 over the heads; the label resized to each head by
    nearest neighbour, so unknown stays unknown). One tensor: the plain loss."""
    from monai.losses import DeepSupervisionLoss

    if not isinstance(outputs, (list, tuple)):
        return loss_fn(outputs, label)
    # MONAI annotates `loss: _Loss` but only calls it as loss(input, target); any such Module works
    ds = DeepSupervisionLoss(loss_fn, weight_mode="exp")  # type: ignore[arg-type]
    # F.interpolate has no integer kernels; class ids (and 255) are exact in float32
    return ds(list(outputs), label.float())


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
