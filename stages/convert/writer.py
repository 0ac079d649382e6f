"""Fast, deterministic ``.nii.gz`` writing for convert.

``common.nifti.save_nifti`` goes through :mod:`gzip`, which stamps the current time and
the (temporary) file name into the gzip header, so two runs never give identical bytes.
Here the NIfTI bytes are deflated with :mod:`zlib` in gzip mode (mtime 0, no name) and
streamed into an atomic temporary file: reruns are byte-identical, a killed run leaves
only a ``.tmp-`` file, and level 1 is several times faster than higher levels on EM.

Deflate runs in ISA-L (``isal``, same gzip format, ~5-10x less CPU than zlib at the fast
levels; the data of ``bench/bench_convert.py`` spends most of its time there) when it is
installed, else in :mod:`zlib`. zlib levels map onto ISA-L's four: 0 -> stored (zlib),
1 -> 1, 2..5 -> 2, 6..9 -> 3; ``Z_RLE`` (labels) applies to zlib only.

No ``fsync`` per file (it serialises on shared file systems): the rename already makes a
killed process harmless, and convert records each file's size and re-converts a crop
whose files are missing or of another size (what a node crash could leave).
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
BLOCK = 1 << 22  # bytes handed to zlib at a time (bounded extra memory)
VOX_OFFSET = 352  # single-file NIfTI-1: 348-byte header + 4-byte extension flag


def nifti_bytes(block_zyx: np.ndarray, affine: np.ndarray) -> bytes:
    """A single-file NIfTI-1 image of a zarr (z, y, x) block, stored as (x, y, z).

    The transpose is a view; nibabel writes it in Fortran order, i.e. the block's own
    C-order bytes, so no data copy happens before serialisation.
    """
    img = nib.Nifti1Image(block_zyx.transpose(2, 1, 0), affine)
    img.header.set_xyzt_units(xyz="unknown")  # values are nm; NIfTI has no nm unit
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img.to_bytes()


def nifti_header_bytes(block_zyx: np.ndarray, affine: np.ndarray) -> bytes:
    """The 352 bytes in front of the data in :func:`nifti_bytes` (header + empty extension flag).

    Integer data is stored unscaled (slope 1, intercept 0), exactly as nibabel writes it.
    """
    if block_zyx.dtype.kind not in "ui":
        raise TypeError(f"only integer blocks are written unscaled, got {block_zyx.dtype}")
    img = nib.Nifti1Image(block_zyx.transpose(2, 1, 0), affine)
    img.header.set_xyzt_units(xyz="unknown")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr = img.header
    hdr.set_data_offset(VOX_OFFSET)
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    out = hdr.binaryblock + b"\0" * 4  # no extensions
    assert len(out) == VOX_OFFSET
    return out


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


def write_nifti_gz(path: str | Path, block_zyx: np.ndarray, affine: np.ndarray, level: int = 1,
                   rle: bool = False) -> int:
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
    data = memoryview(np.ascontiguousarray(block_zyx)).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer  # C order (z,y,x) == F order (x,y,z)
    comp = gzip_compressor(level, rle)
    written = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            out = comp.compress(nifti_header_bytes(block_zyx, affine))
            fh.write(out)
            written += len(out)
            for off in range(0, len(data), BLOCK):
                out = comp.compress(data[off: off + BLOCK])
                fh.write(out)
                written += len(out)
            out = comp.flush()
            fh.write(out)
            written += len(out)
    return written
