"""Atomic file writes.

Every file the pipeline produces is written to a temporary name in the same
directory and moved into place with ``os.replace``, so a killed process never
leaves a partial file under the final name and a rerun simply redoes the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

TMP_MARK = ".tmp-"


def current_umask() -> int:
    """The process umask (from /proc on Linux: setting it, even briefly, races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and platforms) refuse fsync on a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place on success.

    The temporary name keeps the final suffix (``x.nii.gz`` -> ``.tmp-x-abc.nii.gz``)
    because some writers (nibabel) choose the format from it. On any exception the
    temporary file is removed and the final file is left untouched. ``durable``: also
    fsync the file and, after the rename, its directory (checkpoints: a power cut or a
    node crash must not leave the new name pointing at unwritten blocks).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    stem = final.name[: len(final.name) - len(suffix)] if suffix else final.name
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_MARK}{stem}-", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 whatever the umask; give the file the mode open() would have
    # (0666 & ~umask) so group members on shared storage can read what the pipeline wrote
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        if durable:
            fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as block-style YAML atomically (key order kept)."""
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Read a YAML file with ``yaml.safe_load`` (never the unsafe loader)."""
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def remove_stale_tmp(directory: str | os.PathLike[str]) -> int:
    """Delete temporary files a killed run left in ``directory`` (not recursive).

    Returns:
        The number of files removed.
    """
    removed = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.iterdir():
        if p.name.startswith(TMP_MARK) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed
