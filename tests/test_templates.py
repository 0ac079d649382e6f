"""Builtin algorithm templates: MONAI's BundleGen on them, the auto-configuration, losses.

Real MONAI calls throughout (DataAnalyzer, BundleGen, algo_from_json, DiceLoss); tiny data.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import training
from training import autoconfig
from training.losses import MaskedSegLoss, dice_per_class
from training.networks import build_network, fit_roi

TEMPLATES = Path(training.__file__).resolve().parent / "templates"
ALGOS = ("segresnet", "swinunetr", "dints")
CLASSES = ["ecs", "pm", "mito_mem"]


def _forget_template_modules() -> None:
    # BundleGen imports "<algo>.scripts.algo" from the work dir's copy; a previous test's copy
    # must not be reused from sys.modules.
    for name in list(sys.modules):
        if name.split(".")[0] in ALGOS:
            del sys.modules[name]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Blob dataset (class 3 missing from one case) + a real DataAnalyzer datastats."""
    from monai.apps.auto3dseg import DataAnalyzer

    from tools.synthetic import make_blobs_dataset

    wd = tmp_path_factory.mktemp("tpl") / "work"
    dl = make_blobs_dataset(wd, n_cases=4, shape=(40, 40, 24), n_classes=3, n_val=2, seed=1, missing={0: (3,)})
    DataAnalyzer(
        str(dl), str(wd / "nifti_data"), output_path=str(wd / "datastats.yaml"), device="cpu", worker=0
    ).get_all_case_stats()
    inp = {
        "name": "cellmap",
        "task": "segmentation",
        "modality": "ct",
        "dataroot": str(wd / "nifti_data"),
        "datalist": str(dl),
        "class_names": CLASSES,
        "output_classes": 4,
        "unknown_label": 255,
        "target_gpu_mem_gb": 48.0,
        "sigmoid": False,
    }
    (wd / "input.yaml").write_text(yaml.safe_dump(inp))
    return wd


def test_bundlegen_on_builtin_templates(analysed: Path) -> None:
    from monai.apps.auto3dseg import BundleGen
    from monai.auto3dseg.utils import algo_from_json

    wd = analysed
    _forget_template_modules()
    gen = BundleGen(
        algo_path=str(wd),
        templates_path_or_url=str(TEMPLATES),
        data_stats_filename=str(wd / "datastats.yaml"),
        data_src_cfg_name=str(wd / "input.yaml"),
    )
    gen.generate(str(wd), num_fold=2)
    ids = sorted(h["identifier"] for h in gen.get_history())
    assert ids == sorted(f"{a}_{f}" for a in ALGOS for f in (0, 1))
    stats = yaml.safe_load((wd / "datastats.yaml").read_text())["stats_summary"]
    fg = stats["image_foreground_stats"]["intensity"]
    for algo in ALGOS:
        for fold in (0, 1):
            bundle = wd / f"{algo}_{fold}"
            hp = yaml.safe_load((bundle / "configs" / "hyper_parameters.yaml").read_text())
            assert hp["algo"] == algo and hp["fold"] == fold
            assert hp["bundle_root"] == str(bundle) and hp["ckpt_path"] == str(bundle / "model")
            assert hp["data_file_base_dir"] == str(wd / "nifti_data")
            assert hp["data_list_file_path"] == str(wd / "nifti_data" / "datalist.json")
            assert hp["output_classes"] == 4 and hp["class_names"] == CLASSES and hp["unknown_label"] == 255
            assert hp["intensity_bounds"] == pytest.approx([fg["percentile_00_5"], fg["percentile_99_5"]])
            assert len(hp["class_weights"]) == 4 and hp["class_weights"][0] < 1.0 < max(hp["class_weights"][1:])
            assert hp["network"] and hp["learning_rate"] > 0 and hp["loss"] == "dicece"
            assert hp["roi_size"] == fit_roi(hp, hp["roi_size"])  # a size the network accepts
            assert "$@" not in (bundle / "configs" / "hyper_parameters.yaml").read_text()  # fully resolved
            algo_obj, _ = algo_from_json(
                str(bundle / "algo_object.json"), template_path=str(wd / "algorithm_templates")
            )
            assert type(algo_obj).__name__ == f"{algo.capitalize()}Algo"
    # the template's own defaults were not overwritten by the filled copies
    assert "bundle_root" not in (TEMPLATES / "segresnet" / "configs" / "hyper_parameters.yaml").read_text()


