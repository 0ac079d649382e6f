"""The analyze stage: MONAI ``DataAnalyzer`` statistics, checked, plus an insights report.

What this adds to a plain ``DataAnalyzer`` run:

* **Unknown voxels are not a class.** Before MONAI sees a label, voxels holding
  ``unknown_label`` are set to 0 in a temporary *label view* (a copy under
  ``<wd>/.analyze_tmp/``, only for cases that contain unknown voxels). So MONAI's
  ``label_stats.labels`` never lists the unknown value and its foreground intensity
  percentiles (the templates' "ct" normalisation bounds) come from class voxels only.
  In MONAI's label-0 statistics the unknown voxels count as background. The by-case file
  records the original label path, not the view. **Class shares therefore never come from
  MONAI's label statistics**: our pass counts voxels per class id with unknown excluded, and
  ``datastats.yaml`` carries them under ``cellmap_stats`` (read by the builtin templates).
* **One intensity clip.** The foreground percentiles in ``datastats.yaml`` are the pooled
  ones of the report (histograms of every case's class voxels, summed), not MONAI's mean
  of per-case percentiles, so every template clips where the report says. Cases without a
  class voxel are named in a warning (they cannot move a pooled clip).
* **No silent drops.** Every case is first read by our own pass (shape, spacing, voxel
  counts per class id, intensity histograms); unreadable or inconsistent cases, and cases
  MONAI dropped (``n_cases`` below the datalist length), fail the stage naming them.
* **Per-class numbers by class id** (MONAI pools per-label stats by list position, wrong
  whenever a case lacks a class) come from our pass; see :mod:`stages.analyze.report`.
* **Parallel and sharded.** ``workers`` processes each analyse a deterministic part of
  the cases; ``--shard I/N`` writes one part's by-case stats under ``analyze_shards/``,
  ``--merge`` summarises them with MONAI's ``SegSummarizer`` in datalist order: the same
  call ``DataAnalyzer`` makes on the same per-case list, so the summary is equal.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.classes import ANALYZE_STATS_KEY
from common.cli import StageContext, select_shard, shard_label, stage_marker
from common.config import PipelineConfig
from common.errors import PipelineError, StageFailed
from common.io import atomic_path, atomic_write_json, read_json, read_yaml
from common.workdir import WorkDir, digest, file_fingerprint, shard_name

log = logging.getLogger("cellmap.analyze")

STAGE = "analyze"


@dataclass(frozen=True)
class CaseItem:
    """One training case of the datalist, with absolute paths."""

    case: str
    image: Path
    label: Path


@dataclass(frozen=True)
class AnalyzeSettings:
    """What the per-case pass needs (picklable, sent to worker processes).

    Attributes:
        n_classes: configured foreground classes (label ids 1..n_classes).
        unknown_label: the unknown value (0: none).
        hist_bins: intensity histogram bins.
        hist_range: intensity histogram range ``[lo, hi)``; values outside land in the end bins.
        device: DataAnalyzer device (``cpu`` or ``cuda``).
        tmp_dir: where label views are written.
    """

    n_classes: int
    unknown_label: int
    hist_bins: int
    hist_range: tuple[float, float]
    device: str
    tmp_dir: str


# ---- inputs --------------------------------------------------------------------------
def training_items(wd: WorkDir) -> list[CaseItem]:
    """The datalist's ``training`` cases in datalist order (convert's order is stable).

    Raises:
        PipelineError: the datalist is missing, unreadable or malformed.
    """
    path = wd.datalist
    if not path.is_file():
        raise PipelineError(f"{path}: datalist not found (run convert first)")
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot read datalist ({exc})") from None
    rows = data.get("training") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise PipelineError(f"{path}: no 'training' cases")
    items: list[CaseItem] = []
    seen: set[str] = set()
    for k, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "label" not in row:
            raise PipelineError(f"{path}: training[{k}] needs 'image' and 'label'")
        case = str(row.get("case") or Path(str(row["image"])).name.split(".")[0])
        if case in seen:
            raise PipelineError(f"{path}: case {case!r} is listed twice")
        seen.add(case)
        items.append(CaseItem(case, wd.nifti_dir / str(row["image"]), wd.nifti_dir / str(row["label"])))
    return items


def settings_from(cfg: PipelineConfig, wd: WorkDir, device: str) -> AnalyzeSettings:
    """Analysis settings from the config's ``analyze`` section."""
    rng, bins = cfg.analyze.hist_range, int(cfg.analyze.hist_bins)  # validated by common.config
    return AnalyzeSettings(
        n_classes=len(cfg.classes),
        unknown_label=cfg.unknown_label,
        hist_bins=bins,
        hist_range=(float(rng[0]), float(rng[1])),
        device=device,
        tmp_dir=str(wd.analyze_tmp_dir),
    )


