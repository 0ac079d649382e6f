"""The one trainer of the builtin templates (segresnet, swinunetr, dints): the public entry.

A bundle's ``scripts/train.py`` and the train stage call :func:`train_bundle` (through
:func:`cli_main` for the script); a bundle's ``scripts/infer.py`` and the ensemble use
:class:`~.inference.BundlePredictor`. Both load the bundle's **own copy** of this package
(``<bundle>/scripts/cellmap_training``, written by bundlegen), so a trained bundle predicts with
the code it was trained with. The package is split by concern:

* :mod:`.hparams` - the bundle's hyper-parameters and the CLI overrides;
* :mod:`.data` - fold split, transforms, datasets, loaders;
* :mod:`.loop` - the epoch loop and its hooks (validation, checkpoints, reporting);
* :mod:`.checkpoint` - sealed checkpoints and RNG states; :mod:`.signals` - stop signals;
* :mod:`.inference` - :class:`BundlePredictor`, :func:`predict_probabilities`.

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

import json
import logging
import math
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    CKPT_BEST,
    CKPT_FINAL,
    CKPT_LATEST,
    load_checkpoint,
    load_resumable,
    remove_sealed,
    save_checkpoint,
)
from .data import datalist_split, epoch_batches, train_dataset
from .distributed import dist_info, init_distributed, pick_device
from .errors import ConfigError, RequeueRequested
from .fileio import atomic_write_text, atomic_write_yaml, read_json, read_yaml, remove_stale_tmp
from .hparams import parse_cli_overrides, read_hyper_parameters
from .inference import BundlePredictor, predict_probabilities
from .loop import Hooks, LoopState, Optimisation, plain, run_epochs
from .losses import LOSSES, MaskedSegLoss, loss_class_weights
from .networks import build_network, fit_roi, resolve
from .reporting import METRICS, PROGRESS_PNG, EventLog, read_metrics
from .signals import catch_stop_signals_early, ignore_stop_signals, stop_on_signals, stop_requested
from .validation import validate

__all__ = [
    "BundlePredictor",
    "CKPT_BEST",
    "CKPT_FINAL",
    "CKPT_LATEST",
    "PROGRESS_YAML",
    "TrainResult",
    "cli_main",
    "is_finished",
    "load_checkpoint",
    "load_resumable",
    "parse_cli_overrides",
    "predict_probabilities",
    "read_hyper_parameters",
    "save_checkpoint",
    "train_bundle",
    "validate",
]

log = logging.getLogger("cellmap.trainer")

PROGRESS_YAML = "progress.yaml"


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


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


ARCH_CODE = "arch_code.json"


def dints_architecture(
    cfg: dict[str, Any], model_dir: Path, train_items: list[dict[str, str]], loss_fn: torch.nn.Module, dev: torch.device
) -> None:
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
    search_epochs = cfg.get("search_epochs")
    if path.is_file():
        net["arch_code"] = read_json(path)["arch_code"]
    elif int(search_epochs if search_epochs is not None else max(1, int(cfg["num_epochs"]) // 4)) > 0:
        from .dints_search import search_dints

        with stop_on_signals() as stop:
            result = search_dints(
                cfg,
                train_items,
                loss_fn,
                dev,
                lambda: stop_requested(stop, dev),
                lambda items: train_dataset(cfg, items),
                lambda ds, e: epoch_batches(cfg, ds, e),
            )
        rank, world = dist_info()
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


def _resume(st: LoopState, run: Optimisation, model_dir: Path, pretrained: Any, cfg: dict[str, Any], rank: int) -> None:
    """Continue from ``checkpoint_latest.pt``, or start afresh (pretrained weights, old reports removed)."""
    ck = load_resumable(model_dir / CKPT_LATEST)
    if ck is not None:
        run.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
        run.sched.load_state_dict(ck["scheduler"])
        run.scaler.load_state_dict(ck["scaler"])
        st.epoch, st.step = int(ck["epoch"]), int(ck["step"])
        st.loss_sum, st.n_steps = float(ck["loss_sum"]), int(ck["n_steps"])
        st.best, st.best_epoch, st.stale = float(ck["best_metric"]), int(ck["best_epoch"]), int(ck["stale"])
        st.resume_rng = ck["rng"] if st.step > 0 else None
        log.info("%s: resuming at epoch %d step %d (best %.4f)", model_dir.parent.name, st.epoch, st.step, st.best)
    else:
        loader = cfg.get("pretrained_loader")  # the registry's capability, written into the bundle
        if pretrained and loader:
            resolve(str(loader))(run.model, str(pretrained))
        if rank == 0:
            for name in (METRICS, CKPT_BEST, PROGRESS_PNG):
                (model_dir / name).unlink(missing_ok=True)
    st.rows = [r for r in read_metrics(model_dir / METRICS) if r["epoch"] < st.epoch]


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
        ConfigError: bad hyper-parameters (exit 2). RequeueRequested: SIGUSR1/SIGTERM arrived;
        the state after the current step is saved (exit 75).
    """
    cfg = read_hyper_parameters(config_file, overrides)
    roi = fit_roi(cfg, list(cfg["roi_size"]))
    if roi != list(cfg["roi_size"]):
        log.warning("%s: roi_size %s rounded up to %s (what the network accepts)", cfg["algo"], cfg["roi_size"], roi)
        cfg["roi_size"] = roi
    model_dir = Path(cfg["ckpt_path"])
    model_dir.mkdir(parents=True, exist_ok=True)
    if is_finished(model_dir):
        prog = read_yaml(model_dir / PROGRESS_YAML)[-1]
        log.info(
            "%s: already finished (best mean Dice %.4f): skipping", model_dir.parent.name, prog["best_avg_dice_score"]
        )
        return TrainResult(
            "skipped",
            float(prog["best_avg_dice_score"]),
            int(prog.get("best_avg_dice_score_epoch", -1)),
            int(prog.get("epochs_trained", 0)),
            model_dir,
        )
    dev = pick_device(device)
    init_distributed(dev)
    rank, world = dist_info()
    if rank == 0:
        remove_stale_tmp(model_dir)
    seed = int(cfg.get("seed", 0))
    _seed_everything(seed)
    torch.backends.cudnn.benchmark = not bool(cfg.get("deterministic", True))

    if str(cfg.get("loss", "dicece")) not in LOSSES:
        raise ConfigError(f"train: loss must be one of {', '.join(LOSSES)}, got {cfg.get('loss')!r}")
    pretrained = cfg.get("pretrained_weights")
    if pretrained and not Path(str(pretrained)).expanduser().is_file():
        raise ConfigError(f"{pretrained}: pretrained_weights file not found (nothing is downloaded; copy it there)")
    train_items, val_items = datalist_split(cfg)
    n_cls = int(cfg["output_classes"])
    loss_fn = MaskedSegLoss(
        n_cls, int(cfg.get("unknown_label", 0)), loss_class_weights(cfg), str(cfg.get("loss", "dicece"))
    ).to(dev)
    if cfg.get("architecture_search"):  # DiNTS: search, then train what the search chose
        resolve(str(cfg["architecture_search"]))(cfg, model_dir, train_items, loss_fn, dev)
        _seed_everything(seed)  # the search used the RNGs: training starts from the same state either way
    if world > 1:
        if not cfg.get("num_steps_per_epoch"):
            # every rank must run the same number of steps (DDP all-reduces each one)
            cfg["num_steps_per_epoch"] = max(1, math.ceil(len(train_items) / (int(cfg["batch_size"]) * world)))
        train_items = train_items[rank::world] or train_items
    train_ds = train_dataset(cfg, train_items)
    class_names = list(cfg.get("class_names") or [f"class{i}" for i in range(1, n_cls)])
    model = build_network(cfg).to(dev)
    num_epochs = int(cfg["num_epochs"])
    opt = torch.optim.AdamW(
        model.parameters(), lr=float(cfg["learning_rate"]), weight_decay=float(cfg.get("weight_decay", 1e-5))
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(num_epochs, int(cfg.get("warmup_epochs", 0))))
    amp = bool(cfg.get("amp", True)) and dev.type == "cuda"
    run = Optimisation(
        model,
        opt,
        sched,
        torch.amp.GradScaler("cuda", enabled=amp),
        loss_fn,
        dev,
        amp,
        float(cfg.get("max_grad_norm", 0) or 0),
    )
    st = LoopState()
    _resume(st, run, model_dir, pretrained, cfg, rank)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        run.model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    run.model.train()

    from .tracking import Tracker

    tracker = Tracker(plain(cfg), model_dir, enabled=rank == 0 and bool(cfg.get("mlflow", False)))
    hooks = Hooks(cfg, model_dir, run, val_items, class_names, tracker, EventLog(model_dir, enabled=rank == 0))
    try:
        with stop_on_signals() as stop:
            stopped_early = run_epochs(cfg, st, train_ds, run, hooks, stop)
    except RequeueRequested:
        tracker.pause()  # the requeued job resumes the same MLflow run
        raise
    except BaseException:
        tracker.fail()
        raise

    epochs = st.rows[-1]["epoch"] + 1 if st.rows else 0
    if rank == 0:
        hooks.save_model(CKPT_FINAL, epochs - 1, st.best)
        if not (model_dir / CKPT_BEST).is_file():
            hooks.save_model(CKPT_BEST, epochs - 1, st.best)
        best_row = next((r for r in st.rows if r["epoch"] == st.best_epoch), {})
        atomic_write_yaml(
            model_dir / PROGRESS_YAML,
            [
                {
                    "best_avg_dice_score": float(st.best),
                    "best_avg_dice_score_epoch": int(st.best_epoch),
                    "best_avg_dice_score_class": best_row.get("dice"),
                    "epochs_trained": int(epochs),
                    "early_stopped": stopped_early,
                }
            ],
        )
        ignore_stop_signals("the fold is finished (progress.yaml written)")
        if not bool(cfg.get("keep_latest", False)):
            remove_sealed(model_dir / CKPT_LATEST)
        tracker.finish(st.best)
        hooks.events.close()
    if world > 1:
        torch.distributed.barrier()
    return TrainResult("finished", float(st.best), int(st.best_epoch), int(epochs), model_dir)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/train.py run --config_file F [--key value ...]`` of every builtin bundle.

    Exit codes: 0 done (or already done), 1 failed, 2 bad config, 75 stopped by a signal after
    a checkpoint.
    """
    catch_stop_signals_early()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_file, overrides = parse_cli_overrides(sys.argv[1:] if argv is None else argv)
    device = overrides.pop("device", None)
    try:
        if config_file is None:  # what find_hyper_parameters raises for a missing --config_file
            raise ValueError("no config_file given")
        train_bundle(config_file, overrides, device=device)
    except RequeueRequested as exc:
        log.warning("stopped for requeue: %s", exc)
        return exc.exit_code
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if not isinstance(code, int):
            raise
        print(f"error: train: {' '.join(str(exc).split())}", file=sys.stderr)
        return code
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
