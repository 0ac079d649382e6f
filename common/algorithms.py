"""The one registry of training algorithms (torch-free: no torch, no monai import).

Everything that differs between algorithms and is not the network code or the template
folder lives here: config validation (``common.config.ALGOS``), bundlegen, autoconfig
(patch size, batch, epochs), the trainer (through the keys autoconfig writes into each
bundle's ``hyper_parameters.yaml``), ``slurm.submit`` and the demo all read it.

Adding an algorithm = one :class:`AlgorithmSpec` (here for a builtin one, or
:func:`register` from a plugin/test) + one network factory + one template folder; see
``docs/development.md`` ("Adding an algorithm") and ``tests/test_registry.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

#: The official templates' epoch heuristics (``training.autoconfig.auto_num_epochs``), named after
#: the template they come from; a new algorithm picks the one whose sampling it resembles.
EpochsRule = Literal["segresnet", "swinunetr", "dints"]
EPOCHS_RULES: tuple[str, ...] = ("segresnet", "swinunetr", "dints")


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm.

    Attributes:
        name: the algorithm name used everywhere (``algos:``, ``--algo``, bundle folders
            ``<name>_<fold>``, markers ``train.<name>_<fold>``). MONAI loads the template's
            class ``<name>.scripts.algo.<Name>Algo``, so the template's ``algo.py`` names it so.
        network_factory: ``"module:function"`` building the ``torch.nn.Module`` from the
            bundle's resolved config dict. A leading dot is relative to the training library
            (``".networks:segresnet"``, resolved inside the bundle's own copy of it); anything
            else is an absolute import path (``"my_pkg.nets:tiny"``), imported with importlib.
        template: folder name of the template inside ``template_dir`` (default: ``name``).
        template_dir: folder holding ``template``; ``None`` = the builtin templates
            (``training/templates``). Only used with ``templates: builtin``: bundlegen stages the
            template into the work dir's ``algorithm_templates/<name>`` next to the builtin ones.
        roi_divisor: patch edges are multiples of this for the template's default network
            (the network down-samples by it); autoconfig rounds to it and writes it into the bundle.
        roi_min: smallest patch edge autoconfig picks (voxels).
        roi_max: largest patch edge autoconfig picks (voxels); ``None`` = only the memory budget
            and the median image shape limit it.
        roi_fit: ``"module:function"`` (same resolution as ``network_factory``) called at train
            time as ``fn(roi, network) -> roi`` when the divisor depends on the bundle's actual
            ``network`` section (e.g. fewer levels in a ``train: {network: ...}`` override);
            ``None`` = round each edge up to ``roi_divisor``.
        architecture_search: ``"module:function"`` (same resolution) run once before training as
            ``fn(cfg, model_dir, train_items, loss_fn, device)``: an architecture search that
            writes what the network factory then builds (DiNTS); ``None`` = no search.
        pretrained_loader: ``"module:function"`` (same resolution) called as ``fn(model, path)``
            at a fresh start when the bundle's ``pretrained_weights`` names a file (SwinUNETR's
            encoder); ``None`` = the algorithm takes no pretrained weights.
        voxels_per_gib: memory model: voxels of one patch (batch 1, AMP) that fit in 1 GiB of
            GPU memory; autoconfig sizes patch and batch as ``voxels_per_gib * target_gpu_mem_gb``.
        epochs_rule: which official template's epoch heuristic sets ``num_epochs``
            (one of :data:`EPOCHS_RULES`).
        shared_defaults: hyper-parameters this algorithm reads that every builtin bundle carries
            (so one pipeline-wide ``train:`` section can set them for all algorithms; the others
            ignore them). The template's ``configs/hyper_parameters.yaml`` still wins for its own.
        demo_network: a small ``network`` section for the CPU demo and tests (merged over every
            algorithm's, as the demo's ``train: {network: ...}``).
    """

    name: str
    network_factory: str
    template: str = ""
    template_dir: str | None = None
    roi_divisor: int = 16
    roi_min: int = 16
    roi_max: int | None = None
    roi_fit: str | None = None
    architecture_search: str | None = None
    pretrained_loader: str | None = None
    voxels_per_gib: int = 300_000
    epochs_rule: EpochsRule = "segresnet"
    shared_defaults: Mapping[str, Any] = field(default_factory=dict)
    demo_network: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.name.islower():
            raise ValueError(f"algorithm name {self.name!r}: lower-case Python identifier needed (MONAI imports it)")
        if not self.template:
            object.__setattr__(self, "template", self.name)
        for what in ("network_factory", "roi_fit", "architecture_search", "pretrained_loader"):
            path = getattr(self, what)
            if path is not None and (path.count(":") != 1 or not all(path.split(":"))):
                raise ValueError(f"{self.name}: {what} {path!r} is not 'module:function'")
        if self.roi_divisor < 1 or self.roi_min < 1 or (self.roi_max is not None and self.roi_max < self.roi_min):
            raise ValueError(f"{self.name}: roi rules need divisor >= 1, min >= 1, max >= min")
        if self.epochs_rule not in EPOCHS_RULES:
            raise ValueError(f"{self.name}: epochs_rule {self.epochs_rule!r} not one of {EPOCHS_RULES}")

    def bundle_keys(self) -> dict[str, Any]:
        """What autoconfig writes into a bundle so the trainer needs no registry (self-contained bundles)."""
        return {
            "network_factory": self.network_factory,
            "roi_divisor": self.roi_divisor,
            "roi_fit": self.roi_fit,
            "architecture_search": self.architecture_search,
            "pretrained_loader": self.pretrained_loader,
        }


