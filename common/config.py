"""The one pipeline configuration model.

Resolution order (later wins): built-in defaults, ``<work_dir>/pipeline.yaml``,
``--config FILE``, CLI flags. The result is validated (unknown keys and wrong
types are one-line :class:`~common.errors.ConfigError` s) and, when the work dir
has no ``pipeline.yaml`` yet, dumped there so every later stage (and every SLURM
job) sees the same settings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import algorithms
from common.classes import DEFAULT_CLASSES, check_class_names
from common.errors import ConfigError
from common.io import atomic_write_yaml

# the algorithm registry, live: an algorithm registered later (plugin, test) is valid too
ALGOS: Sequence[str] = algorithms.NAMES
STAGE_SECTIONS: tuple[str, ...] = ("convert", "analyze", "bundlegen", "train", "ensemble")
OFFICIAL_TEMPLATES_ENV = "CELLMAP_A3DS_OFFICIAL_TEMPLATES"
OFFICIAL_TEMPLATES_DEFAULT = "/opt/monai-algo-templates/21ed8e5"


@dataclass
class SplitConfig:
    """Train/validation split.

    Attributes:
        validation_fraction: share of crops drawn for validation (seeded, per crop).
        seed: RNG seed of the draw and of the k-fold assignment.
        datasplit_csv: a CellMap challenge ``datasplit.csv``; overrides the draw.
        test_crops: crop ids written to the datalist's ``testing`` list instead.
        test_fraction: share of crop groups (overlapping crops together) held out,
            seeded, as labelled ``testing`` items (never in a training/validation fold).
    """

    validation_fraction: float = 0.15
    seed: int = 0
    datasplit_csv: str | None = None
    test_crops: list[str] = field(default_factory=list)
    test_fraction: float = 0.0


# ---- per-stage sections ----------------------------------------------------------------
# Each section is a dataclass (the documented keys, their types and defaults) plus a dict
# holding only the keys the user set: the stages read ``cfg.analyze.get("hist_bins", 256)`` or
# ``cfg.convert["compress_level"]`` as before, ``dict(cfg.train)`` is exactly what the user
# wrote (the trainer's overrides), and the done-marker digests of existing work dirs stay
# the same. ``cfg.analyze.hist_bins`` (attribute) gives the value or the documented default.
@dataclass
class ConvertOptions:
    """``convert:`` section.

    Attributes:
        compress_level: gzip level of the NIfTI files, 0..9.
        report_png: write reports/convert.png.
        max_failed_fraction: share of eligible crops that may fail before the stage fails
            (exit 1, with a table of reasons).
        crop_manifest: the challenge's crop manifest CSV; crops come from it instead of
            listing ``data_root`` (plain HTTP roots cannot be listed). See docs/data.md.
        chunk_cache: local folder keeping remote chunks once fetched (remote roots only).
        remote_timeout_s: seconds one remote request may take.
        remote_retries: extra attempts after a transient remote error.
    """

    compress_level: int = 1
    report_png: bool = True
    max_failed_fraction: float = 0.02
    crop_manifest: str | None = None
    chunk_cache: str | None = None
    remote_timeout_s: float = 60.0
    remote_retries: int = 4


@dataclass
class AnalyzeOptions:
    """``analyze:`` section.

    Attributes:
        workers: parallel processes (the ``--workers`` flag wins).
        hist_bins: intensity histogram bins (>= 2).
        hist_range: ``[lo, hi]`` of the histogram (uint8 EM: ``[0, 256]``).
        clip_percentiles: ``[lo, hi]`` pooled foreground percentiles recommended for clipping.
        top_unknown: cases with the largest unknown fraction listed in the report.
    """

    workers: int = 1
    hist_bins: int = 256
    hist_range: list[float] = field(default_factory=lambda: [0, 256])
    clip_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    top_unknown: int = 10


@dataclass
class BundlegenOptions:
    """``bundlegen:`` section.

    Attributes:
        name: task name written into input.yaml.
        swinunetr_pretrained: pre-staged SwinUNETR weights file (else ``use_pretrain: false``).
        python: interpreter stored as ``CMD_PREFIX`` in ``algo_object.json`` (default: the running one).
    """

    name: str = "cellmap"
    swinunetr_pretrained: str | None = None
    python: str | None = None


@dataclass
class EnsembleOptions:
    """``ensemble:`` section (the command-line flags win).

    Attributes:
        method: ``best_n`` or ``best_by_fold``.
        n_best: members for ``best_n``.
        mode: ``mean`` of probabilities then argmax, or majority ``vote``.
        on: ``heldout`` (labelled ``testing`` items, else the validation folds, said so in the
            report), ``validation``, ``testing`` or comma-separated image paths.
        prob_dtype: stored member probabilities, ``float16`` or ``uint8``.
        members: bundle names to choose from (list or comma-separated); empty = all trained.
        infer_params: keyword arguments of the bundles' ``get_inferer``.
        export_block: training voxels per block edge of the block-wise export/predict (>= 8).
        export_halo: training voxels of context around each block (>= 0).
        min_instance_voxels: smallest instance kept by the export, in training voxels.
    """

    method: str = "best_n"
    n_best: int = 3
    mode: str = "mean"
    on: str = "heldout"
    prob_dtype: str = "float16"
    members: list[str] | str | None = None
    infer_params: dict[str, Any] | None = None
    export_block: int = 96
    export_halo: int = 16
    min_instance_voxels: float = 8.0


@dataclass
class TrainOptions:
    """``train:`` section: hyper-parameter overrides of every bundle.

    The keys are the bundle's ``configs/hyper_parameters.yaml`` keys; they are checked
    against that file at train time (:func:`check_train_overrides`), so a new trainer key
    works without a change here. The common ones are type-checked when the config is read.

    Attributes:
        num_epochs: epochs.
        num_steps_per_epoch: fixed steps per epoch (null: one pass).
        batch_size: images per step.
        learning_rate: AdamW learning rate.
        roi_size: training patch ``[x, y, z]``.
        val_every: validate every N epochs.
        early_stop_patience: validations without improvement before stopping (0 = never).
        num_workers: data loader workers.
        amp: mixed precision (CUDA only).
        seed: RNG seed.
    """

    num_epochs: int | None = None
    num_steps_per_epoch: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    roi_size: list[int] | None = None
    val_every: int | None = None
    early_stop_patience: int | None = None
    num_workers: int | None = None
    amp: bool | None = None
    seed: int | None = None


class Section(dict):  # type: ignore[type-arg]
    """The keys a user set in one stage section (a plain ``dict`` for the stages' reads)."""

    options: type = object
    open_keys = False  # train: unknown keys are checked later, against the bundle

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self:
            return self[name]
        for f in dataclasses.fields(self.options):
            if f.name == name:
                return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        raise AttributeError(f"{type(self).__name__} has no key {name!r}")


class ConvertSection(Section):
    options = ConvertOptions


class AnalyzeSection(Section):
    options = AnalyzeOptions


class BundlegenSection(Section):
    options = BundlegenOptions


class TrainSection(Section):
    options = TrainOptions
    open_keys = True


class EnsembleSection(Section):
    options = EnsembleOptions


SECTION_TYPES: dict[str, type[Section]] = {
    "convert": ConvertSection, "analyze": AnalyzeSection, "bundlegen": BundlegenSection,
    "train": TrainSection, "ensemble": EnsembleSection,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "ensemble.method": ("best_n", "best_by_fold"), "ensemble.mode": ("mean", "vote"),
    "ensemble.prob_dtype": ("float16", "uint8"),
}
_RANGES: dict[str, tuple[float, float]] = {
    "convert.compress_level": (0, 9), "convert.max_failed_fraction": (0, 1),
    "convert.remote_timeout_s": (1, 3600), "convert.remote_retries": (0, 100),
    "ensemble.export_block": (8, 1 << 16), "ensemble.export_halo": (0, 1 << 16),
    "ensemble.min_instance_voxels": (0, 1 << 40), "analyze.workers": (1, 4096), "analyze.hist_bins": (2, 1 << 24),
    "analyze.top_unknown": (0, 1 << 20), "ensemble.n_best": (1, 1 << 10), "train.num_epochs": (1, 1 << 24),
    "train.batch_size": (1, 1 << 16), "train.val_every": (1, 1 << 24), "train.num_workers": (0, 1024),
}


@dataclass
class PipelineConfig:
    """Everything a stage needs to know; see the README's configuration reference."""

    data_root: str | None = None
    resolution_nm: list[float] = field(default_factory=lambda: [8.0])
    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    unknown_label: int = 255
    datasets: list[str] | None = None
    crops: list[str] | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    modality: str = "EM"
    algos: list[str] = field(default_factory=lambda: list(ALGOS))
    num_folds: int = 1
    templates: str = "builtin"
    official_templates_dir: str | None = None
    target_gpu_mem_gb: float = 48.0
    convert: ConvertSection = field(default_factory=ConvertSection)
    analyze: AnalyzeSection = field(default_factory=AnalyzeSection)
    bundlegen: BundlegenSection = field(default_factory=BundlegenSection)
    train: TrainSection = field(default_factory=TrainSection)
    ensemble: EnsembleSection = field(default_factory=EnsembleSection)

    # ---- derived values -------------------------------------------------------------
    @property
    def output_classes(self) -> int:
        """Network output channels: background plus every configured class."""
        return len(self.classes) + 1

    @property
    def resolution_zyx(self) -> tuple[float | None, float, float]:
        """Target voxel size (z, y, x) in nm; z is ``None`` when only y/x was given."""
        r = self.resolution_nm
        return (None, r[0], r[0]) if len(r) == 1 else (r[0], r[1], r[2])

    def official_templates_path(self) -> Path:
        """Where the baked-in official MONAI templates live (config, env, default)."""
        return Path(
            self.official_templates_dir
            or os.environ.get(OFFICIAL_TEMPLATES_ENV)
            or OFFICIAL_TEMPLATES_DEFAULT
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``pipeline.yaml`` holds)."""
        out = dataclasses.asdict(self)
        for key in STAGE_SECTIONS:
            out[key] = dict(out[key])  # plain dicts: yaml.safe_dump refuses dict subclasses
        return out


# ---- validation ---------------------------------------------------------------------
def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _check_type(key: str, value: Any, kinds: tuple[type, ...], src: str) -> None:
    # bool is an int subclass; never accept it for a number
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{src}: '{key}' must be {' or '.join(map(_type_name, kinds))}, got {value!r}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{src}: '{key}' must be {' or '.join(map(_type_name, kinds))}, got {value!r}")


def _str_list(key: str, value: Any, src: str) -> list[str]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    _check_type(key, value, (list,), src)
    out = []
    for v in value:
        _check_type(f"{key}[]", v, (str, int), src)
        out.append(str(v))
    return out


def _crop_id(v: str) -> str:
    """``crop12``, ``12`` -> ``12`` (crop ids are global integers)."""
    s = str(v)
    return s[4:] if s.startswith("crop") else s


def _apply(cfg: PipelineConfig, data: dict[str, Any], src: str) -> None:
    """Validate ``data`` and set it on ``cfg`` (one-line errors naming ``src``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{src}: the top level must be a mapping of keys, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{src}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        if key == "data_root" or key == "official_templates_dir":
            if value is not None:
                _check_type(key, value, (str,), src)
            setattr(cfg, key, value)
        elif key == "resolution_nm":
            vals = value if isinstance(value, list) else [value]
            if len(vals) not in (1, 3):
                raise ConfigError(f"{src}: 'resolution_nm' must be one number or [z, y, x], got {value!r}")
            for v in vals:
                _check_type(key, v, (int, float), src)
                if v <= 0:
                    raise ConfigError(f"{src}: 'resolution_nm' must be positive, got {value!r}")
            if len(vals) == 3 and vals[1] != vals[2]:
                raise ConfigError(f"{src}: 'resolution_nm' y and x must be equal, got {value!r}")
            cfg.resolution_nm = [float(v) for v in vals]
        elif key == "classes":
            names = _str_list(key, value, src)
            if not names:
                raise ConfigError(f"{src}: 'classes' must name at least one class")
            try:
                check_class_names(names)
            except ValueError as exc:
                raise ConfigError(f"{src}: 'classes': {exc}") from None
            cfg.classes = names
        elif key in ("datasets", "crops"):
            if value is None:
                setattr(cfg, key, None)
            else:
                vals = _str_list(key, value, src)
                setattr(cfg, key, [_crop_id(v) for v in vals] if key == "crops" else vals)
        elif key == "split":
            _apply_split(cfg.split, value, src)
        elif key in ("unknown_label", "num_folds"):
            _check_type(key, value, (int,), src)
            setattr(cfg, key, value)
        elif key == "target_gpu_mem_gb":
            _check_type(key, value, (int, float), src)
            if value <= 0:
                raise ConfigError(f"{src}: 'target_gpu_mem_gb' must be positive, got {value!r}")
            cfg.target_gpu_mem_gb = float(value)
        elif key in ("modality", "templates"):
            _check_type(key, value, (str,), src)
            setattr(cfg, key, value)
        elif key == "algos":
            names = _str_list(key, value, src)
            bad = [a for a in names if a not in ALGOS]
            if bad or not names:
                raise ConfigError(f"{src}: 'algos' has unknown algorithm {bad or names} (known: {', '.join(ALGOS)})")
            cfg.algos = names
        elif key in STAGE_SECTIONS:
            if value is None:
                value = {}
            _check_type(key, value, (dict,), src)
            merged = SECTION_TYPES[key](getattr(cfg, key))
            merged.update(_check_section(key, value, src))
            setattr(cfg, key, merged)


def _matches(value: Any, hint: Any) -> bool:
    """Does ``value`` (from YAML) fit the type annotation ``hint`` (a string: postponed)?"""
    text = str(hint)
    if value is None:
        return "None" in text
    if isinstance(value, bool):
        return "bool" in text
    if isinstance(value, int):
        return "int" in text or "float" in text
    if isinstance(value, float):
        return "float" in text
    if isinstance(value, str):
        return "str" in text
    if isinstance(value, list):
        if "list" not in text:
            return False
        inner = "float" if "list[float]" in text else "int" if "list[int]" in text else "str" if "list[str]" in text else ""
        return not inner or all(_matches(v, inner) for v in value)
    if isinstance(value, dict):
        return "dict" in text
    return False


def _check_section(section: str, value: dict[str, Any], src: str) -> dict[str, Any]:
    """Keys and types of one stage section (one-line errors listing the known keys)."""
    opts = SECTION_TYPES[section].options
    fields = {f.name: f for f in dataclasses.fields(opts)}
    out = {}
    for k, v in value.items():
        key = f"{section}.{k}"
        if not isinstance(k, str):
            raise ConfigError(f"{src}: '{section}' keys must be names, got {k!r}")
        f = fields.get(k)
        if f is None:
            if SECTION_TYPES[section].open_keys:
                _check_plain(key, v, src)
                out[k] = v
                continue
            raise ConfigError(f"{src}: unknown key '{key}' (known: {', '.join(sorted(fields))})")
        if not _matches(v, f.type):
            want = str(f.type).replace(" | None", "").replace("list[", "a list of ").replace("]", "")
            raise ConfigError(f"{src}: '{key}' must be {want}, got {v!r}")
        if key in _CHOICES and v not in _CHOICES[key]:
            raise ConfigError(f"{src}: '{key}' must be one of {', '.join(_CHOICES[key])}, got {v!r}")
        lo_hi = _RANGES.get(key)
        if lo_hi and v is not None and not lo_hi[0] <= v <= lo_hi[1]:
            raise ConfigError(f"{src}: '{key}' must be in {lo_hi[0]}..{lo_hi[1]}, got {v!r}")
        if key in ("analyze.hist_range", "analyze.clip_percentiles") and (len(v) != 2 or not v[0] < v[1]):
            raise ConfigError(f"{src}: '{key}' must be [lo, hi] with lo < hi, got {v!r}")
        out[k] = v
    return out


def _check_plain(key: str, v: Any, src: str) -> None:
    """A value the trainer can take: YAML scalars, lists and mappings of them."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, list):
        for x in v:
            _check_plain(key, x, src)
        return
    if isinstance(v, dict):
        for x in v.values():
            _check_plain(key, x, src)
        return
    raise ConfigError(f"{src}: '{key}' has a value of type {type(v).__name__} ({v!r}); use numbers, strings, lists")


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "mapping"
    return type(v).__name__


def check_train_overrides(train: dict[str, Any], hyper_parameters: dict[str, Any], src: str) -> None:
    """The ``train:`` keys against one bundle's hyper-parameters (at train time).

    An unknown key (``num_epoch``) or a value of another kind than the bundle's
    (``num_epochs: two``) is a one-line :class:`ConfigError` listing the known keys. A bundle
    value of ``null`` accepts anything; ``a#b`` keys (official templates) check ``a``.

    Raises:
        ConfigError: the first problem found.
    """
    for k, v in train.items():
        top = str(k).split("#", 1)[0]
        if top not in hyper_parameters:
            known = ", ".join(sorted(str(x) for x in hyper_parameters))
            raise ConfigError(f"{src}: unknown key 'train.{k}' for this bundle (known: {known})")
        if "#" in str(k):
            continue
        have = hyper_parameters[top]
        if have is None or v is None:
            continue
        if _kind(v) != _kind(have) and not (_kind(have) == "number" and _kind(v) == "number"):
            raise ConfigError(f"{src}: 'train.{k}' must be a {_kind(have)} like the bundle's {have!r}, got {v!r}")


def bundle_hyper_parameters(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Every top-level key of a bundle's ``configs/*.yaml`` (builtin: hyper_parameters.yaml;
    official templates spread theirs over several files)."""
    out: dict[str, Any] = {}
    for f in sorted(Path(bundle, "configs").glob("*.yaml")):
        try:
            data = safe_load_limited(f.read_text(encoding="utf-8"), str(f))
        except (OSError, UnicodeDecodeError):
            continue
        if isinstance(data, dict):
            out.update(data)
    return out


def _apply_split(split: SplitConfig, value: Any, src: str) -> None:
    _check_type("split", value, (dict,), src)
    known = {f.name for f in dataclasses.fields(SplitConfig)}
    for k, v in value.items():
        if k not in known:
            raise ConfigError(f"{src}: unknown key 'split.{k}' (known: {', '.join(sorted(known))})")
        if k == "validation_fraction":
            _check_type("split.validation_fraction", v, (int, float), src)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{src}: 'split.validation_fraction' must be in [0, 1), got {v!r}")
            split.validation_fraction = float(v)
        elif k == "seed":
            _check_type("split.seed", v, (int,), src)
            split.seed = v
        elif k == "datasplit_csv":
            if v is not None:
                _check_type("split.datasplit_csv", v, (str,), src)
            split.datasplit_csv = v
        elif k == "test_fraction":
            _check_type("split.test_fraction", v, (int, float), src)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{src}: 'split.test_fraction' must be in [0, 1), got {v!r}")
            split.test_fraction = float(v)
        elif k == "test_crops":
            split.test_crops = [_crop_id(c) for c in _str_list("split.test_crops", v, src)]


def _check_consistency(cfg: PipelineConfig, src: str) -> None:
    n = len(cfg.classes)
    if cfg.unknown_label != 0 and not (n < cfg.unknown_label <= 255):
        raise ConfigError(
            f"{src}: 'unknown_label' must be 0 (unknown becomes background) or in {n + 1}..255 "
            f"(above the {n} class ids), got {cfg.unknown_label}"
        )
    if cfg.num_folds < 1:
        raise ConfigError(f"{src}: 'num_folds' must be >= 1, got {cfg.num_folds}")
    if cfg.split.datasplit_csv and cfg.num_folds != 1:
        raise ConfigError(f"{src}: 'split.datasplit_csv' fixes one train/validate split; set num_folds: 1")
    if cfg.modality.lower() not in ("em", "ct", "mri"):
        raise ConfigError(f"{src}: 'modality' must be EM, CT or MRI, got {cfg.modality!r}")


MAX_CONFIG_BYTES = 1 << 20  # a pipeline config is a few hundred bytes; 1 MiB is not a config
MAX_YAML_NODES = 100_000  # nodes after alias expansion: an alias bomb expands to billions


class _LimitedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand beyond a node budget."""


def _expanded_size(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once (safe_load builds a cycle, not an expansion)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            total += _expanded_size(child, memo, limit)
            if total > limit:
                break
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, memo, limit) + _expanded_size(v, memo, limit)
            if total > limit:
                break
    memo[key] = total
    return total


def safe_load_limited(text: str, what: str) -> Any:
    """``yaml.safe_load`` with a size and alias-expansion limit.

    Raises:
        ConfigError: too big, an alias bomb, or invalid YAML (one line naming ``what``).
    """
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what}: {len(text)} characters is too large for a config (limit {MAX_CONFIG_BYTES})")
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, MAX_YAML_NODES)
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{what}: YAML anchors/aliases expand to more than {MAX_YAML_NODES} values; "
                              "write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()


def _read_file(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes is too large for a config (limit {MAX_CONFIG_BYTES})")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                          "save the file as UTF-8") from None
    data = safe_load_limited(text, str(path))
    return {} if data is None else data


def load_config(
    work_dir: str | os.PathLike[str],
    config_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    dump: bool = True,
) -> PipelineConfig:
    """Build the validated configuration of one stage run.

    Args:
        work_dir: the pipeline work dir; its ``pipeline.yaml`` is read when present.
        config_file: an extra YAML file applied on top (``--config``).
        overrides: CLI flags as config keys; ``None`` values are ignored.
        dump: write the result to ``<work_dir>/pipeline.yaml`` if that file is missing.

    Raises:
        ConfigError: one line naming the file (or ``command line``) and the problem.
    """
    cfg = PipelineConfig()
    wd_file = Path(work_dir) / "pipeline.yaml"
    if wd_file.is_file():
        _apply(cfg, _read_file(wd_file), str(wd_file))
    if config_file is not None:
        cf = Path(config_file)
        if not cf.is_file():
            raise ConfigError(f"{cf}: config file not found")
        _apply(cfg, _read_file(cf), str(cf))
    if overrides:
        _apply(cfg, {k: v for k, v in overrides.items() if v is not None}, "command line")
    src = str(config_file or wd_file)
    _check_consistency(cfg, src)
    if cfg.data_root is not None and not cfg.data_root.startswith(("s3://", "http://", "https://")):
        cfg.data_root = str(Path(cfg.data_root).expanduser().resolve())  # a URL stays a URL (docs/data.md)
    if dump and not wd_file.exists():
        try:
            atomic_write_yaml(wd_file, cfg.to_dict())
        except OSError as exc:
            raise ConfigError(f"{wd_file}: cannot write ({exc.strerror})") from None
    return cfg
