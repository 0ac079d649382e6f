"""Network factories of the builtin templates, named by ``network_factory`` in the bundle config.

Which factory an algorithm uses is in the algorithm registry (``common/algorithms.py``);
autoconfig writes it into each bundle, so this module (part of the bundle's runtime) never
imports the registry.

Each template's ``configs/hyper_parameters.yaml`` carries a ``network`` mapping whose keys
are passed to the MONAI network (plus the channel counts, which come from the config).
Defaults are the official templates' sizes (research-contributions ``21ed8e5``); the CPU
demo and the tests shrink them through ``train: {network: {...}}``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger("cellmap.networks")

# official segresnet: SegResNetDS(init_filters 32, blocks_down (1,2,2,4,4), dsdepth 4)
SEGRESNET_DEFAULTS = {"init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "norm": "instance", "dsdepth": 4}
# official dints: TopologyInstance(channel_mul 1, 12 blocks, 4 depths); search space channel_mul 0.5
DINTS_DEFAULTS = {"num_blocks": 12, "num_depths": 4, "channel_mul": 1.0, "search_channel_mul": 0.5}


def segresnet(cfg: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``SegResNetDS`` with deep supervision (``dsdepth`` heads; 1 = off).

    In training mode the network returns ``dsdepth`` outputs (full resolution first); in
    eval mode only the main, full-resolution head (MONAI's own behaviour), so inference
    never sees the auxiliary heads.
    """
    from monai.networks.nets import SegResNetDS

    net = {**SEGRESNET_DEFAULTS, **(cfg.get("network") or {})}
    return SegResNetDS(
        spatial_dims=3,
        in_channels=1,
        out_channels=int(cfg["output_classes"]),
        init_filters=int(net["init_filters"]),
        blocks_down=tuple(net["blocks_down"]),
        norm=net["norm"],
        dsdepth=max(1, int(net["dsdepth"])),
    )


