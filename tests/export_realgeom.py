"""A CellMap-like EM tree with the real TEST crops' geometry, for the export tests and bench.

Every test crop of ``tests/data/real_crops.csv`` keeps its dataset, voxel size and
translation (so the real phases, anisotropic z, half-EM-voxel and 32 nm boxes are all
there); only the shape is shrunk. Each dataset gets an EM pyramid with its real EM s0
voxel size (``tests/data/em_s0.csv``), translation 0, pyramid rule for the other levels,
declared large enough to hold its crops, and **sparse**: only chunks near a crop are
written (at every level, or only at coarse levels for crops listed as ``unfetched``,
as ``csc fetch-data`` leaves coarse crops). Coarser levels are the block mean of s0.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from common.ngff import EM_GROUP
from tools.realgeom import RealCrop, load_em_s0, load_real_crops

CHUNKS = (32, 32, 32)
N_LEVELS = 4


# The geometry rows come from the one parser of the committed tables (tools.realgeom).
Crop = RealCrop


def real_test_crops() -> list[Crop]:
    """The 16 real test crops (real shapes)."""
    return [c for c in load_real_crops() if c.split == "test"]


def shrink(c: Crop, extent_nm: float = 160.0, minimum: int = 4) -> Crop:
    """Same voxel size and translation, about ``extent_nm`` per axis (never larger than real)."""
    shape = tuple(min(n, max(minimum, int(round(extent_nm / v)))) for n, v in zip(c.shape, c.voxel_size))
    return dataclasses.replace(c, shape=shape)


def em_value(z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """EM intensity at world positions (nm): smooth, position-sensitive, never 0 (the fill value)."""
    v = 128 + 50 * np.sin(z / 37.0) * np.cos(y / 23.0) + 40 * np.sin(x / 29.0 + y / 51.0)
    return np.clip(np.rint(v), 1, 255).astype(np.uint8)


def box_s0(c: Crop, e: tuple[float, ...], t: tuple[float, ...]) -> tuple[tuple[int, int], ...]:
    """The crop's box in EM s0 indices (it lies on s0 edges)."""
    out = []
    for tl, l, n, ee, te in zip(c.translation, c.voxel_size, c.shape, e, t):
        i0 = (tl - l / 2 - (te - ee / 2)) / ee
        i1 = i0 + n * l / ee
        assert abs(i0 - round(i0)) < 1e-3 and abs(i1 - round(i1)) < 1e-3, (c, i0, i1)
        out.append((round(i0), round(i1)))
    return tuple(out)


def write_manifest(path: Path, crops: Iterable[Crop], classes: Callable[[Crop], Iterable[str]] | None = None) -> int:
    """A challenge-format manifest, one row per (crop, class); returns the row count."""
    n = 0
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["crop_name", "dataset", "class_label", "voxel_size", "translation", "shape"])
        for c in crops:
            for cls in classes(c) if classes else c.classes:
                w.writerow(
                    [
                        c.crop,
                        c.dataset,
                        cls,
                        "[" + ";".join(f"{v:.12g}" for v in c.voxel_size) + "]",
                        "[" + ";".join(f"{v:.12g}" for v in c.translation) + "]",
                        "[" + ";".join(str(v) for v in c.shape) + "]",
                    ]
                )
                n += 1
    return n


def build_tree(root: Path, crops: list[Crop], margin_nm: float = 64.0, unfetched: Iterable[str] = ()) -> Path:
    """Write the sparse EM pyramids for ``crops`` under ``root`` (see the module docstring)."""
    import zarr
    from numcodecs import Zstd

    unfetched = set(unfetched)
    s0 = load_em_s0()
    by_ds: dict[str, list[Crop]] = {}
    for c in crops:
        by_ds.setdefault(c.dataset, []).append(c)
    step = 2 ** (N_LEVELS - 1)
    for ds, cs in by_ds.items():
        e, t = s0[ds]
        regions = []
        for c in cs:
            box = box_s0(c, e, t)
            m = [int(math.ceil(margin_nm / ee)) for ee in e]
            lo = [max(0, (a - mm) // step * step) for (a, _), mm in zip(box, m)]
            hi = [-(-(b + mm) // step) * step for (_, b), mm in zip(box, m)]
            regions.append((c, lo, hi))
        shape0 = [max(r[2][ax] for r in regions) + step * 4 for ax in range(3)]
        group = root / ds / f"{ds}.zarr" / EM_GROUP
        g = zarr.open_group(str(group), mode="w")
        datasets = []
        arrays = []
        for k in range(N_LEVELS):
            f = 2**k
            scale = [ee * f for ee in e]
            trans = [tt + (f - 1) * ee / 2 for tt, ee in zip(t, e)]
            shape = [-(-n // f) for n in shape0]
            arrays.append(
                g.create_dataset(
                    f"s{k}",
                    shape=shape,
                    chunks=CHUNKS,
                    dtype=np.uint8,
                    fill_value=0,
                    compressor=Zstd(level=1),
                    dimension_separator="/",
                )
            )
            datasets.append(
                {
                    "path": f"s{k}",
                    "coordinateTransformations": [
                        {"type": "scale", "scale": scale},
                        {"type": "translation", "translation": trans},
                    ],
                }
            )
        g.attrs["multiscales"] = [
            {
                "version": "0.4",
                "name": ds,
                "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                "datasets": datasets,
            }
        ]
        for c, lo, hi in regions:
            zz, yy, xx = (t[ax] + np.arange(lo[ax], hi[ax]) * e[ax] for ax in range(3))
            block = em_value(zz[:, None, None], yy[None, :, None], xx[None, None, :])
            for k in range(N_LEVELS):
                f = 2**k
                if c.crop in unfetched and k < 2:
                    continue  # csc fetch-data leaves the fine levels of coarse crops empty
                lv = (
                    block
                    if f == 1
                    else block.reshape(block.shape[0] // f, f, block.shape[1] // f, f, block.shape[2] // f, f).mean(
                        axis=(1, 3, 5)
                    )
                )
                sl = tuple(slice(a // f, a // f + n) for a, n in zip(lo, lv.shape))
                arrays[k][sl] = np.rint(lv).astype(np.uint8) if f > 1 else lv
    (root / "README.json").write_text(json.dumps({"crops": [c.crop for c in crops]}))
    return root
