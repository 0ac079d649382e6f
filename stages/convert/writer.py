"""Fast, deterministic ``.nii.gz`` writing for convert.

The NIfTI bytes are deflated by :func:`common.nifti.gzip_compressor` (the pipeline's one
deterministic gzip: mtime 0, no name; ISA-L when installed) and streamed from the zarr
block's own memory (no transposed copy, unlike :func:`common.nifti.save_nifti`, which
serialises through nibabel) into an atomic temporary file: reruns are byte-identical,
a killed run leaves only a ``.tmp-`` file, and level 1 is several times faster than higher
levels on EM.

No ``fsync`` per file (it serialises on shared file systems): the rename already makes a
killed process harmless, and convert records each file's size and re-converts a crop
whose files are missing or of another size (what a node crash could leave).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.io import atomic_path
from common.nifti import (  # noqa: F401 - GZIP_BACKEND: bench reads it here
    GZIP_BACKEND,
    deflate_into,
    gzip_compressor,
    nifti_image,
)

VOX_OFFSET = 352  # single-file NIfTI-1: 348-byte header + 4-byte extension flag


def nifti_bytes(block_zyx: np.ndarray, affine: np.ndarray) -> bytes:
    """A single-file NIfTI-1 image of a zarr (z, y, x) block, stored as (x, y, z).

    The transpose is a view; nibabel writes it in Fortran order, i.e. the block's own
    C-order bytes, so no data copy happens before serialisation.
    """
    return nifti_image(block_zyx.transpose(2, 1, 0), affine).to_bytes()


def nifti_header_bytes(block_zyx: np.ndarray, affine: np.ndarray) -> bytes:
    """The 352 bytes in front of the data in :func:`nifti_bytes` (header + empty extension flag).

    Integer data is stored unscaled (slope 1, intercept 0), exactly as nibabel writes it.
    """
    if block_zyx.dtype.kind not in "ui":
        raise TypeError(f"only integer blocks are written unscaled, got {block_zyx.dtype}")
    hdr = nifti_image(block_zyx.transpose(2, 1, 0), affine).header
    hdr.set_data_offset(VOX_OFFSET)
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    out = hdr.binaryblock + b"\0" * 4  # no extensions
    assert len(out) == VOX_OFFSET
    return out


def write_nifti_gz(
    path: str | Path, block_zyx: np.ndarray, affine: np.ndarray, level: int = 1, rle: bool = False
) -> int:
    """Write ``block_zyx`` as ``path`` (``.nii.gz``) atomically; returns the bytes written.

    The bytes deflated are those of :func:`nifti_bytes` (a test checks it), taken from
    the block's own memory, so no copy of the data is made.

    Args:
        path: final file name.
        block_zyx: the (z, y, x) integer array; its dtype is kept.
        affine: voxel (x, y, z) to world (nm) matrix.
        level: gzip level 0..9 (1 = fast; the output is identical for equal inputs).
        rle: deflate with ``Z_RLE`` (faster and smaller for label maps, which are runs;
            poor for EM). Still plain gzip for every reader.
    """
    # C order (z, y, x) is the F order (x, y, z) NIfTI stores: the block's own bytes, no copy
    data = memoryview(np.ascontiguousarray(block_zyx)).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            return deflate_into(fh, gzip_compressor(level, rle), [nifti_header_bytes(block_zyx, affine), data])
