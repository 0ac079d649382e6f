"""One crop: find it, plan its geometry, build its label map, write its NIfTI pair.

Everything here runs in worker processes; :func:`convert_crop` never raises for a bad
crop, it returns a report record with ``status`` ``converted`` | ``skipped`` | ``failed``
and a one-line ``reason``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.classes import ID_TO_NAME, INSTANCE_CLASSES, SOURCE_UNKNOWN, LabelMapping
from common.errors import PipelineError, StageFailed
from common.ngff import (
    EM_GROUP,
    ENV_ERRNOS,
    SCALE_RTOL,
    Level,
    NeverFetchedError,
    NgffError,
    Reduction,
    ResolutionError,
    block_mean_u8,
    chunk_keys,
    finest_level,
    fmt_vec,
    plan_reduction,
    pyramid_issues,
    read_multiscales,
    same_scale,
)
from common.nifti import zyx_to_affine
from common.store import RemotePath, open_array
from common.store import path as store_path
from common.workdir import digest
from stages.convert.pooling import InvalidIds, pool_ids, pool_labels
from stages.convert.writer import write_nifti_gz

log = logging.getLogger("cellmap.convert")

CONVERTER_VERSION = 3  # bump when the outputs of identical inputs change
GT_GROUP = "recon-1/labels/groundtruth"
_CROP_RE = re.compile(r"crop([0-9]+)")  # fullmatch: "crop1\n" is not a crop
_UNKNOWN = 255  # internal unknown code, remapped to the configured unknown_label at the end

CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"


@dataclass(frozen=True)
class CropRef:
    """Where one crop lives: ``<data_root>/<dataset>/<dataset>.zarr/.../crop<crop>``."""

    dataset: str
    crop: str
    zarr_root: str
    arrays: tuple[str, ...] | None = None  # label arrays named by a crop manifest (None: list the group)

    @property
    def case(self) -> str:
        """Output stem: ``<dataset>_crop<id>``."""
        return f"{self.dataset}_crop{self.crop}"

    @property
    def group(self) -> Path | RemotePath:
        return store_path(self.zarr_root) / GT_GROUP / f"crop{self.crop}"

    @property
    def em_group(self) -> Path | RemotePath:
        return store_path(self.zarr_root) / EM_GROUP

    def sort_key(self) -> tuple[str, int]:
        return (self.dataset, int(self.crop))


@dataclass(frozen=True)
class Settings:
    """What shapes a crop's outputs (part of its inputs digest, except ``out_dir``)."""

    resolution_zyx: tuple[float | None, float, float]
    classes: tuple[str, ...]
    unknown_label: int
    compress_level: int
    out_dir: str

    def digest_items(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("out_dir")
        d["converter_version"] = CONVERTER_VERSION
        return d


class StorageFailure(StageFailed):
    """A storage or permission error (ENOSPC, EIO, EACCES, ...): the stage stops (exit 1)."""


def environment_error(exc: BaseException) -> OSError | None:
    """The storage-level ``OSError`` behind ``exc`` (itself or its cause/context), if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in ENV_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _stop_if_environment(exc: BaseException, ref: CropRef) -> None:
    err = environment_error(exc)
    if err is not None:
        raise StorageFailure(
            f"{ref.case}: {err.strerror or err} ({err.filename or 'storage'}): "
            "a storage or permission error stops the stage"
        ) from None


class CropProblem(Exception):
    """A crop cannot be converted; ``status`` is ``skipped`` or ``failed``."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Plan:
    """The resolved geometry of one crop at the target resolution.

    Attributes:
        ref: the crop.
        arrays: sub-group name -> its finest level (label s0; same geometry for all).
        red: how the box is cut from EM s0 and reduced (factors, output grid, drops).
        annotated: configured classes annotated in the crop.
        instance: class name -> instance array (only when composing from class arrays).
        warnings: pyramid deviations worth a log line.
    """

    ref: CropRef
    arrays: dict[str, Level]
    red: Reduction
    annotated: list[str]
    instance: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def label_level(self) -> Level:
        return self.red.label

    @property
    def em_level(self) -> Level:
        return self.red.em

    @property
    def cut(self) -> tuple[slice, slice, slice]:
        return self.red.em_cut


def discover_crops(
    data_root: Path | RemotePath | str,
    datasets: list[str] | None = None,
    crops: list[str] | None = None,
    manifest: str | Path | None = None,
) -> list[CropRef]:
    """Every ``<ds>/<ds>.zarr/recon-1/labels/groundtruth/crop<id>`` under ``data_root``, sorted.

    With ``manifest`` (the challenge's ``train_crop_manifest.csv`` format:
    ``crop_name,dataset,class_label,...``, one row per crop and class; or the compact
    ``tests/data/real_crops.csv``: ``crop,split,dataset,...,classes``, train rows) the crops come from its rows instead of
    a listing (plain HTTP servers cannot list); each crop then reads ``all`` and the
    configured classes the manifest names, where they exist.
    """
    root = store_path(data_root)
    if manifest is not None:
        return _manifest_crops(root, Path(manifest), datasets, crops)
    out = []
    for ds_dir in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        if datasets and ds_dir.name not in datasets:
            continue
        gt = ds_dir / f"{ds_dir.name}.zarr" / GT_GROUP
        if not gt.is_dir():
            continue
        for c in gt.iterdir():
            m = _CROP_RE.fullmatch(c.name)
            if m and c.is_dir() and (not crops or m.group(1) in crops):
                out.append(CropRef(ds_dir.name, m.group(1), str(ds_dir / f"{ds_dir.name}.zarr")))
    return sorted(out, key=CropRef.sort_key)


_DATASET_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # one path segment, never ".."


def _manifest_crops(
    root: Path | RemotePath, manifest: Path, datasets: list[str] | None, crops: list[str] | None
) -> list[CropRef]:
    import csv

    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise PipelineError(f"{manifest}: unreadable crop manifest ({exc.strerror or exc})") from None
    classes: dict[tuple[str, str], set[str]] = {}
    compact = (
        bool(rows) and "classes" in rows[0]
    )  # tests/data/real_crops.csv: one row per crop, classes space-separated
    for i, row in enumerate(rows, start=2):
        if compact and (row.get("split") or "train").strip() != "train":
            continue  # test crops publish no labels
        ds = (row.get("dataset") or "").strip()
        crop = (row.get("crop") if compact else row.get("crop_name")) or ""
        crop = crop.strip()
        if not _DATASET_RE.fullmatch(ds) or ".." in ds or not _CROP_RE.fullmatch(f"crop{crop}"):
            raise PipelineError(f"{manifest}:{i}: expected columns crop_name (digits), dataset, class_label; got {row}")
        if (datasets and ds not in datasets) or (crops and crop not in crops):
            continue
        names = (row.get("classes") or "").split() if compact else [(row.get("class_label") or "").strip()]
        classes.setdefault((ds, crop), set()).update(names)
    out = [CropRef(ds, crop, str(root / ds / f"{ds}.zarr"), tuple(sorted(c))) for (ds, crop), c in classes.items()]
    return sorted(out, key=CropRef.sort_key)


def _short(msg: str, ref: CropRef) -> str:
    """Drop the crop's absolute path from a message (the report names the crop)."""
    return msg.replace(str(ref.group) + "/", "").replace(str(store_path(ref.zarr_root)) + "/", "")


def _is_instance(group: Path | RemotePath, name: str) -> bool:
    for attrs in (group / ".zattrs", group / "s0" / ".zattrs"):
        try:
            kind = json.loads(attrs.read_text())["cellmap"]["annotation"]["annotation_type"]["type"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return kind == "instance_segmentation"
    return name in INSTANCE_CLASSES


@functools.lru_cache(maxsize=64)
def _em_levels(em_group: str, mtime_ns: int) -> tuple[Level, ...]:
    """EM levels, read once per process per dataset (keyed on the ``.zattrs`` mtime)."""
    return tuple(read_multiscales(em_group))


def _geometry_matches(a: Level, b: Level) -> bool:
    return (
        tuple(a.shape) == tuple(b.shape)
        and same_scale(a.scale, b.scale)
        and all(abs(x - y) <= 1e-3 * s for x, y, s in zip(a.translation, b.translation, b.scale))
    )


def plan_geometry(label_s0: Level, em_levels: Sequence[Level], target: Sequence[float | None]) -> Reduction:
    """The reduction of one box (metadata only; shared by convert and ``--plan``).

    Raises:
        CropProblem: ``skipped`` when the data cannot give the target (label s0 or EM
            s0 coarser than the target, target not a whole multiple of EM s0, box
            smaller than one output voxel); ``failed`` when the box is off the EM s0
            grid or outside the EM volume.
    """
    s0 = label_s0.scale
    if any(t is not None and s > t * (1 + SCALE_RTOL) for s, t in zip(s0, target)):
        raise CropProblem(
            SKIPPED, f"coarser than target resolution (label s0 {fmt_vec(s0)} nm, target {fmt_vec(target)} nm)"
        )
    em0 = finest_level(em_levels)
    try:
        return plan_reduction(label_s0, em0, target)
    except ResolutionError as exc:
        raise CropProblem(SKIPPED, str(exc)) from None
    except NgffError as exc:
        raise CropProblem(FAILED, str(exc)) from None


def _label_names(ref: CropRef, st: Settings) -> list[str]:
    """The crop's label arrays: listed, or (manifest) ``all`` and the configured classes that exist."""
    if ref.arrays is None:
        try:
            return sorted(p.name for p in ref.group.iterdir() if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            raise CropProblem(FAILED, "crop group not found") from None
    wanted = ["all", *(c for c in st.classes if c in ref.arrays)]
    return sorted(n for n in wanted if (ref.group / n / ".zattrs").is_file())


def plan_crop(ref: CropRef, st: Settings) -> Plan:
    """Resolve the label s0 arrays and the EM s0 reduction of one crop (metadata only).

    Raises:
        CropProblem: the crop is skipped (too coarse, nothing configured) or failed.
    """
    names = _label_names(ref, st)
    if not names:
        raise CropProblem(FAILED, "no label arrays in the crop")
    levels: dict[str, list[Level]] = {}
    for name in names:
        try:
            levels[name] = read_multiscales(ref.group / name)
        except NgffError as exc:
            raise CropProblem(FAILED, _short(str(exc), ref)) from None
    annotated = [c for c in st.classes if c in levels]
    if not annotated:
        raise CropProblem(SKIPPED, "none of the configured classes is annotated in this crop")
    ref_name = "all" if "all" in levels else annotated[0]
    lab = finest_level(levels[ref_name])
    chosen: dict[str, Level] = {}
    for name, lvs in levels.items():
        m = finest_level(lvs)
        if not _geometry_matches(m, lab):
            raise CropProblem(
                FAILED, f"shape mismatch between classes: {name} {m.describe()} vs {ref_name} {lab.describe()}"
            )
        chosen[name] = m
    try:
        em_levels = _em_levels(str(ref.em_group), (ref.em_group / ".zattrs").stat().st_mtime_ns)
    except OSError as exc:
        _stop_if_environment(exc, ref)
        raise CropProblem(FAILED, f"EM: {EM_GROUP}: missing .zattrs") from None
    except NgffError as exc:
        raise CropProblem(FAILED, "EM: " + _short(str(exc), ref)) from None
    red = plan_geometry(lab, em_levels, st.resolution_zyx)
    need, have = memory_needed(red), available_memory()
    if have is not None and need > MEMORY_SHARE * have:
        raise CropProblem(
            FAILED,
            f"too large: converting needs ~{need / 2**30:.1f} GiB in memory "
            f"(output {red.out.shape}), {have / 2**30:.1f} GiB available",
        )
    warnings = [f"EM {w}" for w in pyramid_issues(em_levels)]
    # instance vs semantic matters only when composing from class arrays
    inst = {} if "all" in levels else {name: _is_instance(ref.group / name, name) for name in annotated}
    return Plan(ref, chosen, red, annotated, inst, warnings)


def box_nm(level: Level) -> list[list[float]]:
    """World box ``[[lo, hi], ...]`` (z, y, x, nm, half-open) covered by a level's voxels."""
    return [[t - s / 2, t + (n - 0.5) * s] for t, s, n in zip(level.translation, level.scale, level.shape)]


def _tree_stats(top: str) -> list[list[Any]]:
    """``[relative path, size, mtime_ns]`` of every file under ``top`` (``os.scandir``, sorted)."""
    out: list[list[Any]] = []
    stack = [top]
    n = len(top) + 1
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                st = e.stat()
                out.append([e.path[n:], st.st_size, st.st_mtime_ns])
    return sorted(out)


def _stat(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, "absent"]
    return [path, st.st_size, st.st_mtime_ns]


def arrays_read(plan: Plan) -> list[str]:
    """Label arrays whose voxels shape the output: ``all`` if present, else the annotated classes."""
    return ["all"] if "all" in plan.arrays else list(plan.annotated)


def inputs_digest(plan: Plan, st: Settings, em_arr: Any) -> str:
    """Digest of everything a crop's outputs depend on (stat-level, no data read).

    Covers the settings, the crop's metadata files (every array's group attributes and
    chosen-level ``.zarray``), the chunk files of the arrays read, the EM group and level
    metadata and the EM chunks under the cut.
    """
    ref = plan.ref
    group, em_dir = str(ref.group), os.path.join(str(ref.em_group), plan.em_level.path)
    meta = [".zattrs"]
    for name, lv in sorted(plan.arrays.items()):
        meta += [f"{name}/.zattrs", f"{name}/{lv.path}/.zarray"]
    crop_meta = [[m, *_stat(os.path.join(group, m))[1:]] for m in meta]
    level_files = {name: _tree_stats(os.path.join(group, name, plan.arrays[name].path)) for name in arrays_read(plan)}
    chunks = [[key, *_stat(os.path.join(em_dir, key))[1:]] for key in chunk_keys(em_arr, plan.cut)]
    return digest(
        [
            st.digest_items(),
            crop_meta,
            level_files,
            _stat(os.path.join(str(ref.em_group), ".zattrs"))[1:],
            _stat(os.path.join(em_dir, ".zarray"))[1:],
            chunks,
        ]
    )


MEMORY_SHARE = 0.5  # a crop may plan on half the available memory (workers run side by side)


def memory_needed(red: Reduction) -> int:
    """Bytes one crop holds at most: both uint8 outputs plus one EM and one label slab (ids, codes, masks)."""
    out = int(np.prod(red.out.shape, dtype=np.int64))
    em_in = int(np.prod([c.stop - c.start for c in red.em_cut], dtype=np.int64))
    label_in = int(np.prod([c.stop - c.start for c in red.label_cut], dtype=np.int64))
    return 2 * out + 6 * min(SLAB_VOXELS, max(em_in, label_in))


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


SLAB_VOXELS = 1 << 25  # input voxels read and reduced at a time (bounded memory for 6.5 G-voxel crops)


def _slabs(n_out: int, factor: int, plane_voxels: int) -> list[tuple[int, int]]:
    """Output z ranges ``[j0, j1)`` whose input (``factor`` planes each) fits :data:`SLAB_VOXELS`."""
    step = max(1, SLAB_VOXELS // max(1, factor * plane_voxels))
    return [(j, min(n_out, j + step)) for j in range(0, n_out, step)]


def _open_label(ref: CropRef, name: str, level: Level) -> Any:
    try:
        arr = open_array(ref.group / name / level.path)
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for bad metadata
        _stop_if_environment(exc, ref)
        raise CropProblem(FAILED, f"unreadable array {name}/{level.path}: {type(exc).__name__}: {exc}") from None
    if arr.dtype.kind != "u":  # the encodings are unsigned: 0 absent, 1 present / ids, 255 unknown
        raise CropProblem(FAILED, f"{name}/{level.path}: dtype {arr.dtype}, expected unsigned integers")
    return arr


def _read(arr: Any, name: str, level: Level, region: tuple[slice, ...], ref: CropRef | None = None) -> np.ndarray:
    try:
        return np.asarray(arr[region])
    except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise many kinds for bad chunks
        if ref is not None:
            _stop_if_environment(exc, ref)
        raise CropProblem(FAILED, f"unreadable chunk in {name}/{level.path}: {type(exc).__name__}: {exc}") from None


# `all` ids a crop may hold: 0, the declared unknown 255 and the class table
_KNOWN_IDS = np.zeros(256, bool)
_KNOWN_IDS[[0, SOURCE_UNKNOWN, *ID_TO_NAME]] = True


_INVALID = 254  # internal code of ids outside the class table (never a class value: classes < 254)


def _bad_ids(a: np.ndarray) -> list[int]:
    """``all`` ids outside the class table (slow path: only once a crop is known to hold some)."""
    vals = np.unique(a)
    return [int(v) for v in vals if v > 255 or not _KNOWN_IDS[int(v)]][:5]


def _check_semantic(a: np.ndarray, where: str) -> None:
    """Fail on semantic values outside the encoding {0 absent, 1 present, 255 unknown}."""
    flat = a.ravel() if a.dtype == np.uint8 else np.minimum(a.ravel(), 256).astype(np.uint16)
    present = np.flatnonzero(np.bincount(flat, minlength=257))
    bad = [int(v) for v in present if v not in (0, 1, SOURCE_UNKNOWN)]
    if bad:
        raise CropProblem(FAILED, f"{where}: values outside the semantic encoding {{0, 1, 255}}: {bad[:5]}")


def _ids_u8(a: np.ndarray) -> np.ndarray:
    """``all`` ids as uint8; ids beyond the table (> 255) become 255, which maps to unknown (never wrapped)."""
    if a.dtype == np.uint8:
        return a
    return np.where(a > 255, SOURCE_UNKNOWN, a).astype(np.uint8)


def build_label(plan: Plan, st: Settings) -> np.ndarray:
    """The crop's uint8 label map on the output grid, with the internal unknown code 255.

    Codes are made at label s0 (with an ``all`` array: its ids through
    :class:`LabelMapping`; otherwise composed from the class arrays: semantic 1 ->
    class, 255 -> unknown; instance > 0 -> class; two classes on one voxel -> unknown);
    where a configured class is not annotated, voxels with no annotation are unknown.
    Then each output voxel's block is reduced by :func:`pool_labels`, slab by slab.
    """
    ref, red = plan.ref, plan.red
    unannotated = len(plan.annotated) < len(st.classes)
    mapping = LabelMapping(st.classes, _UNKNOWN)
    lut = mapping.lookup_table()
    if unannotated:  # a 0 in `all` is no annotation for the classes this crop lacks
        lut[0] = _UNKNOWN
    lut[~_KNOWN_IDS] = _INVALID  # ids outside the class table fail the crop (pool_ids sees every voxel)
    cz, cy, cx = red.label_cut
    rz = red.label_factor[0]
    out = np.empty(red.out.shape, np.uint8)
    use_all = "all" in plan.arrays
    names = ["all"] if use_all else list(plan.annotated)
    arrs = {n: _open_label(ref, n, plan.arrays[n]) for n in names}
    for j0, j1 in _slabs(red.out.shape[0], rz, (cy.stop - cy.start) * (cx.stop - cx.start)):
        region = (slice(j0 * rz, j1 * rz), cy, cx)
        if use_all:
            raw = _read(arrs["all"], "all", plan.arrays["all"], region, ref)
            where = f"all/{plan.arrays['all'].path}"
            if raw.dtype != np.uint8 and raw.size and int(raw.max()) > 255:
                raise CropProblem(FAILED, f"{where}: ids outside the class table: {_bad_ids(raw)}")
            try:
                out[j0:j1] = pool_ids(_ids_u8(raw), red.label_factor, lut, _UNKNOWN, _INVALID)
            except InvalidIds:
                raise CropProblem(FAILED, f"{where}: ids outside the class table: {_bad_ids(raw)}") from None
        else:
            shape = tuple(sl.stop - sl.start for sl in region)
            codes = np.full(shape, _UNKNOWN if unannotated else 0, np.uint8)
            hits = np.zeros(shape, np.uint8)
            unknown = np.zeros(shape, bool)
            for name in names:
                arr = _read(arrs[name], name, plan.arrays[name], region, ref)
                if not plan.instance.get(name):
                    _check_semantic(arr, f"{name}/{plan.arrays[name].path}")
                present = arr > 0 if plan.instance.get(name) else arr == 1
                if not plan.instance.get(name):
                    unknown |= arr == SOURCE_UNKNOWN
                codes[present] = mapping.label_of(name)
                hits += present
            codes[unknown & (hits == 0)] = _UNKNOWN
            codes[hits > 1] = _UNKNOWN  # two classes claim a voxel: do not guess
            out[j0:j1] = pool_labels(codes, red.label_factor, _UNKNOWN)
    return out


def read_image(plan: Plan, em_arr: Any) -> np.ndarray:
    """The crop's EM on the output grid: EM s0 block means (:func:`block_mean_u8`), slab by slab.

    Raises:
        NeverFetchedError: a chunk under the cut is absent, or the whole cut is the fill value.
    """
    red = plan.red
    where = f"EM {plan.em_level.path}"
    keys = chunk_keys(em_arr, red.em_cut)
    store = em_arr.chunk_store if em_arr.chunk_store is not None else em_arr.store
    missing = [k for k in keys if k not in store]
    if missing:
        raise NeverFetchedError(
            f"EM never fetched: {len(missing)} of {len(keys)} chunks absent in {where} (e.g. {missing[0]})"
        )
    fill = em_arr.fill_value if em_arr.fill_value is not None else 0
    cz, cy, cx = red.em_cut
    fz = red.em_factor[0]
    out = np.empty(red.out.shape, np.uint8)
    data = False
    for j0, j1 in _slabs(red.out.shape[0], fz, (cy.stop - cy.start) * (cx.stop - cx.start)):
        blk = np.asarray(em_arr[cz.start + j0 * fz : cz.start + j1 * fz, cy, cx])
        if blk.dtype != np.uint8:
            raise CropProblem(FAILED, f"EM dtype {blk.dtype}, expected uint8")
        data = data or bool((blk != fill).any())
        out[j0:j1] = block_mean_u8(blk, red.em_factor)
    if not data:
        raise NeverFetchedError(f"EM never fetched: {where} cut is entirely the fill value {fill}")
    return out


def output_names(ref: CropRef) -> tuple[str, str]:
    """Image and label file names inside ``nifti_data/``."""
    return f"{ref.case}_image.nii.gz", f"{ref.case}_label.nii.gz"


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _base_record(ref: CropRef) -> dict[str, Any]:
    return {"dataset": ref.dataset, "crop": ref.crop, "case": ref.case}


def convert_crop(ref: CropRef, st: Settings, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert one crop; never raises for a bad crop (see the module docstring).

    Args:
        ref: the crop.
        st: conversion settings.
        previous: this crop's last record; reused when its ``inputs_digest`` matches and
            its files exist (``reused: true`` is set on the returned copy, not stored).
    """
    rec = _base_record(ref)
    try:
        plan = plan_crop(ref, st)
        em_arr = open_array(ref.em_group / plan.em_level.path)
        dig = inputs_digest(plan, st, em_arr)
        image_name, label_name = output_names(ref)
        out = Path(st.out_dir)
        if (
            previous
            and previous.get("status") == CONVERTED
            and previous.get("inputs_digest") == dig
            and _size(out / image_name) == previous.get("image_bytes")
            and _size(out / label_name) == previous.get("label_bytes")
        ):
            return {**previous, "reused": True}
        for w in plan.warnings:
            log.warning("%s: %s", ref.case, w)
        if any(plan.red.dropped):  # the documented rule, recorded as dropped_em_voxels
            log.info("%s: trailing partial block dropped: %s EM s0 voxels (z, y, x)", ref.case, list(plan.red.dropped))
        label = build_label(plan, st)
        try:
            image = read_image(plan, em_arr)
        except NgffError as exc:
            raise CropProblem(FAILED, str(exc)) from None
        except CropProblem:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt EM chunk
            _stop_if_environment(exc, ref)
            raise CropProblem(
                FAILED, f"unreadable chunk in EM {plan.em_level.path}: {type(exc).__name__}: {exc}"
            ) from None
        lab = plan.red.out
        affine = zyx_to_affine(lab.scale, lab.translation)
        counts = np.bincount(label.ravel(), minlength=256)
        n_unknown = int(counts[_UNKNOWN])
        if st.unknown_label != _UNKNOWN:
            label[label == _UNKNOWN] = st.unknown_label
        image_bytes = write_nifti_gz(out / image_name, image, affine, st.compress_level)
        label_bytes = write_nifti_gz(out / label_name, label, affine, st.compress_level, rle=True)
        rec.update(
            status=CONVERTED,
            reason="",
            image=image_name,
            label=label_name,
            shape=list(lab.shape),
            spacing=list(lab.scale),
            translation=list(lab.translation),
            label_level=plan.label_level.path,
            em_level=plan.em_level.path,
            em_cut=[[s.start, s.stop] for s in plan.cut],
            em_factor=list(plan.red.em_factor),
            label_factor=list(plan.red.label_factor),
            dropped_em_voxels=list(plan.red.dropped),
            box_nm=box_nm(plan.label_level),
            class_voxels={c: int(counts[i + 1]) for i, c in enumerate(st.classes)},
            background_voxels=int(counts[0]),
            unknown_fraction=round(n_unknown / label.size, 6),
            annotated=plan.annotated,
            inputs_digest=dig,
            image_bytes=image_bytes,
            label_bytes=label_bytes,
        )
        return rec
    except CropProblem as exc:
        rec.update(status=exc.status, reason=exc.reason)
        return rec
    except Exception as exc:  # noqa: BLE001 - one bad crop must not stop the others
        _stop_if_environment(exc, ref)
        log.exception("%s: unexpected error", ref.case)
        rec.update(status=FAILED, reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return rec
