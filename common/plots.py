"""Matplotlib for report PNGs: headless backend, atomic saves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.io import atomic_path


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the headless Agg backend, or ``None`` without matplotlib.

    The convert image carries no matplotlib; callers there skip their plot.
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> None:
    """Write ``fig`` to ``path`` atomically (``savefig`` keyword arguments pass through), then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig)
    finally:
        plt.close(fig)
