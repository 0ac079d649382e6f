"""The bundlegen stage: ``input.yaml`` and one MONAI bundle per algorithm and fold, on a CPU node.

What this adds to a plain ``BundleGen(...).generate()``:

* ``input.yaml`` declares EM as ``modality: ct`` (range normalisation to the foreground
  percentiles, the users' deliberate choice; MONAI's segresnet rejects ``em`` and the
  others silently treat it as MRI) and carries our keys (``output_classes``,
  ``unknown_label``, ``target_gpu_mem_gb``, ...).
* Template source from the config: ``builtin`` (``training/templates``),
  ``official`` (a local copy of research-contributions @21ed8e5; never downloaded) or a
  directory. ``official`` with ``unknown_label != 0`` is a config error.
* Output classes are **pinned** to ``len(classes) + 1`` (the templates count the labels
  the data happened to show) and checked in every generated bundle.
* GPU-free generation sized for ``target_gpu_mem_gb``: the templates' GPU memory probes
  are replaced by that size while generating (swinunetr's fails without a GPU).
* Official templates get offline run-time settings: a per-bundle sqlite mlflow store
  (mlflow 3 refuses its file store), ``use_pretrain: false`` for swinunetr unless a
  pre-staged weights file is configured, and the training interpreter (``CMD_PREFIX``).
* One loop of our own over MONAI's public pieces (``BundleGen`` for the template copy and
  algo objects, ``export_to_disk``, ``algo_to_json``) so each bundle gets fill kwargs, a
  ``cellmap_bundle.json`` record and a done marker; finished bundles are never regenerated
  unless ``--force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any

import training
from common import algorithms
from common.cli import StageContext, failure_reason, stage_marker
from common.config import PipelineConfig
from common.errors import ConfigError, PipelineError, StageFailed
from common.io import atomic_write_json, atomic_write_yaml, read_yaml
from common.workdir import BUNDLE_RECORD, CONFIGS_DIR, HYPER_PARAMETERS, MODEL_DIR, WorkDir, digest, utc_now
from training.vendor import vendor_into

log = logging.getLogger("cellmap.bundlegen")

STAGE = "bundlegen"
BUILTIN_TEMPLATES = Path(training.__file__).resolve().parent / "templates"
SWINUNETR_WEIGHTS = "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt"
MODALITY = {"em": "ct", "ct": "ct", "mri": "mri"}
# Facts about MONAI's official templates (research-contributions @21ed8e5), not about the
# algorithm registry: the folder names its archive holds, the one that keeps its settings in
# ``training``/``searching`` sections, and the one with pre-trained weights.
OFFICIAL_TEMPLATE_NAMES = ("segresnet", "segresnet2d", "swinunetr", "dints")
OFFICIAL_SECTIONED = "dints"
OFFICIAL_PRETRAINED = "swinunetr"


# ---- template source ---------------------------------------------------------------
def template_source(cfg: PipelineConfig, algos: list[str]) -> tuple[str, Path]:
    """``(kind, directory)`` of the templates to generate from.

    Raises:
        ConfigError: ``official`` with an unknown label value MONAI's templates cannot ignore.
        PipelineError: the directory, or an algorithm's template in it, is missing.
    """
    t = cfg.templates
    if t == "builtin":
        kind, src = "builtin", BUILTIN_TEMPLATES
    elif t == "official":
        if cfg.unknown_label != 0:
            raise ConfigError(
                f"templates: official needs unknown_label: 0, got {cfg.unknown_label}: the official "
                "MONAI templates train on every label value and cannot ignore an unknown value "
                "(use templates: builtin, or unknown_label: 0 to fold unknown into background)"
            )
        kind, src = "official", cfg.official_templates_path()
        if not src.is_dir():
            raise PipelineError(
                f"{src}: official templates directory not found (set official_templates_dir or "
                "$CELLMAP_A3DS_OFFICIAL_TEMPLATES to a local copy of research-contributions @21ed8e5 "
                "auto3dseg/algorithm_templates; templates are never downloaded)"
            )
    else:
        kind, src = "path", Path(t).expanduser()
        if not src.is_dir():
            raise PipelineError(f"{src}: templates directory not found (templates: builtin, official or a path)")
    src = src.resolve()
    nested = src / "auto3dseg" / "algorithm_templates"  # the root of an extracted repo archive
    if not (src / algos[0] / "scripts" / "algo.py").is_file() and nested.is_dir():
        src = nested
    for algo in algos:
        folder = template_folder(kind, src, algo)
        if not (folder / "scripts" / "algo.py").is_file():
            raise PipelineError(f"{folder.parent}: no '{algo}' template ({folder.name}/scripts/algo.py missing)")
    if kind == "path" and cfg.unknown_label != 0 and any(template_style(src / a) == "official" for a in algos):
        raise ConfigError(
            f"templates: {t} holds MONAI-style templates, which need unknown_label: 0 (got "
            f"{cfg.unknown_label}): they train on every label value and cannot ignore an unknown value"
        )
    return kind, src


def template_folder(kind: str, src: Path, algo: str) -> Path:
    """The template folder of ``algo``.

    With builtin templates, the algorithm registry says where (``template_dir``/``template``
    of its entry; default ``training/templates/<algo>``); official and path sources hold one
    folder per algorithm name.
    """
    if kind == "builtin" and algo in algorithms.NAMES:
        spec = algorithms.get(algo)
        base = Path(spec.template_dir).expanduser().resolve() if spec.template_dir else src
        return base / spec.template
    return src / algo


def template_style(folder: Path) -> str:
    """``builtin`` when the template in ``folder`` fills its config through our autoconfig, else ``official``.

    Decided by content, not by how the directory was named: an official copy given as a
    path (``templates: /opt/...``) needs the official key names (dints pins
    ``training#output_classes``) and the offline settings just the same.
    """
    code = (folder / "scripts" / "algo.py").read_text(errors="replace")
    return "builtin" if "training.autoconfig" in code else "official"


def tree_fingerprint(path: Path) -> str:
    """Content hash of a template tree (sources only; caches are ignored)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
            h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# ---- input.yaml -----------------------------------------------------------------------
def input_config(wd: WorkDir, cfg: PipelineConfig, target_gpu_mem_gb: float) -> dict[str, Any]:
    """The task description MONAI's templates read (``data_src_cfg``)."""
    modality = MODALITY[cfg.modality.lower()]
    return {
        "name": str(cfg.bundlegen.name),
        "task": "segmentation",
        "modality": modality,
        "dataroot": str(wd.nifti_dir),
        "datalist": str(wd.datalist),
        "class_names": list(cfg.classes),
        "output_classes": cfg.output_classes,
        "unknown_label": cfg.unknown_label,
        "target_gpu_mem_gb": float(target_gpu_mem_gb),
        "sigmoid": False,
    }


def write_input_yaml(wd: WorkDir, cfg: PipelineConfig, target_gpu_mem_gb: float) -> dict[str, Any]:
    """Write ``<wd>/input.yaml`` (only when its content changes, so reruns keep it)."""
    data = input_config(wd, cfg, target_gpu_mem_gb)
    if cfg.modality.lower() == "em":
        log.info(
            "modality EM is declared to MONAI as 'ct': range normalisation to the foreground "
            "intensity percentiles (0.5, 99.5), chosen deliberately for FIB-SEM"
        )
    old = read_yaml(wd.input_yaml) if wd.input_yaml.is_file() else None
    if old != data:
        atomic_write_yaml(wd.input_yaml, data)
    return data


# ---- template modules: fresh imports, GPU-free sizing ----------------------------------
def _forget_templates(src: Path, keep: Path | None) -> None:
    """Drop cached template modules and work-dir template paths (except ``keep``).

    MONAI imports ``<algo>.scripts.algo`` by name from ``sys.path``; a later run in the same
    process (tests, notebooks, another stage) would otherwise reuse these templates.
    """
    names = {p.name for p in src.iterdir() if p.is_dir()} | set(algorithms.names()) | set(OFFICIAL_TEMPLATE_NAMES)
    for mod in list(sys.modules):
        if mod.split(".")[0] in names:
            del sys.modules[mod]
    sys.path[:] = [p for p in sys.path if not (p.endswith("algorithm_templates") and p != str(keep))]


def stage_templates(kind: str, src: Path, algos: list[str], dest: Path) -> Path:
    """Where MONAI's ``BundleGen`` should take the templates from.

    ``src`` itself when every algorithm's template is in it (MONAI copies it to ``dest``);
    otherwise (a registered algorithm with its own ``template_dir``) ``dest``, filled here as
    MONAI would: a fresh copy of ``src`` plus each outside template as ``dest/<algo>``.
    """
    outside = {a: template_folder(kind, src, a) for a in algos}
    outside = {a: f for a, f in outside.items() if f != src / a}
    if not outside:
        return src
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for algo, folder in outside.items():
        shutil.rmtree(dest / algo, ignore_errors=True)
        shutil.copytree(folder, dest / algo, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    log.info("templates staged in %s (from %s and %s)", dest, src, ", ".join(str(f) for f in outside.values()))
    return dest


def size_probes_for(algos: list[str], gpu_mem_gb: float) -> list[str]:
    """Point the loaded templates' GPU memory probes at ``gpu_mem_gb`` (no GPU needed).

    Returns:
        ``module.function`` names that were replaced.
    """
    mem_bytes = int(gpu_mem_gb * 1024**3)
    patched = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or mod_name.split(".")[0] not in algos:
            continue
        if hasattr(mod, "get_mem_from_visible_gpus"):  # swinunetr/dints: free bytes per GPU
            mod.__dict__["get_mem_from_visible_gpus"] = lambda: [mem_bytes]
            patched.append(f"{mod_name}.get_mem_from_visible_gpus")
        if hasattr(mod, "get_gpu_mem_size"):  # segresnet utils: GiB
            mod.__dict__["get_gpu_mem_size"] = lambda: float(gpu_mem_gb)
            patched.append(f"{mod_name}.get_gpu_mem_size")
    return patched


def pin_kwargs(style: str, algo: str, n: int) -> dict[str, Any]:
    """``export_to_disk`` fill kwargs that pin the output classes (official key names)."""
    if style != "official":
        return {"output_classes": n}
    if algo == OFFICIAL_SECTIONED:
        return {"training#output_classes": n, "searching#output_classes": n}
    return {"output_classes": n}


def bundle_output_classes(bundle: Path) -> Any:
    """``output_classes`` as written in a bundle's ``hyper_parameters.yaml``."""
    hp = read_yaml(bundle / CONFIGS_DIR / HYPER_PARAMETERS) or {}
    if "output_classes" in hp:
        return hp["output_classes"]
    if isinstance(hp.get("training"), dict):
        return hp["training"].get("output_classes")
    return hp.get("training#output_classes")


def offline_settings(bundle: Path, algo: str, cfg: PipelineConfig) -> dict[str, Any]:
    """Rewrite an official bundle's run-time settings that break on offline nodes."""
    hp_file = bundle / CONFIGS_DIR / HYPER_PARAMETERS
    hp = read_yaml(hp_file) or {}
    uri = f"sqlite:///{bundle / 'mlflow.db'}"  # one store per bundle: no sqlite locking across nodes
    section = hp["training"] if algo == OFFICIAL_SECTIONED and isinstance(hp.get("training"), dict) else hp
    done: dict[str, Any] = {}
    for d in (hp, section):
        if "mlflow_tracking_uri" in d:
            d["mlflow_tracking_uri"] = uri
            done["mlflow_tracking_uri"] = uri
    if algo == OFFICIAL_PRETRAINED:
        staged = cfg.bundlegen.swinunetr_pretrained
        if staged and Path(staged).is_file():
            dest = bundle / "pretrained_model" / SWINUNETR_WEIGHTS
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staged, dest)
            hp["use_pretrain"] = True
        else:
            if staged:
                log.warning("bundlegen.swinunetr_pretrained %s not found; use_pretrain: false", staged)
            hp["use_pretrain"] = False
        done["use_pretrain"] = hp["use_pretrain"]
    # the template copies expressions such as "$@bundle_root + ..." verbatim; safe YAML keeps them
    atomic_write_yaml(hp_file, hp)
    return done


# ---- the stage --------------------------------------------------------------------------
def bundle_digest(
    inp: dict[str, Any], wd: WorkDir, kind: str, src: Path, algo: str, fold: int, cfg: PipelineConfig
) -> str:
    """What one bundle depends on (not the interpreter path: it differs inside containers)."""
    stats = wd.datastats.read_bytes()
    extra = tree_fingerprint(Path(training.__file__).resolve().parent) if kind == "builtin" else ""
    if kind == "builtin":  # the registry entry's rules (roi, memory model, factory) shape the bundle too
        extra += repr(algorithms.get(algo))
    return digest(
        [
            inp,
            hashlib.sha256(stats).hexdigest(),
            kind,
            str(src),
            tree_fingerprint(template_folder(kind, src, algo)),
            extra,
            algo,
            fold,
            cfg.bundlegen.given(),
            "bundlegen-v1",
        ]
    )


def _has_model(bundle: Path) -> bool:
    model = bundle / MODEL_DIR
    return model.is_dir() and any(model.iterdir())


def run_bundlegen(wd: WorkDir, cfg: PipelineConfig, force: bool = False) -> list[str]:
    """Generate ``num_folds`` bundles for every configured algorithm.

    Returns:
        The bundle names, generated or already done.

    Raises:
        PipelineError: missing inputs or templates (exit 2). StageFailed: a bundle failed (exit 1).
    """
    algos = list(cfg.algos)
    if not wd.datastats.is_file():
        raise PipelineError(f"{wd.datastats}: not found (run analyze first)")
    if not wd.datalist.is_file():
        raise PipelineError(f"{wd.datalist}: datalist not found (run convert first)")
    kind, src = template_source(cfg, algos)
    gpu = float(cfg.target_gpu_mem_gb)
    interpreter = str(cfg.bundlegen.python or sys.executable)
    inp = write_input_yaml(wd, cfg, gpu)
    names = [(a, f) for a in algos for f in range(cfg.num_folds)]
    digests = {(a, f): bundle_digest(inp, wd, kind, src, a, f, cfg) for a, f in names}
    todo = []
    for a, f in names:
        done = wd.marker(f"{STAGE}.{a}_{f}").is_done(digests[(a, f)]) and wd.bundle_at(a, f).generated
        if force or not done:
            if not force and _has_model(wd.bundle(a, f)):
                # regenerating deletes the bundle folder, trained model included: never implicitly
                log.warning(
                    "%s_%d: inputs changed but the bundle holds a model/; kept (--force regenerates "
                    "it and deletes the model)",
                    a,
                    f,
                )
                continue
            todo.append((a, f))
    stage = wd.marker(STAGE)
    with stage_marker(stage, digest(sorted(digests.values())), bundles=[f"{a}_{f}" for a, f in names]):
        if not todo:
            log.info("all %d bundles are done; nothing to do (--force regenerates)", len(names))
        else:
            _generate(wd, cfg, kind, src, todo, digests, inp, interpreter)
        stage.done(
            bundles=[f"{a}_{f}" for a, f in names],
            templates=kind,
            template_source_dir=str(src),
            output_classes=cfg.output_classes,
            target_gpu_mem_gb=gpu,
        )
    return [f"{a}_{f}" for a, f in names]


def _generate(
    wd: WorkDir,
    cfg: PipelineConfig,
    kind: str,
    src: Path,
    todo: list[tuple[str, int]],
    digests: dict[tuple[str, int], str],
    inp: dict[str, Any],
    interpreter: str,
) -> None:
    _forget_templates(src, wd.templates_dir)
    wd.logs_dir.mkdir(parents=True, exist_ok=True)
    try:
        # the official templates' scripts log to "runner.log" in the working directory at
        # import time: keep that file in the work dir's logs, not wherever the user stands
        with contextlib.chdir(wd.logs_dir):
            _generate_bundles(wd, cfg, kind, src, todo, digests, inp, interpreter)
    finally:
        _forget_templates(src, None)  # leave no template modules behind for later imports


def _generate_bundles(
    wd: WorkDir,
    cfg: PipelineConfig,
    kind: str,
    src: Path,
    todo: list[tuple[str, int]],
    digests: dict[tuple[str, int], str],
    inp: dict[str, Any],
    interpreter: str,
) -> None:
    from monai.apps.auto3dseg import BundleGen
    from monai.auto3dseg.utils import algo_to_json

    from common.progress import progress

    algos = sorted({a for a, _ in todo})
    templates = stage_templates(kind, src, algos, wd.templates_dir)
    # MONAI copies the templates to <wd>/algorithm_templates (unless staged there already) and
    # builds one algo object each
    gen = BundleGen(
        algo_path=str(wd.root),
        algos=algos,
        templates_path_or_url=str(templates),
        data_stats_filename=str(wd.datastats),
        data_src_cfg_name=str(wd.input_yaml),
    )
    by_name = {a.name: a for a in gen.algos}
    patched = size_probes_for(algos, cfg.target_gpu_mem_gb)
    log.info(
        "templates %s (%s) -> %s; GPU probes sized for %g GB: %s",
        kind,
        src,
        wd.templates_dir,
        cfg.target_gpu_mem_gb,
        ", ".join(patched) or "none loaded",
    )
    n = cfg.output_classes
    for algo_name, fold in progress(todo, desc="bundlegen"):
        name = f"{algo_name}_{fold}"
        bundle = wd.bundle(algo_name, fold)
        marker = wd.marker(f"{STAGE}.{name}")
        marker.start(digests[(algo_name, fold)], templates=kind)
        try:
            algo = deepcopy(by_name[algo_name])
            algo.set_data_stats(str(wd.datastats))
            algo.set_data_source(str(wd.input_yaml))
            algo.set_mlflow_tracking_uri(None)
            algo.set_mlflow_experiment_name(None)
            style = template_style(template_folder(kind, src, algo_name))
            algo.export_to_disk(str(wd.root), name, fold=fold, **pin_kwargs(style, algo_name, n))
            offline = offline_settings(bundle, algo_name, cfg) if style == "official" else {}
            library = vendor_into(bundle) if style == "builtin" else None  # the bundle runs its own copy of training/
            got = bundle_output_classes(bundle)
            if got != n:
                raise StageFailed(f"{name}: output_classes is {got!r} after generation, expected {n}")
            algo.device_setting["CMD_PREFIX"] = interpreter  # BundleAlgo.train runs `python` from PATH otherwise
            record = {
                "algo": algo_name,
                "fold": fold,
                "templates": style,  # what train/ensemble act on: builtin or official-style
                "template_source": kind,  # builtin, official or path
                "template_source_dir": str(src),
                "output_classes": n,
                "class_names": list(cfg.classes),
                "resolution_nm": list(cfg.resolution_nm),  # the training grid; export/predict read it here
                "unknown_label": cfg.unknown_label,
                "target_gpu_mem_gb": float(cfg.target_gpu_mem_gb),
                "modality": inp["modality"],
                "interpreter": interpreter,
                "offline_settings": offline,
                "library": library,  # scripts/cellmap_training: version, MANIFEST sha256, module alias
                "generated_at": utc_now(),
            }
            atomic_write_json(bundle / BUNDLE_RECORD, record)
            algo_to_json(algo, template_path=str(wd.templates_dir))
        except BaseException as exc:
            marker.fail(failure_reason(exc))
            shutil.rmtree(bundle, ignore_errors=True)  # a half-written bundle must not look usable
            if isinstance(exc, (PipelineError, KeyboardInterrupt)):
                raise
            log.exception("%s: generation failed", name)
            raise StageFailed(f"{name}: generation failed: {' '.join(str(exc).split())[:300]}") from exc
        marker.done(bundle=str(bundle), output_classes=n, target_gpu_mem_gb=float(cfg.target_gpu_mem_gb))
        log.info(
            "generated %s (%s templates, %d output classes, sized for %g GB)", name, kind, n, cfg.target_gpu_mem_gb
        )


def run_bundlegen_entry(
    work_dir: Path,
    config_file: Path | None = None,
    algos: str | None = None,
    target_gpu_mem_gb: float | None = None,
    force: bool = False,
) -> int:
    """Set up the stage (work dir, ``logs/``, config; CLI flags win) and run it (what the CLI calls)."""
    overrides: dict[str, Any] = {"target_gpu_mem_gb": target_gpu_mem_gb}
    if algos is not None:
        overrides["algos"] = [a.strip() for a in algos.split(",") if a.strip()]
        if not overrides["algos"]:
            raise ConfigError(f"command line: --algos names no algorithm: {algos!r}")
    ctx = StageContext.open(STAGE, work_dir, config_file, overrides)
    run_bundlegen(ctx.wd, ctx.cfg, force=force)
    return 0
