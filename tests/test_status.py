"""slurm.status: every state on a real work dir with real markers, with and without SLURM tools."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.workdir import WorkDir
from slurm.status import collect_status, render_status, status_json

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def status_wd(tmp_path: Path) -> Path:
    """done (convert, bundlegen, train.segresnet_0), failed (analyze), running (two kinds), missing."""
    wd = WorkDir.at(tmp_path / "work").ensure()
    wd.config_file.write_text("algos: [segresnet, dints, swinunetr]\nnum_folds: 1\n")
    m = wd.marker("convert")
    m.start("d1")
    m.done(n_cases=3)
    m = wd.marker("analyze")
    m.start("d2")
    m.fail("datastats: 2 of 6 cases dropped\nsecond line is not kept")
    m = wd.marker("bundlegen")
    m.start("d3")
    m.done()
    m = wd.marker("train.segresnet_0")
    m.start("d4")
    m.done(best_metric=0.8125)
    # running, written by a process on this host that is gone: possibly killed
    m = wd.marker("train.dints_0")
    m.start("d5")
    data = json.loads(m.path.read_text())
    data["pid"] = _dead_pid()
    m.path.write_text(json.dumps(data))
    # running under a SLURM job that squeue says is RUNNING
    m = wd.marker("train.swinunetr_0")
    m.start("d6")
    # an extra shard marker of a known stage
    m = wd.marker("convert.shard-0-of-2")
    m.start("d7")
    m.done()
    wd.slurm_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        {
            "name": "train.swinunetr_0",
            "job_id": "101",
            "stage": "train",
            "cluster": "local",
            "submitted": "2026-01-01T00:00:00+00:00",
        },
        {
            "name": "train.swinunetr_0",
            "job_id": "202",
            "stage": "train",
            "cluster": "local",
            "submitted": "2026-01-02T00:00:00+00:00",
        },
        {
            "name": "ensemble",
            "job_id": "303",
            "stage": "ensemble",
            "cluster": "local",
            "submitted": "2026-01-02T00:00:00+00:00",
        },
    ]
    (wd.slurm_dir / "jobs.json").write_text(json.dumps(jobs))
    return wd.root


def _fake_slurm(bin_dir: Path) -> None:
    """A stand-in squeue: job 202 RUNNING, 303 PENDING, anything else unknown (rc 1)."""
    bin_dir.mkdir()
    script = bin_dir / "squeue"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"-j 202"*) echo RUNNING ;;\n'
        '  *"-j 303"*) echo PENDING ;;\n'
        '  *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)


def test_status_states_without_slurm(status_wd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "nobin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # neither squeue nor scontrol: nothing breaks
    rows = {r.name: r for r in collect_status(status_wd)}
    order = [r.name for r in collect_status(status_wd)]
    assert order == [
        "convert",
        "convert.shard-0-of-2",
        "analyze",
        "bundlegen",
        "train.segresnet_0",
        "train.dints_0",
        "train.swinunetr_0",
        "ensemble",
    ]
    assert rows["convert"].state == "done" and rows["convert"].duration_s is not None
    assert rows["analyze"].state == "failed"
    assert rows["analyze"].reason == "datastats: 2 of 6 cases dropped"
    assert rows["train.segresnet_0"].best_metric == pytest.approx(0.8125)
    assert rows["train.dints_0"].state == "running" and rows["train.dints_0"].possibly_killed
    assert "may have been killed" in rows["train.dints_0"].note
    # live process (this test) and no SLURM tools: running, not flagged
    assert rows["train.swinunetr_0"].state == "running"
    assert not rows["train.swinunetr_0"].possibly_killed
    assert rows["train.swinunetr_0"].job_id == "202" and rows["train.swinunetr_0"].job_state is None
    assert rows["ensemble"].state == "not started"

    text = render_status(status_wd)
    assert "failed" in text and "not started" in text and "running?" in text and "0.8125" in text
    assert "datastats: 2 of 6 cases dropped" in text


def test_status_live_slurm_states(status_wd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    # make the swinunetr marker look like it came from another host, so only SLURM can tell
    wd = WorkDir.at(status_wd)
    for name in ("train.swinunetr_0", "train.dints_0"):
        p = wd.marker(name).path
        data = json.loads(p.read_text())
        data["host"] = "compute-node-7"
        p.write_text(json.dumps(data))
    jobs = json.loads((wd.slurm_dir / "jobs.json").read_text())
    jobs.append(
        {
            "name": "train.dints_0",
            "job_id": "404",
            "stage": "train",
            "cluster": "local",
            "submitted": "2026-01-03T00:00:00+00:00",
        }
    )
    (wd.slurm_dir / "jobs.json").write_text(json.dumps(jobs))
    rows = {r.name: r for r in collect_status(status_wd)}
    assert rows["train.swinunetr_0"].job_state == "RUNNING" and not rows["train.swinunetr_0"].possibly_killed
    assert rows["ensemble"].state == "not started" and rows["ensemble"].job_state == "PENDING"
    # squeue no longer knows job 404, marker on another host: unknown, said so, not flagged killed
    assert rows["train.dints_0"].job_state is None
    assert "may have been killed" in rows["train.dints_0"].note

    # the JSON form through the real CLI
    res = subprocess.run(
        [sys.executable, "-m", "slurm.status", "--work-dir", str(status_wd), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ},
        check=True,
    )
    data = json.loads(res.stdout)
    by_name = {r["name"]: r for r in data["rows"]}
    assert by_name["analyze"]["state"] == "failed"
    assert by_name["train.swinunetr_0"]["job_state"] == "RUNNING"
    assert by_name["ensemble"]["job_state"] == "PENDING"


def test_status_cli_table_and_missing_dir(status_wd: Path, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "slurm.status", "--work-dir", str(status_wd)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert res.stdout.splitlines()[1].split()[:2] == ["name", "state"]
    res = subprocess.run(
        [sys.executable, "-m", "slurm.status", "--work-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "work dir not found" in res.stderr


def test_status_without_config_lists_markers(tmp_path: Path) -> None:
    wd = WorkDir.at(tmp_path / "w").ensure()
    m = wd.marker("train.segresnet_3")
    m.start()
    m.done(best_metric=0.5)
    (wd.markers_dir / "ensemble.json").write_text("{not json")
    rows = {r.name: r for r in collect_status(wd.root, query_slurm=False)}
    assert rows["train.segresnet_3"].state == "done"
    assert rows["ensemble"].state == "unreadable"
    assert rows["convert"].state == "not started"
    assert status_json(wd.root, query_slurm=False)["rows"]


def test_the_three_status_commands_print_one_table(status_wd: Path, tmp_path: Path) -> None:
    """``python -m slurm.status``, the documented ``python -m slurm.submit --status`` and
    ``cellmap-a3ds status`` are one implementation: the same rows, live SLURM states included."""
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin"}
    outs = []
    for argv in (["-m", "slurm.status"], ["-m", "slurm.submit", "--status"], ["-m", "stages.cli", "status"]):
        res = subprocess.run(
            [sys.executable, *argv, "--work-dir", str(status_wd)], capture_output=True, text=True, cwd=ROOT, env=env
        )
        assert res.returncode == 0, (argv, res.stderr)
        # a running row's "took" grows between the three calls: compare everything else
        outs.append(
            [
                " ".join(re.sub(r"(?<=\s)[0-9]+[smhd]([0-9]+[smh])?(?=\s)", "T", ln).split())
                for ln in res.stdout.splitlines()
                if ln.split()[:1] and not ln.startswith("pipeline status")
            ]
        )
    assert outs[0] == outs[1] == outs[2]
    rows = {ln.split()[0]: ln for ln in outs[0]}
    assert "202 RUNNING" in rows["train.swinunetr_0"] and "303 PENDING" in rows["ensemble"]
    res = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--status", "--work-dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert res.returncode == 2 and "work dir not found" in res.stderr


def test_an_array_task_marker_names_its_task_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One array-job rule: a marker written by array task 4 of job 900 is job ``900_4`` for status
    and for the lock file, and the task's state is what SLURM says of ``900_4``."""
    from common.lock import lock_owner

    monkeypatch.setenv("SLURM_JOB_ID", "904")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    wd = WorkDir.at(tmp_path / "w").ensure()
    m = wd.marker("convert.shard-4-of-8")
    m.start()
    assert lock_owner()["slurm_job_id"] == "900_4"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text('#!/bin/sh\ncase "$*" in *"-j 900_4"*) echo RUNNING ;; *) exit 1 ;; esac\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    rows = {r.name: r for r in collect_status(wd.root)}
    assert rows["convert.shard-4-of-8"].job_id == "900_4"
    assert rows["convert.shard-4-of-8"].job_state == "RUNNING" and not rows["convert.shard-4-of-8"].possibly_killed
