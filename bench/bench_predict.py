"""``stages.predict`` memory and throughput on a volume many times the per-block budget.

A dense 4 nm EM volume (``SHAPE``) is predicted at an 8 nm training resolution (2x2x2
block mean in, probabilities interpolated back to 4 nm, argmax) by the real
``run_predict`` in a fresh process, block-wise (``BLOCK_T`` training voxels per block edge,
``HALO`` of context) and, as the baseline, in one block. The predictor is pointwise
(softmax over grey levels, 5 channels; no network, so memory and time are the stage's
own). Peak RSS is the child's ``VmHWM`` above its RSS before the run.

Result keys: ``volume_vs_block_budget`` (input voxels x bytes / budget; >= 8 wanted),
``blockwise_peak_mib``, ``block_budget_mib``, ``blockwise_peak_vs_budget``,
``whole_peak_mib``, ``voxels_per_s`` (input voxels per second, block-wise, 1 CPU thread),
``blockwise_equals_whole`` (labels identical).
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
SHAPE = (160, 192, 192)  # 4 nm voxels
E0 = (4.0, 4.0, 4.0)
BLOCK_T = 32
HALO = 8
N_CLASSES = 5


def band(bundle: Any, wd: Any):  # noqa: ANN201
    levels = np.linspace(60, 200, N_CLASSES).astype(np.float32)

    def predict(em: np.ndarray, win: Any) -> np.ndarray:
        p = np.empty((N_CLASSES, *em.shape), dtype=np.float32)
        for c, lv in enumerate(levels):
            p[c] = -((em - lv) ** 2) / 400.0
        p -= p.max(axis=0, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=0, keepdims=True)
        return p

    return predict


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def child(work: str, group: str, out: str, block: int) -> None:
    import numcodecs  # noqa: F401 - imported before measuring
    import zarr  # noqa: F401

    from stages.predict.predict import run_predict

    before = _rss()
    t0 = time.perf_counter()
    s = run_predict(work, group, out, block_t=block, halo=HALO, array_predictor_factory=band)
    print(json.dumps({"peak": max(0, _hwm() - before), "wall_s": time.perf_counter() - t0, "n_blocks": s["n_blocks"]}))


def _measure(work: Path, group: Path, out: Path, block: int) -> dict[str, Any]:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.bench_predict import child; child({str(work)!r}, {str(group)!r}, {str(out)!r}, {block:d})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(work: Path) -> dict[str, Any]:
    import shutil

    import zarr

    from common.ngff import Level, multiscales_attrs
    from common.workdir import WorkDir
    from tests.export_realgeom import em_value
    from tests.test_ensemble import add_trained_bundle

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    wd = WorkDir.at(work / "work").ensure()
    add_trained_bundle(wd, "segresnet_0", 0.5)
    (wd.root / "segresnet_0" / "cellmap_bundle.json").write_text(
        json.dumps({"resolution_nm": [8], "output_classes": N_CLASSES})
    )
    group = work / "em.zarr"
    g = zarr.open_group(str(group), mode="w")
    arr = g.create_dataset("s0", shape=SHAPE, chunks=(64, 64, 64), dtype=np.uint8)
    for z0 in range(0, SHAPE[0], 32):
        z = (np.arange(z0, min(z0 + 32, SHAPE[0])) * E0[0])[:, None, None]
        y = (np.arange(SHAPE[1]) * E0[1])[None, :, None]
        x = (np.arange(SHAPE[2]) * E0[2])[None, None, :]
        arr[z0 : z0 + z.shape[0]] = em_value(z, y, x)
    g.attrs.update(multiscales_attrs([Level("s0", E0, (0.0, 0.0, 0.0), SHAPE)]))
    b = _measure(wd.root, group, work / "blockwise", BLOCK_T)
    w = _measure(wd.root, group, work / "whole", max(SHAPE) // 2 + 8)
    same = bool(
        (zarr.open_array(str(work / "blockwise" / "s0"))[...] == zarr.open_array(str(work / "whole" / "s0"))[...]).all()
    )
    window = (BLOCK_T + 2 * HALO + 2) ** 3
    budget = window * 8 * 1 + window * (4 + 3 * N_CLASSES * 4) + (2 * BLOCK_T) ** 3 * N_CLASSES * 4 * 2
    voxels = int(np.prod(SHAPE))
    # what a one-shot prediction of the volume needs in the same terms (float32 probabilities, 2 copies)
    volume_bytes = voxels // 8 * (4 + 3 * N_CLASSES * 4) + voxels * (1 + N_CLASSES * 4 * 2)
    return {
        "shape": list(SHAPE),
        "voxel_nm": list(E0),
        "training_nm": [8, 8, 8],
        "block_t": BLOCK_T,
        "halo": HALO,
        "n_blocks": b["n_blocks"],
        "block_budget_mib": round(budget / 2**20, 1),
        "volume_vs_block_budget": round(volume_bytes / budget, 1),
        "blockwise_peak_mib": round(b["peak"] / 2**20, 1),
        "whole_peak_mib": round(w["peak"] / 2**20, 1),
        "blockwise_peak_vs_budget": round(b["peak"] / budget, 2),
        "voxels_per_s": round(voxels / b["wall_s"]),
        "whole_voxels_per_s": round(voxels / w["wall_s"]),
        "blockwise_equals_whole": same,
    }
