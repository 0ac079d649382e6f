"""NIfTI conventions of the pipeline.

Arrays are stored in NIfTI (x, y, z) order: a zarr (z, y, x) block is transposed
once, deliberately, on write. The affine is diagonal: voxel (i, j, k) maps to
``origin + (i, j, k) * spacing`` where spacing is the voxel size in **nm** and
origin is the world position (nm) of the *centre* of voxel 0, which is exactly
the OME-NGFF translation (pixel-centre convention). NIfTI has no nm unit, so
``xyzt_units`` is left "unknown" and the values are nm.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from common.io import atomic_path


def spacing_affine(spacing_xyz: tuple[float, float, float], origin_xyz: tuple[float, float, float]) -> np.ndarray:
    """Diagonal affine from voxel size and voxel-0 centre, both (x, y, z) in nm."""
    aff = np.diag([*map(float, spacing_xyz), 1.0])
    aff[:3, 3] = origin_xyz
    return aff


def zyx_to_affine(scale_zyx: tuple[float, ...], translation_zyx: tuple[float, ...]) -> np.ndarray:
    """Affine of a zarr (z, y, x) block once transposed to NIfTI (x, y, z) order."""
    return spacing_affine(tuple(scale_zyx[::-1]), tuple(translation_zyx[::-1]))  # type: ignore[arg-type]


def save_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, compresslevel: int | None = None) -> None:
    """Write ``data`` (already x, y, z) as NIfTI, atomically.

    Args:
        path: final ``.nii.gz`` (or ``.nii``) path.
        data: the array; its dtype is kept.
        affine: 4x4 voxel-to-world (nm) matrix.
        compresslevel: gzip level (nibabel's default, 9, when ``None``). Level 1
            is several times faster and barely larger on EM data.
    """
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units(xyz="unknown")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        if compresslevel is None or not str(path).endswith(".gz"):
            nib.save(img, str(tmp))
        else:
            import gzip

            raw = img.to_bytes()
            with gzip.open(tmp, "wb", compresslevel=compresslevel) as fh:
                fh.write(raw)
