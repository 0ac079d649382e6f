"""convert: CellMap zarr crops -> ``nifti_data/`` NIfTI pairs, ``datalist.json``, report.

``run_convert_entry`` is what the CLI calls (work dir, config, logging, exit code);
``run_convert`` is the importable core. Per-crop records live in
``markers/convert/<case>.json``; a crop whose record matches its current inputs digest
is not converted again. Sharded runs (``--shard I/N``) write only those records; an
unsharded run or ``--merge`` converts whatever is still missing and writes
``datalist.json`` and ``reports/convert.{json,md,png}``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from common.cli import StageContext, failure_reason, select_shard, shard_label, stage_marker
from common.config import ConvertOptions, PipelineConfig, load_config
from common.errors import PipelineError, StageFailed
from common.io import TMP_MARK, atomic_path, atomic_write_text, read_json, remove_stale_tmp
from common.ngff import chunk_keys, fmt_vec
from common.progress import progress_bar
from common.store import RemotePath, configure, open_array
from common.store import path as store_path
from common.workdir import WorkDir, digest
from stages.convert.crops import (
    CONVERTED,
    FAILED,
    SKIPPED,
    CropProblem,
    CropRef,
    Settings,
    convert_crop,
    discover_crops,
    plan_crop,
)
from stages.convert.report import write_views
from stages.convert.split import split_crops

log = logging.getLogger("cellmap.convert")
STAGE = "convert"


@dataclass
class ConvertSummary:
    """What one ``run_convert`` call did.

    Attributes:
        records: one report record per crop handled (sorted by dataset, crop).
        converted_now: cases written by this call (not reused).
        datalist: the datalist path, when this call wrote one.
        report: the report path, when this call wrote one.
    """

    records: list[dict[str, Any]]
    converted_now: list[str] = field(default_factory=list)
    datalist: Path | None = None
    report: Path | None = None

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r["status"] == status)

    def failed_fraction(self) -> float:
        """Failed share of the eligible crops (converted + failed; skipped ones are not eligible)."""
        eligible = self.count(CONVERTED) + self.count(FAILED)
        return self.count(FAILED) / eligible if eligible else 0.0

    def text(self) -> str:
        """The human summary printed on stdout."""
        lines = [
            f"convert: {self.count(CONVERTED)} converted ({len(self.converted_now)} now), "
            f"{self.count(SKIPPED)} skipped, {self.count(FAILED)} failed"
        ]
        for r in self.records:
            if r["status"] != CONVERTED:
                lines.append(f"  {r['status']:8s} {r['dataset']} crop{r['crop']}: {r['reason']}")
        return "\n".join(lines)


def convert_options(cfg: PipelineConfig) -> ConvertOptions:
    """The ``convert:`` section (validated and defaulted by :mod:`common.config`)."""
    return cfg.convert


def open_data_root(cfg: PipelineConfig, opts: ConvertOptions) -> Path | RemotePath:
    """``data_root`` as a local path or a remote tree (configures remote reads for workers too).

    Raises:
        PipelineError: not set, or a local folder that does not exist (exit 2).
    """
    if not cfg.data_root:
        raise PipelineError("data_root is not set (data_root: in pipeline.yaml, or --data-root)")
    configure(
        timeout_s=float(opts.remote_timeout_s),
        retries=int(opts.remote_retries),
        chunk_cache=str(opts.chunk_cache or ""),
    )
    root = store_path(cfg.data_root)
    if isinstance(root, Path) and not root.is_dir():
        raise PipelineError(f"{root}: data_root not found")
    return root


def find_crops(root: Path | RemotePath, cfg: PipelineConfig, opts: ConvertOptions) -> list[CropRef]:
    """The crops under ``root``: listed, or from ``convert.crop_manifest`` when set.

    Raises:
        PipelineError: a remote root that cannot be listed and no manifest (exit 2).
    """
    manifest = opts.crop_manifest
    try:
        return discover_crops(root, cfg.datasets, cfg.crops, manifest)
    except FileNotFoundError:
        if isinstance(root, Path):
            raise
        raise PipelineError(
            f"{root}: cannot list this data_root (plain HTTP has no listing); set "
            "convert.crop_manifest or --crop-manifest to the challenge's crop manifest CSV"
        ) from None


def crop_records_dir(wd: WorkDir) -> Path:
    """Where per-crop records live: ``markers/convert/``."""
    return wd.crop_records_dir


def _write_json_if_changed(path: Path, obj: Any, sync: bool = True) -> bool:
    """Atomically write ``obj`` unless the file already holds exactly that (a no-op rerun).

    ``sync=False`` skips the fsync (per-crop records: a torn record after a node crash
    reads as missing, and that crop is simply converted again).
    """
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    if sync:
        atomic_write_text(path, text)
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_own_tmp(directory: Path, refs: list[CropRef], sep: str = "_") -> None:
    """Delete temporary files a killed run left for these crops only (shards run side by side).

    ``sep`` follows the case name in the temporary name: ``_`` for ``<case>_image.nii.gz``,
    ``-`` for the records' ``<case>.json`` (``atomic_path`` appends ``-<random>``).
    """
    if not directory.is_dir():
        return
    prefixes = tuple(f"{TMP_MARK}{r.case}{sep}" for r in refs)
    for p in directory.iterdir():
        if p.name.startswith(prefixes) and p.is_file():
            p.unlink(missing_ok=True)


def die_with_parent() -> None:
    """Worker initializer: the kernel kills this worker when the convert process dies (Linux prctl)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers exit when the call queue breaks
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _convert_all(
    refs: list[CropRef], st: Settings, records_dir: Path, workers: int, progress: bool
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Convert ``refs`` (reusing up-to-date records); returns records by case and new cases."""
    previous = {r.case: _read_record(records_dir / f"{r.case}.json") for r in refs}
    records: dict[str, dict[str, Any]] = {}
    now: list[str] = []

    def done(rec: dict[str, Any]) -> None:
        reused = rec.pop("reused", False)
        if not reused and rec["status"] == CONVERTED:
            now.append(rec["case"])
        _write_json_if_changed(records_dir / f"{rec['case']}.json", rec, sync=False)
        records[rec["case"]] = rec

    bar = progress_bar(total=len(refs), desc="convert", unit="crop", enabled=progress)
    if workers <= 1 or len(refs) <= 1:
        for r in refs:
            done(convert_crop(r, st, previous[r.case]))
            bar.update()
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(
            max_workers=min(workers, len(refs)), mp_context=ctx, initializer=die_with_parent
        ) as pool:
            futs = [pool.submit(convert_crop, r, st, previous[r.case]) for r in refs]
            for fut in as_completed(futs):
                done(fut.result())
                bar.update()
    bar.close()
    return records, now


def run_convert(
    cfg: PipelineConfig,
    wd: WorkDir,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
    merge: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Convert the crops under ``cfg.data_root`` into ``wd``.

    Args:
        cfg: the validated configuration (``data_root`` set).
        wd: the work dir (already ``ensure``-d).
        workers: processes over crops; 1 runs in this process.
        shard: ``(i, n)``: convert only ``select_shard(crops, shard)`` and write per-crop
            records (no datalist, no report).
        merge: write the datalist and report from every crop's record, converting any
            crop still missing (same as an unsharded run; kept for clarity in job chains).
        progress: show progress (a bar on a terminal, plain lines in a log).

    Raises:
        PipelineError: no data_root, data_root missing, no crops found (exit 2).
        StageFailed: an unsharded/merge run converted no crop at all (exit 1).
    """
    if shard is not None and merge:
        raise PipelineError("--shard and --merge are exclusive")
    opts = convert_options(cfg)
    root = open_data_root(cfg, opts)
    refs = find_crops(root, cfg, opts)
    if not refs:
        filt = f" matching datasets={cfg.datasets} crops={cfg.crops}" if (cfg.datasets or cfg.crops) else ""
        raise PipelineError(
            f"{root}: no crops found{filt} (expected <ds>/<ds>.zarr/recon-1/labels/groundtruth/crop<id>)"
        )
    mine = select_shard(refs, shard)
    st = Settings(
        resolution_zyx=cfg.resolution_zyx,
        classes=tuple(cfg.classes),
        unknown_label=cfg.unknown_label,
        compress_level=int(opts.compress_level),
        out_dir=str(wd.nifti_dir),
    )
    wd.nifti_dir.mkdir(parents=True, exist_ok=True)
    rdir = crop_records_dir(wd)
    rdir.mkdir(parents=True, exist_ok=True)
    if shard is None:
        remove_stale_tmp(wd.nifti_dir)
        remove_stale_tmp(rdir)
    else:
        _remove_own_tmp(wd.nifti_dir, mine)
        _remove_own_tmp(rdir, mine, "-")
    marker = wd.marker(shard_label(STAGE, shard))
    t0 = time.perf_counter()
    # a crashed pool or Ctrl-C: the marker says so (one reason format), then it propagates
    with stage_marker(marker, digest([st.digest_items(), [r.case for r in mine]]), crops=len(mine)):
        by_case, now = _convert_all(mine, st, rdir, workers, progress)
        summary = ConvertSummary([by_case[r.case] for r in mine], now)
        details = {
            "converted": summary.count(CONVERTED),
            "skipped": summary.count(SKIPPED),
            "failed": summary.count(FAILED),
            "converted_now": len(now),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if shard is not None:
            marker.done(**details)
            return summary
        budget = float(opts.max_failed_fraction)
        _write_outputs(cfg, wd, summary, bool(opts.report_png), budget)
        if summary.count(CONVERTED) == 0:
            exc = StageFailed(
                f"no crop converted ({summary.count(SKIPPED)} skipped, {summary.count(FAILED)} failed); see {summary.report}"
            )
            exc.summary = summary  # type: ignore[attr-defined]
            marker.fail(failure_reason(exc), **details)
            raise exc
        if summary.failed_fraction() > budget:
            msg = (
                f"{summary.count(FAILED)} of {summary.count(CONVERTED) + summary.count(FAILED)} eligible crops failed "
                f"({100 * summary.failed_fraction():.1f} % > convert.max_failed_fraction {100 * budget:g} %); "
                f"reasons in {summary.report}"
            )
            exc = StageFailed(msg)
            exc.summary = summary  # type: ignore[attr-defined]
            marker.fail(failure_reason(exc), **details)
            raise exc
        marker.done(**details)
    return summary


def by_dataset(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``dataset -> {converted, skipped, failed}`` counts."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        out.setdefault(r["dataset"], {CONVERTED: 0, SKIPPED: 0, FAILED: 0})[r["status"]] += 1
    return dict(sorted(out.items()))


def failure_reasons(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed crops grouped by the kind of reason (text before the first ':'), most first."""
    kinds: dict[str, list[str]] = {}
    for r in records:
        if r["status"] == FAILED:
            kinds.setdefault(r["reason"].split(":")[0].strip() or "unknown", []).append(r["case"])
    return [
        {"reason": k, "count": len(v), "cases": sorted(v)}
        for k, v in sorted(kinds.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    ]


def _write_outputs(
    cfg: PipelineConfig, wd: WorkDir, summary: ConvertSummary, plot: bool = True, budget: float = 0.02
) -> None:
    """Split, ``datalist.json`` and ``reports/convert.{json,md,png}`` (written only when changed)."""
    conv = [r for r in summary.records if r["status"] == CONVERTED]
    tests = set(cfg.split.test_crops)
    train = [r for r in conv if r["crop"] not in tests]
    boxes = {r["case"]: r["box_nm"] for r in train if r.get("box_nm")}
    split = split_crops(wd.nifti_dir / "split.json", [(r["case"], r["dataset"], r["crop"]) for r in train], cfg, boxes)
    folds, held = split.folds, set(split.test)
    training, testing = [], []
    for r in conv:
        item = {"image": r["image"], "label": r["label"], "case": r["case"]}
        if r["crop"] in tests or r["case"] in held:
            testing.append(item)
        elif folds.get(r["case"]) is not None:
            training.append({**item, "fold": folds[r["case"]]})
    missing = tests - {r["crop"] for r in conv}
    if missing:
        log.warning("test crops not converted: %s", ", ".join(sorted(missing)))
    for r in summary.records:
        if r["status"] == CONVERTED:
            r["fold"] = "test" if (r["crop"] in tests or r["case"] in held) else folds.get(r["case"])
    _write_json_if_changed(wd.datalist, {"training": training, "testing": testing})
    report = wd.reports_dir / "convert.json"
    wd.reports_dir.mkdir(parents=True, exist_ok=True)
    content = {
        "resolution_zyx": list(cfg.resolution_zyx),
        "classes": list(cfg.classes),
        "unknown_label": cfg.unknown_label,
        "counts": {s: summary.count(s) for s in (CONVERTED, SKIPPED, FAILED)},
        "by_dataset": by_dataset(summary.records),
        "failed_fraction": round(summary.failed_fraction(), 6),
        "max_failed_fraction": budget,
        "failure_reasons": failure_reasons(summary.records),
        "split": {"groups": split.groups, "held_out": split.test, "leaks": split.leaks},
        "crops": summary.records,
    }
    _write_json_if_changed(report, content)
    write_views(content, wd.reports_dir, plot)
    summary.datalist, summary.report = wd.datalist, report


def _planned_crops(cfg: PipelineConfig) -> tuple[Any, list[CropRef], Settings]:
    """The data root, its crops and the geometry settings that ``--plan`` and ``--cache-to`` use.

    Raises:
        PipelineError: no data_root, data_root missing, no crops found.
    """
    opts = convert_options(cfg)
    root = open_data_root(cfg, opts)
    refs = find_crops(root, cfg, opts)
    if not refs:
        raise PipelineError(f"{root}: no crops found (expected <ds>/<ds>.zarr/recon-1/labels/groundtruth/crop<id>)")
    st = Settings(
        resolution_zyx=cfg.resolution_zyx,
        classes=tuple(cfg.classes),
        unknown_label=cfg.unknown_label,
        compress_level=1,
        out_dir="",
    )
    return root, refs, st


def plan_convert(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """What convert would do with every crop, from metadata only (no data read, nothing written).

    Each row: case, status (``convert`` | ``skipped`` | ``failed``), label s0 and EM s0
    voxel sizes, the EM and label pooling factors, output voxel size and shape, the EM
    s0 cut, dropped trailing voxels and the reason for a skip or failure. A cut over
    EM chunks that are absent (never fetched) is a failure here too (file listing only).

    Raises:
        PipelineError: no data_root, data_root missing, no crops found.
    """
    root, refs, st = _planned_crops(cfg)
    rows = []
    for ref in refs:
        row: dict[str, Any] = {"case": ref.case, "dataset": ref.dataset, "crop": ref.crop}
        try:
            plan = plan_crop(ref, st)
            red = plan.red
            row.update(
                status="convert",
                label_s0=list(red.label.scale),
                em_s0=list(red.em.scale),
                em_level=red.em.path,
                em_factor=list(red.em_factor),
                label_factor=list(red.label_factor),
                spacing=list(red.out.scale),
                shape=list(red.out.shape),
                em_cut=[[c.start, c.stop] for c in red.em_cut],
                dropped_em_voxels=list(red.dropped),
                label_rule="majority of known voxels; unknown if > half unknown"
                if red.label_factor != (1, 1, 1)
                else "copy",
                reason="",
            )
            try:
                em_arr = open_array(ref.em_group / red.em.path)
                store = em_arr.chunk_store if em_arr.chunk_store is not None else em_arr.store
                keys = chunk_keys(em_arr, red.em_cut)
                missing = [k for k in keys if k not in store]
            except Exception as exc:  # noqa: BLE001 - unreadable EM metadata
                row.update(status=FAILED, reason=f"EM {red.em.path}: {type(exc).__name__}: {exc}")
                missing = []
            if missing:
                row.update(
                    status=FAILED,
                    reason=f"EM never fetched: {len(missing)} of {len(keys)} chunks absent in EM {red.em.path}",
                )
        except CropProblem as exc:
            row.update(status=exc.status, reason=exc.reason)
        rows.append(row)
    return rows


def plan_table(rows: list[dict[str, Any]], budget: float) -> str:
    """The ``--plan`` table (one line per crop) and a summary line with the failure budget."""
    head = f"{'case':<34} {'status':<8} {'label s0':<16} {'EM s0':<16} {'pool EM':<8} {'pool lab':<8} {'out nm':<18} {'shape':<16} reason"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "convert":
            lines.append(
                f"{r['case']:<34} {'convert':<8} {fmt_vec(r['label_s0']):<16} {fmt_vec(r['em_s0']):<16} "
                f"{'x'.join(map(str, r['em_factor'])):<8} {'x'.join(map(str, r['label_factor'])):<8} "
                f"{fmt_vec(r['spacing']):<18} {str(tuple(r['shape'])):<16} "
                + (f"drops {r['dropped_em_voxels']} EM s0 voxels" if any(r["dropped_em_voxels"]) else "")
            )
        else:
            lines.append(
                f"{r['case']:<34} {r['status']:<8} {'':<16} {'':<16} {'':<8} {'':<8} {'':<18} {'':<16} {r['reason']}"
            )
    n = {k: sum(1 for r in rows if r["status"] == k) for k in ("convert", SKIPPED, FAILED)}
    eligible = n["convert"] + n[FAILED]
    frac = n[FAILED] / eligible if eligible else 0.0
    verdict = "within" if frac <= budget else "OVER"
    lines.append(
        f"plan: {n['convert']} convert, {n[SKIPPED]} skipped, {n[FAILED]} failed "
        f"({100 * frac:.1f} % of {eligible} eligible; {verdict} the {100 * budget:g} % budget)"
    )
    return "\n".join(lines)


def _apply_flags(cfg: PipelineConfig, remote: dict[str, Any] | None) -> None:
    """``--crop-manifest``/``--chunk-cache`` over the ``convert:`` keys of the same name."""
    for key, val in (remote or {}).items():
        if val is not None:
            setattr(cfg.convert, key, str(val))


def run_plan_entry(
    config_file: Path | None,
    work_dir: Path,
    data_root: str | Path | None,
    json_out: str | None,
    remote: dict[str, Any] | None = None,
) -> int:
    """``convert --plan``: print the plan table (and JSON to ``json_out``, ``-`` = stdout); writes nothing else."""
    overrides = {"data_root": str(data_root) if data_root is not None else None}
    cfg = load_config(work_dir, config_file, overrides, dump=False)
    _apply_flags(cfg, remote)
    rows = plan_convert(cfg)
    budget = float(cfg.convert.max_failed_fraction)
    if json_out == "-":
        click.echo(json.dumps({"resolution_zyx": list(cfg.resolution_zyx), "crops": rows}, indent=2))
        return 0
    click.echo(plan_table(rows, budget))
    if json_out:
        atomic_write_text(
            Path(json_out), json.dumps({"resolution_zyx": list(cfg.resolution_zyx), "crops": rows}, indent=2) + "\n"
        )
    return 0


def default_workers() -> int:
    """CPUs this process may use (SLURM/cgroup aware through the affinity mask), at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(16, n))


def run_cache_entry(
    config_file: Path | None,
    work_dir: Path,
    data_root: str | Path | None,
    dest: Path,
    remote: dict[str, Any] | None = None,
) -> int:
    """``convert --cache-to DIR``: copy what convert reads into ``DIR`` (see :mod:`stages.convert.cache`)."""
    from stages.convert.cache import cache_tree

    overrides = {"data_root": str(data_root) if data_root is not None else None}
    cfg = load_config(work_dir, config_file, overrides, dump=False)
    _apply_flags(cfg, remote)
    root, refs, st = _planned_crops(cfg)
    summary = cache_tree(cfg, dest, refs, st)
    click.echo(summary.text())
    click.echo(f"convert offline with: python -m stages.convert --work-dir {work_dir} --data-root {dest}")
    return 0


def run_convert_entry(
    work_dir: Path,
    config_file: Path | None = None,
    data_root: str | Path | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | None = None,
    merge: bool = False,
    verbose: bool = False,
    remote: dict[str, Any] | None = None,
) -> int:
    """CLI body: set up the work dir and logging, load the config, run, print the summary.

    Returns:
        The exit code (0); errors are raised as :class:`PipelineError` subclasses.
    """
    overrides = {"data_root": str(data_root) if data_root is not None else None}
    ctx = StageContext.open(
        STAGE, work_dir, config_file, overrides, log_name=shard_label(STAGE, shard), verbose=verbose
    )
    wd, cfg = ctx.wd, ctx.cfg
    _apply_flags(cfg, remote)
    try:
        summary = run_convert(cfg, wd, workers or default_workers(), shard, merge)
    except StageFailed as exc:
        if hasattr(exc, "summary"):
            click.echo(exc.summary.text())
        raise
    click.echo(summary.text())
    return 0
