"""Sealed checkpoints: written durably with a size/sha256 sidecar, loaded without unpickling.

``checkpoint_latest.pt`` keeps the previous good version (``.prev``) until the new one is
durable; a torn or corrupt file (its sidecar disagrees, or torch cannot read it) falls back to
that version. Everything is loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TrainingFailed
from .fileio import atomic_path, atomic_write_text, read_json

log = logging.getLogger("cellmap.trainer")

CKPT_LATEST = "checkpoint_latest.pt"
CKPT_BEST = "model_best.pt"
CKPT_FINAL = "model_final.pt"

SIDECAR = ".sha256.json"  # <file>.sha256.json: {"size", "sha256"} of a sealed file
PREVIOUS = ".prev"  # <file>.prev: the previous good version, kept until the new one is durable


# ---- sealed files (moved here from common.io: only the trainer writes them) --------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_of(path: str | os.PathLike[str]) -> Path:
    """Where the size/sha256 record of ``path`` lives."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR)


def previous_of(path: str | os.PathLike[str]) -> Path:
    """Where the previous good version of ``path`` is kept."""
    p = Path(path)
    return p.with_name(p.name + PREVIOUS)


def verify_sealed(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not the file its sidecar describes (``None``: it is, or no sidecar).

    A file without a sidecar (written before sidecars existed) is not judged here.
    """
    p = Path(path)
    if not p.is_file():
        return "missing"
    side = sidecar_of(p)
    if not side.is_file():
        return None
    try:
        rec = read_json(side)
        size, sha = int(rec["size"]), str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable size/sha256 record"
    actual = p.stat().st_size
    if actual != size:
        return f"{actual} bytes, {size} expected (torn)"
    if file_sha256(p) != sha:
        return "sha256 differs from its record (corrupt)"
    return None


@contextlib.contextmanager
def sealed_path(path: str | os.PathLike[str], keep_previous: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_path` for large files that must survive crashes: the new file is
    fsynced, described by a size/sha256 sidecar, and renamed into place with a directory
    fsync. With ``keep_previous`` the current good file becomes ``<name>.prev`` (with its
    sidecar) first, so a reader always finds one whole version (:func:`sealed_candidates`).
    """
    final = Path(path)
    with atomic_path(final, durable=True) as tmp:
        yield tmp
        record = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        if keep_previous and final.is_file() and verify_sealed(final) is None:
            prev = previous_of(final)
            os.replace(final, prev)
            if sidecar_of(final).is_file():
                os.replace(sidecar_of(final), sidecar_of(prev))
            else:
                sidecar_of(prev).unlink(missing_ok=True)
        # the old record goes before the rename and the new one comes after it: a crash in
        # between leaves a whole file without a record (trusted, as before sidecars existed),
        # never a record describing another file
        sidecar_of(final).unlink(missing_ok=True)
    atomic_write_text(sidecar_of(final), json.dumps(record, sort_keys=True) + "\n")


def sealed_candidates(path: str | os.PathLike[str]) -> list[tuple[Path, str | None]]:
    """``[(file, why it is unusable or None)]`` for ``path`` and its ``.prev``, existing ones only."""
    out = []
    for p in (Path(path), previous_of(path)):
        if p.is_file():
            out.append((p, verify_sealed(p)))
    return out


def remove_sealed(path: str | os.PathLike[str]) -> None:
    """Delete a sealed file with its sidecar and previous version."""
    for p in (Path(path), previous_of(path)):
        p.unlink(missing_ok=True)
        sidecar_of(p).unlink(missing_ok=True)


# ---- checkpoints ---------------------------------------------------------------------
def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, fsync, rename, fsync the directory, then a
    size/sha256 sidecar: never a partial checkpoint under the final name, and a torn one is
    detected. ``checkpoint_latest.pt`` keeps the previous good one (``.prev``) until the new
    one is durable."""
    with sealed_path(path, keep_previous=path.name == CKPT_LATEST) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints without unpickling arbitrary objects.

    A torn or corrupt file (its size/sha256 sidecar disagrees, or torch cannot read it) falls
    back to the previous good version (``<name>.prev``) with one warning line.

    Raises:
        TrainingFailed: neither the file nor its previous version can be loaded (one line).
    """
    problems: list[str] = []
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
    raise TrainingFailed(f"{path}: no usable checkpoint ({'; '.join(problems) or 'missing'})")


def load_resumable(path: Path) -> dict[str, Any] | None:
    """The checkpoint to resume from, or ``None`` to start the fold afresh: when no version
    of ``path`` can be loaded, the unusable files are set aside (``*.torn``) with one line."""
    if not sealed_candidates(path):
        return None
    try:
        return load_checkpoint(path, "cpu")  # RNG states must stay CPU tensors
    except TrainingFailed as exc:
        for cand, _ in sealed_candidates(path):
            with contextlib.suppress(FileNotFoundError):  # another rank set it aside first
                os.replace(cand, cand.with_name(cand.name + ".torn"))
        log.warning("%s; set aside as *.torn, the fold starts again from epoch 0", exc)
        return None


# ---- RNG states (exact resume) ---------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Torch, numpy, Python (and CUDA) RNG states as tensors and plain data (weights_only-safe)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy (MT19937) form: never the dict one for the global RandomState
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
