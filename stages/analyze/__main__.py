"""``python -m stages.analyze``: dataset statistics (MONAI DataAnalyzer, checked) and a report."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_option, parse_shard, stage_command, work_dir_option


@click.command()
@work_dir_option
@config_option
@click.option("--workers", type=int, default=None, help="Parallel processes (default: analyze.workers or 1).")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="DataAnalyzer device; cuda without a GPU falls back to CPU.",
)
@click.option("--shard", default=None, help="Analyse only shard I/N (0-based) for a SLURM array.")
@click.option("--merge", is_flag=True, help="Combine the shards' results into datastats.yaml and the report.")
@click.option("--force", is_flag=True, help="Redo the analysis even when it is done for these inputs.")
@stage_command("analyze")
def main(
    work_dir: Path,
    config_file: Path | None,
    workers: int | None,
    device: str,
    shard: str | None,
    merge: bool,
    force: bool,
) -> int:
    """Analyse the converted datalist: datastats.yaml, datastats_by_case.yaml, reports/analysis.*"""
    from stages.analyze.analyze import run_analyze_entry

    return run_analyze_entry(
        work_dir, config_file, workers=workers, device=device, shard=parse_shard(shard), merge=merge, force=force
    )


if __name__ == "__main__":
    main()
