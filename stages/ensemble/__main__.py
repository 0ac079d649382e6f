"""``python -m stages.ensemble``: thin command over :func:`stages.ensemble.ensemble.run_ensemble`."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_option, stage_command, work_dir_option


@click.command()
@work_dir_option
@config_option
@click.option(
    "--method",
    type=click.Choice(["best_n", "best_by_fold"]),
    default=None,
    help="Selection like MONAI's AlgoEnsembleBestN / AlgoEnsembleBestByFold (default best_n).",
)
@click.option("--n-best", type=int, default=None, help="Members for best_n (default 3).")
@click.option(
    "--mode",
    type=click.Choice(["mean", "vote"]),
    default=None,
    help="mean of probabilities then argmax (default), or majority vote.",
)
@click.option(
    "--on",
    default=None,
    help="heldout (default: labelled testing items, else the validation folds, as the report says), "
    "validation, testing, or comma-separated image paths.",
)
@click.option(
    "--members", default=None, help="Comma-separated bundle names to choose from (default: every trained bundle)."
)
@click.option(
    "--export-submission",
    "manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also predict the crops of a test_crop_manifest.csv and write submission.zarr + .zip.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="CellMap data root for --export-submission (default: data_root of the config).",
)
@click.option("--skip-ensemble", is_flag=True, help="With --export-submission: only export.")
@stage_command("ensemble")
def main(
    work_dir: Path,
    config_file: Path | None,
    method: str | None,
    n_best: int | None,
    mode: str | None,
    on: str | None,
    members: str | None,
    manifest: Path | None,
    data_root: Path | None,
    skip_ensemble: bool,
) -> int:
    """Ensemble the trained bundles, score them, optionally export a challenge submission."""
    from stages.ensemble.ensemble import render_markdown, run_ensemble_entry

    only = [m.strip() for m in members.split(",") if m.strip()] if members else None
    if not skip_ensemble:
        res = run_ensemble_entry(work_dir, config_file, method=method, n_best=n_best, mode=mode, on=on, only=only)
        click.echo(render_markdown(res.report))
    if manifest is not None:
        from stages.ensemble.export import echo_summary, run_export_entry

        return echo_summary(
            run_export_entry(
                work_dir,
                manifest,
                config_file,
                data_root=data_root,
                method=method,
                n_best=n_best,
                mode=mode,
                members=only,
            )
        )
    return 0


if __name__ == "__main__":
    main()
