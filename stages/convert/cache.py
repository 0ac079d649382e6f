"""``convert --cache-to DIR``: copy exactly what convert will read into a local tree.

For clusters whose compute nodes have no internet: run this on a login node against the
remote ``data_root``, then convert offline with ``--data-root DIR``. The tree has the
same layout as the source (``<ds>/<ds>.zarr/recon-1/...``), so the offline convert plans
and writes exactly what the remote convert would (same NIfTI bytes, same datalist).

What is copied, per crop:

* metadata convert reads: the EM group's ``.zattrs`` and every EM level's ``.zarray``;
  the crop group's ``.zattrs``; for each label array the crop has (listed, or named by the
  manifest): its ``.zattrs`` and every level's ``.zarray`` (+ the levels' ``.zattrs``);
* data: the EM s0 chunks under the crop's cut (convert reduces from EM s0; no context
  padding is used today) and every chunk of the label arrays convert reads at label s0
  (``all`` if present, else the configured classes).

Copies are resumable: a file already in the tree (written atomically) is not fetched again.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import PipelineConfig
from common.ngff import chunk_keys, read_multiscales
from common.progress import progress_bar
from common.store import RemotePath, open_array
from common.store import path as store_path
from stages.convert.crops import (
    EM_GROUP,
    GT_GROUP,
    CropProblem,
    CropRef,
    Settings,
    _label_names,
    arrays_read,
    plan_crop,
)

log = logging.getLogger("cellmap.convert")
COPY_THREADS = 16  # concurrent requests per crop (latency-bound, not CPU-bound)


@dataclass
class CacheSummary:
    """What ``cache_tree`` copied.

    Attributes:
        crops: crops whose chunks were copied.
        not_planned: ``case: reason`` of crops convert would skip or fail (metadata copied only).
        files: files written now; bytes: their size; reused: files already there.
    """

    crops: int = 0
    not_planned: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    reused: int = 0
    seconds: float = 0.0

    def text(self) -> str:
        lines = [
            f"cache: {self.crops} crops, {self.files} files ({self.bytes / 2**20:.1f} MiB) fetched, "
            f"{self.reused} already there, {self.seconds:.1f} s"
        ]
        lines += [f"  not planned {r}" for r in self.not_planned]
        return "\n".join(lines)


def _write(dst: Path, data: bytes) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".tmp-{os.getpid()}-{dst.name}")
    tmp.write_bytes(data)
    os.replace(tmp, dst)


class _Copier:
    def __init__(self, summary: CacheSummary) -> None:
        self.s = summary

    def file(self, src: Path | RemotePath, dst: Path, optional: bool = False) -> None:
        if dst.is_file():
            self.s.reused += 1
            return
        try:
            data = src.read_bytes()
        except FileNotFoundError:
            if optional:
                return
            raise
        _write(dst, data)
        self.s.files += 1
        self.s.bytes += len(data)

    def chunks(self, arr: Any, keys: list[str], dst_dir: Path) -> None:
        store = arr.chunk_store if arr.chunk_store is not None else arr.store
        todo = [k for k in keys if not (dst_dir / k).is_file()]
        self.s.reused += len(keys) - len(todo)

        def one(key: str) -> int:
            try:
                data = store[key]
            except KeyError:  # absent in the source too: reads as the fill value there and here
                return 0
            _write(dst_dir / key, bytes(data))
            return len(data)

        with ThreadPoolExecutor(COPY_THREADS) as pool:
            for n in pool.map(one, todo):
                if n:
                    self.s.files += 1
                    self.s.bytes += n

    def group(self, src: Path | RemotePath, dst: Path) -> list[str]:
        """A multiscale group's metadata; returns its level paths."""
        self.file(src / ".zattrs", dst / ".zattrs")
        self.file(src / ".zgroup", dst / ".zgroup", optional=True)
        levels = read_multiscales(src)
        for lv in levels:
            self.file(src / lv.path / ".zarray", dst / lv.path / ".zarray")
            self.file(src / lv.path / ".zattrs", dst / lv.path / ".zattrs", optional=True)
        return [lv.path for lv in levels]


def cache_tree(
    cfg: PipelineConfig, dest: Path, refs: list[CropRef], st: Settings, progress: bool = True
) -> CacheSummary:
    """Copy what converting ``refs`` with ``st`` reads into ``dest`` (same layout as the source)."""
    t0 = time.perf_counter()
    summary = CacheSummary()
    cp = _Copier(summary)
    em_done: set[str] = set()
    bar = progress_bar(total=len(refs), desc="cache", unit="crop", enabled=progress)
    for ref in refs:
        zdst = Path(dest) / ref.dataset / f"{ref.dataset}.zarr"
        src_zarr = store_path(ref.zarr_root)
        if ref.zarr_root not in em_done:
            try:
                cp.group(src_zarr / EM_GROUP, zdst / EM_GROUP)
            except Exception as exc:  # noqa: BLE001 - the offline convert reports this crop's EM problem itself
                log.warning("%s: EM metadata not copied: %s", ref.dataset, exc)
            em_done.add(ref.zarr_root)
        gdst = zdst / GT_GROUP / f"crop{ref.crop}"
        cp.file(ref.group / ".zattrs", gdst / ".zattrs", optional=True)
        cp.file(ref.group / ".zgroup", gdst / ".zgroup", optional=True)
        try:
            for name in _label_names(ref, st):
                cp.group(ref.group / name, gdst / name)
            plan = plan_crop(ref, st)
        except CropProblem as exc:
            summary.not_planned.append(f"{ref.case}: {exc.reason}")
            bar.update()
            continue
        except Exception as exc:  # noqa: BLE001 - malformed metadata: the offline plan names it
            summary.not_planned.append(f"{ref.case}: {type(exc).__name__}: {exc}")
            bar.update()
            continue
        em = open_array(ref.em_group / plan.em_level.path)
        cp.chunks(em, chunk_keys(em, plan.cut), zdst / EM_GROUP / plan.em_level.path)
        for name in arrays_read(plan):
            lv = plan.arrays[name]
            arr = open_array(ref.group / name / lv.path)
            cp.chunks(arr, chunk_keys(arr, [slice(0, n) for n in arr.shape]), gdst / name / lv.path)
        summary.crops += 1
        bar.update()
    bar.close()
    summary.seconds = round(time.perf_counter() - t0, 2)
    return summary
