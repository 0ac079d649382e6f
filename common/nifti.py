"""NIfTI conventions of the pipeline.

Arrays are stored in NIfTI (x, y, z) order: a zarr (z, y, x) block is transposed
once, deliberately, on write. The affine is diagonal: voxel (i, j, k) maps to
``origin + (i, j, k) * spacing`` where spacing is the voxel size in **nm** and
origin is the world position (nm) of the *centre* of voxel 0, which is exactly
the OME-NGFF translation (pixel-centre convention). NIfTI has no nm unit, so
``xyzt_units`` is left "unknown" and the values are nm.

Every ``.nii.gz`` the pipeline writes is deterministic: deflate runs in gzip mode with
mtime 0 and no file name in the header (:func:`gzip_compressor`), so a rerun on equal
inputs gives byte-identical files (python's :mod:`gzip` stamps the time and the temporary
name). Deflate runs in ISA-L (``isal``, same gzip format, much less CPU) when it is
installed, else in :mod:`zlib`; zlib levels map onto ISA-L's four: 0 -> stored (zlib),
1 -> 1, 2..5 -> 2, 6..9 -> 3; ``Z_RLE`` applies to zlib only.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.io import atomic_path

_isal: Any
try:  # optional: the convert image and pyproject's convert extra carry it
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - exercised where isal is absent
    _isal = None

GZIP_BACKEND = "isal" if _isal is not None else "zlib"
DEFAULT_LEVEL = 1  # nibabel's own default gzip level
_CHUNK = 1 << 22  # bytes handed to the compressor at a time


def gzip_compressor(level: int, rle: bool = False, backend: str | None = None) -> Any:
    """A gzip-wrapped deflate compressor (mtime 0, no name): ISA-L when available, else zlib.

    Args:
        level: zlib level 0..9 (mapped onto ISA-L's 0..3 as in the module docstring).
        rle: ``Z_RLE`` strategy (zlib only).
        backend: ``"zlib"`` or ``"isal"`` to force one (default :data:`GZIP_BACKEND`).
    """
    which = backend or GZIP_BACKEND
    if which == "isal" and _isal is not None and level > 0:
        return _isal.compressobj(1 if level == 1 else 2 if level <= 5 else 3, _isal.DEFLATED, 16 + _isal.MAX_WBITS)
    strategy = zlib.Z_RLE if rle else zlib.Z_DEFAULT_STRATEGY
    return zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 8, strategy)


def deflate_into(fh: Any, comp: Any, buffers: list[memoryview | bytes]) -> int:
    """Compress ``buffers`` in order with ``comp`` into the open file ``fh``, :data:`_CHUNK`
    bytes at a time (bounded extra memory, no copy of the data); returns the bytes written."""
    written = 0
    for buf in buffers:
        for off in range(0, len(buf), _CHUNK):
            out = comp.compress(buf[off : off + _CHUNK])
            fh.write(out)
            written += len(out)
    out = comp.flush()
    fh.write(out)
    return written + len(out)


def nifti_image(data_xyz: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The pipeline's NIfTI-1 image of an (x, y, z) array: nm units unknown, q/s-form = ``affine``."""
    img = nib.Nifti1Image(data_xyz, affine)
    img.header.set_xyzt_units(xyz="unknown")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def spacing_affine(spacing_xyz: tuple[float, float, float], origin_xyz: tuple[float, float, float]) -> np.ndarray:
    """Diagonal affine from voxel size and voxel-0 centre, both (x, y, z) in nm."""
    aff = np.diag([*map(float, spacing_xyz), 1.0])
    aff[:3, 3] = origin_xyz
    return aff


def zyx_to_affine(scale_zyx: tuple[float, ...], translation_zyx: tuple[float, ...]) -> np.ndarray:
    """Affine of a zarr (z, y, x) block once transposed to NIfTI (x, y, z) order."""
    return spacing_affine(tuple(scale_zyx[::-1]), tuple(translation_zyx[::-1]))  # type: ignore[arg-type]


def save_nifti(
    path: str | Path, data: np.ndarray, affine: np.ndarray, compresslevel: int | None = None, rle: bool = False
) -> int:
    """Write ``data`` (already x, y, z) as NIfTI, atomically and deterministically.

    Args:
        path: final ``.nii.gz`` (or ``.nii``) path.
        data: the array; its dtype is kept.
        affine: 4x4 voxel-to-world (nm) matrix.
        compresslevel: gzip level (:data:`DEFAULT_LEVEL` when ``None``). Level 1 is several
            times faster than 9 and barely larger on EM data.
        rle: deflate with ``Z_RLE`` (label maps; zlib only).

    Returns:
        The bytes written.
    """
    raw = memoryview(nifti_image(data, affine).to_bytes())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            if not str(path).endswith(".gz"):
                fh.write(raw)
                return len(raw)
            comp = gzip_compressor(DEFAULT_LEVEL if compresslevel is None else compresslevel, rle)
            return deflate_into(fh, comp, [raw])
