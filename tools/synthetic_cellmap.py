"""A synthetic CellMap-like zarr tree (cellmap-data.md §7), generated at test time.

One Zarr-v2 OME-NGFF store ``<root>/jrc_synth-1/jrc_synth-1.zarr`` (``dimension_separator
"/"``, Zstd(6), fill value 0) with an anisotropic EM pyramid whose values encode their
position (:func:`em_value`), so every cut can be checked by value, and these crops:

======  ==========================================================================
crop1   half the EM voxel (s0 [3,2,2], s1 [6,4,4] lands on EM s0); ``all`` ids 1/3/4/35
        and group 50; ``mito_ribo`` all 0 (annotated-absent); ``mito`` uint16 ids > 255
crop2   EM-s0 voxel, non-zero translation; ecs + pm only (``er_mem`` unannotated)
crop3   coarse (EM-s2 voxel [24,16,16]), nuc only, one level
crop4   malformed: ``ecs`` group without ``multiscales``
crop5   its EM-s0 chunk was deleted (never fetched)
crop6   no ``all`` array: composed from class arrays; semantic 255 = unknown; ``nuc``
        instance uint16 with ids 255 and 300; ``pm/s0`` lacks ``.zattrs`` (harmless)
crop7   malformed: ``ecs`` group without ``.zattrs``
crop8   malformed: off-grid translation [1,1,1]
crop9   malformed: shape mismatch between classes
crop10  malformed: a corrupt (unreadable) label chunk
crop11  malformed: cut outside the EM volume
======  ==========================================================================

Plus ``<root>/test_crop_manifest.csv`` (challenge format) with two on-grid test boxes at
different voxel sizes. ``large=True`` adds a second dataset ``jrc_synthbig-1`` with
``n_extra_crops`` crops of ``size``³ at the EM-s0 voxel (for benchmarks).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd

from common.ngff import EM_GROUP, Level, multiscales_attrs

DATASET = "jrc_synth-1"
BIG_DATASET = "jrc_synthbig-1"
GT_GROUP = "recon-1/labels/groundtruth"
EM_LEVELS = (  # (scale, translation) of s0..s2, (z, y, x) nm
    ((6.0, 4.0, 4.0), (0.0, 0.0, 0.0)),
    ((12.0, 8.0, 8.0), (3.0, 2.0, 2.0)),
    ((24.0, 16.0, 16.0), (9.0, 6.0, 6.0)),
)
EM_SHAPE_S0 = (40, 64, 48)
EM_CHUNKS = (16, 32, 32)
DELETED_EM_CHUNK = "1/1/1"  # EM s0 chunk removed under crop5
MANIFEST_HEADER = "crop_name,dataset,class_label,voxel_size,translation,shape"


def em_value(level: int, z: Any, y: Any, x: Any) -> Any:
    """EM voxel value at level ``level`` index (z, y, x): ``(7z + 3y + x + 50 level) mod 251``.

    The level term makes a read of the wrong pyramid level visible.
    """
    return (7 * z + 3 * y + x + 50 * level) % 251


def em_block(level: int, cut: tuple[slice, slice, slice]) -> np.ndarray:
    """The expected EM voxels of ``cut`` at ``level`` (uint8, z, y, x)."""
    z, y, x = np.ogrid[cut[0], cut[1], cut[2]]
    return em_value(level, z, y, x).astype(np.uint8)


@dataclass
class CropExpect:
    """What convert must produce for one crop at ``resolution_nm: 4``.

    Attributes:
        dataset, crop: where it lives (crop id without ``crop``).
        status: ``converted`` | ``skipped`` | ``failed``.
        reason: a substring of the report's reason (``""`` when converted).
        label_level, em_level: chosen level paths when converted.
        em_cut: EM index ranges (z, y, x) when converted.
        scale, translation: voxel size and voxel-0 centre (nm, z, y, x) of the output.
    """

    dataset: str
    crop: str
    status: str
    reason: str = ""
    label_level: str = ""
    em_level: str = ""
    em_cut: tuple[tuple[int, int], ...] = ()
    scale: tuple[float, ...] = ()
    translation: tuple[float, ...] = ()

    @property
    def case(self) -> str:
        return f"{self.dataset}_crop{self.crop}"

    def em_level_index(self) -> int:
        return int(self.em_level[1:])


@dataclass
class SyntheticInfo:
    """What :func:`make_synthetic_cellmap` wrote and what a converter must get from it.

    Attributes:
        root: the data root (``data_root`` of the pipeline).
        datasets: dataset names written.
        crops: crop id -> expectation at 4 nm.
        coarse_crop3: crop3's expectation at ``resolution_nm: 16`` (EM s2 cut).
        manifest: path of ``test_crop_manifest.csv``.
        test_boxes: the manifest rows as (crop, dataset, class, Level, EM level path, cut).
        labels: crop id -> {array name: s0..sN arrays} as written (for label checks).
    """

    root: Path
    datasets: list[str]
    crops: dict[str, CropExpect]
    coarse_crop3: CropExpect
    manifest: Path
    test_boxes: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)


# ---- low-level writers ------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _group(path: Path, attrs: dict[str, Any] | None = None) -> None:
    _write_json(path / ".zgroup", {"zarr_format": 2})
    if attrs is not None:
        _write_json(path / ".zattrs", attrs)


def _array(path: Path, data: np.ndarray, chunks: tuple[int, ...], attrs: dict[str, Any] | None = None) -> None:
    arr = zarr.open_array(
        str(path),
        mode="w",
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        compressor=Zstd(level=6),
        fill_value=0,
        dimension_separator="/",
    )
    arr[...] = data
    if attrs is not None:
        arr.attrs.update(attrs)


def _annotation(name: str, instance: bool) -> dict[str, Any]:
    if instance:
        kind, enc, counts = "instance_segmentation", {"absent": 0, "unknown": 255}, {"absent": 0, "unknown": 0}
    else:
        kind, enc = "semantic_segmentation", {"absent": 0, "present": 1, "unknown": 255}
        counts = {"absent": 0, "unknown": 0}
    return {
        "cellmap": {
            "annotation": {
                "class_name": name,
                "annotation_type": {"type": kind, "encoding": enc},
                "complement_counts": counts,
            }
        }
    }


def _pyramid(s0: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Nearest-neighbour label pyramid (every other voxel)."""
    out = [s0]
    for _ in range(1, n_levels):
        out.append(np.ascontiguousarray(out[-1][::2, ::2, ::2]))
    return out


