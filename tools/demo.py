"""``make demo``: the whole chain on CPU on a synthetic CellMap-like dataset.

Every stage runs through its real command line (``python -m stages.<name>``), as a
SLURM job or a container would run it, on one work dir. Rerunning the demo is
cheap: every stage skips what is already done.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

# Small networks so that a few minutes of CPU show real learning; keys not used by an
# algorithm's network are ignored by it.
DEMO_TRAIN = {
    "num_epochs": 10,
    "num_steps_per_epoch": 8,
    "roi_size": [32, 32, 32],
    "batch_size": 2,
    "num_workers": 0,
    "val_every": 2,
    "learning_rate": 0.002,
    "network": {"init_filters": 8, "feature_size": 12, "channel_mul": 0.25, "num_blocks": 4},
}


def demo_config(data_root: Path) -> dict[str, Any]:
    """The demo's pipeline.yaml: 4 nm, six classes, all three builtin algorithms, tiny training."""
    return {
        "data_root": str(data_root),
        "resolution_nm": 4,
        "classes": ["ecs", "pm", "mito_mem", "mito_lum", "mito_ribo", "nuc"],
        "unknown_label": 255,
        "split": {"validation_fraction": 0.3, "seed": 0},
        "algos": ["segresnet", "swinunetr", "dints"],
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
    from common.synthetic_cellmap import make_synthetic_cellmap

    if fresh:
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(data_root, ignore_errors=True)
    work_dir = work_dir.resolve()
    data_root = data_root.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    if not data_root.exists():
        click.echo(f"generating a synthetic CellMap-like dataset in {data_root}")
        # the big crops' EM is painted from their labels so the demo models can learn something
        make_synthetic_cellmap(data_root, n_extra_crops=6, extra_crop_shape=(40, 64, 64), em_from_labels=True)
    cfg = work_dir / "pipeline.yaml"
    if not cfg.exists():
        cfg.write_text("# make demo: small and fast on 2 CPU cores\n" + yaml.safe_dump(demo_config(data_root), sort_keys=False))
    log = work_dir / "logs" / "demo.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    wd = ["--work-dir", str(work_dir)]
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    times["convert"] = _run([py, "-m", "stages.convert", *wd, "--workers", "2"], log)
    times["analyze"] = _run([py, "-m", "stages.analyze", *wd, "--workers", "2", "--device", "cpu"], log)
    times["bundlegen"] = _run([py, "-m", "stages.bundlegen", *wd], log)
    for algo in ("segresnet", "swinunetr", "dints"):
        times[f"train {algo}"] = _run([py, "-m", "stages.train", *wd, "--algo", algo], log)
    times["ensemble"] = _run([py, "-m", "stages.ensemble", *wd], log)
    _run([py, "-m", "common.status", *wd], log)
    click.echo("\nstage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    click.echo(f"demo finished in {time.perf_counter() - t_all:.0f} s; outputs in {work_dir}")
    click.echo(f"  reports: {work_dir / 'reports'}  predictions: {work_dir / 'ensemble_output'}")


if __name__ == "__main__":
    main()
