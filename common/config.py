"""The one pipeline configuration model.

Resolution order (later wins): built-in defaults, ``<work_dir>/pipeline.yaml``,
``--config FILE``, CLI flags. The result is validated (unknown keys and wrong
types are one-line :class:`~common.errors.ConfigError` s) and, when the work dir
has no ``pipeline.yaml`` yet, dumped there so every later stage (and every SLURM
job) sees the same settings.

Every key is declared once, in the section dataclasses below (type, default, meaning, rules);
``python -m common.config --reference`` writes docs/configuration.md from them and
``python -m common.config --example`` prints a complete commented ``pipeline.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import os
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from common import algorithms, pipeline
from common.classes import DEFAULT_CLASSES, check_class_names
from common.errors import ConfigError
from common.io import atomic_write_yaml

# the algorithm registry, live: an algorithm registered later (plugin, test) is valid too
ALGOS: Sequence[str] = algorithms.NAMES
STAGE_SECTIONS: tuple[str, ...] = pipeline.chain_names()  # one section per stage of the chain
OFFICIAL_TEMPLATES_ENV = "CELLMAP_A3DS_OFFICIAL_TEMPLATES"
OFFICIAL_TEMPLATES_DEFAULT = "/opt/monai-algo-templates/21ed8e5"


# ---- how a key is declared ----------------------------------------------------------------
# Every key of every section is declared once, with ``setting(default, doc, ...)``: its default,
# its meaning (the configuration reference, docs/configuration.md, is generated from these), and
# its value rules. The loader, the dump, the reference and the example all read these fields.
Check = Callable[[str, Any, str], Any]  # (dotted key, value, source) -> the value to keep


def setting(
    default: Any,
    doc: str = "",
    *,
    choices: tuple[str, ...] = (),
    bounds: tuple[float, float] | None = None,
    check: Check | None = None,
    loose: bool = False,
) -> Any:
    """One documented config key (a dataclass field).

    Args:
        default: the default value, a section class (its own defaults), or a function giving
            the default (read when a config is built: ``algos`` follows the registry).
        doc: one sentence: what the key means (the reference's "meaning" column); a section's
            is the first line of its class docstring.
        choices: the allowed values of a string key.
        bounds: ``(lo, hi)``, inclusive, of a number key.
        check: a further rule, run after the type check; returns the value to keep.
        loose: ``check`` accepts more forms than the annotation (``resolution_nm: 8`` for
            ``[8]``) and does the type check itself.
    """
    meta = {"doc": doc, "choices": choices, "bounds": bounds, "check": check, "loose": loose}
    if isinstance(default, type):
        meta["doc"] = doc or (default.__doc__ or "").strip().splitlines()[0]
        return field(default_factory=default, metadata=meta)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Section:
    """Base of the config sections: documented, typed keys, plus the keys the user set.

    Stages read the typed attributes (``cfg.analyze.hist_bins``: the value set, else the
    default). :meth:`given` is the section as the user wrote it: what ``pipeline.yaml`` holds
    for a stage section and what the done markers digest, so the markers of existing work dirs
    still match and a rerun with the same settings stays a no-op.
    """

    DUMP_DEFAULTS: ClassVar[bool] = False  # pipeline.yaml holds every key, not only those given
    OPEN_KEYS: ClassVar[bool] = False  # train: other keys are checked later, against the bundle
    _given: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def given(self) -> dict[str, Any]:
        """The keys set in a config file or on the command line, as written."""
        return copy.deepcopy(self._given)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as ``pipeline.yaml`` holds it."""
        if not self.DUMP_DEFAULTS:
            return self.given()
        out: dict[str, Any] = {}
        for f in settings_of(type(self)):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Section) else copy.deepcopy(v)
        return out


