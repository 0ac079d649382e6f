"""GPU check anyone with a GPU can run: ``make gpu-check`` / ``python -m bench.gpu``.

Per builtin algorithm, at the bundle's own patch (``roi_size``) and ``batch_size`` (bundlegen
sizes them for ``target_gpu_mem_gb``), and per autocast precision (fp16 with a GradScaler, bf16):

* **compute**: N training steps (network, masked loss, AMP, optimizer) on a batch already on the
  GPU: samples/s, peak GPU memory against ``target_gpu_mem_gb``, GPU busy % (NVML, sampled);
* **loader**: N steps fed by the trainer's real data pipeline (NIfTI loading, crops,
  augmentations, the bundle's ``num_workers``): samples/s and busy %. ``loader_vs_compute`` near 1
  means data loading is not the bottleneck;
* one **official segresnet epoch** through ``python -m stages.train`` when the official templates
  are available (``CELLMAP_A3DS_OFFICIAL_TEMPLATES``, set in the train image);
* a ``--gpus 2`` **DDP smoke** (torchrun, NCCL) when two GPUs are visible.

Data: the bundles of ``--work-dir`` when given (a real work dir after bundlegen: real crops,
real sizing), else a synthetic blob work dir made under ``--scratch``. The train image carries
this module: ``apptainer exec --nv train.sif python -m bench.gpu --work-dir W --out W/gpu.json``. ``--cpu`` is the reduced mode the tests
run (tiny network and patch, fp32 + bf16 on the CPU, no official/DDP runs): it checks the
harness, not a GPU. JSON to ``bench/results/gpu.json`` plus a table (``gpu.md``) and a plot
(``gpu.png``).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import algorithms

ROOT = Path(__file__).resolve().parents[1]
ALGOS = algorithms.names()  # the registry's, in its order
CLASSES = ["ecs", "pm", "mito_mem"]
#: --cpu: a network and patch small enough for a CI core (each factory reads its own keys).
TINY = {
    "roi_size": [32, 32, 16],
    "batch_size": 1,
    "num_workers": 0,
    "network": {
        "init_filters": 8,
        "blocks_down": [1, 2, 2, 4],
        "feature_size": 12,
        "num_blocks": 2,
        "num_depths": 3,
        "channel_mul": 0.25,
    },
}


class BusySampler:
    """GPU utilisation (NVML ``nvmlDeviceGetUtilizationRates``, via ctypes: the driver's
    ``libnvidia-ml.so.1``, which ``--nv`` binds) sampled every ``period`` s in a thread."""

    class _Util(ctypes.Structure):
        _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]

    def __init__(self, pci_bus_id: str | None, period: float = 0.1) -> None:
        self.samples: list[int] = []
        self.period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.handle = None
        try:
            self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if self.nvml.nvmlInit_v2() != 0 or not pci_bus_id:
                return
            h = ctypes.c_void_p()
            if self.nvml.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(h)) == 0:
                self.handle = h
        except (OSError, AttributeError):
            self.handle = None

    def _run(self) -> None:
        u = self._Util()
        while not self._stop.is_set():
            if self.nvml.nvmlDeviceGetUtilizationRates(self.handle, ctypes.byref(u)) == 0:
                self.samples.append(int(u.gpu))
            self._stop.wait(self.period)

    def __enter__(self) -> BusySampler:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def busy_pct(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _pci_bus_id(dev: Any) -> str | None:
    import torch

    if dev.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(dev)
    try:
        return f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
    except AttributeError:
        return None


def synthetic_work_dir(wd: Path, cpu: bool, target_gpu_mem_gb: float) -> Path:
    """A blob work dir (3 classes + unknown, anisotropic-free 8 nm) with builtin bundles."""
    import yaml
    from monai.apps.auto3dseg import DataAnalyzer

    from common.config import load_config
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen
    from tools.synthetic import make_blobs_dataset

    if (wd / "input.yaml").is_file() and all((wd / f"{a}_0" / "configs").is_dir() for a in ALGOS):
        return wd
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    # Cases bigger than a 48 GB patch, so the patch is sized by GPU memory, not by the data.
    shape = (40, 40, 24) if cpu else (256, 256, 160)
    dl = make_blobs_dataset(wd, n_cases=4, shape=shape, n_classes=3, n_val=1, seed=0)
    DataAnalyzer(
        str(dl), str(wd / "nifti_data"), output_path=str(wd / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    cfg = {
        "classes": CLASSES,
        "unknown_label": 255,
        "resolution_nm": 8,
        "algos": list(ALGOS),
        "num_folds": 1,
        "templates": "builtin",
        "target_gpu_mem_gb": target_gpu_mem_gb,
    }
    (wd / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    run_bundlegen(WorkDir.at(wd), load_config(wd))
    return wd


def _batch(cfg: dict[str, Any], dev: Any) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    shape = (int(cfg["batch_size"]), 1, *[int(r) for r in cfg["roi_size"]])
    img = torch.rand(shape, generator=g)
    lab = torch.randint(0, int(cfg["output_classes"]), shape, generator=g, dtype=torch.int16)
    return img.to(dev), lab.to(dev)


def measure(cfg: dict[str, Any], dev: Any, precision: str, steps: int, warmup: int, feed: str) -> dict[str, Any]:
    """``steps`` timed training steps (after ``warmup``) fed by ``feed`` = compute | loader."""
    import torch

    from training.data import datalist_split, epoch_batches, train_dataset
    from training.losses import MaskedSegLoss
    from training.networks import build_network

    torch.manual_seed(0)
    model = build_network(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and dev.type == "cuda")
    loss_fn = MaskedSegLoss(
        int(cfg["output_classes"]), int(cfg.get("unknown_label", 0)), None, str(cfg.get("loss", "dicece"))
    ).to(dev)
    if feed == "compute":
        fixed = _batch(cfg, dev)
        batches: Any = iter(lambda: {"image": fixed[0], "label": fixed[1]}, None)
    else:
        items, _ = datalist_split(cfg)
        batches = epoch_batches({**cfg, "num_steps_per_epoch": steps + warmup}, train_dataset(cfg, items), 0)

    def step(batch: dict[str, Any]) -> int:
        img = batch["image"].to(dev, non_blocking=True)
        lab = batch["label"].to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(img)
            out = out[0] if isinstance(out, (list, tuple)) else out
        loss = loss_fn(out, lab)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return int(img.shape[0])

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(next(batches))
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    n = 0
    with BusySampler(_pci_bus_id(dev)) as busy:
        t0 = time.perf_counter()
        for _ in range(steps):
            n += step(next(batches))
        sync()
        dt = time.perf_counter() - t0
    res: dict[str, Any] = {
        "steps": steps,
        "seconds": round(dt, 3),
        "samples_per_s": round(n / dt, 3),
        "gpu_busy_pct": busy.busy_pct,
    }
    if dev.type == "cuda":
        res["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        res["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(dev) / 2**30, 2)
    model = opt = None  # free them before the next precision (the closure `step` holds the same cells)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_algo(
    wd: Path, algo: str, dev: Any, precisions: list[str], steps: int, warmup: int, cpu: bool
) -> dict[str, Any]:
    from training.hparams import read_hyper_parameters
    from training.networks import fit_roi

    hp = wd / f"{algo}_0" / "configs" / "hyper_parameters.yaml"
    cfg = read_hyper_parameters(hp, TINY if cpu else None)
    cfg["roi_size"] = fit_roi(cfg, list(cfg["roi_size"]))
    out: dict[str, Any] = {
        "roi_size": cfg["roi_size"],
        "batch_size": int(cfg["batch_size"]),
        "num_workers": int(cfg.get("num_workers", 0)),
        "target_gpu_mem_gb": float(cfg.get("target_gpu_mem_gb", 48.0)),
        "precisions": {},
    }
    for prec in precisions:
        row: dict[str, Any] = {}
        for feed in ("compute", "loader"):
            try:
                row[feed] = measure(cfg, dev, prec, steps, warmup, feed)
            except Exception as exc:  # noqa: BLE001 - e.g. OOM at this size: that IS the finding
                row[feed] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        c, ld = row["compute"].get("samples_per_s"), row["loader"].get("samples_per_s")
        row["loader_vs_compute"] = round(ld / c, 3) if c and ld else None
        peak = row["compute"].get("peak_reserved_gb")
        row["peak_vs_target"] = round(peak / out["target_gpu_mem_gb"], 3) if peak is not None else None
        out["precisions"][prec] = row
        print(
            f"gpu-check: {algo} {prec}: compute {c} samples/s, loader {ld} samples/s, "
            f"peak {peak} GB of {out['target_gpu_mem_gb']}, busy {row['compute'].get('gpu_busy_pct')}%",
            flush=True,
        )
    return out


def _stage_train(wd: Path, algo: str, gpus: int, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.train",
            "--work-dir",
            str(wd),
            "--algo",
            algo,
            "--fold",
            "0",
            "--gpus",
            str(gpus),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out: dict[str, Any] = {"rc": res.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if res.returncode != 0:
        out["stderr_tail"] = res.stderr[-1500:]
    return out


def official_epoch(src: Path, dest: Path, gpus: int, timeout: float) -> dict[str, Any]:
    """One epoch of the official segresnet on the same data, through the train stage."""
    import yaml

    from common.config import load_config
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    shutil.copytree(src / "nifti_data", dest / "nifti_data")
    for f in ("datastats.yaml", "datastats_by_case.yaml"):
        if (src / f).is_file():
            shutil.copy(src / f, dest / f)
    cfg = yaml.safe_load((src / "pipeline.yaml").read_text())
    cfg.update(algos=["segresnet"], templates="official", num_folds=1, train={"num_epochs": 1})
    (dest / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    run_bundlegen(WorkDir.at(dest), load_config(dest))
    return _stage_train(dest, "segresnet", gpus, timeout)


def ddp_smoke(src: Path, dest: Path, timeout: float) -> dict[str, Any]:
    """``train --gpus 2`` (torchrun, NCCL) for a few steps of segresnet."""
    import yaml

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model", "markers", "logs"))
    cfg = yaml.safe_load((dest / "pipeline.yaml").read_text())
    cfg["train"] = {"num_epochs": 1, "num_steps_per_epoch": 10}
    (dest / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    # The bundles hold absolute paths of the source work dir: point them at the copy.
    for hp in dest.glob("*_0/configs/hyper_parameters.yaml"):
        hp.write_text(hp.read_text().replace(str(src), str(dest)))
    return _stage_train(dest, "segresnet", 2, timeout)


def write_report(result: dict[str, Any], out: Path) -> None:
    """JSON, a markdown table and a bar chart of samples/s."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    lines = [
        "| algo | precision | patch x batch | compute samples/s | loader samples/s | loader/compute "
        "| peak GB / target | GPU busy % |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    bars = []
    for algo, a in result["algos"].items():
        for prec, r in a["precisions"].items():
            c, ld = r["compute"], r["loader"]
            lines.append(
                f"| {algo} | {prec} | {a['roi_size']} x {a['batch_size']} | "
                f"{c.get('samples_per_s', c.get('error'))} | {ld.get('samples_per_s', ld.get('error'))} | "
                f"{r['loader_vs_compute']} | {c.get('peak_reserved_gb', '-')} / {a['target_gpu_mem_gb']} | "
                f"{c.get('gpu_busy_pct', '-')} |"
            )
            bars.append((f"{algo} {prec}", c.get("samples_per_s") or 0.0, ld.get("samples_per_s") or 0.0))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    from common.plots import pyplot, save_figure

    plt = pyplot()
    if plt is not None and bars:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(bars) + 1.5))
        ys = range(len(bars))
        ax.barh([y + 0.2 for y in ys], [b[1] for b in bars], height=0.4, label="compute (batch on GPU)")
        ax.barh([y - 0.2 for y in ys], [b[2] for b in bars], height=0.4, label="real data loader")
        ax.set_yticks(list(ys), [b[0] for b in bars])
        ax.set_xlabel("training samples/s")
        ax.set_title(f"gpu-check: {result['device']} ({result['mode']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out.with_suffix(".png"), dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, help="work dir with <algo>_0 bundles (default: synthetic)")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--precision", default=None, help="comma list of fp16,bf16,fp32 (default fp16,bf16; --cpu: fp32,bf16)"
    )
    ap.add_argument("--target-gpu-mem-gb", type=float, default=48.0, help="sizing of the synthetic bundles")
    ap.add_argument("--cpu", action="store_true", help="reduced CPU mode (tiny network/patch): checks the harness")
    ap.add_argument("--no-official", action="store_true", help="skip the official segresnet epoch")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for each train-stage run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    ap.add_argument(
        "--scratch",
        type=Path,
        default=ROOT / "bench" / "work" / "gpu",
        help="where the synthetic work dir and the official/DDP runs go",
    )
    ns = ap.parse_args(argv)

    for d in (ns.out.parent, ns.scratch):  # fail now, not after the measurements (the image is read-only)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"gpu-check: cannot write {d} ({exc.strerror}): pass --out and --scratch under the work dir",
                file=sys.stderr,
            )
            return 2

    import torch

    if not ns.cpu and not torch.cuda.is_available():
        from stages.train.gpu import diagnose, probe

        print(
            f"gpu-check: {diagnose(1, probe()) or 'no CUDA device'}; run with --cpu for the reduced CPU mode",
            file=sys.stderr,
        )
        return 2
    dev = torch.device("cpu") if ns.cpu else torch.device("cuda", 0)
    if not ns.cpu:
        torch.cuda.set_device(dev)
    precisions = (ns.precision or ("fp32,bf16" if ns.cpu else "fp16,bf16")).split(",")
    work = ns.scratch.resolve()
    wd = (
        ns.work_dir.resolve()
        if ns.work_dir
        else synthetic_work_dir(work / ("cpu" if ns.cpu else "data"), ns.cpu, ns.target_gpu_mem_gb)
    )
    result: dict[str, Any] = {
        "mode": "cpu-reduced" if ns.cpu else "gpu",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "work_dir": str(wd),
        "steps": ns.steps,
        "warmup": ns.warmup,
        "algos": {},
    }
    if dev.type == "cuda":
        from stages.train.gpu import _driver_version

        p = torch.cuda.get_device_properties(dev)
        result.update(
            driver=_driver_version(),
            capability=list(torch.cuda.get_device_capability(dev)),
            gpu_mem_gb=round(p.total_memory / 2**30, 1),
        )
    for algo in ns.algos.split(","):
        result["algos"][algo] = bench_algo(wd, algo, dev, precisions, ns.steps, ns.warmup, ns.cpu)
    templates = os.environ.get("CELLMAP_A3DS_OFFICIAL_TEMPLATES")
    if ns.cpu or ns.no_official:
        result["official_segresnet_epoch"] = {"skipped": "--cpu" if ns.cpu else "--no-official"}
    elif importlib.util.find_spec("stages.bundlegen") is None:
        result["official_segresnet_epoch"] = {"skipped": "the bundlegen stage is not in this image: run natively"}
    elif not templates or not Path(templates).is_dir():
        result["official_segresnet_epoch"] = {
            "skipped": "CELLMAP_A3DS_OFFICIAL_TEMPLATES not set (it is in the train image)"
        }
    else:
        result["official_segresnet_epoch"] = official_epoch(wd, work / "official", 1, ns.timeout)
    if dev.type == "cuda" and torch.cuda.device_count() >= 2:
        result["ddp_smoke_gpus2"] = ddp_smoke(wd, work / "ddp", ns.timeout)
    else:
        result["ddp_smoke_gpus2"] = {"skipped": f"{result['gpus_visible']} GPU(s) visible, needs 2"}
    write_report(result, ns.out)
    print(f"gpu-check: {ns.out} (+ .md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
