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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from common.classes import INSTANCE_CLASSES, SOURCE_UNKNOWN, LabelMapping
from common.ngff import (
    SCALE_RTOL,
    Level,
    NgffError,
    chunk_keys,
    em_cut,
    find_em_level,
    find_level,
    fmt_vec,
    pyramid_issues,
    read_em_block,
    read_multiscales,
)
from common.nifti import zyx_to_affine
from common.workdir import digest
from stages.convert.writer import write_nifti_gz

log = logging.getLogger("cellmap.convert")

CONVERTER_VERSION = 2  # bump when the outputs of identical inputs change
EM_GROUP = "recon-1/em/fibsem-uint8"
GT_GROUP = "recon-1/labels/groundtruth"
_CROP_RE = re.compile(r"^crop(\d+)$")
_UNKNOWN = 255  # internal unknown code, remapped to the configured unknown_label at the end

CONVERTED, SKIPPED, FAILED = "converted", "skipped", "failed"


@dataclass(frozen=True)
class CropRef:
    """Where one crop lives: ``<data_root>/<dataset>/<dataset>.zarr/.../crop<crop>``."""

    dataset: str
    crop: str
    zarr_root: str

    @property
    def case(self) -> str:
        """Output stem: ``<dataset>_crop<id>``."""
        return f"{self.dataset}_crop{self.crop}"

    @property
    def group(self) -> Path:
        return Path(self.zarr_root) / GT_GROUP / f"crop{self.crop}"

    @property
    def em_group(self) -> Path:
        return Path(self.zarr_root) / EM_GROUP

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


class CropProblem(Exception):
    """A crop cannot be converted; ``status`` is ``skipped`` or ``failed``."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Plan:
    """The resolved geometry of one crop at the target resolution."""

    ref: CropRef
    arrays: dict[str, Level]  # sub-group name -> the chosen level (same geometry for all)
    label_level: Level
    em_level: Level
    cut: tuple[slice, slice, slice]
    annotated: list[str]
    instance: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def discover_crops(data_root: Path, datasets: list[str] | None = None, crops: list[str] | None = None) -> list[CropRef]:
    """Every ``<ds>/<ds>.zarr/recon-1/labels/groundtruth/crop<id>`` under ``data_root``, sorted."""
    out = []
    for ds_dir in sorted(p for p in data_root.iterdir() if p.is_dir()):
        if datasets and ds_dir.name not in datasets:
            continue
        gt = ds_dir / f"{ds_dir.name}.zarr" / GT_GROUP
        if not gt.is_dir():
            continue
        for c in gt.iterdir():
            m = _CROP_RE.match(c.name)
            if m and c.is_dir() and (not crops or m.group(1) in crops):
                out.append(CropRef(ds_dir.name, m.group(1), str(ds_dir / f"{ds_dir.name}.zarr")))
    return sorted(out, key=CropRef.sort_key)


def _short(msg: str, ref: CropRef) -> str:
    """Drop the crop's absolute path from a message (the report names the crop)."""
    return msg.replace(str(ref.group) + "/", "").replace(str(Path(ref.zarr_root)) + "/", "")


def _is_instance(group: Path, name: str) -> bool:
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
    return tuple(a.shape) == tuple(b.shape) and all(
        abs(x - y) <= 1e-3 * s for x, y, s in zip(a.translation, b.translation, b.scale)
    )


def plan_crop(ref: CropRef, st: Settings) -> Plan:
    """Resolve levels and the EM cut of one crop (metadata only).

    Raises:
        CropProblem: the crop is skipped (too coarse, nothing configured) or failed.
    """
    names = sorted(p.name for p in ref.group.iterdir() if p.is_dir() and not p.name.startswith("."))
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
    ref_levels = levels[ref_name]
    s0 = ref_levels[0].scale
    target = st.resolution_zyx
    if any(t is not None and s > t * (1 + SCALE_RTOL) for s, t in zip(s0, target)):
        raise CropProblem(SKIPPED, f"coarser than target resolution (label s0 {fmt_vec(s0)} nm, target {fmt_vec(target)} nm)")
    lab = find_level(ref_levels, target)
    if lab is None:
        have = ", ".join(fmt_vec(lv.scale) for lv in ref_levels)
        raise CropProblem(SKIPPED, f"no label level at target resolution {fmt_vec(target)} nm (levels: {have})")
    chosen: dict[str, Level] = {}
    for name, lvs in levels.items():
        m = find_level(lvs, lab.scale)
        if m is None or not _geometry_matches(m, lab):
            got = "no level at that voxel size" if m is None else m.describe()
            raise CropProblem(FAILED, f"shape mismatch between classes: {name} {got} vs {ref_name} {lab.describe()}")
        chosen[name] = m
    try:
        em_levels = _em_levels(str(ref.em_group), (ref.em_group / ".zattrs").stat().st_mtime_ns)
    except OSError:
        raise CropProblem(FAILED, f"EM: {EM_GROUP}: missing .zattrs") from None
    except NgffError as exc:
        raise CropProblem(FAILED, "EM: " + _short(str(exc), ref)) from None
    em = find_em_level(em_levels, lab.scale)
    if em is None:
        have = ", ".join(fmt_vec(lv.scale) for lv in em_levels)
        raise CropProblem(FAILED, f"no EM level at {fmt_vec(lab.scale)} nm (EM levels: {have})")
    try:
        cut = em_cut(lab, em)
    except NgffError as exc:
        raise CropProblem(FAILED, str(exc)) from None
    warnings = [f"EM {w}" for w in pyramid_issues(em_levels)] + [f"{ref_name} {w}" for w in pyramid_issues(ref_levels)]
    # instance vs semantic matters only when composing from class arrays
    inst = {} if "all" in levels else {name: _is_instance(ref.group / name, name) for name in annotated}
    return Plan(ref, chosen, lab, em, cut, annotated, inst, warnings)


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
    return digest([
        st.digest_items(), crop_meta, level_files,
        _stat(os.path.join(str(ref.em_group), ".zattrs"))[1:], _stat(os.path.join(em_dir, ".zarray"))[1:], chunks,
    ])


