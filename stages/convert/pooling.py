"""Label maps from the finest label level to the output grid: the block rule.

A block is the ``factor`` label-s0 voxels of one output voxel, in the box's own phase
(see :class:`common.ngff.Reduction`). Its training label is:

* **unknown** when more than half of its voxels are unknown (``2 U > n``);
* otherwise the **most frequent known value** (background counts as a value); a tie
  goes to the smallest label value (background first, then class order).

The rule is applied to the training codes (``all`` ids already mapped, class arrays
already composed), never to raw CellMap ids, so a group id that maps to unknown counts
as unknown.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def block_counts(mask: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Number of true voxels in each ``factor`` block of a boolean (z, y, x) array."""
    fz, fy, fx = (int(v) for v in factor)
    z, y, x = (s // f for s, f in zip(mask.shape, (fz, fy, fx)))
    m = mask.view(np.uint8)
    acc = np.uint16 if fz * fy * fx < 65535 else np.uint32
    s = m.reshape(z, fz, y * fy * x * fx).sum(axis=1, dtype=acc)
    s = s.reshape(z, y, fy, x * fx).sum(axis=2, dtype=acc)
    return s.reshape(z, y, x, fx).sum(axis=3, dtype=acc)


def pool_labels(codes: np.ndarray, factor: Sequence[int], unknown: int = 255) -> np.ndarray:
    """Apply the block rule (module docstring) to a uint8 (z, y, x) code map.

    Args:
        codes: training codes; its shape is a whole number of blocks.
        factor: label voxels per output voxel (z, y, x).
        unknown: the unknown code.
    """
    f = tuple(int(v) for v in factor)
    if f == (1, 1, 1):
        return codes
    n = f[0] * f[1] * f[2]
    present = np.flatnonzero(np.bincount(codes.ravel(), minlength=256))
    out_shape = tuple(s // k for s, k in zip(codes.shape, f))
    best = np.zeros(out_shape, np.uint8)
    best_n = np.zeros(out_shape, np.uint32)
    n_unknown = np.zeros(out_shape, np.uint32)
    for v in present:  # ascending, so a strict '>' leaves ties with the smaller value
        cnt = block_counts(codes == v, f)
        if v == unknown:
            n_unknown = cnt
            continue
        better = cnt > best_n
        best[better] = v
        best_n[better] = cnt[better]
    best[2 * n_unknown.astype(np.uint32) > n] = unknown
    return best
