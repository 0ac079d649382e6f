"""CellMap challenge export: every row of a ``test_crop_manifest.csv`` from the ensemble.

Each manifest row (columns ``crop_name,dataset,class_label,voxel_size,translation,shape``,
vectors ``[z;y;x]`` in nm, translation = centre of voxel 0) becomes a plain zarr v2
array ``submission.zarr/crop<id>/<class>`` whose ``voxel_size``, ``translation`` and
``shape`` attributes are the manifest's, so the scorer resamples nothing;
``submission.zip`` holds the store under ``submission.zarr/``. See ``docs/export.md``.

How a crop is predicted:

* **At the training resolution**, as recorded in each bundle's ``cellmap_bundle.json``
  (``resolution_nm``, written by bundlegen; the work dir's ``reports/convert.json`` for
  older bundles), never today's ``pipeline.yaml``. The training grid ``T`` of a dataset
  is ``resolution_nm`` in y/x and, when only y/x was given, EM s0's z times the same
  factor (EM pyramid rule), laid out **in the box's phase**: ``T`` voxel edges start at
  the box's first edge (which lies on an EM s0 edge).
* **EM**: an EM level with ``T``'s voxel size whose grid is aligned with the box is read
  directly; otherwise EM s0 (any other finer aligned level if s0 was not fetched) is
  cut exactly and block-averaged to ``T``. Missing EM chunks under the box fail the
  crop with the fetch command that fixes it; the scale never changes silently.
* **Block by block** (:mod:`common.blockwise`): bounded memory whatever the
  crop size; every member predicts each window with a halo of context; probabilities
  (not labels) are brought to the manifest grid (linear interpolation for finer grids,
  footprint average for coarser ones), then argmax.
* **Classes**: a row's class is the union of the trained classes whose CellMap atoms it
  includes (``mito`` = ``mito_mem`` + ``mito_lum`` + ``mito_ribo``); instance classes get
  connected-component ids (face connectivity, components smaller than
  ``ensemble.min_instance_voxels`` training voxels dropped, uint16/uint32).
  Rows whose class has no trained part are listed under ``untrained`` with the fix.

Run it as ``python -m stages.ensemble.export --work-dir W --manifest M`` or
``python -m stages.ensemble --export-submission M [--skip-ensemble]``.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from common.blockwise import (
    ArrayPredictor,
    BlockwiseInstances,
    TrainGrid,
    argmax0,
    bundle_training_resolution,
    file_predictor,
    output_block,
    pooled_reader,
    predict_blocks,
    training_factors,
)
from common.classes import CELLMAP_CLASSES, INSTANCE_CLASSES, atoms
from common.cli import StageContext, config_option, failure_reason, stage_command, stage_marker, work_dir_option
from common.config import PipelineConfig
from common.errors import PipelineError, StageFailed
from common.io import atomic_path, atomic_write_json, read_json
from common.ngff import EM_GROUP, Level, NeverFetchedError, NgffError, chunk_keys, em_cut, fmt_vec, read_multiscales
from common.workdir import WorkDir, digest
from stages.ensemble.ensemble import (
    MODES,
    Member,
    PredictorFactory,
    bundle_predictor,
    select_members,
    trained_members,
)

log = logging.getLogger("cellmap.ensemble.export")

MANIFEST_COLUMNS = ("crop_name", "dataset", "class_label", "voxel_size", "translation", "shape")
EXPORT_MARKER = "ensemble.export"
FORMAT_VERSION = 2  # bump when the written arrays change meaning (invalidates the crop ledger)

# Names that come from the manifest become paths: nothing but these shapes is accepted.
CROP_RE = re.compile(r"(?:crop)?([0-9]{1,9})")
CLASS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,63}")
DATASET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

ArrayPredictorFactory = Callable[[Member, WorkDir, PipelineConfig], ArrayPredictor]


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

    @property
    def key(self) -> str:
        return f"crop{self.crop}/{self.class_label}"

    @property
    def box(self) -> Level:
        return Level("box", self.voxel_size, self.translation, self.shape)


def _vec(text: str, kind: type, where: str) -> tuple[Any, ...]:
    s = (text or "").strip()
    if not (s.startswith("[") and s.endswith("]")):
        raise PipelineError(f"{where}: expected a vector like [z;y;x], got {text!r}")
    try:
        vals = tuple(float(v) for v in s[1:-1].split(";"))
    except ValueError:
        raise PipelineError(f"{where}: not numbers: {text!r}") from None
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise PipelineError(f"{where}: expected 3 finite values [z;y;x], got {text!r}")
    if kind is int:
        if not all(v.is_integer() for v in vals):
            raise PipelineError(f"{where}: expected whole numbers, got {text!r}")
        return tuple(int(v) for v in vals)
    return vals


def _name(value: str | None, pattern: re.Pattern[str], what: str, where: str) -> str:
    """``value`` when it matches ``pattern`` exactly (no ``/``, ``..``, newline, ...)."""
    v = value or ""
    if not pattern.fullmatch(v):
        raise PipelineError(f"{where}: refused {what} {v!r} (must match {pattern.pattern})")
    return v


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse a challenge ``test_crop_manifest.csv``, strictly.

    Crop names, dataset names and class labels become paths of the output store and of
    the data root, so each must match a strict pattern (``crop901/../../..``, ``a/b``,
    a trailing newline are refused).

    Raises:
        PipelineError: missing file, wrong header, a malformed row or a refused name (one
            line naming the file and row; the CLI exits 2).
    """
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: manifest not found")
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                raise PipelineError(f"{p}: header must be {','.join(MANIFEST_COLUMNS)}, got {reader.fieldnames}")
            rows = []
            for i, r in enumerate(reader, start=2):
                where = f"{p}:{i}"
                if None in r or any(r.get(c) is None for c in MANIFEST_COLUMNS):
                    raise PipelineError(f"{where}: expected {len(MANIFEST_COLUMNS)} columns")
                m = CROP_RE.fullmatch(r["crop_name"])
                if m is None:
                    _name(r["crop_name"], CROP_RE, "crop_name", where)
                crop = str(int(m.group(1)))  # type: ignore[union-attr]
                dataset = _name(r["dataset"], DATASET_RE, "dataset", where)
                cls = _name(r["class_label"], CLASS_RE, "class_label", where)
                shape = _vec(r["shape"], int, where)
                vs = _vec(r["voxel_size"], float, where)
                if any(n < 1 for n in shape) or any(v <= 0 for v in vs):
                    raise PipelineError(f"{where}: shape and voxel_size must be positive")
                rows.append(ManifestRow(crop, dataset, cls, vs, _vec(r["translation"], float, where), shape))  # type: ignore[arg-type]
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{p}: not UTF-8 text ({exc.reason})") from None
    if not rows:
        raise PipelineError(f"{p}: manifest has no rows")
    return rows