def _levels(scale0: tuple[float, ...], t0: tuple[float, ...], arrays: list[np.ndarray]) -> list[Level]:
    """Levels following the pyramid rule ``s0 2^k``, ``t0 + (2^k - 1) s0 / 2``."""
    out = []
    for k, a in enumerate(arrays):
        f = 2**k
        out.append(
            Level(
                f"s{k}",
                tuple(s * f for s in scale0),  # type: ignore[arg-type]
                tuple(t + (f - 1) * s / 2 for t, s in zip(t0, scale0)),  # type: ignore[arg-type]
                a.shape,  # type: ignore[arg-type]
            )
        )
    return out


def _label_group(
    crop_dir: Path,
    name: str,
    arrays: list[np.ndarray],
    levels: list[Level],
    *,
    instance: bool = False,
    multiscales: bool = True,
    zattrs: bool = True,
    level_zattrs: bool = True,
    chunks: tuple[int, int, int] = (32, 32, 32),
) -> None:
    g = crop_dir / name
    attrs: dict[str, Any] = dict(_annotation(name, instance))
    if multiscales:
        attrs.update(multiscales_attrs(levels, name))
    _group(g, attrs if zattrs else None)
    for k, a in enumerate(arrays):
        _array(
            g / f"s{k}",
            a,
            tuple(min(c, s) for c, s in zip(chunks, a.shape)),
            _annotation(name, instance) if level_zattrs else None,
        )


def _crop(
    gt: Path,
    crop: str,
    scale0: tuple[float, ...],
    t0: tuple[float, ...],
    arrays: dict[str, np.ndarray],
    n_levels: int = 1,
    instance: tuple[str, ...] = (),
    chunks: tuple[int, int, int] = (32, 32, 32),
    **defects: Any,
) -> dict[str, list[np.ndarray]]:
    """Write ``crop<crop>`` with one group per array; ``defects``: name -> kwargs."""
    crop_dir = gt / f"crop{crop}"
    names = sorted(arrays)
    _group(crop_dir, {"cellmap": {"annotation": {"class_names": [n for n in names if n != "all"]}}})
    written = {}
    for name in names:
        pyr = _pyramid(arrays[name], n_levels)
        kw = dict(defects.get(name, {}))
        levels = kw.pop("levels", None) or _levels(scale0, t0, pyr)
        _label_group(crop_dir, name, pyr, levels, instance=name in instance, chunks=chunks, **kw)
        written[name] = pyr
    return written


