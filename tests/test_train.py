"""The train stage and the shared trainer, end to end on CPU with real bundles.

Every training runs through the real CLI (``python -m stages.train``) in a subprocess, on work
dirs made by the real convert-shaped blob dataset, MONAI's DataAnalyzer and the bundlegen stage.
Networks and patches are tiny so the whole file fits the CI budget on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["ecs", "pm", "mito_mem"]
# one network section for all three algorithms (each factory reads its own keys)
TINY_NET = {
    "init_filters": 8,
    "blocks_down": [1, 2, 2, 4],
    "feature_size": 12,
    "num_blocks": 2,
    "num_depths": 3,
    "channel_mul": 0.25,
}
TINY_TRAIN = {"num_epochs": 2, "roi_size": [32, 32, 16], "batch_size": 2, "num_workers": 0, "network": TINY_NET}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nifti_data (6 blob cases, unknown slab, 2 validation) + datastats, made once."""
    from monai.apps.auto3dseg import DataAnalyzer

    from tools.synthetic import make_blobs_dataset

    base = tmp_path_factory.mktemp("train_base")
    dl = make_blobs_dataset(base, n_cases=6, shape=(40, 40, 24), n_classes=3, n_val=2, seed=0)
    DataAnalyzer(
        str(dl), str(base / "nifti_data"), output_path=str(base / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    return base


def make_work(analysed: Path, dest: Path, algos: list[str], train: dict[str, Any]) -> Path:
    """A work dir with the shared data, a pipeline.yaml and bundles from the bundlegen stage."""
    from common.config import load_config
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen

    shutil.copytree(analysed / "nifti_data", dest / "nifti_data")
    for f in ("datastats.yaml", "datastats_by_case.yaml"):
        shutil.copy(analysed / f, dest / f)
    cfg = {
        "classes": CLASSES,
        "unknown_label": 255,
        "resolution_nm": 8,
        "algos": algos,
        "num_folds": 1,
        "templates": "builtin",
        "train": train,
    }
    (dest / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    run_bundlegen(WorkDir.at(dest), load_config(dest))
    return dest


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["CELLMAP_A3DS_ALLOW_CPU"] = "1"  # --gpus 2 runs as 2 CPU ranks (else: exit 2, no CUDA)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def train_cmd(wd: Path, algo: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--work-dir", str(wd), "--algo", algo, *extra]


def run_train(wd: Path, algo: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        train_cmd(wd, algo, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def marker(wd: Path, name: str) -> dict[str, Any]:
    return json.loads((wd / "markers" / f"{name}.json").read_text())


@pytest.mark.slow
def test_three_algorithms_train_concurrently(analysed: Path, tmp_path: Path) -> None:
    """segresnet, swinunetr and dints as three concurrent jobs on one work dir: each trains
    2 epochs, writes checkpoints, metrics and its done marker; MONAI sees them as trained."""
    from monai.apps.auto3dseg import import_bundle_algo_history

    algos = ["segresnet", "swinunetr", "dints"]
    wd = make_work(analysed, tmp_path / "work", algos, TINY_TRAIN)
    procs = {
        a: subprocess.Popen(
            train_cmd(wd, a), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for a in algos
    }
    outs = {a: p.communicate(timeout=400)[0] for a, p in procs.items()}
    for a, p in procs.items():
        assert p.returncode == 0, f"{a}:\n{outs[a][-3000:]}"
    for a in algos:
        model = wd / f"{a}_0" / "model"
        assert {"model_best.pt", "model_final.pt", "metrics.jsonl", "progress.png", "progress.yaml"} <= {
            p.name for p in model.iterdir()
        }
        assert not (model / "checkpoint_latest.pt").exists()  # pruned after a clean finish
        assert not [p for p in model.iterdir() if p.name.startswith(".tmp-")]
        rows = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1]
        assert set(rows[-1]["dice"]) == set(CLASSES) and rows[-1]["lr"] > 0
        final = torch.load(model / "model_final.pt", weights_only=True)
        assert final["config"]["algo"] == a and final["config"]["num_epochs"] == 2
        m = marker(wd, f"train.{a}_0")
        best = yaml.safe_load((model / "progress.yaml").read_text())[-1]["best_avg_dice_score"]
        assert m["status"] == "done" and m["details"]["best_metric"] == pytest.approx(best)
        obj = json.loads((wd / f"{a}_0" / "algo_object.json").read_text())
        assert obj["best_metric"] == pytest.approx(best)
        assert (wd / "logs" / f"train.{a}.log").is_file()
    # dints: the searched architecture is saved in the bundle and is the one trained
    from training.networks import build_network, dints_dense_code

    arch = json.loads((wd / "dints_0" / "model" / "arch_code.json").read_text())
    assert arch["search_epochs"] >= 1 and len(arch["history"]) == arch["search_epochs"]
    final = torch.load(wd / "dints_0" / "model" / "model_final.pt", weights_only=True)
    assert final["config"]["network"]["arch_code"] == arch["arch_code"]
    searched = build_network(final["config"]).state_dict()
    assert searched.keys() == final["state_dict"].keys()
    dense_cfg = {**final["config"], "network": {**final["config"]["network"], "arch_code": dints_dense_code(2, 3)}}
    assert build_network(dense_cfg).state_dict().keys() != final["state_dict"].keys()
    # segresnet trained its deep-supervision heads
    seg = torch.load(wd / "segresnet_0" / "model" / "model_final.pt", weights_only=True)["state_dict"]
    assert sum(1 for k in seg if k.startswith("up_layers.") and ".head." in k) >= 2
    hist = import_bundle_algo_history(str(wd), only_trained=True)
    assert sorted(h["identifier"] for h in hist) == [f"{a}_0" for a in sorted(algos)]
    # MONAI's own predict path: BundleAlgo.predict -> scripts/infer.py InferClass
    image = wd / "nifti_data" / "synth_crop1_image.nii.gz"
    for h in hist:
        prob = h["algo_instance"].predict([str(image)], {"device": "cpu"})[0]
        assert tuple(prob.shape) == (4, 40, 40, 24) and prob.dtype == torch.float32
        assert torch.allclose(prob.sum(0), torch.ones(40, 40, 24), atol=1e-4)
    # finished -> skipped with a message, nothing retrained
    mtime = (wd / "dints_0" / "model" / "model_final.pt").stat().st_mtime_ns
    again = run_train(wd, "dints")
    assert again.returncode == 0 and "already trained" in again.stderr
    assert (wd / "dints_0" / "model" / "model_final.pt").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_sigusr1_requeue_resumes_exactly(analysed: Path, tmp_path: Path) -> None:
    """SIGUSR1 mid-training: exit 75 after a checkpoint; the rerun continues and ends with
    exactly the weights of an uninterrupted run (CPU, fixed seed, num_workers 0)."""
    train = {**TINY_TRAIN, "num_epochs": 4, "num_steps_per_epoch": 3, "batch_size": 1, "val_every": 2}
    ref = make_work(analysed, tmp_path / "ref", ["segresnet"], train)
    intr = make_work(analysed, tmp_path / "intr", ["segresnet"], train)
    done = run_train(ref, "segresnet")
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = intr / "segresnet_0" / "model" / "metrics.jsonl"
    proc = subprocess.Popen(
        train_cmd(intr, "segresnet"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    t0 = time.monotonic()
    while not (metrics.is_file() and metrics.read_text().strip()):  # first epoch written
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    model = intr / "segresnet_0" / "model"
    ck = torch.load(model / "checkpoint_latest.pt", weights_only=True)  # full state, no pickled objects
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best_metric"} <= set(ck)
    assert ck["optimizer"]["state"]  # Adam moments are saved
    assert not (model / "model_final.pt").exists() and not (model / "progress.yaml").exists()
    assert marker(intr, "train.segresnet_0")["status"] == "running"  # no done marker before a clean end
    stopped_at = (ck["epoch"], ck["step"])

    again = run_train(intr, "segresnet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at epoch {stopped_at[0]} step {stopped_at[1]}" in again.stderr
    a = torch.load(ref / "segresnet_0" / "model" / "model_final.pt", weights_only=True)["state_dict"]
    b = torch.load(model / "model_final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ra = [json.loads(x) for x in (ref / "segresnet_0" / "model" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert marker(intr, "train.segresnet_0")["status"] == "done"


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(analysed: Path, tmp_path: Path) -> None:
    """--gpus 2 runs the bundle's scripts/train.py under torchrun (gloo on CPU): both ranks
    take the same number of steps, rank 0 writes the outputs."""
    wd = make_work(analysed, tmp_path / "work", ["dints"], {**TINY_TRAIN, "batch_size": 1})
    res = run_train(wd, "dints", "--gpus", "2", timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (wd / "dints_0" / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["steps"] == 2  # 4 training cases / (1 x 2 ranks)
    assert marker(wd, "train.dints_0")["status"] == "done"
    assert "nproc_per_node=2" in (wd / "logs" / "train.dints.log").read_text()
    assert (wd / "logs" / "train.dints_0.log").stat().st_size > 0


def test_missing_pretrained_weights_is_one_line_exit_2(analysed: Path, tmp_path: Path) -> None:
    """``train: {pretrained_weights: <missing file>}``: exit 2 with one line naming the file;
    nothing is downloaded, nothing trained."""
    missing = tmp_path / "swin_unetr_pretrained.pt"
    wd = make_work(analysed, tmp_path / "work", ["swinunetr"], {**TINY_TRAIN, "pretrained_weights": str(missing)})
    res = run_train(wd, "swinunetr", timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train:") and str(missing) in last and "not found" in last
    assert not (wd / "swinunetr_0" / "model" / "model_final.pt").exists()


def test_missing_bundle_is_one_line_exit_2(tmp_path: Path) -> None:
    res = run_train(tmp_path / "empty", "dints", timeout=120)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train:") and "run bundlegen first" in last


@pytest.mark.slow
def test_segresnet_learns_blobs(analysed: Path, tmp_path: Path) -> None:
    """Learning works: builtin segresnet on the blob dataset reaches mean foreground Dice >= 0.9."""
    train = {**TINY_TRAIN, "num_epochs": 30, "num_steps_per_epoch": 4, "learning_rate": 0.005, "val_every": 10}
    wd = make_work(analysed, tmp_path / "work", ["segresnet"], train)
    t0 = time.monotonic()
    res = run_train(wd, "segresnet", "--fold", "0", timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    best = marker(wd, "train.segresnet_0")["details"]["best_metric"]
    assert best >= 0.9, f"best mean foreground Dice {best:.3f} after {time.monotonic() - t0:.0f} s"


@pytest.mark.skipif(
    not os.environ.get("CELLMAP_A3DS_OFFICIAL_TEMPLATES"),
    reason="CELLMAP_A3DS_OFFICIAL_TEMPLATES does not point at a local copy of the official templates",
)
@pytest.mark.slow
def test_official_segresnet_trains(tmp_path: Path) -> None:
    """An official-template bundle runs its own scripts/train.py, streamed to the log."""
    from monai.apps.auto3dseg import DataAnalyzer

    from common.config import load_config
    from common.workdir import WorkDir
    from stages.bundlegen.bundlegen import run_bundlegen
    from tools.synthetic import make_blobs_dataset

    wd = tmp_path / "work"  # the official templates cannot ignore an unknown label: none here
    dl = make_blobs_dataset(wd, n_cases=4, shape=(40, 40, 24), n_classes=3, n_val=2, seed=0, unknown_label=None)
    DataAnalyzer(
        str(dl), str(wd / "nifti_data"), output_path=str(wd / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    cfg = {
        "classes": CLASSES,
        "unknown_label": 0,
        "algos": ["segresnet"],
        "templates": "official",
        "train": {
            "num_epochs": 1,
            "roi_size": [32, 32, 32],
            "auto_scale_allowed": False,
            "num_workers": 0,
            "cache_rate": 0,
            "init_filters": 8,
        },
    }
    (wd / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    run_bundlegen(WorkDir.at(wd), load_config(wd))
    res = run_train(wd, "segresnet", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker(wd, "train.segresnet_0")["status"] == "done"
    assert (wd / "logs" / "train.segresnet_0.log").stat().st_size > 0


@pytest.mark.slow
def test_mlflow_tracks_to_local_sqlite_and_resumes_the_run(analysed: Path, tmp_path: Path) -> None:
    """``train: {mlflow: true}``: a run in sqlite:///<bundle>/mlflow.db with per-epoch metrics,
    continued (same run id) after a SIGUSR1 requeue; nothing goes to a network URI."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is installed by the dev extra")
    train = {**TINY_TRAIN, "num_epochs": 3, "mlflow": True}
    wd = make_work(analysed, tmp_path / "wd", ["segresnet"], train)
    hp = yaml.safe_load((wd / "segresnet_0" / "configs" / "hyper_parameters.yaml").read_text())
    assert hp["mlflow"] is False and hp["mlflow_tracking_uri"] is None  # off unless asked
    # first job: stopped by SIGUSR1 once epoch 0 is logged
    proc = subprocess.Popen(
        train_cmd(wd, "segresnet"), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = wd / "segresnet_0" / "model" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not metrics.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out
    run_id = (wd / "segresnet_0" / "model" / "mlflow_run_id").read_text().strip()
    rerun = run_train(wd, "segresnet")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    db = wd / "segresnet_0" / "mlflow.db"
    assert db.is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algo"] == "segresnet"
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]  # one run across the requeue
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [round(m.value, 6) for m in sorted(history, key=lambda m: m.step)] == [
        round(r["train_loss"], 6) for r in rows
    ]
    best = client.get_metric_history(run_id, "best_avg_dice_score")[-1].value
    assert best == pytest.approx(marker(wd, "train.segresnet_0")["details"]["best_metric"], abs=1e-6)
