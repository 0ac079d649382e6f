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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.classes import DEFAULT_CLASSES, check_class_names
from common.errors import ConfigError
from common.io import atomic_write_yaml

ALGOS: tuple[str, ...] = ("segresnet", "swinunetr", "dints")
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
    convert: dict[str, Any] = field(default_factory=dict)
    analyze: dict[str, Any] = field(default_factory=dict)
    bundlegen: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    ensemble: dict[str, Any] = field(default_factory=dict)

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
        return dataclasses.asdict(self)


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
            merged = dict(getattr(cfg, key))
            merged.update(value)
            setattr(cfg, key, merged)


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


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
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
    if cfg.data_root is not None:
        cfg.data_root = str(Path(cfg.data_root).expanduser().resolve())
    if dump and not wd_file.exists():
        try:
            atomic_write_yaml(wd_file, cfg.to_dict())
        except OSError as exc:
            raise ConfigError(f"{wd_file}: cannot write ({exc.strerror})") from None
    return cfg
