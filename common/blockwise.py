"""Block-wise prediction with bounded memory, shared by the export and predict stages.

A model trained at one voxel size (the *training grid* ``T``) predicts a region of any
other grid (the *output grid* ``O``, e.g. a challenge manifest box at 2 nm or 32 nm)
one output block at a time:

1. for an output block, the ``T`` index range whose voxels its weights touch is read
   (plus ``halo`` ``T`` voxels of context on every side) through ``read_t`` (the caller
   cuts and pools the EM, see ``stages/ensemble/export.py``);
2. every predictor maps that window to probabilities ``[C, z, y, x]`` on ``T``; members
   are combined by mean (or one-hot votes) and the halo is dropped;
3. the probabilities (never labels) are brought to the output block by a separable
   linear map per axis (:func:`axis_weights`): **linear interpolation** between ``T``
   voxel centres where the output voxel is finer (pixel-centre convention: the
   translation is the centre of voxel 0), **the footprint average** (overlap-weighted
   mean of the ``T`` voxels an output voxel covers) where it is equal or coarser;
4. ``sink(out_slices, probabilities)`` writes the block (argmax, masks, instances).

Peak memory is one window: the EM read for it, ``C`` float32 channels of
``(block + 2 halo)^3`` ``T`` voxels per predictor output plus the running sum, and the
output block. It does not depend on the size of the region. Instance ids over a region
larger than one block come from :class:`BlockwiseInstances` (connected components per
block, merged across block faces, sizes filtered, relabelled in a second pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.ngff import Level

TOL = 1e-4  # index arithmetic tolerance (in voxels)

# EM window (z, y, x) float32 + its grid -> probabilities [C, z, y, x] on that grid.
ArrayPredictor = Callable[[np.ndarray, Level], np.ndarray]
# (slices of the output grid, probabilities [C, *block]) -> None
Sink = Callable[[tuple[slice, slice, slice], np.ndarray], None]


def is_finer(out_scale: float, src_scale: float) -> bool:
    """Whether an output voxel is strictly smaller than a source voxel on this axis."""
    return out_scale < src_scale * (1 - 1e-6)


def needed_range(out_scale: float, out_t: float, lo: int, hi: int, src_scale: float, src_t: float) -> tuple[int, int]:
    """Source index range ``[a, b)`` that output voxels ``lo:hi`` draw from (one axis).

    Finer output: the two source centres around every output centre; coarser or equal:
    every source voxel overlapping an output voxel's footprint. Not clipped: the source
    grid is unbounded here (the reader pads outside the volume).
    """
    if is_finer(out_scale, src_scale):
        u0 = (out_t + lo * out_scale - src_t) / src_scale
        u1 = (out_t + (hi - 1) * out_scale - src_t) / src_scale
        return math.floor(u0 + TOL), math.floor(u1 - TOL) + 2
    edge0 = src_t - src_scale / 2
    a = (out_t + (lo - 0.5) * out_scale - edge0) / src_scale
    b = (out_t + (hi - 0.5) * out_scale - edge0) / src_scale
    return math.floor(a + TOL), math.ceil(b - TOL)


def axis_weights(
    out_scale: float, out_t: float, lo: int, hi: int, src_scale: float, src_t: float, src_lo: int, src_n: int
) -> np.ndarray:
    """Matrix ``W [hi - lo, src_n]``: output voxel ``lo + r`` = ``W[r] @ source[src_lo:src_lo + src_n]``.

    Rows sum to 1. Finer output: linear interpolation at the output voxel centre
    (clamped to the window's first/last centre). Equal or coarser: overlap length of
    the output voxel with each source voxel, normalised (an exact block mean when the
    grids nest, the area-weighted mean otherwise).
    """
    idx = np.arange(lo, hi, dtype=np.float64)
    w = np.zeros((hi - lo, src_n), dtype=np.float32)
    rows = np.arange(hi - lo)
    if is_finer(out_scale, src_scale):
        u = (out_t + idx * out_scale - src_t) / src_scale - src_lo
        u = np.clip(u, 0.0, src_n - 1.0)
        i0 = np.minimum(np.floor(u).astype(np.int64), max(src_n - 2, 0))
        f = (u - i0).astype(np.float32)
        np.add.at(w, (rows, i0), 1.0 - f)
        if src_n > 1:
            np.add.at(w, (rows, i0 + 1), f)
        return w
    a = out_t + (idx - 0.5) * out_scale
    b = a + out_scale
    e = src_t + (src_lo + np.arange(src_n) - 0.5) * src_scale
    ov = np.minimum(b[:, None], e[None, :] + src_scale) - np.maximum(a[:, None], e[None, :])
    w = np.clip(ov, 0.0, None).astype(np.float32)
    s = w.sum(axis=1, keepdims=True)
    if (s <= 0).any():
        raise ValueError("an output voxel lies outside the source window")
    return w / s


def resample(p: np.ndarray, weights: Sequence[np.ndarray]) -> np.ndarray:
    """Apply the per-axis maps to ``p [C, z, y, x]`` (float32, one axis at a time)."""
    wz, wy, wx = weights
    out = np.einsum("zi,cijk->czjk", wz, p, optimize=True)
    out = np.einsum("yj,czjk->czyk", wy, out, optimize=True)
    return np.ascontiguousarray(np.einsum("xk,czyk->czyx", wx, out, optimize=True), dtype=np.float32)


def block_mean(a: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over non-overlapping ``factors`` blocks (``a.shape`` divisible by them), float32."""
    fz, fy, fx = (int(f) for f in factors)
    if (fz, fy, fx) == (1, 1, 1):
        return a.astype(np.float32, copy=False)
    z, y, x = a.shape
    r = a.reshape(z // fz, fz, y // fy, fy, x // fx, fx)
    return r.mean(axis=(1, 3, 5), dtype=np.float32)


def argmax0(p: np.ndarray) -> np.ndarray:
    """argmax over axis 0 (ties to the lower index), one channel at a time."""
    best = np.array(p[0], copy=True)
    idx = np.zeros(best.shape, dtype=np.uint8 if p.shape[0] < 256 else np.uint16)
    for c in range(1, p.shape[0]):
        better = p[c] > best
        idx[better] = c
        np.maximum(best, p[c], out=best)
    return idx


def output_block(out_scale: Sequence[float], t_scale: Sequence[float], block_t: int) -> tuple[int, int, int]:
    """Output voxels per block edge so that a block covers about ``block_t`` training voxels."""
    return tuple(max(1, int(block_t * t / o + TOL)) for o, t in zip(out_scale, t_scale))  # type: ignore[return-value]


def iter_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, slice, slice]]:
    """Slices tiling ``shape`` in ``block`` steps (C order; last blocks may be smaller)."""
    for z in range(0, shape[0], block[0]):
        for y in range(0, shape[1], block[1]):
            for x in range(0, shape[2], block[2]):
                yield (
                    slice(z, min(z + block[0], shape[0])),
                    slice(y, min(y + block[1], shape[1])),
                    slice(x, min(x + block[2], shape[2])),
                )


