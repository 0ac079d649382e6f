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


def _mode_rows(codes: np.ndarray, unknown: int) -> np.ndarray:
    """The block rule on rows of codes (``(m, n)`` uint8).

    Rows of up to 8 voxels: pairwise equality counts (n(n-1)/2 vector compares), then the
    known voxel with the largest (count, -code) wins. Longer rows: one pass per value present.
    """
    m, n = codes.shape
    if n <= 8:
        cols = np.ascontiguousarray(codes.T)  # (n, m): one contiguous vector per voxel of the block
        cnt = np.ones((n, m), np.int16)
        for j in range(n):
            for k in range(j + 1, n):
                eq = cols[j] == cols[k]
                cnt[j] += eq
                cnt[k] += eq
        key = cnt * np.int16(256) + (np.int16(255) - cols.astype(np.int16))  # count first, then smaller code
        unk = cols == unknown
        key[unk] = -1
        best = cols[key.argmax(axis=0), np.arange(m)]
        best[2 * np.count_nonzero(unk, axis=0) > n] = unknown
        return best
    best = np.zeros(m, np.uint8)
    best_n = np.zeros(m, np.int32)
    n_unknown = np.zeros(m, np.int32)
    for v in np.flatnonzero(np.bincount(codes.ravel(), minlength=256)):  # ascending: ties keep the smaller
        cnt_v = np.count_nonzero(codes == v, axis=1).astype(np.int32)
        if v == unknown:
            n_unknown = cnt_v
            continue
        better = cnt_v > best_n
        best[better] = v
        best_n[better] = cnt_v[better]
    best[2 * n_unknown > n] = unknown
    return best


_WORD = {2: np.uint16, 4: np.uint32, 8: np.uint64}
CACHE_BYTES = 1 << 19  # input handled at a time by pool_ids (fits in L2: the mixed-block gathers stay cached)


class InvalidIds(ValueError):
    """Source ids that ``lut`` maps to the ``invalid`` code were found."""


def pool_ids(
    ids: np.ndarray, factor: Sequence[int], lut: np.ndarray, unknown: int = 255, invalid: int | None = None
) -> np.ndarray:
    """Map uint8 source ids through ``lut`` to codes and apply the block rule, without mapping every voxel.

    Equal to ``pool_labels(lut[ids], factor, unknown)`` (a test checks it): a block whose
    source ids are all equal is that id's code (most blocks of real label maps); only
    the other blocks are gathered, mapped and counted. The ``fx`` voxels of a block row
    are read as one 2/4/8-byte word where possible, and the ``fz fy`` rows as strided
    views, so no transposed copy of the input is made.

    ``invalid``: a code ``lut`` gives to ids that must not occur; any such voxel (also a
    minority one inside a mixed block) raises :class:`InvalidIds`. Every voxel is seen:
    a uniform block through its first voxel, a mixed one through all of them.
    """
    f = tuple(int(v) for v in factor)
    if f == (1, 1, 1):
        return _checked(np.take(lut, ids), invalid)
    nz = ids.shape[0] // f[0]
    step = max(1, CACHE_BYTES // max(1, f[0] * ids.shape[1] * ids.shape[2]))
    if nz > step:
        out = np.empty((nz, ids.shape[1] // f[1], ids.shape[2] // f[2]), np.uint8)
        for j in range(0, nz, step):
            out[j : j + step] = _pool_ids(ids[j * f[0] : (j + step) * f[0]], f, lut, unknown, invalid)  # type: ignore[arg-type]
        return out
    return _pool_ids(ids, f, lut, unknown, invalid)  # type: ignore[arg-type]


def _checked(codes: np.ndarray, invalid: int | None) -> np.ndarray:
    if invalid is not None and (codes == invalid).any():
        raise InvalidIds("invalid ids")
    return codes


def _pool_ids(
    ids: np.ndarray, f: tuple[int, int, int], lut: np.ndarray, unknown: int, invalid: int | None = None
) -> np.ndarray:
    fz, fy, fx = f
    word = _WORD.get(fx)
    if word is not None and ids.flags.c_contiguous:
        w = ids.view(word)  # (z, y, x / fx): one word per block row
        rep = np.array(sum(1 << (8 * i) for i in range(fx)), dtype=word)
        subs = [w[dz::fz, dy::fy] for dz in range(fz) for dy in range(fy)]
        first_word = subs[0]
        lo = first_word.view(np.uint8).reshape(*first_word.shape, fx)[..., 0]
        uniform = first_word == lo.astype(word) * rep
        for sub in subs[1:]:
            uniform &= sub == first_word
        out = _checked(np.take(lut, lo), invalid)
        mixed = np.flatnonzero(~uniform)
        if mixed.size:
            bz, rem = np.divmod(mixed, uniform.shape[1] * uniform.shape[2])
            by, bx = np.divmod(rem, uniform.shape[2])
            zs, ys = w.shape[1] * w.shape[2], w.shape[2]  # word strides of w
            base = bz * (fz * zs) + by * (fy * ys) + bx
            flat = w.reshape(-1)
            rows = np.concatenate(
                [
                    np.take(flat, base + dz * zs + dy * ys).view(np.uint8).reshape(-1, fx)
                    for dz in range(fz)
                    for dy in range(fy)
                ],
                axis=1,
            )
            out.reshape(-1)[mixed] = _mode_rows(_checked(np.take(lut, rows), invalid), unknown)
        return out
    subs = [ids[dz::fz, dy::fy, dx::fx] for dz in range(fz) for dy in range(fy) for dx in range(fx)]
    first = subs[0]
    uniform = np.ones(first.shape, bool)
    for sub in subs[1:]:
        uniform &= sub == first
    out = _checked(np.take(lut, first), invalid)
    rest = np.nonzero(~uniform)
    if rest[0].size:
        rows = np.stack([sub[rest] for sub in subs], axis=1)  # (m, n) source ids of the mixed blocks
        out[rest] = _mode_rows(_checked(np.take(lut, rows), invalid), unknown)
    return out
