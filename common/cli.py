"""What every stage's thin click command shares: logging, errors, shards."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from common.errors import EXIT_FAILED, EXIT_USAGE, PipelineError, RequeueRequested

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


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The deterministic subset of ``items`` (already sorted) owned by one shard."""
    if shard is None:
        return list(items)
    i, n = shard
    return [it for k, it in enumerate(items) if k % n == i]


def _run_stage(stage: str, fn: Callable[..., Any], args: Any, kwargs: dict[str, Any], wd: Path | None,
               lock: bool, wait: bool) -> int:
    """Run one stage callback under its work-dir locks; the exit code of the contract.

    A run that fails (exit 1 or 2) after creating the work dir's ``pipeline.yaml`` removes it
    again: its settings (a mistyped flag) must not become what every later run reuses. The
    check happens under the lock, so a file another run wrote is never touched.
    """
    from common.lock import LockHeld, hold_locks, stage_lock_names

    cfg_file = wd / "pipeline.yaml" if wd is not None else None
    had_config = True
    try:
        with contextlib.ExitStack() as stack:
            if lock and wd is not None:
                stack.enter_context(hold_locks(wd, stage_lock_names(stage, kwargs, wd), wait=wait))
            had_config = cfg_file is None or cfg_file.exists()
            try:
                rc = int(fn(*args, **kwargs) or 0)
            except (PipelineError, Exception) as exc:  # noqa: BLE001 - classified below
                if not had_config and cfg_file is not None and getattr(exc, "exit_code", EXIT_FAILED) in (
                        EXIT_FAILED, EXIT_USAGE):
                    with contextlib.suppress(OSError):
                        cfg_file.unlink(missing_ok=True)
                raise
            if rc in (EXIT_FAILED, EXIT_USAGE) and not had_config and cfg_file is not None:
                with contextlib.suppress(OSError):
                    cfg_file.unlink(missing_ok=True)
    except LockHeld as exc:
        click.echo(f"error: {stage}: {exc}", err=True)
        return exc.exit_code
    except PipelineError as exc:
        click.echo(f"error: {stage}: {exc}", err=True)
        return exc.exit_code
    except RequeueRequested as exc:
        click.echo(f"{stage}: stopped for requeue: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo(f"error: {stage}: interrupted", err=True)
        return 130
    except Exception:  # noqa: BLE001 - the last line of defence, logged in full
        logging.getLogger(f"cellmap.{stage}").exception("%s crashed", stage)
        return EXIT_FAILED
    return rc


def stage_command(stage: str, lock: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a click callback: one-line errors, documented exit codes, one writer per work dir.

    ``PipelineError`` -> ``error: <message>`` and its exit code (2 or 1);
    ``RequeueRequested`` -> exit 75; anything else -> logged traceback, exit 1.

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
                "--wait", "wait_for_lock", is_flag=True,
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
