"""A fourth algorithm defined outside the repository's algorithm code (used by tests/test_registry.py).

Everything an algorithm needs besides its template folder: a registry entry
(:func:`tiny_spec`) and a network factory (:func:`tiny_net`), referenced by its absolute
dotted path so the bundle's trainer imports it with importlib.
"""

from __future__ import annotations

from typing import Any

import torch

from common.algorithms import AlgorithmSpec

NAME = "tiny"


def tiny_net(cfg: dict[str, Any]) -> torch.nn.Module:
    """Two 3-D convolutions: ``1 -> channels`` (3x3x3, ReLU) and ``channels -> output_classes`` (1x1x1)."""
    ch = int((cfg.get("network") or {}).get("channels", 4))
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, ch, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(ch, int(cfg["output_classes"]), kernel_size=1),
    )


def tiny_spec(template_dir: str) -> AlgorithmSpec:
    """The registry entry: the template folder ``<template_dir>/tiny_template``, patches of 8..16 voxels."""
    return AlgorithmSpec(
        name=NAME,
        network_factory="tests.tiny_algo:tiny_net",
        template="tiny_template",
        template_dir=template_dir,
        roi_divisor=8,
        roi_min=8,
        roi_max=16,
        voxels_per_gib=1_000_000,
        epochs_rule="segresnet",
        shared_defaults={"tiny_dropout": 0.0},  # a key of its own that every bundle then carries
        demo_network={"channels": 4},
    )
