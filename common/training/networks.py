"""Network factories of the builtin templates, selected by ``algo`` in the bundle config.

Each template's ``configs/hyper_parameters.yaml`` carries a ``network`` mapping whose keys
are passed to the MONAI network (plus the channel counts, which come from the config).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def segresnet(cfg: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``SegResNetDS`` (deep supervision off: one output head)."""
    from monai.networks.nets import SegResNetDS

    net = dict(cfg.get("network") or {})
    return SegResNetDS(
        spatial_dims=3,
        in_channels=1,
        out_channels=int(cfg["output_classes"]),
        init_filters=int(net.get("init_filters", 32)),
        blocks_down=tuple(net.get("blocks_down", (1, 2, 2, 4, 4))),
        norm=net.get("norm", "instance"),
        dsdepth=1,
    )


def swinunetr(cfg: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``SwinUNETR`` (no pretrained weights: nothing is downloaded)."""
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


def dints_arch_code(num_blocks: int, num_depths: int, arch_code: Any = None) -> list[np.ndarray]:
    """The fixed default DiNTS architecture: every path on, every cell a 3x3x3 conv.

    ``arch_code`` (``[[paths per block], [cell op per block and path]]``) from a search run
    replaces it.
    """
    if arch_code is not None:
        return [np.asarray(arch_code[0], dtype=np.float32), np.asarray(arch_code[1], dtype=np.int64)]
    n_paths = 3 * num_depths - 2
    a = np.ones((num_blocks, n_paths), dtype=np.float32)
    c = np.full((num_blocks, n_paths), 1, dtype=np.int64)  # op 1 = conv_3x3x3
    return [a, c]


def dints(cfg: dict[str, Any]) -> torch.nn.Module:
    """MONAI ``DiNTS`` on a fixed ``TopologyInstance`` (search is not run at train time)."""
    from monai.networks.nets import DiNTS, TopologyInstance

    net = dict(cfg.get("network") or {})
    num_blocks = int(net.get("num_blocks", 8))
    num_depths = int(net.get("num_depths", 4))
    topo = TopologyInstance(
        arch_code=dints_arch_code(num_blocks, num_depths, net.get("arch_code")),
        channel_mul=float(net.get("channel_mul", 0.5)),
        num_blocks=num_blocks,
        num_depths=num_depths,
        use_downsample=True,
        device="cpu",
    )
    return DiNTS(dints_space=topo, in_channels=1, num_classes=int(cfg["output_classes"]), use_downsample=True)


def fit_roi(cfg: dict[str, Any], roi: list[int]) -> list[int]:
    """Round a patch size up to what the network accepts.

    segresnet: multiples of ``2**(levels-1)``; dints: multiples of ``2**(num_depths+1)``;
    swinunetr: multiples of 32 with more than one voxel at 1/32 (its instance norms need it).
    """
    net = dict(cfg.get("network") or {})
    algo = cfg["algo"]
    if algo == "segresnet":
        div = 2 ** (len(net.get("blocks_down", (1, 2, 2, 4, 4))) - 1)
    elif algo == "dints":
        div = 2 ** (int(net.get("num_depths", 4)) + 1)
    else:
        div = 32
    out = [int(-(-int(r) // div) * div) for r in roi]
    if algo == "swinunetr" and int(np.prod([r // 32 for r in out])) < 2:
        out[int(np.argmax(out))] *= 2
    return out


FACTORIES = {"segresnet": segresnet, "swinunetr": swinunetr, "dints": dints}


def build_network(cfg: dict[str, Any]) -> torch.nn.Module:
    """The network named by ``cfg['algo']``."""
    algo = cfg["algo"]
    if algo not in FACTORIES:
        raise ValueError(f"unknown algorithm {algo!r} (known: {', '.join(FACTORIES)})")
    return FACTORIES[algo](cfg)
