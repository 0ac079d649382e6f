"""Import a bundle's own copy of this library under a name unique to its content (stdlib only).

The one loader: a bundle's ``scripts/train.py`` and ``scripts/infer.py`` run this file from the
bundle's copy (by path: MONAI imports ``infer.py`` by file, outside any package), and
:func:`training.vendor.load_bundle_library` runs it from the repository; both give the same
module. The copy is imported as ``cellmap_training_<sha12>`` (of its ``MANIFEST``), so the
repository's ``training`` on ``sys.path`` never stands in for it, and bundles with different
copies share one process (the ensemble).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path

VENDOR_DIR = "cellmap_training"  # <bundle>/scripts/cellmap_training
MANIFEST = "MANIFEST"


class BundleOutdated(Exception):
    """A builtin bundle without its copy of the training library (generated before bundles were
    self-contained): bad input, exit code 2 (rerun bundlegen)."""

    exit_code = 2


def library_alias(manifest_text: bytes) -> str:
    """``cellmap_training_<sha12>``: the module name of a bundle's copy, from its ``MANIFEST``."""
    return f"{VENDOR_DIR}_{hashlib.sha256(manifest_text).hexdigest()[:12]}"


def load(lib: Path, module: str) -> types.ModuleType:
    """``<alias>.<module>`` of the library copy in folder ``lib`` (``<bundle>/scripts/cellmap_training``).

    Raises:
        BundleOutdated: ``lib`` holds no copy (one line: rerun bundlegen).
    """
    lib = Path(lib).resolve()
    if not (lib / MANIFEST).is_file():
        raise BundleOutdated(
            f"{lib.parents[1]}: bundle has no scripts/{VENDOR_DIR} (generated before bundles carried "
            "their training library); rerun bundlegen --force for it"
        )
    name = library_alias((lib / MANIFEST).read_bytes())
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
