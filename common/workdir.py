"""The work_dir layout and the stage done-markers.

Layout (MONAI's own names are kept so its tools work on our work_dir)::

    <work_dir>/
      pipeline.yaml                 the resolved configuration
      nifti_data/                   convert: <case>_image.nii.gz, <case>_label.nii.gz
      nifti_data/datalist.json      convert: MONAI datalist (training/testing, fold keys)
      datastats.yaml                analyze (MONAI DataAnalyzer)
      datastats_by_case.yaml        analyze
      input.yaml                    bundlegen (MONAI task description)
      algorithm_templates/          bundlegen (templates the bundles import from)
      <algo>_<fold>/                bundlegen/train (MONAI bundle)
      ensemble_output/              ensemble
      reports/                      human-facing reports: *.md, *.json, *.png
      markers/<name>.json           done markers (see :class:`Marker`)
      logs/                         stage and job logs
      slurm/                        generated sbatch scripts and job ids
      locks/<name>.lock             who runs a stage now (common/lock.py; removed at the end)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import PipelineError
from common.io import atomic_write_json, read_json

MARKER_RUNNING = "running"
MARKER_DONE = "done"
MARKER_FAILED = "failed"


@dataclass(frozen=True)
class WorkDir:
    """Paths inside one pipeline work dir (no I/O except :meth:`ensure`)."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> WorkDir:
        """A ``WorkDir`` for an absolute version of ``path``."""
        return cls(Path(path).expanduser().resolve())

    def ensure(self) -> WorkDir:
        """Create the work dir and check that it is writable.

        Raises:
            PipelineError: the directory cannot be created or written.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PipelineError(f"{self.root}: work dir is not writable ({exc.strerror})") from None
        return self

    # ---- layout -----------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.root / "pipeline.yaml"

    @property
    def nifti_dir(self) -> Path:
        return self.root / "nifti_data"

    @property
    def datalist(self) -> Path:
        return self.nifti_dir / "datalist.json"

    @property
    def datastats(self) -> Path:
        return self.root / "datastats.yaml"

    @property
    def datastats_by_case(self) -> Path:
        return self.root / "datastats_by_case.yaml"

    @property
    def input_yaml(self) -> Path:
        return self.root / "input.yaml"

    @property
    def templates_dir(self) -> Path:
        return self.root / "algorithm_templates"

    @property
    def ensemble_dir(self) -> Path:
        return self.root / "ensemble_output"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def markers_dir(self) -> Path:
        return self.root / "markers"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    def bundle(self, algo: str, fold: int) -> Path:
        """MONAI bundle folder ``<algo>_<fold>``."""
        return self.root / f"{algo}_{fold}"

    def marker(self, name: str) -> Marker:
        """The done marker called ``name`` (``convert``, ``train.dints_0``, ...)."""
        return Marker(self.markers_dir / f"{name}.json", name)

    def markers(self) -> list[Marker]:
        """Every marker present, sorted by name."""
        if not self.markers_dir.is_dir():
            return []
        return [Marker(p, p.stem) for p in sorted(self.markers_dir.glob("*.json"))]


# ---- provenance -------------------------------------------------------------------
def versions() -> dict[str, str]:
    """Versions of the interpreter and of the packages that shape the outputs."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("cellmap-auto3dseg", "numpy", "zarr", "nibabel", "monai", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    # Inside the images the project is not pip-installed; they say what they are instead.
    for key, env in (("image_version", "CELLMAP_A3DS_IMAGE_VERSION"), ("image_revision", "CELLMAP_A3DS_IMAGE_REVISION")):
        if os.environ.get(env):
            out[key] = os.environ[env]
    return out