def _blobs(shape: tuple[int, ...], rng: np.random.Generator, ids: list[int], n: int = 3) -> np.ndarray:
    """An id map of ellipsoids (later ids overwrite earlier ones); each drawn in its bounding box."""
    out = np.zeros(shape, dtype=np.uint8)
    for cid in ids:
        for _ in range(n):
            c = [rng.uniform(0.2 * s, 0.8 * s) for s in shape]
            r = [max(1.0, rng.uniform(0.15 * s, 0.35 * s)) for s in shape]
            lo = [max(0, int(cc - rr)) for cc, rr in zip(c, r)]
            hi = [min(s, int(cc + rr) + 2) for cc, rr, s in zip(c, r, shape)]
            grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
            d = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(grid, c, r))
            box = out[tuple(slice(a, b) for a, b in zip(lo, hi))]
            box[d <= 1.0] = cid
    return out


def _em_pyramid(
    zroot: Path, shape0: tuple[int, int, int], chunks: tuple[int, int, int], levels: int = 3, slab: int = 16
) -> None:
    """Write the EM group (values from :func:`em_value`), ``slab`` z-planes at a time."""
    em = zroot / EM_GROUP
    lv = []
    shape = shape0
    for k in range(levels):
        (s, t) = (
            EM_LEVELS[k]
            if k < len(EM_LEVELS)
            else (
                tuple(v * 2**k for v in EM_LEVELS[0][0]),
                tuple((2**k - 1) * v / 2 for v in EM_LEVELS[0][0]),
            )
        )
        lv.append(Level(f"s{k}", s, t, shape))  # type: ignore[arg-type]
        shape = tuple(max(1, (n + 1) // 2) for n in shape)  # type: ignore[assignment]
    _group(zroot / "recon-1")
    _group(zroot / "recon-1/em")
    _group(em, multiscales_attrs(lv, "fibsem-uint8"))
    for k, level in enumerate(lv):
        arr = zarr.open_array(
            str(em / level.path),
            mode="w",
            shape=level.shape,
            chunks=tuple(min(c, n) for c, n in zip(chunks, level.shape)),
            dtype=np.uint8,
            compressor=Zstd(level=6),
            fill_value=0,
            dimension_separator="/",
        )
        step = max(slab, arr.chunks[0])
        for z0 in range(0, level.shape[0], step):
            z1 = min(level.shape[0], z0 + step)
            arr[z0:z1] = em_block(k, (slice(z0, z1), slice(0, level.shape[1]), slice(0, level.shape[2])))


def _at(
    scale: tuple[float, ...], start: tuple[int, ...], em_t: tuple[float, ...] = (0.0, 0.0, 0.0)
) -> tuple[float, ...]:
    """Translation of a box at the EM voxel size starting at EM index ``start``."""
    return tuple(t + i * s for t, i, s in zip(em_t, start, scale))


# ---- the fixture --------------------------------------------------------------------
def make_synthetic_cellmap(
    root: str | Path,
    large: bool = False,
    n_extra_crops: int | None = None,
    size: int = 128,
    seed: int = 0,
    small: bool = True,
    extra_crop_shape: tuple[int, int, int] | None = None,
    em_pad: int | None = None,
    em_from_labels: bool = False,
    em_noise: float = 10.0,
) -> SyntheticInfo:
    """Write the synthetic CellMap tree under ``root`` (replacing it) and describe it.

    Args:
        root: the data root to create.
        large: also write ``jrc_synthbig-1`` (benchmark crops).
        n_extra_crops: crops in ``jrc_synthbig-1`` (default 16 when ``large``).
        size: edge of each big crop in voxels (>= 8).
        seed: RNG seed of the label blobs.
        small: write the small ``jrc_synth-1`` dataset (tests); ``False`` for benches.
        extra_crop_shape: (z, y, x) voxels of each big crop instead of ``size``³.
        em_pad: EM voxels around and between big crops (default a quarter of the crop);
            real EM volumes are far larger than their crops.
        em_from_labels: paint the EM under the big crops from their labels (a grey level
            per class plus noise) so a model can learn them (``make demo``); the default
            position-coded EM makes every cut checkable by value instead.
        em_noise: standard deviation of the Gaussian noise of the painted EM (grey levels).
    """
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    info = SyntheticInfo(
        root=root,
        datasets=[],
        crops={},
        coarse_crop3=CropExpect(DATASET, "3", "converted"),
        manifest=root / "test_crop_manifest.csv",
    )
    if small:
        _make_small(root, rng, info)
    n_big = n_extra_crops if n_extra_crops is not None else (16 if large else 0)
    if n_big:
        _make_big(
            root, rng, info, n_big, tuple(extra_crop_shape or (size, size, size)), em_pad, em_from_labels, em_noise
        )
    return info


def _make_small(root: Path, rng: np.random.Generator, info: SyntheticInfo) -> None:
    zroot = root / DATASET / f"{DATASET}.zarr"
    _group(zroot)
    _em_pyramid(zroot, EM_SHAPE_S0, EM_CHUNKS)
    _group(zroot / "recon-1/labels")
    gt = zroot / GT_GROUP
    _group(gt)
    info.datasets.append(DATASET)
    e0 = EM_LEVELS[0][0]
    ex = info.crops

    def expect(crop: str, status: str, reason: str = "", **kw: Any) -> None:
        ex[crop] = CropExpect(DATASET, crop, status, reason, **kw)

    # crop1: label s0 at half the EM voxel; s1 lands on EM s0 at [10:14, 8:14, 12:17]
    a = np.full((8, 12, 10), 35, np.uint8)  # cyto
    a[:, :4, :] = 1  # ecs
    a[2:8, 5:11, 2:8] = 3  # mito_mem shell ...
    a[4:6, 6:10, 4:6] = 4  # ... mito_lum inside
    a[0:2, 5:9, 6:10] = 50  # mito group: parts not annotated -> unknown
    a[6:8, 0:2, 0:2] = 0  # unlabelled corner
    mito = np.zeros(a.shape, np.uint16)
    mito[np.isin(a, (3, 4))] = 300
    mito[a == 50] = 255  # an ordinary instance id
    info.labels["1"] = _crop(
        gt,
        "1",
        (3.0, 2.0, 2.0),
        (58.5, 31.0, 47.0),
        {
            "all": a,
            "ecs": (a == 1).astype(np.uint8),
            "mito_mem": (a == 3).astype(np.uint8),
            "mito_lum": (a == 4).astype(np.uint8),
            "mito_ribo": np.zeros_like(a),
            "mito": mito,
        },
        n_levels=2,
        instance=("mito",),
    )
    expect(
        "1",
        "converted",
        label_level="s1",
        em_level="s0",
        em_cut=((10, 14), (8, 14), (12, 17)),
        scale=(6.0, 4.0, 4.0),
        translation=(60.0, 32.0, 48.0),
    )

    # crop2: EM-s0 voxel, non-zero translation, ecs + pm (no er_mem)
    a = _blobs((6, 10, 8), rng, [1, 2])
    a[0, 0, 0], a[-1, -1, -1] = 1, 2
    info.labels["2"] = _crop(
        gt, "2", e0, (120.0, 120.0, 16.0), {"all": a, "ecs": (a == 1).astype(np.uint8), "pm": (a == 2).astype(np.uint8)}
    )
    expect(
        "2",
        "converted",
        label_level="s0",
        em_level="s0",
        em_cut=((20, 26), (30, 40), (4, 12)),
        scale=e0,
        translation=(120.0, 120.0, 16.0),
    )

    # crop3: coarse (EM-s2 voxel), nuc only
    a = np.zeros((4, 6, 4), np.uint8)
    a[1:3, 1:5, 1:3] = 37
    a[2, 2, 2] = 28  # nucpl: an atom of nuc
    nuc = np.where(a > 0, 7, 0).astype(np.uint16)
    s2, t2 = EM_LEVELS[2]
    info.labels["3"] = _crop(gt, "3", s2, (33.0, 38.0, 38.0), {"all": a, "nuc": nuc}, instance=("nuc",))
    expect("3", "skipped", "coarser than target resolution")
    info.coarse_crop3 = CropExpect(
        DATASET,
        "3",
        "converted",
        label_level="s0",
        em_level="s2",
        em_cut=((1, 5), (2, 8), (2, 6)),
        scale=s2,
        translation=(33.0, 38.0, 38.0),
    )

    small = np.zeros((4, 4, 4), np.uint8)
    small[:2] = 1
    two = {"all": small, "ecs": (small == 1).astype(np.uint8)}
    # crop4: ecs group without multiscales
    _crop(gt, "4", e0, _at(e0, (2, 2, 2)), two, ecs={"multiscales": False})
    expect("4", "failed", "no multiscales")
    # crop5: its EM s0 chunk was never fetched
    a5 = _blobs((4, 6, 6), rng, [1, 2])
    info.labels["5"] = _crop(gt, "5", e0, _at(e0, (18, 36, 34)), {"all": a5, "ecs": (a5 == 1).astype(np.uint8)})
    (zroot / EM_GROUP / "s0" / DELETED_EM_CHUNK).unlink()
    expect("5", "failed", "never fetched")
    # crop6: no `all`; composed from class arrays (semantic 255 = unknown, instance 255 = id)
    shape6 = (6, 10, 8)
    ecs = np.zeros(shape6, np.uint8)
    ecs[:, :3] = 1
    ecs[0, 0, :2] = 255
    pm = np.zeros(shape6, np.uint8)
    pm[:, 3] = 1
    nuc6 = np.zeros(shape6, np.uint16)
    nuc6[1:3, 5:8, 1:4] = 255
    nuc6[3:5, 5:8, 4:7] = 300
    er = np.zeros(shape6, np.uint8)
    er[4:6, 8:10, 0:2] = 1
    zeros = np.zeros(shape6, np.uint8)
    info.labels["6"] = _crop(
        gt,
        "6",
        e0,
        _at(e0, (24, 40, 20)),
        {"ecs": ecs, "pm": pm, "mito_mem": zeros, "mito_lum": zeros, "mito_ribo": zeros, "er_mem": er, "nuc": nuc6},
        instance=("nuc",),
        pm={"level_zattrs": False},
    )
    expect(
        "6",
        "converted",
        label_level="s0",
        em_level="s0",
        em_cut=((24, 30), (40, 50), (20, 28)),
        scale=e0,
        translation=_at(e0, (24, 40, 20)),
    )
    # crop7: ecs group without .zattrs
    _crop(gt, "7", e0, _at(e0, (2, 10, 2)), two, ecs={"zattrs": False})
    expect("7", "failed", "missing .zattrs")
    # crop8: off-grid translation
    _crop(gt, "8", e0, (1.0, 1.0, 1.0), two)
    expect("8", "failed", "off-grid")
    # crop9: shape mismatch between classes
    bad = [Level("s0", e0, _at(e0, (2, 20, 2)), (4, 4, 5))]  # type: ignore[arg-type]
    _crop(gt, "9", e0, _at(e0, (2, 20, 2)), {"all": small, "ecs": np.zeros((4, 4, 5), np.uint8)}, ecs={"levels": bad})
    expect("9", "failed", "shape mismatch between classes")
    # crop10: a corrupt label chunk
    _crop(gt, "10", e0, _at(e0, (2, 30, 2)), two)
    (gt / "crop10/all/s0/0/0/0").write_bytes(b"this is not a zstd frame")
    expect("10", "failed", "unreadable chunk")
    # crop11: cut leaves the EM volume (z 36:44 of 40)
    _crop(gt, "11", e0, _at(e0, (36, 2, 2)), {"all": np.ones((8, 4, 4), np.uint8), "ecs": np.ones((8, 4, 4), np.uint8)})
    expect("11", "failed", "out of bounds")

    # the challenge-format test manifest: two on-grid boxes, EM s0 and EM s1
    s1, t1 = EM_LEVELS[1]
    boxes = [
        ("901", "ecs", Level("", e0, _at(e0, (10, 16, 10)), (8, 8, 8)), "s0"),  # type: ignore[arg-type]
        ("902", "nuc", Level("", s1, _at(s1, (2, 3, 4), t1), (6, 8, 6)), "s1"),  # type: ignore[arg-type]
    ]
    rows = [MANIFEST_HEADER]
    for crop, cls, box, em_path in boxes:
        vec = lambda v: "[" + ";".join(f"{x:g}" for x in v) + "]"  # noqa: E731
        rows.append(f"{crop},{DATASET},{cls},{vec(box.scale)},{vec(box.translation)},{vec(box.shape)}")
        k = int(em_path[1:])
        start = [round((tb - te) / s) for tb, te, s in zip(box.translation, EM_LEVELS[k][1], box.scale)]
        info.test_boxes.append(
            {
                "crop": crop,
                "dataset": DATASET,
                "class_label": cls,
                "box": box,
                "em_level": em_path,
                "em_cut": tuple((i, i + n) for i, n in zip(start, box.shape)),
            }
        )
    info.manifest.write_text("\n".join(rows) + "\n")


# Grey level per ``all`` id for ``em_from_labels`` (membranes dark, lumens light, like FIB-SEM);
# neighbouring levels are about 3 noise sigmas apart so that a small CPU network separates
# every class within the demo's few minutes.
_EM_GREY = {0: 120, 1: 245, 2: 15, 3: 50, 4: 180, 5: 85, 37: 212, 50: 150}


def _paint_em_from_labels(
    zroot: Path, crops: list[tuple[tuple[int, ...], np.ndarray]], rng: np.random.Generator, noise: float = 10.0
) -> None:
    """Overwrite EM s0 under each crop with grey levels of its labels, then rebuild s1 from s0."""
    em = zroot / EM_GROUP
    s0 = zarr.open_array(str(em / "s0"), mode="r+")
    vol = np.full(s0.shape, _EM_GREY[0], dtype=np.float32)
    lut = np.full(256, _EM_GREY[0], dtype=np.float32)
    for cid, grey in _EM_GREY.items():
        lut[cid] = grey
    for start, a in crops:
        vol[tuple(slice(b, b + n) for b, n in zip(start, a.shape))] = lut[a]
    vol += rng.normal(0.0, noise, size=vol.shape).astype(np.float32)
    vol8 = np.clip(vol, 1, 255).astype(np.uint8)  # never 0: the fill value means "never fetched"
    s0[...] = vol8
    s1 = zarr.open_array(str(em / "s1"), mode="r+")
    padded = np.pad(vol8.astype(np.float32), [(0, 2 * n - m) for n, m in zip(s1.shape, vol8.shape)], mode="edge")
    z, y, x = s1.shape
    s1[...] = padded.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5)).round().astype(np.uint8)


