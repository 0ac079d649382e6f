"""The chain on a real single-node SLURM (``slurm/localcluster.sh``), started once per session.

The stage commands run through a stand-in ``apptainer`` (records its arguments, then runs the
stage natively) and, on the CPU side, the native runner. The full-chain test runs the real
stages on the synthetic CellMap data (with a real SIGUSR1 requeue of the train job); the
failure/resubmission and wait-job tests use ``tests/slurm_fakestage.py`` (real markers, real
exit codes) so they are fast and their timing deterministic.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from common.workdir import WorkDir
from slurm.jobs import TERMINAL, job_state, read_jobs
from slurm.submit import submit_chain

ROOT = Path(__file__).resolve().parents[1]
# the stand-in apptainer runs images that do not exist: submit preflight is tested in test_hardening_ops
SCRIPT = ROOT / "slurm" / "localcluster.sh"

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 60000:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running local cluster; every job is scancelled and the daemons stopped at the end."""
    root = tmp_path_factory.mktemp("slurm", numbered=True)
    env = {"CELLMAP_SLURM_ROOT": str(root), "CELLMAP_SLURM_PORT": str(_free_port_pair())}
    full = {**os.environ, **env}
    up = subprocess.run(["bash", str(SCRIPT), "start"], env=full, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=full, capture_output=True, timeout=120)
        pytest.fail(f"local SLURM did not start: {up.stderr[-2000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    try:
        yield {**env, "SLURM_CONF": os.environ["SLURM_CONF"]}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=full, capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _stand_ins(tmp: Path, fake: bool) -> tuple[Path, Path]:
    """A stand-in ``apptainer`` and ``python`` (both dispatch to the stage module)."""
    bindir = tmp / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    target = '-m tests.slurm_fakestage "$stage"' if fake else '-m "stages.$stage"'
    common = f"""export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}
exec {sys.executable} {target} "${{rest[@]}}"
"""
    app = bindir / "apptainer"
    app.write_text(f"""#!/bin/bash
# stand-in apptainer: record the command line, run the image's stage natively
printf '%s\\n' "$*" >> {tmp}/apptainer_calls.log
stage=""; rest=()
for a in "$@"; do
  if [ -n "$stage" ]; then rest+=("$a"); continue; fi
  case "$a" in *.sif) stage="$(basename "$a" .sif)" ;; esac
done
{common}""")
    py = bindir / "stagepython"
    py.write_text(f"""#!/bin/bash
# stand-in for the native runner's python: `stagepython -m stages.X ARGS`
stage="${{2#stages.}}"; rest=("${{@:3}}")
{common}""")
    for f in (app, py):
        f.chmod(0o755)
    return app, py


def _profiles(tmp: Path, app: Path, py: Path, train_time: str = "00:30:00") -> tuple[Path, Path]:
    """A CPU profile (native runner, cluster ``local``) and a GPU one (apptainer, ``local-gpu``)."""
    cpu = tmp / "local-cpu.yaml"
    cpu.write_text(
        f"cluster: local\nrunner: native\npython: {py}\nrequeue_margin_s: 60\n"
        "wait: {poll_s: 1, timeout_h: 1}\n"
        "defaults: {partition: batch, cpus: 1, mem: 3G, time: '00:30:00'}\n"
    )
    gpu = tmp / "local-gpu.yaml"
    gpu.write_text(
        f"cluster: local-gpu\nrunner: apptainer\napptainer: {app}\nimage_dir: /images/a3ds\n"
        "env: {OMP_NUM_THREADS: '1'}\nrequeue_margin_s: 60\nwait: {poll_s: 1, timeout_h: 1}\n"
        "defaults: {partition: batch, cpus: 1, mem: 3G, time: '00:30:00'}\n"
        f"stages: {{train: {{partition: gpu, gpus: 1, stage_gpus: 0, time: '{train_time}'}}, ensemble: {{gpus: 0}}}}\n"
    )
    return cpu, gpu


def _wait_all(wd: WorkDir, timeout: float) -> dict[str, dict[str, str]]:
    """Poll ``scontrol`` until every recorded job is in a terminal state."""
    t0 = time.monotonic()
    while True:
        states = {j["name"]: job_state(j["job_id"]) or {"state": "UNKNOWN"} for j in read_jobs(wd)}
        if all(s["state"] in TERMINAL for s in states.values()):
            return states
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"jobs not finished after {timeout}s: {states}\n{_logs(wd)}")
        time.sleep(0.5)


