"""The one trainer of the builtin templates (segresnet, swinunetr, dints).

A bundle's ``scripts/train.py`` and the train stage both call :func:`train_bundle`; a bundle's
``scripts/infer.py`` and the ensemble call :class:`BundlePredictor` /
:func:`predict_probabilities`.

Contract of ``<bundle>/model/`` (``ckpt_path``):

* ``checkpoint_latest.pt`` - full state (weights, optimizer, scheduler, scaler, epoch, step,
  best metric, RNG states), written atomically after every epoch and on SIGUSR1/SIGTERM;
  removed after a clean finish unless ``keep_latest``.
* ``model_best.pt`` / ``model_final.pt`` - ``{"state_dict", "config", "epoch", "best_metric"}``.
* ``metrics.jsonl`` - one JSON line per epoch; ``progress.png`` - loss, per-class Dice, LR.
* ``progress.yaml`` - written **only after a clean finish** (a list whose last entry holds
  ``best_avg_dice_score``), so MONAI's ``get_score()`` / ``import_bundle_algo_history`` see a
  bundle as trained only when it is.

Everything loaded with ``torch.load`` is loaded with ``weights_only=True``.

Resume is exact on CPU with ``num_workers: 0``: every epoch re-seeds the data order and the
random transforms from ``seed + epoch``, a stop mid-epoch records the step reached and the
global RNG states, and the rerun replays (without training) the batches already used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from common.errors import ConfigError, PipelineError, RequeueRequested, StageFailed
from common.io import (atomic_write_text, atomic_write_yaml, read_json, read_yaml, remove_sealed,
                       remove_stale_tmp, sealed_candidates, sealed_path)
from common.progress import EventLog, eta_seconds, format_epoch_line
from training.autoconfig import HYPER_PARAMETERS
from training.losses import LOSSES, MaskedSegLoss, deep_supervision_loss, loss_class_weights
from training.networks import build_network, fit_roi, load_pretrained_swinunetr
from training.signals import EARLY, STOP_SIGNALS, catch_stop_signals_early

log = logging.getLogger("cellmap.trainer")

CKPT_LATEST = "checkpoint_latest.pt"
CKPT_BEST = "model_best.pt"
CKPT_FINAL = "model_final.pt"
METRICS = "metrics.jsonl"
PROGRESS_YAML = "progress.yaml"
PROGRESS_PNG = "progress.png"


# ---- configuration ------------------------------------------------------------------
def find_hyper_parameters(config_file: str | os.PathLike[str] | Sequence[str] | None) -> Path:
    """``configs/hyper_parameters.yaml`` from a file, a list of files (MONAI passes every
    file of ``configs/``), a comma-joined string, or a bundle folder."""
    if config_file is None:
        raise ValueError("no config_file given")
    if isinstance(config_file, (str, os.PathLike)):
        items = [s for s in str(config_file).split(",") if s]
    else:
        items = [str(c) for c in config_file]
    for it in items:
        p = Path(it)
        if p.is_dir():
            p = p / "configs" / HYPER_PARAMETERS
        if p.name == HYPER_PARAMETERS and p.is_file():
            return p
    raise FileNotFoundError(f"no {HYPER_PARAMETERS} in {items}")


def load_config(config_file: str | os.PathLike[str] | Sequence[str], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's hyper-parameters with ``overrides`` (e.g. ``pipeline.yaml``'s ``train:``)
    applied; a mapping override (``network``) is merged key by key."""
    cfg = read_yaml(find_hyper_parameters(config_file)) or {}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def _parse_value(text: str) -> Any:
    """YAML value, plus the ``1e-3`` floats YAML 1.1 leaves as strings, and the quoted
    ``'32,32,16'`` lists MONAI's ``BundleAlgo.train`` passes (``--roi_size='32,32,16'``)."""
    val = yaml.safe_load(text)
    if isinstance(val, str):
        with contextlib.suppress(ValueError):
            return float(val)
        if "," in val:
            parts = [yaml.safe_load(p) for p in val.split(",")]
            if all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
                return parts
    return val


