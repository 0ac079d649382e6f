"""The train stage: train one algorithm's bundle(s), each fold in turn, with exact resume.

* **builtin** bundles (``cellmap_bundle.json`` ``templates: builtin``, or no record) run the
  bundle's own copy of the trainer (``scripts/cellmap_training``, written by bundlegen;
  ``train_bundle``) in this process, or the bundle's own ``scripts/train.py`` under ``torchrun``
  for ``--gpus N > 1``; a bundle without that copy is bad input (rerun bundlegen);
* **official** bundles run their own ``scripts/train.py run --config_file ...`` with this
  interpreter, the job's devices and the ``train:`` section as CLI overrides; the output is
  streamed line by line to ``logs/train.<algo>_<fold>.log``.

A fold is skipped when its ``train.<algo>_<fold>`` marker is done and the model is there; a
half-done builtin fold continues from ``model/checkpoint_latest.pt``. SIGUSR1/SIGTERM stop it
after the current step with a checkpoint and exit 75 (the marker stays ``running``). The done
marker (with ``best_metric``) and ``algo_object.json``'s ``best_metric`` are written only
after a clean finish.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.cli import StageContext, exit_code_of, stage_marker
from common.config import PipelineConfig, bundle_hyper_parameters, check_train_overrides
from common.errors import EXIT_REQUEUE, PipelineError, RequeueRequested, StageFailed
from common.io import read_yaml
from common.redact import redact
from common.workdir import (
    ALGO_OBJECT,
    CONFIGS_DIR,
    HYPER_PARAMETERS,
    WorkDir,
    check_bundle_location,
    digest,
    file_fingerprint,
)
from stages.train.gpu import require_gpus

log = logging.getLogger("cellmap.train")

STAGE = "train"


def folds_of(wd: WorkDir, algo: str) -> list[int]:
    """Folds that have a generated ``<algo>_<fold>`` bundle, sorted."""
    return sorted(b.fold for b in wd.bundles(algo))


def _cli_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``{"roi_size": [32, 32, 16]}`` -> ``["--roi_size", "[32, 32, 16]"]`` (lists stay lists)."""
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--{k}", _cli_value(v)]
    return args


def write_algo_json(bundle: Path, templates_dir: Path, best_metric: float) -> None:
    """Record the score where MONAI reads it (``algo_object.json``), atomically.

    MONAI's own ``algo_to_json`` writes the file in place; it is pointed at a temporary
    folder and the result moved over the bundle's file.
    """
    from monai.auto3dseg.utils import algo_from_json, algo_to_json

    algo, meta = algo_from_json(str(bundle / ALGO_OBJECT), template_path=str(templates_dir))
    meta = {k: v for k, v in (meta or {}).items() if k not in ("best_metric", "template_path")}
    with tempfile.TemporaryDirectory(dir=bundle) as tmp:
        algo.get_output_path = lambda: tmp  # type: ignore[method-assign]
        out = algo_to_json(algo, template_path=str(templates_dir), best_metric=float(best_metric), **meta)
        os.replace(out, bundle / ALGO_OBJECT)


