"""Per-class Dice and IoU from confusion matrices, with unknown voxels excluded.

The definitions live in :mod:`common.metrics` (the challenge's pooled per-class score,
shared with the trainer's validation and ``stages.evaluate``); this module keeps the names
the ensemble stage has always imported.
"""

from __future__ import annotations

from common.metrics import class_scores, confusion_matrix, nanmean, summarize

__all__ = ["class_scores", "confusion_matrix", "nanmean", "summarize"]
