"""One writer per stage (and per bundle for train) in a work dir, on NFS and Lustre too.

A lock is a file ``<work_dir>/locks/<name>.lock`` created with ``O_CREAT | O_EXCL`` (atomic
on NFSv3+ and Lustre, unlike ``fcntl`` locks on some mounts) that holds who took it: host,
pid, SLURM job id, start time, command line. It is removed when the run ends. While it
holds the lock, the holder refreshes the file's mtime from a daemon thread every
``refresh_s`` (30 s). A lock left by a run that died is *stale* and is taken over when

* it was taken on this host and its pid is gone, or
* it was not refreshed for ``stale_after_s`` (300 s, recorded in the file), on any host:
  the holder's node died, or its job was killed with the lock held, or
* it names the SLURM job this process runs in, from another process (the job was requeued
  and restarted: one job runs once at a time; read from the environment only).

Anything else is a live holder: the second run prints who holds the lock and exits 2, or
waits for it with ``--wait``. No scheduler is asked (``common/`` is scheduler-free); the
age of a lock is measured against the lock directory's own clock (the file server's,
through a probe file), so nodes with skewed clocks agree.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import PipelineError

log = logging.getLogger("cellmap.lock")
LOCKS_DIR = "locks"  # WorkDir.locks_dir
REFRESH_S = 30.0  # how often a holder touches its lock file
STALE_AFTER_S = 300.0  # a lock not touched for this long is stale (ten missed refreshes)


class LockHeld(PipelineError):
    """Another live run holds the lock (exit 2)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def fs_now(directory: Path) -> float:
    """The current time as the file system holding ``directory`` stamps it (``time.time()`` when unwritable)."""
    probe = directory / f".clock-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink(missing_ok=True)
    except OSError:
        return time.time()


def lock_owner(refresh_s: float = REFRESH_S, stale_after_s: float = STALE_AFTER_S) -> dict[str, Any]:
    """What a lock file records about the process that takes it."""
    from common.workdir import slurm_ids, slurm_job_id

    job = slurm_job_id(slurm_ids())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": job,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        "token": uuid.uuid4().hex,
        "refresh_s": refresh_s,
        "stale_after_s": stale_after_s,
    }


def describe(owner: dict[str, Any]) -> str:
    """``pid 123 on node7 (SLURM job 456) since 2026-..``."""
    job = f" (SLURM job {owner['slurm_job_id']})" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job} since {owner.get('started')}"


def stale_reason(owner: dict[str, Any], age_s: float | None = None) -> str | None:
    """Why the holder recorded in ``owner`` is gone, or ``None`` if it may still run.

    Args:
        owner: the lock file's content.
        age_s: seconds since the lock file was last refreshed (its mtime), when known.
    """
    mine = lock_owner()["slurm_job_id"]
    if mine and owner.get("slurm_job_id") == mine and owner.get("pid") != os.getpid():
        # one SLURM job runs once at a time: this is our own earlier attempt (killed, requeued)
        return f"SLURM job {mine} was restarted"
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not pid_alive(owner["pid"]):
            return f"process {owner['pid']} on {owner['host']} is gone"
    raw = owner.get("stale_after_s")
    ok = isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw > 0
    limit = float(raw) if ok and raw is not None else STALE_AFTER_S
    if age_s is not None and age_s > limit:
        return f"not refreshed for {age_s:.0f} s (> {limit:g} s): its holder is gone"
    return None


