"""The train/validation split: drawn once, stored in ``nifti_data/split.json``, then reused.

* ``num_folds: 1`` -- a seeded draw per crop (``u < validation_fraction`` -> fold 0 =
  validation, else fold 1 = train); at least one validation and one training crop when
  there are two or more.
* ``num_folds: K > 1`` -- folds 0..K-1, crops taken in seeded order, each to the
  currently smallest fold.
* ``split.datasplit_csv`` -- the challenge's file: ``validate`` -> fold 0, ``train`` ->
  fold 1; crops it does not list are left out of the datalist (with a warning).

Each crop's draw depends only on the seed and its own name, and stored assignments are
never changed, so crops added later never reshuffle the existing ones.
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from common.config import PipelineConfig
from common.errors import PipelineError
from common.io import atomic_write_json, read_json

log = logging.getLogger("cellmap.convert")
_CROP_IN_PATH = re.compile(r"crop(\d+)")


def case_draw(seed: int, case: str) -> float:
    """The case's uniform draw in [0, 1): a function of the seed and the name only."""
    return float(np.random.default_rng([seed, zlib.crc32(case.encode())]).random())


def read_datasplit_csv(path: str | Path) -> dict[tuple[str, str], str]:
    """``(dataset, crop id) -> "train" | "validate"`` from a challenge ``datasplit.csv``.

    Raises:
        PipelineError: unreadable file or a malformed row (one line, with the row number).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"{p}: cannot read datasplit csv ({exc.strerror})") from None
    out: dict[tuple[str, str], str] = {}
    for n, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 5 or row[0] not in ("train", "validate"):
            raise PipelineError(f"{p}:{n}: expected 5 fields starting with train|validate, got {row!r}")
        m = _CROP_IN_PATH.search(row[4])
        if m is None:
            raise PipelineError(f"{p}:{n}: no crop<id> in {row[4]!r}")
        dataset = Path(row[3].rstrip("/")).name.removesuffix(".zarr")
        out[(dataset, m.group(1))] = row[0]
    return out


def _method(cfg: PipelineConfig) -> dict[str, Any]:
    s = cfg.split
    if s.datasplit_csv:
        return {"method": "datasplit_csv", "datasplit_csv": s.datasplit_csv}
    if cfg.num_folds > 1:
        return {"method": "kfold", "num_folds": cfg.num_folds, "seed": s.seed}
    return {"method": "draw", "validation_fraction": s.validation_fraction, "seed": s.seed}


def update_split(path: Path, cases: list[tuple[str, str, str]], cfg: PipelineConfig) -> dict[str, int | None]:
    """Folds of the training ``cases`` (``(case, dataset, crop)``), stored in ``path``.

    Existing assignments are kept; new cases are assigned and appended. Returns
    ``case -> fold`` (``None``: not in the datasplit csv, left out of the datalist).
    """
    method = _method(cfg)
    stored: dict[str, Any] = {}
    if path.is_file():
        try:
            stored = read_json(path)
        except (OSError, ValueError):
            raise PipelineError(f"{path}: unreadable split file; delete it to draw the split again") from None
        if stored.get("split") != method:
            log.warning("%s was written for %s, not %s: keeping it (delete it to redraw)", path, stored.get("split"), method)
    folds: dict[str, int | None] = dict(stored.get("folds", {}))
    new = [c for c in cases if c[0] not in folds]
    split = stored.get("split", method)
    if split["method"] == "datasplit_csv":
        table = read_datasplit_csv(split["datasplit_csv"])
        for case, ds, crop in new:
            which = table.get((ds, crop))
            folds[case] = None if which is None else (0 if which == "validate" else 1)
            if which is None:
                log.warning("%s is not in %s: left out of the datalist", case, split["datasplit_csv"])
    elif split["method"] == "kfold":
        k = int(split["num_folds"])
        counts = [sum(1 for f in folds.values() if f == i) for i in range(k)]
        for case, _, _ in sorted(new, key=lambda c: (case_draw(split["seed"], c[0]), c[0])):
            f = counts.index(min(counts))
            folds[case] = f
            counts[f] += 1
    else:
        frac, seed = float(split["validation_fraction"]), int(split["seed"])
        draws = {c[0]: case_draw(seed, c[0]) for c in new}
        for case, u in draws.items():
            folds[case] = 0 if u < frac else 1
        if len(folds) >= 2 and draws:
            values = list(folds.values())
            if 0 not in values:  # Auto3DSeg needs a validation fold
                folds[min(draws, key=lambda c: (draws[c], c))] = 0
            elif 1 not in values:
                folds[max(draws, key=lambda c: (draws[c], c))] = 1
    if new or not path.is_file():
        atomic_write_json(path, {"split": split, "folds": dict(sorted(folds.items()))})
    return folds
