"""The label block rule and the EM block mean, on hand-made blocks and against each other."""

from __future__ import annotations

import numpy as np
import pytest

from common.ngff import block_mean_u8
from stages.convert.pooling import pool_ids, pool_labels

U = 255


def test_block_rule_by_hand() -> None:
    # 2x2x2 blocks (8 voxels) along x: majority, tie -> smaller value, > half unknown -> unknown,
    # exactly half unknown -> majority of the known voxels
    blocks = [
        ([3, 3, 3, 1, 1, 0, 0, 0], 0),  # 3 x 3 vs 3 x 0: tie, 0 (background) wins
        ([3, 3, 3, 3, 1, 1, 0, 0], 3),  # majority
        ([U, U, U, U, U, 2, 2, 2], U),  # 5 of 8 unknown
        ([U, U, U, U, 2, 2, 2, 1], 2),  # 4 of 8 unknown: not most; known majority 2
        ([U, U, U, U, 1, 2, 1, 2], 1),  # tie among known: smaller value
        ([7] * 8, 7),
    ]
    codes = np.zeros((2, 2, 2 * len(blocks)), np.uint8)
    for i, (vals, _) in enumerate(blocks):
        codes[:, :, 2 * i : 2 * i + 2] = np.array(vals, np.uint8).reshape(2, 2, 2)
    want = np.array([w for _, w in blocks], np.uint8).reshape(1, 1, -1)
    np.testing.assert_array_equal(pool_labels(codes, (2, 2, 2), U), want)
    np.testing.assert_array_equal(pool_ids(codes, (2, 2, 2), np.arange(256, dtype=np.uint8), U), want)


@pytest.mark.parametrize("factor", [(2, 2, 2), (1, 2, 2), (4, 4, 4), (3, 1, 2)])
@pytest.mark.parametrize("cache_bytes", [1 << 19, 64])
def test_fast_path_equals_the_plain_rule(
    factor: tuple[int, int, int], cache_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pool_ids (uniform blocks skipped, in cache-sized z slabs) == pool_labels(lut[ids]), smooth and noisy maps."""
    import stages.convert.pooling as pooling

    monkeypatch.setattr(pooling, "CACHE_BYTES", cache_bytes)
    rng = np.random.default_rng(sum(factor))
    lut = np.zeros(256, np.uint8)
    lut[[1, 2, 3, 28]] = [1, 2, 3, 14]
    lut[[50, 255]] = U  # a group id and the declared unknown
    shape = tuple(6 * f for f in factor)
    smooth = rng.choice(np.array([0, 1, 2, 3, 28, 35, 50], np.uint8), size=(3, 3, 3)).repeat(2 * factor[0], 0)
    smooth = smooth.repeat(2 * factor[1], 1).repeat(2 * factor[2], 2)[: shape[0], : shape[1], : shape[2]]
    noisy = rng.choice(np.array([0, 1, 2, 50, 255], np.uint8), size=shape)
    for ids in (np.ascontiguousarray(smooth), noisy):
        np.testing.assert_array_equal(pool_ids(ids, factor, lut, U), pool_labels(lut[ids], factor, U))


def test_block_mean_rounds_half_up() -> None:
    a = np.array([0, 1, 2, 3, 250, 251, 255, 255], np.uint8).reshape(1, 2, 4)
    # blocks (1,2,2): [0,1,250,251] mean 125.5 -> 126; [2,3,255,255] mean 128.75 -> 129
    np.testing.assert_array_equal(block_mean_u8(a, (1, 2, 2)), [[[126, 129]]])
    big = np.full((4, 4, 4), 255, np.uint8)  # 64-voxel sums do not overflow
    assert block_mean_u8(big, (4, 4, 4)).item() == 255


@pytest.mark.parametrize("factor", [(1, 1, 1), (2, 2, 2), (3, 1, 2)])
def test_an_invalid_id_is_found_even_as_a_minority_voxel(factor: tuple[int, int, int]) -> None:
    from stages.convert.pooling import InvalidIds

    lut = np.arange(256, dtype=np.uint8)
    lut[200] = 254
    ids = np.ones(tuple(4 * f for f in factor), np.uint8)
    pool_ids(ids, factor, lut, U, invalid=254)  # clean: no error
    ids[1, 2, 3] = 200  # one voxel of a block that is otherwise 1
    with pytest.raises(InvalidIds):
        pool_ids(ids, factor, lut, U, invalid=254)
