"""Issue 12 items 1, 7, 10 without a cluster: generated scripts that no value can restructure,
unbindable paths refused, file modes that follow the umask, ``--status`` without a profile,
submit preflight and the dry-run summary, and ``status`` reading ``sacct`` for a job that left
the queue (an OOM kill)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.io import atomic_write_json
from common.workdir import WorkDir
from slurm.jobs import job_state, pick_state
from slurm.profiles import load_profile
from slurm.status import collect_status, render_status
from slurm.submit import plan_jobs, render_script, submit_chain

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _fake_python(tmp_path: Path) -> Path:
    """A stand-in interpreter that records its argv and cwd (one JSON line per call)."""
    rec = tmp_path / "calls.jsonl"
    exe = tmp_path / "fakepy"
    exe.write_text(
        "#!/bin/sh\n"
        f"{sys.executable} -c 'import json,os,sys; "
        f'open(sys.argv[1],"a").write(json.dumps({{"argv": sys.argv[2:], "cwd": os.getcwd()}})+chr(10))\' '
        f'{rec} "$@"\n'
    )
    exe.chmod(0o755)
    return exe


def _profile(tmp_path: Path, runner: str = "native", **extra: str) -> Path:
    p = tmp_path / f"{runner}.yaml"
    lines = [
        f"cluster: t\nrunner: {runner}\npython: {_fake_python(tmp_path)}\nimage_dir: {tmp_path / 'img'}\n"
        "defaults: {partition: batch, cpus: 1, time: '00:10:00'}\n"
    ]
    lines += [f"{k}: {v}\n" for k, v in extra.items()]
    p.write_text("".join(lines))
    return p


@pytest.mark.parametrize(
    "name", ["a@@CMD@@b", "$(touch${IFS}PWNED)", "q@@SETUP@@$HOME;touch${IFS}PWNED", "`touch${IFS}PWNED`"]
)
def test_work_dir_names_cannot_change_the_script(tmp_path: Path, name: str) -> None:
    """Today ``@@CMD@@`` in the work-dir path is replaced again, inside the quoted ``cd``."""
    wd = WorkDir.at(tmp_path / name).ensure()
    cfg = load_config(wd.root)
    prof = load_profile(str(_profile(tmp_path)))
    job = plan_jobs(wd, cfg, prof)[0]
    script = tmp_path / "job.sbatch"
    script.write_text(render_script(job, wd, cfg, 0))
    res = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
    )
    assert res.returncode == 0, res.stdout + res.stderr
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 1, calls
    assert calls[0]["argv"] == ["-m", "stages.convert", "--work-dir", str(wd.root)]
    assert calls[0]["cwd"] == str(wd.root)
    assert not list(tmp_path.rglob("PWNED"))


@pytest.mark.parametrize("name", ["new\nline", "tab\there", "sp ace", "x'; touch PWNED; '", 'q"uote'])
def test_paths_sbatch_cannot_hold_are_refused_in_one_line(tmp_path: Path, name: str) -> None:
    wd = WorkDir.at(tmp_path / name).ensure()
    with pytest.raises(ConfigError) as err:
        submit_chain(wd.root, str(_profile(tmp_path)), dry_run=True, echo=lambda _s: None)
    assert "\n" not in str(err.value) and "SLURM cannot use a path" in str(err.value)


@pytest.mark.parametrize("key,value", [("data_root", "/data/a,b"), ("data_root", "/data/a:b")])
def test_unbindable_paths_are_refused(tmp_path: Path, key: str, value: str) -> None:
    wd = WorkDir.at(tmp_path / "w").ensure()
    (wd.root / "pipeline.yaml").write_text(f"{key}: '{value}'\n")
    with pytest.raises(ConfigError, match="apptainer cannot bind") as err:
        submit_chain(wd.root, str(_profile(tmp_path, "apptainer")), dry_run=True, echo=lambda _s: None)
    assert "\n" not in str(err.value)


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    """Today every atomic write is 0600: a group member's status reads "not valid JSON"."""
    old = os.umask(0o002)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o022)
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        wd = WorkDir.at(tmp_path / "w").ensure()
        wd.marker("convert").start()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o664
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(wd.marker("convert").path.stat().st_mode) == 0o644


