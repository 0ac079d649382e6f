"""Atomic file writes.

Every file the pipeline produces is written to a temporary name in the same
directory and moved into place with ``os.replace``, so a killed process never
leaves a partial file under the final name and a rerun simply redoes the work.
"""

from __future__ import annotations

import contextlib
import hashlib
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


SIDECAR = ".sha256.json"  # <file>.sha256.json: {"size", "sha256"} of a sealed file
PREVIOUS = ".prev"  # <file>.prev: the previous good version, kept until the new one is durable


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_of(path: str | os.PathLike[str]) -> Path:
    """Where the size/sha256 record of ``path`` lives."""
    p = Path(path)
    return p.with_name(p.name + SIDECAR)


def previous_of(path: str | os.PathLike[str]) -> Path:
    """Where the previous good version of ``path`` is kept."""
    p = Path(path)
    return p.with_name(p.name + PREVIOUS)


def verify_sealed(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not the file its sidecar describes (``None``: it is, or no sidecar).

    A file without a sidecar (written before sidecars existed) is not judged here.
    """
    p = Path(path)
    if not p.is_file():
        return "missing"
    side = sidecar_of(p)
    if not side.is_file():
        return None
    try:
        rec = read_json(side)
        size, sha = int(rec["size"]), str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable size/sha256 record"
    actual = p.stat().st_size
    if actual != size:
        return f"{actual} bytes, {size} expected (torn)"
    if file_sha256(p) != sha:
        return "sha256 differs from its record (corrupt)"
    return None


@contextlib.contextmanager
def sealed_path(path: str | os.PathLike[str], keep_previous: bool = False) -> Iterator[Path]:
    """Like :func:`atomic_path` for large files that must survive crashes: the new file is
    fsynced, described by a size/sha256 sidecar, and renamed into place with a directory
    fsync. With ``keep_previous`` the current good file becomes ``<name>.prev`` (with its
    sidecar) first, so a reader always finds one whole version (:func:`sealed_candidates`).
    """
    final = Path(path)
    with atomic_path(final, durable=True) as tmp:
        yield tmp
        record = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        if keep_previous and final.is_file() and verify_sealed(final) is None:
            prev = previous_of(final)
            os.replace(final, prev)
            if sidecar_of(final).is_file():
                os.replace(sidecar_of(final), sidecar_of(prev))
            else:
                sidecar_of(prev).unlink(missing_ok=True)
        # the old record goes before the rename and the new one comes after it: a crash in
        # between leaves a whole file without a record (trusted, as before sidecars existed),
        # never a record describing another file
        sidecar_of(final).unlink(missing_ok=True)
    # atomic_path renamed tmp -> final and fsynced the directory
    atomic_write_text(sidecar_of(final), json.dumps(record, sort_keys=True) + "\n")


def sealed_candidates(path: str | os.PathLike[str]) -> list[tuple[Path, str | None]]:
    """``[(file, why it is unusable or None)]`` for ``path`` and its ``.prev``, existing ones only."""
    out = []
    for p in (Path(path), previous_of(path)):
        if p.is_file():
            out.append((p, verify_sealed(p)))
    return out


def remove_sealed(path: str | os.PathLike[str]) -> None:
    """Delete a sealed file with its sidecar and previous version."""
    for p in (Path(path), previous_of(path)):
        p.unlink(missing_ok=True)
        sidecar_of(p).unlink(missing_ok=True)


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