def slurm_ids() -> dict[str, str]:
    """SLURM job identifiers of the current process, if it runs under SLURM."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k.lower(): os.environ[k] for k in keys if os.environ.get(k)}


def digest(items: Iterable[Any]) -> str:
    """A stable sha256 over JSON-serialisable items (config parts, file stats).

    A mapping is hashed whole (keys and values): iterating it would hash its keys only, so
    two configs differing in a value would collide.
    """
    h = hashlib.sha256()
    if isinstance(items, Mapping):
        items = [items]
    for it in items:
        h.update(json.dumps(it, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike[str]) -> list[Any]:
    """Cheap identity of a file or directory tree: relative paths, sizes, mtimes."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]
    out: list[Any] = []
    for f in sorted(p.rglob("*")):
        if f.is_file():
            st = f.stat()
            out.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
    return out


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (markers, reports, job records)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Marker:
    """A stage (or sub-task) marker: ``markers/<name>.json``, always written atomically.

    States: ``running`` (start, no end: the job is live or was killed),
    ``done`` (clean finish; ``inputs_digest`` says for which inputs) and
    ``failed`` (with ``reason``).
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._t0: float | None = None

    def read(self) -> dict[str, Any] | None:
        """The marker's content, or ``None`` when absent or unreadable."""
        try:
            data = read_json(self.path)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def status(self) -> str | None:
        data = self.read()
        return None if data is None else data.get("status")

    def is_done(self, inputs_digest: str | None = None) -> bool:
        """True if finished cleanly (for these inputs, when a digest is given)."""
        data = self.read()
        if not data or data.get("status") != MARKER_DONE:
            return False
        return inputs_digest is None or data.get("inputs_digest") == inputs_digest

    def _base(self, status: str, inputs_digest: str | None) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": status,
            "inputs_digest": inputs_digest,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": sys.argv,
            "versions": versions(),
            "slurm": slurm_ids(),
        }

    def start(self, inputs_digest: str | None = None, **details: Any) -> None:
        """Record that the work started (status ``running``)."""
        self._t0 = time.monotonic()
        data = self._base(MARKER_RUNNING, inputs_digest)
        data.update(start=utc_now(), end=None, details=details)
        atomic_write_json(self.path, data)

    def _finish(self, status: str, reason: str | None, details: dict[str, Any]) -> None:
        prev = self.read() or {}
        data = self._base(status, prev.get("inputs_digest"))
        merged = dict(prev.get("details") or {})
        merged.update(details)
        end = utc_now()
        duration = None if self._t0 is None else round(time.monotonic() - self._t0, 3)
        data.update(start=prev.get("start", end), end=end, duration_s=duration, details=merged)
        if reason is not None:
            data["reason"] = reason
        atomic_write_json(self.path, data)

    def done(self, **details: Any) -> None:
        """Record a clean finish; ``details`` (e.g. ``best_metric``) are merged in."""
        self._finish(MARKER_DONE, None, details)

    def fail(self, reason: str, **details: Any) -> None:
        """Record a failure with a one-line reason."""
        self._finish(MARKER_FAILED, reason.splitlines()[0] if reason else "failed", details)


# ---- a copied or moved work dir ------------------------------------------------------
# Auto3DSeg bundles hold absolute paths (bundle_root, ckpt_path, the datalist, the templates):
# a copied work dir would train into, and read from, the original one.
REBASE_FILES = ("configs/*.yaml", "configs/*.json", "algo_object.json")


def bundle_dirs(wd: WorkDir) -> list[Path]:
    """Every generated bundle ``<algo>_<fold>/`` (a folder with ``configs/``), sorted."""
    out = []
    for p in sorted(wd.root.glob("*_*")):
        head, _, tail = p.name.rpartition("_")
        if head and tail.isdigit() and (p / "configs").is_dir():
            out.append(p)
    return out


def recorded_work_dir(bundle: Path) -> Path | None:
    """The work dir a bundle was generated for: the parent of its ``bundle_root``."""
    import yaml

    hp = bundle / "configs" / "hyper_parameters.yaml"
    try:
        data = yaml.safe_load(hp.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    root = data.get("bundle_root") if isinstance(data, dict) else None
    return Path(str(root)).parent if root else None


def _same_dir(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and os.path.samefile(a, b)  # one dir under two mount paths or a symlink
    except OSError:
        return False


def check_bundle_location(wd: WorkDir, bundle: Path) -> None:
    """Refuse a bundle made for another work dir (the work dir was copied or moved).

    Raises:
        PipelineError: one line with the command that fixes it.
    """
    made_for = recorded_work_dir(bundle)
    if made_for is None or _same_dir(made_for, wd.root):
        return
    how = "copied" if made_for.exists() else "moved"
    raise PipelineError(
        f"{bundle.name}: generated for work dir {made_for}, but this is {wd.root} (a {how} work dir "
        f"would use the other one's paths); run: python -m stages.bundlegen --work-dir {wd.root} --rebase")


def rebase_work_dir(wd: WorkDir) -> dict[str, Any]:
    """Rewrite the absolute paths of a copied or moved work dir to point into itself.

    Every bundle's ``configs/*`` and ``algo_object.json`` and the root ``input.yaml`` get the
    old work-dir prefix replaced by the new one (atomic writes). Idempotent.

    Returns:
        ``{"from": [old roots], "to": root, "files": [changed files]}``.

    Raises:
        PipelineError: the bundles were made for two different work dirs.
    """
    from common.io import atomic_write_text

    olds = {recorded_work_dir(b) for b in bundle_dirs(wd)} - {None}
    olds = {o for o in olds if o is not None and not _same_dir(o, wd.root)}
    changed: list[str] = []
    if not olds:
        return {"from": [], "to": str(wd.root), "files": changed}
    if len(olds) > 1:
        raise PipelineError(f"{wd.root}: bundles were made for several work dirs ({', '.join(map(str, sorted(olds)))}); "
                            "regenerate them: python -m stages.bundlegen --force")
    old = str(next(iter(olds)))
    files = [wd.input_yaml] + [f for b in bundle_dirs(wd) for pat in REBASE_FILES for f in sorted(b.glob(pat))]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        # whole path components only: /runs/r1 must not rewrite /runs/r10
        new_text = _replace_prefix(text, old, str(wd.root))
        if new_text != text:
            atomic_write_text(f, new_text)
            changed.append(str(f.relative_to(wd.root)))
    return {"from": [old], "to": str(wd.root), "files": changed}


def _replace_prefix(text: str, old: str, new: str) -> str:
    import re

    return re.sub(re.escape(old) + r"(?=[/\"'\s,\]}]|$)", lambda _m: new, text, flags=re.MULTILINE)
