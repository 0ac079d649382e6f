"""Synthetic NIfTI datasets shaped like convert's output (blobs on noise).

Used by tests, benchmarks and ``make demo`` for the stages after convert, so they
can be exercised without running convert first. Each case writes an image and a
label map in ``<work_dir>/nifti_data`` plus a MONAI ``datalist.json`` exactly in
the form convert writes (relative paths, ``fold`` keys).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.io import atomic_write_json
from common.nifti import save_nifti, spacing_affine


def make_case(
    shape: tuple[int, int, int],
    n_classes: int,
    rng: np.random.Generator,
    n_blobs: int = 6,
    unknown_label: int | None = 255,
    missing_classes: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """One image/label pair: ellipsoid blobs, class k brightens the image by k.

    Args:
        shape: (x, y, z) voxels (NIfTI order).
        n_classes: foreground classes 1..n_classes.
        rng: random generator (deterministic per seed).
        n_blobs: blobs per class.
        unknown_label: if set, one slab is marked unknown with this value.
        missing_classes: class ids left out of this case.

    Returns:
        ``(image float32, label uint8)``.
    """
    label = np.zeros(shape, dtype=np.uint8)
    grid = np.indices(shape, dtype=np.float32)
    for c in range(1, n_classes + 1):
        if c in missing_classes:
            continue
        for _ in range(n_blobs):
            centre = [rng.uniform(0.15 * s, 0.85 * s) for s in shape]
            radius = [rng.uniform(0.08 * s, 0.18 * s) for s in shape]
            d = sum(((grid[a] - centre[a]) / radius[a]) ** 2 for a in range(3))
            label[d <= 1.0] = c
    levels = np.linspace(40, 220, n_classes + 1).astype(np.float32)
    image = levels[label] + rng.normal(0, 12, size=shape).astype(np.float32)
    if unknown_label:
        label[:, :, : max(1, shape[2] // 8)] = unknown_label
    return np.clip(image, 0, 255).astype(np.float32), label


def make_blobs_dataset(
    work_dir: str | Path,
    n_cases: int = 6,
    shape: tuple[int, int, int] = (48, 48, 32),
    n_classes: int = 3,
    spacing_xyz: tuple[float, float, float] = (8.0, 8.0, 8.0),
    n_val: int = 2,
    seed: int = 0,
    unknown_label: int | None = 255,
    missing: dict[int, tuple[int, ...]] | None = None,
    n_test: int = 0,
) -> Path:
    """Write a blob dataset into ``<work_dir>/nifti_data`` and return the datalist path.

    Args:
        work_dir: pipeline work dir.
        n_cases: training cases (the first ``n_val`` get fold 0, the rest fold 1).
        shape: voxels per case (x, y, z).
        n_classes: foreground classes.
        spacing_xyz: voxel size in nm.
        n_val: validation (fold 0) cases.
        seed: RNG seed.
        unknown_label: value of the unknown slab (``None``/0: no unknown voxels).
        missing: case index -> class ids absent from that case.
        n_test: extra cases listed under ``testing``.
    """
    out = Path(work_dir) / "nifti_data"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    missing = missing or {}
    training, testing = [], []
    for i in range(n_cases + n_test):
        case = f"synth_crop{i + 1}"
        image, label = make_case(shape, n_classes, rng, unknown_label=unknown_label, missing_classes=missing.get(i, ()))
        aff = spacing_affine(spacing_xyz, (0.0, 0.0, 0.0))
        save_nifti(out / f"{case}_image.nii.gz", image, aff)
        save_nifti(out / f"{case}_label.nii.gz", label, aff)
        item = {"image": f"{case}_image.nii.gz", "label": f"{case}_label.nii.gz", "case": case}
        if i < n_cases:
            training.append({**item, "fold": 0 if i < n_val else 1})
        else:
            testing.append(item)
    datalist = out / "datalist.json"
    atomic_write_json(datalist, {"training": training, "testing": testing})
    return datalist
