"""The predict stage: segment any EM volume (zarr multiscale group or NIfTI) with trained bundles.

* **Input**: an OME-NGFF v0.4 multiscale group (local path; its finest level is read) with
  an optional region of interest in world nm (``z0:z1,y0:y1,x0:x1``: the voxels whose
  centres lie inside), or a NIfTI file (spacing and origin from its affine, nm).
* **Resolution**: the bundles' recorded training resolution (``cellmap_bundle.json``,
  as for the export); the input is block-averaged to it in the ROI's phase, predicted, and
  the probabilities are brought back to the input grid (linear interpolation where the
  input is finer, footprint average where coarser), then argmax.
* **Block-wise** with a halo and bounded memory (:mod:`common.blockwise`); the
  output arrays are chunked exactly by block, so ``--shard I/N`` jobs (blocks ``k`` with
  ``k % N == I``) never write the same chunk; a block ledger (``.ledger/<k>``, written
  after the block) makes a killed run resume where it stopped.
* **Output** ``OUT/``: an OME-Zarr 0.4 multiscale label image (``image-label``; ``s0`` on
  the input grid, ``s1..`` nearest-neighbour 2x pyramid, scale and translation per the
  pixel-centre rule), optional ``probabilities/`` (uint8, 255 = 1, channels first), a
  ``labels.nii.gz`` when the input was NIfTI, and ``predict.json``. Nothing else is written:
  no marker or report of another stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.blockwise import (
    ArrayPredictor,
    TrainGrid,
    argmax0,
    bundle_training_resolution,
    file_predictor,
    iter_blocks,
    output_block,
    pooled_reader,
    predict_blocks,
    training_factors,
)
from common.errors import PipelineError, StageFailed
from common.io import atomic_write_json, read_json
from common.ngff import Level, fmt_vec, multiscales_attrs, read_multiscales
from common.workdir import ALGO_OBJECT, BUNDLE_RECORD, Bundle, WorkDir, digest

log = logging.getLogger("cellmap.predict")

N_PYRAMID = 3

ArrayPredictorFactory = Callable[[Path, WorkDir], ArrayPredictor]


@dataclass
class Source:
    """The input volume: an array (z, y, x) and its grid."""

    array: Any
    level: Level
    kind: str  # "zarr" or "nifti"
    affine: np.ndarray | None = None


def open_source(path: Path) -> Source:
    """A zarr multiscale group (finest level) or a NIfTI file.

    Raises:
        PipelineError: not found, not an OME-NGFF group / NIfTI, or a rotated affine.
    """
    if not path.exists():
        raise PipelineError(f"{path}: input not found")
    if path.is_dir():
        import zarr

        levels = read_multiscales(path)
        s0 = min(levels, key=lambda lv: lv.scale[1])
        return Source(zarr.open_array(str(path / s0.path), mode="r"), s0, "zarr")
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        aff = np.asarray(img.affine, dtype=np.float64)
        if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))) or (np.diag(aff)[:3] <= 0).any():
            raise PipelineError(f"{path}: only diagonal affines with positive spacing are supported")
        data = np.asarray(img.dataobj)
        if data.ndim != 3:
            raise PipelineError(f"{path}: expected a 3-D image, got shape {data.shape}")
        scale = tuple(float(v) for v in np.diag(aff)[:3][::-1])
        trans = tuple(float(v) for v in aff[:3, 3][::-1])
        return Source(
            np.ascontiguousarray(data.transpose(2, 1, 0)),
            Level("nifti", scale, trans, data.shape[::-1]),  # type: ignore[arg-type]
            "nifti",
            aff,
        )
    raise PipelineError(f"{path}: input must be an OME-NGFF zarr group (directory) or a .nii/.nii.gz file")


def parse_roi(text: str | None, level: Level) -> tuple[slice, slice, slice]:
    """Index range of the voxels whose centres lie in ``z0:z1,y0:y1,x0:x1`` (world nm).

    Raises:
        PipelineError: malformed, or empty inside the volume.
    """
    if not text:
        return tuple(slice(0, n) for n in level.shape)  # type: ignore[return-value]
    parts = text.split(",")
    try:
        bounds = [tuple(float(v) for v in p.split(":")) for p in parts]
    except ValueError:
        raise PipelineError(f"--roi: expected z0:z1,y0:y1,x0:x1 in nm, got {text!r}") from None
    if len(bounds) != 3 or any(
        len(b) != 2 or not (math.isfinite(b[0]) and math.isfinite(b[1])) or b[1] <= b[0] for b in bounds
    ):
        raise PipelineError(f"--roi: expected z0:z1,y0:y1,x0:x1 in nm with z0 < z1 ..., got {text!r}")
    out = []
    for (lo, hi), t, s, n in zip(bounds, level.translation, level.scale, level.shape):
        a = max(0, math.ceil((lo - t) / s - 1e-9))
        b = min(n, math.ceil((hi - t) / s - 1e-9))
        if b <= a:
            raise PipelineError(f"--roi {text!r} holds no voxel of the input ({level.describe()})")
        out.append(slice(a, b))
    return tuple(out)  # type: ignore[return-value]


def trained_members(wd: WorkDir, only: Sequence[str] | None) -> list[Path]:
    """Bundle folders with a done train marker (restricted to ``only``).

    Raises:
        PipelineError: none, or an unknown name in ``only``.
    """
    found = []
    if wd.root.is_dir():
        for d in sorted(p for p in wd.root.iterdir() if p.is_dir()):
            bundle = Bundle.from_dir(wd, d)
            if bundle is not None and bundle.trained:
                found.append(d)
    if only:
        unknown = sorted(set(only) - {d.name for d in found})
        if unknown:
            raise PipelineError(f"--members: {', '.join(unknown)} is not a trained bundle in {wd.root}")
        found = [d for d in found if d.name in only]
    if not found:
        raise PipelineError(f"{wd.root}: no trained bundle (need <algo>_<fold>/ with a done train marker)")
    return found


def monai_predictor(bundle: Path, wd: WorkDir) -> ArrayPredictor:
    """The bundle's own ``InferClass`` through MONAI (``algo_from_json`` -> ``get_inferer``)."""
    from monai.apps.auto3dseg.utils import algo_from_json

    algo, _ = algo_from_json(str(bundle / ALGO_OBJECT), template_path=str(wd.templates_dir))
    inferer = algo.get_inferer()
    return file_predictor(
        lambda p: inferer.infer(str(p)),
        Path(os.environ.get("TMPDIR", "/tmp")) / f"cellmap-predict-{os.getpid()}" / bundle.name,
    )


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"([0-9]+)/([0-9]+)", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise PipelineError(f"--shard: expected I/N with 0 <= I < N, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def run_predict(
    work_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    roi: str | None = None,
    members: Sequence[str] | None = None,
    probabilities: bool = False,
    shard: str | None = None,
    mode: str = "mean",
    block_t: int = 96,
    halo: int = 16,
    array_predictor_factory: ArrayPredictorFactory | None = None,
) -> dict[str, Any]:
    """Predict ``input_path`` (see the module docstring); returns ``predict.json``'s content.

    Raises:
        PipelineError: bad input, unrecorded or inconsistent training resolution, an
            output folder holding another prediction (exit 2).
        StageFailed: a bundle cannot be loaded or predicts the wrong shape (exit 1).
    """
    import zarr
    from numcodecs import Zstd

    wd = WorkDir.at(work_dir)
    index, n_shards = _parse_shard(shard)
    if block_t < 8 or halo < 0:
        raise PipelineError("--block must be >= 8 and --halo >= 0")
    src = open_source(Path(input_path))
    box = parse_roi(roi, src.level)
    bundles = trained_members(wd, members)
    try:
        res = {str(bundle_training_resolution(b, wd.reports_dir)[0]) for b in bundles}
        train_res = bundle_training_resolution(bundles[0], wd.reports_dir)[0]
        t_scale, g = training_factors(train_res, src.level.scale)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    if len(res) > 1:
        raise PipelineError(f"members trained at different resolutions ({', '.join(sorted(res))}): use --members")
    lv = src.level
    start = tuple(sl.start for sl in box)
    out_grid = Level(
        "s0",
        lv.scale,
        tuple(t + a * s for t, a, s in zip(lv.translation, start, lv.scale)),  # type: ignore[arg-type]
        tuple(sl.stop - sl.start for sl in box),
    )
    grid = TrainGrid(
        t_scale, tuple(t + (a + (gg - 1) / 2) * s for t, a, gg, s in zip(lv.translation, start, g, lv.scale))
    )  # type: ignore[arg-type]
    n_classes = None
    out_dir = Path(out)
    meta = {
        "input": str(Path(input_path).resolve()),
        "box": [[sl.start, sl.stop] for sl in box],
        "members": [b.name for b in bundles],
        "training_resolution_nm": list(train_res),
        "mode": mode,
        "block_t": block_t,
        "halo": halo,
        "probabilities": probabilities,
    }
    meta_digest = digest([meta])
    meta_path = out_dir / "predict_meta.json"
    if meta_path.is_file():
        old = read_json(meta_path)
        if old.get("digest") != meta_digest:
            raise PipelineError(f"{out_dir}: holds another prediction ({old.get('input')}); use a new --out")
    ob = output_block(out_grid.scale, t_scale, block_t)
    blocks = list(iter_blocks(out_grid.shape, ob))
    ledger = out_dir / ".ledger"
    todo = [k for k in range(len(blocks)) if k % n_shards == index and not (ledger / str(k)).is_file()]
    log.info(
        "input %s, box %s, training grid %s nm (factors %s); %d blocks, shard %d/%d: %d to do",
        lv.describe(),
        [(s.start, s.stop) for s in box],
        fmt_vec(t_scale),
        g,
        len(blocks),
        index,
        n_shards,
        len(todo),
    )
    predictors: list[ArrayPredictor] = []
    for b in bundles if todo else []:
        try:
            predictors.append((array_predictor_factory or monai_predictor)(b, wd))
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is this member's failure
            raise StageFailed(f"{b}: cannot load the trained bundle: {exc}") from exc
    n_classes = _n_classes(bundles[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, {**meta, "digest": meta_digest})
    root = zarr.open_group(str(out_dir), mode="a")
    labels_dtype = np.uint8 if n_classes < 256 else np.uint16
    labels = root.require_dataset(
        "s0",
        shape=out_grid.shape,
        chunks=ob,
        dtype=labels_dtype,
        fill_value=0,
        compressor=Zstd(level=3),
        exact=True,
        dimension_separator="/",
    )  # OME-NGFF 0.4: nested chunk keys
    probs = None
    if probabilities:
        pg = root.require_group("probabilities")
        probs = pg.require_dataset(
            "s0",
            shape=(n_classes, *out_grid.shape),
            chunks=(n_classes, *ob),
            dtype=np.uint8,
            fill_value=0,
            compressor=Zstd(level=3),
            exact=True,
            dimension_separator="/",
        )  # OME-NGFF 0.4: nested chunk keys
    core = tuple(slice(a, b) for a, b in ((sl.start, sl.stop) for sl in box))
    reader = pooled_reader(src.array, start, g, core)
    ledger.mkdir(parents=True, exist_ok=True)

    def sink(sl: tuple[slice, slice, slice], prob: np.ndarray) -> None:
        labels[sl] = argmax0(prob).astype(labels_dtype)
        if probs is not None:
            probs[(slice(None), *sl)] = np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8)

    for k in todo:
        try:
            predict_blocks(
                out_grid,
                grid,
                reader,
                predictors,
                n_classes,
                sink,
                block_t=block_t,
                halo=halo,
                mode=mode,
                blocks=[blocks[k]],
            )
        except ValueError as exc:
            raise StageFailed(str(exc)) from exc
        (ledger / str(k)).write_bytes(b"")  # after the block's chunks are written
        if (k + 1) % max(1, len(todo) // 10) == 0:
            log.info("shard %d/%d: block %d (%d of %d)", index, n_shards, k, todo.index(k) + 1, len(todo))
    done = sum(1 for k in range(len(blocks)) if (ledger / str(k)).is_file())
    summary = {
        **meta,
        "output": str(out_dir),
        "grid": {
            "scale": list(out_grid.scale),
            "translation": list(out_grid.translation),
            "shape": list(out_grid.shape),
        },
        "n_blocks": len(blocks),
        "blocks_done": done,
        "complete": done == len(blocks),
    }
    if done == len(blocks):
        _finish(root, out_dir, out_grid, labels, n_classes, src, probabilities)
        atomic_write_json(out_dir / "predict.json", summary)
    return summary


def _n_classes(bundle: Path) -> int:
    try:
        n = json.loads((bundle / BUNDLE_RECORD).read_text(encoding="utf-8")).get("output_classes")
    except (OSError, ValueError):
        n = None
    if not isinstance(n, int) or n < 2:
        raise PipelineError(f"{bundle}/{BUNDLE_RECORD}: no output_classes (regenerate the bundle record)")
    return n


def _finish(
    root: Any, out_dir: Path, grid: Level, labels: Any, n_classes: int, src: Source, probabilities: bool
) -> None:
    """The label pyramid (nearest, 2x), OME-Zarr 0.4 metadata, NIfTI for NIfTI inputs."""
    from numcodecs import Zstd

    levels = [grid]
    prev = labels
    for k in range(1, N_PYRAMID + 1):
        shape = tuple(-(-n // 2) for n in prev.shape)
        if min(shape) < 1 or prev.shape == shape:
            break
        arr = root.require_dataset(
            f"s{k}",
            shape=shape,
            chunks=tuple(min(c, n) for c, n in zip(labels.chunks, shape)),
            dtype=labels.dtype,
            fill_value=0,
            compressor=Zstd(level=3),
            exact=True,
            dimension_separator="/",
        )  # OME-NGFF 0.4: nested chunk keys
        for sl in iter_blocks(shape, arr.chunks):  # bounded: one output chunk at a time
            src_sl = tuple(slice(2 * s.start, 2 * s.stop, 2) for s in sl)
            arr[sl] = prev[src_sl]
        s0 = levels[0]
        f = 2**k
        levels.append(
            Level(
                f"s{k}",
                tuple(s * f for s in s0.scale),  # type: ignore[arg-type]
                tuple(t + (f - 1) * s / 2 for t, s in zip(s0.translation, s0.scale)),
                shape,
            )
        )  # type: ignore[arg-type]
        prev = arr
        if max(shape) <= 32:
            break
    attrs = multiscales_attrs(levels, name="labels")
    attrs["image-label"] = {"version": "0.4", "colors": [{"label-value": v} for v in range(n_classes)]}
    root.attrs.update(attrs)
    if probabilities:
        pa = multiscales_attrs([levels[0]], name="probabilities")
        m = pa["multiscales"][0]
        m["axes"] = [{"name": "c", "type": "channel"}, *m["axes"]]
        for ds in m["datasets"]:
            for t in ds["coordinateTransformations"]:
                t[t["type"]] = [1.0 if t["type"] == "scale" else 0.0, *t[t["type"]]]
        root["probabilities"].attrs.update(pa)
    if src.kind == "nifti":
        from common.nifti import save_nifti, zyx_to_affine

        save_nifti(
            out_dir / "labels.nii.gz",
            np.ascontiguousarray(labels[...].transpose(2, 1, 0)),
            zyx_to_affine(grid.scale, grid.translation),
            compresslevel=1,
        )