def swinunetr(cfg: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``SwinUNETR``; weights from ``pretrained_weights`` are loaded by the trainer
    (:func:`load_pretrained_swinunetr`), never downloaded."""
    from monai.networks.nets import SwinUNETR

    net = dict(cfg.get("network") or {})
    return SwinUNETR(
        in_channels=1,
        out_channels=int(cfg["output_classes"]),
        feature_size=int(net.get("feature_size", 48)),
        depths=tuple(net.get("depths", (2, 2, 2, 2))),
        num_heads=tuple(net.get("num_heads", (3, 6, 12, 24))),
        use_checkpoint=bool(net.get("use_checkpoint", False)),
        use_v2=bool(net.get("use_v2", False)),
    )


def load_pretrained_swinunetr(model: torch.nn.Module, path: str | Path) -> int:
    """Copy a local SwinUNETR checkpoint into ``model``, output head excluded (as the official
    template does with its ``swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt``).

    Accepts ``{"state_dict": {...}}`` or a plain state dict; a ``module.`` prefix is dropped.
    Tensors whose name or shape does not match are skipped.

    Returns:
        The number of tensors copied.

    Raises:
        ConfigError: the file is missing, unreadable, or nothing in it matches the network.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{p}: pretrained_weights file not found (nothing is downloaded; copy it there)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        raise ConfigError(f"{p}: cannot read pretrained_weights ({type(exc).__name__}: {exc})") from exc
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    own = model.state_dict()
    copied = 0
    with torch.no_grad():
        for k, v in sd.items():
            k = k[len("module.") :] if k.startswith("module.") else k
            if k.startswith("out.") or k not in own or not torch.is_tensor(v) or own[k].shape != v.shape:
                continue
            own[k].copy_(v)
            copied += 1
    if copied == 0:
        raise ConfigError(f"{p}: pretrained_weights holds no tensor of this SwinUNETR (feature_size/depths differ?)")
    model.load_state_dict(own)
    log.info("swinunetr: %d tensors loaded from %s (output head excluded)", copied, p)
    return copied


def dints_dense_code(num_blocks: int, num_depths: int) -> dict[str, Any]:
    """Every path on, every cell a 3x3x3 conv: the fallback when no searched code is given."""
    n_paths = 3 * num_depths - 2
    return {
        "code_a": np.ones((num_blocks, n_paths)).tolist(),
        "code_c": np.ones((num_blocks, n_paths), dtype=int).tolist(),
        "node_a": np.ones((num_blocks + 1, num_depths), dtype=int).tolist(),
    }


def dints_arch_code(net: dict[str, Any]) -> dict[str, Any]:
    """The architecture of a dints network config: ``network.arch_code`` (what the search
    wrote: ``code_a``, ``code_c``, ``node_a``), or the dense fallback."""
    code = net.get("arch_code")
    if code is None:
        return dints_dense_code(int(net["num_blocks"]), int(net["num_depths"]))
    if isinstance(code, (list, tuple)):  # [code_a, code_c] (older bundles): nodes all on
        code = {"code_a": code[0], "code_c": code[1]}
    if "node_a" not in code:
        code = {**code, "node_a": np.ones((int(net["num_blocks"]) + 1, int(net["num_depths"])), dtype=int).tolist()}
    return code


def dints(cfg: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``DiNTS`` on the ``TopologyInstance`` of ``network.arch_code`` (the searched one;
    the trainer runs the search first, see :mod:`training.dints_search`)."""
    from monai.networks.nets import DiNTS, TopologyInstance

    net = {**DINTS_DEFAULTS, **(cfg.get("network") or {})}
    code = dints_arch_code(net)
    topo = TopologyInstance(
        arch_code=[np.asarray(code["code_a"], dtype=np.float32), np.asarray(code["code_c"], dtype=np.int64)],
        channel_mul=float(net["channel_mul"]),
        num_blocks=int(net["num_blocks"]),
        num_depths=int(net["num_depths"]),
        use_downsample=True,
        device="cpu",
    )
    return DiNTS(
        dints_space=topo,
        in_channels=1,
        num_classes=int(cfg["output_classes"]),
        use_downsample=True,
        node_a=np.asarray(code["node_a"], dtype=int),
    )


def _round_up(roi: list[int], div: int) -> list[int]:
    return [int(-(-int(r) // div) * div) for r in roi]


def segresnet_fit_roi(roi: list[int], network: dict[str, Any]) -> list[int]:
    """segresnet: multiples of ``2**(levels-1)`` (levels = ``len(blocks_down)``)."""
    return _round_up(roi, 2 ** (len(network.get("blocks_down", SEGRESNET_DEFAULTS["blocks_down"])) - 1))


def dints_fit_roi(roi: list[int], network: dict[str, Any]) -> list[int]:
    """dints: multiples of ``2**(num_depths+1)``."""
    return _round_up(roi, 2 ** (int(network.get("num_depths", DINTS_DEFAULTS["num_depths"])) + 1))


def swinunetr_fit_roi(roi: list[int], network: dict[str, Any]) -> list[int]:
    """swinunetr: multiples of 32 with more than one voxel at 1/32 (its instance norms need it)."""
    out = _round_up(roi, 32)
    if int(np.prod([r // 32 for r in out])) < 2:
        out[int(np.argmax(out))] *= 2
    return out


def resolve(path: str) -> Callable[..., Any]:
    """The function named by ``"module:function"``.

    A leading dot is relative to this training library (``".networks:segresnet"``): resolved
    with a relative import, so a bundle's own copy of the library builds its own network. Any
    other path is absolute (``"my_pkg.nets:tiny"``) and imported with importlib.

    Raises:
        ConfigError: the path is malformed, or the module or function does not exist.
    """
    mod_name, _, fn_name = str(path).partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"network factory {path!r}: expected 'module:function'")
    try:
        mod = (
            importlib.import_module(mod_name, __package__)
            if mod_name.startswith(".")
            else importlib.import_module(mod_name)
        )
    except ImportError as exc:
        raise ConfigError(f"network factory {path!r}: cannot import {mod_name} ({exc})") from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"network factory {path!r}: {mod_name} has no function {fn_name}")
    return fn


def fit_roi(cfg: dict[str, Any], roi: list[int]) -> list[int]:
    """Round a patch size up to what the network accepts.

    The bundle's ``roi_fit`` (``fn(roi, network)``, e.g. :func:`segresnet_fit_roi`, whose divisor
    follows the ``network`` section) when set, else multiples of its ``roi_divisor``. Both keys
    are written by autoconfig from the algorithm registry; a bundle generated before they
    existed uses the builtin ``<algo>_fit_roi`` here.
    """
    net = dict(cfg.get("network") or {})
    if "roi_fit" in cfg or "roi_divisor" in cfg:
        rule = cfg.get("roi_fit")
    else:  # generated before the registry: the builtin rule of its algorithm
        rule = f".networks:{cfg['algo']}_fit_roi"
    if rule:
        return [int(r) for r in resolve(rule)(list(roi), net)]
    return _round_up(roi, int(cfg.get("roi_divisor", 1)))


def build_network(cfg: dict[str, Any]) -> torch.nn.Module:
    """The network of a bundle config: its ``network_factory`` (``"module:function"``, see
    :func:`resolve`), written by autoconfig from the algorithm registry; a bundle generated
    before that key existed uses the builtin factory named after its ``algo``."""
    path = cfg.get("network_factory") or f".networks:{cfg['algo']}"
    return resolve(path)(cfg)