def inside(root: Path, *parts: str) -> Path:
    """``root/parts`` after checking that it resolves inside ``root`` (defence in depth)."""
    base = root.resolve()
    p = base.joinpath(*parts).resolve()
    if p == base or base not in p.parents:
        raise PipelineError(f"{'/'.join(parts)!r} resolves outside {base}: refused")
    return p


# ---- training resolution -----------------------------------------------------------------
def bundle_resolution(member: Member, wd: WorkDir) -> tuple[tuple[float | None, float, float], str]:
    """See :func:`common.blockwise.bundle_training_resolution` (bad input: exit 2)."""
    try:
        return bundle_training_resolution(member.bundle_dir, wd.reports_dir)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None


def training_resolution(members: Sequence[Member], wd: WorkDir) -> tuple[float | None, float, float]:
    """The one training resolution of the selected members.

    Raises:
        PipelineError: members disagree (choose members with ``--members``).
    """
    found = {m.name: bundle_resolution(m, wd)[0] for m in members}
    distinct = sorted({v for v in found.values()}, key=str)
    if len(distinct) > 1:
        raise PipelineError(
            "ensemble members were trained at different resolutions ("
            + ", ".join(f"{k} {fmt_vec(v)}" for k, v in found.items())
            + "): pick members of one resolution with --members"
        )
    return distinct[0]