def inputs_digest(cfg: PipelineConfig, items: Sequence[CaseItem], wd: WorkDir) -> str:
    """Digest of what the analysis depends on: datalist, case files, classes, settings."""
    files = [
        [it.case, file_fingerprint(it.image), file_fingerprint(it.label)]
        for it in items
        if it.image.exists() and it.label.exists()
    ]
    return digest(
        [file_fingerprint(wd.datalist), files, cfg.classes, cfg.unknown_label, cfg.analyze.given(), "analyze-v1"]
    )  # the keys as given: markers of older work dirs match


# ---- our own per-case pass -------------------------------------------------------------
def _hist(values: np.ndarray, s: AnalyzeSettings) -> np.ndarray:
    lo, hi = s.hist_range
    idx = np.floor((values.astype(np.float64) - lo) * (s.hist_bins / (hi - lo)))
    idx = np.clip(idx, 0, s.hist_bins - 1).astype(np.int64)
    return np.bincount(idx, minlength=s.hist_bins)


def _view_path(item: CaseItem, s: AnalyzeSettings) -> Path:
    name = item.label.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return Path(s.tmp_dir) / f"{item.case}__{name}.nii"


def case_stats(item: CaseItem, s: AnalyzeSettings) -> dict[str, Any]:
    """Read one case and count what the report needs, by class id.

    Writes a label view (unknown -> 0) under ``s.tmp_dir`` when the case has unknown voxels.

    Returns:
        A JSON-able dict; ``view_label`` is the label path MONAI should read.

    Raises:
        ValueError: the case is unreadable or inconsistent (message names the problem).
    """
    import nibabel as nib

    img = nib.load(str(item.image))
    lab = nib.load(str(item.label))
    image = np.asanyarray(img.dataobj)
    label = np.asanyarray(lab.dataobj)
    if image.ndim != 3:
        raise ValueError(f"{item.image.name}: image must be 3-D, got shape {image.shape}")
    if label.shape != image.shape:
        raise ValueError(f"{item.label.name}: label shape {label.shape} != image shape {image.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.equal(np.mod(label, 1), 0)):
            raise ValueError(f"{item.label.name}: label holds non-integer values")
    lab_i = label.astype(np.int64, copy=False)
    if lab_i.min() < 0:
        raise ValueError(f"{item.label.name}: label holds negative values")
    counts = np.bincount(lab_i.ravel(), minlength=max(s.n_classes + 1, s.unknown_label + 1))
    allowed = set(range(s.n_classes + 1)) | ({s.unknown_label} if s.unknown_label else set())
    unexpected = {int(v): int(counts[v]) for v in np.nonzero(counts)[0] if int(v) not in allowed}
    if unexpected:
        raise ValueError(
            f"{item.label.name}: unexpected label values {sorted(unexpected)} "
            f"(classes are 1..{s.n_classes}, unknown is {s.unknown_label})"
        )
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{item.image.name}: image holds NaN or inf")
    sums = np.bincount(lab_i.ravel(), weights=image.ravel().astype(np.float64), minlength=len(counts))
    fg = (lab_i >= 1) & (lab_i <= s.n_classes)
    unknown = int(counts[s.unknown_label]) if s.unknown_label else 0
    view = item.label
    if unknown:
        # uncompressed: the view is read once and deleted, gzip would only cost time
        view = _view_path(item, s)
        arr = np.where(label == s.unknown_label, 0, label).astype(label.dtype)
        out = nib.Nifti1Image(arr, lab.affine, lab.header)
        with atomic_path(view) as tmp:
            nib.save(out, str(tmp))
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return {
        "case": item.case,
        "image": str(item.image),
        "label": str(item.label),
        "view_label": str(view),
        "shape": [int(n) for n in image.shape],
        "spacing": zooms,
        "class_voxels": [int(counts[c]) for c in range(s.n_classes + 1)],
        "class_intensity_sum": [float(sums[c]) for c in range(s.n_classes + 1)],
        "unknown_voxels": unknown,
        "voxels": int(image.size),
        "image_min": float(image.min()),
        "image_max": float(image.max()),
        "image_hist": _hist(image.ravel(), s).tolist(),
        "fg_hist": _hist(image[fg], s).tolist(),
    }


# ---- one part: our pass, then MONAI on the readable cases ------------------------------
def analyze_part(items: Sequence[CaseItem], s: AnalyzeSettings, progress: bool = True) -> dict[str, Any]:
    """Analyse some cases in this process.

    Returns:
        ``{"own": [case_stats...], "failed": {case: reason}, "by_case": [MONAI by-case
        dicts, label paths restored], "summary": MONAI's summary of this part or None}``.
    """
    import torch

    from common.progress import progress as progress_lines

    # One thread per process: parallelism comes from ``workers``, and torch's float32
    # reductions then give the same per-case numbers whatever the split (sharded == unsharded).
    torch.set_num_threads(1)
    own: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for it in progress_lines(items, desc="analyze: reading cases", enabled=progress):
        try:
            own.append(case_stats(it, s))
        except Exception as exc:  # noqa: BLE001 - any unreadable case is reported by name
            failed[it.case] = " ".join(str(exc).split())[:300] or type(exc).__name__
    if not own:
        return {"own": own, "failed": failed, "by_case": [], "summary": None}

    from monai.apps.auto3dseg import DataAnalyzer

    def monai_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
        datalist = {"training": [{"image": o["image"], "label": o["view_label"]} for o in rows]}
        return DataAnalyzer(datalist, dataroot="", output_path="", device=s.device, worker=0).get_all_case_stats()

    try:
        result = monai_stats(own)
        raw, summary = list(result["stats_by_cases"]), result["stats_summary"]
    except Exception as exc:  # noqa: BLE001 - a case MONAI cannot load aborts its whole loop
        log.warning("DataAnalyzer failed (%s); analysing case by case to name the culprit", exc)
        raw, summary = [], None
        for o in own:
            try:
                raw += monai_stats([o])["stats_by_cases"]
            except Exception as err:  # noqa: BLE001
                failed[o["case"]] = "MONAI DataAnalyzer: " + (" ".join(str(err).split())[:300] or type(err).__name__)
    if s.device != "cpu" and torch.cuda.device_count() > 1:
        summary = None  # one process per GPU: MONAI's list order varies, summarise in datalist order
    view_to_label = {o["view_label"]: o["label"] for o in own}
    by_case = []
    for d in raw:
        d = dict(d)
        d["label_filepath"] = view_to_label.get(str(d.get("label_filepath")), d.get("label_filepath"))
        by_case.append(d)
    return {"own": own, "failed": failed, "by_case": by_case, "summary": summary}


def _part_worker(args: tuple[list[CaseItem], AnalyzeSettings, bool]) -> dict[str, Any]:
    items, s, progress = args
    return analyze_part(items, s, progress)


def analyze_items(items: Sequence[CaseItem], s: AnalyzeSettings, workers: int) -> dict[str, Any]:
    """Analyse ``items`` with ``workers`` processes (1: in this process, MONAI's own summary)."""
    workers = max(1, min(workers, len(items)))
    if s.device == "cuda":
        import torch

        if torch.cuda.device_count() == 0:
            log.info("--device cuda but no GPU is visible: analysing on CPU")
            s = dataclasses.replace(s, device="cpu")
        elif workers > 1:
            log.info("--device cuda: DataAnalyzer spreads the cases over the visible GPUs itself; using 1 worker")
            workers = 1
    if workers == 1:
        return analyze_part(items, s)
    parts = [select_shard(list(items), (k, workers)) for k in range(workers)]
    import monai.apps.auto3dseg  # noqa: F401 - imported once here, inherited by forked workers

    # fork is cheap (MONAI already imported) and safe: torch runs single-threaded here, so no
    # OpenMP pool is inherited mid-flight. CUDA would need spawn.
    method = "fork" if s.device == "cpu" and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results = list(pool.map(_part_worker, [(p, s, k == 0) for k, p in enumerate(parts)]))
    merged: dict[str, Any] = {"own": [], "failed": {}, "by_case": [], "summary": None}
    for r in results:
        merged["own"] += r["own"]
        merged["failed"].update(r["failed"])
        merged["by_case"] += r["by_case"]
    return merged


# ---- summary and outputs --------------------------------------------------------------
def summarize(by_case: list[dict[str, Any]]) -> dict[str, Any]:
    """MONAI's dataset summary of a by-case list (the call DataAnalyzer makes, same defaults)."""
    from monai.auto3dseg import SegSummarizer

    summarizer = SegSummarizer(
        "image", "label", average=True, do_ccp=False, hist_bins=0, hist_range=[-500, 500], histogram_only=False
    )
    summary: dict[str, Any] = summarizer.summarize(by_case)
    summary["n_cases"] = len(by_case)
    return summary


def _order(rows: list[dict[str, Any]], key: str, items: Sequence[CaseItem], attr: str) -> list[dict[str, Any]]:
    pos = {str(getattr(it, attr)): k for k, it in enumerate(items)}
    return sorted(rows, key=lambda r: pos.get(str(r.get(key)), len(pos)))


def _export_yaml(path: Path, obj: Any) -> None:
    """Write YAML the way DataAnalyzer does (MONAI's exporter), atomically."""
    from monai.bundle import ConfigParser

    with atomic_path(path) as tmp:
        ConfigParser.export_config_file(obj, str(tmp), fmt="yaml", default_flow_style=None, sort_keys=False)


def check_complete(items: Sequence[CaseItem], result: dict[str, Any]) -> None:
    """Fail (exit 1) naming every case that was unreadable or that MONAI dropped."""
    failed: dict[str, str] = dict(result["failed"])
    seen = {str(d.get("image_filepath")) for d in result["by_case"]}
    for it in items:
        if it.case not in failed and str(it.image) not in seen:
            failed[it.case] = "dropped by MONAI DataAnalyzer (see the analyze log)"
    if failed:
        names = ", ".join(f"{c} ({r})" for c, r in sorted(failed.items()))
        raise StageFailed(f"{len(failed)} of {len(items)} cases could not be analysed: {names}")
    n = len(result["by_case"])
    if n != len(items):
        raise StageFailed(f"DataAnalyzer analysed {n} cases, the datalist has {len(items)}")


def with_pooled_statistics(summary: dict[str, Any], report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """MONAI's summary with the pooled foreground clip, and our own statistics block.

    MONAI's ``image_foreground_stats.intensity.percentile_00_5/99_5`` is the mean of per-case
    percentiles (a case without foreground counts as 0..0). Every template, ours and the
    official ones, reads its "ct" range normalisation from those two keys, so they are
    replaced by the report's pooled clip: the bundles and the report then hold one number.
    MONAI's own values stay in our block (``monai_foreground_percentiles``).

    Returns:
        ``(summary copy, block)``; the block is written under ``ANALYZE_STATS_KEY`` and read by
        :mod:`training.autoconfig` (``class_voxels``, ``class_shares``, ``intensity_clip``).
    """
    summary = copy.deepcopy(summary)
    fg = summary.setdefault("image_foreground_stats", {}).setdefault("intensity", {})
    monai = [fg.get("percentile_00_5"), fg.get("percentile_99_5")]
    lo, hi = (float(v) for v in report["recommended"]["intensity_clip"])
    fg["percentile_00_5"], fg["percentile_99_5"] = lo, hi
    block = {
        "class_voxels": list(report["class_voxels"]),
        "class_shares": list(report["class_shares"]),
        "unknown_voxels": int(report["unknown"]["voxels"]),
        "intensity_clip": [lo, hi],
        "clip_percentiles": list(report["intensity"]["percentiles"]),
        "monai_foreground_percentiles": monai,
        "foreground_empty_cases": list(report["foreground_empty_cases"]),
    }
    return summary, block


def write_outputs(
    wd: WorkDir, cfg: PipelineConfig, items: Sequence[CaseItem], result: dict[str, Any], s: AnalyzeSettings
) -> dict[str, Any]:
    """Check, then write datastats(.yaml, _by_case.yaml) and the report; return the report."""
    from stages.analyze.report import build_report, write_report

    check_complete(items, result)
    by_case = _order(result["by_case"], "image_filepath", items, "image")
    own = _order(result["own"], "case", items, "case")
    summary = result["summary"] if result.get("summary") is not None else summarize(by_case)
    labels = [int(v) for v in summary["label_stats"]["labels"]]
    if cfg.unknown_label and cfg.unknown_label in labels:  # the label view makes this impossible
        raise StageFailed(f"unknown label {cfg.unknown_label} reached MONAI's label statistics")
    report = build_report(cfg, own, summary, s)
    for name in report["absent_classes"]:
        log.warning("configured class %r never occurs in the %d training cases", name, len(items))
    if report["foreground_empty_cases"]:
        log.warning(
            "%d case(s) hold no class voxel and do not move the intensity clip: %s",
            len(report["foreground_empty_cases"]),
            ", ".join(report["foreground_empty_cases"]),
        )
    summary, ours = with_pooled_statistics(summary, report)
    _export_yaml(wd.datastats, {"stats_summary": summary, "stats_by_cases": [], ANALYZE_STATS_KEY: ours})
    _export_yaml(wd.datastats_by_case, {"stats_summary": summary, "stats_by_cases": by_case})
    write_report(wd.reports_dir, report)
    return report


def _clear_tmp(wd: WorkDir) -> None:
    shutil.rmtree(wd.analyze_tmp_dir, ignore_errors=True)


# ---- shards -----------------------------------------------------------------------------
def shard_dir(wd: WorkDir, n: int) -> Path:
    """Folder of the per-shard results of an ``N``-way sharding."""
    return wd.analyze_shards_dir(n)


def shard_marker_name(i: int, n: int) -> str:
    return shard_name(STAGE, (i, n))


def run_shard(
    wd: WorkDir, cfg: PipelineConfig, shard: tuple[int, int], workers: int, device: str, force: bool = False
) -> None:
    """Analyse one shard; write its by-case stats (MONAI form) and our case stats."""
    items = training_items(wd)
    s = settings_from(cfg, wd, device)
    i, n = shard
    mine = select_shard(items, shard)
    dig = digest([inputs_digest(cfg, items, wd), i, n])
    marker = wd.marker(shard_marker_name(i, n))
    out = shard_dir(wd, n)
    if not force and marker.is_done(dig) and (out / f"shard_{i}.json").is_file():
        log.info("shard %d/%d already done; nothing to do (--force redoes it)", i, n)
        return
    with stage_marker(marker, dig, cases=len(mine)):
        try:
            result = analyze_items(mine, s, workers) if mine else {"own": [], "failed": {}, "by_case": []}
            check_complete(mine, result)
            _export_yaml(
                out / f"datastats_by_case_{i}.yaml", {"stats_summary": {}, "stats_by_cases": result["by_case"]}
            )
            atomic_write_json(
                out / f"shard_{i}.json", {"shard": [i, n], "cases": [it.case for it in mine], "own": result["own"]}
            )
        finally:
            _clear_tmp_of(mine, s)
            try:
                Path(s.tmp_dir).rmdir()  # only when no other shard is using it
            except OSError:
                pass
        marker.done(cases=len(mine))
    log.info("shard %d/%d: %d cases analysed into %s", i, n, len(mine), out)


def _clear_tmp_of(items: Sequence[CaseItem], s: AnalyzeSettings) -> None:
    """Remove this part's label views only (other shards may share the folder)."""
    for it in items:
        _view_path(it, s).unlink(missing_ok=True)


def _complete_sharding(wd: WorkDir, items: Sequence[CaseItem], base: str) -> int:
    root = wd.analyze_shards_root
    ns = sorted((int(p.name[1:]) for p in root.glob("n*") if p.name[1:].isdigit()), reverse=True)
    if not ns:
        raise PipelineError(f"{root}: no shard results to merge (run --shard I/N first)")
    missing_by_n = {}
    for n in ns:
        missing = [
            i
            for i in range(n)
            if not wd.marker(shard_marker_name(i, n)).is_done(digest([base, i, n]))
            or not (shard_dir(wd, n) / f"shard_{i}.json").is_file()
        ]
        if not missing:
            return n
        missing_by_n[n] = missing
    n = ns[0]
    raise PipelineError(
        f"{shard_dir(wd, n)}: shards {missing_by_n[n]} of {n} are missing or stale (run --shard I/{n} for them first)"
    )


def merge_shards(wd: WorkDir, cfg: PipelineConfig, device: str) -> dict[str, Any]:
    """Combine a complete set of shards into the unsharded outputs (summary equal)."""
    items = training_items(wd)
    s = settings_from(cfg, wd, device)
    base = inputs_digest(cfg, items, wd)
    n = _complete_sharding(wd, items, base)
    result: dict[str, Any] = {"own": [], "failed": {}, "by_case": [], "summary": None}
    for i in range(n):
        data = read_yaml(shard_dir(wd, n) / f"datastats_by_case_{i}.yaml") or {}
        result["by_case"] += data.get("stats_by_cases") or []
        result["own"] += read_json(shard_dir(wd, n) / f"shard_{i}.json")["own"]
    log.info("merging %d shards (%d cases)", n, len(result["by_case"]))
    result["by_case"] = _order(result["by_case"], "image_filepath", items, "image")
    result["summary"] = summarize(result["by_case"])
    return write_outputs(wd, cfg, items, result, s)


# ---- the stage ----------------------------------------------------------------------------
def run_analyze(
    wd: WorkDir,
    cfg: PipelineConfig,
    workers: int = 1,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    merge: bool = False,
    force: bool = False,
) -> int:
    """Run the stage (unsharded, one shard, or the merge of all shards).

    Returns:
        0 on success (also when everything was already done).

    Raises:
        PipelineError: bad inputs (exit 2). StageFailed: cases unreadable or dropped (exit 1).
    """
    if device not in ("cpu", "cuda"):
        raise PipelineError(f"--device must be cpu or cuda, got {device!r}")
    if shard is not None and merge:
        raise PipelineError("--shard and --merge are exclusive")
    if workers < 1:
        raise PipelineError(f"--workers must be >= 1, got {workers}")
    if shard is not None:
        run_shard(wd, cfg, shard, workers, device, force)
        return 0
    items = training_items(wd)
    dig = digest([inputs_digest(cfg, items, wd), "merge" if merge else "full"])
    marker = wd.marker(STAGE)
    if not force and marker.is_done(dig) and wd.datastats.is_file() and wd.datastats_by_case.is_file():
        log.info("analyze already done for these inputs; nothing to do (--force redoes it)")
        return 0
    with stage_marker(marker, dig, cases=len(items), workers=workers, merge=merge):
        if merge:
            report = merge_shards(wd, cfg, device)
        else:
            s = settings_from(cfg, wd, device)
            log.info("analysing %d cases with %d worker(s) on %s", len(items), workers, device)
            try:
                result = analyze_items(items, s, workers)
            finally:
                _clear_tmp(wd)
            report = write_outputs(wd, cfg, items, result, s)
        marker.done(
            n_cases=report["n_cases"],
            absent_classes=report["absent_classes"],
            intensity_clip=report["recommended"]["intensity_clip"],
        )
    log.info("wrote %s, %s and %s", wd.datastats, wd.datastats_by_case, wd.reports_dir / "analysis.md")
    return 0


def run_analyze_entry(
    work_dir: Path,
    config_file: Path | None = None,
    workers: int | None = None,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    merge: bool = False,
    force: bool = False,
) -> int:
    """Set up the stage (work dir, ``logs/``, config) and run it (what the CLI calls)."""
    ctx = StageContext.open(STAGE, work_dir, config_file, log_name=shard_label(STAGE, shard))
    wd, cfg = ctx.wd, ctx.cfg
    n = workers if workers is not None else int(cfg.analyze.workers)
    return run_analyze(wd, cfg, workers=n, device=device, shard=shard, merge=merge, force=force)