def _read(ref: CropRef, name: str, level: Level) -> np.ndarray:
    try:
        return np.asarray(zarr.open_array(str(ref.group / name / level.path), mode="r")[...])
    except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise many kinds for bad chunks
        raise CropProblem(FAILED, f"unreadable chunk in {name}/{level.path}: {type(exc).__name__}: {exc}") from None


def build_label(plan: Plan, st: Settings) -> np.ndarray:
    """The crop's uint8 label map (z, y, x) with the internal unknown code 255.

    With an ``all`` array: its ids through :class:`LabelMapping`; otherwise composed
    from the class arrays (semantic 1 -> class, 255 -> unknown; instance > 0 -> class).
    Where a configured class is not annotated, voxels with no annotation are unknown.
    """
    ref = plan.ref
    unannotated = len(plan.annotated) < len(st.classes)
    if "all" in plan.arrays:
        a = _read(ref, "all", plan.arrays["all"])
        lut = LabelMapping(st.classes, _UNKNOWN).lookup_table()
        if a.dtype != np.uint8:  # ids beyond the table are unknown, never wrapped
            big = a > 255
            label = np.take(lut, np.where(big, SOURCE_UNKNOWN, a).astype(np.uint8))
        else:
            label = np.take(lut, a)  # faster than lut[a] for uint8 indices
        if unannotated:
            label[a == 0] = _UNKNOWN
        return label
    mapping = LabelMapping(st.classes, _UNKNOWN)
    shape = plan.label_level.shape
    label = np.full(shape, _UNKNOWN if unannotated else 0, np.uint8)
    hits = np.zeros(shape, np.uint8)
    unknown = np.zeros(shape, bool)
    for name in plan.annotated:
        arr = _read(ref, name, plan.arrays[name])
        present = arr > 0 if plan.instance.get(name) else arr == 1
        if not plan.instance.get(name):
            unknown |= arr == SOURCE_UNKNOWN
        label[present] = mapping.label_of(name)
        hits += present
    label[unknown & (hits == 0)] = _UNKNOWN
    label[hits > 1] = _UNKNOWN  # two classes claim a voxel: do not guess
    return label


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
        em_arr = zarr.open_array(str(ref.em_group / plan.em_level.path), mode="r")
        dig = inputs_digest(plan, st, em_arr)
        image_name, label_name = output_names(ref)
        out = Path(st.out_dir)
        if (previous and previous.get("status") == CONVERTED and previous.get("inputs_digest") == dig
                and _size(out / image_name) == previous.get("image_bytes")
                and _size(out / label_name) == previous.get("label_bytes")):
            return {**previous, "reused": True}
        for w in plan.warnings:
            log.warning("%s: %s", ref.case, w)
        label = build_label(plan, st)
        try:
            image = read_em_block(em_arr, plan.cut, where=f"EM {plan.em_level.path}")
        except NgffError as exc:
            raise CropProblem(FAILED, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - corrupt EM chunk
            raise CropProblem(FAILED, f"unreadable chunk in EM {plan.em_level.path}: {type(exc).__name__}: {exc}") from None
        if image.dtype != np.uint8:
            raise CropProblem(FAILED, f"EM dtype {image.dtype}, expected uint8")
        lab = plan.label_level
        affine = zyx_to_affine(lab.scale, lab.translation)
        counts = np.bincount(label.ravel(), minlength=256)
        n_unknown = int(counts[_UNKNOWN])
        if st.unknown_label != _UNKNOWN:
            label[label == _UNKNOWN] = st.unknown_label
        image_bytes = write_nifti_gz(out / image_name, image, affine, st.compress_level)
        label_bytes = write_nifti_gz(out / label_name, label, affine, st.compress_level, rle=True)
        rec.update(
            status=CONVERTED, reason="", image=image_name, label=label_name,
            shape=list(lab.shape), spacing=list(lab.scale), translation=list(lab.translation),
            label_level=lab.path, em_level=plan.em_level.path,
            em_cut=[[s.start, s.stop] for s in plan.cut],
            class_voxels={c: int(counts[i + 1]) for i, c in enumerate(st.classes)},
            background_voxels=int(counts[0]),
            unknown_fraction=round(n_unknown / label.size, 6),
            annotated=plan.annotated, inputs_digest=dig,
            image_bytes=image_bytes, label_bytes=label_bytes,
        )
        return rec
    except CropProblem as exc:
        rec.update(status=exc.status, reason=exc.reason)
        return rec
    except Exception as exc:  # noqa: BLE001 - one bad crop must not stop the others
        log.exception("%s: unexpected error", ref.case)
        rec.update(status=FAILED, reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        return rec
