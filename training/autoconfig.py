"""Fill a builtin template's ``configs/hyper_parameters.yaml`` from the data and the GPU.

Called by every builtin template's ``BundleAlgo.fill_template_config`` (MONAI's
``BundleGen.generate`` -> ``export_to_disk``). The result is a fully resolved YAML file (no
placeholders, no references) that the shared trainer reads; the ``train:`` section of
``pipeline.yaml`` overrides any key at train time without rewriting this file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from common import algorithms
from common.classes import ANALYZE_STATS_KEY
from common.io import atomic_write_yaml, read_json, read_yaml

HYPER_PARAMETERS = "hyper_parameters.yaml"

# Per-algorithm rules (patch divisor/min/max, memory model, epoch heuristic, network factory)
# live in the registry, common/algorithms.py; autoconfig runs at generation time only.

# Keys every builtin template shares; templates add their own ``network`` section.
COMMON_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "weight_decay": 1.0e-5,
    "loss": "dicece",  # or "focal", "dicefocal" (training/losses.py)
    "loss_weights": "auto",  # CE/focal class weights: auto (focal*: max share / class share), none, or a list
    "loss_weight_max": 20.0,  # clip of the auto weights
    "lr_schedule": "cosine",  # cosine decay over num_epochs with a linear warm-up
    "warmup_epochs": 0,
    "num_steps_per_epoch": None,  # None: an epoch is one pass over the training cases
    "num_crops_per_image": 1,
    "crop_mode": "classes",  # classes (official: equal share per class, unknown never a centre), posneg, rand
    "crop_ratios": None,  # classes: per-class weights of the crop centres (background first); None = equal
    "crop_foreground_ratio": 0.8,  # posneg only: share of crops centred on a foreground voxel
    "augment": "default",  # default (the official families), light (flips + intensity), flips, none
    "val_every": 1,
    "early_stop_patience": 0,  # validations without improvement before stopping; 0 = never
    "sw_overlap": 0.25,
    "sw_batch_size": 1,
    "amp": True,  # used on CUDA only
    "num_workers": 2,
    "cache_rate": 0.0,  # share of training cases kept in RAM (set explicitly under SLURM)
    "seed": 0,
    "deterministic": True,
    "max_grad_norm": 12.0,
    "keep_latest": False,  # keep checkpoint_latest.pt after a clean finish
    "mlflow": False,  # MLflow tracking (training/tracking.py); needs the mlflow extra
    "mlflow_tracking_uri": None,  # None: sqlite:///<bundle>/mlflow.db, never a network URI by default
    "mlflow_experiment": "cellmap-auto3dseg",
}


def _median_shape(stats: dict[str, Any]) -> list[int]:
    shape = stats["stats_summary"]["image_stats"]["shape"]
    med = shape.get("median", shape.get("max"))
    if med and isinstance(med[0], list):  # several channels
        med = med[0]
    return [int(round(float(v))) for v in med]


def intensity_bounds(stats: dict[str, Any]) -> list[float]:
    """The intensity clip: foreground percentiles 0.5 and 99.5 (MONAI's ``ct`` range normalisation).

    analyze's ``cellmap_stats.intensity_clip`` (pooled over every case's class voxels, the
    number its report prints) when present; otherwise MONAI's summary (a plain
    ``DataAnalyzer`` run: the mean of per-case percentiles).
    """
    ours = stats.get(ANALYZE_STATS_KEY) or {}
    clip = ours.get("intensity_clip")
    if clip and len(clip) == 2 and clip[0] is not None and clip[1] is not None:
        lo, hi = float(clip[0]), float(clip[1])
    else:
        fg = stats["stats_summary"]["image_foreground_stats"]["intensity"]
        lo, hi = float(fg["percentile_00_5"]), float(fg["percentile_99_5"])
    if not hi > lo:
        img = stats["stats_summary"]["image_stats"]["intensity"]
        lo, hi = float(img["min"]), float(img["max"])
    if not hi > lo:
        hi = lo + 1.0
    return [lo, hi]


def class_shares_from_counts(class_voxels: list[int] | None, output_classes: int) -> list[float] | None:
    """Share of each class id (0..C-1) among known voxels, from analyze's pooled counts.

    ``class_voxels[c]`` is the number of voxels labelled ``c`` over all training cases,
    unknown voxels not counted (analyze's own pass). ``None`` without counts.
    """
    if not class_voxels:
        return None
    counts = np.zeros(output_classes, dtype=np.float64)
    n = min(len(class_voxels), output_classes)
    counts[:n] = np.asarray(class_voxels[:n], dtype=np.float64)
    total = counts.sum()
    return None if total <= 0 else (counts / total).tolist()


def class_shares(by_case: dict[str, Any] | None, output_classes: int, unknown_label: int) -> list[float] | None:
    """Fallback for a plain ``DataAnalyzer`` run: mean per-case share of each class id.

    Only used when ``datastats.yaml`` lacks analyze's ``cellmap_stats`` (whose pooled counts
    are exact). MONAI's summary pools per-label stats by *position*, which is wrong when a
    case lacks a class, so the per-case file is read and matched id by id; the unknown
    value, when MONAI saw it as a label, is taken out of each case's known voxels.
    """
    if not by_case:
        return None
    totals = np.zeros(output_classes, dtype=np.float64)
    for case in by_case.get("stats_by_cases", []):
        ls = case.get("label_stats") or {}
        labels, per = ls.get("labels") or [], ls.get("label") or []
        known = 1.0
        shares = {}
        for lab, entry in zip(labels, per):
            frac = float(entry.get("foreground_percentage", 0.0))
            if int(lab) == unknown_label and unknown_label != 0:
                known -= frac
            elif 0 <= int(lab) < output_classes:
                shares[int(lab)] = frac
        if known <= 0:
            continue
        for lab, frac in shares.items():
            totals[lab] += frac / known
    if totals.sum() <= 0:
        return None
    return (totals / totals.sum()).tolist()


def class_weights_from_shares(shares: list[float] | None, output_classes: int) -> list[float]:
    """Inverse square-root frequency weights, mean 1, clipped to [0.1, 10]; 1 for unseen classes."""
    if shares is None:
        return [1.0] * output_classes
    s = np.asarray(shares, dtype=np.float64)
    w = np.ones_like(s)
    seen = s > 0
    w[seen] = 1.0 / np.sqrt(s[seen])
    w[seen] /= w[seen].mean()
    return [round(float(v), 4) for v in np.clip(w, 0.1, 10.0)]


def auto_roi_batch(algo: str, median_shape: list[int], gpu_mem_gb: float) -> tuple[list[int], int]:
    """Patch size and batch from the GPU memory and the typical image shape.

    The voxel budget is ``voxels_per_gib * gpu_mem_gb`` (the algorithm's registry entry); a
    cube of half the budget (batch 2) is clipped per axis to the median image shape rounded to
    the network's divisor, and to the entry's ``roi_min``/``roi_max``; the batch then grows to
    use the budget (at most 8).
    """
    spec = algorithms.get(algo)
    div, lo = spec.roi_divisor, spec.roi_min
    budget = spec.voxels_per_gib * gpu_mem_gb
    edge = (budget / 2.0) ** (1.0 / 3.0)
    roi = []
    for s in median_shape:
        cap = max(lo, (int(s) // div) * div)
        if spec.roi_max is not None:
            cap = min(cap, max(lo, (spec.roi_max // div) * div))
        roi.append(int(max(lo, min(cap, (int(edge) // div) * div))))
    batch = int(max(1, min(8, budget // float(np.prod(roi)))))
    return roi, batch


def auto_num_epochs(
    algo: str, n_cases: int, batch_size: int, roi: list[int] | None = None, mean_shape: list[float] | None = None
) -> int:
    """The official templates' epoch heuristics, converted to this trainer's epoch.

    The algorithm's registry entry names the heuristic (``epochs_rule``).

    An epoch here is one pass over the training cases, one patch per case (``batch_size``
    cases per step). The official templates take ``b`` patches per image and step; their
    total patch budget ``n * patches_per_image * epochs`` is kept:

    * segresnet: ``e = clip(ceil(80000 / n), 300, 1250) // min(3, b)`` official epochs with
      ``b`` crops per image -> ``b * e`` epochs here;
    * swinunetr: ``e = min(1000, int(800000 / n / (2 b)))`` with ``2 b`` crops -> ``2 b * e``;
    * dints: ``e = int(400 * f / b)``, ``f = max(1, 1251 / n * prod(mean_shape / (240, 240, 155))
      * prod(96 / roi) / 36)`` with ``2 b`` crops -> ``2 b * e``.

    ``n`` is the number of analysed cases (``stats_summary.n_cases``), as in the templates.
    """
    n, b = max(1, int(n_cases)), max(1, int(batch_size))
    rule = algorithms.get(algo).epochs_rule
    if rule == "segresnet":
        e = int(np.clip(math.ceil(80000.0 / n), 300, 1250)) // min(3, b)
        return max(1, b * e)
    if rule == "swinunetr":
        return max(1, 2 * b * min(1000, int(800000 / n / (2 * b))))
    f = 1251.0 / n
    for s, ref in zip(mean_shape or (240, 240, 155), (240.0, 240.0, 155.0)):
        f *= float(s) / ref
    for r in roi or (96, 96, 96):
        f *= 96.0 / float(r)
    f = max(1.0, f / 36.0)
    return max(1, 2 * b * int(400.0 * f / b))


def fill_hyper_parameters(
    algo: str,
    defaults: dict[str, Any],
    input_yaml: str | os.PathLike[str],
    data_stats_file: str | os.PathLike[str],
    bundle_root: str | os.PathLike[str],
    fold: int = 0,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<bundle_root>/configs/hyper_parameters.yaml`` and return it.

    Args:
        algo: a registered algorithm (:func:`common.algorithms.names`).
        defaults: the template's own defaults (``network`` section, learning rate, ...).
        input_yaml: bundlegen's ``input.yaml`` (``dataroot``, ``datalist``, ``class_names``,
            ``output_classes``, ``unknown_label``, ``target_gpu_mem_gb``, ...).
        data_stats_file: MONAI's ``datastats.yaml``; ``datastats_by_case.yaml`` next to it is
            used for class shares when present.
        bundle_root: the bundle folder being generated.
        fold: validation fold of this bundle.
        overrides: extra keys (e.g. from ``export_to_disk(**kwargs)``), applied last.
    """
    inp = read_yaml(input_yaml) or {}
    stats = read_yaml(data_stats_file)
    by_case_file = Path(data_stats_file).with_name("datastats_by_case.yaml")
    by_case = read_yaml(by_case_file) if by_case_file.is_file() else None
    dataroot = str(Path(inp["dataroot"]).expanduser().resolve())
    datalist = Path(inp["datalist"]).expanduser()
    if not datalist.is_absolute() and not datalist.exists():
        datalist = Path(dataroot) / datalist
    datalist = datalist.resolve()
    class_names = list(inp.get("class_names") or [])
    output_classes = int(inp.get("output_classes") or len(class_names) + 1)
    unknown_label = int(inp.get("unknown_label", 255))
    gpu_mem = float(inp.get("target_gpu_mem_gb", 48.0))
    items = read_json(datalist).get("training", [])
    roi, batch = auto_roi_batch(algo, _median_shape(stats), gpu_mem)
    n_cases = int(stats["stats_summary"].get("n_cases") or len(items))
    mean_shape = stats["stats_summary"]["image_stats"]["shape"].get("mean")
    if mean_shape and isinstance(mean_shape[0], list):
        mean_shape = mean_shape[0]
    ours = stats.get(ANALYZE_STATS_KEY) or {}
    shares = class_shares_from_counts(ours.get("class_voxels"), output_classes)
    if shares is None:
        shares = class_shares(by_case, output_classes, unknown_label)
    root = str(Path(bundle_root).resolve())
    cfg: dict[str, Any] = {
        "algo": algo,
        "name": inp.get("name", "cellmap"),
        "bundle_root": root,
        "ckpt_path": os.path.join(root, "model"),
        "data_file_base_dir": dataroot,
        "data_list_file_path": str(datalist),
        "fold": int(fold),
        "modality": str(inp.get("modality", "ct")),
        "class_names": class_names,
        "output_classes": output_classes,
        "unknown_label": unknown_label,
        "sigmoid": bool(inp.get("sigmoid", False)),
        "target_gpu_mem_gb": gpu_mem,
        "roi_size": roi,
        "batch_size": batch,
        "num_epochs": auto_num_epochs(algo, n_cases, batch, roi, mean_shape),
        "intensity_bounds": intensity_bounds(stats),
        "class_shares": shares,
        "class_weights": class_weights_from_shares(shares, output_classes),
        "learning_rate": 2.0e-4,
        # how the bundle's own trainer builds the network and rounds the patch size, so it
        # never needs the registry (self-contained bundles)
        **algorithms.get(algo).bundle_keys(),
    }
    cfg.update(COMMON_DEFAULTS)
    # algorithm-specific keys live in every builtin bundle, so one pipeline-wide ``train:``
    # section can set them for all algorithms (the others ignore them)
    cfg.update(algorithms.shared_defaults())
    cfg.update(defaults)
    for k, v in (overrides or {}).items():
        cfg[k] = v
    atomic_write_yaml(Path(root) / "configs" / HYPER_PARAMETERS, cfg)
    return cfg


def fill_template(
    algo: str,
    input_yaml: str | os.PathLike[str],
    data_stats_file: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    template_defaults: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``BundleAlgo.fill_template_config`` of the builtin templates.

    Args:
        algo: template name.
        input_yaml: ``self.data_list_file`` (bundlegen's ``input.yaml``).
        data_stats_file: ``datastats.yaml``.
        output_path: the bundle folder (``export_to_disk`` already copied the template there).
        template_defaults: the template's own (unfilled) ``configs/hyper_parameters.yaml``;
            default: the copy in ``output_path``.
        kwargs: ``fold`` plus extra keys from ``export_to_disk``; ``gpu_customization*`` are
            ignored (sizing comes from ``target_gpu_mem_gb``); MONAI-style ``training#key``
            is accepted as ``key``.

    Returns:
        MONAI's fill record: ``{"hyper_parameters.yaml": {key: value}}``.
    """
    fold = int(kwargs.pop("fold", 0))
    kwargs.pop("gpu_customization", None)
    kwargs.pop("gpu_customization_specs", None)
    overrides = {str(k).split("#")[-1]: v for k, v in kwargs.items()}
    src = Path(template_defaults) if template_defaults else Path(output_path) / "configs" / HYPER_PARAMETERS
    defaults = read_yaml(src) or {}
    defaults.pop("algo", None)
    cfg = fill_hyper_parameters(algo, defaults, input_yaml, data_stats_file, output_path, fold, overrides)
    return {HYPER_PARAMETERS: cfg}