def settings_of(cls: type) -> list[dataclasses.Field[Any]]:
    """The documented keys of a section class, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a section class (``from __future__ import annotations``)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ---- rules that need more than a type -------------------------------------------------
def _type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def _check_type(key: str, value: Any, kinds: tuple[type, ...], src: str) -> None:
    # bool is an int subclass; never accept it for a number
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
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


def _resolution(key: str, value: Any, src: str) -> list[float]:
    vals = value if isinstance(value, list) else [value]
    if len(vals) not in (1, 3):
        raise ConfigError(f"{src}: '{key}' must be one number or [z, y, x], got {value!r}")
    for v in vals:
        _check_type(key, v, (int, float), src)
        if v <= 0:
            raise ConfigError(f"{src}: '{key}' must be positive, got {value!r}")
    if len(vals) == 3 and vals[1] != vals[2]:
        raise ConfigError(f"{src}: '{key}' y and x must be equal, got {value!r}")
    return [float(v) for v in vals]


def _classes(key: str, value: Any, src: str) -> list[str]:
    names = _str_list(key, value, src)
    if not names:
        raise ConfigError(f"{src}: '{key}' must name at least one class")
    try:
        check_class_names(names)
    except ValueError as exc:
        raise ConfigError(f"{src}: '{key}': {exc}") from None
    return names


def _names(key: str, value: Any, src: str) -> list[str] | None:
    return None if value is None else _str_list(key, value, src)


def _crop_list(key: str, value: Any, src: str) -> list[str]:
    return [_crop_id(v) for v in _str_list(key, value, src)]


def _crop_ids(key: str, value: Any, src: str) -> list[str] | None:
    return None if value is None else _crop_list(key, value, src)


def _algos(key: str, value: Any, src: str) -> list[str]:
    names = _str_list(key, value, src)
    bad = [a for a in names if a not in ALGOS]
    if bad or not names:
        raise ConfigError(f"{src}: '{key}' has unknown algorithm {bad or names} (known: {', '.join(ALGOS)})")
    return names


def _positive(key: str, value: Any, src: str) -> float:
    if value <= 0:
        raise ConfigError(f"{src}: '{key}' must be positive, got {value!r}")
    return float(value)


def _fraction(key: str, value: Any, src: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{src}: '{key}' must be in [0, 1), got {value!r}")
    return float(value)


def _lo_hi(key: str, value: Any, src: str) -> Any:
    if len(value) != 2 or not value[0] < value[1]:
        raise ConfigError(f"{src}: '{key}' must be [lo, hi] with lo < hi, got {value!r}")
    return value


# ---- the sections ----------------------------------------------------------------------
@dataclass
class SplitConfig(Section):
    """``split:`` the train/validation/test split of the crops (written by convert)."""

    DUMP_DEFAULTS = True

    validation_fraction: float = setting(
        0.15, "Share of crops drawn for validation (seeded, per crop).", check=_fraction
    )
    seed: int = setting(0, "RNG seed of the validation draw, the test hold-out and the k-fold assignment.")
    datasplit_csv: str | None = setting(
        None, "A CellMap challenge `datasplit.csv`; fixes the split instead of the draw (needs `num_folds: 1`)."
    )
    test_crops: list[str] = setting(
        [], "Crop ids written to the datalist's `testing` list instead of a fold.", check=_crop_list, loose=True
    )
    test_fraction: float = setting(
        0.0,
        "Share of crop groups (overlapping crops together) held out, seeded, as "
        "labelled `testing` items (never in a training/validation fold).",
        check=_fraction,
    )


@dataclass
class ConvertOptions(Section):
    """``convert:`` turning the CellMap zarr crops into NIfTI cases."""

    compress_level: int = setting(1, "gzip level of the NIfTI files.", bounds=(0, 9))
    report_png: bool = setting(True, "Write `reports/convert.png`.")
    max_failed_fraction: float = setting(
        0.02,
        "Share of eligible crops that may fail before the stage fails (exit 1, with a table of reasons).",
        bounds=(0, 1),
    )
    crop_manifest: str | None = setting(
        None,
        "The challenge's crop manifest CSV; crops come from it instead of "
        "listing `data_root` (plain HTTP roots cannot be listed; see "
        "docs/data.md). `--crop-manifest` wins.",
    )
    chunk_cache: str | None = setting(
        None, "Local folder keeping remote chunks once fetched (remote roots only). `--chunk-cache` wins."
    )
    remote_timeout_s: float = setting(60.0, "Seconds one remote request may take.", bounds=(1, 3600))
    remote_retries: int = setting(4, "Extra attempts after a transient remote error.", bounds=(0, 100))


@dataclass
class AnalyzeOptions(Section):
    """``analyze:`` the data statistics (`datastats.yaml`) and the analysis report."""

    workers: int = setting(1, "Parallel processes (`--workers` wins).", bounds=(1, 4096))
    hist_bins: int = setting(256, "Intensity histogram bins.", bounds=(2, 1 << 24))
    hist_range: list[float] = setting(
        [0, 256], "`[lo, hi]` of the intensity histogram (uint8 EM: `[0, 256]`).", check=_lo_hi
    )
    clip_percentiles: list[float] = setting(
        [0.5, 99.5], "`[lo, hi]` pooled foreground percentiles recommended for intensity clipping.", check=_lo_hi
    )
    top_unknown: int = setting(10, "Cases with the largest unknown fraction listed in the report.", bounds=(0, 1 << 20))


@dataclass
class BundlegenOptions(Section):
    """``bundlegen:`` generating one MONAI bundle per algorithm and fold."""

    name: str = setting("cellmap", "Task name written into `input.yaml`.")
    swinunetr_pretrained: str | None = setting(None, "Pre-staged SwinUNETR weights file (else `use_pretrain: false`).")
    python: str | None = setting(
        None, "Interpreter stored as `CMD_PREFIX` in `algo_object.json` (null: the interpreter running bundlegen)."
    )


@dataclass
class TrainOptions(Section):
    """``train:`` hyper-parameter overrides of every bundle.

    Any key of the bundle's ``configs/hyper_parameters.yaml`` may be set here: the keys are
    checked against that file when the bundle trains (:func:`check_train_overrides`, the one
    rule), so a new trainer key works without a change here. The keys below are the common
    ones, type-checked when the config is read; null means the bundle's own value.
    """

    OPEN_KEYS = True

    num_epochs: int | None = setting(None, "Training epochs.", bounds=(1, 1 << 24))
    num_steps_per_epoch: int | None = setting(None, "Fixed steps per epoch (null: one pass over the data).")
    batch_size: int | None = setting(None, "Images per step.", bounds=(1, 1 << 16))
    learning_rate: float | None = setting(None, "AdamW learning rate.")
    roi_size: list[int] | None = setting(None, "Training patch `[x, y, z]` in voxels.")
    val_every: int | None = setting(None, "Validate every N epochs.", bounds=(1, 1 << 24))
    early_stop_patience: int | None = setting(None, "Validations without improvement before stopping (0: never).")
    num_workers: int | None = setting(None, "Data loader workers.", bounds=(0, 1024))
    amp: bool | None = setting(None, "Mixed precision (CUDA only).")
    seed: int | None = setting(None, "RNG seed of the training run.")


@dataclass
class EnsembleOptions(Section):
    """``ensemble:`` the ensemble of the trained bundles and the block-wise export/predict (flags win)."""

    method: str = setting(
        "best_n",
        "How members are chosen: the `best_n` bundles, or the best of each fold (`best_by_fold`).",
        choices=("best_n", "best_by_fold"),
    )
    n_best: int = setting(3, "Members for `best_n`.", bounds=(1, 1 << 10))
    mode: str = setting(
        "mean", "`mean` of the probabilities then argmax, or majority `vote`.", choices=("mean", "vote")
    )
    on: str = setting(
        "heldout",
        "Cases to predict: `heldout` (the labelled `testing` items, else the validation "
        "folds, said so in the report), `validation`, `testing`, or comma-separated image "
        "paths.",
    )
    prob_dtype: str = setting("float16", "Stored member probabilities.", choices=("float16", "uint8"))
    members: list[str] | str | None = setting(
        None, "Bundle names to choose from (a list or comma-separated); null: every trained bundle."
    )
    infer_params: dict[str, Any] | None = setting(None, "Keyword arguments of the bundles' `get_inferer`.")
    export_block: int = setting(
        96, "Training voxels per block edge of the block-wise export/predict.", bounds=(8, 1 << 16)
    )
    export_halo: int = setting(16, "Training voxels of context around each block.", bounds=(0, 1 << 16))
    min_instance_voxels: float = setting(
        8.0, "Smallest instance kept by the export, in training voxels.", bounds=(0, 1 << 40)
    )


@dataclass
class PipelineConfig(Section):
    """The top level of ``pipeline.yaml``: the data, the classes, the algorithms."""

    DUMP_DEFAULTS = True

    data_root: str | None = setting(
        None,
        "The CellMap data: a local folder or an `s3://`, `http(s)://` URL "
        "(`--data-root` wins; a local path is made absolute).",
    )
    resolution_nm: list[float] = setting(
        [8.0],
        "Target voxel size in nm: one number (y = x, z native) or `[z, y, x]` with y = x.",
        check=_resolution,
        loose=True,
    )
    classes: list[str] = setting(
        list(DEFAULT_CLASSES),
        "CellMap classes to segment, in label order (1, 2, ...); non-overlapping.",
        check=_classes,
        loose=True,
    )
    unknown_label: int = setting(
        255,
        "Label of voxels no annotation covers: 0 (unknown becomes background) or "
        "above the class ids (ignored in loss and metrics).",
    )
    datasets: list[str] | None = setting(
        None, "Datasets to convert (null: all under `data_root`).", check=_names, loose=True
    )
    crops: list[str] | None = setting(
        None, "Crop ids to convert (`crop12` or `12`; null: all).", check=_crop_ids, loose=True
    )
    split: SplitConfig = setting(SplitConfig)
    modality: str = setting("EM", "Image modality written into `input.yaml`: EM, CT or MRI.")
    algos: list[str] = setting(lambda: list(ALGOS), "Algorithms to generate and train.", check=_algos, loose=True)
    num_folds: int = setting(1, "Cross-validation folds (one bundle per algorithm and fold).")
    templates: str = setting(
        "builtin",
        "Bundle templates: `builtin`, `official` (MONAI's research-contributions "
        "templates, needs `unknown_label: 0`) or a folder.",
    )
    official_templates_dir: str | None = setting(
        None,
        f"Where the official templates are (null: `${OFFICIAL_TEMPLATES_ENV}`, else `{OFFICIAL_TEMPLATES_DEFAULT}`).",
    )
    target_gpu_mem_gb: float = setting(
        48.0, "GPU memory the bundles are sized for (patch and batch size).", check=_positive
    )
    convert: ConvertOptions = setting(ConvertOptions)
    analyze: AnalyzeOptions = setting(AnalyzeOptions)
    bundlegen: BundlegenOptions = setting(BundlegenOptions)
    train: TrainOptions = setting(TrainOptions)
    ensemble: EnsembleOptions = setting(EnsembleOptions)

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
        return Path(self.official_templates_dir or os.environ.get(OFFICIAL_TEMPLATES_ENV) or OFFICIAL_TEMPLATES_DEFAULT)


# ---- validation ---------------------------------------------------------------------
def _conforms(value: Any, tp: Any) -> bool:
    """Does ``value`` (from YAML) fit the type annotation ``tp``? An int fits a float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is int:
        return isinstance(value, int)
    if tp is float:
        return isinstance(value, (int, float))
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    return False


