"""Ensemble stage on real NIfTI files with probability-map predictors (fast tests).

The predictors here are real functions of the image (a softmax over distances to the
class intensity levels of the blob fixture, with a member-specific bias), so the
selection, the memory-bounded combination, the NIfTI outputs, the scoring and the
reruns are all exercised for real; the trained-bundle integration lives in
``test_ensemble_bundles.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.config import load_config
from common.workdir import WorkDir
from stages.ensemble.ensemble import (
    Member,
    find_trained_bundles,
    run_ensemble,
    select_members,
)

ROOT = Path(__file__).resolve().parents[1]
N_CLASSES = 3  # fixture classes; output channels = 4


def _levels(n_classes: int) -> np.ndarray:
    return np.linspace(40, 220, n_classes + 1).astype(np.float32)


def make_intensity_factory(bias: dict[str, int] | None = None, temperature: float = 12.0):
    """Predictor factory: softmax of -(I - level_k)^2 / T; member ``name`` gets class ``bias[name]`` boosted."""
    bias = bias or {}

    def factory(member: Member, wd: WorkDir, cfg):  # noqa: ANN001, ANN202 - test helper
        levels = _levels(len(cfg.classes))
        boost = bias.get(member.name)

        def predict(image: Path) -> np.ndarray:
            img = np.asarray(nib.load(str(image)).dataobj, dtype=np.float32)
            logits = -((img[None] - levels[:, None, None, None]) ** 2) / (temperature * 40.0)
            if boost is not None:
                logits[boost] += 2.0
            logits -= logits.max(axis=0, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=0, keepdims=True)
            return p.astype(np.float32)

        return predict

    return factory


def add_trained_bundle(wd: WorkDir, name: str, score: float | None, status: str = "done") -> None:
    """A bundle folder with algo_object.json and its train marker (as the train stage writes them)."""
    b = wd.root / name
    b.mkdir(parents=True, exist_ok=True)
    (b / "algo_object.json").write_text(json.dumps({"_target_": "x.Algo", "_state_": {}}))
    m = wd.marker(f"train.{name}")
    m.start("digest")
    if status == "done":
        m.done(**({} if score is None else {"best_metric": score}))
    elif status == "failed":
        m.fail("CUDA out of memory")


@pytest.fixture
def ens_wd(blobs_work_dir: Path) -> WorkDir:
    wd = WorkDir.at(blobs_work_dir)
    add_trained_bundle(wd, "segresnet_0", 0.80)
    add_trained_bundle(wd, "dints_0", 0.70)
    add_trained_bundle(wd, "swinunetr_0", 0.75)
    add_trained_bundle(wd, "segresnet_1", None, status="running")
    add_trained_bundle(wd, "dints_1", None, status="failed")
    return wd


def _independent_scores(
    pred_files: dict[str, Path], label_files: dict[str, Path], n_classes: int, unknown: int
) -> tuple[list[float], list[float]]:
    """Pooled per-class Dice/IoU recomputed straight from the NIfTI files with boolean masks."""
    tp = np.zeros(n_classes + 1)
    fp = np.zeros(n_classes + 1)
    fn = np.zeros(n_classes + 1)
    for case, pf in pred_files.items():
        pred = np.asarray(nib.load(str(pf)).dataobj)
        gt = np.asarray(nib.load(str(label_files[case])).dataobj)
        keep = gt != unknown
        for c in range(1, n_classes + 1):
            p, g = (pred == c) & keep, (gt == c) & keep
            tp[c] += np.sum(p & g)
            fp[c] += np.sum(p & ~g)
            fn[c] += np.sum(~p & g)
    dice = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in range(1, n_classes + 1)]
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(1, n_classes + 1)]
    return dice, iou


def test_discovery_and_selection(ens_wd: WorkDir) -> None:
    trained, skipped = find_trained_bundles(ens_wd)
    assert [m.name for m in trained] == ["dints_0", "segresnet_0", "swinunetr_0"]
    assert any("segresnet_1" in s and "running" in s for s in skipped)
    assert any("dints_1" in s and "CUDA out of memory" in s for s in skipped)
    assert [m.name for m in select_members(trained, "best_n", 2)] == ["segresnet_0", "swinunetr_0"]
    assert [m.name for m in select_members(trained, "best_n", 9)] == ["segresnet_0", "swinunetr_0", "dints_0"]
    extra = Member("dints_1", "dints", 1, ens_wd.root, 0.9, "x")
    assert [m.name for m in select_members([*trained, extra], "best_by_fold", 0)] == ["dints_1", "segresnet_0"]


def test_ensemble_outputs_scores_and_rerun(ens_wd: WorkDir) -> None:
    cfg = load_config(ens_wd.root)
    factory = make_intensity_factory({"dints_0": 2, "swinunetr_0": 3})
    res = run_ensemble(cfg, ens_wd, n_best=3, predictor_factory=factory)
    assert [m.name for m in res.members] == ["segresnet_0", "swinunetr_0", "dints_0"]
    dl = json.loads(ens_wd.datalist.read_text())
    val = {it["case"]: it for it in dl["training"] if it["fold"] == 0}
    assert sorted(p.name for p in res.outputs) == sorted(f"{c}_ensemble.nii.gz" for c in val)
    preds, labels = {}, {}
    for case, it in val.items():
        out = nib.load(str(ens_wd.ensemble_dir / f"{case}_ensemble.nii.gz"))
        img = nib.load(str(ens_wd.nifti_dir / it["image"]))
        assert out.get_data_dtype() == np.uint8
        assert out.shape == img.shape
        np.testing.assert_allclose(out.affine, img.affine)
        preds[case] = ens_wd.ensemble_dir / f"{case}_ensemble.nii.gz"
        labels[case] = ens_wd.nifti_dir / it["label"]
    # the ensemble's numbers match an independent recomputation from the files
    report = json.loads((ens_wd.reports_dir / "ensemble.json").read_text())
    dice, iou = _independent_scores(preds, labels, N_CLASSES, 255)
    got = report["scores"]["ensemble"]
    for i, c in enumerate(cfg.classes):
        assert got["per_class"][c]["dice"] == pytest.approx(dice[i])
        assert got["per_class"][c]["iou"] == pytest.approx(iou[i])
    assert got["mean_dice"] == pytest.approx(np.mean(dice))
    assert set(report["scores"]) == {"segresnet_0", "swinunetr_0", "dints_0", "ensemble"}
    # a biased member is worse than the unbiased one on the classes it over-predicts
    assert report["scores"]["segresnet_0"]["mean_dice"] > report["scores"]["dints_0"]["mean_dice"]
    assert (ens_wd.reports_dir / "ensemble.png").stat().st_size > 1000
    md = (ens_wd.reports_dir / "ensemble.md").read_text()
    assert "| ensemble |" in md and "segresnet_1" in md  # skipped bundles are reported
    # unknown voxels are ignored: predictions there do not matter
    assert ens_wd.marker("ensemble").is_done()

    # rerun: a no-op, nothing rewritten
    files = sorted(p for p in ens_wd.ensemble_dir.rglob("*") if p.is_file()) + sorted(ens_wd.reports_dir.glob("*"))
    before = {p: p.stat().st_mtime_ns for p in files}
    res2 = run_ensemble(cfg, ens_wd, n_best=3, predictor_factory=factory)
    assert res2.nothing_to_do
    assert {p: p.stat().st_mtime_ns for p in files} == before

    # a changed selection recomputes the ensemble but reuses the members' probabilities on disk
    probs = ens_wd.ensemble_dir / ".probs" / "segresnet_0"
    prob_mtimes = {p: p.stat().st_mtime_ns for p in probs.glob("*.npy")}
    calls: list[str] = []

    def counting(member, wd, cfg):  # noqa: ANN001, ANN202
        calls.append(member.name)
        return factory(member, wd, cfg)

    res3 = run_ensemble(cfg, ens_wd, n_best=2, mode="vote", predictor_factory=counting)
    assert not res3.nothing_to_do and calls == []
    assert {p: p.stat().st_mtime_ns for p in probs.glob("*.npy")} == prob_mtimes
    assert json.loads((ens_wd.reports_dir / "ensemble.json").read_text())["mode"] == "vote"


def test_unknown_voxels_are_ignored(ens_wd: WorkDir) -> None:
    """Predictions inside the unknown slab cannot change any score."""
    cfg = load_config(ens_wd.root)
    base = make_intensity_factory()

    def wild_in_unknown(member, wd, cfg):  # noqa: ANN001, ANN202
        inner = base(member, wd, cfg)

        def predict(image: Path) -> np.ndarray:
            p = inner(image)
            label = nib.load(str(image).replace("_image", "_label")).get_fdata() == 255
            p[:, label] = 0.0
            p[1, label] = 1.0  # confidently class 1 wherever the truth is unknown
            return p

        return predict

    run_ensemble(cfg, ens_wd, n_best=1, predictor_factory=base)
    a = json.loads((ens_wd.reports_dir / "ensemble.json").read_text())["scores"]["ensemble"]
    # same members and cases would be a no-op: start the ensemble afresh
    for p in (ens_wd.ensemble_dir).rglob("*"):
        if p.is_file():
            p.unlink()
    (ens_wd.markers_dir / "ensemble.json").unlink()
    run_ensemble(cfg, ens_wd, n_best=1, predictor_factory=wild_in_unknown)
    b = json.loads((ens_wd.reports_dir / "ensemble.json").read_text())["scores"]["ensemble"]
    pred = nib.load(str(next(ens_wd.ensemble_dir.glob("*_ensemble.nii.gz")))).get_fdata()
    assert (pred[:, :, :3] == 1).all()  # the slab was really predicted as class 1
    assert a["per_class"] == b["per_class"]


def _peak_traced(fn) -> int:  # noqa: ANN001
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def test_peak_memory_does_not_grow_with_members(tmp_path: Path) -> None:
    """tracemalloc peak (every numpy buffer) of 1 vs 3 members on the same cases: <= +10%."""
    from tools.synthetic import make_blobs_dataset

    peaks = {}
    for n in (0, 1, 3):  # run 0 is a warm-up: imports and caches are not the ensemble's memory
        wd = WorkDir.at(tmp_path / f"w{n}").ensure()
        make_blobs_dataset(wd.root, n_cases=3, shape=(64, 64, 48), n_classes=3, n_val=3, seed=1)
        wd.config_file.write_text("classes: [ecs, pm, mito_mem]\nunknown_label: 255\n")
        for name, score in (("segresnet_0", 0.9), ("swinunetr_0", 0.8), ("dints_0", 0.7)):
            add_trained_bundle(wd, name, score)
        cfg = load_config(wd.root)
        factory = make_intensity_factory({"dints_0": 2})
        peaks[n] = _peak_traced(lambda: run_ensemble(cfg, wd, n_best=max(n, 1), predictor_factory=factory))
    # one float32 probability map of a case is 4 * 64*64*48 * 4 B = 3 MiB; naive ensembling
    # of 3 members would hold 3 of them
    print("peaks", peaks)
    assert peaks[3] <= 1.10 * peaks[1], peaks


def test_no_trained_bundle_is_one_clear_error(blobs_work_dir: Path) -> None:
    wd = WorkDir.at(blobs_work_dir)
    add_trained_bundle(wd, "segresnet_0", None, status="running")
    res = subprocess.run(
        [sys.executable, "-m", "stages.ensemble", "--work-dir", str(wd.root)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ},
    )
    assert res.returncode == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no trained bundle" in errors[0] and "segresnet_0" in errors[0]
    assert not wd.ensemble_dir.exists() or not any(wd.ensemble_dir.glob("*.nii.gz"))


def test_bad_choices(ens_wd: WorkDir) -> None:
    from common.errors import PipelineError

    cfg = load_config(ens_wd.root)
    with pytest.raises(PipelineError, match="n-best"):
        run_ensemble(cfg, ens_wd, n_best=0, predictor_factory=make_intensity_factory())
    with pytest.raises(PipelineError, match="image not found"):
        run_ensemble(cfg, ens_wd, on=str(ens_wd.root / "nope_image.nii.gz"), predictor_factory=make_intensity_factory())


def test_scoring_by_hand() -> None:
    from stages.ensemble.scoring import confusion_matrix, summarize

    gt = np.array([0, 1, 1, 2, 255, 255, 0, 0], dtype=np.uint8)
    pred = np.array([0, 1, 2, 2, 1, 3, 0, 1], dtype=np.uint8)
    m = confusion_matrix(pred, gt, n_classes=4, unknown_label=255)
    assert m.sum() == 6  # the two unknown voxels are not counted
    s = summarize(m, ["a", "b", "c"])
    # class 1: tp 1, fp 1 (a background voxel), fn 1 -> dice 2/4, iou 1/3
    assert s["per_class"]["a"]["dice"] == pytest.approx(0.5)
    assert s["per_class"]["a"]["iou"] == pytest.approx(1 / 3)
    # class 2: tp 1, fp 1, fn 0 -> dice 2/3
    assert s["per_class"]["b"]["dice"] == pytest.approx(2 / 3)
    # class 3: only predicted inside unknown -> absent everywhere that counts: no score
    assert s["per_class"]["c"]["dice"] is None
    assert s["mean_dice"] == pytest.approx((0.5 + 2 / 3) / 2)
    # unknown_label 0: nothing is excluded
    assert confusion_matrix(pred[:4], gt[:4], 4, 0).sum() == 4


def test_mean_and_vote_differ_as_defined(tmp_path: Path) -> None:
    """One confident member vs two mildly disagreeing ones: mean follows confidence, vote the majority."""
    from stages.ensemble.ensemble import Case, combine_case

    root = tmp_path / "probs"
    members = [Member(n, n.split("_")[0], 0, tmp_path, s, "x") for n, s in (("a_0", 0.9), ("b_0", 0.8), ("c_0", 0.7))]
    probs = {
        "a_0": [0.0, 1.0, 0.0],  # confident class 1
        "b_0": [0.0, 0.45, 0.55],  # mildly class 2
        "c_0": [0.0, 0.45, 0.55],
    }
    case = Case("v", tmp_path / "v_image.nii.gz")
    for dtype in ("float16", "uint8"):
        for name, p in probs.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            arr = np.asarray(p, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 2), np.float32)
            enc = arr.astype(np.float16) if dtype == "float16" else np.rint(arr * 255).astype(np.uint8)
            np.save(root / name / "v.npy", enc)
        mean, _ = combine_case(case, members, root, "mean", dtype, 3)
        vote, counts = combine_case(
            case, members, root, "vote", dtype, 3, gt=np.full((2, 2, 2), 2, np.uint8), unknown_label=0
        )
        assert (mean == 1).all() and (vote == 2).all()
        assert counts["a_0"][2, 1] == 8 and counts["ensemble"][2, 2] == 8


def test_on_testing_and_paths(tmp_path: Path) -> None:
    from tools.synthetic import make_blobs_dataset

    wd = WorkDir.at(tmp_path / "w").ensure()
    make_blobs_dataset(wd.root, n_cases=2, shape=(24, 24, 16), n_classes=3, n_val=1, n_test=2, seed=3)
    wd.config_file.write_text("classes: [ecs, pm, mito_mem]\n")
    add_trained_bundle(wd, "segresnet_0", 0.5)
    cfg = load_config(wd.root)
    res = run_ensemble(cfg, wd, on="testing", predictor_factory=make_intensity_factory())
    assert sorted(p.name for p in res.outputs) == ["synth_crop3_ensemble.nii.gz", "synth_crop4_ensemble.nii.gz"]
    assert res.report["n_scored"] == 2  # the testing items have labels here
    img = wd.nifti_dir / "synth_crop1_image.nii.gz"
    res = run_ensemble(cfg, wd, on=str(img), predictor_factory=make_intensity_factory())
    assert [p.name for p in res.outputs] == ["synth_crop1_ensemble.nii.gz"]
    assert res.report["n_scored"] == 0 and "nothing scored" in (wd.reports_dir / "ensemble.md").read_text()


def _heldout_wd(root: Path, classes: str = "[ecs, pm, mito_mem]") -> WorkDir:
    from tools.synthetic import make_blobs_dataset

    wd = WorkDir.at(root).ensure()
    # 4 training cases (fold 0 = validation) + 2 labelled held-out cases under "testing"
    make_blobs_dataset(wd.root, n_cases=4, shape=(24, 24, 16), n_classes=3, n_val=2, n_test=2, seed=4)
    wd.config_file.write_text(f"classes: {classes}\nunknown_label: 255\n")
    add_trained_bundle(wd, "segresnet_0", 0.80)
    add_trained_bundle(wd, "dints_0", 0.60)
    return wd


def test_heldout_is_scored_and_named_and_below_best_is_said(tmp_path: Path) -> None:
    wd = _heldout_wd(tmp_path / "w")
    cfg = load_config(wd.root)
    # dints_0 over-predicts class 1 strongly enough to drag the mean of probabilities down
    res = run_ensemble(cfg, wd, n_best=2, predictor_factory=make_intensity_factory({"dints_0": 1}, temperature=4.0))
    rep = res.report
    assert rep["scored_on"] == "testing" and "never used for training or model selection" in rep["scored_on_note"]
    assert sorted(p.name for p in res.outputs) == ["synth_crop5_ensemble.nii.gz", "synth_crop6_ensemble.nii.gz"]
    assert rep["n_scored"] == 2
    # members are ranked by the validation number the report shows, and their held-out number sits beside it
    assert [(r["name"], r["validation_mean_dice"]) for r in rep["ranking"]] == [("segresnet_0", 0.8), ("dints_0", 0.6)]
    for r in rep["ranking"]:
        assert r["scored_mean_dice"] == rep["scores"][r["name"]]["mean_dice"]
    cmp = rep["ensemble_vs_best_member"]
    best = max(rep["scores"][m]["mean_dice"] for m in ("segresnet_0", "dints_0"))
    assert cmp["best_member_mean_dice"] == best and cmp["ensemble_mean_dice"] == rep["scores"]["ensemble"]["mean_dice"]
    assert cmp["below"] is True and cmp["best_member"] == "segresnet_0"
    md = (wd.reports_dir / "ensemble.md").read_text()
    assert "held-out" in md and "is below its best member segresnet_0" in md
    # the leaderboard-style score: no instance class configured, so overall = mean semantic IoU
    lb = rep["leaderboard"]
    assert lb["overall"] == pytest.approx(rep["scores"]["ensemble"]["mean_iou"])


def test_without_labelled_heldout_falls_back_to_validation_and_says_so(tmp_path: Path) -> None:
    wd = _heldout_wd(tmp_path / "w")
    dl = json.loads(wd.datalist.read_text())
    dl["testing"] = [{"image": it["image"]} for it in dl["testing"]]  # unlabelled test images
    wd.datalist.write_text(json.dumps(dl))
    cfg = load_config(wd.root)
    res = run_ensemble(cfg, wd, n_best=1, predictor_factory=make_intensity_factory())
    assert res.report["scored_on"] == "validation"
    assert sorted(p.name for p in res.outputs) == ["synth_crop1_ensemble.nii.gz", "synth_crop2_ensemble.nii.gz"]
    md = (wd.reports_dir / "ensemble.md").read_text()
    assert "no labelled held-out case exists" in md and "optimistic" in md
    assert res.report["ensemble_vs_best_member"]["below"] is False  # one member: the ensemble is that member


def test_leaderboard_scores_instance_classes(tmp_path: Path) -> None:
    from scipy import ndimage

    wd = _heldout_wd(tmp_path / "w", classes="[ecs, pm, nuc]")  # nuc is an instance class
    cfg = load_config(wd.root)
    res = run_ensemble(cfg, wd, n_best=1, predictor_factory=make_intensity_factory())
    nuc = res.report["leaderboard"]["instance"]["nuc"]
    n_objects = 0
    for case in ("synth_crop5", "synth_crop6"):
        gt = np.asarray(nib.load(str(wd.nifti_dir / f"{case}_label.nii.gz")).dataobj)
        n_objects += ndimage.label(gt == 3, structure=np.ones((3, 3, 3)))[1]
    assert nuc["tp"] + nuc["fn"] == n_objects > 0
    assert 0.0 <= nuc["combined"] <= 1.0
    lb = res.report["leaderboard"]
    assert set(lb["semantic_iou"]) == {"ecs", "pm"}
    assert lb["overall"] == pytest.approx(np.sqrt(lb["mean_semantic_iou"] * nuc["combined"]))
    assert "Challenge score of the ensemble" in (wd.reports_dir / "ensemble.md").read_text()


DICT_ALGO = '''
from monai.apps.auto3dseg import BundleAlgo


class DictnetAlgo(BundleAlgo):
    """A template-free bundle algo: nothing of the project's trainer."""
