"""OME-NGFF (v0.4, zarr v2) geometry of CellMap volumes: levels, exact cuts, EM reads.

Conventions (see ``docs``/cellmap-data.md §2):

* Axes are ``(z, y, x)`` in nm. A level's ``translation`` is the world position of the
  **centre** of its voxel 0, so voxel ``i`` covers ``[t + (i - 1/2) s, t + (i + 1/2) s)``.
* A box (label level: scale ``l``, translation ``t_L``, shape ``n``) lands on a level
  (scale ``e``, translation ``t_E``) at the half-open index range::

      i0 = (t_L - l/2 - (t_E - e/2)) / e          i1 = i0 + n * l / e

  Both must be integers (within ``GRID_TOL``); otherwise the box is off-grid. A cut
  outside ``[0, shape)`` is refused: we never clamp and never read from the origin.

Every error is a one-line :class:`NgffError` naming the file or group and the problem,
so callers can put it in a report as the reason.
"""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import PipelineError
from common.store import RemotePath
from common.store import path as store_path

# errnos that say the storage or the permissions are broken (not one crop's data):
# whoever meets one stops the stage instead of failing a single crop
ENV_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT})
GRID_TOL = 1e-3  # cut indices must be integers within this (in voxels)
SCALE_RTOL = 1e-6  # voxel sizes are "equal" within this relative tolerance
AXES = ("z", "y", "x")
EM_GROUP = "recon-1/em/fibsem-uint8"  # the EM multiscale group inside <dataset>.zarr (docs/data.md)


class NgffError(PipelineError):
    """Malformed or unusable OME-NGFF metadata or data (one line)."""


class OffGridError(NgffError):
    """A box does not land on whole voxels of the target level."""


class OutOfBoundsError(NgffError):
    """A cut reaches outside the target array."""


class NeverFetchedError(NgffError):
    """The EM region was never downloaded (absent chunks or all fill value)."""


@dataclass(frozen=True)
class Level:
    """One scale level of a multiscale group (everything (z, y, x), nm).

    Attributes:
        path: dataset path inside the group (``s0``); ``""`` for a bare box.
        scale: voxel size.
        translation: world position of the centre of voxel 0.
        shape: array shape in voxels.
    """

    path: str
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]

    def describe(self) -> str:
        """``s1 [6,4,4] nm @ [60,32,48] shape (4,6,5)`` (for messages)."""
        return f"{self.path or 'box'} {fmt_vec(self.scale)} nm @ {fmt_vec(self.translation)} shape {tuple(self.shape)}"


def fmt_vec(v: Sequence[float | None]) -> str:
    """``[6, 4, 4]`` without trailing zeros (``[2.62, 2, 2]``)."""
    return "[" + ", ".join("?" if x is None else f"{x:g}" for x in v) + "]"


