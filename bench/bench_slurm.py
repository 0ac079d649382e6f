"""SLURM orchestration overhead on the local single-node cluster.

Measures: cluster bring-up; the same 5-job chain (analyze, bundlegen, 2 trains, ensemble; the
small stand-in stages of ``tests/slurm_fakestage.py``) run directly one after another (baseline)
and through ``slurm.submit`` with afterok dependencies; the delay of a self-requeue (checkpoint
written -> the job runs again).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _wd(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / "pipeline.yaml").write_text("classes: [ecs, mito_mem]\nalgos: [segresnet, dints]\n")
    (path / "fake_train.json").write_text(json.dumps({"steps": 4, "step_s": 0.25}))
    return path


def _wait(names: list[str], wd: Path, timeout: float = 300) -> dict[str, dict[str, str]]:
    from common.workdir import WorkDir
    from slurm.jobs import TERMINAL, job_state, read_jobs

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        states = {j["name"]: job_state(j["job_id"]) or {"state": "?"} for j in read_jobs(WorkDir.at(wd))}
        if set(names) <= set(states) and all(s["state"] in TERMINAL for s in states.values()):
            return states
        time.sleep(0.2)
    raise RuntimeError(f"chain did not finish in {timeout}s")


def run(work: Path) -> dict[str, Any]:
    from slurm.submit import submit_chain

    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CELLMAP_SLURM_ROOT": str(work / "cluster"),
        "CELLMAP_SLURM_PORT": "16917",
        "PYTHONPATH": str(ROOT),
    }
    script = str(ROOT / "slurm" / "localcluster.sh")
    t0 = time.perf_counter()
    subprocess.run(["bash", script, "start"], env=env, check=True, capture_output=True)
    up_s = time.perf_counter() - t0
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(work / "cluster" / "etc" / "slurm.conf")
    try:
        names = ["analyze", "bundlegen", "train.segresnet_0", "train.dints_0", "ensemble"]
        # baseline: the same stage commands, directly and sequentially
        base = _wd(work / "direct")
        t0 = time.perf_counter()
        for argv in (
            ["analyze"],
            ["bundlegen"],
            ["train", "--algo", "segresnet"],
            ["train", "--algo", "dints"],
            ["ensemble"],
        ):
            subprocess.run(
                [sys.executable, "-m", "tests.slurm_fakestage", argv[0], "--work-dir", str(base), *argv[1:]],
                env=env,
                check=True,
                cwd=ROOT,
            )
        direct_s = time.perf_counter() - t0
        # through SLURM (native runner, a python stand-in that runs the fake stages)
        py = work / "stagepython"
        py.write_text(
            f'#!/bin/bash\nexport PYTHONPATH={ROOT}\nexec {sys.executable} -m tests.slurm_fakestage "${{2#stages.}}" "${{@:3}}"\n'
        )
        py.chmod(0o755)
        prof = work / "bench.yaml"
        prof.write_text(
            f"cluster: local\nrunner: native\npython: {py}\nrequeue_margin_s: 60\n"
            "defaults: {partition: batch, cpus: 1, mem: 1G, time: '00:10:00'}\n"
        )
        wd = _wd(work / "chain")
        t0 = time.perf_counter()
        submit_chain(wd, str(prof), from_stage="analyze", echo=lambda s: None, preflight=False)
        states = _wait(names, wd)
        slurm_s = time.perf_counter() - t0
        ok = all(s["state"] == "COMPLETED" for s in states.values())
        # requeue delay: checkpoint -> rerun of the same job id
        rq = _wd(work / "requeue")
        (rq / "fake_train.json").write_text(json.dumps({"steps": 20, "step_s": 0.25}))
        ids = submit_chain(rq, str(prof), from_stage="train", algos=["segresnet"], echo=lambda s: None, preflight=False)
        log = rq / "fake_runs.log"
        while "resume step=0" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", ids["train.segresnet_0"]], check=True)
        _wait(["train.segresnet_0", "ensemble"], rq)
        lines = log.read_text().splitlines()
        t_ckpt = float(next(ln for ln in lines if "checkpoint" in ln).split()[0])
        t_rerun = float(next(ln for ln in lines if "restart=1" in ln).split()[0])
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
    return {
        "cluster_up_s": round(up_s, 2),
        "chain_jobs": len(names),
        "chain_all_completed": ok,
        "direct_sequential_s": round(direct_s, 2),
        "slurm_chain_s": round(slurm_s, 2),
        "slurm_over_direct_ratio": round(slurm_s / direct_s, 2),
        "overhead_per_job_s": round((slurm_s - direct_s) / len(names), 2),
        "requeue_delay_s": round(t_rerun - t_ckpt, 2),
    }
