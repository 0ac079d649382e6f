"""A bundle's ``configs/hyper_parameters.yaml`` as the trainer reads it, and the CLI overrides.

(Not ``common.config.load_config``, which reads the pipeline's ``pipeline.yaml``.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .fileio import read_yaml

HYPER_PARAMETERS = "hyper_parameters.yaml"  # the same name as training.autoconfig.HYPER_PARAMETERS (generation side)


def find_hyper_parameters(config_file: str | os.PathLike[str] | Sequence[str] | None) -> Path:
    """``configs/hyper_parameters.yaml`` from a file, a list of files (MONAI passes every
    file of ``configs/``), a comma-joined string, or a bundle folder."""
    if config_file is None:
        raise ValueError("no config_file given")
    if isinstance(config_file, (str, os.PathLike)):
        items = [s for s in str(config_file).split(",") if s]
    else:
        items = [str(c) for c in config_file]
    for it in items:
        p = Path(it)
        if p.is_dir():
            p = p / "configs" / HYPER_PARAMETERS
        if p.name == HYPER_PARAMETERS and p.is_file():
            return p
    raise FileNotFoundError(f"no {HYPER_PARAMETERS} in {items}")


def read_hyper_parameters(
    config_file: str | os.PathLike[str] | Sequence[str], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle's hyper-parameters with ``overrides`` (e.g. ``pipeline.yaml``'s ``train:``)
    applied; a mapping override (``network``) is merged key by key."""
    cfg = read_yaml(find_hyper_parameters(config_file)) or {}
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def _parse_value(text: str) -> Any:
    """YAML value, plus the ``1e-3`` floats YAML 1.1 leaves as strings, and the quoted
    ``'32,32,16'`` lists MONAI's ``BundleAlgo.train`` passes (``--roi_size='32,32,16'``)."""
    val = yaml.safe_load(text)
    if isinstance(val, str):
        with contextlib.suppress(ValueError):
            return float(val)
        if "," in val:
            parts = [yaml.safe_load(p) for p in val.split(",")]
            if all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
                return parts
    return val


def parse_cli_overrides(args: Sequence[str]) -> tuple[str | None, dict[str, Any]]:
    """``run --config_file F --num_epochs 2 --roi_size [32,32,16]`` -> ``(F, {...})``.

    Values are parsed with ``yaml.safe_load`` so lists and numbers keep their type (MONAI's
    own ``BundleAlgo.train`` turns lists into strings; this parser does not).
    """
    args = list(args)
    if args and args[0] == "run":
        args = args[1:]
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}")
        key = a[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"{a} needs a value")
            val = args[i + 1]
            i += 2
        key = key.split("#")[-1]  # accept MONAI-style "training#num_epochs"
        out[key] = _parse_value(val) if key != "config_file" else val.strip("'\"")
    return out.pop("config_file", None), out
