"""CellMap challenge export: predict the crops of a ``test_crop_manifest.csv``.

For each crop of the manifest (columns ``crop_name,dataset,class_label,voxel_size,
translation,shape``, vectors ``[z;y;x]`` in nm, translation = centre of voxel 0) the EM
is cut at exactly the manifest geometry from the EM level of the same voxel size
(:mod:`common.ngff` does the geometry and refuses never-fetched regions), the selected
ensemble predicts it (members to disk, then the memory-bounded combination of
:mod:`stages.ensemble.ensemble`), and every row becomes a plain zarr v2 array
``submission.zarr/crop<id>/<class>`` (uint8 0/1, (z, y, x), attributes ``voxel_size``,
``translation``, ``shape`` equal to the manifest), so the scorer resamples nothing.
``submission.zip`` holds the store under ``submission.zarr/`` (``zip -r submission.zip
submission.zarr``). A crop that cannot be cut (no EM level at its voxel size, off-grid,
outside the volume, never fetched) or a class the model does not predict fails with a
reason in ``reports/export.json``; the other crops are still written.

Run it as ``python -m stages.ensemble.export --work-dir W --manifest M`` or with
``python -m stages.ensemble --export-submission M``.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from common.config import PipelineConfig, load_config
from common.errors import PipelineError
from common.io import atomic_path, atomic_write_json, read_json
from common.nifti import save_nifti, zyx_to_affine
from common.workdir import WorkDir, digest
from stages.ensemble.ensemble import (
    Case,
    PredictorFactory,
    bundle_predictor,
    combine_case,
    find_trained_bundles,
    predict_member,
    select_members,
)

log = logging.getLogger("cellmap.ensemble.export")

MANIFEST_COLUMNS = ("crop_name", "dataset", "class_label", "voxel_size", "translation", "shape")
EM_GROUP = "recon-1/em/fibsem-uint8"
EXPORT_MARKER = "ensemble.export"


@dataclass(frozen=True)
class ManifestRow:
    """One row of ``test_crop_manifest.csv`` (vectors (z, y, x), nm)."""

    crop: str
    dataset: str
    class_label: str
    voxel_size: tuple[float, float, float]
    translation: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def geometry(self) -> tuple[Any, ...]:
        return (self.dataset, self.voxel_size, self.translation, self.shape)


def _vec(text: str, kind: type, where: str) -> tuple[Any, ...]:
    s = text.strip()
    if not (s.startswith("[") and s.endswith("]")):
        raise PipelineError(f"{where}: expected a vector like [z;y;x], got {text!r}")
    try:
        vals = tuple(kind(float(v)) if kind is int else kind(v) for v in s[1:-1].split(";"))
    except ValueError:
        raise PipelineError(f"{where}: not numbers: {text!r}") from None
    if len(vals) != 3:
        raise PipelineError(f"{where}: expected 3 values [z;y;x], got {text!r}")
    return vals


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse a challenge ``test_crop_manifest.csv``.

    Raises:
        PipelineError: missing file, wrong header, or a malformed row (one line).
    """
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: manifest not found")
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise PipelineError(f"{p}: header must be {','.join(MANIFEST_COLUMNS)}, got {reader.fieldnames}")
        rows = []
        for i, r in enumerate(reader, start=2):
            where = f"{p}:{i}"
            crop = str(r["crop_name"]).strip()
            crop = crop[4:] if crop.startswith("crop") else crop
            shape = _vec(r["shape"], int, where)
            vs = _vec(r["voxel_size"], float, where)
            if any(n < 1 for n in shape) or any(v <= 0 for v in vs):
                raise PipelineError(f"{where}: shape and voxel_size must be positive")
            rows.append(ManifestRow(crop, r["dataset"].strip(), r["class_label"].strip(), vs,  # type: ignore[arg-type]
                                    _vec(r["translation"], float, where), shape))  # type: ignore[arg-type]
    if not rows:
        raise PipelineError(f"{p}: manifest has no rows")
    return rows


@dataclass
class CropInput:
    """What the model sees for one manifest crop.

    Attributes:
        block: EM (z, y, x) to predict.
        scale, translation: its grid (voxel size, centre of voxel 0; nm, z, y, x).
        index: per axis, the block index of every manifest voxel (nearest centre), or
            ``None`` when the block is exactly the manifest box.
        note: how it was cut (for the report).
    """

    block: np.ndarray
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]
    index: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    note: str


