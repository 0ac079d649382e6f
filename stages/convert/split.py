"""The train/validation(/test) split: drawn once, stored in ``nifti_data/split.json``, then reused.

Crops whose world boxes overlap (same dataset, positive overlap volume) form one
**group**, found transitively; every draw is per group (keyed by its first case name),
so a nested or overlapping pair never lands on both sides.

* ``split.test_fraction`` -- a seeded draw per group (its own stream) holds groups out
  as labelled ``testing`` items; they are in no fold.
* ``num_folds: 1`` -- a seeded draw per group (``u < validation_fraction`` -> fold 0 =
  validation, else fold 1 = train); at least one validation and one training group
  when there are two or more.
* ``num_folds: K > 1`` -- folds 0..K-1, groups taken in seeded order, each to the
  fold with the fewest crops.
* ``split.datasplit_csv`` -- the challenge's file: ``validate`` -> fold 0, ``train`` ->
  fold 1; crops it does not list are left out of the datalist (with a warning), and
  overlapping crops on both sides are reported (warning, and ``leaks`` in split.json).

A group's draw depends only on the seed and its key, and stored assignments are never
changed: a crop added later that overlaps stored crops joins their fold (or the test
set), a new group draws its own.
"""

from __future__ import annotations

import csv
import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
    extra = {"test_fraction": s.test_fraction, "seed": s.seed} if s.test_fraction > 0 else {}
    if s.datasplit_csv:
        return {"method": "datasplit_csv", "datasplit_csv": s.datasplit_csv, **extra}
    if cfg.num_folds > 1:
        return {"method": "kfold", "num_folds": cfg.num_folds, "seed": s.seed, **extra}
    return {"method": "draw", "validation_fraction": s.validation_fraction, "seed": s.seed, **extra}


Box = Sequence[Sequence[float]]  # [[lo, hi], ...] (z, y, x) nm, half-open


def boxes_overlap(a: Box, b: Box) -> bool:
    """Two half-open world boxes share a positive volume (touching faces do not count)."""
    return all(min(ah, bh) - max(al, bl) > 1e-9 * max(1.0, abs(ah)) for (al, ah), (bl, bh) in zip(a, b))


def overlapping_pairs(cases: Sequence[tuple[str, str, str]], boxes: Mapping[str, Box]) -> list[tuple[str, str]]:
    """Pairs of cases of one dataset whose boxes overlap (sorted names, sorted list)."""
    by_ds: dict[str, list[str]] = {}
    for case, ds, _ in cases:
        if case in boxes:
            by_ds.setdefault(ds, []).append(case)
    out = []
    for names in by_ds.values():
        names = sorted(names)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if boxes_overlap(boxes[a], boxes[b]):
                    out.append((a, b))
    return sorted(out)


def overlap_groups(cases: Sequence[tuple[str, str, str]], boxes: Mapping[str, Box]) -> list[list[str]]:
    """Connected components of the overlap relation; each sorted, listed by first name.

    A case without a box is a group of its own.
    """
    parent = {c[0]: c[0] for c in cases}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in overlapping_pairs(cases, boxes):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for case in parent:
        groups.setdefault(root(case), []).append(case)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def held_out_draw(seed: int, key: str) -> float:
    """The group's held-out draw in [0, 1): a stream apart from :func:`case_draw`."""
    return float(np.random.default_rng([seed, zlib.crc32(key.encode()), 1]).random())


@dataclass
class Split:
    """The stored split.

    Attributes:
        folds: case -> fold (``None``: not in the datasplit csv); held-out cases absent.
        test: cases held out by ``split.test_fraction`` (labelled testing items).
        groups: groups of two or more overlapping crops.
        leaks: overlapping pairs in different folds or across test/fold (an imported
            csv or an older stored split; a fresh draw has none).
    """

    folds: dict[str, int | None]
    test: list[str] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    leaks: list[list[str]] = field(default_factory=list)


