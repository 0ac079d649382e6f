"""``InferClass`` used by MONAI's ``BundleAlgo.get_inferer``/``predict`` and the ensemble (loads the model once).

MONAI imports this file by path (``spec_from_file_location("InferClass", ...)``); it runs the
bundle's own copy of the training library (``scripts/cellmap_training``, loaded by its
``loader.py``), never the repository's. A bundle without that copy raises ``BundleOutdated``
(exit code 2: rerun bundlegen).

Written into every builtin bundle by bundlegen (``training.vendor``), from ``training/bundle_scripts``.
"""

import importlib.util
from pathlib import Path

LOADER = Path(__file__).resolve().with_name("cellmap_training") / "loader.py"


class _BundleOutdated(Exception):
    exit_code = 2  # bad input: regenerate the bundle


if not LOADER.is_file():
    raise _BundleOutdated(
        f"{LOADER.parents[2]}: bundle has no scripts/cellmap_training; rerun bundlegen --force for it"
    )
_spec = importlib.util.spec_from_file_location("_cellmap_training_loader", LOADER)
assert _spec is not None and _spec.loader is not None
_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loader)


class InferClass(_loader.load(LOADER.parent, "inference").BundlePredictor):  # type: ignore[misc]
    """``InferClass(config_file, **override).infer(image_file)`` -> softmax ``[C, X, Y, Z]``."""