# ---- classes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassPlan:
    """How one manifest class is made from the trained label values."""

    labels: tuple[int, ...]
    instance: bool
    note: str = ""


class RowProblem(Exception):
    """A row that cannot be written (its reason names the fix)."""


def plan_class(name: str, classes: Sequence[str]) -> ClassPlan:
    """Label values (1-based) whose union is ``name``: the trained classes inside it.

    Raises:
        RowProblem: not a CellMap class, or no trained class lies inside it.
    """
    if name not in CELLMAP_CLASSES:
        raise RowProblem(f"class {name!r} is not a CellMap class (see common/classes.py)")
    want = atoms(name)
    parts = [i + 1 for i, c in enumerate(classes) if atoms(c) <= want]
    if not parts:
        sub = sorted(n for n in CELLMAP_CLASSES if atoms(n) <= want)
        raise RowProblem(
            f"class {name!r} is not trained and none of its parts is (trained: {', '.join(classes)}): add "
            f"{' or '.join(sub[:4]) + (' ...' if len(sub) > 4 else '')} to `classes:` in pipeline.yaml and retrain"
        )
    covered = frozenset().union(*(atoms(classes[i - 1]) for i in parts))
    missing = sorted(want - covered)
    note = "" if [classes[i - 1] for i in parts] == [name] else "union of " + ", ".join(classes[i - 1] for i in parts)
    if missing:
        note += f"; partial: ids {missing} not trained"
    return ClassPlan(tuple(parts), name in INSTANCE_CLASSES, note.strip("; "))


# ---- EM at the training resolution ----------------------------------------------------------
def _is_int(v: float) -> bool:
    return abs(v - round(v)) <= 1e-3


def _int3(v: Sequence[float]) -> tuple[int, int, int]:
    """Three whole numbers (x, y, z) from floats already checked to be whole."""
    return round(v[0]), round(v[1]), round(v[2])


@dataclass
class EmPlan:
    """Where a crop's EM comes from and the training grid in the box's phase."""

    group: Path
    level: Level
    factors: tuple[int, int, int]
    start: tuple[int, int, int]  # box start index in ``level``
    core: tuple[slice, slice, slice]  # the box in ``level`` indices (end rounded outward)
    grid: TrainGrid
    note: str
    array: Any = field(default=None, repr=False)


def fetch_fix(row: ManifestRow) -> str:
    return (
        f"fetch it with `csc fetch-data --crops {row.crop} --fetch-all-em-resolutions` "
        "(or point --data-root at a copy that has it)"
    )