def _logs(wd: WorkDir) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((wd.logs_dir / "slurm").glob("*.out")))


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _assert_dependency_order(wd: WorkDir, states: dict[str, dict[str, str]]) -> None:
    for job in read_jobs(wd):
        for parent in job.get("depends_on", []):
            assert _ts(states[job["name"]]["start_time"]) >= _ts(states[parent]["end_time"]), (job["name"], parent)


def _status(wd: WorkDir) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "slurm.status", "--work-dir", str(wd.root), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _status_rows(wd: WorkDir) -> dict[str, dict]:
    data = _status(wd)
    rows = data["rows"] if isinstance(data, dict) and "rows" in data else data
    return {r["name"]: r for r in rows}


def _blobs(tmp: Path, train: str) -> WorkDir:
    from tools.synthetic import make_blobs_dataset

    wd = tmp / "work"
    make_blobs_dataset(wd, n_cases=4, shape=(32, 32, 16), n_classes=2, n_val=1, seed=0)
    (wd / "pipeline.yaml").write_text(
        "classes: [ecs, mito_mem]\nunknown_label: 255\nresolution_nm: 8\nalgos: [segresnet]\n"
        f"num_folds: 1\ntrain: {train}\n"
    )
    return WorkDir.at(wd)


def test_full_chain_two_clusters_with_requeue(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    """The real stages: convert (2-shard array + merge) -> analyze -> bundlegen on the "CPU
    cluster" (native runner) | wait.bundlegen -> train -> ensemble on the "GPU cluster" (stand-in
    apptainer). The train job is sent SIGUSR1 mid-training: it checkpoints, requeues itself,
    resumes and completes, and the ensemble after it still runs. All jobs COMPLETED in order."""
    from tools.synthetic_cellmap import make_synthetic_cellmap

    app, py = _stand_ins(tmp_path, fake=False)
    cpu, gpu = _profiles(tmp_path, app, py)
    data = tmp_path / "data"
    make_synthetic_cellmap(data)
    wd = WorkDir.at(tmp_path / "work")
    wd.root.mkdir()
    wd.config_file.write_text(
        f"data_root: {data}\nresolution_nm: 4\nclasses: [ecs, pm, mito_mem, mito_lum]\nalgos: [segresnet]\n"
        "train: {num_epochs: 2, roi_size: [32, 32, 16], batch_size: 1, num_workers: 0}\n"
        "convert: {max_failed_fraction: 1.0}\n"  # the fixture's 7 malformed crops are deliberate
    )
    ids = submit_chain(wd.root, str(gpu), cpu_profile=str(cpu), convert_shards=2, echo=lambda s: None, preflight=False)
    assert list(ids) == [
        "convert.shards",
        "convert",
        "analyze",
        "bundlegen",
        "wait.bundlegen",
        "train.segresnet_0",
        "ensemble",
    ]
    # signal the train job once its first epoch is logged (the second one takes >10 s here)
    train_log = wd.logs_dir / "slurm" / f"train.segresnet_0-{ids['train.segresnet_0']}.out"
    t0 = time.monotonic()
    while "epoch 1/2" not in _read(train_log):
        assert time.monotonic() - t0 < 400, _logs(wd)
        assert (job_state(ids["train.segresnet_0"]) or {}).get("state") in ("PENDING", "RUNNING"), _logs(wd)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", ids["train.segresnet_0"]], check=True)
    states = _wait_all(wd, timeout=600)
    assert {n: s["state"] for n, s in states.items()} == dict.fromkeys(ids, "COMPLETED"), _logs(wd)
    _assert_dependency_order(wd, states)
    assert states["train.segresnet_0"]["restarts"] == "1"
    log = _read(train_log)
    assert "restart=0" in log and "restart=1" in log and "requeued job" in log, log
    assert "stopped for requeue" in log, log
    assert sorted(p.name for p in wd.ensemble_dir.glob("*.nii.gz")), "no ensemble output"
    # the GPU side ran through the apptainer command line the profile names
    calls = (tmp_path / "apptainer_calls.log").read_text().splitlines()
    assert (
        sum(
            f"run --cleanenv --no-home -B {wd.root}:{wd.root} -B {data}:{data}:ro --env OMP_NUM_THREADS=1 "
            f"--nv /images/a3ds/train.sif --work-dir {wd.root} --algo segresnet --fold 0 --gpus 0" in c
            for c in calls
        )
        == 2
    ), calls
    assert any("/images/a3ds/ensemble.sif" in c and "--nv" not in c for c in calls)
    rows = _status_rows(wd)
    for name in ("convert", "analyze", "bundlegen", "train.segresnet_0", "ensemble"):
        assert rows[name]["state"] == "done", rows[name]
        assert str(rows[name]["job_id"]) == ids[name] and rows[name]["job_state"] == "COMPLETED"


def test_failure_cancels_dependants_then_resubmit_skips_done(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    app, py = _stand_ins(tmp_path, fake=True)
    cpu, gpu = _profiles(tmp_path, app, py)
    wd = _blobs(tmp_path, "{}")
    (wd.root / "pipeline.yaml").write_text("classes: [ecs, mito_mem]\nalgos: [segresnet, dints]\n")
    (wd.root / "fail_bundlegen").write_text("")
    ids = submit_chain(
        wd.root, str(gpu), cpu_profile=str(cpu), from_stage="analyze", echo=lambda s: None, preflight=False
    )
    states = _wait_all(wd, timeout=120)
    got = {n: s["state"] for n, s in states.items()}
    assert got == {
        "analyze": "COMPLETED",
        "bundlegen": "FAILED",
        "wait.bundlegen": "FAILED",
        "train.segresnet_0": "CANCELLED",
        "train.dints_0": "CANCELLED",
        "ensemble": "CANCELLED",
    }, _logs(wd)
    rows = _status_rows(wd)
    assert rows["bundlegen"]["state"] == "failed" and "injected failure" in (rows["bundlegen"].get("reason") or "")
    assert rows["train.dints_0"]["job_state"] == "CANCELLED"
    table = subprocess.run(
        [sys.executable, "-m", "slurm.status", "--work-dir", str(wd.root)], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert "bundlegen" in table and "failed" in table

    # fix it and resubmit: analyze is done and is not submitted again
    (wd.root / "fail_bundlegen").unlink()
    ids2 = submit_chain(
        wd.root, str(gpu), cpu_profile=str(cpu), from_stage="analyze", echo=lambda s: None, preflight=False
    )
    assert list(ids2) == ["bundlegen", "wait.bundlegen", "train.segresnet_0", "train.dints_0", "ensemble"]
    states = _wait_all(wd, timeout=120)
    assert all(s["state"] == "COMPLETED" for s in states.values()), states
    runs = (wd.root / "fake_runs.log").read_text()
    assert runs.count("analyze start") == 1
    assert read_jobs(wd)[0]["job_id"] == ids["analyze"]  # kept; the others replaced by name
    assert {j["name"]: j["job_id"] for j in read_jobs(wd)}["ensemble"] == ids2["ensemble"]
    assert (
        submit_chain(
            wd.root, str(gpu), cpu_profile=str(cpu), from_stage="analyze", echo=lambda s: None, preflight=False
        )
        == {}
    )


def _read(p: Path) -> str:
    return p.read_text() if p.exists() else ""


def test_wait_job_ignores_stale_failures_requeues_and_follows_the_marker(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    """Two clusters, GPU side only (`--side gpu`): the wait job keeps polling through an old
    failed marker and a requeue, and releases the train job once bundlegen is marked done."""
    app, py = _stand_ins(tmp_path, fake=True)
    cpu, gpu = _profiles(tmp_path, app, py)
    wd = _blobs(tmp_path, "{}")
    old = wd.marker("analyze")
    old.start()
    old.fail("an earlier run")
    os.utime(old.path, (time.time() - 3600, time.time() - 3600))
    ids = submit_chain(
        wd.root, str(gpu), cpu_profile=str(cpu), from_stage="analyze", side="gpu", echo=lambda s: None, preflight=False
    )
    assert list(ids) == ["wait.bundlegen", "train.segresnet_0", "ensemble"]
    wait_id = ids["wait.bundlegen"]
    t0 = time.monotonic()
    while (job_state(wait_id) or {}).get("state") != "RUNNING":
        assert time.monotonic() - t0 < 30
        time.sleep(0.2)
    time.sleep(1.5)  # a few polls see the stale failed marker
    subprocess.run(["scancel", "--signal=USR1", "--batch", wait_id], check=True)
    t0 = time.monotonic()
    while not ((s := job_state(wait_id) or {}).get("state") == "RUNNING" and s.get("restarts") == "1"):
        assert time.monotonic() - t0 < 60, s
        time.sleep(0.2)
    assert (job_state(ids["train.segresnet_0"]) or {}).get("state") == "PENDING"
    done = wd.marker("bundlegen")
    done.start()
    done.done()
    states = _wait_all(wd, timeout=90)
    assert {n: s["state"] for n, s in states.items()} == dict.fromkeys(ids, "COMPLETED"), _logs(wd)
    _assert_dependency_order(wd, states)
    log = _read(wd.logs_dir / "slurm" / f"wait.bundlegen-{wait_id}.out")
    assert "restart=1" in log and "bundlegen is done" in log, log


def test_memory_kill_shows_in_status(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    """A fold SLURM kills for memory reads `killed by SLURM ... OUT_OF_MEMORY` in status (today
    `running?`). The local cluster enforces --mem with jobacct_gather (no cgroups), which ends
    the job FAILED 0:9; the slurmstepd line in the job log tells it was memory."""
    app, py = _stand_ins(tmp_path, fake=True)
    cpu, gpu = _profiles(tmp_path, app, py)
    gpu.write_text(gpu.read_text().replace("stage_gpus: 0,", "stage_gpus: 0, mem: 150M,"))
    wd = _blobs(tmp_path, "{}")
    for stage in ("convert", "analyze", "bundlegen"):
        m = wd.marker(stage)
        m.start()
        m.done()
    (wd.root / "fake_train.json").write_text('{"steps": 200, "step_s": 0.05, "hog_mb": 20}')
    ids = submit_chain(wd.root, str(gpu), from_stage="train", echo=lambda s: None, preflight=False)
    assert set(ids) == {"train.segresnet_0", "ensemble"}
    _wait_all(wd, timeout=120)
    rows = _status_rows(wd)
    row = rows["train.segresnet_0"]
    assert row["job_state"] == "OUT_OF_MEMORY", (row, _logs(wd))
    assert row["state"] == "running" and row["possibly_killed"]
    assert "killed by SLURM" in row["note"] and "memory limit" in row["note"], row["note"]
    assert rows["ensemble"]["job_state"] == "CANCELLED"
    table = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--work-dir", str(wd.root), "--status"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    print(table)
    assert "OUT_OF_MEMORY" in table and "running?" in table
