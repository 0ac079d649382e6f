"""Train benchmark: what the recipes learn, and samples/s of each builtin algorithm.

**Learning** (``learning``): on a synthetic set whose rarest class holds ~1 % of the known
voxels (plus a 25 % unknown slab), the same small segresnet is trained twice with the same
budget (epochs, steps, batch, patch) and seed: once with the class-balanced sampling of the
recipe (``crop_mode: classes``) and once with the former 80/20 foreground/background sampling
(``crop_mode: posneg``). The figure is the rare class's Dice pooled over the validation
cases, new / old. **DiNTS** (``dints_search``): a small dints bundle searches its topology,
trains on it, and the trained weights are checked to be those of the searched network.

**Throughput**:

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

from common import algorithms

ALGOS = algorithms.names()  # the registry's, in its order
ROI = [64, 64, 32]
BATCH = 2
STEPS = 3
# the networks as the templates define them (defaults: segresnet 87 M, swinunetr 62 M, dints 45 M parameters)
NETWORK: dict[str, dict[str, Any]] = {"segresnet": {}, "swinunetr": {}, "dints": {}}


def _work(work: Path, classes: list[str]) -> Path:
    from monai.apps.auto3dseg import DataAnalyzer

    from common.config import load_config
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen
    from tools.synthetic import make_blobs_dataset

    shutil.rmtree(work, ignore_errors=True)
    dl = make_blobs_dataset(work, n_cases=6, shape=(72, 72, 40), n_classes=len(classes), n_val=1, seed=0)
    DataAnalyzer(
        str(dl), str(work / "nifti_data"), output_path=str(work / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    (work / "pipeline.yaml").write_text(
        yaml.safe_dump({"classes": classes, "unknown_label": 255, "algos": list(ALGOS)})
    )
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
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            self.stop.wait(0.2)


def _train_one(bundle: Path, algo: str, cuda: bool) -> dict[str, Any]:
    from training.trainer import train_bundle

    over = {
        "num_epochs": 2,
        "num_steps_per_epoch": STEPS,
        "roi_size": ROI,
        "batch_size": BATCH,
        "num_workers": 2 if cuda else 0,
        "val_every": 100,
        "network": NETWORK[algo],
        "amp": True,
        "search_epochs": 0,
    }  # dints: the dense topology (the search is timed in dints_search)
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
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen
    from tools.synthetic import make_blobs_dataset

    base = work.parent / (work.name + "_vs_official")
    shutil.rmtree(base, ignore_errors=True)
    data = base / "data"
    dl = make_blobs_dataset(data, n_cases=6, shape=(72, 72, 40), n_classes=3, n_val=1, seed=0, unknown_label=None)
    DataAnalyzer(
        str(dl), str(data / "nifti_data"), output_path=str(data / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    env = dict(os.environ, MLFLOW_ALLOW_FILE_STORE="true")
    res: dict[str, Any] = {}
    for kind, extra in (("official", ["--auto_scale_allowed", "False", "--cache_rate", "0"]), ("builtin", [])):
        wd = base / kind
        shutil.copytree(data / "nifti_data", wd / "nifti_data")
        for f in ("datastats.yaml", "datastats_by_case.yaml"):
            shutil.copy(data / f, wd / f)
        (wd / "pipeline.yaml").write_text(
            yaml.safe_dump(
                {
                    "classes": ["ecs", "pm", "mito_mem"],
                    "unknown_label": 0,
                    "algos": ["segresnet"],
                    "templates": kind,
                    "official_templates_dir": str(official),
                }
            )
        )
        run_bundlegen(WorkDir.at(wd), load_config(wd))
        bundle = wd / "segresnet_0"
        argv = [
            sys.executable,
            str(bundle / "scripts" / "train.py"),
            "run",
            "--config_file",
            str(bundle / "configs" / "hyper_parameters.yaml"),
            "--num_epochs",
            "2",
            "--roi_size",
            json.dumps(ROI),
            "--batch_size",
            str(BATCH),
            "--num_workers",
            "0",
            *extra,
        ]
        t0 = time.perf_counter()
        p = subprocess.run(argv, env=env, capture_output=True, text=True)
        res[f"{kind}_wall_s"] = round(time.perf_counter() - t0, 2)
        res[f"{kind}_rc"] = p.returncode
        if p.returncode != 0:
            res[f"{kind}_error"] = (p.stderr or p.stdout).strip().splitlines()[-1:]
    if res.get("official_rc") == 0 and res.get("builtin_rc") == 0:
        res["builtin_over_official_wall"] = round(res["builtin_wall_s"] / res["official_wall_s"], 3)
    res["note"] = (
        "2 epochs over 5 training cases, each run's own validation and start-up included; "
        "both segresnet with 32 initial filters, blocks (1,2,2,4,4)"
    )
    return res


RARE_CLASSES = ["ecs", "pm", "mito_ribo"]  # id 3 is the rare one
LEARN_TRAIN = {
    "num_epochs": 40,
    "num_steps_per_epoch": 5,
    "roi_size": [24, 24, 16],
    "batch_size": 2,
    "num_workers": 0,
    "val_every": 40,
    "learning_rate": 0.01,
    "augment": "flips",
    "seed": 0,
    "cache_rate": 1.0,
    "network": {"init_filters": 8, "blocks_down": [1, 1], "dsdepth": 2},
}


def _rare_class_work(work: Path) -> Path:
    """6 cases of 96x96x48 voxels (large against the 24x24x16 patch, like real crops): two common
    classes, one ~1 % class in small scattered blobs, a 25 % unknown slab."""
    import numpy as np
    from monai.apps.auto3dseg import DataAnalyzer

    from common.config import load_config
    from common.io import atomic_write_json
    from common.nifti import save_nifti, spacing_affine
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen

    shutil.rmtree(work, ignore_errors=True)
    out = work / "nifti_data"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (96, 96, 48)
    grid = np.indices(shape, dtype=np.float32)
    items = []
    for i in range(6):
        lab = np.zeros(shape, np.uint8)
        for cid, n, (rlo, rhi) in ((1, 5, (12, 18)), (2, 6, (8, 12)), (3, 12, (3.0, 4.5))):
            for _ in range(n):
                c = [rng.uniform(0.15 * s, 0.85 * s) for s in shape]
                r = rng.uniform(rlo, rhi)
                lab[sum((grid[a] - c[a]) ** 2 for a in range(3)) <= r * r] = cid
        img = np.array([60.0, 140.0, 200.0, 100.0], np.float32)[lab] + rng.normal(0, 10, shape).astype(np.float32)
        lab[:, :, :12] = 255
        aff = spacing_affine((8.0, 8.0, 8.0), (0.0, 0.0, 0.0))
        save_nifti(out / f"rare{i}_image.nii.gz", img, aff)
        save_nifti(out / f"rare{i}_label.nii.gz", lab, aff)
        items.append({"image": f"rare{i}_image.nii.gz", "label": f"rare{i}_label.nii.gz", "fold": 0 if i < 2 else 1})
    atomic_write_json(out / "datalist.json", {"training": items, "testing": []})
    DataAnalyzer(
        str(out / "datalist.json"), str(out), output_path=str(work / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    (work / "pipeline.yaml").write_text(
        yaml.safe_dump({"classes": RARE_CLASSES, "unknown_label": 255, "algos": ["segresnet", "dints"]})
    )
    run_bundlegen(WorkDir.at(work), load_config(work))
    return work


def _pooled_dice(bundle: Path, work: Path) -> list[float]:
    """Per-class Dice over all validation (fold 0) cases, counts pooled, unknown excluded."""
    import nibabel as nib
    import numpy as np

    from training.trainer import BundlePredictor

    dl = json.loads((work / "nifti_data" / "datalist.json").read_text())["training"]
    pred = BundlePredictor(bundle, device="cpu")
    n = len(RARE_CLASSES) + 1
    m = np.zeros((n, n))
    for it in (x for x in dl if x["fold"] == 0):
        p = np.asarray(pred.infer(str(work / "nifti_data" / it["image"])).argmax(0))
        g = np.asarray(nib.load(str(work / "nifti_data" / it["label"])).dataobj).astype(int)
        k = g < n
        m += np.bincount(g[k] * n + p[k], minlength=n * n).reshape(n, n)
    return [round(float(2 * m[c, c] / max(1.0, m[c].sum() + m[:, c].sum())), 4) for c in range(1, n)]


def learning(work: Path) -> dict[str, Any]:
    """Rare-class Dice, class-balanced vs 80/20 sampling (same budget and seed), and the DiNTS search."""
    import numpy as np

    from common.io import read_json
    from training.networks import build_network, dints_dense_code
    from training.trainer import train_bundle

    wd = _rare_class_work(Path(work))
    shares = yaml.safe_load((wd / "segresnet_0" / "configs" / "hyper_parameters.yaml").read_text())["class_shares"]
    res: dict[str, Any] = {
        "class_shares": shares,
        "budget": {k: v for k, v in LEARN_TRAIN.items() if k != "network"},
        "network": LEARN_TRAIN["network"],
    }
    for mode in ("classes", "posneg"):
        shutil.rmtree(wd / "segresnet_0" / "model", ignore_errors=True)
        t0 = time.perf_counter()
        train_bundle(wd / "segresnet_0", {**LEARN_TRAIN, "crop_mode": mode}, device="cpu")
        res[mode] = {
            "dice_per_class": dict(zip(RARE_CLASSES, _pooled_dice(wd / "segresnet_0", wd))),
            "train_s": round(time.perf_counter() - t0, 1),
        }
    new, old = res["classes"]["dice_per_class"]["mito_ribo"], res["posneg"]["dice_per_class"]["mito_ribo"]
    res["rare_class"] = {
        "name": "mito_ribo",
        "share_of_known": shares[3],
        "dice_class_balanced": new,
        "dice_80_20": old,
        "ratio_new_over_old": round(new / old, 3) if old > 0 else None,
    }
    # DiNTS: search, train on the searched topology, check the trained weights are that network's
    dints_train = {
        **LEARN_TRAIN,
        "num_epochs": 4,
        "search_epochs": 4,
        "roi_size": [32, 32, 16],
        "val_every": 4,
        "network": {"num_blocks": 4, "num_depths": 3, "channel_mul": 0.5, "search_channel_mul": 0.5},
    }
    shutil.rmtree(wd / "dints_0" / "model", ignore_errors=True)
    t0 = time.perf_counter()
    train_bundle(wd / "dints_0", dints_train, device="cpu")
    arch = read_json(wd / "dints_0" / "model" / "arch_code.json")
    final = torch.load(wd / "dints_0" / "model" / "model_final.pt", weights_only=True)
    keys = set(final["state_dict"])
    dense = {**final["config"], "network": {**final["config"]["network"], "arch_code": dints_dense_code(4, 3)}}
    code_a = np.asarray(arch["arch_code"]["code_a"])
    res["dints_search"] = {
        "search_epochs": arch["search_epochs"],
        "warmup_epochs": arch["warmup_epochs"],
        "active_paths": int(code_a.sum()),
        "possible_paths": int(code_a.size),
        "code_a": arch["arch_code"]["code_a"],
        "node_a": arch["arch_code"]["node_a"],
        "trained_config_holds_searched_code": final["config"]["network"]["arch_code"] == arch["arch_code"],
        "trained_weights_match_searched_network": keys == set(build_network(final["config"]).state_dict()),
        "trained_weights_match_dense_network": keys == set(build_network(dense).state_dict()),
        "search_and_train_s": round(time.perf_counter() - t0, 1),
        "dice_per_class": dict(zip(RARE_CLASSES, _pooled_dice(wd / "dints_0", wd))),
    }
    return res


def run(work: Path) -> dict[str, Any]:
    """Benchmark entry point (``python -m bench.run --only train``); ``CELLMAP_BENCH_TRAIN=learning``
    runs only the learning part."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    learn = learning(Path(work) / "learning")
    if os.environ.get("CELLMAP_BENCH_TRAIN") == "learning":
        return {"learning": learn}
    cuda = torch.cuda.is_available()
    wd = _work(Path(work), ["ecs", "pm", "mito_mem"])
    per = {a: _train_one(wd / f"{a}_0", a, cuda) for a in ALGOS}
    base = per["segresnet"]["samples_per_s"]
    for a in ALGOS:
        s = per[a]["samples_per_s"]
        per[a]["ratio_to_segresnet"] = round(s / base, 3) if s and base else None
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"cpu ({os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
        "amp": cuda,
        "num_workers": 2 if cuda else 0,
        "roi_size": ROI,
        "batch_size": BATCH,
        "steps_per_epoch": STEPS,
        "networks": NETWORK,
        "algorithms": per,
        "learning": learn,
    }
    official = os.environ.get("CELLMAP_A3DS_OFFICIAL_TEMPLATES")
    if official and Path(official).is_dir():
        out["official_segresnet"] = _official_vs_builtin(wd, Path(official))
    else:
        out["official_segresnet"] = "skipped: CELLMAP_A3DS_OFFICIAL_TEMPLATES not set"
    return out
