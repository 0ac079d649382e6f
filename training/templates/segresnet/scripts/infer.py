"""``InferClass`` used by MONAI's ``BundleAlgo.get_inferer``/``predict`` and the ensemble (loads the model once).

MONAI imports this file by path (``spec_from_file_location("InferClass", ...)``); it runs the
bundle's own copy of the training library, never the repository's.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path


def _library(module: str) -> types.ModuleType:
    """``<module>`` of this bundle's own copy of the training library (``scripts/cellmap_training``).

    Imported under a name unique to the copy's content (``cellmap_training_<sha12>`` of its
    MANIFEST, as ``training.vendor.library_alias``), so the repository's ``training`` on
    ``sys.path`` never stands in for it and bundles with different copies share one process.
    The same function is in ``train.py`` and ``infer.py``: MONAI loads each file on its own.
    """
    lib = Path(__file__).resolve().parent / "cellmap_training"
    if not (lib / "MANIFEST").is_file():
        raise _BundleOutdated(
            f"{lib.parents[1]}: bundle has no scripts/cellmap_training (generated before bundles "
            "carried their training library); rerun bundlegen --force for it"
        )
    name = "cellmap_training_" + hashlib.sha256((lib / "MANIFEST").read_bytes()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, lib / "__init__.py", submodule_search_locations=[str(lib)])
        assert spec is not None and spec.loader is not None
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        try:
            spec.loader.exec_module(pkg)
        except BaseException:
            del sys.modules[name]
            raise
    return importlib.import_module(f"{name}.{module}")


class _BundleOutdated(Exception):
    exit_code = 2  # bad input: regenerate the bundle


class InferClass(_library("inference").BundlePredictor):  # type: ignore[misc]
    """``InferClass(config_file, **override).infer(image_file)`` -> softmax ``[C, X, Y, Z]``."""
