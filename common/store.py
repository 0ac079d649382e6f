"""Where CellMap zarr data lives: a local folder, ``s3://bucket/prefix`` or ``http(s)://`` URL.

One small abstraction over the few things convert does with its input tree: join paths,
read a JSON/text file, list a folder's children, test for a file or folder, open a zarr v2
array and test chunk presence.

* A local root stays a :class:`pathlib.Path` (every local read is what it always was).
* A remote root is a :class:`RemotePath`: the same small pathlib-like surface (``/``,
  ``name``, ``parent``, ``iterdir``, ``is_dir``, ``is_file``, ``read_text``, ``stat``,
  ``resolve``) over an fsspec filesystem; arrays open through zarr v2's ``FSStore``, so
  a read fetches only the chunks it touches.

Remote reads retry transient errors (``retries`` times, exponential back-off) under a
per-request ``timeout_s``; a read that still fails raises ``OSError(EIO)``, which the
stages treat as "storage broken" (the stage stops, a rerun resumes). A missing key is
``FileNotFoundError`` (or ``KeyError`` from a zarr store), never retried.

``s3://`` uses ``s3fs``: anonymous unless the usual AWS variables
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``) are set. Without
``s3fs`` installed, ``s3://bucket/key`` is read anonymously through the bucket's public
HTTPS endpoint ``https://bucket.s3.amazonaws.com/key`` (no listing: give a crop manifest).

The optional chunk cache (``configure(chunk_cache=DIR)``) keeps every chunk fetched under
``DIR/<host or bucket>/<key>``; a later read of the same chunk is local.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REMOTE_SCHEMES = ("s3://", "http://", "https://")
_ENV = {
    "timeout_s": "CELLMAP_STORE_TIMEOUT_S",
    "retries": "CELLMAP_STORE_RETRIES",
    "chunk_cache": "CELLMAP_CHUNK_CACHE",
}


@dataclass(frozen=True)
class StoreOptions:
    """How remote reads behave (carried to worker processes through the environment).

    Attributes:
        timeout_s: seconds one request may take.
        retries: extra attempts after a transient failure (back-off 0.5 s, 1 s, 2 s, ...).
        chunk_cache: local folder keeping fetched chunks ("" = none).
    """

    timeout_s: float = 60.0
    retries: int = 4
    chunk_cache: str = ""


def options() -> StoreOptions:
    """The current options (from :func:`configure`, inherited by workers via the environment)."""
    return StoreOptions(
        timeout_s=float(os.environ.get(_ENV["timeout_s"], StoreOptions.timeout_s)),
        retries=int(os.environ.get(_ENV["retries"], StoreOptions.retries)),
        chunk_cache=os.environ.get(_ENV["chunk_cache"], ""),
    )


def configure(timeout_s: float | None = None, retries: int | None = None, chunk_cache: str | None = None) -> None:
    """Set remote-read options for this process and the workers it starts."""
    for key, val in (("timeout_s", timeout_s), ("retries", retries), ("chunk_cache", chunk_cache)):
        if val is not None:
            os.environ[_ENV[key]] = str(val)
    _FS.clear()


def is_remote(root: str | os.PathLike[str]) -> bool:
    """``True`` for ``s3://``, ``http://`` and ``https://`` roots."""
    return str(root).startswith(REMOTE_SCHEMES)


def have_s3fs() -> bool:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        return False
    return True


def _s3_https(url: str) -> str:
    """``s3://bucket/key`` -> ``https://bucket.s3.amazonaws.com/key`` (anonymous public reads)."""
    parts = urlsplit(url)
    return f"https://{parts.netloc}.s3.amazonaws.com{parts.path}"


_FS: dict[tuple[Any, ...], Any] = {}


def filesystem(protocol: str) -> Any:
    """The fsspec filesystem for ``protocol`` (``s3``, ``http``, ``https``), one per process."""
    opts = options()
    key = (os.getpid(), protocol, opts)
    if key not in _FS:
        import fsspec

        if protocol == "s3":
            creds = any(os.environ.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"))
            _FS[key] = fsspec.filesystem(
                "s3",
                anon=not creds,
                skip_instance_cache=True,
                config_kwargs={
                    "connect_timeout": opts.timeout_s,
                    "read_timeout": opts.timeout_s,
                    "retries": {"max_attempts": opts.retries + 1, "mode": "standard"},
                },
            )
        else:
            import aiohttp

            _FS[key] = fsspec.filesystem(
                "http",
                skip_instance_cache=True,
                client_kwargs={"timeout": aiohttp.ClientTimeout(total=opts.timeout_s)},
            )
    return _FS[key]


def _retry(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, retried on transient errors; missing keys pass through at once."""
    n = options().retries
    for attempt in range(n + 1):
        try:
            return fn(*args)
        except (FileNotFoundError, KeyError, NotADirectoryError, IsADirectoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - aiohttp/botocore raise many kinds
            if _not_found(exc):
                raise FileNotFoundError(errno.ENOENT, "not found", what) from None
            if attempt == n:
                raise OSError(
                    errno.EIO, f"remote read failed after {n + 1} attempts: {type(exc).__name__}: {exc}", what
                ) from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _not_found(exc: BaseException) -> bool:
    """HTTP 403/404 (S3 answers 403 for a missing key when listing is not allowed)."""
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    return status in (403, 404)


class RemotePath:
    """A path inside a remote tree, with the small pathlib surface convert uses.

    Attributes:
        url: the full URL (``s3://b/k``, ``https://host/p``); no trailing slash.
    """

    def __init__(self, url: str, is_dir_hint: bool | None = None) -> None:
        self.url = url.rstrip("/")
        self._dir_hint = is_dir_hint

    # --- naming
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, part: str | os.PathLike[str]) -> RemotePath:
        return RemotePath(f"{self.url}/{str(part).strip('/')}")

    @property
    def _split(self) -> tuple[str, str]:
        s = urlsplit(self.url)
        return f"{s.scheme}://{s.netloc}", s.path or "/"

    @property
    def name(self) -> str:
        return posixpath.basename(self._split[1].rstrip("/"))

    @property
    def parent(self) -> RemotePath:
        base, path = self._split
        return RemotePath(base + posixpath.dirname(path.rstrip("/")))

    def resolve(self) -> RemotePath:
        """``..`` and ``.`` removed (the security checks compare resolved paths)."""
        base, path = self._split
        return RemotePath(base + posixpath.normpath(path))

    # --- where the bytes come from
    @property
    def protocol(self) -> str:
        return urlsplit(self.url).scheme

    def _fs_url(self) -> tuple[Any, str]:
        """(filesystem, the path to give it)."""
        if self.protocol == "s3" and not have_s3fs():
            return filesystem("https"), _s3_https(self.url)
        fs = filesystem(self.protocol)
        return fs, (self.url[len("s3://") :] if self.protocol == "s3" else self.url)

    def read_bytes(self) -> bytes:
        fs, u = self._fs_url()
        return _retry(self.url, fs.cat_file, u)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def is_file(self) -> bool:
        try:
            self.read_bytes()  # metadata files are small; a HEAD would cost the same round trip
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        return True

    def _ls(self) -> list[RemotePath]:
        fs, u = self._fs_url()
        if self.protocol == "s3" and not have_s3fs():
            raise FileNotFoundError(errno.ENOENT, "listing needs s3fs (or a crop manifest)", self.url)
        entries = _retry(self.url, fs.ls, u + "/", True)
        out = []
        for e in entries:
            name = str(e["name"]).rstrip("/")
            child = posixpath.basename(name)
            if child and child not in (".", "..") and name != u.rstrip("/"):
                out.append(RemotePath(f"{self.url}/{child}", e.get("type") == "directory"))
        return out

    def iterdir(self) -> list[RemotePath]:
        """Children (needs a listing: S3 with s3fs, or an HTTP server that lists folders)."""
        return self._ls()

    def is_dir(self) -> bool:
        if self._dir_hint is not None:
            return self._dir_hint
        try:
            return bool(self._ls())
        except (FileNotFoundError, NotADirectoryError):
            return False

    def stat(self) -> os.stat_result:
        """Size only (mtime 0: remote trees are addressed by content, see docs/data.md)."""
        fs, u = self._fs_url()
        size = len(self.read_bytes()) if self.name.startswith(".") else int(_retry(self.url, fs.size, u) or 0)
        return os.stat_result((0o100644, 0, 0, 1, 0, 0, size, 0, 0, 0))


def path(root: str | os.PathLike[str] | RemotePath) -> Path | RemotePath:
    """A local :class:`Path` or a :class:`RemotePath` for ``root``."""
    if isinstance(root, (Path, RemotePath)):
        return root
    return RemotePath(str(root)) if is_remote(root) else Path(root)


def read_json(p: Path | RemotePath) -> Any:
    return json.loads(p.read_text(encoding="utf-8"))


def open_array(p: Path | RemotePath) -> Any:
    """A read-only zarr v2 array (local: as before; remote: FSStore with retries and the chunk cache)."""
    import zarr

    if isinstance(p, Path):
        return zarr.open_array(str(p), mode="r")
    return zarr.open_array(_remote_store(p), mode="r")


def _remote_store(p: RemotePath) -> Any:
    from zarr.storage import FSStore

    class RetryingStore(FSStore):  # type: ignore[misc]
        """FSStore whose reads retry, time out, and go through the chunk cache."""

        def __init__(self, rp: RemotePath) -> None:
            fs, u = rp._fs_url()
            # only a missing key reads as fill value: a network error must never (exceptions=KeyError)
            super().__init__(u, fs=fs, mode="r", exceptions=(KeyError,))
            self._rp = rp

        def _cache_file(self, key: str) -> Path | None:
            cache = options().chunk_cache
            if not cache or key.startswith(".z"):
                return None
            s = urlsplit(self._rp.url)
            return Path(cache) / s.netloc / s.path.lstrip("/") / key

        def __getitem__(self, key: str) -> bytes:
            cf = self._cache_file(key)
            if cf is not None and cf.is_file():
                return cf.read_bytes()
            try:
                data = _retry(f"{self._rp.url}/{key}", FSStore.__getitem__, self, key)
            except FileNotFoundError:
                raise KeyError(key) from None
            self._keep(key, data)
            return data

        def _keep(self, key: str, data: bytes) -> None:
            cf = self._cache_file(key)
            if cf is not None:
                cf.parent.mkdir(parents=True, exist_ok=True)
                tmp = cf.with_name(f".tmp-{os.getpid()}-{cf.name}")
                tmp.write_bytes(data)
                os.replace(tmp, cf)

        def getitems(self, keys: Any, *, contexts: Any = None) -> dict[str, bytes]:
            """Chunks fetched concurrently; absent ones are left out (fill value), failed ones retried.

            (``FSStore.getitems`` drops *every* failed key, so a network error would read
            as the fill value: never here.)
            """
            out: dict[str, bytes] = {}
            todo = []
            for k in keys:
                cf = self._cache_file(k)
                if cf is not None and cf.is_file():
                    out[k] = cf.read_bytes()
                else:
                    todo.append(k)
            n = options().retries
            for attempt in range(n + 1):
                if not todo:
                    break
                paths = {self.map._key_to_str(self._normalize_key(k)): k for k in todo}
                res = self.fs.cat(list(paths), on_error="return")
                failed: list[tuple[str, BaseException]] = []
                for pth, k in paths.items():
                    v = res.get(pth)
                    if isinstance(v, (bytes, bytearray)):
                        out[k] = bytes(v)
                        self._keep(k, out[k])
                    elif (
                        isinstance(v, BaseException)
                        and not isinstance(v, (FileNotFoundError, KeyError))
                        and not _not_found(v)
                    ):
                        failed.append((k, v))
                todo = [k for k, _ in failed]
                if failed and attempt == n:
                    k, v = failed[0]
                    raise OSError(
                        errno.EIO,
                        f"remote read failed after {n + 1} attempts: {type(v).__name__}: {v}",
                        f"{self._rp.url}/{k}",
                    )
                if failed:
                    time.sleep(0.5 * 2**attempt)
            return out

        def __contains__(self, key: str) -> bool:
            cf = self._cache_file(key)
            if cf is not None and cf.is_file():
                return True
            # a 1-byte ranged read, not fs.exists: exists() reads any error (503, timeout) as "absent"
            try:
                _retry(f"{self._rp.url}/{key}", self.fs.cat_file, self.map._key_to_str(self._normalize_key(key)), 0, 1)
            except FileNotFoundError:
                return False
            return True

    return RetryingStore(p)


def chunk_present(array: Any, key: str) -> bool:
    """Whether the chunk ``key`` exists in the array's store (absent = never fetched or fill)."""
    store = array.chunk_store if array.chunk_store is not None else array.store
    return key in store
