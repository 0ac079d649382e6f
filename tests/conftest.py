"""Shared pytest fixtures. Area-specific fixtures live in their own test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep BLAS/torch thread pools small: CI has 2 cores and tests run stages in subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture
def blobs_work_dir(tmp_path: Path) -> Path:
    """A work dir holding a small converted-looking blob dataset (3 classes + unknown 255)."""
    from tools.synthetic import make_blobs_dataset

    wd = tmp_path / "work"
    make_blobs_dataset(wd, n_cases=6, shape=(40, 40, 24), n_classes=3, n_val=2, seed=0)
    (wd / "pipeline.yaml").write_text("classes: [ecs, pm, mito_mem]\nunknown_label: 255\nresolution_nm: 8\n")
    return wd