def test_class_shares_are_matched_by_id(analysed: Path) -> None:
    """Case 0 lacks class 3: MONAI's positional pooling would shift ids; ours must not."""
    by_case = yaml.safe_load((analysed / "datastats_by_case.yaml").read_text())
    shares = autoconfig.class_shares(by_case, 4, 255)
    assert shares is not None and sum(shares) == pytest.approx(1.0)
    # ground truth from the label files themselves (unknown voxels excluded)
    import nibabel as nib

    counts = np.zeros(4)
    for f in sorted((analysed / "nifti_data").glob("*_label.nii.gz")):
        lab = np.asarray(nib.load(str(f)).dataobj)
        known = lab[lab != 255]
        counts += np.bincount(known.ravel(), minlength=4)[:4] / known.size
    assert shares == pytest.approx((counts / counts.sum()).tolist(), rel=1e-3)


def test_auto_roi_batch_follows_gpu_memory() -> None:
    small_roi, small_b = autoconfig.auto_roi_batch("segresnet", [512, 512, 512], 16)
    big_roi, big_b = autoconfig.auto_roi_batch("segresnet", [512, 512, 512], 80)
    assert np.prod(big_roi) * big_b > np.prod(small_roi) * small_b
    roi, _ = autoconfig.auto_roi_batch("swinunetr", [40, 40, 24], 48)
    assert all(r % 32 == 0 and r >= 64 for r in roi)
    roi, b = autoconfig.auto_roi_batch("dints", [40, 40, 24], 48)
    assert roi == [32, 32, 32] and b == 8  # clipped to the image, batch grows (at most 8)