@dataclass(frozen=True)
class TrainGrid:
    """The unbounded training grid: voxel size and the centre of voxel 0 (z, y, x, nm)."""

    scale: tuple[float, float, float]
    translation: tuple[float, float, float]

    def window(self, lo: Sequence[int], hi: Sequence[int]) -> Level:
        """The :class:`Level` of the window ``[lo, hi)``."""
        t = tuple(tt + a * s for tt, a, s in zip(self.translation, lo, self.scale))
        return Level("window", self.scale, t, tuple(b - a for a, b in zip(lo, hi)))  # type: ignore[arg-type]


@dataclass
class BlockStats:
    """What :func:`predict_blocks` did (for reports and the bench)."""

    n_blocks: int = 0
    max_window_voxels: int = 0
    max_out_voxels: int = 0


def predict_blocks(
    out: Level,
    grid: TrainGrid,
    read_t: Callable[[tuple[int, int, int], tuple[int, int, int]], np.ndarray],
    predictors: Sequence[ArrayPredictor],
    n_classes: int,
    sink: Sink,
    block_t: int = 96,
    halo: int = 16,
    mode: str = "mean",
    blocks: Sequence[tuple[slice, slice, slice]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BlockStats:
    """Predict the output grid ``out`` block by block (see the module docstring).

    Args:
        out: the output grid (scale, translation = centre of voxel 0, shape).
        grid: the training grid the predictors work on.
        read_t: ``(lo, hi) -> float32 (z, y, x)`` EM on ``grid`` indices ``[lo, hi)``
            (any range; the reader pads outside what exists).
        predictors: one per ensemble member.
        n_classes: channels every predictor must return.
        sink: receives ``(out slices, probabilities [C, *block])``.
        block_t: training voxels per block edge (the memory budget).
        halo: training voxels of context read on every side and dropped after prediction.
        mode: ``mean`` of probabilities, or ``vote`` (one-hot argmax per member, averaged).
        blocks: restrict to these output blocks (default: all, C order).
        progress: called with ``(done, total)`` after each block.

    Raises:
        ValueError: a predictor returned the wrong number of channels or shape.
    """
    if not predictors:
        raise ValueError("no predictor")
    ob = output_block(out.scale, grid.scale, block_t)
    todo = list(blocks) if blocks is not None else list(iter_blocks(out.shape, ob))
    stats = BlockStats()
    for k, sl in enumerate(todo):
        rng = [
            needed_range(o, ot, s.start, s.stop, ts, tt)
            for o, ot, s, ts, tt in zip(out.scale, out.translation, sl, grid.scale, grid.translation)
        ]
        lo = tuple(a - halo for a, _ in rng)
        hi = tuple(b + halo for _, b in rng)
        em = read_t(lo, hi)  # type: ignore[arg-type]
        win = grid.window(lo, hi)
        acc: np.ndarray | None = None
        for pred in predictors:
            p = np.asarray(pred(em, win), dtype=np.float32)
            if p.shape != (n_classes, *win.shape):
                raise ValueError(f"predictor returned {p.shape}, expected {(n_classes, *win.shape)} (C, z, y, x)")
            if mode == "vote":
                lab = argmax0(p)
                p = np.stack([(lab == c) for c in range(n_classes)]).astype(np.float32)
            acc = p if acc is None else np.add(acc, p, out=acc)
            del p
        assert acc is not None
        acc /= len(predictors)
        core = acc[(slice(None), *(slice(halo, n - halo) for n in win.shape))]
        weights = [
            axis_weights(o, ot, s.start, s.stop, ts, tt, a, b - a)
            for o, ot, s, ts, tt, (a, b) in zip(out.scale, out.translation, sl, grid.scale, grid.translation, rng)
        ]
        prob = resample(core, weights)
        del acc, core, em
        stats.n_blocks += 1
        stats.max_window_voxels = max(stats.max_window_voxels, int(np.prod(win.shape)))
        stats.max_out_voxels = max(stats.max_out_voxels, int(prob[0].size))
        sink(sl, prob)
        del prob
        if progress is not None:
            progress(k + 1, len(todo))
    return stats


def pooled_reader(
    array: Any,
    start: Sequence[int],
    factors: Sequence[int],
    core: Sequence[slice],
    on_empty: Callable[[], Exception] | None = None,
) -> Callable[[tuple[int, int, int], tuple[int, int, int]], np.ndarray]:
    """``(lo, hi) -> float32`` source voxels pooled to a coarser grid in a given phase.

    Training-grid voxel ``j`` is the mean of source voxels ``[start + j g, start + (j+1) g)``
    per axis (``g`` = ``factors``). Outside the source array, and (for a zarr array) where
    a halo would touch chunks that were never written, the read is limited to ``core``
    (the region known to exist) and padded with edge values: context only.

    Args:
        array: a zarr v2 array or a numpy array (z, y, x).
        start: source index of training voxel 0's first source voxel.
        factors: source voxels per training voxel, per axis.
        core: the source region that must be real data (e.g. the box).
        on_empty: called to build the error raised when a read is entirely the fill value
            (a never-fetched region); ``None`` accepts it.
    """
    from common.ngff import chunk_keys

    is_zarr = hasattr(array, "chunks") and hasattr(array, "store")
    store = (array.chunk_store if array.chunk_store is not None else array.store) if is_zarr else None
    fill = (array.fill_value if array.fill_value is not None else 0) if is_zarr else None
    shape = array.shape

    def read(lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
        want = [(s + a * g, s + b * g) for s, a, b, g in zip(start, lo, hi, factors)]
        got = [(max(a, 0), min(b, n)) for (a, b), n in zip(want, shape)]
        cut = tuple(slice(a, b) for a, b in got)
        if store is not None and any(k not in store for k in chunk_keys(array, cut)):
            got = [(max(a, c.start), min(b, c.stop)) for (a, b), c in zip(got, core)]
            cut = tuple(slice(a, b) for a, b in got)
        raw = np.asarray(array[cut])
        if on_empty is not None and fill is not None and raw.size and (raw == fill).all():
            raise on_empty()
        pad = [(a - wa, wb - b) for (a, b), (wa, wb) in zip(got, want)]
        if any(p != (0, 0) for p in pad):
            raw = np.pad(raw, pad, mode="edge")
        return block_mean(raw, factors)

    return read


def bundle_training_resolution(
    bundle_dir: Path, reports_dir: Path | None = None
) -> tuple[tuple[float | None, float, float], str]:
    """The voxel size (z or ``None``, y, x nm) a bundle was trained at, and where it is recorded.

    From the bundle's ``cellmap_bundle.json`` ``resolution_nm`` (bundlegen writes it); for
    older bundles from ``<reports_dir>/convert.json`` ``resolution_zyx`` (what the training
    data was converted at). Never from the current ``pipeline.yaml``.

    Raises:
        ValueError: neither records it (the message names the file to fix).
    """
    import json

    from common.workdir import BUNDLE_RECORD

    rec = Path(bundle_dir) / BUNDLE_RECORD
    try:
        res = json.loads(rec.read_text(encoding="utf-8")).get("resolution_nm")
    except (OSError, ValueError, AttributeError):
        res = None
    if isinstance(res, list) and res:
        vals = [float(v) for v in res]
        return ((None, vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1], vals[2])), str(rec)
    conv = Path(reports_dir) / "convert.json" if reports_dir is not None else None
    r = None
    if conv is not None:
        try:
            r = json.loads(conv.read_text(encoding="utf-8")).get("resolution_zyx")
        except (OSError, ValueError, AttributeError):
            r = None
    if isinstance(r, list) and len(r) == 3:
        return (None if r[0] is None else float(r[0]), float(r[1]), float(r[2])), str(conv)
    raise ValueError(
        f"{Path(bundle_dir).name}: the training resolution is not recorded ({rec} has no resolution_nm"
        + (f" and {conv} no resolution_zyx" if conv else "")
        + f'): add "resolution_nm": [z, y, x] (what the bundle was trained at) to {rec}'
    )


def training_factors(
    train_res: Sequence[float | None], s0_scale: Sequence[float]
) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Training voxel (z, y, x nm) for a source whose finest voxel is ``s0_scale``, and the factors.

    ``None`` z (only y/x trained) takes the source z times the y/x factor (the EM pyramid rule).

    Raises:
        ValueError: the training voxel is not a whole multiple of the source voxel.
    """
    ty, tx = train_res[1], train_res[2]
    if ty is None or tx is None:
        raise ValueError(f"training voxel {list(train_res)}: only z may be unset")
    f_yx = float(ty) / s0_scale[1]
    t = (float(train_res[0]) if train_res[0] is not None else s0_scale[0] * f_yx, float(ty), float(tx))
    g = [v / e for v, e in zip(t, s0_scale)]
    if not all(abs(x - round(x)) <= 1e-3 and round(x) >= 1 for x in g):
        raise ValueError(f"training voxel {list(t)} nm is not a whole multiple of the source voxel {list(s0_scale)} nm")
    return t, tuple(round(x) for x in g)  # type: ignore[return-value]


# ---- instances over many blocks ---------------------------------------------------------
class BlockwiseInstances:
    """Connected components (face connectivity) of a mask written block by block.

    ``add`` labels each block on its own (ids offset to be unique) into a temporary
    uint32 zarr array; ``finish`` merges ids that touch across block faces (reading
    only the two face planes of each block), drops components smaller than
    ``min_voxels`` and writes ids ``1..K`` into the final array (uint16 when K < 65536,
    else uint32: never uint8, whose ids would wrap) in a second pass over the blocks.
    Memory: one block plus one table entry per block-local component.
    """

    def __init__(self, tmp_path: Path, shape: Sequence[int], chunks: Sequence[int], min_voxels: int = 1) -> None:
        import zarr

        self.tmp = zarr.open_array(
            str(tmp_path), mode="w", shape=tuple(shape), chunks=tuple(chunks), dtype=np.uint32, fill_value=0
        )
        self.tmp_path = Path(tmp_path)
        self.min_voxels = int(min_voxels)
        self.sizes: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # id 0 = background
        self.n = 0
        self.blocks: list[tuple[slice, slice, slice]] = []

    def add(self, sl: tuple[slice, slice, slice], mask: np.ndarray) -> None:
        """Label one block of the mask."""
        from scipy import ndimage

        lab, n = ndimage.label(mask)
        lab = lab.astype(np.uint32)
        if n:
            self.sizes.append(np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64))
            lab[lab > 0] += np.uint32(self.n)
            self.n += n
        self.tmp[sl] = lab
        self.blocks.append(sl)

    def finish(self, write: Callable[[np.dtype], Any]) -> int:
        """Merge, filter, relabel; ``write(dtype)`` returns the final zarr array. Returns K."""
        import shutil

        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = self.n + 1
        pairs_a: list[np.ndarray] = []
        pairs_b: list[np.ndarray] = []
        for sl in self.blocks:
            for ax in range(3):
                s = sl[ax].start
                if s == 0:
                    continue
                lo = list(sl)
                hi = list(sl)
                lo[ax] = slice(s - 1, s)
                hi[ax] = slice(s, s + 1)
                a = np.asarray(self.tmp[tuple(lo)]).ravel()
                b = np.asarray(self.tmp[tuple(hi)]).ravel()
                both = (a > 0) & (b > 0)
                if both.any():
                    pairs_a.append(a[both].astype(np.int64))
                    pairs_b.append(b[both].astype(np.int64))
        sizes = np.concatenate(self.sizes)
        if pairs_a:
            pa, pb = np.concatenate(pairs_a), np.concatenate(pairs_b)
            g = coo_matrix((np.ones(pa.size, dtype=np.int8), (pa, pb)), shape=(n, n))
            _, comp = connected_components(g, directed=False)
        else:
            comp = np.arange(n)
        comp_size = np.bincount(comp, weights=sizes, minlength=comp.max() + 1)
        keep = comp_size >= self.min_voxels
        keep[comp[0]] = False  # background's component (id 0 is never merged with anything)
        new_id = np.zeros(comp_size.size, dtype=np.int64)
        new_id[keep] = np.arange(1, int(keep.sum()) + 1)
        lut = new_id[comp]
        lut[0] = 0
        k = int(keep.sum())
        dtype = np.dtype(np.uint16 if k < 65536 else np.uint32)
        lut = lut.astype(dtype)
        final = write(dtype)
        for sl in self.blocks:
            final[sl] = lut[np.asarray(self.tmp[sl])]
        shutil.rmtree(self.tmp_path, ignore_errors=True)
        return k


# ---- adapters -----------------------------------------------------------------------------
def file_predictor(predict_file: Callable[[Path], Any], tmp_dir: Path) -> ArrayPredictor:
    """Wrap a predictor of image *files* (``path -> [C, X, Y, Z]``, e.g. a bundle's
    ``InferClass.infer``) as an :data:`ArrayPredictor`: each window is written as an
    uncompressed NIfTI (x, y, z) with its affine (spacing and voxel-0 centre in nm) and
    the answer is transposed back to (C, z, y, x)."""
    from common.nifti import save_nifti, zyx_to_affine

    tmp_dir = Path(tmp_dir)

    def predict(em: np.ndarray, win: Level) -> np.ndarray:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        path = tmp_dir / "window_image.nii"
        save_nifti(path, np.ascontiguousarray(em.transpose(2, 1, 0)), zyx_to_affine(win.scale, win.translation))
        out = predict_file(path)
        if hasattr(out, "detach"):
            out = out.detach()
            if hasattr(out, "as_tensor"):
                out = out.as_tensor()
            out = out.cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        path.unlink(missing_ok=True)
        if out.ndim != 4:
            raise ValueError(f"predictor returned {out.shape}, expected [C, X, Y, Z]")
        return out.transpose(0, 3, 2, 1)

    return predict
