"""Ensemble memory and time: 1 vs 3 members, against a naive in-memory ensemble baseline.

The stage's memory bound is about the probability maps: each member predicts to disk
(float16) and the combination reads one member map at a time. This bench runs the real
``run_ensemble`` (NIfTI in, NIfTI + reports out) on cases of 128x128x96 voxels with
4 output channels (one float32 map = 25 MiB) with a deterministic probability predictor
(no network, so the numbers are the ensemble's own), once with 1 and once with 3
members, and measures the peak traced memory (tracemalloc: every numpy buffer) and
the peak RSS above the start. The baseline measured in the same run is the naive
ensemble (every member's float32 map of a case held at once, then mean and argmax),
which is what MONAI's in-memory ``AlgoEnsemble`` does.

Result keys: ``peak_memory_ratio_3_vs_1`` (tracemalloc; target <= 1.10),
``rss_peak_ratio_3_vs_1``, ``time_ratio_3_vs_1``, ``naive_peak_memory_ratio_3_vs_1``.
"""

from __future__ import annotations

import shutil
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

SHAPE = (128, 128, 96)
N_CASES = 3
MEMBERS = (("segresnet_0", 0.9), ("swinunetr_0", 0.8), ("dints_0", 0.7))


def _factory(member: Any, wd: Any, cfg: Any):  # noqa: ANN202
    levels = np.linspace(40, 220, len(cfg.classes) + 1).astype(np.float32)
    shift = {"segresnet_0": 0.0, "swinunetr_0": 6.0, "dints_0": -6.0}.get(member.name, 0.0)

    def predict(image: Path) -> np.ndarray:
        img = np.asarray(nib.load(str(image)).dataobj, dtype=np.float32) + shift
        p = np.empty((len(levels), *img.shape), dtype=np.float32)
        for c, lv in enumerate(levels):
            p[c] = -((img - lv) ** 2) / 480.0
        p -= p.max(axis=0, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=0, keepdims=True)
        return p

    return predict


class _Rss:
    def __init__(self) -> None:
        import psutil

        self.p = psutil.Process()
        self.base = self.p.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.p.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> _Rss:
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()


def _measure(fn) -> dict[str, float]:  # noqa: ANN001
    tracemalloc.start()
    t0 = time.perf_counter()
    with _Rss() as rss:
        fn()
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"traced_peak_mib": peak / 2**20, "rss_peak_delta_mib": (rss.peak - rss.base) / 2**20, "wall_s": wall}


def _naive(wd: Any, cfg: Any, members: list[Any], cases: list[Any]) -> None:
    """Baseline: all members' float32 maps of a case in memory, mean, argmax (MONAI-style)."""
    predictors = [_factory(m, wd, cfg) for m in members]
    for c in cases:
        preds = [p(c.image) for p in predictors]
        labels = np.argmax(np.mean(np.stack(preds), axis=0), axis=0).astype(np.uint8)
        del preds, labels


def run(work: Path) -> dict[str, Any]:
    from common.config import load_config
    from common.workdir import WorkDir
    from stages.ensemble.ensemble import find_trained_bundles, resolve_cases, run_ensemble
    from tools.synthetic import make_blobs_dataset

    shutil.rmtree(work, ignore_errors=True)
    wd = WorkDir.at(work / "wd").ensure()
    make_blobs_dataset(wd.root, n_cases=N_CASES, shape=SHAPE, n_classes=3, n_val=N_CASES, seed=0)
    wd.config_file.write_text("classes: [ecs, pm, mito_mem]\nunknown_label: 255\n")
    for name, score in MEMBERS:
        (wd.root / name).mkdir()
        (wd.root / name / "algo_object.json").write_text("{}")
        m = wd.marker(f"train.{name}")
        m.start("bench")
        m.done(best_metric=score)
    cfg = load_config(wd.root)

    def ensemble(n: int) -> None:
        shutil.rmtree(wd.ensemble_dir, ignore_errors=True)
        wd.marker("ensemble").path.unlink(missing_ok=True)
        run_ensemble(cfg, wd, n_best=n, predictor_factory=_factory)

    ensemble(1)  # warm-up: imports (matplotlib, MONAI-free paths), page cache
    res = {n: _measure(lambda n=n: ensemble(n)) for n in (1, 3)}
    trained, _ = find_trained_bundles(wd)
    ranked = sorted(trained, key=lambda m: -m.score)
    cases = resolve_cases(wd, "validation", {0})
    naive = {n: _measure(lambda n=n: _naive(wd, cfg, ranked[:n], cases)) for n in (1, 3)}
    prob_map_mib = 4 * np.prod(SHAPE) * 4 / 2**20
    return {
        "shape": list(SHAPE),
        "n_cases": N_CASES,
        "float32_prob_map_mib": round(float(prob_map_mib), 1),
        "ensemble": {str(n): {k: round(v, 2) for k, v in r.items()} for n, r in res.items()},
        "naive_in_memory": {str(n): {k: round(v, 2) for k, v in r.items()} for n, r in naive.items()},
        "peak_memory_ratio_3_vs_1": round(res[3]["traced_peak_mib"] / res[1]["traced_peak_mib"], 3),
        "rss_peak_ratio_3_vs_1": round(res[3]["rss_peak_delta_mib"] / max(res[1]["rss_peak_delta_mib"], 1e-9), 3),
        "time_ratio_3_vs_1": round(res[3]["wall_s"] / res[1]["wall_s"], 3),
        "naive_peak_memory_ratio_3_vs_1": round(naive[3]["traced_peak_mib"] / naive[1]["traced_peak_mib"], 3),
        "target_peak_memory_ratio": 1.10,
    }