def _make_big(
    root: Path,
    rng: np.random.Generator,
    info: SyntheticInfo,
    n: int,
    shape: tuple[int, ...],
    em_pad: int | None = None,
    em_from_labels: bool = False,
    em_noise: float = 10.0,
) -> None:
    """``n`` crops of ``shape`` (z, y, x) at the EM-s0 voxel, on a grid inside a larger EM volume.

    Every crop annotates ecs, pm, mito_mem, mito_lum, mito_ribo and nuc (so 0 is a true
    negative for those) and holds some mito group (50) voxels (unknown).
    """
    if min(shape) < 8:
        raise ValueError(f"big crops need >= 8 voxels per axis, got {shape}")
    zroot = root / BIG_DATASET / f"{BIG_DATASET}.zarr"
    _group(zroot)
    grid = (2 if n > 4 else 1, 2 if n > 1 else 1, 0)
    grid = (grid[0], grid[1], -(-n // (grid[0] * grid[1])))
    pad = tuple(em_pad if em_pad is not None else max(4, s // 4) for s in shape)
    shape0 = tuple(g * (s + p) + p for g, s, p in zip(grid, shape, pad))
    _em_pyramid(zroot, shape0, (64, 128, 128), levels=2, slab=64)  # type: ignore[arg-type]
    _group(zroot / "recon-1/labels")
    gt = zroot / GT_GROUP
    _group(gt)
    info.datasets.append(BIG_DATASET)
    e0 = EM_LEVELS[0][0]
    painted: list[tuple[tuple[int, ...], np.ndarray]] = []
    for i in range(n):
        iz, rest = divmod(i, grid[1] * grid[2])
        iy, ix = divmod(rest, grid[2])
        start = tuple(p + k * (s + p) for p, k, s in zip(pad, (iz, iy, ix), shape))
        crop = str(100 + i)
        a = _blobs(shape, rng, [1, 2, 37, 3, 4, 5, 50], n=2)
        painted.append((start, a))
        nuc = np.where(a == 37, 1000 + i, 0).astype(np.uint16)
        _crop(
            gt,
            crop,
            e0,
            _at(e0, start),
            {
                "all": a,
                "ecs": (a == 1).astype(np.uint8),
                "pm": (a == 2).astype(np.uint8),
                "mito_mem": (a == 3).astype(np.uint8),
                "mito_lum": (a == 4).astype(np.uint8),
                "mito_ribo": (a == 5).astype(np.uint8),
                "nuc": nuc,
            },
            instance=("nuc",),
            chunks=(64, 64, 64),
        )
        info.crops[crop] = CropExpect(
            BIG_DATASET,
            crop,
            "converted",
            label_level="s0",
            em_level="s0",
            em_cut=tuple((s, s + n_) for s, n_ in zip(start, shape)),
            scale=e0,
            translation=_at(e0, start),
        )
    if em_from_labels:
        _paint_em_from_labels(zroot, painted, rng, em_noise)
