"""Copy the training library into a bundle, and load a bundle's copy (generation / stage side).

:func:`vendor_into` (called by bundlegen for every builtin bundle) copies the run-time modules
of this package (everything but :mod:`training.autoconfig`, this module and the templates) to
``<bundle>/scripts/cellmap_training/`` with a ``VERSION`` (the package version) and a
``MANIFEST`` (``sha256  file`` lines, ``sha256sum -c`` format), as MONAI copies its templates
into a bundle, and writes the bundle's ``scripts/train.py`` / ``scripts/infer.py`` (one source:
``training/bundle_scripts/``). Those import that copy through its ``loader.py`` under a name
unique to its content (:func:`training.loader.library_alias`), so a trained bundle predicts with
the code it was trained with, two bundles with different copies live in one process, and the
repository's ``training`` on ``sys.path`` can never stand in for it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

from training.loader import MANIFEST, VENDOR_DIR, BundleOutdated, library_alias, load

VERSION = "VERSION"
PACKAGE = "cellmap-auto3dseg"
HERE = Path(__file__).resolve().parent
GENERATION_ONLY = frozenset({"autoconfig.py", "vendor.py"})  # need the repository; never run inside a bundle
BUNDLE_SCRIPTS = HERE / "bundle_scripts"  # train.py, infer.py: the same in every builtin bundle
SCRIPTS = ("train.py", "infer.py")
__all__ = ["BundleOutdated", "library_alias", "load_bundle_library", "vendor_into"]


def runtime_files() -> list[Path]:
    """The modules a bundle needs at train/predict time (sorted)."""
    return sorted(p for p in HERE.glob("*.py") if p.name not in GENERATION_ONLY)


def package_version() -> str:
    """The installed ``cellmap-auto3dseg`` version, ``unknown`` when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vendor_into(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Copy the run-time library into ``<bundle>/scripts/cellmap_training`` (replacing an old copy)
    and write the bundle's ``scripts/train.py`` and ``scripts/infer.py``.

    Written into temporary names and renamed, so a killed bundlegen never leaves half a copy.

    Returns:
        ``{"version", "sha256" (of MANIFEST), "alias", "files": {name: sha256}}`` for the bundle record.
    """
    scripts = Path(bundle_dir) / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    dest = scripts / VENDOR_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{VENDOR_DIR}-", dir=scripts))
    try:
        files = {}
        for src in runtime_files():
            shutil.copyfile(src, tmp / src.name)
            files[src.name] = _sha256(tmp / src.name)
        manifest = "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items())).encode()
        (tmp / MANIFEST).write_bytes(manifest)
        version = package_version()
        (tmp / VERSION).write_text(version + "\n")
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for script in SCRIPTS:
        part = scripts / f".tmp-{script}"
        shutil.copyfile(BUNDLE_SCRIPTS / script, part)
        os.replace(part, scripts / script)
    return {
        "version": version,
        "sha256": hashlib.sha256(manifest).hexdigest(),
        "alias": library_alias(manifest),
        "files": files,
    }


def has_library(bundle_dir: str | os.PathLike[str]) -> bool:
    """Whether a bundle carries its copy of the library."""
    return (Path(bundle_dir) / "scripts" / VENDOR_DIR / MANIFEST).is_file()


def load_bundle_library(bundle_dir: str | os.PathLike[str], module: str = "trainer") -> types.ModuleType:
    """``<alias>.<module>`` of a bundle's own copy (what its ``scripts/train.py`` runs).

    Raises:
        BundleOutdated: the bundle has no ``scripts/cellmap_training`` (one line: rerun bundlegen).
    """
    return load(Path(bundle_dir) / "scripts" / VENDOR_DIR, module)
