"""What a training run reports: ``metrics.jsonl``, ``progress.png``, TensorBoard events and the
one log line per epoch.

The epoch line, the ETA, the plot saving and the event log are deliberately small copies of
``common.progress`` / ``common.plots`` (same format): this package is copied into every
trained bundle and must run without this repository.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .fileio import atomic_path, atomic_write_text

METRICS = "metrics.jsonl"
PROGRESS_PNG = "progress.png"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (unreadable lines skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    """All rows, one key-sorted JSON line each, atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def fmt_duration(seconds: float | None) -> str:
    """``3725`` -> ``1h02m``; ``75`` -> ``1m15s``; ``None`` -> ``-``."""
    if seconds is None:
        return "-"
    s = int(round(max(0.0, seconds)))
    d, s = divmod(s, 86400)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def eta_seconds(epoch_times: Sequence[float], epochs_done: int, num_epochs: int) -> float | None:
    """Time left: the mean of the last (up to 5) epoch times times the epochs still to run."""
    times = [float(t) for t in epoch_times if t is not None and t >= 0][-5:]
    if not times or num_epochs <= 0:
        return None
    return sum(times) / len(times) * max(0, num_epochs - epochs_done)


def format_epoch_line(
    algo: str,
    epoch: int,
    num_epochs: int,
    loss: float,
    mean_dice: float | None,
    lr: float,
    epoch_time_s: float,
    eta_s: float | None,
) -> str:
    """The one log line per epoch (``epoch`` is 1-based here); ``mean Dice -`` when not validated."""
    dice = "-" if mean_dice is None else f"{mean_dice:.4f}"
    return (
        f"{algo} epoch {epoch}/{num_epochs} loss {loss:.4f} mean Dice {dice} lr {lr:.2e} "
        f"time {fmt_duration(epoch_time_s)} ETA {fmt_duration(eta_s)}"
    )


def plot_progress(rows: list[dict[str, Any]], out: Path, class_names: Sequence[str]) -> None:
    """``progress.png``: training loss, per-class validation Dice and learning rate per epoch
    (nothing without matplotlib)."""
    if not rows:
        return
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    try:
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
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)


class EventLog:
    """TensorBoard event files beside ``metrics.jsonl`` (``<model_dir>/events/``), when the
    ``tensorboard`` package is installed; otherwise nothing (metrics.jsonl stays the record)."""

    def __init__(self, model_dir: Path, enabled: bool = True) -> None:
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            return
        try:
            self.writer = SummaryWriter(log_dir=str(Path(model_dir) / "events"))
        except OSError as exc:
            logging.getLogger("cellmap.progress").warning("no TensorBoard events: %s", exc)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One metrics row: train loss, lr, epoch time, mean and per-class Dice."""
        if self.writer is None:
            return
        step = int(row["epoch"])
        for key in ("train_loss", "lr", "epoch_time_s", "samples_per_s", "mean_dice"):
            if isinstance(row.get(key), (int, float)):
                self.writer.add_scalar(key, float(row[key]), step)
        for name, v in (row.get("dice") or {}).items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"dice/{name}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
