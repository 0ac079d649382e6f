"""The stage skeleton every stage shares: logging, config, markers, errors, shards.

* :class:`StageContext` sets up a stage run once: the work dir (created, checked writable),
  logging to ``logs/<name>.log`` and the resolved configuration.
* :func:`stage_marker` brackets the work: marker ``running`` with the inputs digest, then
  ``done`` (versions, timings, details) or ``failed`` with the one reason format of
  :func:`failure_reason`; a stop for requeue (exit 75) leaves it ``running``.
* :func:`stage_command` turns any exception into the exit-code contract (0/1/2/75).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from common.errors import EXIT_FAILED, EXIT_REQUEUE, EXIT_USAGE, PipelineError
from common.workdir import Marker, WorkDir, shard_name

if TYPE_CHECKING:
    from common.config import PipelineConfig

T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(stage: str, log_dir: Path | None = None, verbose: bool = False) -> logging.Logger:
    """Log to stderr and, when ``log_dir`` is given, append to ``<log_dir>/<stage>.log``."""
    root = logging.getLogger()
    level = logging.DEBUG if verbose else logging.INFO
    root.setLevel(level)
    for h in list(root.handlers):
        if getattr(h, "_cellmap", False):
            root.removeHandler(h)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(log_dir / f"{stage}.log"))
        except OSError:
            pass  # an unwritable work dir is reported by WorkDir.ensure with a clear message
    for h in handlers:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        h._cellmap = True  # type: ignore[attr-defined]
        root.addHandler(h)
    return logging.getLogger(f"cellmap.{stage}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"2/8"`` -> ``(2, 8)``; shards are 0-based: ``0/N`` .. ``N-1/N``.

    Raises:
        PipelineError: malformed or out of range.
    """
    if text is None:
        return None
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise PipelineError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise PipelineError(f"--shard {text}: need 0 <= I < N")
    return i, n


def shard_label(stage: str, shard: tuple[int, int] | None) -> str:
    """The marker, lock and log name of a run: the stage, or its shard (:func:`common.workdir.shard_name`)."""
    return stage if shard is None else shard_name(stage, shard)


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The deterministic subset of ``items`` (already sorted) owned by one shard."""
    if shard is None:
        return list(items)
    i, n = shard
    return [it for k, it in enumerate(items) if k % n == i]


# ---- the stage skeleton ------------------------------------------------------------------
REASON_MAX = 300


def failure_reason(exc: BaseException) -> str:
    """The one failure format of every marker: ``<ExceptionType>: <message on one line>`` (<= 300 chars)."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def exit_code_of(exc: BaseException) -> int | None:
    """The exit code an exception carries (an int ``exit_code`` attribute, from any library), else ``None``."""
    code = getattr(exc, "exit_code", None)
    return code if isinstance(code, int) and not isinstance(code, bool) else None


@contextlib.contextmanager
def stage_marker(marker: Marker, inputs_digest: str | None = None, **details: Any) -> Iterator[Marker]:
    """Bracket one unit of work with its marker.

    ``running`` (with ``inputs_digest`` and ``details``) on entry; on a clean exit ``done``
    unless the body already finished the marker itself (``marker.done(**more)`` to add
    details, or ``marker.fail(reason)`` for a soft failure it reports otherwise); on an
    exception ``failed`` with :func:`failure_reason`, then the exception propagates. A stop
    for requeue (an exception whose ``exit_code`` is 75) leaves the marker ``running``: the
    work resumes on the next attempt.
    """
    marker.start(inputs_digest, **details)
    try:
        yield marker
    except BaseException as exc:
        if exit_code_of(exc) != EXIT_REQUEUE and not marker.finished:
            marker.fail(failure_reason(exc))
        raise
    if not marker.finished:
        marker.done()