def parse_cli_overrides(args: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """``run --config_file F --num_epochs 2 --roi_size [32,32,16]`` -> ``(F, {...})``.

    Values are parsed with ``yaml.safe_load`` so lists and numbers keep their type (MONAI's
    own ``BundleAlgo.train`` turns lists into strings; this parser does not).
    """
    args = list(args)
    if args and args[0] == "run":
        args = args[1:]
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}")
        key = a[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{a} needs a value")
            val = args[i + 1]
            i += 2
        key = key.split("#")[-1]  # accept MONAI-style "training#num_epochs"
        out[key] = _parse_value(val) if key != "config_file" else val.strip("'\"")
    return out.pop("config_file", None), out


# ---- distributed helpers ------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (or requested), else CPU."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


# ---- stop signals -------------------------------------------------------------------
class StopFlag:
    """Set by SIGUSR1/SIGTERM; the loop checks it after every optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install SIGUSR1/SIGTERM handlers that only set a flag (main thread only)."""
    flag = StopFlag()
    if EARLY:
        flag.signum = EARLY[-1]

    def handler(signum: int, _frame: Any) -> None:
        flag.signum = signum

    old: dict[int, Any] = {}
    import threading

    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            old[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- data ---------------------------------------------------------------------------
def datalist_split(cfg: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and validation items (absolute paths) of this bundle's fold."""
    base = Path(cfg["data_file_base_dir"])
    items = read_json(cfg["data_list_file_path"]).get("training", [])

    def absolute(it: dict[str, Any]) -> dict[str, str]:
        return {k: str(base / it[k]) for k in ("image", "label")}

    fold = int(cfg.get("fold", 0))
    train = [absolute(it) for it in items if int(it.get("fold", -1)) != fold]
    val = [absolute(it) for it in items if int(it.get("fold", -1)) == fold]
    if not train:
        raise ValueError(f"{cfg['data_list_file_path']}: no training cases outside fold {fold}")
    if not val:
        log.warning("no validation cases in fold %d: validating on the training cases", fold)
        val = train
    return train, val


CROP_MODES = ("classes", "posneg", "rand")
AUGMENT_MODES = ("default", "light", "flips", "none")
def _augmentations(cfg: dict[str, Any], roi: list[int]) -> list[Any]:
    """The official templates' augmentation families (``augment: default``): affine
    (rotation +-0.26 rad, scale +-20 %), Gaussian smoothing, intensity scale and shift,
    contrast (gamma), Gaussian noise, flips on every axis; ``light``: flips + intensity
    scale/shift only (the former recipe); ``flips``: flips only (data whose classes differ by
    absolute grey level, like the demo's painted EM); ``none``."""
    from monai import transforms as T

    mode = str(cfg.get("augment", "default"))
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {mode!r}")
    keys = ["image", "label"]
    flips = [T.RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)]
    if mode == "none":
        return []
    if mode == "flips":
        return flips
    if mode == "light":
        return [*flips, T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
    return [
        T.RandAffined(keys=keys, prob=0.2, rotate_range=[0.26] * 3, scale_range=[0.2] * 3, mode=["bilinear", "nearest"],
                      spatial_size=roi, cache_grid=True, padding_mode="border"),
        T.RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        T.RandScaleIntensityd(keys="image", factors=0.3, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        T.RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.7, 1.5), retain_stats=True),
        T.RandGaussianNoised(keys="image", prob=0.2, mean=0.0, std=0.1),
        *flips,
    ]


def _transforms(cfg: dict[str, Any], train: bool) -> Any:
    from monai import transforms as T

    lo, hi = (float(v) for v in cfg["intensity_bounds"])
    unknown = int(cfg.get("unknown_label", 0))
    roi = [int(r) for r in cfg["roi_size"]]
    keys = ["image", "label"]
    xs: list[Any] = [
        T.LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
        T.EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        T.EnsureTyped(keys="label", dtype=torch.int16, track_meta=False),
        T.ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if not train:
        return T.Compose(xs)
    n_crops = int(cfg.get("num_crops_per_image", 1))
    mode = str(cfg.get("crop_mode", "classes"))
    if mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {mode!r}")
    xs += [
        # padding is unknown in the label, so it never counts in loss or metric, and (crop_mode
        # classes) no crop is centred on it
        T.SpatialPadd(keys="image", spatial_size=roi, mode="constant", value=0),
        T.SpatialPadd(keys="label", spatial_size=roi, mode="constant", value=unknown),
    ]
    if mode == "classes":
        n_cls = int(cfg["output_classes"])
        ratios = cfg.get("crop_ratios")
        from training.sampling import INDICES_KEY, KnownClassIndicesd

        xs += [
            KnownClassIndicesd(n_cls),  # deterministic: cached with the volume when cache_rate > 0
            T.RandCropByLabelClassesd(
                keys=keys, label_key="label", spatial_size=roi, num_classes=n_cls, indices_key=INDICES_KEY,
                ratios=None if ratios is None else [float(r) for r in ratios], num_samples=n_crops, warn=False,
            ),
        ]
    elif mode == "posneg":  # the former recipe, kept as the benchmark baseline
        ratio = float(cfg.get("crop_foreground_ratio", 0.8))
        xs += [
            T.CopyItemsd(keys="label", names="fg"),
            T.Lambdad(keys="fg", func=lambda x: (x > 0) & (x != unknown) if unknown else x > 0),
            T.RandCropByPosNegLabeld(
                keys=keys, label_key="fg", spatial_size=roi, pos=ratio, neg=1.0 - ratio,
                num_samples=n_crops, allow_smaller=False,
            ),
            T.DeleteItemsd(keys="fg"),
        ]
    else:
        xs.append(T.RandSpatialCropSamplesd(keys=keys, roi_size=roi, num_samples=n_crops, random_size=False))
    xs += _augmentations(cfg, roi)
    return T.Compose(xs)


def _epoch_batches(cfg: dict[str, Any], ds: Any, epoch: int) -> Iterator[dict[str, Any]]:
    """The batches of one epoch: one pass over ``items``, or exactly ``num_steps_per_epoch``
    batches (passes repeated, each with its own seed)."""
    n = cfg.get("num_steps_per_epoch")
    if not n:
        yield from _train_loader(cfg, ds, epoch * 1000)
        return
    done, rep = 0, 0
    while done < int(n):
        for batch in _train_loader(cfg, ds, epoch * 1000 + rep):
            yield batch
            done += 1
            if done >= int(n):
                return
        rep += 1


def _train_dataset(cfg: dict[str, Any], items: list[dict[str, str]]) -> Any:
    """Training dataset; ``cache_rate`` of the cases keep their loaded, normalised volumes in RAM."""
    from monai.data import CacheDataset

    return CacheDataset(items, _transforms(cfg, train=True), cache_rate=float(cfg.get("cache_rate", 0.0)),
                        num_workers=0, progress=False)


def _train_loader(cfg: dict[str, Any], ds: Any, pass_id: int) -> Any:
    """A loader whose order and augmentations depend only on ``seed + pass_id``.

    MONAI's DataLoader seeds the random transforms from ``generator`` (in-process) or per
    worker from it, so the batches are a function of the seed alone.
    """
    from monai.data import DataLoader

    seed = int(cfg.get("seed", 0)) + pass_id
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds, batch_size=int(cfg["batch_size"]), shuffle=True, generator=gen,
        num_workers=int(cfg.get("num_workers", 0)), drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


# ---- checkpoints --------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, rename, fsync the directory, then a
    size/sha256 sidecar: never a partial checkpoint under the final name, and a torn one is
    detected. ``checkpoint_latest.pt`` keeps the previous good one (``.prev``) until the new
    one is durable."""
    with sealed_path(path, keep_previous=path.name == CKPT_LATEST) as tmp:
        torch.save(obj, tmp)


def ignore_stop_signals(why: str) -> None:
    """From here on SIGUSR1/SIGTERM do not kill the process: after the final marker this fold
    is done, and dying now (exit 143) would make SLURM cancel the dependants of a finished
    fold. The signal is remembered (``EARLY``), so a next fold in the same run stops after
    its first step with a checkpoint, as a signal during start-up does."""
    import threading

    def handler(signum: int, _frame: Any) -> None:
        EARLY.append(signum)
        log.warning("signal %d after the end: %s; not stopping", signum, why)

    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, handler)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints without unpickling arbitrary objects.

    A torn or corrupt file (its size/sha256 sidecar disagrees, or torch cannot read it) falls
    back to the previous good version (``<name>.prev``) with one warning line.

    Raises:
        StageFailed: neither the file nor its previous version can be loaded (one line).
    """
    problems = []
    for cand, why in sealed_candidates(path):
        if why is None:
            try:
                ck = torch.load(cand, map_location=map_location, weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
                why = " ".join(str(exc).split())[:160] or type(exc).__name__
            else:
                if problems:
                    log.warning("%s: %s; resuming from the previous good checkpoint %s", path, problems[-1], cand.name)
                return ck
        problems.append(f"{cand.name} unusable: {why}")
    raise StageFailed(f"{path}: no usable checkpoint ({'; '.join(problems) or 'missing'})")


def load_resumable(path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from, or ``None`` to start the fold afresh: when no version
    of ``path`` can be loaded, the unusable files are set aside (``*.torn``) with one line."""
    if not sealed_candidates(path):
        return None
    try:
        return load_checkpoint(path, "cpu")  # RNG states must stay CPU tensors
    except StageFailed as exc:
        for cand, _ in sealed_candidates(path):
            with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
                os.replace(cand, cand.with_name(cand.name + ".torn"))
        log.warning("%s; set aside as *.torn, the fold starts again from epoch 0", exc)
        return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _plain(obj: Any) -> Any:
    """Config values as plain YAML/JSON data (for checkpoints loaded with weights_only)."""
    return json.loads(json.dumps(obj, default=str))


# ---- results ------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What one :func:`train_bundle` call achieved."""

    status: str  # "finished" | "skipped" (already finished)
    best_metric: float
    best_epoch: int
    epochs: int
    model_dir: Path


def _lr_lambda(num_epochs: int, warmup: int) -> Any:
    def f(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        span = max(1, num_epochs - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - warmup) / span)))

    return f


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def plot_progress(rows: list[dict[str, Any]], out: Path, class_names: Sequence[str]) -> None:
    """``progress.png``: training loss, per-class validation Dice and learning rate per epoch."""
    if not rows:
        return
    from common.plots import pyplot, save_figure

    plt = pyplot()
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(ep, [r["train_loss"] for r in rows], "k.-")
    ax[0].set_title("training loss")
    vr = [r for r in rows if r.get("dice")]
    for name in class_names:
        ax[1].plot([r["epoch"] for r in vr], [r["dice"].get(name) for r in vr], ".-", label=name)
    ax[1].plot([r["epoch"] for r in vr], [r["mean_dice"] for r in vr], "k.-", lw=2, label="mean")
    ax[1].set_title("validation Dice (unknown ignored)")
    ax[1].set_ylim(0, 1)
    ax[1].legend(fontsize=7, ncol=2)
    ax[2].plot(ep, [r["lr"] for r in rows], "b.-")
    ax[2].set_title("learning rate")
    for a in ax:
        a.set_xlabel("epoch")
    fig.tight_layout()
    save_figure(fig, out, dpi=80)


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


# ---- validation ---------------------------------------------------------------------
@torch.no_grad()
def validate(model: torch.nn.Module, cfg: dict[str, Any], items: list[dict[str, str]], device: torch.device) -> np.ndarray:
    """Per-class Dice pooled over the validation fold (the challenge's score; NaN: class absent everywhere).

    TP/FP/FN are summed over every validation case (all ranks) before the ratio, unknown voxels
    excluded (:func:`common.metrics.confusion_matrix`); the mean over classes is the selection metric.
    """
    from monai.inferers import sliding_window_inference

    from common.metrics import confusion_matrix, pooled_dice

    rank, world = _dist()
    xf = _transforms(cfg, train=False)
    n_cls = int(cfg["output_classes"])
    matrix = np.zeros((n_cls, n_cls), dtype=np.int64)
    model.eval()
    amp = bool(cfg.get("amp", True)) and device.type == "cuda"
    for it in items[rank::world]:
        d = xf(it)
        img = d["image"][None].to(device)
        with torch.autocast(device.type, enabled=amp):
            logits = sliding_window_inference(
                img, [int(r) for r in cfg["roi_size"]], int(cfg.get("sw_batch_size", 1)), model,
                overlap=float(cfg.get("sw_overlap", 0.25)), mode="gaussian",
            )
        pred = logits.argmax(1).cpu().numpy()
        label = np.asarray(d["label"]).astype(np.int64).reshape(pred.shape)
        matrix += confusion_matrix(pred, label, n_cls, int(cfg.get("unknown_label", 0)))
    if world > 1:
        both = torch.as_tensor(matrix, dtype=torch.float64).to(device)
        torch.distributed.all_reduce(both)
        matrix = both.cpu().numpy().astype(np.int64)
    model.train()
    return pooled_dice(matrix)


# ---- training -----------------------------------------------------------------------
ARCH_CODE = "arch_code.json"


def _dints_architecture(cfg: dict[str, Any], model_dir: Path, train_items: list[dict[str, str]],
                        loss_fn: torch.nn.Module, dev: torch.device) -> None:
    """Put the searched DiNTS architecture into ``cfg["network"]["arch_code"]``.

    Order: an ``arch_code`` given in the config (``train: {network: {arch_code: ...}}``) wins;
    else ``<model>/arch_code.json`` from an earlier search of this bundle; else the search runs
    now (:func:`training.dints_search.search_dints`, ``search_epochs`` epochs; 0 = the
    dense fallback topology) and writes that file. The code then travels in every checkpoint's
    ``config``, so inference rebuilds the same network.
    """
    net = dict(cfg.get("network") or {})
    if net.get("arch_code") is not None:
        return
    path = model_dir / ARCH_CODE
    if path.is_file():
        net["arch_code"] = read_json(path)["arch_code"]
    elif int(cfg.get("search_epochs") if cfg.get("search_epochs") is not None else max(1, int(cfg["num_epochs"]) // 4)) > 0:
        from training.dints_search import search_dints

        with stop_on_signals() as stop:
            result = search_dints(cfg, train_items, loss_fn, dev, lambda: _stop_requested(stop, dev),
                                  lambda items: _train_dataset(cfg, items), lambda ds, e: _epoch_batches(cfg, ds, e))
        rank, world = _dist()
        if world > 1:  # every rank searched the same data; rank 0's answer is the one
            box = [result]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
        if rank == 0:
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        net["arch_code"] = result["arch_code"]
    else:
        log.warning("dints: search_epochs 0 and no arch_code: training the dense topology")
        return
    cfg["network"] = net


def is_finished(model_dir: Path) -> bool:
    """A clean finish left ``model_final.pt`` and ``progress.yaml``."""
    return (model_dir / CKPT_FINAL).is_file() and (model_dir / PROGRESS_YAML).is_file()


def train_bundle(
    config_file: str | os.PathLike[str] | Sequence[str],
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train one builtin bundle: start, continue from ``checkpoint_latest.pt``, or skip.

    Args:
        config_file: the bundle's ``hyper_parameters.yaml`` (or its folder / MONAI's list).
        overrides: keys replacing hyper-parameters for this run (``pipeline.yaml`` ``train:``).
        device: ``cpu``, ``cuda``, ``cuda:1``; default CUDA when available.

    Raises:
        RequeueRequested: SIGUSR1/SIGTERM arrived; the state after the current step is saved.
    """
    cfg = load_config(config_file, overrides)
    roi = fit_roi(cfg, list(cfg["roi_size"]))
    if roi != list(cfg["roi_size"]):
        log.warning("%s: roi_size %s rounded up to %s (what the network accepts)", cfg["algo"], cfg["roi_size"], roi)
        cfg["roi_size"] = roi
    model_dir = Path(cfg["ckpt_path"])
    model_dir.mkdir(parents=True, exist_ok=True)
    rank, _ = _dist()
    if is_finished(model_dir):
        prog = read_yaml(model_dir / PROGRESS_YAML)[-1]
        log.info("%s: already finished (best mean Dice %.4f): skipping", model_dir.parent.name, prog["best_avg_dice_score"])
        return TrainResult("skipped", float(prog["best_avg_dice_score"]), int(prog.get("best_avg_dice_score_epoch", -1)),
                           int(prog.get("epochs_trained", 0)), model_dir)
    dev = pick_device(device)
    _init_distributed(dev)
    rank, world = _dist()
    if rank == 0:
        remove_stale_tmp(model_dir)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if bool(cfg.get("deterministic", True)):
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True

    if str(cfg.get("loss", "dicece")) not in LOSSES:
        raise ConfigError(f"train: loss must be one of {', '.join(LOSSES)}, got {cfg.get('loss')!r}")
    pretrained = cfg.get("pretrained_weights")
    if pretrained and not Path(str(pretrained)).expanduser().is_file():
        raise ConfigError(f"{pretrained}: pretrained_weights file not found (nothing is downloaded; copy it there)")
    train_items, val_items = datalist_split(cfg)
    n_cls = int(cfg["output_classes"])
    loss_fn = MaskedSegLoss(n_cls, int(cfg.get("unknown_label", 0)), loss_class_weights(cfg), str(cfg.get("loss", "dicece"))).to(dev)
    if cfg["algo"] == "dints":
        _dints_architecture(cfg, model_dir, train_items, loss_fn, dev)
        torch.manual_seed(seed)  # the search used the RNGs: training starts from the same state either way
        np.random.seed(seed % 2**32)
        random.seed(seed)
    if world > 1:
        if not cfg.get("num_steps_per_epoch"):
            # every rank must run the same number of steps (DDP all-reduces each one)
            cfg["num_steps_per_epoch"] = max(1, math.ceil(len(train_items) / (int(cfg["batch_size"]) * world)))
        train_items = train_items[rank::world] or train_items
    train_ds = _train_dataset(cfg, train_items)
    class_names = list(cfg.get("class_names") or [f"class{i}" for i in range(1, n_cls)])
    model = build_network(cfg).to(dev)
    num_epochs = int(cfg["num_epochs"])
    opt = torch.optim.AdamW(model.parameters(), lr=float(cfg["learning_rate"]), weight_decay=float(cfg.get("weight_decay", 1e-5)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(num_epochs, int(cfg.get("warmup_epochs", 0))))
    amp = bool(cfg.get("amp", True)) and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, start_step, loss_sum, n_steps_done = 0, 0, 0.0, 0
    best, best_epoch, stale = -1.0, -1, 0
    resume_rng = None
    latest = model_dir / CKPT_LATEST
    ck = load_resumable(latest)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        start_epoch, start_step = int(ck["epoch"]), int(ck["step"])
        loss_sum, n_steps_done = float(ck["loss_sum"]), int(ck["n_steps"])
        best, best_epoch, stale = float(ck["best_metric"]), int(ck["best_epoch"]), int(ck["stale"])
        resume_rng = ck["rng"] if start_step > 0 else None
        log.info("%s: resuming at epoch %d step %d (best %.4f)", model_dir.parent.name, start_epoch, start_step, best)
    else:
        if pretrained and cfg["algo"] == "swinunetr":
            load_pretrained_swinunetr(model, str(pretrained))
        if rank == 0:
            for name in (METRICS, CKPT_BEST, PROGRESS_PNG):
                (model_dir / name).unlink(missing_ok=True)
    rows = [r for r in _read_metrics(model_dir / METRICS) if r["epoch"] < start_epoch]
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    model.train()
    patience = int(cfg.get("early_stop_patience", 0))
    val_every = max(1, int(cfg.get("val_every", 1)))
    max_norm = float(cfg.get("max_grad_norm", 0) or 0)
    plain_cfg = _plain(cfg)

    def state(epoch: int, step: int) -> dict[str, Any]:
        return {
            "model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "loss_sum": loss_sum, "n_steps": n_steps_done,
            "best_metric": best, "best_epoch": best_epoch, "stale": stale, "rng": _rng_state(), "config": plain_cfg,
        }

    from tqdm import tqdm

    from training.tracking import Tracker

    tracker = Tracker(plain_cfg, model_dir, enabled=rank == 0 and bool(cfg.get("mlflow", False)))
    events = EventLog(model_dir, enabled=rank == 0)
    try:
        stopped_early = False
        with stop_on_signals() as stop:
            for epoch in range(start_epoch, num_epochs):
                torch.manual_seed(seed + epoch)
                loader = _epoch_batches(cfg, train_ds, epoch)
                t0 = time.perf_counter()
                n_samples = 0
                skip = start_step if epoch == start_epoch else 0
                if skip == 0:
                    loss_sum, n_steps_done = 0.0, 0
                bar = tqdm(loader, desc=f"{cfg['algo']} epoch {epoch}", leave=False, disable=rank != 0 or not sys.stderr.isatty())
                for step, batch in enumerate(bar):
                    if step < skip:
                        if step == skip - 1 and resume_rng is not None:
                            _set_rng_state(resume_rng)  # the global RNGs as they were at the stop
                        continue
                    img, lab = batch["image"].to(dev), batch["label"].to(dev)
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast(dev.type, enabled=amp):
                        logits = model(img)  # segresnet in training mode: one tensor per deep-supervision head
                    loss = deep_supervision_loss(loss_fn, logits, lab)
                    scaler.scale(loss).backward()
                    if max_norm > 0:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    scaler.step(opt)
                    scaler.update()
                    loss_sum += float(loss.detach())
                    n_steps_done += 1
                    n_samples += int(img.shape[0])
                    if _stop_requested(stop, dev):
                        if rank == 0:
                            save_checkpoint(model_dir / CKPT_LATEST, state(epoch, step + 1))
                        raise RequeueRequested(f"signal {stop.signum or 'from another rank'}: checkpoint at epoch {epoch} step {step + 1}")
                train_time = time.perf_counter() - t0
                lr = float(opt.param_groups[0]["lr"])
                sched.step()
                row: dict[str, Any] = {
                    "epoch": epoch, "train_loss": loss_sum / max(1, n_steps_done), "lr": lr, "steps": n_steps_done,
                    "samples_per_s": round(n_samples * world / train_time, 4) if n_samples else None,
                }
                if (epoch + 1) % val_every == 0 or epoch + 1 == num_epochs:
                    dice = validate(model, cfg, val_items, dev)
                    mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
                    row.update(dice={n: (None if np.isnan(v) else round(float(v), 5)) for n, v in zip(class_names, dice)}, mean_dice=round(mean, 5))
                    if mean > best:
                        best, best_epoch, stale = mean, epoch, 0
                        if rank == 0:
                            save_checkpoint(model_dir / CKPT_BEST, {"state_dict": _unwrap(model).state_dict(), "config": plain_cfg, "epoch": epoch, "best_metric": best})
                    else:
                        stale += 1
                row.update(best_metric=round(best, 5), epoch_time_s=round(time.perf_counter() - t0, 3))
                rows.append(row)
                loss_sum, n_steps_done = 0.0, 0
                if rank == 0:
                    save_checkpoint(model_dir / CKPT_LATEST, state(epoch + 1, 0))
                    _write_metrics(model_dir / METRICS, rows)
                    tracker.log_epoch(row)
                    plot_progress(rows, model_dir / PROGRESS_PNG, class_names)
                    events.log_epoch(row)
                    log.info("%s", format_epoch_line(cfg["algo"], epoch + 1, num_epochs, row["train_loss"], row.get("mean_dice"), lr,
                                                     row["epoch_time_s"], eta_seconds([r["epoch_time_s"] for r in rows], epoch + 1, num_epochs)))
                if patience and stale >= patience:
                    log.info("early stop: no improvement in %d validations", patience)
                    stopped_early = True
                    break
                if _stop_requested(stop, dev):
                    raise RequeueRequested(f"signal {stop.signum or 'from another rank'}: checkpoint after epoch {epoch}")
    except RequeueRequested:
        tracker.pause()  # the requeued job resumes the same MLflow run
        raise
    except BaseException:
        tracker.fail()
        raise

    epochs = rows[-1]["epoch"] + 1 if rows else 0
    if rank == 0:
        save_checkpoint(model_dir / CKPT_FINAL, {"state_dict": _unwrap(model).state_dict(), "config": plain_cfg, "epoch": epochs - 1, "best_metric": best})
        if not (model_dir / CKPT_BEST).is_file():
            save_checkpoint(model_dir / CKPT_BEST, {"state_dict": _unwrap(model).state_dict(), "config": plain_cfg, "epoch": epochs - 1, "best_metric": best})
        best_row = next((r for r in rows if r["epoch"] == best_epoch), {})
        atomic_write_yaml(model_dir / PROGRESS_YAML, [{
            "best_avg_dice_score": float(best), "best_avg_dice_score_epoch": int(best_epoch),
            "best_avg_dice_score_class": best_row.get("dice"), "epochs_trained": int(epochs),
            "early_stopped": stopped_early,
        }])
        ignore_stop_signals("the fold is finished (progress.yaml written)")
        if not bool(cfg.get("keep_latest", False)):
            remove_sealed(model_dir / CKPT_LATEST)
        tracker.finish(best)
        events.close()
    if world > 1:
        torch.distributed.barrier()
    return TrainResult("finished", float(best), int(best_epoch), int(epochs), model_dir)


def _stop_requested(stop: StopFlag, dev: torch.device) -> bool:
    """This rank's flag, or any rank's under torchrun (all ranks stop at the same step)."""
    _, world = _dist()
    if world == 1:
        return bool(stop)
    t = torch.tensor([1.0 if stop else 0.0], device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/train.py run --config_file F [--key value ...]`` of every builtin bundle.

    Exit codes: 0 done (or already done), 75 stopped by a signal after a checkpoint.
    """
    catch_stop_signals_early()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_file, overrides = parse_cli_overrides(sys.argv[1:] if argv is None else argv)
    device = overrides.pop("device", None)
    try:
        train_bundle(config_file, overrides, device=device)
    except RequeueRequested as exc:
        log.warning("stopped for requeue: %s", exc)
        return exc.exit_code
    except PipelineError as exc:
        print(f"error: train: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


# ---- inference ----------------------------------------------------------------------
class BundlePredictor:
    """Softmax probabilities of one trained builtin bundle; the model is loaded once.

    Args:
        config_file: the bundle's ``hyper_parameters.yaml`` (or folder, or MONAI's list).
        device: default CUDA when available.
        checkpoint: ``model_best.pt`` (default) or ``model_final.pt``.
        override: ``sw_batch_size``, ``sw_overlap``, ``amp`` for inference.
    """

    def __init__(self, config_file: Any, device: str | torch.device | None = None, checkpoint: str = CKPT_BEST, **override: Any) -> None:
        bundle_cfg = load_config(config_file)
        model_dir = Path(bundle_cfg["ckpt_path"])
        path = model_dir / checkpoint
        if not path.is_file():
            path = model_dir / CKPT_FINAL
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no trained model ({CKPT_BEST} / {CKPT_FINAL}); train it first")
        ck = load_checkpoint(path)
        # the trained config (train: overrides included) decides network, roi and normalisation
        self.cfg = {**ck["config"], **{k: v for k, v in override.items() if k in ("sw_batch_size", "sw_overlap", "amp")}}
        self.device = torch.device(device) if device is not None else pick_device(None)
        self.model = build_network(self.cfg)
        self.model.load_state_dict(ck["state_dict"])
        self.model.to(self.device).eval()
        self._xf = None

    @torch.no_grad()
    def infer(self, image_file: str | os.PathLike[str] | dict[str, Any]) -> torch.Tensor:
        """Softmax ``[C, X, Y, Z]`` float32 (MetaTensor with the image's affine) on the input grid."""
        from monai import transforms as T
        from monai.inferers import sliding_window_inference

        if isinstance(image_file, dict):
            image_file = image_file["image"]
        if self._xf is None:
            lo, hi = (float(v) for v in self.cfg["intensity_bounds"])
            self._xf = T.Compose([
                T.LoadImage(ensure_channel_first=True, image_only=True),
                T.EnsureType(dtype=torch.float32),
                T.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            ])
        img = self._xf(str(image_file))
        amp = bool(self.cfg.get("amp", True)) and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=amp):
            logits = sliding_window_inference(
                img[None].to(self.device), [int(r) for r in self.cfg["roi_size"]], int(self.cfg.get("sw_batch_size", 1)),
                self.model, overlap=float(self.cfg.get("sw_overlap", 0.25)), mode="gaussian",
            )
        prob = torch.softmax(logits.float(), dim=1)[0].cpu()
        from monai.data import MetaTensor

        plain = prob.as_tensor() if isinstance(prob, MetaTensor) else prob
        return MetaTensor(plain, meta=dict(getattr(img, "meta", {})))  # the image's affine and file name


def predict_probabilities(bundle_dir: str | os.PathLike[str], image_path: str | os.PathLike[str], device: str | None = None) -> np.ndarray:
    """Softmax probabilities ``[C, X, Y, Z]`` (float32 numpy) of one image by one trained bundle.

    Loads the model each call: for many cases create one :class:`BundlePredictor`.
    """
    pred = BundlePredictor(Path(bundle_dir), device=device)
    return np.asarray(pred.infer(image_path).as_tensor().numpy(), dtype=np.float32)
