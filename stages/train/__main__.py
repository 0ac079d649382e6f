"""``python -m stages.train --work-dir W [--config C] --algo NAME [--fold K] [--gpus N] [-v]``."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_option, stage_command, work_dir_option
from common.config import ALGOS
from stages.train.train import run_train_entry
from training.signals import catch_stop_signals_early


@click.command()
@work_dir_option
@config_option
@click.option("--algo", required=True, type=click.Choice(ALGOS), help="Algorithm whose bundle(s) to train.")
@click.option("--fold", type=int, default=None, help="Fold to train (default: every fold of --algo in turn).")
@click.option(
    "--gpus",
    type=int,
    default=None,
    help="GPUs to use: 0 = CPU, 1 = one GPU, N > 1 = torchrun with N processes (default: 1 GPU if any, else CPU).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@stage_command("train")
def main(work_dir: Path, config_file: Path | None, algo: str, fold: int | None, gpus: int | None, verbose: bool) -> int:
    """Train MONAI Auto3DSeg bundles (builtin or official templates) with exact resume.

    Exit codes: 0 done or already done, 1 training failed, 2 bad input, 75 stopped by
    SIGUSR1/SIGTERM after a checkpoint (requeue and rerun the same command).
    """
    catch_stop_signals_early()  # a SIGUSR1 during start-up must not kill the job unsaved
    run_train_entry(work_dir, config_file, algo, fold, gpus, verbose)
    return 0


if __name__ == "__main__":
    main()
