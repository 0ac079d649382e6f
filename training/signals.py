"""Stop signals of a training job (SIGUSR1 from ``--signal=B:USR1@N``, SIGTERM at the limit): the
one place that installs handlers for them.

* :func:`catch_stop_signals_early` - while starting up (imports, data, model) a signal is only
  remembered in :data:`EARLY`, so it stops the run after its first step instead of killing it;
* :func:`stop_on_signals` - during training a signal sets a :class:`StopFlag` the loop checks
  after every optimizer step (an early signal sets it at once);
* :func:`ignore_stop_signals` - after the fold's final marker a signal is remembered, not fatal;
* :func:`stop_requested` - this rank's flag, or any rank's under torchrun.

Kept free of heavy imports so the CLI can catch a signal before torch is even imported.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("cellmap.trainer")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _shared_early() -> list[int]:
    # One list per process, shared by every copy of this library: the repo's ``training`` and each
    # bundle's vendored ``cellmap_training_<sha>`` (the train stage catches a start-up signal with
    # one copy and trains with another; the signal must not be lost between them).
    name = "_cellmap_stop_signals"
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name, "Stop signals received so far (shared by every copy of the trainer).")
        mod.early = []  # type: ignore[attr-defined]
        sys.modules[name] = mod
    return mod.early  # type: ignore[attr-defined,no-any-return]


EARLY: list[int] = _shared_early()  # signals that arrived while no training loop was listening


def _remember(signum: int, _frame: Any) -> None:
    EARLY.append(signum)


def _install(handler: Any) -> dict[int, Any]:
    """Install ``handler`` for the stop signals (main thread only); returns the previous handlers."""
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            old[s] = signal.signal(s, handler)
    return old


def catch_stop_signals_early() -> None:
    """Remember SIGUSR1/SIGTERM arriving while starting up (imports, data, model), so they
    stop the run after its first step instead of killing it (their default action)."""
    _install(_remember)


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

    old = _install(handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ignore_stop_signals(why: str) -> None:
    """From here on SIGUSR1/SIGTERM do not kill the process: after the final marker this fold
    is done, and dying now (exit 143) would make SLURM cancel the dependants of a finished
    fold. The signal is remembered (``EARLY``), so a next fold in the same run stops after
    its first step with a checkpoint, as a signal during start-up does."""

    def handler(signum: int, _frame: Any) -> None:
        EARLY.append(signum)
        log.warning("signal %d after the end: %s; not stopping", signum, why)

    _install(handler)


def stop_requested(stop: StopFlag, device: Any) -> bool:
    """This rank's flag, or any rank's under torchrun (all ranks stop at the same step)."""
    import torch

    if (
        not (torch.distributed.is_available() and torch.distributed.is_initialized())
        or torch.distributed.get_world_size() == 1
    ):
        return bool(stop)
    t = torch.tensor([1.0 if stop else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)
