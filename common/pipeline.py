"""The one pipeline definition: ordered stages, their image, fan-out and marker names (torch-free).

``slurm.submit`` (stage order, images, fan-out), ``slurm.profiles`` (stage names), the demo
(``tools/demo.py``) and the container scripts (``python -m common.pipeline images``) derive
from :data:`STAGES`; the algorithms a per-algorithm stage fans out over come from
:mod:`common.algorithms` (through the config's ``algos``).

Usage::

    python -m common.pipeline stages            # convert analyze bundlegen train ensemble
    python -m common.pipeline images            # the stage images, in build order
    python -m common.pipeline images --device cpu   # convert analyze bundlegen
    python -m common.pipeline base IMAGE        # base-cpu or base-cuda
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Device = Literal["cpu", "cuda"]
#: ``one``: a single job; ``shards``: an optional array of shards plus a merge job (``--shard i/n``,
#: then ``--merge``); ``algo_fold``: one job per algorithm and fold.
Fanout = Literal["one", "shards", "algo_fold"]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage (``python -m stages.<name>``, its section in ``pipeline.yaml``).
        image: the container image (``<prefix>/<image>:<version>``, ``<image_dir>/<image>.sif``) it
            runs in; ``None`` = not packaged, runs from a checkout.
        device: ``cpu`` (image built FROM base-cpu, CPU torch or none) or ``cuda`` (FROM base-cuda).
        fanout: how many jobs a run is (see :data:`Fanout`).
        marker: the stage's done marker (``<wd>/markers/<marker>.json``); ``{algo}``/``{fold}``
            fields for a per-algorithm stage; ``None`` = the stage writes none.
        part_marker: marker of one part of the stage (a shard, a bundle), formatted with
            ``shard``/``of`` or ``algo``/``fold``; ``None`` = no parts.
        in_chain: part of the chain ``slurm.submit`` runs (else run on demand: predict, evaluate).
        summary: one line saying what the stage does (``cellmap-a3ds --help`` lists it).
    """

    name: str
    image: str | None
    device: Device
    fanout: Fanout
    marker: str | None
    part_marker: str | None = None
    in_chain: bool = True
    summary: str = ""

    def marker_names(self, algos: Iterable[str] = (), num_folds: int = 0) -> list[str]:
        """The done markers a finished run of this stage leaves (its parts' markers not included)."""
        if self.marker is None:
            return []
        if self.fanout == "algo_fold":
            return [self.marker.format(algo=a, fold=f) for a in algos for f in range(num_folds)]
        return [self.marker]


STAGES: tuple[Stage, ...] = (
    Stage(
        "convert",
        "convert",
        "cpu",
        "shards",
        "convert",
        part_marker="convert.shard-{shard}-of-{of}",
        summary="CellMap zarr crops -> NIfTI images/labels + datalist.json.",
    ),
    Stage(
        "analyze", "analyze", "cpu", "one", "analyze", summary="Dataset statistics (MONAI DataAnalyzer) and a report."
    ),
    Stage(
        "bundlegen",
        "bundlegen",
        "cpu",
        "one",
        "bundlegen",
        part_marker="bundlegen.{algo}_{fold}",
        summary="input.yaml and one MONAI bundle per algorithm and fold.",
    ),
    Stage(
        "train",
        "train",
        "cuda",
        "algo_fold",
        "train.{algo}_{fold}",
        summary="Train the bundles of one algorithm (exact resume).",
    ),
    Stage(
        "ensemble",
        "ensemble",
        "cuda",
        "one",
        "ensemble",
        summary="Ensemble the trained bundles, score, optionally export.",
    ),
    # on demand: predict runs in the ensemble image (same code and resources); evaluate is not packaged
    Stage(
        "predict",
        "ensemble",
        "cuda",
        "shards",
        None,
        in_chain=False,
        summary="Segment a volume with the trained bundles, block by block.",
    ),
    Stage(
        "evaluate", None, "cpu", "one", None, in_chain=False, summary="Score a submission with the challenge's metric."
    ),
)
_BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    """The stage called ``name``.

    Raises:
        KeyError: unknown stage.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (known: {', '.join(_BY_NAME)})") from None


def chain() -> tuple[Stage, ...]:
    """The stages ``slurm.submit`` runs, in order."""
    return tuple(s for s in STAGES if s.in_chain)


def chain_names() -> tuple[str, ...]:
    """Names of :func:`chain` (``convert``, ``analyze``, ``bundlegen``, ``train``, ``ensemble``)."""
    return tuple(s.name for s in chain())


def images(device: Device | None = None) -> tuple[str, ...]:
    """The stage images, each once, in pipeline order (optionally only one device's)."""
    out: list[str] = []
    for s in STAGES:
        if s.image and s.image not in out and (device is None or s.device == device):
            out.append(s.image)
    return tuple(out)


def image_device(image: str) -> Device:
    """``cpu`` or ``cuda``: the base an image is built on.

    Raises:
        KeyError: no stage runs in ``image``.
    """
    for s in STAGES:
        if s.image == image:
            return s.device
    raise KeyError(f"unknown image {image!r} (known: {', '.join(images())})")


def expected_markers(algos: Iterable[str], num_folds: int) -> list[str]:
    """The done markers a finished chain leaves, in order (what a status view lists)."""
    algos = list(algos)
    return [m for s in chain() for m in s.marker_names(algos, num_folds)]


def main(argv: list[str] | None = None) -> int:
    """``python -m common.pipeline stages|images [--device cpu|cuda]|base IMAGE``: names, one a line."""
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m common.pipeline stages | images [--device cpu|cuda] | base IMAGE"
    if args[:1] == ["stages"] and len(args) == 1:
        print("\n".join(chain_names()))
    elif args[:1] == ["images"] and len(args) in (1, 3) and (len(args) == 1 or args[1] == "--device"):
        device = args[2] if len(args) == 3 else None
        if device not in (None, "cpu", "cuda"):
            print(usage, file=sys.stderr)
            return 2
        print("\n".join(images(device)))  # type: ignore[arg-type]
    elif args[:1] == ["base"] and len(args) == 2:
        try:
            print(f"base-{image_device(args[1])}")
        except KeyError as exc:
            print(exc.args[0], file=sys.stderr)
            return 2
    else:
        print(usage, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
