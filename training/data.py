"""Training data of the builtin bundles: the fold split, transforms, datasets and loaders.

Every epoch's batches are a function of ``seed + epoch`` alone (data order and random
transforms), which is what makes resume exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .fileio import read_json

log = logging.getLogger("cellmap.trainer")


def datalist_split(cfg: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and validation items (absolute paths) of this bundle's fold."""
    base = Path(cfg["data_file_base_dir"])
    items = read_json(cfg["data_list_file_path"]).get("training", [])

    def absolute(it: dict[str, Any]) -> dict[str, str]:
        return {k: str(base / it[k]) for k in ("image", "label")}

    fold = int(cfg.get("fold", 0))
    train = [absolute(it) for it in items if int(it.get("fold", -1)) != fold]
    val = [absolute(it) for it in items if int(it.get("fold", -1)) == fold]
    if not train:
        raise ValueError(f"{cfg['data_list_file_path']}: no training cases outside fold {fold}")
    if not val:
        log.warning("no validation cases in fold %d: validating on the training cases", fold)
        val = train
    return train, val


CROP_MODES = ("classes", "posneg", "rand")
AUGMENT_MODES = ("default", "light", "flips", "none")


def augmentations(cfg: dict[str, Any], roi: list[int]) -> list[Any]:
    """The official templates' augmentation families (``augment: default``): affine
    (rotation +-0.26 rad, scale +-20 %), Gaussian smoothing, intensity scale and shift,
    contrast (gamma), Gaussian noise, flips on every axis; ``light``: flips + intensity
    scale/shift only (the former recipe); ``flips``: flips only (data whose classes differ by
    absolute grey level, like the demo's painted EM); ``none``."""
    from monai import transforms as T

    mode = str(cfg.get("augment", "default"))
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {mode!r}")
    keys = ["image", "label"]
    flips = [T.RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)]
    if mode == "none":
        return []
    if mode == "flips":
        return flips
    if mode == "light":
        return [
            *flips,
            T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    return [
        T.RandAffined(
            keys=keys,
            prob=0.2,
            rotate_range=[0.26] * 3,
            scale_range=[0.2] * 3,
            mode=["bilinear", "nearest"],
            spatial_size=roi,
            cache_grid=True,
            padding_mode="border",
        ),
        T.RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        T.RandScaleIntensityd(keys="image", factors=0.3, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        T.RandAdjustContrastd(keys="image", prob=0.2, gamma=(0.7, 1.5), retain_stats=True),
        T.RandGaussianNoised(keys="image", prob=0.2, mean=0.0, std=0.1),
        *flips,
    ]


def build_transforms(cfg: dict[str, Any], train: bool) -> Any:
    from monai import transforms as T

    lo, hi = (float(v) for v in cfg["intensity_bounds"])
    unknown = int(cfg.get("unknown_label", 0))
    roi = [int(r) for r in cfg["roi_size"]]
    keys = ["image", "label"]
    xs: list[Any] = [
        T.LoadImaged(keys=keys, ensure_channel_first=True, image_only=True),
        T.EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        T.EnsureTyped(keys="label", dtype=torch.int16, track_meta=False),
        T.ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if not train:
        return T.Compose(xs)
    n_crops = int(cfg.get("num_crops_per_image", 1))
    mode = str(cfg.get("crop_mode", "classes"))
    if mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {mode!r}")
    xs += [
        # padding is unknown in the label, so it never counts in loss or metric, and (crop_mode
        # classes) no crop is centred on it
        T.SpatialPadd(keys="image", spatial_size=roi, mode="constant", value=0),
        T.SpatialPadd(keys="label", spatial_size=roi, mode="constant", value=unknown),
    ]
    if mode == "classes":
        n_cls = int(cfg["output_classes"])
        ratios = cfg.get("crop_ratios")
        from .sampling import INDICES_KEY, KnownClassIndicesd

        xs += [
            KnownClassIndicesd(n_cls),  # deterministic: cached with the volume when cache_rate > 0
            T.RandCropByLabelClassesd(
                keys=keys,
                label_key="label",
                spatial_size=roi,
                num_classes=n_cls,
                indices_key=INDICES_KEY,
                ratios=None if ratios is None else [float(r) for r in ratios],
                num_samples=n_crops,
                warn=False,
            ),
        ]
    elif mode == "posneg":  # the former recipe, kept as the benchmark baseline
        ratio = float(cfg.get("crop_foreground_ratio", 0.8))
        xs += [
            T.CopyItemsd(keys="label", names="fg"),
            T.Lambdad(keys="fg", func=lambda x: (x > 0) & (x != unknown) if unknown else x > 0),
            T.RandCropByPosNegLabeld(
                keys=keys,
                label_key="fg",
                spatial_size=roi,
                pos=ratio,
                neg=1.0 - ratio,
                num_samples=n_crops,
                allow_smaller=False,
            ),
            T.DeleteItemsd(keys="fg"),
        ]
    else:
        xs.append(T.RandSpatialCropSamplesd(keys=keys, roi_size=roi, num_samples=n_crops, random_size=False))
    xs += augmentations(cfg, roi)
    return T.Compose(xs)


def epoch_batches(cfg: dict[str, Any], ds: Any, epoch: int) -> Iterator[dict[str, Any]]:
    """The batches of one epoch: one pass over ``items``, or exactly ``num_steps_per_epoch``
    batches (passes repeated, each with its own seed)."""
    n = cfg.get("num_steps_per_epoch")
    if not n:
        yield from train_loader(cfg, ds, epoch * 1000)
        return
    done, rep = 0, 0
    while done < int(n):
        for batch in train_loader(cfg, ds, epoch * 1000 + rep):
            yield batch
            done += 1
            if done >= int(n):
                return
        rep += 1


def train_dataset(cfg: dict[str, Any], items: list[dict[str, str]]) -> Any:
    """Training dataset; ``cache_rate`` of the cases keep their loaded, normalised volumes in RAM."""
    from monai.data import CacheDataset

    return CacheDataset(
        items,
        build_transforms(cfg, train=True),
        cache_rate=float(cfg.get("cache_rate", 0.0)),
        num_workers=0,
        progress=False,
    )


def train_loader(cfg: dict[str, Any], ds: Any, pass_id: int) -> Any:
    """A loader whose order and augmentations depend only on ``seed + pass_id``.

    MONAI's DataLoader seeds the random transforms from ``generator`` (in-process) or per
    worker from it, so the batches are a function of the seed alone.
    """
    from monai.data import DataLoader

    seed = int(cfg.get("seed", 0)) + pass_id
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=int(cfg["batch_size"]),
        shuffle=True,
        generator=gen,
        num_workers=int(cfg.get("num_workers", 0)),
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )
