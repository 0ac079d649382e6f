"""Stop signals of a training job (SIGUSR1 from ``--signal=B:USR1@N``, SIGTERM at the limit).

Kept free of heavy imports so the CLI can catch a signal before torch is even imported.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EARLY: list[int] = []  # signals that arrived before the training loop took over


def _early_handler(signum: int, _frame: Any) -> None:
    EARLY.append(signum)


def catch_stop_signals_early() -> None:
    """Remember SIGUSR1/SIGTERM arriving while starting up (imports, data, model), so they
    stop the run after its first step instead of killing it (their default action)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _early_handler)