def split_crops(
    path: Path, cases: list[tuple[str, str, str]], cfg: PipelineConfig, boxes: Mapping[str, Box] | None = None
) -> Split:
    """Assign the training ``cases`` (``(case, dataset, crop)``) and store the result in ``path``.

    Args:
        path: ``nifti_data/split.json``.
        cases: the converted crops that may train (explicit ``split.test_crops`` excluded).
        cfg: the configuration (``split``, ``num_folds``).
        boxes: case -> world box (``[[lo, hi]] * 3`` nm); cases without one overlap nothing.
    """
    boxes = boxes or {}
    method = _method(cfg)
    stored: dict[str, Any] = {}
    if path.is_file():
        try:
            stored = read_json(path)
        except (OSError, ValueError):
            raise PipelineError(f"{path}: unreadable split file; delete it to draw the split again") from None
        if stored.get("split") != method:
            log.warning(
                "%s was written for %s, not %s: keeping it (delete it to redraw)", path, stored.get("split"), method
            )
    split = stored.get("split", method)
    folds: dict[str, int | None] = dict(stored.get("folds", {}))
    test: set[str] = set(stored.get("test", []))
    before = (dict(folds), set(test))
    groups = overlap_groups(cases, boxes)
    seed = int(split.get("seed", 0))
    frac_test = float(split.get("test_fraction", 0.0))
    table = read_datasplit_csv(split["datasplit_csv"]) if split["method"] == "datasplit_csv" else {}
    where = {c[0]: c for c in cases}
    new_groups: list[list[str]] = []
    for g in groups:
        new = [c for c in g if c not in folds and c not in test]
        if not new:
            continue
        old = [c for c in g if c in folds or c in test]
        if old:  # join the stored crops it overlaps (the first one's side)
            first = old[0]
            for c in new:
                if first in test:
                    test.add(c)
                else:
                    folds[c] = folds[first] if split["method"] != "datasplit_csv" else _csv_fold(table, where[c], split)
            continue
        if frac_test > 0 and held_out_draw(seed, g[0]) < frac_test:
            test.update(g)
            continue
        new_groups.append(g)
    if split["method"] == "datasplit_csv":
        for g in new_groups:
            for c in g:
                folds[c] = _csv_fold(table, where[c], split)
    elif split["method"] == "kfold":
        k = int(split["num_folds"])
        counts = [sum(1 for f in folds.values() if f == i) for i in range(k)]
        for g in sorted(new_groups, key=lambda g: (case_draw(seed, g[0]), g[0])):
            f = counts.index(min(counts))
            for c in g:
                folds[c] = f
            counts[f] += len(g)
    else:
        frac = float(split["validation_fraction"])
        draws = {g[0]: case_draw(seed, g[0]) for g in new_groups}
        members = {g[0]: g for g in new_groups}
        for key, u in draws.items():
            for c in members[key]:
                folds[c] = 0 if u < frac else 1
        n_groups = len({min(g) for g in groups if any(c in folds for c in g)})
        if n_groups >= 2 and draws:
            values = list(folds.values())
            if 0 not in values:  # Auto3DSeg needs a validation fold
                for c in members[min(draws, key=lambda k: (draws[k], k))]:
                    folds[c] = 0
            elif 1 not in values:
                for c in members[max(draws, key=lambda k: (draws[k], k))]:
                    folds[c] = 1
    side = {**{c: ("fold", f) for c, f in folds.items() if f is not None}, **{c: ("test", None) for c in test}}
    leaks = [[a, b] for a, b in overlapping_pairs(cases, boxes) if a in side and b in side and side[a] != side[b]]
    for a, b in leaks:
        log.warning("overlapping crops on both sides of the split: %s (%s) and %s (%s)", a, side[a], b, side[b])
    multi = [g for g in groups if len(g) > 1]
    result = Split(folds, sorted(test), multi, leaks)
    content = {
        "split": split,
        "folds": dict(sorted(folds.items())),
        "test": sorted(test),
        "groups": multi,
        "leaks": leaks,
    }
    if (folds, test) != before or not path.is_file() or stored.get("groups") != multi or stored.get("leaks") != leaks:
        atomic_write_json(path, content)
    return result


def _csv_fold(table: dict[tuple[str, str], str], case: tuple[str, str, str], split: dict[str, Any]) -> int | None:
    which = table.get((case[1], case[2]))
    if which is None:
        log.warning("%s is not in %s: left out of the datalist", case[0], split["datasplit_csv"])
        return None
    return 0 if which == "validate" else 1


def update_split(
    path: Path, cases: list[tuple[str, str, str]], cfg: PipelineConfig, boxes: Mapping[str, Box] | None = None
) -> dict[str, int | None]:
    """``case -> fold`` of :func:`split_crops` (held-out cases are not in it)."""
    return split_crops(path, cases, cfg, boxes).folds
