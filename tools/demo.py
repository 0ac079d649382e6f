"""``make demo``: the whole chain on CPU on a synthetic CellMap-like dataset.

Every stage runs through its real command line (``python -m stages.<name>``), as a
SLURM job or a container would run it, on one work dir. Rerunning the demo is
cheap: every stage skips what is already done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

from common import algorithms, pipeline

# What makes the demo learn within minutes on 2 CPU cores (tuned data, network, epochs and
# sampling; the metric is the ensemble report's pooled per-class Dice, untouched):
# * data: 10 crops of 40x64x64 at 4 nm whose EM is painted from their labels (grey levels >= 30
#   apart, noise 10), no tiny malformed crops (small=False);
# * one small segresnet (8 filters, 2 levels, 2 deep-supervision heads, batch norm: the painted
#   classes differ by absolute grey level, which per-patch instance norm hides) - the demo shows
#   the chain, not the zoo; add swinunetr/dints to ``algos`` to see them (slower);
# * class-balanced patches (the default crop_mode) cached in RAM, 32^3 patches, batch 2, flips
#   only (intensity augmentation would blur the grey levels that define the classes).
DEMO_TRAIN = {
    "num_epochs": 40,
    "num_steps_per_epoch": 5,
    "roi_size": [32, 32, 32],
    "batch_size": 2,
    "num_workers": 0,
    "cache_rate": 1.0,
    "val_every": 10,
    "learning_rate": 0.01,
    "augment": "flips",
    # every registered algorithm's small network (common/algorithms.py: demo_network)
    "network": algorithms.demo_network(),
    "search_epochs": 2,
}
DEMO_CROPS = 10
DEMO_CROP_SHAPE = (40, 64, 64)
DEMO_ALGOS = [algorithms.names()[0]]  # the first registered algorithm (segresnet)
# extra command-line flags of a stage in the demo (2 CPU cores, no GPU)
DEMO_STAGE_ARGS = {"convert": ["--workers", "2"], "analyze": ["--workers", "2", "--device", "cpu"]}


def demo_config(data_root: Path) -> dict[str, Any]:
    """The demo's pipeline.yaml: 4 nm, six classes, one small builtin segresnet."""
    return {
        "data_root": str(data_root),
        "resolution_nm": 4,
        "classes": ["ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "nuc"],
        "unknown_label": 255,
        # held-out crops (never used for selection) are what the ensemble report scores
        "split": {"validation_fraction": 0.25, "test_fraction": 0.25, "seed": 0},
        "algos": DEMO_ALGOS,
        "num_folds": 1,
        "templates": "builtin",
        "target_gpu_mem_gb": 48,
        "train": DEMO_TRAIN,
        "convert": {"max_failed_fraction": 1.0},  # the synthetic tree's malformed crops fail by design
    }


def _run(argv: list[str], log: Path) -> float:
    """Run one stage command, tee its output to ``log``; return its wall time."""
    click.echo(f"\n$ {' '.join(argv)}")
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line)
        rc = proc.wait()
    if rc != 0:
        raise click.ClickException(f"{argv[2]} exited with {rc}; see {log}")
    return time.perf_counter() - t0


@click.command()
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_work"))
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_data"))
@click.option("--fresh", is_flag=True, help="Delete the demo work dir and data first.")
def main(work_dir: Path, data_root: Path, fresh: bool) -> None:
    """Generate the synthetic dataset and run convert → analyze → bundlegen → train → ensemble."""
    from tools.synthetic_cellmap import make_synthetic_cellmap

    if fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(data_root, ignore_errors=True)
    work_dir = work_dir.resolve()
    data_root = data_root.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if not data_root.exists():
        click.echo(f"generating a synthetic CellMap-like dataset in {data_root}")
        # the crops' EM is painted from their labels so the demo model can learn them
        make_synthetic_cellmap(
            data_root, small=False, n_extra_crops=DEMO_CROPS, extra_crop_shape=DEMO_CROP_SHAPE, em_from_labels=True
        )
    cfg = work_dir / "pipeline.yaml"
    if not cfg.exists():
        cfg.write_text(
            "# make demo: small and fast on 2 CPU cores\n" + yaml.safe_dump(demo_config(data_root), sort_keys=False)
        )
    log = work_dir / "logs" / "demo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    # one math thread per process unless the user says otherwise: on 2 shared cores, OpenMP
    # threads that outnumber the free cores spin against each other (10x slower steps, measured)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    wd = ["--work-dir", str(work_dir)]
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    for stage in pipeline.chain():  # the one pipeline definition: order and fan-out
        argv = [py, "-m", f"stages.{stage.name}", *wd, *DEMO_STAGE_ARGS.get(stage.name, [])]
        if stage.fanout == "algo_fold":  # every fold of one algorithm per command
            for algo in yaml.safe_load(cfg.read_text()).get("algos", DEMO_ALGOS):
                times[f"{stage.name} {algo}"] = _run([*argv, "--algo", algo], log)
        else:
            times[stage.name] = _run(argv, log)
    _run([py, "-m", "slurm.status", *wd], log)
    click.echo("\nstage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    click.echo(f"demo finished in {time.perf_counter() - t_all:.0f} s; outputs in {work_dir}")
    report = work_dir / "reports" / "ensemble.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        scores = rep.get("scores", {})
        click.echo(f"  scored on: {rep.get('scored_on_note', rep.get('scored_on', '?'))}")
        for name, sc in scores.items():
            per = ", ".join(
                f"{k} {v['dice']:.3f}" for k, v in sc.get("per_class", {}).items() if v.get("dice") is not None
            )
            click.echo(f"  {name}: pooled mean Dice {sc.get('mean_dice', float('nan')):.3f} ({per})")
        lb = rep.get("leaderboard") or {}
        if lb:

            def f(v: float | None) -> str:
                return "-" if v is None else f"{v:.3f}"

            click.echo(
                f"  challenge-style score of the ensemble: overall {f(lb.get('overall'))} "
                f"(mean semantic IoU {f(lb.get('mean_semantic_iou'))}, "
                f"mean instance combined {f(lb.get('mean_instance_combined'))})"
            )
    click.echo(f"  reports: {work_dir / 'reports'}  predictions: {work_dir / 'ensemble_output'}")


if __name__ == "__main__":
    main()
