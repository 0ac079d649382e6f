"""The ensemble stage: rank trained bundles, predict to disk, combine per case, score.

Memory bound (the known Auto3DSeg ensemble failure is holding every algorithm's
probabilities at once): each selected bundle is loaded once, predicts every case once
and writes its softmax map to ``ensemble_output/.probs/<algo>_<fold>/<case>.npy`` in a
compact dtype (float16, or uint8 quantised), then is freed. The combination then runs
per case, reading one member's map at a time into a running float32 sum (``mean``) or
vote count (``vote``). Peak memory is one model plus about two probability maps of one
case, whatever the number of members.

Selection follows MONAI's ``AlgoEnsembleBestN`` (top ``n_best`` by validation score)
and ``AlgoEnsembleBestByFold`` (the best algorithm of each fold). The score of a bundle
is ``details.best_metric`` of its done train marker ``markers/train.<algo>_<fold>.json``
(a bundle without a done marker is not trained, whatever MONAI's own files say).

Outputs: ``ensemble_output/<case>_ensemble.nii.gz`` (uint8 labels, the input image's
affine), ``reports/ensemble.{md,json,png}`` (per-class Dice/IoU for each member and for
the ensemble on the labelled cases, unknown voxels excluded), marker ``ensemble``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.classes import INSTANCE_CLASSES
from common.cli import StageContext, stage_marker
from common.config import PipelineConfig
from common.errors import PipelineError, StageFailed
from common.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from common.metrics import InstanceCounts, confusion_matrix, instance_counts, instance_scores, overall_score, summarize
from common.nifti import save_nifti
from common.progress import progress
from common.workdir import ALGO_OBJECT, Bundle, WorkDir, check_bundle_location, digest, file_fingerprint

log = logging.getLogger("cellmap.ensemble")

METHODS = ("best_n", "best_by_fold")
HELDOUT = "heldout"
MODES = ("mean", "vote")
PROB_DTYPES = ("float16", "uint8")
ENSEMBLE_NAME = "ensemble"

# A predictor maps an image file to softmax probabilities [C, X, Y, Z] in the image grid.
Predictor = Callable[[Path], Any]
PredictorFactory = Callable[["Member", WorkDir, PipelineConfig], Predictor]


@dataclass(frozen=True)
class Member:
    """A trained bundle that can join the ensemble.

    Attributes:
        name: bundle folder name ``<algo>_<fold>`` (MONAI's identifier).
        algo: algorithm name.
        fold: fold index.
        bundle_dir: the bundle folder.
        score: validation score (``best_metric``) used for ranking.
        model_id: identity of the trained weights (train marker end time + score);
            cached probabilities of another identity are discarded.
    """

    name: str
    algo: str
    fold: int
    bundle_dir: Path
    score: float
    model_id: str


@dataclass(frozen=True)
class Case:
    """One image to predict; ``label`` is set when it can be scored."""

    case: str
    image: Path
    label: Path | None = None


@dataclass
class EnsembleResult:
    """What :func:`run_ensemble` did (also the basis of ``reports/ensemble.json``)."""

    members: list[Member]
    skipped: list[str]
    outputs: list[Path]
    report: dict[str, Any] = field(default_factory=dict)
    nothing_to_do: bool = False


# ---- discovery and selection --------------------------------------------------------
def find_trained_bundles(wd: WorkDir) -> tuple[list[Member], list[str]]:
    """Bundles ``<algo>_<fold>/`` with ``algo_object.json`` and a done train marker.

    Returns:
        ``(trained members sorted by name, one message per skipped bundle)``.
    """
    trained: list[Member] = []
    skipped: list[str] = []
    if not wd.root.is_dir():
        return trained, skipped
    for d in sorted(p for p in wd.root.iterdir() if p.is_dir()):
        bundle = Bundle.from_dir(wd, d)
        if bundle is None or not bundle.generated:
            continue
        check_bundle_location(wd, d)  # a copied work dir must not predict with the original's paths
        marker = bundle.train_marker
        data = marker.read()
        if data is None:
            skipped.append(f"{d.name}: not trained (no marker {marker.path.name})")
            continue
        if data.get("status") != "done":
            why = data.get("reason") or ("still running or killed" if data.get("status") == "running" else "")
            skipped.append(f"{d.name}: not trained (train marker is {data.get('status')}{': ' + why if why else ''})")
            continue
        score = (data.get("details") or {}).get("best_metric")
        if not isinstance(score, (int, float)) or isinstance(score, bool) or math.isnan(float(score)):
            skipped.append(f"{d.name}: train marker is done but has no details.best_metric")
            continue
        trained.append(
            Member(
                name=d.name,
                algo=bundle.algo,
                fold=bundle.fold,
                bundle_dir=d,
                score=float(score),
                model_id=f"{data.get('end')}|{float(score)!r}",
            )
        )
    return trained, skipped


def trained_members(
    wd: WorkDir, only: Sequence[str] | None, configured: Sequence[str] | str | None
) -> tuple[list[Member], list[str]]:
    """Trained bundles restricted to ``only`` (``--members``), else ``configured`` (``ensemble.members``,
    a list or comma-separated); with the skip reasons of :func:`find_trained_bundles`.

    Raises:
        PipelineError: a requested member is not a trained bundle.
    """
    trained, skipped = find_trained_bundles(wd)
    if only is None:
        conf = configured or []
        only = [m.strip() for m in conf.split(",")] if isinstance(conf, str) else [str(m) for m in conf]
    wanted = [m for m in only if m]
    if wanted:
        unknown = sorted(set(wanted) - {m.name for m in trained})
        if unknown:
            raise PipelineError(
                f"--members: {', '.join(unknown)} is not a trained bundle in {wd.root}"
                + (f" ({'; '.join(skipped)})" if skipped else "")
            )
        trained = [m for m in trained if m.name in wanted]
    return trained, skipped


def select_members(members: Sequence[Member], method: str, n_best: int) -> list[Member]:
    """Pick the ensemble like MONAI's ``AlgoEnsembleBestN`` / ``AlgoEnsembleBestByFold``.

    ``best_n``: the ``n_best`` highest scores (all when fewer are trained).
    ``best_by_fold``: per fold present, the highest-scoring algorithm. Ties keep name order.
    The result is sorted by score, best first.
    """
    if method not in METHODS:
        raise PipelineError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    ranked = sorted(members, key=lambda m: (-m.score, m.name))
    if method == "best_n":
        if n_best < 1:
            raise PipelineError(f"--n-best must be >= 1, got {n_best}")
        if len(ranked) < n_best:
            log.info("%d trained bundles available (n_best=%d): using all", len(ranked), n_best)
        return ranked[:n_best]
    best: dict[int, Member] = {}
    for m in ranked:
        best.setdefault(m.fold, m)
    return sorted(best.values(), key=lambda m: (-m.score, m.name))


# ---- cases ----------------------------------------------------------------------------
def _case_name(image: Path) -> str:
    name = image.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name[: -len("_image")] if name.endswith("_image") else name


def scored_set(wd: WorkDir, on: str) -> str:
    """What ``on`` resolves to: ``heldout`` becomes ``testing`` or ``validation`` (fallback)."""
    if on != HELDOUT:
        return on
    try:
        dl = read_json(wd.datalist)
    except (OSError, ValueError):
        return "validation"
    return "testing" if any(isinstance(it, dict) and it.get("label") for it in dl.get("testing", [])) else "validation"


def resolve_cases(wd: WorkDir, on: str, folds: set[int]) -> list[Case]:
    """The images to predict.

    Args:
        wd: work dir (``nifti_data/datalist.json`` is MONAI's datalist, paths relative
            to ``nifti_data/``).
        on: ``heldout`` (default: the labelled items of the datalist's ``testing`` list,
            never used for training or selection; the validation folds when there are
            none), ``validation`` (training items of the selected members' folds: with
            ``num_folds: 1`` fold 0 is the validation set), ``testing`` (the datalist's
            ``testing`` list) or comma-separated image paths.
        folds: folds of the selected members.

    Raises:
        PipelineError: no datalist, a missing image, or nothing to predict.
    """
    labelled_only = on == HELDOUT
    if on == HELDOUT:
        if not wd.datalist.is_file():
            raise PipelineError(f"{wd.datalist}: datalist not found (run convert first)")
        on = scored_set(wd, on)
    if on in ("validation", "testing"):
        if not wd.datalist.is_file():
            raise PipelineError(f"{wd.datalist}: datalist not found (run convert first)")
        try:
            dl = read_json(wd.datalist)
        except ValueError as exc:
            raise PipelineError(f"{wd.datalist}: invalid JSON ({exc})") from None
        items = dl.get("training", []) if on == "validation" else dl.get("testing", [])
        if on == "validation":
            items = [it for it in items if int(it.get("fold", 0)) in folds]
        elif labelled_only:
            items = [it for it in items if isinstance(it, dict) and it.get("label")]
        cases = []
        for it in items:
            image = wd.nifti_dir / it["image"]
            label = wd.nifti_dir / it["label"] if it.get("label") else None
            cases.append(Case(str(it.get("case") or _case_name(image)), image, label))
        if not cases:
            raise PipelineError(
                f"{wd.datalist}: no {on} cases" + (f" for folds {sorted(folds)}" if on == "validation" else "")
            )
    else:
        cases = []
        for p in (s.strip() for s in on.split(",")):
            if p:
                image = Path(p).expanduser().resolve()
                cases.append(Case(_case_name(image), image, None))
        if not cases:
            raise PipelineError("--on: no image paths given")
    for c in cases:
        if not c.image.is_file():
            raise PipelineError(f"{c.image}: image not found")
        if c.label is not None and not c.label.is_file():
            raise PipelineError(f"{c.label}: label not found")
    names = [c.case for c in cases]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PipelineError(f"--on: several images map to the same case name {dup[0]!r}")
    return sorted(cases, key=lambda c: c.case)


# ---- prediction ----------------------------------------------------------------------
def bundle_predictor(member: Member, wd: WorkDir, cfg: PipelineConfig) -> Predictor:
    """Load a trained bundle once, through MONAI (``algo_object.json`` -> ``BundleAlgo``).

    ``BundleAlgo.get_inferer`` builds the bundle's ``scripts/infer.py`` ``InferClass``
    from its configs; its ``infer({"image": path})`` (a datalist item, as MONAI's own
    ensembler passes it) returns softmax probabilities
    ``[C, X, Y, Z]`` in the image grid. Extra keyword overrides come from
    ``ensemble.infer_params`` in the configuration.
    """
    from monai.apps.auto3dseg.utils import algo_from_json

    algo, _ = algo_from_json(str(member.bundle_dir / ALGO_OBJECT), template_path=str(wd.templates_dir))
    inferer = algo.get_inferer(**dict(cfg.ensemble.infer_params or {}))

    def predict(image: Path) -> Any:
        # what MONAI's AlgoEnsemble passes (datalist items): the official InferClass applies
        # dict transforms and fails on a bare path; the builtin one accepts both
        return inferer.infer({"image": str(image)})

    return predict


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor / MetaTensor
        x = x.detach()
        if hasattr(x, "as_tensor"):
            x = x.as_tensor()
        return x.cpu().numpy()
    return np.asarray(x)


def _encode(prob: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    return prob.astype(np.float16)


def _decode_into(acc: np.ndarray, stored: np.ndarray, dtype: str) -> None:
    """``acc += probabilities`` without materialising a float32 copy of ``stored``."""
    if dtype == "uint8":
        np.add(acc, stored, out=acc, casting="unsafe")  # scaled by 1/255 once at the end
    else:
        np.add(acc, stored, out=acc)


def _argmax0(p: np.ndarray) -> np.ndarray:
    """argmax over axis 0, one channel at a time (no transposed copy of ``p``)."""
    best = np.array(p[0], copy=True)
    idx = np.zeros(best.shape, dtype=np.uint8)
    for c in range(1, p.shape[0]):
        ch = p[c]
        better = ch > best
        idx[better] = c
        np.maximum(best, ch, out=best)
    return idx


def _prob_path(prob_root: Path, member: Member, case: Case) -> Path:
    return prob_root / member.name / f"{case.case}.npy"


def _image_shape(path: Path) -> tuple[int, ...]:
    return tuple(int(s) for s in nib.load(str(path)).shape[:3])


def predict_member(
    member: Member,
    cases: Sequence[Case],
    predictor_factory: PredictorFactory,
    wd: WorkDir,
    cfg: PipelineConfig,
    prob_root: Path,
    prob_dtype: str,
) -> None:
    """One member predicts every case lacking a probability file; the model is loaded once.

    Raises:
        StageFailed: the bundle cannot be loaded, or returns a map of the wrong shape.
    """
    out_dir = prob_root / member.name
    meta_path = out_dir / "model.json"
    meta = {"model_id": member.model_id, "prob_dtype": prob_dtype}
    with contextlib.suppress(OSError, ValueError):
        if out_dir.is_dir() and read_json(meta_path) != meta:
            log.info("%s: retrained or dtype changed: dropping its cached probabilities", member.name)
            shutil.rmtree(out_dir)
    todo = [c for c in cases if not _prob_path(prob_root, member, c).is_file()]
    if not todo:
        log.info("%s: probabilities of all %d cases already on disk", member.name, len(cases))
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)
    try:
        predictor = predictor_factory(member, wd, cfg)
    except Exception as exc:  # noqa: BLE001 - any load failure is this member's failure
        raise StageFailed(f"{member.bundle_dir}: cannot load the trained bundle: {exc}") from exc
    try:
        for case in progress(todo, desc=f"predict {member.name}", unit="case"):
            prob = _to_numpy(predictor(case.image))
            shape = _image_shape(case.image)
            if prob.ndim != 4 or tuple(prob.shape[1:]) != shape or prob.shape[0] != cfg.output_classes:
                raise StageFailed(
                    f"{member.bundle_dir}: predicted {tuple(prob.shape)} for {case.image.name}, "
                    f"expected [{cfg.output_classes}, {', '.join(map(str, shape))}] (C, X, Y, Z)"
                )
            enc = _encode(prob, prob_dtype)
            del prob
            with atomic_path(_prob_path(prob_root, member, case)) as tmp:
                np.save(tmp, enc, allow_pickle=False)
            del enc
    finally:
        del predictor
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def combine_case(
    case: Case,
    members: Sequence[Member],
    prob_root: Path,
    mode: str,
    prob_dtype: str,
    n_classes: int,
    gt: np.ndarray | None = None,
    unknown_label: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Ensemble labels of one case, reading one member's probability map at a time.

    Args:
        gt: the case's label map, when it is scored; each member's own argmax is then
            scored on the fly (and freed), so nothing per member is kept.

    Returns:
        ``(ensemble labels uint8 [X, Y, Z], {member name: confusion matrix})``, the
        ensemble's own matrix under ``"ensemble"`` (empty dict without ``gt``).
    """
    acc: np.ndarray | None = None
    counts: dict[str, np.ndarray] = {}
    for m in members:
        path = _prob_path(prob_root, m, case)
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
        if stored.shape[0] != n_classes:
            raise StageFailed(f"{path}: {stored.shape[0]} channels, expected {n_classes}")
        lab = _argmax0(stored) if (mode == "vote" or gt is not None) else None
        if mode == "mean":
            if acc is None:
                acc = np.zeros(stored.shape, dtype=np.float32)
            _decode_into(acc, stored, prob_dtype)
        else:
            assert lab is not None
            if acc is None:
                acc = np.zeros(stored.shape, dtype=np.uint16)
            for c in range(n_classes):
                acc[c] += lab == c
        if gt is not None and lab is not None:
            counts[m.name] = confusion_matrix(lab, gt, n_classes, unknown_label)
        del stored, lab
    assert acc is not None
    # mean: argmax of the sum is the argmax of the mean; vote: most votes, ties to the lower class
    labels = _argmax0(acc)
    del acc
    if gt is not None:
        counts[ENSEMBLE_NAME] = confusion_matrix(labels, gt, n_classes, unknown_label)
    return labels, counts


# ---- scoring helpers -------------------------------------------------------------------
SCORED_ON_NOTE = {
    "testing": "held-out labelled cases (the datalist's `testing` list), never used for training or model selection",
    "validation": "the members' validation folds: no labelled held-out case exists (set split.test_fraction), so "
    "these are the cases that chose each member's best epoch and ranked the members - optimistic",
    "paths": "images given by path",
}


def case_instance_counts(
    labels: np.ndarray, gt: np.ndarray, cfg: PipelineConfig, spacing: Sequence[float], case: str
) -> dict[str, dict[str, Any]]:
    """The challenge's instance counts of the ensemble's labels for every configured instance class.

    A class's objects are the connected components of its mask (label maps hold no ids);
    voxels of unknown truth are cleared from the prediction first.
    """
    out: dict[str, dict[str, Any]] = {}
    names = [(cid, name) for cid, name in enumerate(cfg.classes, start=1) if name in INSTANCE_CLASSES]
    if not names:
        return out
    known = gt != cfg.unknown_label if cfg.unknown_label else None
    for cid, name in names:
        pred = labels == cid
        if known is not None:
            pred &= known
        out[name] = dataclasses.asdict(instance_counts(pred, gt == cid, spacing, crop=case))
    return out


def compare_with_best_member(scores: dict[str, Any], members: Sequence[str]) -> dict[str, Any] | None:
    """The ensemble's pooled mean Dice against its best member's on the same scored cases."""
    ens = (scores.get(ENSEMBLE_NAME) or {}).get("mean_dice")
    mine = [(scores[m]["mean_dice"], m) for m in members if m in scores and scores[m].get("mean_dice") is not None]
    if ens is None or not mine:
        return None
    best_score, best = sorted(mine, key=lambda t: (-t[0], t[1]))[0]
    return {
        "best_member": best,
        "best_member_mean_dice": best_score,
        "ensemble_mean_dice": ens,
        "below": bool(ens < best_score),
    }


def leaderboard(
    ens: dict[str, Any] | None, instance: dict[str, InstanceCounts], classes: Sequence[str]
) -> dict[str, Any] | None:
    """Challenge-style scores of the ensemble: semantic IoU, instance F1/Hausdorff, overall."""
    if not ens:
        return None
    semantic = {c: ens["per_class"][c]["iou"] for c in classes if c not in INSTANCE_CLASSES}
    inst = {c: instance_scores(instance[c]) for c in classes if c in instance}
    return {
        **overall_score(semantic, {c: v["combined"] for c, v in inst.items()}),
        "semantic_iou": semantic,
        "instance": inst,
    }


# ---- reports -------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The score tables of ``reports/ensemble.json`` as Markdown."""
    classes = report["classes"]
    scored_on = report.get("scored_on", "validation")
    lines = [
        "# Ensemble",
        "",
        f"Method `{report['method']}`, mode `{report['mode']}`, {report['n_cases']} cases predicted, "
        f"{report['n_scored']} scored (unknown voxels excluded; Dice/IoU from TP/FP/FN pooled over cases, "
        "the challenge's definition; `-` = class absent from labels and predictions).",
        "",
        f"Scored on: **{report.get('scored_on_note', scored_on)}**.",
    ]
    cmp = report.get("ensemble_vs_best_member")
    if cmp and cmp["below"]:
        lines += [
            "",
            f"**Warning: the ensemble (mean Dice {cmp['ensemble_mean_dice']:.4f}) is below its best member "
            f"{cmp['best_member']} ({cmp['best_member_mean_dice']:.4f}) on these cases.**",
        ]
    scored_col = "held-out mean Dice" if scored_on == "testing" else "scored mean Dice"
    lines += [
        "",
        "Members are ranked by their validation score: the pooled mean Dice of their own validation fold "
        "(the trainer's selection metric, the same definition as the tables below).",
        "",
        f"| member | validation mean Dice (ranking) | {scored_col} | selected |",
        "|---|---|---|---|",
    ]
    for r in report["ranking"]:
        lines.append(
            f"| {r['name']} | {r['score']:.4f} | {_fmt(r.get('scored_mean_dice'))} | "
            f"{'yes' if r['selected'] else 'no'} |"
        )
    if report.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(report["skipped"])]
    if report["n_scored"]:
        for metric in ("dice", "iou"):
            lines += [
                "",
                f"## {'Dice' if metric == 'dice' else 'IoU'} per class",
                "",
                f"| model | mean {metric} | " + " | ".join(classes) + " |",
                "|---" * (len(classes) + 2) + "|",
            ]
            for name, s in report["scores"].items():
                cells = [_fmt(s["per_class"][c][metric]) for c in classes]
                lines.append(f"| {name} | {_fmt(s['mean_' + metric])} | " + " | ".join(cells) + " |")
        lb = report.get("leaderboard")
        if lb:
            lines += [
                "",
                "## Challenge score of the ensemble",
                "",
                f"Overall **{_fmt(lb['overall'])}** = sqrt(mean instance combined {_fmt(lb['mean_instance_combined'])}"
                f" x mean semantic IoU {_fmt(lb['mean_semantic_iou'])}) (see docs/evaluation.md).",
            ]
            if lb["instance"]:
                lines += [
                    "",
                    "| instance class | F1 | normalised Hausdorff | mean Hausdorff nm | combined | TP | FP | FN |",
                    "|---|---|---|---|---|---|---|---|",
                ]
                for c, v in lb["instance"].items():
                    lines.append(
                        f"| {c} | {_fmt(v['f1'])} | {_fmt(v['normalized_hausdorff'])} | "
                        f"{_fmt(v['mean_hausdorff_nm'])} | {_fmt(v['combined'])} | {v['tp']} | {v['fp']} | {v['fn']} |"
                    )
    else:
        lines += ["", "No labelled case: nothing scored."]
    return "\n".join(lines) + "\n"


