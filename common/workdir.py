"""The work_dir layout and the stage done-markers.

Layout (MONAI's own names are kept so its tools work on our work_dir)::

    <work_dir>/
      pipeline.yaml                 the resolved configuration
      nifti_data/                   convert: <case>_image.nii.gz, <case>_label.nii.gz
      nifti_data/datalist.json      convert: MONAI datalist (training/testing, fold keys)
      analyze_shards/n<N>/          analyze --shard I/N: per-shard results until --merge
      datastats.yaml                analyze (MONAI DataAnalyzer)
      datastats_by_case.yaml        analyze
      input.yaml                    bundlegen (MONAI task description)
      algorithm_templates/          bundlegen (templates the bundles import from)
      <algo>_<fold>/                bundlegen/train (MONAI bundle, see :class:`Bundle`)
        configs/hyper_parameters.yaml   the bundle's settings (``bundle_root``, ``ckpt_path``)
        model/                          checkpoints, metrics.jsonl, progress.yaml (clean finish)
        algo_object.json                MONAI's record of the bundle (``algo_from_json``)
        cellmap_bundle.json             bundlegen's record (templates, resolution_nm, output_classes)
      ensemble_output/              ensemble
      .analyze_tmp/                 analyze scratch (removed after each run)
      submission/                   ensemble --export-submission: submission.zarr, submission.zip
      reports/                      human-facing reports: *.md, *.json, *.png
      markers/<name>.json           done markers (see :class:`Marker`)
      markers/convert/<case>.json   convert's per-crop records
      logs/                         stage logs (<stage>.log, <stage>.shard-I-of-N.log, train.<algo>.log)
      logs/slurm/                   SLURM job output files
      slurm/                        generated sbatch scripts and job ids (slurm/jobs.json)
      predictions/<input name>/     the default output of a submitted predict job
      locks/<name>.lock             who runs a stage now (common/lock.py; removed at the end)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from common.errors import PipelineError
from common.io import atomic_write_json, read_json

MARKER_RUNNING = "running"
MARKER_DONE = "done"
MARKER_FAILED = "failed"

# the names of a bundle's files, spelled once (MONAI's own names, plus bundlegen's record)
BUNDLE_RECORD = "cellmap_bundle.json"
HYPER_PARAMETERS = "hyper_parameters.yaml"
PROGRESS_YAML = "progress.yaml"
ALGO_OBJECT = "algo_object.json"
MODEL_DIR = "model"
CONFIGS_DIR = "configs"
ANALYZE_SHARDS_DIR = "analyze_shards"
# a bundle folder is ``<algo>_<fold>``: a lower-case algorithm name and a fold number
BUNDLE_NAME_RE = re.compile(r"(?P<algo>[a-z0-9][a-z0-9_]*)_(?P<fold>[0-9]+)")


def shard_name(stage: str, shard: tuple[int, int]) -> str:
    """The one name of a shard's marker, lock and log: ``<stage>.shard-<I>-of-<N>``."""
    i, n = shard
    return f"{stage}.shard-{i}-of-{n}"


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

    @property
    def jobs_file(self) -> Path:
        """``slurm/jobs.json``: the submitted jobs (``slurm.jobs``)."""
        return self.slurm_dir / "jobs.json"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def crop_records_dir(self) -> Path:
        """convert's per-crop records: ``markers/convert/<case>.json``."""
        return self.markers_dir / "convert"

    @property
    def analyze_tmp_dir(self) -> Path:
        """analyze's scratch folder (label views), removed after each run."""
        return self.root / ".analyze_tmp"

    @property
    def submission_dir(self) -> Path:
        """The default output folder of the challenge export (``submission.zarr``, ``.zip``)."""
        return self.root / "submission"

    @property
    def slurm_logs_dir(self) -> Path:
        """SLURM job output files ``<name>-<job id>.out``."""
        return self.logs_dir / "slurm"

    def sbatch_script(self, job_name: str) -> Path:
        """A generated sbatch script ``slurm/<job name>.sbatch``."""
        return self.slurm_dir / f"{job_name}.sbatch"

    def report(self, name: str) -> Path:
        """``reports/<name>`` (``convert.json``, ``analysis.md``, ``ensemble.png``, ...)."""
        return self.reports_dir / name

    @property
    def predictions_dir(self) -> Path:
        """Default parent of a submitted predict job's output folder."""
        return self.root / "predictions"

    @property
    def analyze_shards_root(self) -> Path:
        return self.root / ANALYZE_SHARDS_DIR

    def analyze_shards_dir(self, n: int) -> Path:
        """Per-shard results of an ``N``-way analyze sharding: ``analyze_shards/n<N>/``."""
        return self.analyze_shards_root / f"n{n}"

    def stage_log(self, name: str) -> Path:
        """``logs/<name>.log`` (``name``: a stage, a shard or ``train.<algo>``)."""
        return self.logs_dir / f"{name}.log"

    def bundle(self, algo: str, fold: int) -> Path:
        """MONAI bundle folder ``<algo>_<fold>`` (:meth:`bundle_at` for the :class:`Bundle`)."""
        return self.root / f"{algo}_{fold}"

    def bundle_at(self, algo: str, fold: int) -> Bundle:
        """The :class:`Bundle` ``<algo>_<fold>`` of this work dir (it need not exist)."""
        return Bundle(self, algo, fold)

    def bundles(self, algo: str | None = None) -> list[Bundle]:
        """Every generated-or-being-generated bundle (``<algo>_<fold>/configs/`` exists), sorted by name."""
        out = []
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                b = Bundle.from_dir(self, p)
                if b is not None and b.configs_dir.is_dir() and (algo is None or b.algo == algo):
                    out.append(b)
        return out

    def marker(self, name: str) -> Marker:
        """The done marker called ``name`` (``convert``, ``train.dints_0``, ...)."""
        return Marker(self.markers_dir / f"{name}.json", name)

    def markers(self) -> list[Marker]:
        """Every marker present, sorted by name."""
        if not self.markers_dir.is_dir():
            return []
        return [Marker(p, p.stem) for p in sorted(self.markers_dir.glob("*.json"))]


