"""Trainer faults (issue 12, item 4) and watching a run (item 10): torn checkpoints, the
previous good checkpoint, a signal after the final marker, the epoch line with time and ETA,
``status`` with epoch k/N and ETA of a running fold, TensorBoard events."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.progress import eta_seconds, progress
from slurm.status import collect_status, render_status
from tests.test_train import ROOT, TINY_TRAIN, _env, analysed, make_work, train_cmd  # noqa: F401 (fixture)
from training.checkpoint import previous_of, sidecar_of
from training.reporting import eta_seconds as trainer_eta_seconds
from training.reporting import format_epoch_line
from training.trainer import load_checkpoint, load_resumable, save_checkpoint


def test_torn_checkpoint_falls_back_to_the_previous_good_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    latest = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(latest, {"epoch": 1, "w": torch.arange(1000)})
    save_checkpoint(latest, {"epoch": 2, "w": torch.arange(1000) * 2})
    assert previous_of(latest).is_file() and sidecar_of(latest).is_file()
    assert oct(latest.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    # tear the newest one (a node crash, a full disk): half of it is gone
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    caplog.set_level(logging.WARNING)
    ck = load_resumable(latest)
    assert ck is not None and ck["epoch"] == 1
    lines = [r.getMessage() for r in caplog.records if "previous good checkpoint" in r.getMessage()]
    assert len(lines) == 1 and "torn" in lines[0] and "\n" not in lines[0]
    # no good version at all: set aside, start afresh (never a traceback that blocks resume)
    p = previous_of(latest)
    p.write_bytes(p.read_bytes()[:100])
    assert load_resumable(latest) is None
    assert (tmp_path / "checkpoint_latest.pt.torn").is_file() and not latest.exists()
    # a torn file without a sidecar (written by an older version) is caught by torch itself
    old = tmp_path / "model_best.pt"
    torch.save({"x": 1}, old)
    old.write_bytes(old.read_bytes()[:50])
    with pytest.raises(Exception, match="no usable checkpoint") as err:
        load_checkpoint(old)
    assert "\n" not in str(err.value)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_epoch_line_and_eta() -> None:
    line = format_epoch_line("segresnet", 3, 40, 0.51234, None, 2e-4, 75.0, eta_seconds([70, 80, 75], 3, 40))
    assert line == "segresnet epoch 3/40 loss 0.5123 mean Dice - lr 2.00e-04 time 1m15s ETA 46m15s"
    assert "mean Dice 0.8125" in format_epoch_line("dints", 1, 2, 1.0, 0.8125, 1e-4, 5, 5)
    # the status view (common.progress) reads the same ETA the trainer logs (its own copy)
    for times, done, total in (([70, 80, 75], 3, 40), ([], 0, 5), ([1, 2, 3, 4, 5, 6, 7], 7, 7), ([5], 1, 0)):
        assert eta_seconds(times, done, total) == trainer_eta_seconds(times, done, total)


def test_progress_is_plain_lines_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    import io

    caplog.set_level(logging.INFO)
    out = list(progress(range(5), "convert", every_s=0.0, stream=io.StringIO()))
    assert out == list(range(5))
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[-1].startswith("convert: 5/5 (100%)") and not any("\r" in m for m in msgs)


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_running_fold_status_torn_resume_and_signal_after_end(analysed: Path, tmp_path: Path) -> None:  # noqa: F811
    """One tiny fold: status shows epoch k/N and an ETA while it runs; the epoch lines carry
    time and ETA; TensorBoard events are written. Then its newest checkpoint is torn and the
    rerun resumes from the previous good one (one line, no traceback); a SIGTERM right after
    the final marker still exits 0."""
    train = {
        **TINY_TRAIN,
        "num_epochs": 3,
        "num_steps_per_epoch": 1,
        "batch_size": 1,
        "val_every": 2,
        "keep_latest": True,
    }
    wd = make_work(analysed, tmp_path / "w", ["segresnet"], train)
    model = wd / "segresnet_0" / "model"
    proc = subprocess.Popen(
        train_cmd(wd, "segresnet", "--fold", "0"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(lambda: (model / "metrics.jsonl").is_file() and (model / "metrics.jsonl").read_text().strip(), proc)
    rows = {r.name: r for r in collect_status(wd, query_slurm=False)}
    row = rows["train.segresnet_0"]
    assert row.state == "running" and row.num_epochs == 3 and 1 <= row.epochs_done <= 3 and row.eta_s is not None
    table = render_status(wd, query_slurm=False)
    print(table)
    assert f"{row.epochs_done}/3" in table
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    epoch_lines = [ln for ln in out.splitlines() if "segresnet epoch" in ln]
    assert len(epoch_lines) == 3 and "mean Dice - " in epoch_lines[0] and "ETA" in epoch_lines[0]
    assert " time " in epoch_lines[-1]
    assert list((model / "events").glob("events.out.tfevents.*"))

    # tear the newest checkpoint of a half-done fold and resume
    for name in ("progress.yaml", "model_final.pt"):
        (model / name).unlink()
    (wd / "markers" / "train.segresnet_0.json").unlink()
    data = (model / "checkpoint_latest.pt").read_bytes()
    (model / "checkpoint_latest.pt").write_bytes(data[: len(data) // 3])
    res = subprocess.run(
        train_cmd(wd, "segresnet", "--fold", "0"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert res.stderr.count("previous good checkpoint") == 1 and "resuming at epoch 2" in res.stderr

    # SIGTERM right after the final marker: exit 0, marker done
    (model / "progress.yaml").unlink()
    (model / "model_final.pt").unlink()
    (wd / "markers" / "train.segresnet_0.json").unlink()
    marker = wd / "markers" / "train.segresnet_0.json"
    proc = subprocess.Popen(
        train_cmd(wd, "segresnet", "--fold", "0"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for(lambda: (model / "progress.yaml").is_file(), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert json.loads(marker.read_text())["status"] == "done"


@pytest.mark.slow
def test_copied_work_dir_is_refused_then_rebased(analysed: Path, tmp_path: Path) -> None:  # noqa: F811
    """Today a copied work dir trains into the original (bundles hold absolute paths)."""
    import shutil

    import yaml

    orig = make_work(analysed, tmp_path / "orig", ["segresnet"], dict(TINY_TRAIN))
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    for stage, args in (("train", ["--algo", "segresnet", "--fold", "0"]), ("ensemble", [])):
        res = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", "--work-dir", str(copy), *args],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errs) == 1, res.stderr[-2000:]
        assert f"generated for work dir {orig}" in errs[0] and "a copied work dir" in errs[0]
        assert f"python -m stages.bundlegen --work-dir {copy} --rebase" in errs[0]
    assert not (orig / "segresnet_0" / "model").exists()  # nothing trained into the original

    res = subprocess.run(
        [sys.executable, "-m", "stages.bundlegen", "--work-dir", str(copy), "--rebase"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    hp = yaml.safe_load((copy / "segresnet_0" / "configs" / "hyper_parameters.yaml").read_text())
    assert hp["bundle_root"] == str(copy / "segresnet_0") and hp["data_list_file_path"].startswith(str(copy) + "/")
    assert str(orig) + "/" not in (copy / "segresnet_0" / "algo_object.json").read_text()
    assert str(orig) + "/" not in (copy / "input.yaml").read_text()
    from common.workdir import WorkDir, check_bundle_location, rebase_work_dir

    check_bundle_location(WorkDir.at(copy), copy / "segresnet_0")
    assert rebase_work_dir(WorkDir.at(copy))["files"] == []  # idempotent
    moved = tmp_path / "moved"
    orig.rename(moved)
    from common.errors import PipelineError

    with pytest.raises(PipelineError, match="a moved work dir"):
        check_bundle_location(WorkDir.at(moved), moved / "segresnet_0")