# The builtin algorithms. Numbers moved unchanged from training/autoconfig.py and
# training/networks.py (memory model: measured roughly from the official templates' own sizing,
# segresnet 224*224*144 at 16 GiB, swinunetr/dints ~96^3 x 2).
_BUILTIN: tuple[AlgorithmSpec, ...] = (
    AlgorithmSpec(
        name="segresnet",
        network_factory=".networks:segresnet",
        roi_divisor=16,  # 2**(levels-1) of the default 5 levels
        roi_min=16,
        roi_fit=".networks:segresnet_fit_roi",
        voxels_per_gib=300_000,
        epochs_rule="segresnet",
        demo_network={"init_filters": 8, "blocks_down": [1, 1], "dsdepth": 2, "norm": "batch"},
    ),
    AlgorithmSpec(
        name="swinunetr",
        network_factory=".networks:swinunetr",
        roi_divisor=32,
        roi_min=64,  # its bottleneck (1/32) must hold more than one voxel for instance norm
        roi_fit=".networks:swinunetr_fit_roi",
        pretrained_loader=".networks:load_pretrained_swinunetr",
        voxels_per_gib=55_000,
        epochs_rule="swinunetr",
        shared_defaults={
            "pretrained_weights": None,  # swinunetr: a local weights file for the encoder (never downloaded)
        },
        demo_network={"feature_size": 12},
    ),
    AlgorithmSpec(
        name="dints",
        network_factory=".networks:dints",
        roi_divisor=32,  # 2**(num_depths+1) of the default 4 depths
        roi_min=32,
        roi_fit=".networks:dints_fit_roi",
        architecture_search=".trainer:dints_architecture",
        voxels_per_gib=60_000,
        epochs_rule="dints",
        shared_defaults={
            "search_epochs": None,  # dints: search length; None = num_epochs // 4, 0 = no search
            "search_warmup_fraction": 0.5,  # dints: share of the search that trains weights only
            "search_learning_rate": 0.025,  # dints: SGD learning rate of the search's weights
            "search_learning_rate_arch": 1.0e-3,  # dints: Adam learning rate of the architecture logits
            "search_ram_cost_factor": 0.8,  # dints: weight of the memory cost in the search loss
        },
        demo_network={"num_blocks": 4, "num_depths": 3, "channel_mul": 0.25, "search_channel_mul": 0.25},
    ),
)

_REGISTRY: dict[str, AlgorithmSpec] = {s.name: s for s in _BUILTIN}


def register(spec: AlgorithmSpec, replace: bool = False) -> AlgorithmSpec:
    """Add an algorithm (plugins, tests). Registration is per process: register before the
    config is loaded (``common.config`` validates ``algos`` against :func:`names`).

    Raises:
        ValueError: the name is taken and ``replace`` is false.
    """
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove an algorithm (tests); unknown names are ignored."""
    _REGISTRY.pop(name, None)


@contextmanager
def registered(spec: AlgorithmSpec) -> Iterator[AlgorithmSpec]:
    """``with registered(spec):`` the algorithm exists inside the block only."""
    register(spec)
    try:
        yield spec
    finally:
        unregister(spec.name)


def get(name: str) -> AlgorithmSpec:
    """The spec of ``name``.

    Raises:
        KeyError: unknown algorithm (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r} (known: {', '.join(names())})") from None


def names() -> tuple[str, ...]:
    """Registered algorithm names, builtins first, in registration order."""
    return tuple(_REGISTRY)


def specs() -> tuple[AlgorithmSpec, ...]:
    """Registered specs, in :func:`names` order."""
    return tuple(_REGISTRY.values())


def shared_defaults() -> dict[str, Any]:
    """Every registered algorithm's ``shared_defaults``, merged in registration order."""
    out: dict[str, Any] = {}
    for s in specs():
        out.update(s.shared_defaults)
    return out


def demo_network() -> dict[str, Any]:
    """Every registered algorithm's ``demo_network``, merged in registration order."""
    out: dict[str, Any] = {}
    for s in specs():
        out.update(s.demo_network)
    return out


class _LiveNames(Sequence[str]):
    """:func:`names` as a sequence that follows later registrations (``common.config.ALGOS``)."""

    def __getitem__(self, i: Any) -> Any:
        return names()[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __repr__(self) -> str:
        return repr(names())


#: The registered names, live (``list(NAMES)``, ``name in NAMES``); what ``common.config.ALGOS`` is.
NAMES: Sequence[str] = _LiveNames()

#: Environment variable naming modules (comma-separated) that register algorithms when this
#: module is imported: how a plugin reaches every stage process (train, submit, ...).
PLUGINS_ENV = "CELLMAP_A3DS_ALGORITHM_PLUGINS"


def _load_plugins() -> None:
    import importlib
    import os

    for mod in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(mod)


_load_plugins()
