"""``train --gpus N`` fails loudly without usable CUDA; ``bench.gpu`` (make gpu-check) runs.

The CLI cases run the real stage on this CPU-only machine (torch ``+cpu``); the driver cases
(no driver, driver too old for the wheel's CUDA, too few devices) are decided by
:func:`stages.train.gpu.diagnose` from the facts a GPU node would report. The train image
(CUDA torch, no driver bound) is checked for real in ``test_images_cuda.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.train.gpu import CudaFacts, diagnose, require_gpus

ROOT = Path(__file__).resolve().parents[1]


def _facts(**kw: object) -> CudaFacts:
    base = {
        "torch_cuda": "13.0",
        "driver_cuda": 13000,
        "driver_version": "580.65.06",
        "visible": 2,
        "visible_env": "0,1",
    }
    return CudaFacts(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gpus", "facts", "expect"),
    [
        (1, _facts(), None),
        (2, _facts(), None),
        (0, _facts(torch_cuda=None, driver_cuda=None, visible=0), None),  # --gpus 0: CPU on purpose
        (1, _facts(torch_cuda=None, driver_cuda=None, visible=0), "this torch build has no CUDA"),
        (1, _facts(driver_cuda=None, driver_version=None, visible=0), "no NVIDIA driver (libcuda.so.1 not found)"),
        (
            1,
            _facts(driver_cuda=12040, driver_version="550.54.15", visible=0),
            "driver 550.54.15 supports CUDA up to 12.4 but this torch is built for CUDA 13.0 (driver >= 580)",
        ),
        (1, _facts(torch_cuda="12.6", driver_cuda=12040, driver_version="550.54.15"), None),  # cu126 flavour
        (2, _facts(visible=1, visible_env="3"), "only 1 CUDA device(s) visible (CUDA_VISIBLE_DEVICES='3')"),
        (1, _facts(visible=0, visible_env=""), "only 0 CUDA device(s) visible (CUDA_VISIBLE_DEVICES='')"),
    ],
)
def test_diagnose(gpus: int, facts: CudaFacts, expect: str | None) -> None:
    """Each missing piece is named, in order, with the fix and the CPU alternative."""
    got = diagnose(gpus, facts)
    if expect is None:
        assert got is None
    else:
        assert got is not None and expect in got and "\n" not in got
        assert got.startswith(f"--gpus {gpus}: ") and "--gpus 0" in got


def test_default_gpus_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Without --gpus the stage may fall back to the CPU, but says so."""
    require_gpus(None, _facts(driver_cuda=None, visible=0))
    assert "no usable CUDA, training on the CPU" in caplog.text
    with pytest.raises(Exception, match="no NVIDIA driver"):
        require_gpus(1, _facts(driver_cuda=None, visible=0))


def _train(wd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CELLMAP_A3DS_ALLOW_CPU"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "stages.train", "--work-dir", str(wd), "--algo", "segresnet", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_gpus_1_without_cuda_exits_2_one_line(tmp_path: Path) -> None:
    """This machine has no CUDA (CPU torch, no driver): ``--gpus 1`` is exit 2 and one line, at
    once, instead of days of CPU training; nothing is trained."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    res = _train(tmp_path / "wd", "--gpus", "1")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: train: --gpus 1: ") and "--gpus 0" in lines[0]
    assert not list((tmp_path / "wd").glob("segresnet_*"))


@pytest.mark.slow
def test_gpu_check_cpu_reduced_mode(tmp_path: Path) -> None:
    """``python -m bench.gpu --cpu``: every builtin algorithm, compute and the real loader, at the
    bundle's batch; JSON + table + plot; the GPU-only parts say why they skipped. A second run
    reuses the work dir and exercises bf16 autocast (slow on a CPU, so one algorithm)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    runs = {"fp32": ["--precision", "fp32"], "bf16": ["--algos", "segresnet", "--precision", "bf16"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.json"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.gpu",
                "--cpu",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--scratch",
                str(tmp_path / "scratch"),
                "--out",
                str(out),
                *extra,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        r = json.loads(out.read_text())
        algos = ["segresnet", "swinunetr", "dints"] if name == "fp32" else ["segresnet"]
        assert r["mode"] == "cpu-reduced" and sorted(r["algos"]) == sorted(algos)
        for algo, a in r["algos"].items():
            assert a["roi_size"] and a["batch_size"] >= 1 and a["target_gpu_mem_gb"] == 48.0
            row = a["precisions"][name]
            for feed in ("compute", "loader"):
                assert row[feed].get("samples_per_s", 0) > 0, (algo, feed, row[feed])
            assert row["loader_vs_compute"] > 0
        assert "skipped" in r["official_segresnet_epoch"] and "skipped" in r["ddp_smoke_gpus2"]
        assert out.with_suffix(".md").read_text().count("\n") == 2 + len(algos)
        assert out.with_suffix(".png").stat().st_size > 0


def test_gpu_check_without_gpu_says_why() -> None:
    """Not --cpu on a machine without CUDA: exit 2 with the cause (the same diagnosis as train)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU")
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--cpu" in res.stderr and "torch build has no CUDA" in res.stderr
