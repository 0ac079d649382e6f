"""common.ngff: metadata parsing, the pixel-centre cut arithmetic, never-fetched EM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from numcodecs import Zstd

from common.ngff import (
    Level,
    NeverFetchedError,
    NgffError,
    OffGridError,
    OutOfBoundsError,
    cut_level,
    em_cut,
    find_em_level,
    find_level,
    multiscales_attrs,
    pyramid_issues,
    read_em_block,
    read_multiscales,
)


def _pyr(s0: tuple[float, ...], t0: tuple[float, ...], shape0: tuple[int, ...], k: int) -> Level:
    """Level k of a pyramid following the rule s0 2^k, t0 + (2^k - 1) s0 / 2."""
    f = 2**k
    return Level(
        f"s{k}",
        tuple(s * f for s in s0),
        tuple(t + (f - 1) * s / 2 for t, s in zip(t0, s0)),
        tuple(max(1, n // f) for n in shape0),
    )


def _cut(c: tuple[slice, ...]) -> list[tuple[int, int]]:
    return [(s.start, s.stop) for s in c]


# ---- the worked examples of cellmap-data.md §2 ----------------------------------------
def test_hela2_crop1_label_s0_on_em_s0() -> None:
    label = Level("s0", (2.62, 2.0, 2.0), (3132.21, 899.0, 25863.0), (200, 1000, 1000))
    em = Level("s0", (5.24, 4.0, 4.0), (0.0, 0.0, 0.0), (4000, 10000, 40000))
    assert _cut(em_cut(label, em)) == [(598, 698), (225, 725), (6466, 6966)]


def test_hela2_crop1_label_s1_lands_exactly_on_em_s0() -> None:
    s1 = _pyr((2.62, 2.0, 2.0), (3132.21, 899.0, 25863.0), (200, 1000, 1000), 1)
    em = Level("s0", (5.24, 4.0, 4.0), (0.0, 0.0, 0.0), (4000, 10000, 40000))
    assert s1.scale == (5.24, 4.0, 4.0)
    assert _cut(em_cut(s1, em)) == [(598, 698), (225, 725), (6466, 6966)]


def test_test_crop_558_kidney() -> None:
    label = Level("s0", (4.0, 4.0, 4.0), (146798.0, 44798.0, 41598.0), (600, 600, 600))
    em = Level("s0", (8.0, 8.0, 8.0), (0.0, 0.0, 0.0), (30000, 10000, 10000))
    assert _cut(em_cut(label, em)) == [(18350, 18650), (5600, 5900), (5200, 5500)]


def test_test_crop_985_on_em_s2() -> None:
    em_s2 = _pyr((8.0, 8.0, 8.0), (0.0, 0.0, 0.0), (8000, 8000, 8000 * 4), 2)
    assert em_s2.scale == (32.0, 32.0, 32.0) and em_s2.translation == (12.0, 12.0, 12.0)
    label = Level("s0", (32.0, 32.0, 32.0), (22412.0, 12812.0, 48012.0), (100, 100, 100))
    starts = [s.start for s in em_cut(label, em_s2)]
    assert starts == [700, 400, 1500]


def test_off_grid_and_out_of_bounds_are_refused_never_clamped() -> None:
    em = Level("s0", (6.0, 4.0, 4.0), (0.0, 0.0, 0.0), (40, 64, 48))
    with pytest.raises(OffGridError, match="axis z"):
        em_cut(Level("s0", (6.0, 4.0, 4.0), (1.0, 0.0, 0.0), (4, 4, 4)), em)
    with pytest.raises(OutOfBoundsError, match="axis x cut 46:50"):
        em_cut(Level("s0", (6.0, 4.0, 4.0), (0.0, 0.0, 184.0), (4, 4, 4)), em)
    with pytest.raises(OutOfBoundsError, match="axis y cut -1:3"):
        em_cut(Level("s0", (6.0, 4.0, 4.0), (0.0, -4.0, 0.0), (4, 4, 4)), em)
    # an odd label count at half the EM voxel ends between EM voxels: off-grid
    with pytest.raises(OffGridError):
        em_cut(Level("s0", (3.0, 2.0, 2.0), (58.5, 31.0, 47.0), (7, 12, 10)), em)


def test_cut_level_and_find_levels() -> None:
    em = [_pyr((6.0, 4.0, 4.0), (0.0, 0.0, 0.0), (40, 64, 48), k) for k in range(3)]
    assert pyramid_issues(em) == []
    assert find_em_level(em, (12.0, 8.0, 8.0)).path == "s1"
    assert find_em_level(em, (12.0, 4.0, 4.0)) is None
    assert find_level(em, (None, 16.0, 16.0)).path == "s2"
    box = Level("", (12.0, 8.0, 8.0), (27.0, 26.0, 34.0), (6, 8, 6))
    c = em_cut(box, em[1])
    assert _cut(c) == [(2, 8), (3, 11), (4, 10)]
    assert cut_level(em[1], c).translation == box.translation
    bent = [em[0], Level("s1", (12.0, 8.0, 8.0), (0.0, 0.0, 0.0), (20, 32, 24))]
    assert "pyramid rule" in pyramid_issues(bent)[0]


# ---- metadata ------------------------------------------------------------------------
def _group(tmp: Path, attrs: dict | None, shape: tuple[int, ...] = (4, 6, 8)) -> Path:
    g = tmp / "g"
    g.mkdir()
    (g / ".zgroup").write_text('{"zarr_format": 2}')
    if attrs is not None:
        (g / ".zattrs").write_text(json.dumps(attrs))
    zarr.open_array(
        str(g / "s0"),
        mode="w",
        shape=shape,
        chunks=(2, 3, 4),
        dtype="u1",
        compressor=Zstd(6),
        fill_value=0,
        dimension_separator="/",
    )
    return g


def test_read_multiscales_roundtrip_and_shape(tmp_path: Path) -> None:
    lv = [Level("s0", (2.62, 2.0, 2.0), (3132.21, 899.0, 25863.0), (4, 6, 8))]
    g = _group(tmp_path, multiscales_attrs(lv, "x"))
    assert read_multiscales(g) == lv


@pytest.mark.parametrize(
    "attrs, message",
    [
        (None, "missing .zattrs"),
        ({"cellmap": {}}, "no multiscales"),
        ({"multiscales": [{"version": "0.5", "datasets": []}]}, "version 0.5"),
        ({"multiscales": [{"version": "0.4", "axes": ["x", "y", "z"], "datasets": [{"path": "s0"}]}]}, "axes"),
        (
            {
                "multiscales": [
                    {
                        "version": "0.4",
                        "datasets": [
                            {
                                "path": "s0",
                                "coordinateTransformations": [{"type": "translation", "translation": [0, 0, 0]}],
                            }
                        ],
                    }
                ]
            },
            "scale",
        ),
    ],
)
def test_read_multiscales_errors_are_one_line(tmp_path: Path, attrs: dict | None, message: str) -> None:
    g = _group(tmp_path, attrs)
    with pytest.raises(NgffError, match=message) as ei:
        read_multiscales(g)
    assert "\n" not in str(ei.value) and str(g) in str(ei.value)


def test_multiscale_wide_transform_is_composed(tmp_path: Path) -> None:
    attrs = multiscales_attrs([Level("s0", (1.0, 2.0, 2.0), (0.5, 1.0, 1.0), (4, 6, 8))])
    attrs["multiscales"][0]["coordinateTransformations"] = [
        {"type": "scale", "scale": [2.0, 2.0, 2.0]},
        {"type": "translation", "translation": [10.0, 0.0, 0.0]},
    ]
    lv = read_multiscales(_group(tmp_path, attrs))[0]
    assert lv.scale == (2.0, 4.0, 4.0) and lv.translation == (11.0, 2.0, 2.0)


# ---- never-fetched EM -------------------------------------------------------------------
def test_read_em_block_detects_absent_chunks_and_all_fill(tmp_path: Path) -> None:
    arr = zarr.open_array(
        str(tmp_path / "em"),
        mode="w",
        shape=(8, 8, 8),
        chunks=(4, 4, 4),
        dtype="u1",
        compressor=Zstd(6),
        fill_value=0,
        dimension_separator="/",
    )
    data = (np.arange(8 * 8 * 8) % 200 + 1).astype(np.uint8).reshape(8, 8, 8)
    arr[:4] = data[:4]
    arr[4:, :4, :4] = 0  # written, but all fill value
    np.testing.assert_array_equal(read_em_block(arr, (slice(1, 3), slice(2, 7), slice(0, 8))), data[1:3, 2:7, :])
    with pytest.raises(NeverFetchedError, match="chunks absent"):
        read_em_block(arr, (slice(3, 6), slice(0, 8), slice(0, 8)))
    (tmp_path / "em/1/0/0").write_bytes(
        zarr.open_array(str(tmp_path / "em"))._compressor.encode(np.zeros(64, np.uint8))
    )
    with pytest.raises(NeverFetchedError, match="fill value"):
        read_em_block(arr, (slice(4, 8), slice(0, 4), slice(0, 4)))


def test_convert_writer_bytes_equal_nibabel(tmp_path: Path) -> None:
    """convert's streaming writer deflates exactly nibabel's NIfTI bytes, deterministically."""
    import gzip

    import nibabel as nib

    from common.nifti import zyx_to_affine
    from stages.convert.writer import nifti_bytes, write_nifti_gz

    block = (np.arange(5 * 6 * 7) % 251).astype(np.uint8).reshape(5, 6, 7)
    aff = zyx_to_affine((6.0, 4.0, 4.0), (60.0, 32.0, 48.0))
    write_nifti_gz(tmp_path / "a.nii.gz", block, aff, 1)
    write_nifti_gz(tmp_path / "b.nii.gz", block, aff, 1)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes()) == nifti_bytes(block, aff)
    write_nifti_gz(tmp_path / "r.nii.gz", block, aff, 1, rle=True)  # the label flavour
    assert gzip.decompress((tmp_path / "r.nii.gz").read_bytes()) == nifti_bytes(block, aff)
    img = nib.load(str(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(np.asarray(img.dataobj), block.transpose(2, 1, 0))
    np.testing.assert_array_equal(img.affine, aff)