def plot_scores(report: dict[str, Any], path: Path) -> None:
    """Grouped bar chart: per class Dice, one bar per member and the ensemble."""
    from common.plots import pyplot, save_figure

    plt = pyplot()
    if plt is None:  # matplotlib absent: the table is the report
        return
    classes = report["classes"]
    models = list(report["scores"])
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) + 2), 4.0))
    for i, name in enumerate(models):
        vals = [report["scores"][name]["per_class"][c]["dice"] for c in classes]
        vals = [0.0 if v is None or math.isnan(v) else v for v in vals]
        ax.bar(
            np.arange(len(classes)) + (i - (len(models) - 1) / 2) * width,
            vals,
            width,
            label=f"{name} (mean {_fmt(report['scores'][name]['mean_dice'])})",
        )
    ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (unknown voxels excluded)")
    ax.set_title(f"Ensemble ({report['mode']}) vs members, {report['n_scored']} labelled cases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# ---- the stage -------------------------------------------------------------------------
def _case_state_path(wd: WorkDir, case: Case) -> Path:
    return wd.ensemble_dir / ".cases" / f"{case.case}.json"


def output_path(wd: WorkDir, case: Case) -> Path:
    """``ensemble_output/<case>_ensemble.nii.gz``."""
    return wd.ensemble_dir / f"{case.case}_ensemble.nii.gz"


def _case_done(wd: WorkDir, case: Case, case_digest: str) -> dict[str, Any] | None:
    try:
        state = read_json(_case_state_path(wd, case))
    except (OSError, ValueError):
        return None
    if state.get("digest") != case_digest or not output_path(wd, case).is_file():
        return None
    return state


def run_ensemble(
    cfg: PipelineConfig,
    wd: WorkDir,
    method: str | None = None,
    n_best: int | None = None,
    mode: str | None = None,
    on: str | None = None,
    predictor_factory: PredictorFactory | None = None,
    only: Sequence[str] | None = None,
) -> EnsembleResult:
    """Run the ensemble stage (see the module docstring).

    Args:
        cfg: pipeline configuration; ``cfg.ensemble`` may hold ``method``, ``n_best``,
            ``mode``, ``on``, ``members``, ``prob_dtype`` (``float16``/``uint8``),
            ``infer_params``.
        wd: the work dir.
        method: ``best_n`` (default) or ``best_by_fold``.
        n_best: members for ``best_n`` (default 3).
        mode: ``mean`` (default) or ``vote``.
        on: ``validation`` (default), ``testing`` or comma-separated image paths.
        predictor_factory: how a member is loaded; defaults to the bundle's own
            ``InferClass`` through MONAI (:func:`bundle_predictor`).
        only: restrict the candidates to these bundle names (``--members``) before
            the selection.

    Raises:
        PipelineError: no trained bundle (exit 2), bad arguments or inputs.
        StageFailed: a member fails to load or predict (exit 1).
    """
    ens = cfg.ensemble
    method = method or ens.method
    n_best = int(n_best if n_best is not None else ens.n_best)
    mode = mode or ens.mode
    on = on or ens.on
    prob_dtype = str(ens.prob_dtype)
    if mode not in MODES:
        raise PipelineError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if prob_dtype not in PROB_DTYPES:
        raise PipelineError(f"ensemble.prob_dtype must be one of {', '.join(PROB_DTYPES)}, got {prob_dtype!r}")
    predictor_factory = predictor_factory or bundle_predictor

    trained, skipped = trained_members(wd, only, ens.members)
    for msg in skipped:
        log.warning("skipping %s", msg)
    if not trained:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise PipelineError(
            f"{wd.root}: no trained bundle (need <algo>_<fold>/algo_object.json and a done "
            f"markers/train.<algo>_<fold>.json with details.best_metric){detail}"
        )
    members = select_members(trained, method, n_best)
    log.info("ensemble members (%s): %s", method, ", ".join(f"{m.name} {m.score:.4f}" for m in members))
    cases = resolve_cases(wd, on, {m.fold for m in members})
    n_classes = cfg.output_classes

    members_key = [[m.name, m.model_id] for m in members]
    run_digest = digest(
        [
            members_key,
            mode,
            prob_dtype,
            n_classes,
            cfg.unknown_label,
            cfg.classes,
            [[c.case, file_fingerprint(c.image), file_fingerprint(c.label) if c.label else None] for c in cases],
        ]
    )
    marker = wd.marker(ENSEMBLE_NAME)
    report_json = wd.reports_dir / "ensemble.json"
    if marker.is_done(run_digest) and report_json.is_file() and all(output_path(wd, c).is_file() for c in cases):
        log.info("ensemble already done for these members and cases: nothing to do")
        return EnsembleResult(
            members, skipped, [output_path(wd, c) for c in cases], read_json(report_json), nothing_to_do=True
        )

    with stage_marker(marker, run_digest, members=[m.name for m in members], method=method, mode=mode):
        result = _run(
            cfg,
            wd,
            members,
            skipped,
            trained,
            cases,
            method,
            mode,
            prob_dtype,
            predictor_factory,
            members_key,
            scored_set(wd, on) if on in (HELDOUT, "validation", "testing") else "paths",
        )
        marker.done(
            members=[m.name for m in members],
            n_cases=len(cases),
            best_metric=result.report["scores"].get(ENSEMBLE_NAME, {}).get("mean_dice"),
        )
    return result


def _run(
    cfg: PipelineConfig,
    wd: WorkDir,
    members: list[Member],
    skipped: list[str],
    trained: list[Member],
    cases: list[Case],
    method: str,
    mode: str,
    prob_dtype: str,
    predictor_factory: PredictorFactory,
    members_key: list[list[str]],
    scored_on: str = "validation",
) -> EnsembleResult:
    n_classes = cfg.output_classes
    prob_root = wd.ensemble_dir / ".probs"
    case_digests = {
        c.case: digest(
            [
                members_key,
                mode,
                prob_dtype,
                n_classes,
                cfg.unknown_label,
                file_fingerprint(c.image),
                file_fingerprint(c.label) if c.label else None,
            ]
        )
        for c in cases
    }
    todo = [c for c in cases if _case_done(wd, c, case_digests[c.case]) is None]
    log.info("%d of %d cases to ensemble (%d already done)", len(todo), len(cases), len(cases) - len(todo))

    # 1. each member: load once, predict every remaining case to disk, free
    for m in members:
        predict_member(m, todo, predictor_factory, wd, cfg, prob_root, prob_dtype)

    # 2. per case: combine one member map at a time, write the labels, keep the counts
    for c in progress(todo, desc="ensemble", unit="case"):
        gt = None
        if c.label is not None:
            gt = np.asarray(nib.load(str(c.label)).dataobj)
            shape = _image_shape(c.image)
            if gt.shape != shape:
                raise StageFailed(f"{c.label}: label shape {gt.shape} != image shape {shape}")
        labels, counts = combine_case(c, members, prob_root, mode, prob_dtype, n_classes, gt, cfg.unknown_label)
        img = nib.load(str(c.image))
        case_instance = (
            {}
            if gt is None
            else case_instance_counts(labels, gt, cfg, [float(z) for z in img.header.get_zooms()[:3]], c.case)
        )
        del gt
        save_nifti(output_path(wd, c), labels, img.affine, compresslevel=1)
        state: dict[str, Any] = {
            "digest": case_digests[c.case],
            "case": c.case,
            "counts": {k: v.tolist() for k, v in counts.items()},
            "instance": case_instance,
        }
        atomic_write_json(_case_state_path(wd, c), state)
        del labels, counts

    # 3. scores pooled over every scored case (done earlier or now)
    pooled: dict[str, np.ndarray] = {}
    per_case: dict[str, dict[str, float]] = {}
    instance: dict[str, InstanceCounts] = {}
    n_scored = 0
    for c in cases:
        done = _case_done(wd, c, case_digests[c.case])
        if done is None:
            raise StageFailed(f"{_case_state_path(wd, c)}: missing after the case was ensembled")
        if not done["counts"]:
            continue
        n_scored += 1
        for name, mat in done["counts"].items():
            arr = np.asarray(mat, dtype=np.int64)
            pooled[name] = pooled.get(name, 0) + arr
            per_case.setdefault(c.case, {})[name] = summarize(arr, cfg.classes)["mean_dice"]
        for name, d in (done.get("instance") or {}).items():
            instance.setdefault(name, InstanceCounts()).add(InstanceCounts(**d))
    order = [m.name for m in members] + [ENSEMBLE_NAME]
    selected = {m.name for m in members}
    scores = {n: {**summarize(pooled[n], cfg.classes), "confusion": pooled[n].tolist()} for n in order if n in pooled}
    report: dict[str, Any] = {
        "method": method,
        "mode": mode,
        "prob_dtype": prob_dtype,
        "classes": list(cfg.classes),
        "unknown_label": cfg.unknown_label,
        "n_cases": len(cases),
        "n_scored": n_scored,
        "scored_on": scored_on,
        "scored_on_note": SCORED_ON_NOTE.get(scored_on, SCORED_ON_NOTE["paths"]),
        # ranked by the number shown: the pooled mean Dice of the member's own validation fold
        # (the trainer's selection metric); the scored set's number is shown beside it
        "ranking": [
            {
                "name": m.name,
                "score": m.score,
                "validation_mean_dice": m.score,
                "selected": m.name in selected,
                "scored_mean_dice": scores.get(m.name, {}).get("mean_dice"),
            }
            for m in sorted(trained, key=lambda m: (-m.score, m.name))
        ],
        "skipped": skipped,
        "members": [m.name for m in members],
        "outputs": {c.case: str(output_path(wd, c).relative_to(wd.root)) for c in cases},
        "scores": scores,
        "per_case_mean_dice": per_case,
        "ensemble_vs_best_member": compare_with_best_member(scores, [m.name for m in members]),
        "leaderboard": leaderboard(scores.get(ENSEMBLE_NAME), instance, cfg.classes),
    }
    cmp = report["ensemble_vs_best_member"]
    if cmp and cmp["below"]:
        log.warning(
            "the ensemble (pooled mean Dice %.4f) is below its best member %s (%.4f) on the %s cases",
            cmp["ensemble_mean_dice"],
            cmp["best_member"],
            cmp["best_member_mean_dice"],
            scored_on,
        )
    atomic_write_json(wd.reports_dir / "ensemble.json", report)
    atomic_write_text(wd.reports_dir / "ensemble.md", render_markdown(report))
    if n_scored:
        plot_scores(report, wd.reports_dir / "ensemble.png")
    return EnsembleResult(members, skipped, [output_path(wd, c) for c in cases], report)


def run_ensemble_entry(
    work_dir: str | Path,
    config_file: str | Path | None = None,
    method: str | None = None,
    n_best: int | None = None,
    mode: str | None = None,
    on: str | None = None,
    only: Sequence[str] | None = None,
) -> EnsembleResult:
    """Set up the stage (work dir, ``logs/``, config) and run :func:`run_ensemble` (what the CLI calls)."""
    ctx = StageContext.open("ensemble", work_dir, config_file)
    return run_ensemble(ctx.cfg, ctx.wd, method=method, n_best=n_best, mode=mode, on=on, only=only)
