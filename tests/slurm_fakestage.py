"""A small stand-in stage for the SLURM machinery tests: ``python -m tests.slurm_fakestage
<stage> --work-dir W [args]``.

It keeps the stage contract the SLURM scripts rely on: real done markers
(:class:`common.workdir.Marker`), exit 0/1, and for ``train`` a SIGUSR1 handler that writes
an atomic checkpoint and exits 75, resuming from it on the next run. Behaviour is steered by
files in the work dir: ``fail_<marker name>`` makes that stage fail (exit 1),
``fake_train.json`` (``{"steps": 10, "step_s": 0.2, "hog_mb": 0}``) sets the training length
(and memory grabbed per step). Every run
appends one line to ``<wd>/fake_runs.log``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from common.io import atomic_write_json, atomic_write_text, read_json
from common.workdir import WorkDir


def _log(wd: WorkDir, text: str) -> None:
    with open(wd.root / "fake_runs.log", "a", encoding="utf-8") as f:
        f.write(f"{time.time():.3f} {text}\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--algo")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--shard")
    ap.add_argument("--merge", action="store_true")
    a = ap.parse_args(argv)
    wd = WorkDir.at(a.work_dir)
    name = f"train.{a.algo}_{a.fold}" if a.stage == "train" else a.stage
    if a.shard:
        name = f"convert.shard_{a.shard.split('/')[0]}"
    marker = wd.marker(name)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    _log(wd, f"{name} start restart={restart} job={os.environ.get('SLURM_JOB_ID', '-')}")
    if marker.is_done():
        _log(wd, f"{name} skip (done)")
        return 0
    marker.start()
    if (wd.root / f"fail_{name}").exists():
        marker.fail(f"injected failure ({wd.root / f'fail_{name}'} exists)")
        _log(wd, f"{name} failed")
        return 1
    if a.stage == "train":
        return _train(wd, name, a.algo, a.fold, marker)
    if a.stage == "ensemble":
        atomic_write_text(wd.ensemble_dir / "fake_ensemble.txt", "ensemble of the fake bundles\n")
    marker.done()
    _log(wd, f"{name} done")
    return 0


def _train(wd: WorkDir, name: str, algo: str, fold: int, marker) -> int:  # noqa: ANN001
    spec = {"steps": 5, "step_s": 0.2}
    cfg_file = wd.root / "fake_train.json"
    if cfg_file.exists():
        spec.update(read_json(cfg_file))
    ckpt = wd.bundle(algo, fold) / "fake_checkpoint.json"
    step = read_json(ckpt)["step"] if ckpt.exists() else 0
    _log(wd, f"{name} resume step={step}")
    stop = {"flag": False}
    signal.signal(signal.SIGUSR1, lambda *_: stop.update(flag=True))
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    hog: list[bytes] = []  # "hog_mb": touched memory per step, for the memory-kill test
    while step < spec["steps"]:
        if spec.get("hog_mb"):
            hog.append(b"x" * (int(spec["hog_mb"]) << 20))
        if stop["flag"]:
            atomic_write_json(ckpt, {"step": step})
            _log(wd, f"{name} checkpoint step={step} exit 75")
            return 75
        time.sleep(spec["step_s"])
        step += 1
    atomic_write_json(ckpt, {"step": step})
    marker.done(best_metric=0.5)
    _log(wd, f"{name} done step={step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