def plan_em(data_root: Path, row: ManifestRow, train_res: Sequence[float | None]) -> EmPlan:
    """Choose the EM level for one crop and lay the training grid over the box.

    Raises:
        PipelineError: the box is off-grid or outside EM s0, the training voxel is not
            an integer multiple of EM s0 (no pooling in phase), or no usable level was
            fetched under the box (``NeverFetchedError``, naming the fetch command).
    """
    import zarr

    group = inside(data_root, row.dataset, f"{row.dataset}.zarr", *EM_GROUP.split("/"))
    levels = read_multiscales(group)
    s0 = min(levels, key=lambda lv: lv.scale[1])
    em_cut(row.box, s0)  # the box must lie on EM s0 edges, inside the volume
    try:
        t_scale, _ = training_factors(train_res, s0.scale)
    except ValueError:
        raise PipelineError(
            f"training voxel {fmt_vec(train_res)} nm is not a whole multiple of EM s0 {fmt_vec(s0.scale)} nm of "
            f"{row.dataset}: cannot pool EM to it in the box's phase (train at a multiple of EM s0)"
        ) from None
    candidates: list[tuple[Level, tuple[int, int, int], tuple[int, int, int]]] = []
    for lv in levels:
        gf = [t / e for t, e in zip(t_scale, lv.scale)]
        f0 = [
            (bt - bs / 2 - (lt - ls / 2)) / ls
            for bt, bs, lt, ls in zip(row.translation, row.voxel_size, lv.translation, lv.scale)
        ]
        if all(_is_int(x) and round(x) >= 1 for x in gf) and all(_is_int(x) for x in f0):
            candidates.append((lv, _int3(gf), _int3(f0)))
    # a level at the training voxel size first (what convert reads where it is aligned),
    # then EM s0 block-averaged, then other finer aligned levels
    candidates.sort(key=lambda c: (c[1] != (1, 1, 1), c[0].path != s0.path, -c[0].scale[1]))
    tried = []
    for lv, g, start in candidates:
        level_dir = inside(group, *lv.path.split("/"))  # a .zattrs path like ../../x is refused
        try:
            arr = zarr.open_array(str(level_dir), mode="r")
        except Exception as exc:  # noqa: BLE001 - any store problem is this crop's reason
            raise NgffError(f"{group / lv.path}: cannot open EM array ({exc})") from None
        end = [math.ceil((st + n * v / e) - 1e-3) for st, n, v, e in zip(start, row.shape, row.voxel_size, lv.scale)]
        lo, hi = [max(a, 0) for a in start], [min(b, s) for b, s in zip(end, lv.shape)]
        core = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        store = arr.chunk_store if arr.chunk_store is not None else arr.store
        keys = chunk_keys(arr, core)
        missing = sum(1 for k in keys if k not in store)
        if missing:
            tried.append(f"{lv.path} ({missing} of {len(keys)} chunks absent)")
            continue
        t_t = tuple(lt + (st + (gg - 1) / 2) * ls for lt, st, gg, ls in zip(lv.translation, start, g, lv.scale))
        how = "read directly" if g == (1, 1, 1) else f"block mean {g[0]}x{g[1]}x{g[2]}"
        return EmPlan(
            group,
            lv,
            g,
            start,
            core,
            TrainGrid(t_scale, t_t),  # type: ignore[arg-type]
            f"EM {lv.path} {fmt_vec(lv.scale)} nm, {how} -> {fmt_vec(t_scale)} nm in the box's phase",
            arr,
        )
    raise NeverFetchedError(
        f"EM at training resolution {fmt_vec(t_scale)} nm never fetched under crop{row.crop} in {group} "
        f"(tried {', '.join(tried) or 'no aligned level'}): {fetch_fix(row)}"
    )


def em_reader(plan: EmPlan, row: ManifestRow) -> Callable[[tuple[int, int, int], tuple[int, int, int]], np.ndarray]:
    """``(lo, hi) -> float32`` EM on training-grid indices, pooled in the box's phase.

    Outside the volume, and in halo regions whose chunks were never fetched, the window
    is padded with its edge values (context only: the box itself was checked).
    """
    where = plan.group / plan.level.path
    return pooled_reader(
        plan.array,
        plan.start,
        plan.factors,
        plan.core,
        on_empty=lambda: NeverFetchedError(
            f"EM never fetched: {where} reads entirely the fill value under crop{row.crop}: {fetch_fix(row)}"
        ),
    )