def cut_em(data_root: Path, row: ManifestRow, train_res: tuple[float | None, float, float] | None = None) -> CropInput:
    """The EM under one manifest box, at the training resolution when possible.

    The manifest box must land exactly on the EM level of its own voxel size (else the
    crop fails). When the model was trained at another resolution (``train_res``; ``None``
    z = any z) and the EM level at that resolution holds the region, the model sees the
    smallest block of that level covering the box (its voxels at their real size, as in
    training) and each manifest voxel later takes the label of the nearest block voxel
    centre; otherwise the exact manifest cut is predicted as it is.

    Raises:
        PipelineError: (``NgffError`` included) no EM level at the manifest voxel size,
            off-grid, out of bounds, never fetched, unreadable store: the crop's reason.
    """
    import zarr

    from common.ngff import (
        Level, NgffError, em_cut, find_em_level, find_level, fmt_vec, read_em_block, read_multiscales,
    )

    group = data_root / row.dataset / f"{row.dataset}.zarr" / EM_GROUP
    levels = read_multiscales(group)
    level = find_em_level(levels, row.voxel_size)
    if level is None:
        have = ", ".join(f"{lv.path} {fmt_vec(lv.scale)}" for lv in levels)
        raise PipelineError(f"no EM level at voxel size {fmt_vec(row.voxel_size)} nm in {group} (has {have})")
    box = Level("", row.voxel_size, row.translation, row.shape)
    cut = em_cut(box, level)

    def open_level(path: str):  # noqa: ANN202
        try:
            return zarr.open_array(str(group / path), mode="r")
        except Exception as exc:  # noqa: BLE001 - any store problem is this crop's reason
            raise PipelineError(f"{group / path}: cannot open EM array ({exc})") from None

    train = find_level(levels, train_res) if train_res is not None else None
    if train is not None and train.path != level.path:
        # smallest block of the training level covering the box (outward rounding)
        lo, hi = [], []
        for l, tl, n, e, te in zip(box.scale, box.translation, box.shape, train.scale, train.translation):
            f0 = (tl - l / 2 - (te - e / 2)) / e
            f1 = f0 + n * l / e
            lo.append(int(np.floor(f0 + 1e-6)))
            hi.append(int(np.ceil(f1 - 1e-6)))
        if all(a >= 0 for a in lo) and all(b <= size for b, size in zip(hi, train.shape)):
            tcut = tuple(slice(a, b) for a, b in zip(lo, hi))
            try:
                block = read_em_block(open_level(train.path), tcut, where=str(group / train.path))
            except NgffError as exc:
                log.warning("crop%s: training-resolution EM unusable (%s): predicting at %s nm",
                            row.crop, exc, fmt_vec(row.voxel_size))
            else:
                t_block = tuple(te + a * e for te, a, e in zip(train.translation, lo, train.scale))
                index = tuple(
                    np.clip(np.floor((tl + np.arange(n) * l - tb) / e + 0.5).astype(np.int64), 0, m - 1)
                    for tl, l, n, tb, e, m in zip(box.translation, box.scale, box.shape, t_block, train.scale,
                                                  block.shape)
                )
                return CropInput(block, train.scale, t_block, index,  # type: ignore[arg-type]
                                 f"predicted on EM {train.path} {fmt_vec(train.scale)} nm, nearest-voxel to the manifest grid")
    return CropInput(read_em_block(open_level(level.path), cut, where=str(group / level.path)), row.voxel_size,
                     row.translation, None, f"predicted on EM {level.path} {fmt_vec(level.scale)} nm (the manifest grid)")


def _write_mask(store_root: Path, row: ManifestRow, mask_zyx: np.ndarray) -> None:
    """A plain zarr v2 array ``crop<id>/<class>`` with the manifest's attributes."""
    import zarr
    from numcodecs import Zstd

    crop_group = zarr.open_group(str(store_root / f"crop{row.crop}"), mode="a")
    arr = crop_group.create_dataset(
        row.class_label, data=mask_zyx.astype(np.uint8), chunks=tuple(min(64, n) for n in mask_zyx.shape),
        compressor=Zstd(level=3), overwrite=True,
    )
    arr.attrs.update({
        "voxel_size": list(row.voxel_size),
        "translation": list(row.translation),
        "shape": list(row.shape),
    })


