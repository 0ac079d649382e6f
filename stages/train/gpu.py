"""Is CUDA usable for ``train --gpus N``? Fail loudly instead of training on the CPU for days.

``--gpus 0`` is the explicit CPU choice. ``--gpus N >= 1`` needs, in this order: a torch build
with CUDA (the train image has one; a ``+cpu`` wheel has none), an NVIDIA driver (``libcuda.so.1``,
bound into the container by ``apptainer --nv`` / ``docker --gpus``), a driver new enough for the
wheel's CUDA (CUDA 13.x needs driver >= 580, 12.x >= 525: NVIDIA's minor-version compatibility),
and N visible devices. The first missing one is reported as one line naming the cause and the fix
(exit 2). Without ``--gpus`` a node without CUDA trains on the CPU, with a warning.

The probe reads facts only (no CUDA context is created in this process, so ``torchrun``
children get clean devices); :func:`diagnose` is a pure function of them, tested on its own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import PipelineError

log = logging.getLogger("cellmap.train")

#: Oldest Linux driver per CUDA major version (NVIDIA minor-version compatibility).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
CPU_FIX = "pass --gpus 0 to train on the CPU on purpose"
#: Set to 1 to let ``--gpus N`` run on the CPU anyway (N > 1: N gloo ranks under torchrun): how the
#: tests exercise the DDP path on machines without GPUs. Never set it in a job script.
ALLOW_CPU_ENV = "CELLMAP_A3DS_ALLOW_CPU"


@dataclass(frozen=True)
class CudaFacts:
    """What :func:`probe` found about this process's CUDA.

    Attributes:
        torch_cuda: CUDA version the torch wheel was built for (``"13.0"``), None for a CPU wheel.
        driver_cuda: newest CUDA the driver supports (``cuDriverGetVersion``, 13000 = 13.0);
            None when ``libcuda.so.1`` cannot be loaded (no driver bound into the container).
        driver_version: the driver's version string (``"580.65.06"``) when readable.
        visible: CUDA devices torch sees (0 when CUDA is unusable).
        visible_env: ``CUDA_VISIBLE_DEVICES`` as set (None when unset).
    """

    torch_cuda: str | None
    driver_cuda: int | None
    driver_version: str | None
    visible: int
    visible_env: str | None


def _driver_cuda() -> int | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int(0)
    return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0 else None


def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def probe() -> CudaFacts:
    """Collect the facts (imports torch; creates no CUDA context)."""
    import torch

    torch_cuda = torch.version.cuda
    driver_cuda = _driver_cuda() if torch_cuda else None
    visible = torch.cuda.device_count() if torch_cuda and driver_cuda else 0
    return CudaFacts(torch_cuda, driver_cuda, _driver_version(), visible, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _major(version: str) -> int:
    return int(version.split(".")[0])


def diagnose(gpus: int, facts: CudaFacts) -> str | None:
    """Why ``gpus`` GPUs cannot be used, as one line with the fix; None when they can."""
    if gpus <= 0:
        return None
    if not facts.torch_cuda:
        return (
            f"--gpus {gpus}: this torch build has no CUDA (CPU-only wheel); run the train image "
            f"(apptainer run --nv train.sif) or install the CUDA torch wheel, or {CPU_FIX}"
        )
    need = MIN_DRIVER.get(_major(facts.torch_cuda))
    need_txt = f" (driver >= {need})" if need else ""
    if facts.driver_cuda is None:
        return (
            f"--gpus {gpus}: no NVIDIA driver (libcuda.so.1 not found); run on a GPU node with "
            f"apptainer run --nv (or docker/podman --gpus all), torch needs CUDA {facts.torch_cuda}"
            f"{need_txt}, or {CPU_FIX}"
        )
    drv_major, drv_minor = divmod(facts.driver_cuda, 1000)
    if drv_major < _major(facts.torch_cuda):
        drv = f"driver {facts.driver_version}" if facts.driver_version else "the NVIDIA driver"
        return (
            f"--gpus {gpus}: {drv} supports CUDA up to {drv_major}.{drv_minor // 10} but this torch "
            f"is built for CUDA {facts.torch_cuda}{need_txt}; update the driver, or build the images "
            f"with TORCH_FLAVOUR=cu126 (CUDA 12, driver >= 525; see docs/containers.md), or {CPU_FIX}"
        )
    if facts.visible < gpus:
        env = "unset" if facts.visible_env is None else repr(facts.visible_env)
        return (
            f"--gpus {gpus}: only {facts.visible} CUDA device(s) visible (CUDA_VISIBLE_DEVICES={env}); "
            f"request {gpus} GPU(s) from SLURM (--gres=gpu:{gpus}) and pass --nv, or {CPU_FIX}"
        )
    return None


def require_gpus(gpus: int | None, facts: CudaFacts | None = None) -> None:
    """Raise :class:`PipelineError` (exit 2) when ``--gpus gpus`` cannot be honoured.

    ``gpus=None`` (not given), or ``CELLMAP_A3DS_ALLOW_CPU=1``, only warns when training will
    fall back to the CPU.
    """
    if gpus == 0:
        return
    facts = facts or probe()
    problem = diagnose(max(gpus or 1, 1), facts)
    if problem is None:
        return
    if gpus is None or os.environ.get(ALLOW_CPU_ENV) == "1":
        log.warning("no usable CUDA, training on the CPU: %s", problem.split(": ", 1)[1])
        return
    raise PipelineError(problem)
