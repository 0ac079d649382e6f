"""``python -m stages.predict``: thin command over :func:`stages.predict.predict.run_predict`."""

from __future__ import annotations

from pathlib import Path

import click

from common.cli import stage_command, work_dir_option


@click.command()
@work_dir_option
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(path_type=Path),
    help="OME-NGFF zarr multiscale group (directory; finest level read) or a .nii/.nii.gz file.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: an OME-Zarr 0.4 label image (+ labels.nii.gz for NIfTI input).",
)
@click.option("--roi", default=None, help="Region in world nm: z0:z1,y0:y1,x0:x1 (voxel centres inside).")
@click.option("--members", default=None, help="Comma-separated bundle names (default: every trained bundle).")
@click.option("--probabilities", is_flag=True, help="Also write uint8 probabilities (255 = 1).")
@click.option("--shard", default=None, help="I/N: predict blocks k with k % N == I (SLURM arrays).")
@click.option(
    "--mode",
    type=click.Choice(["mean", "vote"]),
    default="mean",
    show_default=True,
    help="mean of the members' probabilities then argmax, or majority vote.",
)
@click.option("--block", "block_t", type=int, default=96, help="Training voxels per block edge (memory budget).")
@click.option("--halo", type=int, default=16, help="Training voxels of context per block side.")
@stage_command("predict")
def main(
    work_dir: Path,
    input_path: Path,
    out: Path,
    roi: str | None,
    members: str | None,
    probabilities: bool,
    shard: str | None,
    mode: str,
    block_t: int,
    halo: int,
) -> int:
    """Segment a volume with the trained bundles of a work dir, block by block."""
    from common.cli import setup_logging
    from stages.predict.predict import run_predict

    setup_logging("predict", Path(out) / "logs")
    only = [m.strip() for m in members.split(",") if m.strip()] if members else None
    s = run_predict(
        work_dir,
        input_path,
        out,
        roi=roi,
        members=only,
        probabilities=probabilities,
        shard=shard,
        mode=mode,
        block_t=block_t,
        halo=halo,
    )
    click.echo(
        f"predict: {s['blocks_done']}/{s['n_blocks']} blocks done -> {s['output']}"
        + ("" if s["complete"] else " (other shards still to run)")
    )
    return 0


if __name__ == "__main__":
    main()
