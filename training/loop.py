"""The epoch loop of the builtin trainer, with its side effects behind a small hooks object.

:func:`run_epochs` owns the order of events that makes resume exact (re-seed per epoch, replay
the batches a stopped epoch already used, restore the RNG states at the stop, checkpoint after
the step a signal arrived in); :class:`Hooks` does validation, checkpoints and reporting, so
the loop reads top to bottom.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CKPT_BEST, CKPT_LATEST, rng_state, save_checkpoint, set_rng_state
from .data import epoch_batches
from .distributed import dist_info, unwrap
from .errors import RequeueRequested
from .losses import deep_supervision_loss
from .reporting import METRICS, PROGRESS_PNG, EventLog, eta_seconds, format_epoch_line, plot_progress, write_metrics
from .signals import StopFlag, stop_requested
from .validation import validate

log = logging.getLogger("cellmap.trainer")


def plain(obj: Any) -> Any:
    """Config values as plain YAML/JSON data (for checkpoints loaded with weights_only)."""
    return json.loads(json.dumps(obj, default=str))


@dataclass
class LoopState:
    """Where training stands; what ``checkpoint_latest.pt`` records besides the weights."""

    epoch: int = 0  # the epoch to start (or continue) with
    step: int = 0  # steps of that epoch already trained (a mid-epoch stop)
    loss_sum: float = 0.0
    n_steps: int = 0
    best: float = -1.0
    best_epoch: int = -1
    stale: int = 0  # validations without improvement (early stopping)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows so far
    resume_rng: dict[str, Any] | None = None  # global RNG states at a mid-epoch stop


@dataclass
class Optimisation:
    """Model, optimizer, scheduler, AMP scaler and loss of one run; :meth:`step` is one update."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    loss_fn: torch.nn.Module
    device: torch.device
    amp: bool
    max_norm: float

    def step(self, batch: dict[str, Any]) -> tuple[float, int]:
        """One optimizer step; returns ``(loss, samples)``."""
        img, lab = batch["image"].to(self.device), batch["label"].to(self.device)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            logits = self.model(img)  # segresnet in training mode: one tensor per deep-supervision head
        loss = deep_supervision_loss(self.loss_fn, logits, lab)
        self.scaler.scale(loss).backward()
        if self.max_norm > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach()), int(img.shape[0])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }


class Hooks:
    """Validation, checkpoints and reporting of the loop (rank 0 writes, every rank validates)."""

    def __init__(
        self,
        cfg: dict[str, Any],
        model_dir: Path,
        run: Optimisation,
        val_items: list[dict[str, str]],
        class_names: list[str],
        tracker: Any,
        events: EventLog,
    ) -> None:
        self.cfg, self.model_dir, self.run, self.val_items = cfg, model_dir, run, val_items
        self.class_names, self.tracker, self.events = class_names, tracker, events
        self.plain_cfg = plain(cfg)
        self.rank, self.world = dist_info()

    def validate(self) -> np.ndarray:
        """Pooled per-class Dice of the validation fold."""
        return validate(self.run.model, self.cfg, self.val_items, self.run.device)

    def checkpoint(self, st: LoopState, epoch: int, step: int) -> None:
        """``checkpoint_latest.pt``: everything needed to continue at ``epoch``/``step``."""
        if self.rank == 0:
            save_checkpoint(
                self.model_dir / CKPT_LATEST,
                {
                    **self.run.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "loss_sum": st.loss_sum,
                    "n_steps": st.n_steps,
                    "best_metric": st.best,
                    "best_epoch": st.best_epoch,
                    "stale": st.stale,
                    "rng": rng_state(),
                    "config": self.plain_cfg,
                },
            )

    def save_model(self, name: str, epoch: int, best: float) -> None:
        """``model_best.pt`` / ``model_final.pt``: weights, config, epoch, best metric."""
        if self.rank == 0:
            save_checkpoint(
                self.model_dir / name,
                {
                    "state_dict": unwrap(self.run.model).state_dict(),
                    "config": self.plain_cfg,
                    "epoch": epoch,
                    "best_metric": best,
                },
            )

    def epoch_done(self, rows: list[dict[str, Any]], num_epochs: int) -> None:
        """metrics.jsonl, MLflow, progress.png, TensorBoard and the epoch log line."""
        if self.rank != 0:
            return
        row = rows[-1]
        write_metrics(self.model_dir / METRICS, rows)
        self.tracker.log_epoch(row)
        plot_progress(rows, self.model_dir / PROGRESS_PNG, self.class_names)
        self.events.log_epoch(row)
        epoch = int(row["epoch"])
        log.info(
            "%s",
            format_epoch_line(
                self.cfg["algo"],
                epoch + 1,
                num_epochs,
                row["train_loss"],
                row.get("mean_dice"),
                row["lr"],
                row["epoch_time_s"],
                eta_seconds([r["epoch_time_s"] for r in rows], epoch + 1, num_epochs),
            ),
        )


def _progress(it: Iterable[Any], desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # optional: the bar is only a terminal nicety
        return it
    return tqdm(it, desc=desc, leave=False)


def train_epoch(
    cfg: dict[str, Any],
    st: LoopState,
    epoch: int,
    skip: int,
    train_ds: Any,
    run: Optimisation,
    hooks: Hooks,
    stop: StopFlag,
) -> int:
    """Train one epoch (the first ``skip`` batches are replayed, not trained); returns the samples trained.

    Raises:
        RequeueRequested: a stop signal arrived; ``checkpoint_latest.pt`` holds the state after this step.
    """
    n_samples = 0
    if skip == 0:
        st.loss_sum, st.n_steps = 0.0, 0
    batches = _progress(
        epoch_batches(cfg, train_ds, epoch), f"{cfg['algo']} epoch {epoch}", hooks.rank == 0 and sys.stderr.isatty()
    )
    for step, batch in enumerate(batches):
        if step < skip:
            if step == skip - 1 and st.resume_rng is not None:
                set_rng_state(st.resume_rng)  # the global RNGs as they were at the stop
            continue
        loss, n = run.step(batch)
        st.loss_sum += loss
        st.n_steps += 1
        n_samples += n
        if stop_requested(stop, run.device):
            hooks.checkpoint(st, epoch, step + 1)
            raise RequeueRequested(
                f"signal {stop.signum or 'from another rank'}: checkpoint at epoch {epoch} step {step + 1}"
            )
    return n_samples


def end_epoch(
    cfg: dict[str, Any],
    st: LoopState,
    epoch: int,
    n_samples: int,
    t0: float,
    train_time: float,
    run: Optimisation,
    hooks: Hooks,
) -> None:
    """Scheduler step, validation (every ``val_every``), best model, metrics row, checkpoint."""
    num_epochs = int(cfg["num_epochs"])
    lr = float(run.opt.param_groups[0]["lr"])
    run.sched.step()
    row: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": st.loss_sum / max(1, st.n_steps),
        "lr": lr,
        "steps": st.n_steps,
        "samples_per_s": round(n_samples * hooks.world / train_time, 4) if n_samples else None,
    }
    if (epoch + 1) % max(1, int(cfg.get("val_every", 1))) == 0 or epoch + 1 == num_epochs:
        dice = hooks.validate()
        mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
        row.update(
            dice={n: (None if np.isnan(v) else round(float(v), 5)) for n, v in zip(hooks.class_names, dice)},
            mean_dice=round(mean, 5),
        )
        if mean > st.best:
            st.best, st.best_epoch, st.stale = mean, epoch, 0
            hooks.save_model(CKPT_BEST, epoch, st.best)
        else:
            st.stale += 1
    row.update(best_metric=round(st.best, 5), epoch_time_s=round(time.perf_counter() - t0, 3))
    st.rows.append(row)
    st.loss_sum, st.n_steps = 0.0, 0
    hooks.checkpoint(st, epoch + 1, 0)
    hooks.epoch_done(st.rows, num_epochs)


def run_epochs(
    cfg: dict[str, Any], st: LoopState, train_ds: Any, run: Optimisation, hooks: Hooks, stop: StopFlag
) -> bool:
    """Train from ``st.epoch``/``st.step`` to ``num_epochs``; returns whether early stopping ended it.

    Raises:
        RequeueRequested: a stop signal arrived (checkpointed after the current step or epoch).
    """
    seed = int(cfg.get("seed", 0))
    patience = int(cfg.get("early_stop_patience", 0))
    start_epoch, start_step = st.epoch, st.step
    for epoch in range(start_epoch, int(cfg["num_epochs"])):
        torch.manual_seed(seed + epoch)
        t0 = time.perf_counter()
        n_samples = train_epoch(cfg, st, epoch, start_step if epoch == start_epoch else 0, train_ds, run, hooks, stop)
        end_epoch(cfg, st, epoch, n_samples, t0, time.perf_counter() - t0, run, hooks)
        if patience and st.stale >= patience:
            log.info("early stop: no improvement in %d validations", patience)
            return True
        if stop_requested(stop, run.device):
            raise RequeueRequested(f"signal {stop.signum or 'from another rank'}: checkpoint after epoch {epoch}")
    return False