def test_status_without_profile_and_one_implementation(tmp_path: Path) -> None:
    wd = WorkDir.at(tmp_path / "w").ensure()
    m = wd.marker("convert")
    m.start()
    m.done()
    res = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--work-dir", str(wd.root), "--status"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert (
        res.stdout == render_status(wd.root) + "\n"
        or res.stdout.splitlines()[1:] == render_status(wd.root).splitlines()[1:]
    )
    res = subprocess.run(
        [sys.executable, "-m", "slurm.submit", "--work-dir", str(wd.root)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--profile is required" in res.stderr
    # one rule for array tasks: alive while any task is, else the worst end
    assert pick_state(["COMPLETED", "RUNNING", "PENDING"]) == "RUNNING"
    assert pick_state(["COMPLETED", "FAILED", "OUT_OF_MEMORY"]) == "OUT_OF_MEMORY"
    assert pick_state(["CANCELLED by 0", "COMPLETED"]) == "CANCELLED"


def _fake_sacct(bin_dir: Path) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    (bin_dir / "sacct").write_text(
        "#!/bin/sh\necho '55|OUT_OF_MEMORY|0:125||00:00:07'\necho '55.batch|OUT_OF_MEMORY|0:125|2045000K|00:00:07'\n"
    )
    for f in ("scontrol", "sacct"):
        (bin_dir / f).chmod(0o755)


def test_status_asks_sacct_when_the_job_left_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Today an OOM-killed fold reads `running?`; now: killed by SLURM, OUT_OF_MEMORY, MaxRSS."""
    wd = WorkDir.at(tmp_path / "w").ensure()
    wd.config_file.write_text("algos: [segresnet]\nnum_folds: 1\n")
    m = wd.marker("train.segresnet_0")
    m.start()
    p = m.path
    data = json.loads(p.read_text())
    data["host"] = "gpu-node-3"
    p.write_text(json.dumps(data))
    wd.slurm_dir.mkdir()
    (wd.slurm_dir / "jobs.json").write_text(
        json.dumps([{"name": "train.segresnet_0", "job_id": "55", "stage": "train", "cluster": "t", "submitted": "x"}])
    )
    _fake_sacct(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}/usr/bin:/bin")
    info = job_state("55")
    assert info is not None and info["state"] == "OUT_OF_MEMORY" and info["max_rss"] == "1.95G"
    assert info["source"] == "sacct" and info["elapsed"] == "00:00:07"
    row = {r.name: r for r in collect_status(wd.root)}["train.segresnet_0"]
    assert row.job_state == "OUT_OF_MEMORY" and row.possibly_killed
    assert "killed by SLURM: job 55 OUT_OF_MEMORY, exit 0:125, MaxRSS 1.95G, after 00:00:07" in row.note
    assert "OUT_OF_MEMORY" in render_status(wd.root)


def test_preflight_and_dry_run_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Today submit queues jobs whose .sif does not exist and whose account was never set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho called >> {tmp_path / 'sbatch_calls'}\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    wd = WorkDir.at(tmp_path / "w").ensure()
    (wd.root / "pipeline.yaml").write_text(f"data_root: {tmp_path / 'nodata'}\nalgos: [dints]\n")
    prof = str(_profile(tmp_path, "apptainer"))
    with pytest.raises(ConfigError, match=r"preflight: image .*convert.sif not found.*\(and 6 more") as err:
        submit_chain(wd.root, prof, echo=lambda _s: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "sbatch_calls").exists()
    with pytest.raises(ConfigError, match="stage convert is not done"):
        (tmp_path / "img").mkdir()
        for s in ("convert", "analyze", "bundlegen", "train", "ensemble"):
            (tmp_path / "img" / f"{s}.sif").write_text("")
        (tmp_path / "nodata").mkdir()
        prof2 = tmp_path / "p2.yaml"
        prof2.write_text(Path(prof).read_text().replace("partition: batch,", "partition: batch, account: lab,"))
        submit_chain(wd.root, str(prof2), from_stage="analyze", echo=lambda _s: None)
    lines: list[str] = []
    submit_chain(wd.root, prof, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert "# job" in text and "# convert " in text and "# train.dints_0" in text
    assert "# preflight: profile" in text and "'account' is not set" in text
    assert lines[-1].startswith("# 5 jobs; nothing was submitted")
    ids = submit_chain(wd.root, str(prof2), echo=lines.append)
    assert len(ids) == 5 and len((tmp_path / "sbatch_calls").read_text().splitlines()) == 5
