"""Watching a run: a fold's progress read back from its bundle (what ``slurm.status`` shows), and
progress bars that turn into plain lines when the output is a log file, not a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

from common.workdir import CONFIGS_DIR, HYPER_PARAMETERS, MODEL_DIR

T = TypeVar("T")
METRICS = "metrics.jsonl"  # the per-epoch rows the trainer writes (training/reporting.py METRICS)


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


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a torn last line (written while we read) is skipped."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def fold_progress(bundle: Path, train_overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """How far a builtin fold is: ``{"epochs_done", "num_epochs", "eta_s", "mean_dice"}``.

    Read from the bundle's ``configs/hyper_parameters.yaml`` (``num_epochs``, ``ckpt_path``;
    the ``train:`` overrides win) and ``<ckpt_path>/metrics.jsonl``. ``None`` when the bundle
    has not written a metrics row yet or cannot be read.
    """
    try:
        hp = yaml.safe_load((bundle / CONFIGS_DIR / HYPER_PARAMETERS).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    if not isinstance(hp, dict):
        return None
    merged = {**hp, **(train_overrides or {})}
    try:
        num_epochs = int(merged.get("num_epochs", 0))
    except (TypeError, ValueError):
        return None
    ckpt = Path(str(hp.get("ckpt_path") or bundle / MODEL_DIR))
    if not ckpt.is_absolute():
        ckpt = bundle / ckpt
    rows = read_metrics(ckpt / METRICS)
    if not rows:
        return None
    done = rows[-1]["epoch"] + 1
    eta = eta_seconds(
        [float(r["epoch_time_s"]) for r in rows if isinstance(r.get("epoch_time_s"), (int, float))], done, num_epochs
    )
    validated = [r["mean_dice"] for r in rows if isinstance(r.get("mean_dice"), (int, float))]
    return {
        "epochs_done": done,
        "num_epochs": num_epochs,
        "eta_s": eta,
        "mean_dice": validated[-1] if validated else None,
    }


class _PlainProgress(Generic[T]):
    """Progress as log lines every ``every_s`` seconds (and at the end): no carriage returns."""

    def __init__(self, it: Iterable[T], desc: str, total: int | None, every_s: float, log: logging.Logger) -> None:
        self.it, self.desc, self.total, self.every_s, self.log = it, desc, total, every_s, log

    def __iter__(self) -> Iterator[T]:
        t0 = last = time.monotonic()
        n = 0
        for item in self.it:
            yield item
            n += 1
            now = time.monotonic()
            if now - last >= self.every_s:
                last = now
                self.log.info("%s: %s", self.desc, self._text(n, now - t0))
        if n:
            self.log.info("%s: %s (done)", self.desc, self._text(n, time.monotonic() - t0))

    def _text(self, n: int, elapsed: float) -> str:
        if self.total:
            eta = elapsed / n * (self.total - n) if n else None
            return f"{n}/{self.total} ({100 * n / self.total:.0f}%) {fmt_duration(elapsed)} ETA {fmt_duration(eta)}"
        return f"{n} {fmt_duration(elapsed)}"


def progress(
    it: Iterable[T],
    desc: str,
    total: int | None = None,
    every_s: float = 30.0,
    log: logging.Logger | None = None,
    enabled: bool = True,
    stream: Any = None,
    unit: str = "it",
    leave: bool = False,
) -> Iterable[T]:
    """Wrap a long loop: a tqdm bar on a terminal, a plain log line every ``every_s`` otherwise.

    SLURM logs are files, where tqdm's carriage returns pile up into one huge line. The
    arguments mirror tqdm's (``desc``, ``total``, ``unit``, ``leave``), so a loop changes
    ``tqdm(items, desc=...)`` into ``progress(items, desc=...)``.
    """
    if not enabled:
        return it
    stream = stream if stream is not None else sys.stderr
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    if getattr(stream, "isatty", lambda: False)():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(it, desc=desc, total=total, leave=leave, file=stream, unit=unit)
    return _PlainProgress(it, desc, total, every_s, log or logging.getLogger("cellmap.progress"))


class _PlainBar:
    """tqdm's ``update``/``close`` as plain log lines (loops that count by hand)."""

    def __init__(self, total: int | None, desc: str, every_s: float, log: logging.Logger) -> None:
        self.total, self.desc, self.every_s, self.log = total, desc, every_s, log
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s: %s", self.desc, _PlainProgress._text(self, self.n, now - self.t0))  # type: ignore[arg-type]

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        if self.n:
            self.log.info("%s: %s (done)", self.desc, _PlainProgress._text(self, self.n, time.monotonic() - self.t0))  # type: ignore[arg-type]


def progress_bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    every_s: float = 30.0,
    stream: Any = None,
    **tqdm_kwargs: Any,
) -> Any:
    """A bar updated by hand (``bar.update(); bar.close()``): tqdm on a terminal, plain lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    if enabled and getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    if not enabled:
        from tqdm import tqdm

        return tqdm(total=total, disable=True)
    return _PlainBar(total, desc, every_s, logging.getLogger("cellmap.progress"))
