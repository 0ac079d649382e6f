"""A CellMap zarr tree with the challenge's real crop geometry, shapes shrunk (tests, benches).

Reads the committed geometry facts ``tests/data/real_crops.csv`` (label-s0 voxel size,
translation, shape, classes per crop) and ``tests/data/em_s0.csv`` (EM s0 per dataset)
and writes, for chosen crops, a Zarr-v2 OME-NGFF tree laid out like the real one:

* ``<ds>/<ds>.zarr/recon-1/em/fibsem-uint8/s0..s2``: EM s0 at the dataset's real voxel
  size and translation, with a shape covering every chosen crop; **sparse**: only the
  chunks under the chosen crops are written (s1 and s2 carry metadata only, as after a
  fetch that took EM s0). Values are :func:`em_value` of the EM s0 index, never 0 (the
  fill value means "never fetched"), so any block mean is predictable.
* ``.../labels/groundtruth/crop<id>/{all/s0..s1,<class>/s0}``: each crop keeps its real
  label-s0 voxel size and translation (so its odd start phase on EM s0); its shape is
  shrunk to 8..24 label voxels per axis, always a whole number of EM s0 voxels. ``all``
  holds ids of the crop's own classes (plus the ``mito`` group 50 where the crop lists
  it, which maps to unknown); one array per listed class among the 14 default classes
  (semantic 0/1, ``nuc`` instance ids), annotation attributes as in
  :mod:`tools.synthetic_cellmap`.

Run ``python -m tools.realgeom OUT [--crops 1,238] [--all-eligible]`` to write a tree.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import zarr
from numcodecs import Zstd

from common.classes import CELLMAP_CLASSES, DEFAULT_CLASSES, INSTANCE_CLASSES
from common.ngff import EM_GROUP, Level, multiscales_attrs
from tools.synthetic_cellmap import _group  # the one zarr v2 group writer of the generators

ROOT = Path(__file__).resolve().parents[1]
REAL_CROPS = ROOT / "tests" / "data" / "real_crops.csv"
EM_S0 = ROOT / "tests" / "data" / "em_s0.csv"
GT_GROUP = "recon-1/labels/groundtruth"
EM_CHUNKS = (32, 32, 32)  # smaller than the real (64, 128, 128): the tree stays small


@dataclass(frozen=True)
class RealCrop:
    """One row of ``real_crops.csv`` (label s0 geometry, z, y, x nm / voxels)."""

    crop: str
    split: str
    dataset: str
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]
    classes: tuple[str, ...]

    @property
    def level(self) -> Level:
        return Level("s0", self.voxel_size, self.translation, self.shape)

    @property
    def case(self) -> str:
        return f"{self.dataset}_crop{self.crop}"


def _vec(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.strip().strip("[]").split(";"))


def load_real_crops(path: Path = REAL_CROPS) -> list[RealCrop]:
    """Every row of the geometry table (train and test)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            RealCrop(
                r["crop"],
                r["split"],
                r["dataset"],
                _vec(r["voxel_size"]),
                _vec(r["translation"]),  # type: ignore[arg-type]
                tuple(int(v) for v in _vec(r["shape"])),
                tuple(r["classes"].split()),
            )  # type: ignore[arg-type]
            for r in csv.DictReader(fh)
        ]


def load_em_s0(path: Path = EM_S0) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """``dataset -> (EM s0 voxel size, translation)``."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["dataset"]: (_vec(r["voxel_size"]), _vec(r["translation"])) for r in csv.DictReader(fh)}


def eligible(c: RealCrop, classes: tuple[str, ...] = DEFAULT_CLASSES, max_nm: float = 8.0) -> bool:
    """A train crop with >= 1 of ``classes`` and label s0 <= ``max_nm`` on every axis."""
    return c.split == "train" and bool(set(classes) & set(c.classes)) and max(c.voxel_size) <= max_nm + 1e-9


def em_value(z: Any, y: Any, x: Any) -> Any:
    """EM s0 value at index (z, y, x), never the fill value 0: a ramp ``(3z + 5y + 7x) mod 190``
    plus 6 bits of hashed noise, so it deflates about as poorly as real FIB-SEM (not like a ramp)."""
    z, y, x = (np.asarray(v).astype(np.uint64) for v in (z, y, x))
    h = (z * np.uint64(73856093)) ^ (y * np.uint64(19349663)) ^ (x * np.uint64(83492791))
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995)
    noise = ((h ^ (h >> np.uint64(15))) >> np.uint64(7)) % np.uint64(64)
    ramp = (np.uint64(3) * z + np.uint64(5) * y + np.uint64(7) * x) % np.uint64(190)
    return (ramp + noise + np.uint64(1)).astype(np.int64)


def em_block(cut: tuple[slice, slice, slice]) -> np.ndarray:
    """EM s0 voxels of ``cut`` (uint8)."""
    z, y, x = np.ogrid[cut[0], cut[1], cut[2]]
    return em_value(z, y, x).astype(np.uint8)


def em_start(c: RealCrop, em: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[int, int, int]:
    """EM s0 index of the crop's first voxel edge (every real box lies on EM s0 edges)."""
    (e, te) = em
    out = []
    for l, t, ee, tt in zip(c.voxel_size, c.translation, e, te):
        f = (t - l / 2 - (tt - ee / 2)) / ee
        if abs(f - round(f)) > 1e-3:
            raise ValueError(f"crop {c.crop}: box not on EM s0 edges ({f})")
        out.append(round(f))
    return tuple(out)  # type: ignore[return-value]