def test_epoch_heuristics_are_the_official_ones() -> None:
    """segresnet: clip(ceil(80000 / n), 300, 1250) // min(3, b) official epochs of b crops per
    image = b times as many one-patch-per-case epochs here; swinunetr/dints likewise."""
    assert autoconfig.auto_num_epochs("segresnet", 10, 1) == 1250  # clipped at the top
    assert autoconfig.auto_num_epochs("segresnet", 1000, 1) == 300  # clipped at the bottom
    assert autoconfig.auto_num_epochs("segresnet", 200, 1) == 400
    assert autoconfig.auto_num_epochs("segresnet", 200, 6) == 6 * (400 // 3)
    assert autoconfig.auto_num_epochs("swinunetr", 100, 2) == 4 * min(1000, 800000 // 100 // 4)
    assert autoconfig.auto_num_epochs("dints", 1251, 2, [96, 96, 96], [240, 240, 155]) == 4 * 200


@pytest.mark.parametrize(
    "algo,net,roi",
    [
        ("segresnet", {"init_filters": 8, "blocks_down": [1, 2, 2, 4]}, [30, 33, 16]),
        ("swinunetr", {"feature_size": 12}, [32, 32, 16]),
        ("dints", {"num_blocks": 2, "num_depths": 3, "channel_mul": 0.25}, [20, 32, 16]),
    ],
)
def test_networks_accept_fitted_roi(algo: str, net: dict, roi: list[int]) -> None:
    cfg = {"algo": algo, "output_classes": 4, "network": net}
    fitted = fit_roi(cfg, roi)
    assert all(f >= r for f, r in zip(fitted, roi))
    model = build_network(cfg)
    out = model(torch.zeros(1, 1, *fitted))
    out = out[0] if isinstance(out, (list, tuple)) else out
    out.sum().backward()  # training mode: swinunetr's instance norms need > 1 voxel at 1/32
    assert out.shape == (1, 4, *fitted)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 8, 8, 6, generator=g)
    label = torch.randint(0, 4, (2, 1, 8, 8, 6), generator=g)
    return logits, label


@pytest.mark.parametrize("kind", ["dicece", "focal", "dicefocal"])
def test_unknown_voxels_change_neither_loss_nor_metric(kind: str) -> None:
    logits, label = _batch()
    label[:, :, :, :, :2] = 255  # an unknown slab
    loss = MaskedSegLoss(4, 255, [0.5, 1.0, 2.0, 1.5], kind)
    other = logits.clone()
    other[:, :, :, :, :2] = torch.randn_like(other[:, :, :, :, :2]) * 10  # anything at unknown voxels
    assert torch.equal(loss(logits, label), loss(other, label))
    d1 = dice_per_class(logits.argmax(1, keepdim=True), label, 4, 255)
    d2 = dice_per_class(other.argmax(1, keepdim=True), label, 4, 255)
    assert torch.equal(torch.nan_to_num(d1), torch.nan_to_num(d2))
    # and unknown really is ignored, not read as a class: same as cutting the slab away
    cut = loss(logits[..., 2:], label[..., 2:])
    assert torch.allclose(loss(logits, label), cut, atol=1e-6)


def test_loss_matches_monai_without_unknown() -> None:
    from monai.losses import DiceLoss

    logits, label = _batch(1)
    ours = MaskedSegLoss(4, 0, None, "dicece")(logits, label)
    dice = DiceLoss(to_onehot_y=True, softmax=True, batch=True)(logits, label)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    assert torch.allclose(ours, dice + ce, atol=1e-5)


def test_dice_per_class_values() -> None:
    label = torch.tensor([0, 1, 1, 2, 255, 255]).view(1, 1, 6, 1, 1)
    pred = torch.tensor([0, 1, 2, 2, 1, 3]).view(1, 1, 6, 1, 1)
    d = dice_per_class(pred, label, 4, 255)
    assert d[0].item() == pytest.approx(2 / 3) and d[1].item() == pytest.approx(2 / 3)
    assert torch.isnan(d[2])  # class 3 only predicted at unknown voxels: absent


def test_cli_overrides_keep_types() -> None:
    from training.trainer import parse_cli_overrides

    cfg, ov = parse_cli_overrides(
        [
            "run",
            "--config_file",
            "a.yaml",
            "--roi_size",
            "[32,32,16]",
            "--num_epochs=2",
            "--training#learning_rate",
            "1e-3",
            "--amp",
            "false",
        ]
    )
    assert cfg == "a.yaml"
    assert ov == {"roi_size": [32, 32, 16], "num_epochs": 2, "learning_rate": 1e-3, "amp": False}
    # what MONAI's BundleAlgo.train builds (split on spaces, quotes kept)
    cfg, ov = parse_cli_overrides(["run", "--config_file='/b/configs/hyper_parameters.yaml'", "--roi_size='32,32,16'"])
    assert cfg == "/b/configs/hyper_parameters.yaml" and ov == {"roi_size": [32, 32, 16]}


def test_share_weights_are_max_share_over_class_share_clipped() -> None:
    from training.losses import loss_class_weights, share_weights

    shares = [0.6, 0.3, 0.01, 0.0, 0.09]
    assert share_weights(shares, 5, 20.0) == pytest.approx([1.0, 2.0, 20.0, 1.0, 6.666667])  # 60 clipped; absent -> 1
    cfg = {"output_classes": 5, "class_shares": shares, "loss_weight_max": 100.0}
    assert loss_class_weights({**cfg, "loss": "dicece"}) is None  # the official DiceCE: unweighted
    assert loss_class_weights({**cfg, "loss": "dicefocal"})[2] == pytest.approx(60.0)
    assert loss_class_weights({**cfg, "loss": "focal", "loss_weights": "none"}) is None
    assert loss_class_weights({**cfg, "loss": "dicece", "loss_weights": [1, 2, 3, 4, 5]}) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        loss_class_weights({**cfg, "loss_weights": [1, 2]})


def test_focal_weights_favour_the_rare_class() -> None:
    """Weighted focal loss: the same error on a rare-class voxel costs more than on background."""
    logits = torch.zeros(1, 3, 4, 1, 1)
    label = torch.tensor([0, 0, 0, 2]).view(1, 1, 4, 1, 1)
    w = [1.0, 1.0, 20.0]
    wrong_rare = logits.clone()
    wrong_rare[0, 0, 3] = 3.0  # rare voxel predicted as background
    wrong_bg = logits.clone()
    wrong_bg[0, 1, 0] = 3.0  # one background voxel predicted as class 1
    loss = MaskedSegLoss(3, 255, w, "focal")
    assert loss(wrong_rare, label) > loss(wrong_bg, label)


def test_deep_supervision_heads_train_and_only_the_main_head_infers() -> None:
    """segresnet trains on dsdepth heads (MONAI DeepSupervisionLoss weights 1, 1/2, ...; the
    label shrunk by nearest neighbour so unknown stays unknown) and predicts with the main one."""
    from training.losses import deep_supervision_loss

    cfg = {
        "algo": "segresnet",
        "output_classes": 4,
        "network": {"init_filters": 4, "blocks_down": [1, 1, 1, 1], "dsdepth": 3},
    }
    model = build_network(cfg)
    x = torch.randn(2, 1, 16, 16, 24)
    outs = model(x)
    assert isinstance(outs, list) and [tuple(o.shape[2:]) for o in outs] == [(16, 16, 24), (8, 8, 12), (4, 4, 6)]
    label = torch.randint(0, 4, (2, 1, 16, 16, 24))
    label[..., :4] = 255
    lf = MaskedSegLoss(4, 255)
    # nearest-exact: output voxel i reads input voxel floor((i + 0.5) * scale)
    small = [label[:, :, 1::2, 1::2, 1::2], label[:, :, 2::4, 2::4, 2::4]]
    expect = lf(outs[0], label) + 0.5 * lf(outs[1], small[0]) + 0.25 * lf(outs[2], small[1])
    assert torch.allclose(deep_supervision_loss(lf, outs, label), expect, atol=1e-5)
    model.eval()
    with torch.no_grad():
        main = model(x)
    assert torch.is_tensor(main) and main.shape == (2, 4, 16, 16, 24)


def test_class_balanced_crops_skip_unknown_and_padding(tmp_path: Path) -> None:
    """crop_mode classes: every class id gets its share of crop centres and no centre index
    points at an unknown or padded voxel; the former 80/20 recipe rarely sees the 1 % class.

    Geometry from tests/data/real_crops.csv-like odd shapes: a (37, 29, 23) crop, 60 % unknown,
    smaller than the patch along z (so padding happens)."""
    from common.nifti import save_nifti, spacing_affine
    from training.data import build_transforms
    from training.sampling import INDICES_KEY, KnownClassIndicesd

    rng = np.random.default_rng(0)
    shape = (37, 29, 23)
    lab = np.zeros(shape, np.uint8)
    lab[:, :17] = 255  # ~60 % unknown
    lab[20:30, 18:28, 2:20] = 1
    lab[5:8, 20:23, 5:9] = 2  # the rare class: 36 voxels, ~0.5 % of known
    img = (rng.normal(100, 10, shape) + 50 * lab.clip(0, 3)).astype(np.float32)
    aff = spacing_affine((4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    save_nifti(tmp_path / "i.nii.gz", img, aff)
    save_nifti(tmp_path / "l.nii.gz", lab, aff)
    roi = [16, 16, 32]
    d = KnownClassIndicesd(3)(
        {"label": torch.from_numpy(np.pad(lab, [(0, 0), (0, 0), (4, 5)], constant_values=255))[None]}
    )
    flat = np.pad(lab, [(0, 0), (0, 0), (4, 5)], constant_values=255).reshape(-1)
    for c, idx in enumerate(d[INDICES_KEY]):
        assert idx.size == int((flat == c).sum()) and np.all(flat[idx] == c)  # never unknown / padding

    def rare_share(mode: str) -> float:
        cfg = {
            "intensity_bounds": [0, 300],
            "unknown_label": 255,
            "roi_size": roi,
            "output_classes": 3,
            "crop_mode": mode,
            "augment": "none",
            "num_crops_per_image": 60,
        }
        xf = build_transforms(cfg, train=True)
        xf.set_random_state(seed=1)
        crops = xf({"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")})
        assert all(tuple(c["label"].shape[1:]) == tuple(roi) for c in crops)
        return float(np.mean([bool((c["label"] == 2).any()) for c in crops]))

    new, old = rare_share("classes"), rare_share("posneg")
    assert new >= 0.25  # about 1/3 of the centres are rare-class voxels
    assert new > 2 * old


def test_pretrained_swinunetr_from_a_local_file(tmp_path: Path) -> None:
    """``pretrained_weights``: every tensor but the output head comes from the file (a
    ``module.`` prefix and a ``state_dict`` wrapper are accepted); a missing file is one
    clear ConfigError, nothing is downloaded."""
    from training.errors import ConfigError
    from training.networks import load_pretrained_swinunetr

    cfg = {"algo": "swinunetr", "output_classes": 4, "network": {"feature_size": 12}}
    torch.manual_seed(0)
    src = build_network(cfg)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "swin.pt")
    torch.manual_seed(1)
    dst = build_network(cfg)
    n = load_pretrained_swinunetr(dst, tmp_path / "swin.pt")
    a, b = src.state_dict(), dst.state_dict()
    assert n == sum(1 for k in a if not k.startswith("out."))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("out."))
    assert not torch.equal(a["out.conv.conv.weight"], b["out.conv.conv.weight"])  # the head stays new
    with pytest.raises(ConfigError, match="pretrained_weights file not found"):
        load_pretrained_swinunetr(dst, tmp_path / "missing.pt")
