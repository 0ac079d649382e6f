"""Device choice and torchrun (DDP) helpers of the trainer."""

from __future__ import annotations

import os

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the torchrun process group (``WORLD_SIZE`` > 1), NCCL on CUDA, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (or requested), else CPU."""
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, torch.nn.Module) else model
