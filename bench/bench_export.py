"""Export memory: block-wise vs whole-crop, on the largest real test crop geometry.

The largest real test crops are 983 and 985 (32 nm, 1000^3 voxels): at a training
resolution of 8 nm that is 4000^3 = 6.4e10 training voxels, far beyond any node's memory
if predicted in one piece. This bench keeps crop 985's real dataset (jrc_mus-kidney, EM s0
8 nm), voxel size and translation and grows the shape (``SIZES`` voxels per axis at 32 nm),
then runs the real ``run_export`` in a fresh process per size, twice:

* **block-wise** (the stage's default path): ``export_block`` training voxels per block
  edge, a halo of context;
* **whole crop** (the baseline, what the export did before): one block holding the whole
  crop (``export_block`` larger than the crop).

The predictor is a deterministic function of the EM (soft bands of intensity, 5 channels;
no network, so the memory is the export's own). Peak RSS is the child's ``VmHWM``
minus its RSS just before the export (imports excluded); ``VmHWM``, not ``ru_maxrss``,
which a forked child inherits from its parent.

Result keys: per size ``blockwise_peak_mib`` / ``whole_peak_mib``; ``rss_growth_blockwise``
(peak at the largest size / smallest; target ~1: bounded), ``rss_growth_whole``,
``block_budget_mib`` (what one window needs by construction), ``blockwise_peak_vs_budget``,
and ``whole_crop_985_estimate_gib`` (the baseline's bytes per training voxel times the real
crop's 6.4e10 training voxels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = (12, 24, 48)  # manifest voxels per axis at 32 nm (x4 training voxels at 8 nm)
BLOCK_T = 32
HALO = 8
CLASSES = ["ecs", "pm", "mito_mem", "mito_lum"]
ROW_CLASSES = ["ecs", "pm", "mito"]  # mito: a group (union) and an instance class


def band_factory(member: Any, wd: Any, cfg: Any):  # noqa: ANN201
    """Array predictor: softmax over distance to 5 grey levels (deterministic, EM-dependent)."""
    levels = np.linspace(60, 200, len(cfg.classes) + 1).astype(np.float32)

    def predict(em: np.ndarray, win: Any) -> np.ndarray:
        p = np.empty((len(levels), *em.shape), dtype=np.float32)
        for c, lv in enumerate(levels):
            p[c] = -((em - lv) ** 2) / 400.0
        p -= p.max(axis=0, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=0, keepdims=True)
        return p

    return predict


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """This process's peak RSS (``VmHWM``: per address space, so not inherited through fork
    from the parent, unlike ``ru_maxrss``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(work: str, data: str, manifest: str, block: int) -> None:
    """Run one export in this process and print its peak RSS delta as JSON."""
    import numcodecs  # noqa: F401 - imported before measuring: their size is not the export's
    import scipy.ndimage  # noqa: F401
    import scipy.sparse.csgraph  # noqa: F401
    import zarr  # noqa: F401

    from common.config import load_config
    from common.workdir import WorkDir
    from stages.ensemble.export import run_export
    from tests.test_ensemble import add_trained_bundle

    wd = WorkDir.at(work).ensure()
    wd.config_file.write_text(
        f"classes: [{', '.join(CLASSES)}]\ndata_root: {data}\n"
        f"ensemble: {{export_block: {block}, export_halo: {HALO}}}\n"
    )
    add_trained_bundle(wd, "segresnet_0", 0.9)
    (wd.root / "segresnet_0" / "cellmap_bundle.json").write_text(json.dumps({"resolution_nm": [8]}))
    before = _rss_bytes()
    t0 = time.perf_counter()
    s = run_export(load_config(wd.root), wd, manifest, array_predictor_factory=band_factory)
    wall = time.perf_counter() - t0
    peak = _hwm_bytes()
    print(
        json.dumps(
            {"peak_delta": max(0, peak - before), "wall_s": wall, "n_written": s["n_written"], "failed": s["failed"]}
        )
    )


def _measure(work: Path, data: Path, manifest: Path, block: int) -> dict[str, Any]:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.bench_export import child; child({str(work)!r}, {str(data)!r}, {str(manifest)!r}, {block:d})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n_written"] == len(ROW_CLASSES) and not out["failed"], out
    return out


def run(work: Path) -> dict[str, Any]:
    import dataclasses
    import shutil

    from tests.export_realgeom import build_tree, real_test_crops, write_manifest

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    real = next(c for c in real_test_crops() if c.crop == "985")
    rows = []
    for n in SIZES:
        crop = dataclasses.replace(real, shape=(n, n, n))
        data = build_tree(work / f"data{n}", [crop], margin_nm=(HALO + 2) * 8.0)
        manifest = work / f"m{n}.csv"
        write_manifest(manifest, [crop], lambda _: ROW_CLASSES)
        t_edge = n * 4
        b = _measure(work / f"bw{n}", data, manifest, BLOCK_T)
        w = _measure(work / f"whole{n}", data, manifest, t_edge + 8)
        rows.append(
            {
                "manifest_shape": [n] * 3,
                "training_voxels": t_edge**3,
                "blockwise_peak_mib": round(b["peak_delta"] / 2**20, 1),
                "blockwise_wall_s": round(b["wall_s"], 2),
                "whole_peak_mib": round(w["peak_delta"] / 2**20, 1),
                "whole_wall_s": round(w["wall_s"], 2),
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(work / f"data{n}", ignore_errors=True)
    window = (BLOCK_T + 2 * HALO + 2) ** 3
    # one window: EM float32, each member's probabilities and the running sum (C float32 each),
    # the resampled output block and its labels/masks
    budget = window * (4 + 3 * (len(CLASSES) + 1) * 4) + (BLOCK_T // 4) ** 3 * (len(CLASSES) + 1) * 4
    per_t_voxel_whole = (
        (rows[-1]["whole_peak_mib"] - rows[0]["whole_peak_mib"])
        * 2**20
        / max(1, rows[-1]["training_voxels"] - rows[0]["training_voxels"])
    )
    return {
        "crop": "985 (jrc_mus-kidney, 32 nm, real 1000^3; training 8 nm)",
        "block_t": BLOCK_T,
        "halo": HALO,
        "classes": CLASSES,
        "rows": rows,
        "rss_growth_blockwise": round(rows[-1]["blockwise_peak_mib"] / max(rows[0]["blockwise_peak_mib"], 1e-3), 2),
        "rss_growth_whole": round(rows[-1]["whole_peak_mib"] / max(rows[0]["whole_peak_mib"], 1e-3), 2),
        "training_voxels_growth": rows[-1]["training_voxels"] / rows[0]["training_voxels"],
        "block_budget_mib": round(budget / 2**20, 1),
        "blockwise_peak_vs_budget": round(rows[-1]["blockwise_peak_mib"] * 2**20 / budget, 2),
        "whole_crop_985_estimate_gib": round(per_t_voxel_whole * 4000**3 / 2**30, 1),
    }
