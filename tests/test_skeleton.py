"""The stage skeleton: StageContext, stage_marker (one failure format), exit codes of any library's
exception, one shard name, the Bundle object, one deterministic NIfTI writer, one console script
with help on every option, and a scheduler-free, torch-free ``common/`` (all fast)."""

from __future__ import annotations

import ast
import functools
import gzip
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from common.cli import StageContext, _run_stage, failure_reason, shard_label, stage_marker
from common.errors import EXIT_REQUEUE, RequeueRequested, StageFailed
from common.lock import stage_lock_names
from common.nifti import nifti_image, save_nifti, spacing_affine
from common.workdir import BUNDLE_RECORD, Bundle, WorkDir, shard_name

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---- exit codes ---------------------------------------------------------------------------
class TrainerStopped(Exception):
    """What a training library raises on SIGUSR1 after a checkpoint (not a common.errors class)."""

    exit_code = EXIT_REQUEUE


class TrainerBadConfig(RuntimeError):
    exit_code = 2


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    "exc,rc,line",
    [
        (TrainerStopped("checkpointed at epoch 3"), 75, "train: stopped for requeue: checkpointed at epoch 3"),
        (RequeueRequested("SIGTERM"), 75, "train: stopped for requeue: SIGTERM"),
        (TrainerBadConfig("roi_size must be a list"), 2, "error: train: roi_size must be a list"),
        (StageFailed("fold diverged"), 1, "error: train: fold diverged"),
    ],
)
def test_any_exception_with_an_int_exit_code_maps_to_it(
    exc: BaseException, rc: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run_stage("train", _raise, (exc,), {}, None, False, False) == rc
    assert capsys.readouterr().err.strip() == line


def test_an_exception_without_exit_code_is_a_crash_logged_in_full(caplog: pytest.LogCaptureFixture) -> None:
    class Odd(ValueError):
        exit_code = "75"  # not an int: not a contract

    assert _run_stage("train", _raise, (Odd("x"),), {}, None, False, False) == 1
    crash = [r for r in caplog.records if r.getMessage() == "train crashed"]
    assert crash and crash[0].exc_info is not None and crash[0].exc_info[0] is Odd


# ---- markers -------------------------------------------------------------------------------
def test_stage_marker_done_failed_and_requeue(tmp_path: Path) -> None:
    wd = WorkDir.at(tmp_path).ensure()
    with stage_marker(wd.marker("convert"), "abc", crops=3) as m:
        time.sleep(0.01)
        m.done(converted=3)
    data = wd.marker("convert").read()
    assert data is not None and data["status"] == "done" and data["inputs_digest"] == "abc"
    assert data["details"] == {"crops": 3, "converted": 3} and data["duration_s"] >= 0.01
    assert data["versions"]["python"] and data["start"] and data["end"]

    with stage_marker(wd.marker("analyze"), "d"):  # no explicit done: done on a clean exit
        pass
    assert wd.marker("analyze").is_done("d")

    with pytest.raises(ValueError):
        with stage_marker(wd.marker("bundlegen"), "d"):
            raise ValueError("segresnet:\n  not in the registry")
    reason = wd.marker("bundlegen").read()["reason"]  # type: ignore[index]
    assert reason == "ValueError: segresnet: not in the registry"

    with pytest.raises(TrainerStopped):  # a stop for requeue resumes later: the marker stays running
        with stage_marker(wd.marker("train.dints_0"), "d"):
            raise TrainerStopped("SIGUSR1")
    assert wd.marker("train.dints_0").status == "running"

    with pytest.raises(StageFailed):  # a soft failure recorded by the body (with details) is kept
        with stage_marker(wd.marker("ensemble"), "d") as m:
            exc = StageFailed("2 row(s) failed")
            m.fail(failure_reason(exc), n_written=5)
            raise exc
    data = wd.marker("ensemble").read()
    assert data["reason"] == "StageFailed: 2 row(s) failed" and data["details"]["n_written"] == 5  # type: ignore[index]
    assert len(failure_reason(ValueError("x" * 1000))) == 300


def test_stage_context_sets_up_work_dir_logging_and_config(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("resolution_nm: [2.62, 4, 4]\nclasses: [ecs, pm]\n")
    ctx = StageContext.open("convert", tmp_path / "w", cfg_file, log_name=shard_label("convert", (1, 3)))
    ctx.log.info("hello from the shard")
    assert ctx.wd.root == (tmp_path / "w").resolve() and ctx.wd.config_file.is_file()
    assert list(ctx.cfg.classes) == ["ecs", "pm"]
    assert "hello from the shard" in (ctx.wd.logs_dir / "convert.shard-1-of-3.log").read_text()
    with ctx.marker("d"):
        pass
    assert ctx.wd.marker("convert").is_done("d")


def test_one_shard_name_for_markers_locks_and_logs() -> None:
    from stages.analyze.analyze import shard_marker_name

    assert shard_name("convert", (2, 8)) == "convert.shard-2-of-8" == shard_label("convert", (2, 8))
    assert shard_marker_name(2, 8) == "analyze.shard-2-of-8"
    assert stage_lock_names("analyze", {"shard": "2/8"}, Path("/nonexistent")) == ["analyze.shard-2-of-8"]
    assert shard_label("convert", None) == "convert"


# ---- the Bundle object -----------------------------------------------------------------------
def _bundle(
    wd: WorkDir,
    name: str,
    *,
    algo_object: bool = True,
    kind: str | None = None,
    trained: bool = False,
    ckpt: Path | None = None,
) -> Path:
    d = wd.root / name
    (d / "configs").mkdir(parents=True)
    hp = {"bundle_root": str(d), "ckpt_path": str(ckpt or d / "model"), "num_epochs": 2}
    (d / "configs" / "hyper_parameters.yaml").write_text(yaml.safe_dump(hp))
    if algo_object:
        (d / "algo_object.json").write_text(json.dumps({"_target_": "x.Algo", "_state_": {}}))
    if kind is not None:
        (d / BUNDLE_RECORD).write_text(json.dumps({"templates": kind, "resolution_nm": [2.62, 4, 4]}))
    if trained:
        m = wd.marker(f"train.{name}")
        m.start("d")
        m.done(best_metric=0.5)
    return d


def test_bundle_is_decided_once_and_every_stage_agrees(tmp_path: Path) -> None:
    from stages.ensemble.ensemble import find_trained_bundles
    from stages.predict.predict import trained_members
    from stages.train.train import folds_of

    wd = WorkDir.at(tmp_path / "w").ensure()
    elsewhere = tmp_path / "ckpts"
    _bundle(wd, "segresnet_0", kind="builtin", trained=True)
    _bundle(wd, "segresnet_1", kind="official", trained=True, ckpt=elsewhere)
    _bundle(wd, "segresnet_2")  # generated, not trained
    _bundle(wd, "dints_0", algo_object=False)  # bundlegen started, did not finish
    for other in ("ensemble_output", "nifti_data", "analyze_shards", "Segresnet_3", "segresnet_x"):
        (wd.root / other / "configs").mkdir(parents=True)

    assert [b.name for b in wd.bundles()] == ["dints_0", "segresnet_0", "segresnet_1", "segresnet_2"]
    b0, b1, b2 = wd.bundle_at("segresnet", 0), wd.bundle_at("segresnet", 1), wd.bundle_at("segresnet", 2)
    assert (b0.kind, b1.kind, b2.kind) == ("builtin", "official", "builtin")  # no record: builtin
    assert b0.generated and b0.trained and b2.generated and not b2.trained
    assert not wd.bundle_at("dints", 0).generated and not wd.bundle_at("dints", 0).trained
    assert b1.model_dir == elsewhere and b1.progress_file == elsewhere / "progress.yaml"
    assert b0.hyper_parameters == b0.dir / "configs" / "hyper_parameters.yaml"
    assert b0.record["resolution_nm"] == [2.62, 4, 4] and (b0.algo, b0.fold) == ("segresnet", 0)
    assert Bundle.from_dir(wd, wd.root / "ensemble_output") is None

    # ensemble, predict and train see the same bundles
    members, skipped = find_trained_bundles(wd)
    assert [m.name for m in members] == ["segresnet_0", "segresnet_1"] and len(skipped) == 1
    assert [p.name for p in trained_members(wd, None)] == ["segresnet_0", "segresnet_1"]
    assert folds_of(wd, "segresnet") == [0, 1, 2] and folds_of(wd, "dints") == [0]


def test_every_work_dir_path_is_known_to_workdir(tmp_path: Path) -> None:
    wd = WorkDir.at(tmp_path)
    assert wd.jobs_file == wd.root / "slurm" / "jobs.json"
    assert wd.locks_dir == wd.root / "locks"
    assert wd.analyze_shards_dir(4) == wd.root / "analyze_shards" / "n4"
    assert wd.stage_log("train.dints") == wd.root / "logs" / "train.dints.log"
    assert wd.predictions_dir == wd.root / "predictions"
    assert wd.crop_records_dir == wd.root / "markers" / "convert" and wd.submission_dir == wd.root / "submission"
    assert wd.slurm_logs_dir == wd.root / "logs" / "slurm"
    assert wd.sbatch_script("train.dints_0") == wd.root / "slurm" / "train.dints_0.sbatch"
    assert wd.report("convert.json") == wd.root / "reports" / "convert.json"


# ---- one deterministic NIfTI writer ---------------------------------------------------------
def test_nifti_writer_is_byte_identical_on_rerun(tmp_path: Path) -> None:
    """Real geometry: anisotropic z (2.62 nm), odd origin, odd shape. Python's gzip stamps the
    time and the temporary file name into the header; ours stamps neither."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(37, 29, 11), dtype=np.uint8)
    labels[:3] = 255  # unknown
    aff = spacing_affine((4.0, 4.0, 2.62), (13.0, -6.0, 1.31))
    a, b = tmp_path / "a" / "x_label.nii.gz", tmp_path / "b" / "x_label.nii.gz"
    save_nifti(a, labels, aff, compresslevel=1)
    time.sleep(1.1)  # a gzip mtime has 1 s resolution
    save_nifti(b, labels, aff, compresslevel=1)
    raw = a.read_bytes()
    assert raw == b.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0" and not raw[3] & 0x08  # mtime 0, no name
    img = nib.load(str(b))
    assert np.array_equal(np.asarray(img.dataobj), labels) and img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, aff)
    assert gzip.decompress(raw) == nifti_image(labels, aff).to_bytes()  # plain gzip of the NIfTI bytes
    save_nifti(tmp_path / "c.nii.gz", labels, aff)  # default level: no time stamp either
    assert (tmp_path / "c.nii.gz").read_bytes()[4:8] == b"\0\0\0\0"


def test_ensemble_and_predict_write_nifti_through_the_one_writer() -> None:
    for mod in ("stages/ensemble/ensemble.py", "stages/predict/predict.py", "common/blockwise.py"):
        src = (ROOT / mod).read_text()
        assert "save_nifti" in src and "nib.save" not in src and "import gzip" not in src, mod


# ---- common/ is shared rules only ------------------------------------------------------------
def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_common_is_scheduler_free_and_torch_free() -> None:
    for f in sorted((ROOT / "common").glob("*.py")):
        bad = _imports(f) & {"slurm", "training", "stages", "tools"}  # not even lazily
        assert not bad, f"{f.name} imports {bad}"
        bad = _imports(f, top_level_only=True) & {"torch", "monai"}  # an optional lazy import is allowed
        assert not bad, f"{f.name} imports {bad}"
        src = f.read_text()
        for cmd in ("squeue", "scontrol", "sacct", "sbatch"):
            assert f'"{cmd}"' not in src, f"{f.name} runs {cmd}"


@functools.cache
def _string_constants(path: Path) -> list[str]:
    """String literals of a module, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


@pytest.mark.parametrize(
    "literal,home",
    [
        ("cellmap_bundle.json", "common/workdir.py"),
        ("hyper_parameters.yaml", "common/workdir.py"),
        ("progress.yaml", "common/workdir.py"),
        ("algo_object.json", "common/workdir.py"),
        ("recon-1/em/fibsem-uint8", "common/ngff.py"),
    ],
)
def test_names_are_spelled_once(literal: str, home: str) -> None:
    files = [f for pkg in ("common", "stages", "slurm", "tools") for f in sorted((ROOT / pkg).rglob("*.py"))]
    where = [str(f.relative_to(ROOT)) for f in files if literal in _string_constants(f)]
    assert where == [home]


# ---- one console script ------------------------------------------------------------------------
def test_console_script_is_declared() -> None:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["cellmap-a3ds"] == "stages.cli:main"


def test_every_option_of_every_command_has_help() -> None:
    import click

    from stages.cli import COMMANDS, main

    ctx = click.Context(main)
    missing = [f"cellmap-a3ds {opt.name}" for opt in main.params if isinstance(opt, click.Option) and not opt.help]
    for name in COMMANDS:
        cmd = main.get_command(ctx, name)
        assert cmd is not None, name
        for p in cmd.params:
            if isinstance(p, click.Option) and not (p.help or "").strip():
                missing.append(f"{name} {'/'.join(p.opts)}")
    assert missing == []


def test_console_script_version_help_and_lazy_imports() -> None:
    code = (
        "import sys; from stages.cli import main\n"
        "try:\n    main(['convert', '--help'], prog_name='cellmap-a3ds')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "print('RC', rc, 'TORCH', 'torch' in sys.modules, 'MONAI', 'monai' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert "--data-root" in res.stdout and "RC 0 TORCH False MONAI False" in res.stdout, res.stdout + res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "stages.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.startswith("cellmap-a3ds, version ")
    assert res.stdout.split()[-1] != "unknown"
    res = subprocess.run(
        [sys.executable, "-m", "stages.cli", "--help"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120
    )
    assert all(c in res.stdout for c in ("convert", "analyze", "bundlegen", "train", "ensemble", "status"))


def test_console_script_runs_a_stage_with_its_exit_code(tmp_path: Path) -> None:
    """``cellmap-a3ds analyze`` is ``python -m stages.analyze``: the same one-line error and exit 2."""
    outs = []
    for argv in (["-m", "stages.cli", "analyze"], ["-m", "stages.analyze"]):
        wd = tmp_path / argv[-1]
        res = subprocess.run(
            [sys.executable, *argv, "--work-dir", str(wd)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=ENV,
            timeout=300,
        )
        errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert res.returncode == 2 and len(errs) == 1, res.stderr
        outs.append(errs[0].replace(str(wd), "W"))
    assert outs[0] == outs[1] and "datalist" in outs[0]


def test_lock_of_a_live_process_on_this_host_is_held_regardless_of_age(tmp_path: Path) -> None:
    """Same host, pid alive and refreshed: held; the age rule only ends holders that stopped refreshing."""
    from common.lock import stale_reason

    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", "stale_after_s": 300}
    assert stale_reason(owner, age_s=10) is None
    assert "not refreshed" in (stale_reason(owner, age_s=301) or "")
    gone = {**owner, "host": "node-elsewhere"}
    assert stale_reason(gone, age_s=10) is None and stale_reason(gone, age_s=400)
