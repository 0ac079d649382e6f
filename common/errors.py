"""Errors and exit codes shared by every stage.

Exit codes (documented in the README, relied on by ``slurm/``):

* ``0``  success (or nothing left to do)
* ``1``  the stage ran and failed (a crash, a failed training, dropped cases)
* ``2``  bad input: config, paths, arguments, data that cannot be used at all
* ``75`` interrupted by SIGUSR1/SIGTERM after a clean checkpoint: requeue me
  (``EX_TEMPFAIL`` from sysexits.h)

The contract is the ``exit_code`` attribute: :func:`common.cli.stage_command` maps *any*
exception carrying an int ``exit_code`` (these classes, ``common.lock.LockHeld``, or a
library's own, e.g. the training library's stop signal) to that exit code, 75 printed as
``<stage>: stopped for requeue: <message>``, others as ``error: <stage>: <message>``.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 75


class PipelineError(Exception):
    """A problem the user must fix; printed as one line, exit code 2 by default."""

    exit_code = EXIT_USAGE


class ConfigError(PipelineError):
    """The configuration (file or CLI flags) is invalid."""


class StageFailed(PipelineError):
    """The stage ran but did not succeed; exit code 1."""

    exit_code = EXIT_FAILED


class RequeueRequested(Exception):
    """Raised after a checkpoint when SLURM asked the job to stop (exit 75)."""

    exit_code = EXIT_REQUEUE
