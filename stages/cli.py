"""``cellmap-a3ds``: one console script over every stage, beside ``python -m stages.<stage>``.

``cellmap-a3ds <command> [options]`` runs exactly the click command of
``python -m stages.<command>`` (same options, same exit codes); ``cellmap-a3ds --version``
prints the version, ``cellmap-a3ds status`` the status table (:mod:`slurm.status`).

A command's module is imported only when that command runs (or its ``--help`` is shown):
``cellmap-a3ds convert --help`` imports neither torch nor MONAI, and an image that ships
only its own stage still lists the others without failing.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

from common import pipeline

# command -> (module, attribute, one-line summary shown by ``cellmap-a3ds --help``): every stage of
# the pipeline definition, in its order, then the commands around it
COMMANDS: dict[str, tuple[str, str, str]] = {
    **{s.name: (f"stages.{s.name}.__main__", "main", s.summary) for s in pipeline.STAGES},
    "export": ("stages.ensemble.export", "main", "Write a challenge submission for a test manifest."),
    "status": ("slurm.status", "main", "The state of every stage and algo/fold of a work dir."),
    "submit": ("slurm.submit", "main", "Submit the chain to SLURM (or --status, --dry-run)."),
}


def version() -> str:
    """The installed package's version, else the image's (``CELLMAP_A3DS_IMAGE_VERSION``), else ``unknown``."""
    from importlib import metadata

    try:
        return metadata.version("cellmap-auto3dseg")
    except metadata.PackageNotFoundError:
        return os.environ.get("CELLMAP_A3DS_IMAGE_VERSION", "unknown")


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (see :data:`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = COMMANDS.get(cmd_name)
        if spec is None:
            return None
        module, attr, _ = spec
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except ImportError as exc:  # an image that does not ship this stage
            raise click.ClickException(f"{cmd_name}: not available here ({exc})") from None
        if not isinstance(cmd, click.Command):
            raise click.ClickException(f"{cmd_name}: {module}.{attr} is not a click command")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # the summaries come from COMMANDS: listing the commands imports none of them
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in COMMANDS.items()])


@click.group(cls=LazyGroup)
@click.version_option(
    version(), "--version", "-V", prog_name="cellmap-a3ds", help="Print the version of cellmap-auto3dseg and exit."
)
def main(**_: Any) -> None:
    """cellmap-auto3dseg: MONAI Auto3DSeg on CellMap FIB-SEM data, one stage per command.

    Every command is also ``python -m stages.<stage>`` (``python -m slurm.status``,
    ``python -m slurm.submit``); exit codes: 0 done, 1 failed, 2 bad input, 75 requeue.
    """


if __name__ == "__main__":
    main(prog_name="cellmap-a3ds")