'''

DICT_INFER = '''
import numpy as np
import torch
import yaml
from monai import transforms as T


class InferClass:
    """Like the official templates' InferClass: dict transforms on a datalist item."""

    def __init__(self, config_file, **override):
        files = config_file if isinstance(config_file, (list, tuple)) else [config_file]
        cfg = {}
        for f in files:
            cfg.update(yaml.safe_load(open(f)))
        self.levels = torch.tensor(cfg["levels"], dtype=torch.float32)
        self.xf = T.Compose([
            T.LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
            T.EnsureTyped(keys="image", dtype=torch.float32),
        ])

    @torch.no_grad()
    def infer(self, image_file):
        img = self.xf(image_file)["image"]  # a bare path string fails here, as in the official templates
        logits = -((img - self.levels[:, None, None, None]) ** 2) / 480.0
        return torch.softmax(logits, dim=0)
'''


def test_template_free_dict_transform_bundle_is_ensembled(tmp_path: Path) -> None:
    """A bundle whose InferClass uses dict transforms (like the official ones) goes through MONAI."""
    from monai.auto3dseg.utils import algo_from_json, algo_to_json

    from tools.synthetic import make_blobs_dataset

    wd = WorkDir.at(tmp_path / "w").ensure()
    make_blobs_dataset(wd.root, n_cases=2, shape=(24, 24, 16), n_classes=3, n_val=1, n_test=1, seed=6)
    wd.config_file.write_text("classes: [ecs, pm, mito_mem]\nunknown_label: 255\n")
    tpl = wd.templates_dir / "dictnet"
    (tpl / "scripts").mkdir(parents=True)
    (tpl / "__init__.py").write_text("")
    (tpl / "scripts" / "__init__.py").write_text("")
    (tpl / "scripts" / "algo.py").write_text(DICT_ALGO)
    bundle = wd.root / "dictnet_0"
    (bundle / "scripts").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "scripts" / "infer.py").write_text(DICT_INFER)
    (bundle / "configs" / "hyper_parameters.yaml").write_text(f"levels: {_levels(N_CLASSES).tolist()}\n")
    import sys

    sys.path.insert(0, str(wd.templates_dir))
    try:
        from dictnet.scripts.algo import DictnetAlgo  # type: ignore[import-not-found]

        algo = DictnetAlgo(template_path=str(wd.templates_dir))
        algo.output_path = str(bundle)
        algo_to_json(algo, template_path=str(wd.templates_dir))
        m = wd.marker("train.dictnet_0")
        m.start("digest")
        m.done(best_metric=0.5)
        # the inferer really refuses a bare path: the ensemble must pass {"image": path}
        loaded, _ = algo_from_json(str(bundle / "algo_object.json"), template_path=str(wd.templates_dir))
        with pytest.raises(Exception):  # noqa: B017 - MONAI raises a TypeError/KeyError variant
            loaded.get_inferer().infer(str(wd.nifti_dir / "synth_crop3_image.nii.gz"))
        res = run_ensemble(load_config(wd.root), wd)  # default predictor: MONAI's algo_from_json + InferClass
    finally:
        sys.path.remove(str(wd.templates_dir))
        for name in [n for n in sys.modules if n.split(".")[0] in ("dictnet", "InferClass")]:
            del sys.modules[name]
    assert [p.name for p in res.outputs] == ["synth_crop3_ensemble.nii.gz"]
    assert res.report["scored_on"] == "testing" and res.report["n_scored"] == 1
    # the same function of the image as the intensity factory: the same labels
    ref = make_intensity_factory()(Member("x_0", "x", 0, bundle, 0.5, "m"), wd, load_config(wd.root))
    expect = np.argmax(ref(wd.nifti_dir / "synth_crop3_image.nii.gz"), axis=0)
    got = np.asarray(nib.load(str(res.outputs[0])).dataobj)
    assert np.mean(got == expect) > 0.999
