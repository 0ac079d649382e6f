"""Train benchmark: samples/s of each builtin algorithm (CPU, or CUDA with AMP when present).

Every algorithm trains the same patch size and batch on one synthetic blob work dir (made by
the real DataAnalyzer and bundlegen stage); the figure is the steady-state training
throughput of the second epoch (the first includes start-up), reported with its ratio to the
builtin segresnet measured in the same run. On a GPU machine the same script runs with AMP
and 2 data workers and adds step time, peak memory and the GPU utilisation sampled with
``nvidia-smi``. When ``CELLMAP_A3DS_OFFICIAL_TEMPLATES`` points at a local copy of the official
templates, the official segresnet trains with the same network size, patch and batch and both
``scripts/train.py`` runs are timed end to end (same epochs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ALGOS = ("segresnet", "swinunetr", "dints")
ROI = [64, 64, 32]
BATCH = 2
STEPS = 3
# the networks as the templates define them (defaults: segresnet 87 M, swinunetr 62 M, dints 45 M parameters)
NETWORK: dict[str, dict[str, Any]] = {"segresnet": {}, "swinunetr": {}, "dints": {}}


def _work(work: Path, classes: list[str]) -> Path:
    from monai.apps.auto3dseg import DataAnalyzer

    from common.config import load_config
    from common.synthetic import make_blobs_dataset
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen

    shutil.rmtree(work, ignore_errors=True)
    dl = make_blobs_dataset(work, n_cases=6, shape=(72, 72, 40), n_classes=len(classes), n_val=1, seed=0)
    DataAnalyzer(str(dl), str(work / "nifti_data"), output_path=str(work / "datastats.yaml"), device="cpu",
                 worker=0).get_all_case_stats()
    (work / "pipeline.yaml").write_text(yaml.safe_dump({"classes": classes, "unknown_label": 255, "algos": list(ALGOS)}))
    run_bundlegen(WorkDir.at(work), load_config(work))
    return work


class _GpuSampler(threading.Thread):
    """Sample ``nvidia-smi`` GPU utilisation every 0.2 s while training runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self.stop.wait(0.2)


def _train_one(bundle: Path, algo: str, cuda: bool) -> dict[str, Any]:
    from common.trainer import train_bundle

    over = {"num_epochs": 2, "num_steps_per_epoch": STEPS, "roi_size": ROI, "batch_size": BATCH,
            "num_workers": 2 if cuda else 0, "val_every": 100, "network": NETWORK[algo], "amp": True}
    shutil.rmtree(bundle / "model", ignore_errors=True)
    sampler = _GpuSampler() if cuda else None
    if sampler:
        sampler.start()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_bundle(bundle, over, device="cuda" if cuda else "cpu")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (bundle / "model" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[-1]
    out: dict[str, Any] = {
        "samples_per_s": steady["samples_per_s"],
        "step_time_s": round(BATCH / steady["samples_per_s"], 4) if steady["samples_per_s"] else None,
        "wall_s_2_epochs_with_validation": round(wall, 2),
    }
    if sampler:
        sampler.stop.set()
        sampler.join()
        out["gpu_util_mean_pct"] = round(sum(sampler.samples) / len(sampler.samples), 1) if sampler.samples else None
        out["gpu_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _official_vs_builtin(work: Path, official: Path) -> dict[str, Any]:
    """End-to-end ``scripts/train.py`` wall time, official vs builtin segresnet: same data
    (no unknown label: the official templates cannot ignore one), network size, patch, batch
    and epochs."""
    from monai.apps.auto3dseg import DataAnalyzer

    from common.config import load_config
    from common.synthetic import make_blobs_dataset
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen

    base = work.parent / (work.name + "_vs_official")
    shutil.rmtree(base, ignore_errors=True)
    data = base / "data"
    dl = make_blobs_dataset(data, n_cases=6, shape=(72, 72, 40), n_classes=3, n_val=1, seed=0, unknown_label=None)
    DataAnalyzer(str(dl), str(data / "nifti_data"), output_path=str(data / "datastats.yaml"), device="cpu",
                 worker=0).get_all_case_stats()
    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true")
    res: dict[str, Any] = {}
    for kind, extra in (("official", ["--auto_scale_allowed", "False", "--cache_rate", "0"]), ("builtin", [])):
        wd = base / kind
        shutil.copytree(data / "nifti_data", wd / "nifti_data")
        for f in ("datastats.yaml", "datastats_by_case.yaml"):
            shutil.copy(data / f, wd / f)
        (wd / "pipeline.yaml").write_text(yaml.safe_dump({
            "classes": ["ecs", "pm", "mito_mem"], "unknown_label": 0, "algos": ["segresnet"], "templates": kind,
            "official_templates_dir": str(official)}))
        run_bundlegen(WorkDir.at(wd), load_config(wd))
        bundle = wd / "segresnet_0"
        argv = [sys.executable, str(bundle / "scripts" / "train.py"), "run", "--config_file",
                str(bundle / "configs" / "hyper_parameters.yaml"), "--num_epochs", "2", "--roi_size", json.dumps(ROI),
                "--batch_size", str(BATCH), "--num_workers", "0", *extra]
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=env, capture_output=True, text=True)
        res[f"{kind}_wall_s"] = round(time.perf_counter() - t0, 2)
        res[f"{kind}_rc"] = p.returncode
        if p.returncode != 0:
            res[f"{kind}_error"] = (p.stderr or p.stdout).strip().splitlines()[-1:]
    if res.get("official_rc") == 0 and res.get("builtin_rc") == 0:
        res["builtin_over_official_wall"] = round(res["builtin_wall_s"] / res["official_wall_s"], 3)
    res["note"] = ("2 epochs over 5 training cases, each run's own validation and start-up included; "
                   "both segresnet with 32 initial filters, blocks (1,2,2,4,4)")
    return res


def run(work: Path) -> dict[str, Any]:
    """Benchmark entry point (``python -m bench.run --only train``)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cuda = torch.cuda.is_available()
    wd = _work(Path(work), ["ecs", "pm", "mito_mem"])
    per = {a: _train_one(wd / f"{a}_0", a, cuda) for a in ALGOS}
    base = per["segresnet"]["samples_per_s"]
    for a in ALGOS:
        s = per[a]["samples_per_s"]
        per[a]["ratio_to_segresnet"] = round(s / base, 3) if s and base else None
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
        "amp": cuda, "num_workers": 2 if cuda else 0, "roi_size": ROI, "batch_size": BATCH, "steps_per_epoch": STEPS,
        "networks": NETWORK, "algorithms": per,
    }
    official = os.environ.get("CELLMAP_A3DS_OFFICIAL_TEMPLATES")
    if official and Path(official).is_dir():
        out["official_segresnet"] = _official_vs_builtin(wd, Path(official))
    else:
        out["official_segresnet"] = "skipped: CELLMAP_A3DS_OFFICIAL_TEMPLATES not set"
    return out
