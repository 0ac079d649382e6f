"""Benchmark of the analyze stage: 1 vs 2 worker processes, sharded vs unsharded.

All runs analyse the same blob dataset in this process (MONAI imported once up front, as
in a long stage run), so the ratios compare the analysis itself. The baseline is the
1-worker unsharded run measured in the same call.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

N_CASES = int(os.environ.get("BENCH_ANALYZE_CASES", "32"))  # >= 16; 32 amortises pool start-up
SHAPE = (128, 128, 80)
ROUNDS = 3


CPU_USED: dict[str, list[float]] = {}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the forked workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn, *args, tag: str = "", **kwargs) -> float:  # noqa: ANN001 - any callable
    c0, t0 = _cpu_s(), time.perf_counter()
    fn(*args, **kwargs)
    wall = time.perf_counter() - t0
    if tag:  # cores this run actually got: on a busy shared machine well below the workers asked
        CPU_USED.setdefault(tag, []).append(round((_cpu_s() - c0) / wall, 2))
    return wall


def run(work: Path) -> dict:
    """Time the analysis of ``N_CASES`` cases with 1 and 2 workers, and as 2 shards + merge."""
    import monai.apps.auto3dseg  # noqa: F401 - import cost is not part of the comparison

    from common.config import load_config
    from common.workdir import WorkDir
    from stages.analyze.analyze import run_analyze
    from tools.synthetic import make_blobs_dataset

    shutil.rmtree(work, ignore_errors=True)
    wd = WorkDir.at(work / "wd").ensure()
    make_blobs_dataset(wd.root, n_cases=N_CASES, shape=SHAPE, n_classes=3, n_val=4, seed=0)
    (wd.root / "pipeline.yaml").write_text("classes: [ecs, pm, mito_mem]\nunknown_label: 255\n")
    cfg = load_config(wd.root)

    CPU_USED.clear()
    load_before = os.getloadavg()[0]
    run_analyze(wd, cfg, workers=1, force=True)  # warm-up: page cache, lazy imports
    # interleaved rounds, best of each: other jobs on a shared machine hit both sides alike
    t1s, t2s = [], []
    for _ in range(ROUNDS):
        t1s.append(_timed(run_analyze, wd, cfg, workers=1, force=True, tag="1_worker"))
        t2s.append(_timed(run_analyze, wd, cfg, workers=2, force=True, tag="2_workers"))
    t1, t2 = min(t1s), min(t2s)
    shard_times = [_timed(run_analyze, wd, cfg, shard=(i, 2), force=True) for i in range(2)]
    t_merge = _timed(run_analyze, wd, cfg, merge=True, force=True)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "cases": N_CASES,
        "case_shape_xyz": list(SHAPE),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "cores_used_per_round": CPU_USED,
        "rounds_s": {"1_worker": [round(x, 3) for x in t1s], "2_workers": [round(x, 3) for x in t2s]},
        "wall_s": {
            "unsharded_1_worker": round(t1, 3),
            "unsharded_2_workers": round(t2, 3),
            "shard_0_of_2": round(shard_times[0], 3),
            "shard_1_of_2": round(shard_times[1], 3),
            "merge": round(t_merge, 3),
        },
        "speedup_2_workers": round(t1 / t2, 3),
        # two shards run side by side as a SLURM array, then the merge job
        "speedup_2_shards_parallel": round(t1 / (max(shard_times) + t_merge), 3),
        # the same shards run one after the other: the overhead of sharding
        "sharded_sequential_over_unsharded": round((sum(shard_times) + t_merge) / t1, 3),
        "target_speedup_2_workers": 1.7,
    }