@dataclass
class StageContext:
    """A stage run's work dir, logger and configuration, set up once.

    Attributes:
        stage: the stage (``convert``, ``train``, ...).
        wd: the work dir (created and checked writable).
        log: the stage's logger; logs go to stderr and ``logs/<log name>.log``.
        cfg: the resolved configuration (written to ``pipeline.yaml`` unless ``dump=False``).
    """

    stage: str
    wd: WorkDir
    log: logging.Logger
    cfg: PipelineConfig

    @classmethod
    def open(
        cls,
        stage: str,
        work_dir: str | os.PathLike[str],
        config_file: str | os.PathLike[str] | None = None,
        overrides: dict[str, Any] | None = None,
        *,
        log_name: str | None = None,
        verbose: bool = False,
        dump: bool = True,
    ) -> StageContext:
        """Work dir, logging (``logs/<log_name or stage>.log``) and config, in this order.

        Raises:
            PipelineError: the work dir is not writable, or the configuration is invalid (exit 2).
        """
        from common.config import load_config

        wd = WorkDir.at(work_dir).ensure()
        log = setup_logging(log_name or stage, wd.logs_dir, verbose)
        cfg = load_config(wd.root, config_file, overrides, dump=dump)
        return cls(stage, wd, log, cfg)

    def marker(
        self, inputs_digest: str | None = None, name: str | None = None, **details: Any
    ) -> contextlib.AbstractContextManager[Marker]:
        """:func:`stage_marker` over ``markers/<name or stage>.json``."""
        return stage_marker(self.wd.marker(name or self.stage), inputs_digest, **details)


def _run_stage(
    stage: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], wd: Path | None, lock: bool, wait: bool
) -> int:
    """Run one stage callback under its work-dir locks; the exit code of the contract.

    A run that fails (exit 1 or 2) after creating the work dir's ``pipeline.yaml`` removes it
    again: its settings (a mistyped flag) must not become what every later run reuses. The
    check happens under the lock, so a file another run wrote is never touched.
    """
    from common.lock import hold_locks, stage_lock_names

    cfg_file = wd / "pipeline.yaml" if wd is not None else None
    had_config = True
    try:
        with contextlib.ExitStack() as stack:
            if lock and wd is not None:
                stack.enter_context(hold_locks(wd, stage_lock_names(stage, kwargs, wd), wait=wait))
            had_config = cfg_file is None or cfg_file.exists()
            try:
                rc = int(fn(*args, **kwargs) or 0)
            except Exception as exc:  # noqa: BLE001 - classified below
                if (
                    not had_config
                    and cfg_file is not None
                    and (exit_code_of(exc) or EXIT_FAILED) in (EXIT_FAILED, EXIT_USAGE)
                ):
                    with contextlib.suppress(OSError):
                        cfg_file.unlink(missing_ok=True)
                raise
            if rc in (EXIT_FAILED, EXIT_USAGE) and not had_config and cfg_file is not None:
                with contextlib.suppress(OSError):
                    cfg_file.unlink(missing_ok=True)
    except KeyboardInterrupt:
        click.echo(f"error: {stage}: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified by the exit code it carries
        code = exit_code_of(exc)  # common.errors, the lock, or any library's own (the trainer's)
        if code == EXIT_REQUEUE:
            click.echo(f"{stage}: stopped for requeue: {exc}", err=True)
            return code
        if code == 0:  # e.g. click.exceptions.Exit(0)
            return 0
        if code is not None:
            click.echo(f"error: {stage}: {exc}", err=True)
            return code
        logging.getLogger(f"cellmap.{stage}").exception("%s crashed", stage)  # the last line of defence
        return EXIT_FAILED
    return rc


def stage_command(stage: str, lock: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a click callback: one-line errors, documented exit codes, one writer per work dir.

    An exception carrying an int ``exit_code`` (``PipelineError`` and its kin, ``LockHeld``,
    ``RequeueRequested``, or the training library's own) -> exit 75 with ``<stage>: stopped
    for requeue: <message>``, any other code with ``error: <stage>: <message>``; anything
    else -> logged traceback, exit 1.

    With ``lock`` (every stage), the run holds ``<work_dir>/locks/<stage>.lock`` (per shard,
    per bundle for train: :func:`common.lock.stage_lock_names`) while it runs; a second run
    says who holds it and exits 2, or waits with the ``--wait`` flag this adds.
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wait = bool(kwargs.pop("wait_for_lock", False)) if lock else False
            wd = Path(kwargs["work_dir"]).expanduser().resolve() if kwargs.get("work_dir") is not None else None
            sys.exit(_run_stage(stage, fn, args, kwargs, wd, lock, wait))

        if lock:
            wrapper = click.option(
                "--wait",
                "wait_for_lock",
                is_flag=True,
                help="If another run of this stage holds the work dir, wait for it instead of exiting 2.",
            )(wrapper)
        return wrapper

    return deco


work_dir_option = click.option(
    "--work-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Pipeline work dir (shared cluster storage).",
)
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="YAML config applied on top of <work-dir>/pipeline.yaml.",
)