@dataclass(frozen=True)
class Bundle:
    """One MONAI bundle ``<work_dir>/<algo>_<fold>/``: its paths and what it is.

    The one answer to "what is a bundle": a folder named ``<algo>_<fold>`` (lower-case
    algorithm, fold number) in the work dir; :meth:`WorkDir.bundles` lists those bundlegen
    started (``configs/`` exists). It is *generated* when bundlegen finished it (MONAI's
    ``algo_object.json``, written last), *trained* when also its train marker is done.
    """

    wd: WorkDir
    algo: str
    fold: int

    @classmethod
    def from_dir(cls, wd: WorkDir, path: Path) -> Bundle | None:
        """The bundle a folder of ``wd`` is, or ``None`` when its name is not ``<algo>_<fold>``."""
        m = BUNDLE_NAME_RE.fullmatch(path.name)
        if m is None or path.parent != wd.root or not path.is_dir():
            return None
        return cls(wd, m["algo"], int(m["fold"]))

    @property
    def name(self) -> str:
        return f"{self.algo}_{self.fold}"

    @property
    def dir(self) -> Path:
        return self.wd.root / self.name

    @property
    def configs_dir(self) -> Path:
        return self.dir / CONFIGS_DIR

    @property
    def hyper_parameters(self) -> Path:
        """``configs/hyper_parameters.yaml``."""
        return self.configs_dir / HYPER_PARAMETERS

    @property
    def algo_object(self) -> Path:
        """MONAI's ``algo_object.json`` (what ``algo_from_json`` loads)."""
        return self.dir / ALGO_OBJECT

    @property
    def record_file(self) -> Path:
        """bundlegen's ``cellmap_bundle.json``."""
        return self.dir / BUNDLE_RECORD

    @property
    def default_model_dir(self) -> Path:
        """``model/`` inside the bundle (the ``ckpt_path`` bundlegen writes)."""
        return self.dir / MODEL_DIR

    @cached_property
    def model_dir(self) -> Path:
        """The checkpoint folder: ``ckpt_path`` of the hyper-parameters, else ``model/``."""
        import yaml

        try:
            hp = yaml.safe_load(self.hyper_parameters.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            hp = {}
        ckpt = hp.get("ckpt_path") if isinstance(hp, dict) else None
        return self.dir / str(ckpt) if ckpt else self.default_model_dir  # a relative ckpt_path is inside the bundle

    @property
    def progress_file(self) -> Path:
        """``<model>/progress.yaml``: written only after a clean finish of training."""
        return self.model_dir / PROGRESS_YAML

    @property
    def record(self) -> dict[str, Any]:
        """bundlegen's record (``{}`` for a bundle without one, or an unreadable one)."""
        try:
            data = read_json(self.record_file)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def kind(self) -> str:
        """``builtin`` or ``official`` templates (a bundle without a record is builtin)."""
        return str(self.record.get("templates", "builtin"))

    @property
    def generated(self) -> bool:
        """bundlegen finished it: MONAI's ``algo_object.json`` (written last) exists."""
        return self.algo_object.is_file()

    @property
    def train_marker(self) -> Marker:
        return self.wd.marker(f"train.{self.name}")

    @property
    def trained(self) -> bool:
        """Generated and its train marker says ``done``."""
        return self.generated and self.train_marker.status == MARKER_DONE


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
    for key, env in (
        ("image_version", "CELLMAP_A3DS_IMAGE_VERSION"),
        ("image_revision", "CELLMAP_A3DS_IMAGE_REVISION"),
    ):
        if os.environ.get(env):
            out[key] = os.environ[env]
    return out


def slurm_ids() -> dict[str, str]:
    """SLURM job identifiers of the current process, if it runs under SLURM."""
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT")
    return {k.lower(): os.environ[k] for k in keys if os.environ.get(k)}


def slurm_job_id(ids: Mapping[str, Any]) -> str | None:
    """The one name of a SLURM job from :func:`slurm_ids`: ``<array job>_<task>`` for an array task, else the job id.

    What ``scontrol show job`` accepts, so status and the lock name the same job.
    """
    array, task = ids.get("slurm_array_job_id"), ids.get("slurm_array_task_id")
    if array and task is not None and str(task) != "":
        return f"{array}_{task}"
    job = ids.get("slurm_job_id") or array
    return str(job) if job else None


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
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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
        self.finished = False  # done() or fail() was called since start() (common.cli.stage_marker)

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
        self.finished = False
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
        self.finished = True

    def done(self, **details: Any) -> None:
        """Record a clean finish; ``details`` (e.g. ``best_metric``) are merged in."""
        self._finish(MARKER_DONE, None, details)

    def fail(self, reason: str, **details: Any) -> None:
        """Record a failure with a one-line reason."""
        self._finish(MARKER_FAILED, reason.splitlines()[0] if reason else "failed", details)


# ---- a copied or moved work dir ------------------------------------------------------
# Auto3DSeg bundles hold absolute paths (bundle_root, ckpt_path, the datalist, the templates):
# a copied work dir would train into, and read from, the original one.
REBASE_FILES = (f"{CONFIGS_DIR}/*.yaml", f"{CONFIGS_DIR}/*.json", ALGO_OBJECT)


def bundle_dirs(wd: WorkDir) -> list[Path]:
    """Every bundle folder ``<algo>_<fold>/`` with ``configs/`` (:meth:`WorkDir.bundles`), sorted."""
    return [b.dir for b in wd.bundles()]


def recorded_work_dir(bundle: Path) -> Path | None:
    """The work dir a bundle was generated for: the parent of its ``bundle_root``."""
    import yaml

    hp = bundle / CONFIGS_DIR / HYPER_PARAMETERS
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
        f"would use the other one's paths); run: python -m stages.bundlegen --work-dir {wd.root} --rebase"
    )


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

    recorded = {recorded_work_dir(b) for b in bundle_dirs(wd)}
    olds = {o for o in recorded if o is not None and not _same_dir(o, wd.root)}
    changed: list[str] = []
    if not olds:
        return {"from": [], "to": str(wd.root), "files": changed}
    if len(olds) > 1:
        raise PipelineError(
            f"{wd.root}: bundles were made for several work dirs ({', '.join(map(str, sorted(olds)))}); "
            "regenerate them: python -m stages.bundlegen --force"
        )
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