def type_text(tp: Any, null: bool = True) -> str:
    """``list[int] | None`` -> ``list of int or null`` (``null=False``: without ``or null``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if null or a is not type(None)]
        return " or ".join(parts)
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return "dict"
    if isinstance(tp, type) and issubclass(tp, Section):
        return "section"
    return _type_name(tp)


def _unknown_key(src: str, key: str, known: list[str], prefix: str, suffix: str = "") -> ConfigError:
    """One line naming the key, the closest known key and every known key."""
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
    return ConfigError(f"{src}: unknown key '{key}'{suffix} ({hint}known: {', '.join(sorted(known))})")


def _apply(sec: Section, data: Any, src: str, name: str = "") -> None:
    """Validate the mapping ``data`` and set it on ``sec`` (one-line errors naming ``src``).

    Args:
        sec: the section to update (the top level, or one nested section).
        data: the mapping from YAML or the command line.
        src: the file (or ``command line``) the mapping came from.
        name: the section's dotted name; empty for the top level.
    """
    if not isinstance(data, dict):
        if not name:
            raise ConfigError(f"{src}: the top level must be a mapping of keys, got {type(data).__name__}")
        raise ConfigError(f"{src}: '{name}' must be dict, got {data!r}")
    fields = {f.name: f for f in settings_of(type(sec))}
    prefix = f"{name}." if name else ""
    for k, v in data.items():
        if not isinstance(k, str):
            raise ConfigError(f"{src}: '{name or 'top level'}' keys must be names, got {k!r}")
        key = prefix + k
        f = fields.get(k)
        if f is None:
            if not sec.OPEN_KEYS:
                raise _unknown_key(src, key, list(fields), prefix)
            _check_plain(key, v, src)
            sec._given[k] = v
            continue
        tp = _hints(type(sec))[k]
        if isinstance(tp, type) and issubclass(tp, Section):
            _apply(getattr(sec, k), {} if v is None else v, src, key)
            continue
        setattr(sec, k, _value(f, tp, key, v, src))
        sec._given[k] = v


def _value(f: dataclasses.Field[Any], tp: Any, key: str, v: Any, src: str) -> Any:
    """One value checked against its declaration: type, choices, bounds, further rule."""
    meta = f.metadata
    if not meta["loose"] and not _conforms(v, tp):
        raise ConfigError(f"{src}: '{key}' must be {type_text(tp, null=False)}, got {v!r}")
    if meta["choices"] and v not in meta["choices"]:
        raise ConfigError(f"{src}: '{key}' must be one of {', '.join(meta['choices'])}, got {v!r}")
    lo_hi = meta["bounds"]
    if lo_hi and v is not None and not lo_hi[0] <= v <= lo_hi[1]:
        raise ConfigError(f"{src}: '{key}' must be in {lo_hi[0]}..{lo_hi[1]}, got {v!r}")
    return meta["check"](key, v, src) if meta["check"] else v


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
    """The ``train:`` keys against one bundle's hyper-parameters (at train time): the one rule
    for which ``train:`` keys exist (:class:`TrainOptions` only types the common ones early).

    An unknown key (``num_epoch``) or a value of another kind than the bundle's
    (``num_epochs: two``) is a one-line :class:`ConfigError` with the closest key and the
    known keys. A bundle value of ``null`` accepts anything; ``a#b`` keys (official templates)
    check ``a``.

    Raises:
        ConfigError: the first problem found.
    """
    for k, v in train.items():
        top = str(k).split("#", 1)[0]
        if top not in hyper_parameters:
            raise _unknown_key(src, f"train.{k}", [str(x) for x in hyper_parameters], "train.", " for this bundle")
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
            raise ConfigError(
                f"{what}: YAML anchors/aliases expand to more than {MAX_YAML_NODES} values; write the values out"
            )
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
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"
        ) from None
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


# ---- the reference and the example, generated from the declarations ------------------------
REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REFERENCE_COMMAND = "python -m common.config --reference"


def _sections() -> list[tuple[str, type[Section]]]:
    """``("", PipelineConfig)`` then every nested section, in declaration order."""
    out: list[tuple[str, type[Section]]] = [("", PipelineConfig)]
    for f in settings_of(PipelineConfig):
        tp = _hints(PipelineConfig)[f.name]
        if isinstance(tp, type) and issubclass(tp, Section):
            out.append((f.name, tp))
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _inline(v: Any) -> str:
    """A value as one line of YAML (``null``, ``true``, ``[0, 256]``)."""
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _rules(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    if meta["choices"]:
        return " One of " + ", ".join(f"`{c}`" for c in meta["choices"]) + "."
    if meta["bounds"]:
        lo, hi = meta["bounds"]
        return f" At least {lo}." if hi >= 1 << 10 else f" In {lo}..{hi}."
    return ""


def _md(text: str) -> str:
    """reST roles and double backticks of a docstring as Markdown."""
    return re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def reference_markdown() -> str:
    """docs/configuration.md: every section and key with its type, default and meaning."""
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{REFERENCE_COMMAND}` from the dataclasses in common/config.py; "
        "edit those, not this file. -->",
        "",
        "Every stage reads one configuration. Later wins: the defaults below, `<work_dir>/pipeline.yaml`, "
        "`--config FILE`, the command-line flags. The first stage writes the result to "
        "`<work_dir>/pipeline.yaml` (top-level and `split:` keys in full, stage sections as given), so every "
        "later stage and every SLURM job sees the same settings. An unknown key or a value of the wrong type "
        "is one error line naming the file and the key (exit 2).",
        "",
        "`python -m common.config --example` prints a complete, commented `pipeline.yaml`.",
        "",
    ]
    for name, cls in _sections():
        title = "Top level" if not name else f"`{name}:`"
        first, _, rest = (cls.__doc__ or "").strip().partition("\n")
        lines += [f"## {title}", "", _md(first), ""]
        if rest.strip():
            lines += [_md(textwrap.dedent(rest).strip()), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in settings_of(cls):
            tp = _hints(cls)[f.name]
            if isinstance(tp, type) and issubclass(tp, Section):
                continue
            lines.append(
                f"| `{f.name}` | {type_text(tp)} | `{_inline(_default(f))}` | {f.metadata['doc']}{_rules(f)} |"
            )
        lines.append("")
    return "\n".join(lines)


def example_yaml() -> str:
    """A complete ``pipeline.yaml`` with every key, its default and its meaning as a comment.

    Stage-section keys are commented out: a key set there counts as given (the done markers
    digest the given keys, and a ``train:`` key overrides the bundle's own value)."""
    out = [
        "# pipeline.yaml: every key with its default (python -m common.config --example);",
        "# reference: docs/configuration.md. Uncomment a stage-section key to set it.",
        "",
    ]
    for name, cls in _sections():
        indent = "  " if name else ""
        off = "# " if name and not cls.DUMP_DEFAULTS else ""
        if name:
            out += [f"# {_md((cls.__doc__ or '').strip().splitlines()[0]).replace('`', '')}", f"{name}:"]
        for f in settings_of(cls):
            tp = _hints(cls)[f.name]
            if isinstance(tp, type) and issubclass(tp, Section):
                continue
            doc = _md(f.metadata["doc"]).replace("`", "") + _rules(f).replace("`", "")
            out += textwrap.wrap(
                doc,
                110,
                initial_indent=f"{indent}# ",
                subsequent_indent=f"{indent}#   ",
                break_long_words=False,
                break_on_hyphens=False,
            )
            out.append(f"{indent}{off}{f.name}: {_inline(_default(f))}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m common.config --reference [PATH] | --example``."""
    from common.io import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m common.config", description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--reference",
        nargs="?",
        const=str(REFERENCE),
        metavar="PATH",
        help=f"write the configuration reference (default {REFERENCE.relative_to(REFERENCE.parents[1])})",
    )
    ap.add_argument("--example", action="store_true", help="print a complete, commented pipeline.yaml")
    args = ap.parse_args(argv)
    if not args.reference and not args.example:
        ap.error("give --reference or --example")
    if args.reference:
        atomic_write_text(args.reference, reference_markdown())
        print(args.reference, file=sys.stderr)
    if args.example:
        sys.stdout.write(example_yaml())
    return 0


if __name__ == "__main__":
    sys.exit(main())
