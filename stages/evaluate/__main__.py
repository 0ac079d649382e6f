"""``python -m stages.evaluate``: score a submission with the challenge's metric (thin command)."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import setup_logging, stage_command


@click.command()
@click.option(
    "--truth",
    required=True,
    type=click.Path(path_type=Path),
    help="Truth zarr: the challenge's groundtruth tree or any store with crop<id>/<class>.",
)
@click.option(
    "--submission",
    required=True,
    type=click.Path(path_type=Path),
    help="Submission .zip, zarr directory, or a folder holding one store.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for evaluation.json, evaluation.md and evaluation.png.",
)
@click.option("--classes", default=None, help="Comma-separated classes to score (default: every truth class).")
@click.option("--crops", default=None, help="Comma-separated crop ids to score (default: every truth crop).")
@stage_command("evaluate")
def main(truth: Path, submission: Path, out: Path, classes: str | None, crops: str | None) -> int:
    """Score SUBMISSION against TRUTH: semantic IoU/Dice, instance F1/Hausdorff, overall."""
    from stages.evaluate.evaluate import render_markdown, run_evaluate

    setup_logging("evaluate")
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    report = run_evaluate(truth, submission, out, split(classes), split(crops))
    click.echo(render_markdown(report))
    return 0


if __name__ == "__main__":
    main()
