"""``python -m stages.convert``: thin click wrapper over :func:`run_convert_entry`."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_option, parse_shard, stage_command, work_dir_option
from stages.convert.convert import run_convert_entry, run_plan_entry


@click.command(name="convert")
@work_dir_option
@config_option
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding <dataset>/<dataset>.zarr (overrides data_root).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes over crops (default: usable CPUs, at most 16; 1 = in-process).")
@click.option("--shard", default=None, help="Convert only shard I of N (0-based, e.g. 0/4); then run --merge.")
@click.option("--merge", is_flag=True, help="Write datalist.json and reports/convert.json from all shards.")
@click.option("--plan", "plan", is_flag=True,
              help="Only list every crop with the levels and pooling it would use, or why not (writes nothing).")
@click.option("--plan-json", default=None, help="With --plan: also write the plan as JSON to this file ('-' = stdout only).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@stage_command("convert")
def main(work_dir: Path, config_file: Path | None, data_root: Path | None, workers: int | None,
         shard: str | None, merge: bool, plan: bool, plan_json: str | None, verbose: bool) -> int:
    """Convert CellMap zarr crops into NIfTI images/labels, datalist.json and a report."""
    if plan:
        return run_plan_entry(config_file, work_dir, data_root, plan_json)
    return run_convert_entry(work_dir, config_file, data_root, workers, parse_shard(shard), merge, verbose)


if __name__ == "__main__":
    main()
