"""``python -m stages.convert``: thin click wrapper over :func:`run_convert_entry`."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_option, parse_shard, stage_command, work_dir_option
from stages.convert.convert import run_cache_entry, run_convert_entry, run_plan_entry


@click.command(name="convert")
@work_dir_option
@config_option
@click.option(
    "--data-root",
    default=None,
    help="Folder, s3://bucket/prefix or http(s):// URL holding <dataset>/<dataset>.zarr (overrides data_root).",
)
@click.option(
    "--crop-manifest",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="List crops from the challenge's crop manifest CSV instead of the data root (overrides convert.crop_manifest).",
)
@click.option(
    "--chunk-cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep remote chunks fetched under this folder (overrides convert.chunk_cache).",
)
@click.option(
    "--cache-to",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Only copy the metadata and chunks convert needs into this folder (same layout), "
    "then convert offline with --data-root pointing at it.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes over crops (default: usable CPUs, at most 16; 1 = in-process).",
)
@click.option("--shard", default=None, help="Convert only shard I of N (0-based, e.g. 0/4); then run --merge.")
@click.option("--merge", is_flag=True, help="Write datalist.json and reports/convert.json from all shards.")
@click.option(
    "--plan",
    "plan",
    is_flag=True,
    help="Only list every crop with the levels and pooling it would use, or why not (writes nothing).",
)
@click.option(
    "--plan-json", default=None, help="With --plan: also write the plan as JSON to this file ('-' = stdout only)."
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@stage_command("convert")
def main(
    work_dir: Path,
    config_file: Path | None,
    data_root: str | None,
    crop_manifest: Path | None,
    chunk_cache: Path | None,
    cache_to: Path | None,
    workers: int | None,
    shard: str | None,
    merge: bool,
    plan: bool,
    plan_json: str | None,
    verbose: bool,
) -> int:
    """Convert CellMap zarr crops into NIfTI images/labels, datalist.json and a report."""
    remote = {"crop_manifest": crop_manifest, "chunk_cache": chunk_cache}
    if plan:
        return run_plan_entry(config_file, work_dir, data_root, plan_json, remote)
    if cache_to is not None:
        return run_cache_entry(config_file, work_dir, data_root, cache_to, remote)
    return run_convert_entry(work_dir, config_file, data_root, workers, parse_shard(shard), merge, verbose, remote)


if __name__ == "__main__":
    main()