# ---- writing --------------------------------------------------------------------------------
def _zip_store(store_root: Path, zip_path: Path) -> None:
    with atomic_path(zip_path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted(store_root.rglob("*")):
                if f.is_file():
                    zf.write(f, (Path(store_root.name) / f.relative_to(store_root)).as_posix())


def _attrs(row: ManifestRow) -> dict[str, Any]:
    return {"voxel_size": list(row.voxel_size), "translation": list(row.translation), "shape": list(row.shape)}


def export_crop(
    rows: Sequence[ManifestRow],
    plans: dict[str, ClassPlan],
    em: EmPlan,
    predictors: Sequence[ArrayPredictor],
    n_classes: int,
    store: Path,
    tmp_dir: Path,
    mode: str = "mean",
    block_t: int = 96,
    halo: int = 16,
    min_instance_voxels: float = 8.0,
) -> dict[str, dict[str, Any]]:
    """Predict one crop block by block and write one array per row (see the module docstring).

    Returns:
        ``{row key: {"dtype", "instances"?, "note"}}`` for the written rows.
    """
    import zarr
    from numcodecs import Zstd

    row0 = rows[0]
    out = row0.box
    ob = output_block(out.scale, em.grid.scale, block_t)
    chunks = tuple(min(b, n, 128) for b, n in zip(ob, out.shape))
    crop_group = zarr.open_group(str(inside(store, f"crop{row0.crop}")), mode="a")
    semantic: dict[str, Any] = {}
    instances: dict[str, BlockwiseInstances] = {}
    t_vox = float(np.prod(em.grid.scale))
    o_vox = float(np.prod(out.scale))
    min_vox = max(1, int(round(min_instance_voxels * t_vox / o_vox)))
    for r in rows:
        if plans[r.key].instance:
            instances[r.key] = BlockwiseInstances(
                inside(tmp_dir, f"crop{r.crop}_{r.class_label}.zarr"), out.shape, chunks, min_vox
            )
        else:
            arr = crop_group.create_dataset(
                r.class_label,
                shape=out.shape,
                chunks=chunks,
                dtype=np.uint8,
                compressor=Zstd(level=3),
                fill_value=0,
                overwrite=True,
            )
            arr.attrs.update(_attrs(r))
            semantic[r.key] = arr

    def sink(sl: tuple[slice, slice, slice], prob: np.ndarray) -> None:
        labels = argmax0(prob)
        for r in rows:
            plan = plans[r.key]
            mask = np.isin(labels, plan.labels) if len(plan.labels) > 1 else labels == plan.labels[0]
            if plan.instance:
                instances[r.key].add(sl, mask)
            else:
                semantic[r.key][sl] = mask.view(np.uint8)

    n_blocks = math.prod(math.ceil(n / b) for n, b in zip(out.shape, ob))
    step = max(1, n_blocks // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            log.info("crop%s: %d/%d blocks", row0.crop, done, total)

    predict_blocks(
        out,
        em.grid,
        em_reader(em, row0),
        predictors,
        n_classes,
        sink,
        block_t=block_t,
        halo=halo,
        mode=mode,
        progress=progress,
    )
    info: dict[str, dict[str, Any]] = {r.key: {"dtype": "uint8", "note": plans[r.key].note} for r in rows}
    for r in rows:
        if r.key in instances:

            def create(dtype: np.dtype, r: ManifestRow = r) -> Any:
                arr = crop_group.create_dataset(
                    r.class_label,
                    shape=out.shape,
                    chunks=chunks,
                    dtype=dtype,
                    compressor=Zstd(level=3),
                    fill_value=0,
                    overwrite=True,
                )
                arr.attrs.update(_attrs(r))
                return arr

            k = instances[r.key].finish(create)
            info[r.key].update(dtype=str(crop_group[r.class_label].dtype), instances=k, min_voxels=min_vox)
    return info


# ---- the stage --------------------------------------------------------------------------------
def choose_members(
    wd: WorkDir, cfg: PipelineConfig, method: str, n_best: int, only: Sequence[str] | None
) -> list[Member]:
    """Trained bundles, restricted to ``only`` (``--members``, else ``ensemble.members``), then selected."""
    trained, skipped = trained_members(wd, only, cfg.ensemble.members)
    if not trained:
        raise PipelineError(f"{wd.root}: no trained bundle to export with ({'; '.join(skipped) or 'none found'})")
    return select_members(trained, method, n_best)


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
    members: Sequence[str] | None = None,
    array_predictor_factory: ArrayPredictorFactory | None = None,
) -> dict[str, Any]:
    """Predict every manifest row with the ensemble and write ``submission.zarr`` + ``.zip``.

    Args:
        cfg: configuration; ``ensemble`` keys ``method``, ``n_best``, ``mode``,
            ``members``, ``export_block`` (training voxels per block edge, 96),
            ``export_halo`` (training voxels of context, 16), ``min_instance_voxels``
            (smallest instance kept, in training voxels, 8).
        wd: work dir; outputs go to ``<wd>/submission/`` unless ``out_dir`` is given.
        manifest: the ``test_crop_manifest.csv``.
        data_root: CellMap data root (default ``cfg.data_root``).
        method, n_best, mode: ensemble selection and combination.
        predictor_factory: how a member predicts an image *file* (default: the bundle's
            ``InferClass`` through MONAI); windows are written as NIfTI for it.
        members: restrict the candidates to these bundle names (``--members``).
        array_predictor_factory: how a member predicts an EM *array* window (wins over
            ``predictor_factory``; e.g. a perfect predictor in tests).

    Returns:
        ``{"zarr", "zip", "n_written", "failed": {key: reason}, "untrained": {key:
        reason}, "rows": [...]}`` (also ``reports/export.json``).

    Raises:
        PipelineError: no trained bundle, unreadable or unsafe manifest, no data root,
            unrecorded training resolution (exit 2).
        StageFailed: a member cannot be loaded or predicts the wrong shape (exit 1).
    """
    ens = cfg.ensemble
    method = method or ens.method
    n_best = int(n_best if n_best is not None else ens.n_best)
    mode = mode or ens.mode
    if mode not in MODES:
        raise PipelineError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    block_t, halo, min_inst = ens.export_block, ens.export_halo, ens.min_instance_voxels  # validated by common.config
    if not str(data_root or cfg.data_root or ""):
        raise PipelineError("no data root: set data_root in the config or pass --data-root")
    root = Path(data_root or cfg.data_root or "")
    if not root.is_dir():
        raise PipelineError(f"{root}: data root not found")
    rows = read_manifest(manifest)
    chosen = choose_members(wd, cfg, method, n_best, members)
    train_res = training_resolution(chosen, wd)
    log.info("export with %s at training resolution %s nm", ", ".join(m.name for m in chosen), fmt_vec(train_res))
    out = Path(out_dir) if out_dir else wd.submission_dir
    work = out / ".work"
    work_store = work / "store.zarr"
    ledger = work / "crops"
    members_key = [[m.name, m.model_id] for m in chosen]
    params = [
        FORMAT_VERSION,
        members_key,
        mode,
        list(train_res),
        block_t,
        halo,
        float(min_inst),
        str(root.resolve()),
        list(cfg.classes),
    ]
    run_digest = digest([params, [[r.key, *r.geometry] for r in rows]])
    marker = wd.marker(EXPORT_MARKER)
    report_path = wd.reports_dir / "export.json"
    final_store, zip_path = out / "submission.zarr", out / "submission.zip"
    if marker.is_done(run_digest) and zip_path.is_file() and final_store.is_dir() and report_path.is_file():
        log.info("export already done for these members and this manifest: nothing to do")
        return read_json(report_path)

    with stage_marker(marker, run_digest, manifest=str(manifest), members=[m.name for m in chosen]):
        summary = _export(
            cfg,
            wd,
            rows,
            root,
            chosen,
            train_res,
            mode,
            block_t,
            halo,
            float(min_inst),
            params,
            work,
            work_store,
            ledger,
            predictor_factory,
            array_predictor_factory,
        )
        # the store appears complete or not at all (never deleting outside ``out``)
        if final_store.exists():
            shutil.rmtree(inside(out, "submission.zarr"))
        work_store.rename(final_store)
        shutil.rmtree(ledger, ignore_errors=True)
        _zip_store(final_store, zip_path)
        summary.update({"manifest": str(manifest), "zarr": str(final_store), "zip": str(zip_path)})
        atomic_write_json(report_path, summary)
        if summary["failed"]:  # reported (exit 1 by echo_summary), not raised: the other rows are written
            marker.fail(
                failure_reason(
                    StageFailed(
                        f"{len(summary['failed'])} row(s) failed: "
                        + "; ".join(f"{k}: {v}" for k, v in list(summary["failed"].items())[:5])
                    )
                ),
                n_written=summary["n_written"],
            )
        else:
            marker.done(n_written=summary["n_written"], n_untrained=len(summary["untrained"]))
    return summary


def _export(
    cfg: PipelineConfig,
    wd: WorkDir,
    rows: list[ManifestRow],
    root: Path,
    chosen: list[Member],
    train_res: tuple[float | None, float, float],
    mode: str,
    block_t: int,
    halo: int,
    min_inst: float,
    params: list[Any],
    work: Path,
    work_store: Path,
    ledger: Path,
    predictor_factory: PredictorFactory | None,
    array_predictor_factory: ArrayPredictorFactory | None,
) -> dict[str, Any]:
    import zarr

    failed: dict[str, str] = {}
    untrained: dict[str, str] = {}
    written: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    by_crop: dict[str, list[ManifestRow]] = {}
    for r in rows:
        crop_rows = by_crop.setdefault(r.crop, [])
        if any(x.class_label == r.class_label for x in crop_rows):
            failed[r.key + "#dup"] = "duplicate row (the first one is written)"
        elif crop_rows and crop_rows[0].geometry != r.geometry:
            failed[r.key] = f"geometry differs from the crop's first row ({crop_rows[0].class_label})"
        else:
            crop_rows.append(r)
    if not work_store.is_dir():
        shutil.rmtree(ledger, ignore_errors=True)  # a ledger without its store means nothing
    zarr.open_group(str(work_store), mode="a")
    predictors: list[ArrayPredictor] | None = None
    for crop in sorted(by_crop, key=int):
        crop_rows = by_crop[crop]
        plans: dict[str, ClassPlan] = {}
        for r in crop_rows:
            try:
                plans[r.key] = plan_class(r.class_label, cfg.classes)
            except RowProblem as exc:
                untrained[r.key] = str(exc)
        todo = [r for r in crop_rows if r.key in plans]
        if not todo:
            continue
        crop_digest = digest([params, [[r.key, *r.geometry] for r in todo]])
        state_path = ledger / f"crop{crop}.json"
        try:
            state = read_json(state_path)
        except (OSError, ValueError):
            state = {}
        if state.get("digest") == crop_digest:
            written.update(state["written"])
            notes[f"crop{crop}"] = state["note"]
            continue
        try:
            em = plan_em(root, todo[0], train_res)
        except PipelineError as exc:
            for r in todo:
                failed[r.key] = str(exc)
            log.warning("crop%s: %s", crop, exc)
            continue
        if predictors is None:  # load every member once, only when something is predicted
            predictors = _load_predictors(chosen, wd, cfg, work, predictor_factory, array_predictor_factory)
        notes[f"crop{crop}"] = em.note
        log.info(
            "crop%s (%s, %s nm, shape %s): %d rows; %s",
            crop,
            todo[0].dataset,
            fmt_vec(todo[0].voxel_size),
            todo[0].shape,
            len(todo),
            em.note,
        )
        try:
            info = export_crop(
                todo, plans, em, predictors, cfg.output_classes, work_store, work / "tmp", mode, block_t, halo, min_inst
            )
        except NgffError as exc:  # e.g. never-fetched EM found while reading
            shutil.rmtree(inside(work_store, f"crop{crop}"), ignore_errors=True)
            for r in todo:
                failed[r.key] = str(exc)
            log.warning("crop%s: %s", crop, exc)
            continue
        except ValueError as exc:
            raise StageFailed(f"crop{crop}: {exc}") from exc
        written.update(info)
        atomic_write_json(state_path, {"digest": crop_digest, "written": info, "note": em.note})
    shutil.rmtree(work / "tmp", ignore_errors=True)
    return {
        "members": [m.name for m in chosen],
        "training_resolution_nm": list(train_res),
        "mode": mode,
        "export_block": block_t,
        "export_halo": halo,
        "n_rows": len(rows),
        "n_written": len(written),
        "written": written,
        "failed": failed,
        "untrained": untrained,
        "inputs": notes,
        "rows": [
            {
                "crop": r.crop,
                "class_label": r.class_label,
                "voxel_size": list(r.voxel_size),
                "translation": list(r.translation),
                "shape": list(r.shape),
                "status": "written" if r.key in written else "untrained" if r.key in untrained else "failed",
            }
            for r in rows
        ],
    }


def _load_predictors(
    chosen: Sequence[Member],
    wd: WorkDir,
    cfg: PipelineConfig,
    work: Path,
    predictor_factory: PredictorFactory | None,
    array_predictor_factory: ArrayPredictorFactory | None,
) -> list[ArrayPredictor]:
    out = []
    for m in chosen:
        try:
            if array_predictor_factory is not None:
                out.append(array_predictor_factory(m, wd, cfg))
            else:
                out.append(
                    file_predictor((predictor_factory or bundle_predictor)(m, wd, cfg), work / "blocks" / m.name)
                )
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is this member's failure
            raise StageFailed(f"{m.bundle_dir}: cannot load the trained bundle: {exc}") from exc
    return out


def run_export_entry(
    work_dir: str | Path,
    manifest: str | Path,
    config_file: str | Path | None = None,
    data_root: str | Path | None = None,
    method: str | None = None,
    n_best: int | None = None,
    mode: str | None = None,
    members: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Set up the stage (work dir, ``logs/ensemble.log``, config) and run :func:`run_export`."""
    ctx = StageContext.open("ensemble", work_dir, config_file)
    return run_export(
        ctx.cfg, ctx.wd, manifest, data_root=data_root, method=method, n_best=n_best, mode=mode, members=members
    )


def echo_summary(s: dict[str, Any]) -> int:
    """Print the outcome; exit code 1 when a row failed (untrained rows are not failures)."""
    click.echo(
        f"submission: {s['zip']} ({s['n_written']} of {s['n_rows']} rows written, "
        f"{len(s['untrained'])} untrained, {len(s['failed'])} failed)"
    )
    for k, v in s["failed"].items():
        click.echo(f"  failed {k}: {v}", err=True)
    if s["untrained"]:
        k, v = next(iter(s["untrained"].items()))
        click.echo(f"  untrained {k}: {v} (+{len(s['untrained']) - 1} more in reports/export.json)", err=True)
    return 1 if s["failed"] else 0


@click.command(name="export")
@work_dir_option
@config_option
@click.option(
    "--manifest",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The challenge test_crop_manifest.csv.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="CellMap data root holding <dataset>/<dataset>.zarr (default: data_root of the config).",
)
@click.option(
    "--method",
    type=click.Choice(["best_n", "best_by_fold"]),
    default=None,
    help="Member selection like MONAI's AlgoEnsembleBestN / AlgoEnsembleBestByFold (default: ensemble.method).",
)
@click.option("--n-best", type=int, default=None, help="Members for best_n (default: ensemble.n_best).")
@click.option(
    "--mode",
    type=click.Choice(["mean", "vote"]),
    default=None,
    help="mean of probabilities then argmax, or majority vote (default: ensemble.mode).",
)
@click.option("--members", default=None, help="Comma-separated bundle names to choose from.")
@stage_command("ensemble")
def main(
    work_dir: Path,
    config_file: Path | None,
    manifest: Path,
    data_root: Path | None,
    method: str | None,
    n_best: int | None,
    mode: str | None,
    members: str | None,
) -> int:
    """Write submission.zarr and submission.zip for a challenge test manifest."""
    only = [m.strip() for m in members.split(",") if m.strip()] if members else None
    return echo_summary(run_export_entry(work_dir, manifest, config_file, data_root, method, n_best, mode, only))


if __name__ == "__main__":
    main()
