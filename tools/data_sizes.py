"""What convert downloads for the real challenge, from the crop tables (docs/data.md quotes this).

For every train crop of ``tests/data/real_crops.csv`` that converts at the target voxel
size (same planning code as convert: :func:`stages.convert.crops.plan_geometry`), the EM
s0 cut (``tests/data/em_s0.csv`` gives each dataset's EM s0 voxel size and translation)
and the EM s0 chunks it touches (uint8, chunk ``[64, 128, 128]`` = 1 MiB raw, the
challenge's EM layout), de-duplicated per dataset (nested and overlapping crops share
chunks); plus the crop's ``all`` label array at label s0 (uint8, one byte per voxel).

Compressed sizes need a compression ratio, which the tables do not give: the defaults
(``--em-ratio 1.5`` for Zstd on FIB-SEM uint8, which is noisy and compresses poorly;
``--label-ratio 20`` for label maps, mostly long runs) are assumptions, printed with the
result; the raw sizes are upper bounds. Times are sizes over an assumed sustained
bandwidth (``--mbps``, several values), not measurements.

Usage::

    python -m tools.data_sizes                # markdown table, 8 nm and 4 nm
    python -m tools.data_sizes --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
from itertools import product
from pathlib import Path
from typing import Any

from common.classes import DEFAULT_CLASSES
from common.ngff import Level
from stages.convert.crops import CropProblem, plan_geometry
from tools.realgeom import load_em_s0, load_real_crops

EM_CHUNK = (64, 128, 128)  # the challenge's EM chunking (docs: cellmap-data.md)
EM_HUGE = (1 << 30, 1 << 30, 1 << 30)  # the tables carry no EM shape; bounds are checked by convert itself


def sizes(target_nm: float, classes: tuple[str, ...] = tuple(DEFAULT_CLASSES)) -> dict[str, Any]:
    """Crops, EM chunks (deduplicated per dataset) and label voxels convert reads at ``target_nm``."""
    ems = load_em_s0()
    target = (None, target_nm, target_nm)
    chunks: dict[str, set[tuple[int, int, int]]] = {}
    crops, label_vox, skipped = 0, 0, 0
    for c in load_real_crops():
        if c.split != "train" or not set(classes) & set(c.classes):
            continue
        em_scale, em_t = ems[c.dataset]
        em = Level("s0", em_scale, em_t, EM_HUGE)  # type: ignore[arg-type]
        try:
            red = plan_geometry(c.level, [em], target)
        except CropProblem:
            skipped += 1
            continue
        crops += 1
        label_vox += math.prod(c.shape)
        ranges = [range(sl.start // k, -(-sl.stop // k)) for sl, k in zip(red.em_cut, EM_CHUNK)]
        chunks.setdefault(c.dataset, set()).update(product(*ranges))
    n_chunks = sum(len(v) for v in chunks.values())
    return {
        "target_nm": target_nm,
        "crops": crops,
        "not_converted": skipped,
        "datasets": len(chunks),
        "em_chunks": n_chunks,
        "em_raw_bytes": n_chunks * math.prod(EM_CHUNK),
        "label_raw_bytes": label_vox,
    }


def _gib(b: float) -> str:
    return f"{b / 2**30:,.1f} GiB"


def table(rows: list[dict[str, Any]], em_ratio: float, label_ratio: float, mbps: list[float]) -> str:
    head = [
        "target",
        "crops",
        "datasets",
        "EM s0 chunks",
        "EM raw",
        "labels raw",
        f"download (EM /{em_ratio:g}, labels /{label_ratio:g})",
    ]
    head += [f"time @ {m:g} MB/s" for m in mbps]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dl = r["em_raw_bytes"] / em_ratio + r["label_raw_bytes"] / label_ratio
        r["download_bytes"] = round(dl)
        times = []
        for m in mbps:
            s = dl / (m * 1e6)
            times.append(f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min")
        out.append(
            "| "
            + " | ".join(
                [
                    f"{r['target_nm']:g} nm",
                    str(r["crops"]),
                    str(r["datasets"]),
                    f"{r['em_chunks']:,}",
                    _gib(r["em_raw_bytes"]),
                    _gib(r["label_raw_bytes"]),
                    _gib(dl),
                    *times,
                ]
            )
            + " |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", type=float, nargs="+", default=[8.0, 4.0])
    ap.add_argument("--em-ratio", type=float, default=1.5, help="assumed Zstd ratio of EM chunks")
    ap.add_argument("--label-ratio", type=float, default=20.0, help="assumed compression ratio of label arrays")
    ap.add_argument("--mbps", type=float, nargs="+", default=[50.0, 200.0], help="assumed sustained MB/s")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = [sizes(t) for t in a.targets]
    print(table(rows, a.em_ratio, a.label_ratio, a.mbps))
    print(
        f"\nassumptions: EM uint8 chunks {list(EM_CHUNK)} (1 MiB raw), Zstd ratio {a.em_ratio:g}:1; `all` labels uint8 "
        f"at label s0, ratio {a.label_ratio:g}:1; chunks shared by crops of one dataset counted once; "
        f"train crops with >= 1 default class; times = size / bandwidth"
    )
    if a.json:
        a.json.write_text(
            json.dumps({"em_ratio": a.em_ratio, "label_ratio": a.label_ratio, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