class _Forward:
    """Forward SIGUSR1/SIGTERM to a child process and remember that one came."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.got: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Forward:
        for s in (signal.SIGUSR1, signal.SIGTERM):
            self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.got = signum
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def run_streamed(
    argv: list[str], log_file: Path, env: dict[str, str], cwd: Path | None = None
) -> tuple[int, int | None]:
    """Run ``argv`` in ``cwd``, appending its output line by line to ``log_file`` (never held in memory).

    The official templates write ``runner.log`` into the working directory, so the
    callers run them inside the bundle, never in the user's directory.

    Returns:
        ``(exit code, signal forwarded or None)``.
    """
    from training.signals import EARLY

    if EARLY:  # stopped before anything ran: nothing to save
        return EXIT_REQUEUE, EARLY[-1]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log.info("running: %s (output -> %s)", redact(" ".join(argv)), log_file)  # no URI credentials in logs
    with open(log_file, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1, cwd=cwd
        )
        assert proc.stdout is not None
        with _Forward(proc) as fwd:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
            rc = proc.wait()
    return rc, fwd.got


def _launcher(gpus: int) -> list[str]:
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    return [sys.executable]


def _device_env(gpus: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def train_builtin(wd: WorkDir, bundle: Path, cfg: PipelineConfig, gpus: int | None) -> float:
    """Train one builtin bundle with the bundle's own copy of the training library
    (``scripts/cellmap_training``); returns the best mean foreground Dice.

    Raises:
        training.vendor.BundleOutdated: the bundle has no copy (generated before bundles carried
            one): rerun bundlegen. Its ``exit_code`` (2) is what the stage skeleton exits with.
    """
    from training.vendor import load_bundle_library

    hp = bundle / CONFIGS_DIR / HYPER_PARAMETERS
    overrides = cfg.train.given()
    trainer = load_bundle_library(bundle, "trainer")
    if gpus is not None and gpus > 1:
        argv = [
            *_launcher(gpus),
            str(bundle / "scripts" / "train.py"),
            "run",
            "--config_file",
            str(hp),
            *override_args(overrides),
        ]
        rc, sig = run_streamed(argv, wd.logs_dir / f"train.{bundle.name}.log", _device_env(gpus), cwd=bundle)
        if rc == EXIT_REQUEUE or sig is not None:
            raise RequeueRequested(f"{bundle.name}: stopped by signal {sig} (rc {rc})")
        if rc != 0:
            raise StageFailed(
                f"{bundle.name}: torchrun training exited with {rc}; see {wd.logs_dir / f'train.{bundle.name}.log'}"
            )
        prog = read_yaml(Path(read_yaml(hp)["ckpt_path"]) / trainer.PROGRESS_YAML)
        return float(prog[-1]["best_avg_dice_score"])
    device = "cpu" if gpus == 0 else None
    # the library's own errors carry an int exit_code, which the stage skeleton maps
    res = trainer.train_bundle(hp, overrides, device=device)
    return float(res.best_metric)


def train_official(wd: WorkDir, bundle: Path, cfg: PipelineConfig, gpus: int | None) -> float:
    """Train one official-template bundle with its own ``scripts/train.py``."""
    configs = sorted(str(p) for p in (bundle / CONFIGS_DIR).iterdir() if p.suffix in (".yaml", ".json"))
    argv = [
        *_launcher(gpus or 1),
        str(bundle / "scripts" / "train.py"),
        "run",
        "--config_file",
        ",".join(configs),
        *override_args(cfg.train.given()),
    ]
    env = _device_env(gpus)
    env.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses the templates' file store
    log_file = wd.logs_dir / f"train.{bundle.name}.log"
    rc, sig = run_streamed(argv, log_file, env, cwd=bundle)
    if sig is not None:
        raise RequeueRequested(f"{bundle.name}: stopped by signal {sig} (official templates restart the fold)")
    if rc != 0:
        raise StageFailed(f"{bundle.name}: official scripts/train.py exited with {rc}; see {log_file}")
    from monai.auto3dseg.utils import algo_from_json

    algo, _ = algo_from_json(str(bundle / ALGO_OBJECT), template_path=str(wd.templates_dir))
    score = algo.get_score()
    if score is None:
        raise StageFailed(f"{bundle.name}: training finished without a score in model/progress.yaml")
    return float(score)


def train_fold(wd: WorkDir, cfg: PipelineConfig, algo: str, fold: int, gpus: int | None) -> float | None:
    """Train (or skip, or continue) one bundle; returns its best metric."""
    name = f"{algo}_{fold}"
    b = wd.bundle_at(algo, fold)
    bundle, hp = b.dir, b.hyper_parameters
    if not hp.is_file() or not b.generated:
        raise PipelineError(f"{bundle}: bundle not generated (run bundlegen for {algo} first)")
    check_bundle_location(wd, bundle)  # a copied work dir must not train into the original
    check_train_overrides(cfg.train.given(), bundle_hyper_parameters(bundle), f"{wd.config_file} or --config")
    kind = b.kind
    marker = wd.marker(f"{STAGE}.{name}")
    inputs = digest([kind, cfg.train.given(), file_fingerprint(hp)])
    prev = marker.read() or {}
    model_dir = b.model_dir
    if marker.is_done() and b.progress_file.is_file():
        best = (prev.get("details") or {}).get("best_metric")
        if not marker.is_done(inputs):
            log.warning(
                "%s: trained with other settings (train: section or bundle changed); keeping the "
                "trained model; delete %s to retrain",
                name,
                model_dir,
            )
        log.info("%s: already trained (best mean Dice %s): skipping", name, best)
        return best
    resumed = (model_dir / "checkpoint_latest.pt").is_file()
    log.info("%s: %s %s training (%s templates)", name, "continuing" if resumed else "starting", algo, kind)
    try:  # a stop for requeue leaves the marker running; any other error fails it (common.cli.stage_marker)
        with stage_marker(marker, inputs, algo=algo, fold=fold, templates=kind, gpus=gpus, resumed=resumed):
            best = (train_official if kind == "official" else train_builtin)(wd, bundle, cfg, gpus)
            write_algo_json(bundle, wd.templates_dir, best)
            marker.done(best_metric=best, model_dir=str(model_dir), templates=kind)
    except Exception as exc:
        if exit_code_of(exc) == EXIT_REQUEUE:
            log.warning("%s: checkpointed; exit %d so the job is requeued", name, EXIT_REQUEUE)
        raise
    log.info("%s: done, best mean foreground Dice %.4f", name, best)
    return best


def run_train(
    wd: WorkDir, cfg: PipelineConfig, algo: str, fold: int | None = None, gpus: int | None = None
) -> dict[str, float | None]:
    """Train ``algo`` for one fold, or for every generated fold in turn.

    Returns:
        ``{"<algo>_<fold>": best_metric}``.

    Raises:
        PipelineError: no such bundle (exit 2). StageFailed: training failed (exit 1).
        RequeueRequested: stopped by SIGUSR1/SIGTERM after a checkpoint (exit 75).
    """
    if gpus is not None and gpus < 0:
        raise PipelineError(f"--gpus must be >= 0, got {gpus}")
    require_gpus(gpus)  # --gpus N >= 1 without usable CUDA: exit 2 now, not days of CPU training
    folds = [fold] if fold is not None else folds_of(wd, algo)
    if not folds:
        raise PipelineError(f"{wd.root}: no {algo}_<fold> bundle (run bundlegen first)")
    return {f"{algo}_{k}": train_fold(wd, cfg, algo, k, gpus) for k in folds}


def run_train_entry(
    work_dir: Path,
    config_file: Path | None,
    algo: str,
    fold: int | None = None,
    gpus: int | None = None,
    verbose: bool = False,
) -> dict[str, float | None]:
    """What the CLI calls: set up the stage (config, ``logs/train.<algo>.log``), train."""
    ctx = StageContext.open(STAGE, work_dir, config_file, log_name=f"{STAGE}.{algo}", verbose=verbose)
    return run_train(ctx.wd, ctx.cfg, algo, fold, gpus)