def shrunk_shape(
    c: RealCrop, em_scale: tuple[float, ...], rng: np.random.Generator, lo: int = 8, hi: int = 24
) -> tuple[int, int, int]:
    """8..24 label voxels per axis (never more than the real shape), a whole number of EM s0 voxels."""
    out = []
    for n_real, l, e in zip(c.shape, c.voxel_size, em_scale):
        n = min(n_real, int(rng.integers(lo, hi + 1)))
        step = max(1, round(e / l)) if l < e else 1  # label voxels per EM s0 voxel
        n = max(step, n - n % step)
        out.append(n)
    return tuple(out)  # type: ignore[return-value]


def _ids_for(c: RealCrop) -> list[int]:
    """``all`` ids this crop may hold: atoms of its listed default classes (nuc: nucpl 28), cyto, mito group."""
    ids = []
    for name in c.classes:
        if name in DEFAULT_CLASSES:
            ids.append(28 if name == "nuc" else CELLMAP_CLASSES[name][0])
    if "cyto" in c.classes:
        ids.append(35)
    if "mito" in c.classes:
        ids.append(50)  # group id: unknown for the default classes
    return sorted(set(ids))


def label_ids(
    shape: tuple[int, ...], ids: list[int], rng: np.random.Generator, cell: int = 3, noise_fraction: float = 0.15
) -> np.ndarray:
    """An ``all`` id map: ``cell``-voxel cubes of random ids (3: edges straddle pooling blocks), some 0,
    and ``noise_fraction`` single voxels of another id."""
    coarse = tuple(-(-s // cell) for s in shape)
    choices = np.array([0, *ids], np.uint8)
    grid = choices[rng.integers(0, len(choices), coarse)]
    a = grid.repeat(cell, 0).repeat(cell, 1).repeat(cell, 2)[: shape[0], : shape[1], : shape[2]]
    noise = rng.random(shape) < noise_fraction
    a = a.copy()
    a[noise] = choices[rng.integers(0, len(choices), int(noise.sum()))]
    return np.ascontiguousarray(a)


# ---- writers (the generator's own: tools.synthetic_cellmap) --------------------------------


def _annotation(name: str, instance: bool) -> dict[str, Any]:
    if instance:
        kind, enc = "instance_segmentation", {"absent": 0, "unknown": 255}
    else:
        kind, enc = "semantic_segmentation", {"absent": 0, "present": 1, "unknown": 255}
    return {
        "cellmap": {
            "annotation": {
                "class_name": name,
                "annotation_type": {"type": kind, "encoding": enc},
                "complement_counts": {"absent": 0, "unknown": 0},
            }
        }
    }


def _pyramid_levels(scale0: tuple[float, ...], t0: tuple[float, ...], shapes: list[tuple[int, ...]]) -> list[Level]:
    out = []
    for k, shape in enumerate(shapes):
        f = 2**k
        out.append(
            Level(
                f"s{k}",
                tuple(s * f for s in scale0),  # type: ignore[arg-type]
                tuple(t + (f - 1) * s / 2 for t, s in zip(t0, scale0)),
                tuple(shape),
            )
        )  # type: ignore[arg-type]
    return out


def _label_array(group: Path, name: str, s0: np.ndarray, level: Level, instance: bool, pyramid: bool = True) -> None:
    """One label group; ``pyramid`` adds a nearest-neighbour s1 (convert never reads it)."""
    pyr = [s0, np.ascontiguousarray(s0[::2, ::2, ::2])] if pyramid else [s0]
    levels = _pyramid_levels(level.scale, level.translation, [a.shape for a in pyr])
    g = group / name
    _group(g, {**_annotation(name, instance), **multiscales_attrs(levels, name)})
    for lv, a in zip(levels, pyr):
        arr = zarr.open_array(
            str(g / lv.path),
            mode="w",
            shape=a.shape,
            chunks=a.shape,
            dtype=a.dtype,
            compressor=Zstd(level=1),
            fill_value=0,
            dimension_separator="/",
        )
        arr[...] = a
        arr.attrs.update(_annotation(name, instance))


@dataclass
class RealGeomInfo:
    """What :func:`make_realgeom_tree` wrote.

    Attributes:
        root: the data root.
        crops: crop id -> the shrunk crop (real voxel size and translation, new shape).
        em: dataset -> (EM s0 voxel size, translation).
        labels: crop id -> ``all`` s0 ids as written.
        classes: crop id -> class arrays written (annotated classes among the defaults).
    """

    root: Path
    crops: dict[str, RealCrop] = field(default_factory=dict)
    em: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)


def make_realgeom_tree(
    root: str | Path,
    crops: list[str] | None = None,
    seed: int = 0,
    lo: int = 8,
    hi: int = 24,
    cell: int = 3,
    noise_fraction: float = 0.15,
) -> RealGeomInfo:
    """Write the tree for ``crops`` (default: every crop eligible at 8 nm) under ``root`` (replaced).

    Args:
        root: the data root to create.
        crops: crop ids (train rows of ``real_crops.csv``).
        seed: RNG seed of the shrunk shapes and label ids.
        lo, hi: label voxels per axis of a shrunk crop.
        cell, noise_fraction: label structure (see :func:`label_ids`; benches use larger cells).
    """
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    table = {c.crop: c for c in load_real_crops() if c.split == "train"}
    ems = load_em_s0()
    chosen = [table[c] for c in crops] if crops else [c for c in table.values() if eligible(c)]
    rng = np.random.default_rng(seed)
    info = RealGeomInfo(root)
    by_ds: dict[str, list[RealCrop]] = {}
    for c in chosen:
        em = ems[c.dataset]
        small = RealCrop(
            c.crop, c.split, c.dataset, c.voxel_size, c.translation, shrunk_shape(c, em[0], rng, lo, hi), c.classes
        )
        info.crops[c.crop] = small
        info.em[c.dataset] = em
        by_ds.setdefault(c.dataset, []).append(small)
    for ds, group in sorted(by_ds.items()):
        _write_dataset(root, ds, group, info, rng, cell, noise_fraction)
    return info


def _write_dataset(
    root: Path,
    ds: str,
    crops: list[RealCrop],
    info: RealGeomInfo,
    rng: np.random.Generator,
    cell: int = 3,
    noise_fraction: float = 0.15,
) -> None:
    zroot = root / ds / f"{ds}.zarr"
    e, te = info.em[ds]
    boxes = []
    for c in crops:
        start = em_start(c, (e, te))
        n_em = tuple(round(n * l / ee) for n, l, ee in zip(c.shape, c.voxel_size, e))
        boxes.append((start, n_em))
    shape0 = tuple(max(s + n for (st, nn) in boxes for s, n in [(st[a], nn[a])]) + 64 for a in range(3))
    shapes = [shape0, tuple(-(-n // 2) for n in shape0), tuple(-(-n // 4) for n in shape0)]
    levels = _pyramid_levels(e, te, shapes)
    _group(zroot)
    _group(zroot / "recon-1")
    _group(zroot / "recon-1/em")
    em = zroot / EM_GROUP
    _group(em, multiscales_attrs(levels, "fibsem-uint8"))
    arrs = [
        zarr.open_array(
            str(em / lv.path),
            mode="w",
            shape=lv.shape,
            chunks=EM_CHUNKS,
            dtype=np.uint8,
            compressor=Zstd(level=1),
            fill_value=0,
            dimension_separator="/",
        )
        for lv in levels
    ]
    done: set[tuple[int, int, int]] = set()
    for start, n_em in boxes:  # only the chunks under a crop (sparse, like a fetch)
        ranges = [range(s // ch, -(-(s + n) // ch)) for s, n, ch in zip(start, n_em, EM_CHUNKS)]
        for idx in np.ndindex(*(len(r) for r in ranges)):
            key = tuple(r[i] for r, i in zip(ranges, idx))
            if key in done:
                continue
            done.add(key)  # type: ignore[arg-type]
            cut = tuple(slice(k * ch, min((k + 1) * ch, n)) for k, ch, n in zip(key, EM_CHUNKS, shape0))
            arrs[0][cut] = em_block(cut)  # type: ignore[arg-type]
    _group(zroot / "recon-1/labels")
    gt = zroot / GT_GROUP
    _group(gt)
    for c in crops:
        ids = _ids_for(c)
        a = label_ids(c.shape, ids, rng, cell, noise_fraction)
        annotated = [n for n in DEFAULT_CLASSES if n in c.classes]
        crop_dir = gt / f"crop{c.crop}"
        _group(crop_dir, {"cellmap": {"annotation": {"class_names": annotated}}})
        _label_array(crop_dir, "all", a, c.level, False)
        for name in annotated:
            if name == "nuc":
                arr = np.where(a == 28, 7, 0).astype(np.uint16)  # instance ids
            else:
                arr = (a == CELLMAP_CLASSES[name][0]).astype(np.uint8)
            _label_array(crop_dir, name, arr, c.level, name in INSTANCE_CLASSES, pyramid=False)
        info.labels[c.crop] = a
        info.classes[c.crop] = annotated


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--crops", default=None, help="Comma-separated train crop ids (default: every crop eligible at 8 nm).")
@click.option("--seed", default=0, show_default=True)
def main(out: Path, crops: str | None, seed: int) -> None:
    """Write a CellMap tree with the real crop geometry (shapes shrunk) to OUT."""
    info = make_realgeom_tree(out, crops.split(",") if crops else None, seed)
    click.echo(f"{len(info.crops)} crops in {len(info.em)} datasets under {out}")


if __name__ == "__main__":
    main()
