"""Train this bundle: ``python scripts/train.py run --config_file configs/hyper_parameters.yaml [--key value]``.

Works under ``torchrun`` too, and with this repository absent: it runs the bundle's own copy of
the training library (``scripts/cellmap_training``, loaded by its ``loader.py``). Exit 0 when done
(or already done), 2 bad config (or a bundle to regenerate), 1 failed, 75 after a checkpoint on
SIGUSR1/SIGTERM (rerun the same command to resume).

Written into every builtin bundle by bundlegen (``training.vendor``), from ``training/bundle_scripts``.
"""

import importlib.util
import sys
from pathlib import Path

LOADER = Path(__file__).resolve().with_name("cellmap_training") / "loader.py"

if __name__ == "__main__":
    if not LOADER.is_file():
        print(
            f"error: train: {LOADER.parents[2]}: bundle has no scripts/cellmap_training; rerun bundlegen --force for it",
            file=sys.stderr,
        )
        sys.exit(2)
    spec = importlib.util.spec_from_file_location("_cellmap_training_loader", LOADER)
    assert spec is not None and spec.loader is not None
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    sys.exit(loader.load(LOADER.parent, "trainer").cli_main())