def _read_json(path: Path | RemotePath, what: str) -> dict[str, Any]:
    if isinstance(path, Path) and not path.is_file():
        raise NgffError(f"{path.parent}: missing {path.name} ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:  # remote: one request, not a probe and a read
        raise NgffError(f"{path.parent}: missing {path.name} ({what})") from None
    except OSError as exc:
        if exc.errno in ENV_ERRNOS:  # the storage, not this file's content: callers stop
            raise
        raise NgffError(f"{path}: unreadable {what} ({exc})") from None
    except ValueError as exc:
        raise NgffError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise NgffError(f"{path}: {what} is not a JSON object")
    return data


def _transforms(ts: Any, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, translation) of a ``coordinateTransformations`` list."""
    scale: tuple[float, ...] | None = None
    trans: tuple[float, ...] = (0.0, 0.0, 0.0)
    if not isinstance(ts, list):
        raise NgffError(f"{where}: coordinateTransformations missing or not a list")
    for t in ts:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "scale":
            scale = tuple(float(x) for x in t.get("scale", ()))
        elif kind == "translation":
            trans = tuple(float(x) for x in t.get("translation", ()))
        elif kind == "identity":
            continue
        else:
            raise NgffError(f"{where}: unsupported coordinate transformation {t!r}")
    if scale is None or len(scale) != 3 or len(trans) != 3:
        raise NgffError(f"{where}: need a 3-axis scale and translation, got {ts!r}")
    if any(s <= 0 for s in scale):
        raise NgffError(f"{where}: scale must be positive, got {list(scale)}")
    return scale, trans


def read_multiscales(group_path: str | Path | RemotePath) -> list[Level]:
    """Levels of an OME-NGFF v0.4 multiscale group, finest first as listed.

    Reads ``<group>/.zattrs`` (``multiscales[0]``) and each level's ``.zarray`` for
    its shape (local or remote, see :mod:`common.store`); nothing is assumed (not even a zero EM translation). A multiscale-wide
    ``coordinateTransformations`` is composed onto each level.

    Raises:
        NgffError: missing ``.zattrs``/``multiscales``/``.zarray``, wrong version or
            axes, or malformed transforms (one line naming the group).
    """
    group = store_path(group_path)
    attrs = _read_json(group / ".zattrs", "group attributes")
    ms = attrs.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise NgffError(f"{group}: .zattrs has no multiscales metadata")
    m = ms[0]
    version = str(m.get("version", ""))
    if version != "0.4":
        raise NgffError(f"{group}: multiscales version {version or 'missing'}, expected 0.4")
    axes = m.get("axes")
    if axes is not None:
        names = tuple(a.get("name") if isinstance(a, dict) else a for a in axes)
        if names != AXES:
            raise NgffError(f"{group}: axes {list(names)}, expected ['z', 'y', 'x']")
    g_scale: tuple[float, ...] = (1.0, 1.0, 1.0)
    g_trans: tuple[float, ...] = (0.0, 0.0, 0.0)
    if m.get("coordinateTransformations"):
        g_scale, g_trans = _transforms(m["coordinateTransformations"], f"{group} (multiscale)")
    datasets = m.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise NgffError(f"{group}: multiscales has no datasets")
    levels = []
    for ds in datasets:
        path = str(ds.get("path", "")) if isinstance(ds, dict) else ""
        if not path:
            raise NgffError(f"{group}: a multiscales dataset has no path")
        inside = group.resolve()
        if (group / path).resolve().parent != inside or "\n" in path:  # never another crop's array
            raise NgffError(f"{group}: multiscales dataset path {path!r} is not an array of this group")
        where = f"{group}/{path}"
        s, t = _transforms(ds.get("coordinateTransformations"), where)
        zarray = _read_json(group / path / ".zarray", "array metadata")
        shape = tuple(int(x) for x in zarray.get("shape", ()))
        if len(shape) != 3:
            raise NgffError(f"{where}: expected a 3-D array, shape {list(shape)}")
        scale = tuple(gs * x for gs, x in zip(g_scale, s))
        trans = tuple(gs * x + gt for gs, x, gt in zip(g_scale, t, g_trans))
        levels.append(Level(path, scale, trans, shape))  # type: ignore[arg-type]
    return levels


def pyramid_issues(levels: Sequence[Level]) -> list[str]:
    """Levels that break the pyramid rule ``s_k = s0 2^k, t_k = t0 + (2^k - 1) s0 / 2``.

    Only informative: the cut uses each level's own metadata, so a deviating level is
    still exact; callers log these.
    """
    out: list[str] = []
    if not levels:
        return out
    s0, t0 = levels[0].scale, levels[0].translation
    for lv in levels[1:]:
        ratios = [s / b for s, b in zip(lv.scale, s0)]
        f = ratios[0]
        if not all(math.isclose(r, f, rel_tol=SCALE_RTOL) for r in ratios):
            out.append(f"{lv.path}: scale {fmt_vec(lv.scale)} is not a uniform multiple of s0 {fmt_vec(s0)}")
            continue
        want = [b + (f - 1) * s / 2 for b, s in zip(t0, s0)]
        if not all(abs(a - w) <= GRID_TOL * s for a, w, s in zip(lv.translation, want, s0)):
            out.append(f"{lv.path}: translation {fmt_vec(lv.translation)}, pyramid rule gives {fmt_vec(want)}")
    return out


def same_scale(a: Sequence[float | None], b: Sequence[float]) -> bool:
    """Voxel sizes equal on every axis where ``a`` is given (``None`` = any)."""
    return all(x is None or math.isclose(x, y, rel_tol=SCALE_RTOL) for x, y in zip(a, b))


def find_level(levels: Sequence[Level], scale_zyx: Sequence[float | None]) -> Level | None:
    """The first level whose voxel size equals ``scale_zyx`` (``None`` z = any z)."""
    return next((lv for lv in levels if same_scale(scale_zyx, lv.scale)), None)


def find_em_level(em_levels: Sequence[Level], scale_zyx: Sequence[float]) -> Level | None:
    """The EM level whose voxel size equals ``scale_zyx`` on all three axes."""
    return find_level(em_levels, tuple(scale_zyx))


def em_cut(label_level: Level, em_level: Level, tol: float = GRID_TOL) -> tuple[slice, slice, slice]:
    """Index ranges of ``em_level`` covering exactly the box of ``label_level``.

    Works for any pair of levels (the label box need not share the EM voxel size);
    use it for challenge-manifest boxes too (``Level("", voxel_size, translation, shape)``).

    Raises:
        OffGridError: a bound is not an integer within ``tol``.
        OutOfBoundsError: the cut leaves ``[0, em_level.shape)``.
    """
    cut = []
    for ax, l, tl, n, e, te, size in zip(
        AXES,
        label_level.scale,
        label_level.translation,
        label_level.shape,
        em_level.scale,
        em_level.translation,
        em_level.shape,
    ):
        f0 = (tl - l / 2 - (te - e / 2)) / e
        f1 = f0 + n * l / e
        i0, i1 = round(f0), round(f1)
        if abs(f0 - i0) > tol or abs(f1 - i1) > tol:
            raise OffGridError(
                f"off-grid: axis {ax} spans EM {em_level.path or 'box'} voxels {f0:.4f}:{f1:.4f} "
                f"(label {fmt_vec(label_level.scale)} nm @ {fmt_vec(label_level.translation)}, "
                f"EM {fmt_vec(em_level.scale)} nm @ {fmt_vec(em_level.translation)})"
            )
        if i0 < 0 or i1 > size:
            raise OutOfBoundsError(
                f"out of bounds: axis {ax} cut {i0}:{i1} outside EM {em_level.path or 'box'} [0, {size})"
            )
        cut.append(slice(i0, i1))
    return tuple(cut)  # type: ignore[return-value]


def cut_level(box: Level, cut: Sequence[slice], path: str = "") -> Level:
    """The :class:`Level` describing ``box[cut]`` (its translation moves with the start)."""
    t = tuple(tt + sl.start * s for tt, sl, s in zip(box.translation, cut, box.scale))
    shape = tuple(sl.stop - sl.start for sl in cut)
    return Level(path or box.path, box.scale, t, shape)  # type: ignore[arg-type]


def chunk_keys(array: Any, cut: Sequence[slice]) -> list[str]:
    """Store keys of the chunks of a zarr v2 array that ``cut`` touches."""
    ranges = [range(sl.start // c, -(-sl.stop // c)) for sl, c in zip(cut, array.chunks)]
    return [array._chunk_key(idx) for idx in product(*ranges)]  # zarr<3: key with its separator


def read_em_block(em_array: Any, cut: Sequence[slice], where: str = "") -> np.ndarray:
    """Read ``em_array[cut]``, refusing never-fetched regions.

    ``csc fetch-data`` copies only the chunks near a crop, at some levels; the others
    read as the fill value. A cut touching an absent chunk, or reading all fill value,
    is therefore an error, never data.

    Args:
        em_array: an open ``zarr.Array`` (zarr v2).
        cut: ``(z, y, x)`` slices, e.g. from :func:`em_cut` (already bounds-checked).
        where: what to name in messages (defaults to the array's path).

    Raises:
        NeverFetchedError: absent chunks, or a block that is entirely the fill value.
    """
    name = where or getattr(em_array, "path", "") or "EM array"
    keys = chunk_keys(em_array, cut)
    store = em_array.chunk_store if em_array.chunk_store is not None else em_array.store
    missing = [k for k in keys if k not in store]
    if missing:
        raise NeverFetchedError(
            f"EM never fetched: {len(missing)} of {len(keys)} chunks absent in {name} (e.g. {missing[0]})"
        )
    block = np.asarray(em_array[tuple(cut)])
    fill = em_array.fill_value if em_array.fill_value is not None else 0
    if block.size and (block == fill).all():
        raise NeverFetchedError(f"EM never fetched: {name} cut is entirely the fill value {fill}")
    return block


def multiscales_attrs(levels: Sequence[Level], name: str = "") -> dict[str, Any]:
    """OME-NGFF v0.4 ``multiscales`` group attributes for ``levels`` (z, y, x nm)."""
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": name,
                "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in AXES],
                "datasets": [
                    {
                        "path": lv.path,
                        "coordinateTransformations": [
                            {"type": "scale", "scale": list(lv.scale)},
                            {"type": "translation", "translation": list(lv.translation)},
                        ],
                    }
                    for lv in levels
                ],
            }
        ]
    }


# ---- reduction from EM s0 to a target voxel size, in the box's own phase -------------
class ResolutionError(NgffError):
    """The target voxel size cannot be reached from these levels (not a data error)."""


def finest_level(levels: Sequence[Level]) -> Level:
    """The level with the smallest voxel (s0 as listed, whatever the order)."""
    return min(levels, key=lambda lv: (lv.scale[1] * lv.scale[2], lv.scale[0]))


def _whole(x: float, tol: float = 1e-6) -> int | None:
    """``x`` as an int when it is one within ``tol`` (relative), else ``None``."""
    r = round(x)
    return r if r >= 1 and abs(x - r) <= tol * max(1.0, abs(x)) else None


@dataclass(frozen=True)
class Reduction:
    """How one label box is cut from EM s0 and reduced to the output grid (all z, y, x).

    The box (label s0 geometry) lies on EM-s0 voxel edges. Output voxel ``j`` on an axis
    is the block of EM-s0 voxels ``em_cut.start + j f .. + (j + 1) f`` (and of label-s0
    voxels ``j r .. (j + 1) r``), so blocks start at the box's own edge (its phase), not
    at a multiple of ``f`` in the EM array. Whole blocks only: the trailing
    ``dropped`` EM-s0 voxels of an axis that do not fill a block are not written.

    Attributes:
        em: the EM s0 level.
        label: the label s0 level (the box).
        em_cut: EM s0 index ranges of the whole blocks (what is read).
        em_factor: EM s0 voxels per output voxel.
        label_factor: label s0 voxels per output voxel.
        out: the output grid (``path`` = ``""``): voxel size, voxel-0 centre, shape.
        dropped: trailing EM s0 voxels per axis left out (partial block).
    """

    em: Level
    label: Level
    em_cut: tuple[slice, slice, slice]
    em_factor: tuple[int, int, int]
    label_factor: tuple[int, int, int]
    out: Level
    dropped: tuple[int, int, int]

    @property
    def label_cut(self) -> tuple[slice, slice, slice]:
        """Label s0 index ranges of the whole blocks."""
        return tuple(slice(0, n * r) for n, r in zip(self.out.shape, self.label_factor))  # type: ignore[return-value]

    @property
    def dropped_label(self) -> tuple[int, int, int]:
        """Trailing label s0 voxels per axis left out."""
        return tuple(n - m * r for n, m, r in zip(self.label.shape, self.out.shape, self.label_factor))  # type: ignore[return-value]


def output_factors(em_s0: Level, target_zyx: Sequence[float | None]) -> tuple[int, int, int]:
    """EM s0 voxels per output voxel for a target voxel size.

    y and x: ``target / EM s0``, which must be a whole number (>= 1). z: the same when
    a z target is given; with ``None`` (any z) z takes the y/x factor, i.e. z follows the
    EM pyramid (hela-2, EM s0 z 5.24 nm, target 8 nm: factor 2, output z 10.48 nm).

    Raises:
        ResolutionError: EM s0 coarser than the target, or the target not a whole
            multiple of EM s0 on some axis.
    """
    out: list[int] = []
    for ax, t, e in zip(AXES, target_zyx, em_s0.scale):
        if t is None:
            continue
        if t < e * (1 - SCALE_RTOL):
            raise ResolutionError(
                f"EM s0 {fmt_vec(em_s0.scale)} nm is coarser than the target {fmt_vec(target_zyx)} nm on {ax} "
                "(no EM at that resolution)"
            )
        f = _whole(t / e)
        if f is None:
            raise ResolutionError(
                f"target {ax} {t:g} nm is not a whole multiple of EM s0 {ax} {e:g} nm "
                "(give resolution_nm as one number to let z follow the EM pyramid)"
            )
        out.append(f)
    if target_zyx[0] is None:
        out.insert(0, out[0])
    return tuple(out)  # type: ignore[return-value]


def plan_reduction(
    label_s0: Level, em_s0: Level, target_zyx: Sequence[float | None], tol: float = GRID_TOL
) -> Reduction:
    """Cut the box on EM s0 and reduce it to ``target_zyx`` in the box's phase (metadata only).

    Raises:
        ResolutionError: see :func:`output_factors`; the label s0 voxel does not divide
            the output voxel; or the box is smaller than one output voxel.
        OffGridError: the box is not on EM s0 voxel edges.
        OutOfBoundsError: the box leaves the EM s0 array.
    """
    f = output_factors(em_s0, target_zyx)
    cut = em_cut(label_s0, em_s0, tol)
    r: list[int] = []
    for ax, fi, e, l in zip(AXES, f, em_s0.scale, label_s0.scale):
        ri = _whole(fi * e / l, 1e-4)
        if ri is None:
            raise ResolutionError(
                f"label s0 {ax} {l:g} nm does not divide the output {ax} {fi * e:g} nm "
                f"(label s0 {fmt_vec(label_s0.scale)}, EM s0 {fmt_vec(em_s0.scale)})"
            )
        r.append(ri)
    n_em = [sl.stop - sl.start for sl in cut]
    shape = tuple(n // fi for n, fi in zip(n_em, f))
    if min(shape) == 0:
        raise ResolutionError(
            f"box of {tuple(n_em)} EM s0 voxels is smaller than one output voxel ({tuple(f)} EM s0 voxels)"
        )
    scale = tuple(e * fi for e, fi in zip(em_s0.scale, f))
    # voxel-0 centre: the box's first EM-s0 edge plus half an output voxel
    trans = tuple(te + (sl.start - 0.5) * e + o / 2 for te, sl, e, o in zip(em_s0.translation, cut, em_s0.scale, scale))
    whole = tuple(slice(sl.start, sl.start + n * fi) for sl, n, fi in zip(cut, shape, f))
    dropped = tuple(n - m * fi for n, m, fi in zip(n_em, shape, f))
    return Reduction(em_s0, label_s0, whole, f, tuple(r), Level("", scale, trans, shape), dropped)  # type: ignore[arg-type]


def block_mean_u8(block: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Mean of each ``factor`` block of a uint8 (z, y, x) array, rounded half up, as uint8.

    ``block``'s shape must be a whole number of blocks. The sum is exact (integers);
    ``(2 sum + n) // (2 n)`` is ``floor(mean + 1/2)``.
    """
    fz, fy, fx = (int(v) for v in factor)
    if (fz, fy, fx) == (1, 1, 1):
        return block
    z, y, x = (s // f for s, f in zip(block.shape, (fz, fy, fx)))
    n = fz * fy * fx
    acc = np.uint16 if n <= 256 else np.uint32
    s = block.reshape(z, fz, y * fy * x * fx).sum(axis=1, dtype=acc)
    s = s.reshape(z, y, fy, x * fx).sum(axis=2, dtype=np.uint32)
    s = s.reshape(z, y, x, fx).sum(axis=3, dtype=np.uint32)
    return ((2 * s + n) // (2 * n)).astype(np.uint8)