class WorkDirLock:
    """An exclusive lock file; use as a context manager or with :meth:`acquire`/:meth:`release`."""

    def __init__(
        self, path: Path, name: str, refresh_s: float = REFRESH_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.path = path
        self.name = name
        self.refresh_s = refresh_s
        self.stale_after_s = stale_after_s
        self.owner: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _age(self) -> float | None:
        """Seconds since the lock file was last refreshed, by the file system's clock."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return None
        return fs_now(self.path.parent) - mtime

    def _refresh_loop(self, token: str) -> None:
        while not self._stop.wait(self.refresh_s):
            held = self._read()
            if not held or held.get("token") != token:
                log.warning("%s: the lock was taken over by another run; no longer refreshing it", self.name)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _start_refresher(self) -> None:
        assert self.owner is not None
        self._stop.clear()
        self._refresher = threading.Thread(
            target=self._refresh_loop, args=(self.owner["token"],), name=f"lock-refresh-{self.name}", daemon=True
        )
        self._refresher.start()

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now (or torn): treat as held
        return data if isinstance(data, dict) else {}

    def _try_create(self) -> bool:
        owner = lock_owner(self.refresh_s, self.stale_after_s)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(owner, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        self.owner = owner
        return True

    def _break_stale(self, seen: dict[str, Any]) -> bool:
        """Move a stale lock aside, unless another run replaced it in between."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else broke it; try to take it
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != seen.get("token"):
            # we moved a fresh lock another run had just taken: put it back (link fails if a
            # third run took the name meanwhile; then that one holds it and the moved one is lost,
            # which only makes the second holder retry)
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)
        return True

    def acquire(self, wait: bool = False, poll_s: float = 2.0, timeout_s: float | None = None) -> None:
        """Take the lock, breaking a stale one.

        Raises:
            LockHeld: a live run holds it (``wait=False``, or ``timeout_s`` passed).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        announced = False
        while True:
            if self._try_create():
                self._start_refresher()
                return
            held = self._read()
            if held is None:
                continue  # released between our create and read
            # a torn/being-written file ({}) is judged by its age alone
            why = stale_reason(held, self._age())
            if why is not None:
                log.warning("%s: taking over a stale lock (%s)", self.name, why)
                self._break_stale(held)
                continue
            who = describe(held) if held else "another run (lock being written)"
            if not wait or (timeout_s is not None and time.monotonic() - t0 >= timeout_s):
                raise LockHeld(
                    f"{self.path}: {self.name} is already running: {who}; wait for it "
                    f"(--wait), or delete the lock file if that run is really gone"
                )
            if not announced:
                log.info("%s: waiting for %s to finish", self.name, who)
                announced = True
            time.sleep(poll_s)

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.owner is None:
            return
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
            self._refresher = None
        held = self._read()
        if held and held.get("token") == self.owner.get("token"):
            self.path.unlink(missing_ok=True)
        self.owner = None

    def __enter__(self) -> WorkDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_path(work_dir: str | os.PathLike[str], name: str) -> Path:
    """``<work_dir>/locks/<name>.lock``."""
    return Path(work_dir) / LOCKS_DIR / f"{name}.lock"


@contextlib.contextmanager
def hold_locks(work_dir: str | os.PathLike[str], names: list[str], wait: bool = False) -> Iterator[None]:
    """Take every lock in ``names`` (sorted: two runs never wait on each other crosswise).

    A work dir that cannot be written (read-only copy, someone else's) is not locked: the
    stage itself reports that it cannot write there.
    """
    held: list[WorkDirLock] = []
    try:
        for name in sorted(set(names)):
            lk = WorkDirLock(lock_path(work_dir, name), name)
            try:
                lk.acquire(wait=wait)
            except OSError as exc:  # read-only, not a directory, permission: the stage says so
                log.debug("%s: cannot write the lock file (%s); running unlocked", lk.path, exc.strerror)
                continue
            held.append(lk)
        yield
    finally:
        for lk in reversed(held):
            lk.release()


def stage_lock_names(stage: str, params: dict[str, Any], work_dir: Path) -> list[str]:
    """The locks one stage run takes, from its CLI parameters.

    * one lock per stage (``convert``); a ``--shard I/N`` run locks its shard only, so the
      shards of an array run side by side, and ``--merge`` locks the stage;
    * train: one lock per bundle (``train.<algo>_<fold>``); without ``--fold``, every
      generated fold of the algorithm;
    * none for a dry run that writes nothing (``convert --plan``): it must not even create
      the work dir.
    """
    if params.get("plan"):
        return []
    shard = params.get("shard")
    if stage == "train":
        algo, fold = params.get("algo"), params.get("fold")
        if fold is not None:
            return [f"train.{algo}_{fold}"]
        folds = sorted(p.name for p in work_dir.glob(f"{algo}_*") if p.name[len(str(algo)) + 1 :].isdigit())
        return [f"train.{f}" for f in folds] or [f"train.{algo}"]
    if shard:
        from common.cli import parse_shard
        from common.workdir import shard_name

        try:
            return [shard_name(stage, parse_shard(str(shard)) or (0, 1))]
        except PipelineError:
            return [stage]  # a malformed --shard: the stage itself refuses it with a clear line
    return [stage]
