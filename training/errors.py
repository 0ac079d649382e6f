"""The errors of the bundle runtime, each with the exit code it stands for.

Deliberately not ``common.errors``: this package is copied into every trained bundle
(``scripts/cellmap_training``) and must run without this repository. A caller maps any
exception with an int ``exit_code`` to its exit status (2 bad config, 1 failed, 75 requeue).
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75


class TrainingError(Exception):
    """A problem the user must fix; printed as one line, exit code 2 by default."""

    exit_code = EXIT_USAGE


class ConfigError(TrainingError):
    """The bundle's hyper-parameters (or their overrides) are invalid; exit code 2."""


class TrainingFailed(TrainingError):
    """Training or inference ran but did not succeed (e.g. no usable checkpoint); exit code 1."""

    exit_code = EXIT_FAILED


class RequeueRequested(Exception):
    """Raised after a checkpoint when SLURM asked the job to stop (exit 75: requeue me)."""

    exit_code = EXIT_REQUEUE
