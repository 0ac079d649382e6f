"""``stages.predict`` output read by an independent OME-Zarr reader (``ome-zarr-py``, zarr v2 line).

``ome-zarr-models`` needs zarr >= 3 (we pin zarr 2.18), so the check uses the reference
reader ``ome_zarr.reader`` 0.9: it must find the multiscale label image, its axes, every
level's scale and translation, and the same voxels as our own read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from stages.predict.predict import run_predict
from tests.test_export_predict import E0, ROI, band, setup  # noqa: F401 - setup is a fixture

ome_reader = pytest.importorskip("ome_zarr.reader", reason="pip install -c constraints.txt ome-zarr (dev extra)")


def test_predict_output_opens_in_ome_zarr_reader(setup, tmp_path: Path) -> None:  # noqa: ANN001, F811
    from ome_zarr.io import parse_url

    wd, group = setup
    out = tmp_path / "pred"
    s = run_predict(wd.root, group, out, roi=ROI, block_t=8, halo=2, array_predictor_factory=band)
    assert s["complete"]
    nodes = list(ome_reader.Reader(parse_url(str(out)))())
    assert nodes, "ome-zarr found no image"
    node = nodes[0]
    assert node.load(ome_reader.Multiscales) is not None and node.load(ome_reader.Label) is not None
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    start = [int(np.ceil(lo / s)) for lo, s in zip((10, 13, 30), E0)]  # first voxel centre inside the ROI
    t0 = [i * s for i, s in zip(start, E0)]
    ours = zarr.open_array(str(out / "s0"), mode="r")[...]
    assert len(node.data) >= 2
    for k, (level, transforms) in enumerate(zip(node.data, node.metadata["coordinateTransformations"])):
        got = {t["type"]: t[t["type"]] for t in transforms}
        assert np.allclose(got["scale"], [s * 2**k for s in E0])
        assert np.allclose(got["translation"], [t + (2**k - 1) * s / 2 for t, s in zip(t0, E0)])
        np.testing.assert_array_equal(np.asarray(level), ours[:: 2**k, :: 2**k, :: 2**k])