def _zip_store(store_root: Path, zip_path: Path) -> None:
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(store_root.rglob("*")):
                if f.is_file():
                    zf.write(f, (Path(store_root.name) / f.relative_to(store_root)).as_posix())


def run_export(
    cfg: PipelineConfig,
    wd: WorkDir,
    manifest: str | Path,
    data_root: str | Path | None = None,
    method: str | None = None,
    n_best: int | None = None,
    mode: str | None = None,
    predictor_factory: PredictorFactory | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Predict every manifest crop with the ensemble and write ``submission.zarr`` + ``.zip``.

    Args:
        cfg: configuration (``classes`` name the label values; ``ensemble`` section as
            for :func:`~stages.ensemble.ensemble.run_ensemble`).
        wd: work dir; outputs go to ``<wd>/submission/`` unless ``out_dir`` is given.
        manifest: the ``test_crop_manifest.csv``.
        data_root: CellMap data root (default ``cfg.data_root``).
        method, n_best, mode: ensemble selection and combination.
        predictor_factory: how members are loaded (default: the bundle's InferClass).

    Returns:
        ``{"zarr", "zip", "n_written", "failed": {row key: reason}, "rows": [...]}``
        (also written to ``reports/export.json``).

    Raises:
        PipelineError: no trained bundle, unreadable manifest, no data root (exit 2).
    """
    ens = cfg.ensemble
    method = method or ens.get("method", "best_n")
    n_best = int(n_best if n_best is not None else ens.get("n_best", 3))
    mode = mode or ens.get("mode", "mean")
    prob_dtype = str(ens.get("prob_dtype", "float16"))
    root = Path(data_root or cfg.data_root or "")
    if not str(data_root or cfg.data_root or ""):
        raise PipelineError("no data root: set data_root in the config or pass --data-root")
    if not root.is_dir():
        raise PipelineError(f"{root}: data root not found")
    rows = read_manifest(manifest)
    trained, skipped = find_trained_bundles(wd)
    if not trained:
        raise PipelineError(f"{wd.root}: no trained bundle to export with ({'; '.join(skipped) or 'none found'})")
    members = select_members(trained, method, n_best)
    out = Path(out_dir) if out_dir else wd.root / "submission"
    work = out / ".work"
    geometry_digest = digest([[r.geometry for r in rows], str(root), ens.get("export_at", "training"),
                              list(cfg.resolution_zyx)])
    try:
        if read_json(work / "geometry.json").get("digest") != geometry_digest:
            shutil.rmtree(work)
    except (OSError, ValueError):
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "geometry.json", {"digest": geometry_digest})

    marker = wd.marker(EXPORT_MARKER)
    marker.start(digest([geometry_digest, [[m.name, m.model_id] for m in members], mode]),
                 manifest=str(manifest), members=[m.name for m in members])
    failed: dict[str, str] = {}
    try:
        # 1. cut every distinct crop geometry once, as a NIfTI (x, y, z) input
        crops: dict[str, Case] = {}
        crop_rows: dict[str, ManifestRow] = {}
        index: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
        notes: dict[str, str] = {}
        train_res = cfg.resolution_zyx if ens.get("export_at", "training") == "training" else None
        for r in rows:
            if r.crop in crop_rows:
                if crop_rows[r.crop].geometry != r.geometry:
                    failed[f"crop{r.crop}/{r.class_label}"] = "rows of this crop disagree on the geometry"
                continue
            crop_rows[r.crop] = r
            image = work / "inputs" / f"crop{r.crop}_image.nii.gz"
            try:
                inp = cut_em(root, r, train_res)
            except PipelineError as exc:
                failed[f"crop{r.crop}"] = str(exc)
                log.warning("crop%s: %s", r.crop, exc)
                continue
            if not image.is_file():
                save_nifti(image, np.ascontiguousarray(inp.block.transpose(2, 1, 0)),
                           zyx_to_affine(inp.scale, inp.translation), compresslevel=1)
            index[r.crop] = inp.index
            notes[f"crop{r.crop}"] = inp.note
            crops[r.crop] = Case(f"crop{r.crop}", image, None)
        # 2. each member predicts every crop once (to disk); 3. combine per crop
        cases = [crops[k] for k in sorted(crops)]
        prob_root = work / ".probs"
        for m in members:
            predict_member(m, cases, predictor_factory or bundle_predictor, wd, cfg, prob_root, prob_dtype)
        store = out / "submission.zarr"
        tmp_store = out / f".tmp-submission-{os.getpid()}.zarr"
        shutil.rmtree(tmp_store, ignore_errors=True)
        import zarr

        zarr.open_group(str(tmp_store), mode="w")
        n_written = 0
        for crop in sorted(crops):
            labels_xyz, _ = combine_case(crops[crop], members, prob_root, mode, prob_dtype, cfg.output_classes)
            labels = labels_xyz.transpose(2, 1, 0)
            if index[crop] is not None:  # nearest block voxel of every manifest voxel
                labels = labels[np.ix_(*index[crop])]
            for r in rows:
                key = f"crop{r.crop}/{r.class_label}"
                if r.crop != crop or key in failed:
                    continue
                if r.class_label not in cfg.classes:
                    failed[key] = f"class {r.class_label!r} is not one of the trained classes {cfg.classes}"
                    continue
                if labels.shape != r.shape:
                    failed[key] = f"prediction shape {labels.shape} != manifest shape {r.shape}"
                    continue
                _write_mask(tmp_store, r, labels == cfg.classes.index(r.class_label) + 1)
                n_written += 1
        # the store appears complete or not at all
        if store.exists():
            shutil.rmtree(store)
        os.replace(tmp_store, store)
        zip_path = out / "submission.zip"
        _zip_store(store, zip_path)
    except BaseException as exc:
        marker.fail(f"{type(exc).__name__}: {exc}")
        raise
    summary = {
        "manifest": str(manifest),
        "zarr": str(store),
        "zip": str(zip_path),
        "members": [m.name for m in members],
        "n_rows": len(rows),
        "n_written": n_written,
        "failed": failed,
        "inputs": notes,
        "rows": [{"crop": r.crop, "class_label": r.class_label, "voxel_size": list(r.voxel_size),
                  "translation": list(r.translation), "shape": list(r.shape)} for r in rows],
    }
    atomic_write_json(wd.reports_dir / "export.json", summary)
    if failed:
        marker.fail(f"{len(failed)} crop(s)/row(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items()),
                    n_written=n_written)
    else:
        marker.done(n_written=n_written)
    return summary


def run_export_entry(
    work_dir: str | Path,
    manifest: str | Path,
    config_file: str | Path | None = None,
    data_root: str | Path | None = None,
    method: str | None = None,
    n_best: int | None = None,
    mode: str | None = None,
) -> dict[str, Any]:
    """Load the configuration and run :func:`run_export`."""
    wd = WorkDir.at(work_dir).ensure()
    cfg = load_config(wd.root, config_file)
    return run_export(cfg, wd, manifest, data_root=data_root, method=method, n_best=n_best, mode=mode)


@click.command()
@click.option("--work-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The challenge test_crop_manifest.csv.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--method", type=click.Choice(["best_n", "best_by_fold"]), default=None)
@click.option("--n-best", type=int, default=None)
@click.option("--mode", type=click.Choice(["mean", "vote"]), default=None)
def main(work_dir: Path, config_file: Path | None, manifest: Path, data_root: Path | None,
         method: str | None, n_best: int | None, mode: str | None) -> None:
    """Write submission.zarr and submission.zip for a challenge test manifest."""
    from common.cli import setup_logging, stage_command

    @stage_command("ensemble")
    def _run() -> int:
        setup_logging("ensemble", WorkDir.at(work_dir).logs_dir)
        s = run_export_entry(work_dir, manifest, config_file, data_root, method, n_best, mode)
        click.echo(f"submission: {s['zip']} ({s['n_written']} arrays written, {len(s['failed'])} failed)")
        for k, v in s["failed"].items():
            click.echo(f"  failed {k}: {v}", err=True)
        return 1 if s["failed"] else 0

    _run()


if __name__ == "__main__":
    main()
