"""``python -m stages.bundlegen``: input.yaml and MONAI bundles, generated on a CPU node."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import config_option, stage_command, work_dir_option


@click.command()
@work_dir_option
@config_option
@click.option("--algos", default=None, help="Comma-separated algorithms (default: the config's algos).")
@click.option(
    "--target-gpu-mem-gb",
    type=float,
    default=None,
    help="GPU memory the bundles are sized for (default: config, 48 = L40S).",
)
@click.option("--force", is_flag=True, help="Regenerate bundles that are already done.")
@click.option(
    "--rebase", is_flag=True, help="Only rewrite the bundles' absolute paths after the work dir was copied or moved."
)
@stage_command("bundlegen")
def main(
    work_dir: Path,
    config_file: Path | None,
    algos: str | None,
    target_gpu_mem_gb: float | None,
    force: bool,
    rebase: bool,
) -> int:
    """Write input.yaml and one bundle per algorithm and fold (<algo>_<fold>/)."""
    if rebase:  # common.workdir.rebase_work_dir: paths of a copied/moved work dir
        from common.workdir import WorkDir, rebase_work_dir

        res = rebase_work_dir(WorkDir.at(work_dir))
        click.echo(f"rebased {len(res['files'])} files from {res['from'] or '(nothing to do)'} to {res['to']}")
        return 0
    from stages.bundlegen.bundlegen import run_bundlegen_entry

    return run_bundlegen_entry(work_dir, config_file, algos=algos, target_gpu_mem_gb=target_gpu_mem_gb, force=force)


if __name__ == "__main__":
    main()
