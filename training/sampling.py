"""Class-balanced patch sampling with unknown voxels excluded (explicit crop-centre indices).

The official segresnet/swinunetr/dints templates crop with MONAI's ``RandCropByLabelClassesd``
(equal ratios over the classes, background included, unless ``crop_ratios`` says
otherwise). Their label has no unknown value, so they let MONAI find the indices. Here an
unknown (and padded) voxel must be neither a positive nor a negative centre, so the
indices are computed explicitly and handed to ``RandCropByLabelClassesd`` via
``indices_key``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.transforms import Transform

INDICES_KEY = "label_cls_indices"


class KnownClassIndicesd(Transform):
    """Flat voxel indices of every class id ``0..num_classes-1`` of ``d["label"]`` into
    ``d[INDICES_KEY]``.

    Unknown voxels (and padding, which the trainer writes as unknown) hold ``unknown_label``,
    which is no class id, so they are in no list: no crop centre, positive (a class) or
    negative (background), lands on them. A class with more than ``max_per_class`` voxels
    keeps an evenly strided subset (bounded memory). Deterministic, so a ``CacheDataset``
    caches the indices with the volume.
    """

    def __init__(self, num_classes: int, max_per_class: int = 2_000_000) -> None:
        self.num_classes = num_classes
        self.max_per_class = max_per_class

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        lab = np.asarray(d["label"]).reshape(-1)
        dtype = np.int32 if lab.size < 2**31 else np.int64
        out = []
        for c in range(self.num_classes):
            idx = np.flatnonzero(lab == c).astype(dtype)
            if idx.size > self.max_per_class:
                idx = idx[:: -(-idx.size // self.max_per_class)]
            out.append(idx)
        d[INDICES_KEY] = out
        return d
