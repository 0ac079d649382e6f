"""Score a submission against a truth zarr with the challenge's metric (:mod:`common.metrics`).

Inputs (local paths):

* **truth**: any zarr hierarchy holding ``crop<id>/<class>`` entries: the challenge's
  ground truth (``<ds>.zarr/recon-1/labels/groundtruth/crop<id>/<class>/s0``, a multiscale
  group: its finest level is read) or a submission-shaped store. Every class entry of a
  truth crop is scored (the class sub-group existing is the challenge's "annotated").
* **submission**: the challenge zip (a zarr store ``crop<id>/<class>`` inside, found at any
  depth, e.g. ``submission.zarr/``), a zarr directory, or a folder holding such a store.

Per crop and class the prediction must have the truth's shape (write the manifest's
geometry exactly, as the challenge asks; nothing is resampled here). Semantic truth value
255 is unknown and left out; in instance arrays 255 is an ordinary id. A class the
submission lacks counts all its truth as false negatives. The voxel size (for the
Hausdorff distance) comes from the truth array's ``voxel_size`` attribute or its
multiscale metadata.

Outputs in ``--out``: ``evaluation.json`` (per class and per crop numbers), ``evaluation.md``
(the per-class table) and ``evaluation.png``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.classes import INSTANCE_CLASSES
from common.errors import PipelineError
from common.io import atomic_write_json, atomic_write_text
from common.metrics import (
    InstanceCounts,
    dice_from_counts,
    instance_counts,
    instance_scores,
    iou_from_counts,
    none_if_nan,
    overall_score,
    semantic_counts,
)
from common.progress import progress
from common.workdir import utc_now

log = logging.getLogger("cellmap.evaluate")

_CROP_RE = re.compile(r"^crop(\d+)$")
UNKNOWN = 255


@dataclass(frozen=True)
class Entry:
    """One class array of one crop."""

    crop: str
    cls: str
    array: Any  # zarr.Array
    voxel_size: tuple[float, ...] | None


# ---- reading -------------------------------------------------------------------------------
def open_store(path: Path, what: str) -> Any:
    """A read-only zarr group from a directory or a zip file.

    Raises:
        PipelineError: the path is missing or not a zarr store.
    """
    import zarr

    if not path.exists():
        raise PipelineError(f"{path}: {what} not found")
    try:
        if path.is_file() and path.suffix == ".zip":
            return zarr.open_group(zarr.ZipStore(str(path), mode="r"), mode="r")
        if path.is_dir() and not (path / ".zgroup").is_file():
            inner = sorted(p for p in path.iterdir() if p.is_dir() and (p / ".zgroup").is_file())
            if len(inner) == 1:  # a folder holding one store, e.g. an unpacked submission
                path = inner[0]
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any unreadable store is bad input
        raise PipelineError(f"{path}: {what} is not a readable zarr store or zip ({exc})") from None


def _scale_from_multiscales(group: Any, path: str) -> tuple[float, ...] | None:
    for ms in (group.attrs.get("multiscales") or [])[:1]:
        for ds in ms.get("datasets", []):
            if ds.get("path") == path:
                for t in ds.get("coordinateTransformations", []):
                    if t.get("type") == "scale":
                        return tuple(float(v) for v in t["scale"])
    return None


def _voxel_size(array: Any, parent: Any | None, path: str) -> tuple[float, ...] | None:
    for key in ("voxel_size", "resolution", "scale"):
        v = array.attrs.get(key)
        if isinstance(v, (list, tuple)) and len(v) == array.ndim:
            return tuple(float(x) for x in v)
    return _scale_from_multiscales(parent, path) if parent is not None else None


def _class_array(node: Any) -> tuple[Any, tuple[float, ...] | None] | None:
    """The array of a class entry: itself, or the finest level of a multiscale group."""
    import zarr

    if isinstance(node, zarr.Array):
        return node, _voxel_size(node, None, "")
    ms = node.attrs.get("multiscales") or []
    paths = [d.get("path") for d in (ms[0].get("datasets", []) if ms else [])]
    for p in [*paths, "s0"]:
        if p and p in node and isinstance(node[p], zarr.Array):
            return node[p], _voxel_size(node[p], node, p)
    return None


def find_entries(root: Any) -> Iterator[Entry]:
    """Every ``crop<id>/<class>`` array under ``root``, depth first."""
    stack = [root]
    while stack:
        g = stack.pop()
        for name, sub in sorted(g.groups(), reverse=True):
            if _CROP_RE.match(name):
                for cls, node in sorted([*sub.groups(), *sub.arrays()]):
                    if cls == "all" or cls.endswith("_mask"):
                        continue
                    found = _class_array(node)
                    if found is not None:
                        yield Entry(name, cls, found[0], found[1])
            else:
                stack.append(sub)


def index(root: Any, what: str) -> dict[tuple[str, str], Entry]:
    """``{(crop, class): Entry}``; a crop/class found twice is an error."""
    out: dict[tuple[str, str], Entry] = {}
    for e in find_entries(root):
        key = (e.crop, e.cls)
        if key in out:
            raise PipelineError(f"{what}: {e.crop}/{e.cls} appears twice in the store")
        out[key] = e
    return out


# ---- scoring -------------------------------------------------------------------------------
def evaluate(
    truth_path: Path, submission_path: Path, classes: Sequence[str] | None = None, crops: Sequence[str] | None = None
) -> dict[str, Any]:
    """Score a submission; returns the report (what ``evaluation.json`` holds).

    Raises:
        PipelineError: unreadable inputs, no truth to score, or a shape mismatch.
    """
    truth = index(open_store(truth_path, "truth"), f"{truth_path}")
    sub = index(open_store(submission_path, "submission"), f"{submission_path}")
    want_crops = {c if c.startswith("crop") else f"crop{c}" for c in crops} if crops else None
    keys = sorted(
        k for k in truth if (classes is None or k[1] in classes) and (want_crops is None or k[0] in want_crops)
    )
    if not keys:
        raise PipelineError(
            f"{truth_path}: no crop<id>/<class> truth arrays to score"
            + (" for the requested classes/crops" if classes or crops else "")
        )
    semantic: dict[str, list[int]] = {}
    instance: dict[str, InstanceCounts] = {}
    per_crop: list[dict[str, Any]] = []
    missing: list[str] = []
    for crop, cls in progress(keys, desc="evaluate", unit="array"):
        t_entry = truth[(crop, cls)]
        gt = np.asarray(t_entry.array[...])
        p_entry = sub.get((crop, cls))
        pred = None
        if p_entry is None:
            missing.append(f"{crop}/{cls}")
        else:
            pred = np.asarray(p_entry.array[...])
            if pred.shape != gt.shape:
                raise PipelineError(
                    f"{submission_path}: {crop}/{cls} has shape {list(pred.shape)}, the truth "
                    f"{list(gt.shape)} (write the manifest's shape; nothing is resampled)"
                )
        vs = t_entry.voxel_size or (p_entry.voxel_size if p_entry else None)
        if vs is None:
            log.warning("%s/%s: no voxel size in truth or submission; distances in voxels", crop, cls)
            vs = (1.0,) * gt.ndim
        row: dict[str, Any] = {"crop": crop, "class": cls, "missing": p_entry is None}
        if cls in INSTANCE_CLASSES:
            c = instance_counts(pred, gt, vs, crop=crop)
            instance.setdefault(cls, InstanceCounts()).add(c)
            row.update(
                kind="instance",
                **{k: v for k, v in instance_scores(c).items() if k != "cutoff_crops"},
                cutoff=bool(c.cutoff_crops),
            )
        else:
            tp, fp, fn = semantic_counts(pred, gt, gt == UNKNOWN)
            acc = semantic.setdefault(cls, [0, 0, 0])
            acc[0] += tp
            acc[1] += fp
            acc[2] += fn
            row.update(
                kind="semantic",
                tp=tp,
                fp=fp,
                fn=fn,
                iou=none_if_nan(iou_from_counts(tp, fp, fn)),
                dice=none_if_nan(dice_from_counts(tp, fp, fn)),
            )
        per_crop.append(row)
        del gt, pred
    sem_scores = {
        c: {
            "iou": none_if_nan(iou_from_counts(*v)),
            "dice": none_if_nan(dice_from_counts(*v)),
            "tp": v[0],
            "fp": v[1],
            "fn": v[2],
        }
        for c, v in sorted(semantic.items())
    }
    ins_scores = {c: instance_scores(v) for c, v in sorted(instance.items())}
    extra = sorted(f"{k[0]}/{k[1]}" for k in sub if k not in truth)
    return {
        "generated_at": utc_now(),
        "truth": str(truth_path),
        "submission": str(submission_path),
        **overall_score(
            {c: v["iou"] for c, v in sem_scores.items()}, {c: v["combined"] for c, v in ins_scores.items()}
        ),
        "semantic": sem_scores,
        "instance": ins_scores,
        "per_crop": per_crop,
        "missing_in_submission": missing,
        "not_in_truth": extra,
        "n_crops": len({k[0] for k in keys}),
    }


# ---- outputs -------------------------------------------------------------------------------
def _f(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def render_markdown(r: dict[str, Any]) -> str:
    """``evaluation.md``: overall score and the per-class table."""
    lines = [
        "# Evaluation (CellMap challenge metric)",
        "",
        f"Truth `{r['truth']}`, submission `{r['submission']}`, {r['n_crops']} crops.",
        "",
        f"**Overall {_f(r['overall'])}** = sqrt(mean instance combined {_f(r['mean_instance_combined'])} x "
        f"mean semantic IoU {_f(r['mean_semantic_iou'])}). Definitions: docs/evaluation.md.",
        "",
        "| class | kind | score | IoU / F1 | Dice / normalised Hausdorff | TP | FP | FN |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, v in r["semantic"].items():
        lines.append(
            f"| {c} | semantic | {_f(v['iou'])} | {_f(v['iou'])} | {_f(v['dice'])} | {v['tp']} | {v['fp']} | {v['fn']} |"
        )
    for c, v in r["instance"].items():
        lines.append(
            f"| {c} | instance | {_f(v['combined'])} | {_f(v['f1'])} | {_f(v['normalized_hausdorff'])} | "
            f"{v['tp']} | {v['fp']} | {v['fn']} |"
        )
    if r["missing_in_submission"]:
        lines += [
            "",
            f"Missing in the submission (all truth counted as false negatives): "
            f"{', '.join(r['missing_in_submission'])}.",
        ]
    cut = sorted({c for v in r["instance"].values() for c in v["cutoff_crops"]})
    if cut:
        lines += ["", f"Instance cutoff (too many predicted objects, scored as unmatched): {', '.join(cut)}."]
    if r["not_in_truth"]:
        lines += [
            "",
            f"Not scored (no truth): {', '.join(r['not_in_truth'][:20])}"
            + (" ..." if len(r["not_in_truth"]) > 20 else ""),
        ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """One bar per class: semantic IoU, instance combined score."""
    from common.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:  # no matplotlib: the JSON and markdown reports hold every number
        return
    names = list(r["semantic"]) + list(r["instance"])
    vals = [r["semantic"][c]["iou"] for c in r["semantic"]] + [r["instance"][c]["combined"] for c in r["instance"]]
    colors = ["tab:blue"] * len(r["semantic"]) + ["tab:orange"] * len(r["instance"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(names) + 2), 4.0))
    ax.bar(names, [0.0 if v is None else v for v in vals], color=colors)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU (blue, semantic) / combined (orange, instance)")
    ax.set_title(f"Overall {_f(r['overall'])}")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run_evaluate(
    truth: Path, submission: Path, out: Path, classes: Sequence[str] | None = None, crops: Sequence[str] | None = None
) -> dict[str, Any]:
    """Score and write ``evaluation.{json,md,png}`` into ``out``."""
    report = evaluate(truth, submission, classes, crops)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "evaluation.json", report)
    atomic_write_text(out / "evaluation.md", render_markdown(report))
    plot(report, out / "evaluation.png")
    return report
