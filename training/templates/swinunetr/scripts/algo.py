"""The swinunetr Auto3DSeg algorithm (builtin template): MONAI looks up ``swinunetr.scripts.algo.SwinunetrAlgo``.

All logic is shared (``training.autoconfig``, imported only when generating); this template contributes only its
defaults in ``configs/hyper_parameters.yaml`` (network and learning rate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.apps.auto3dseg import BundleAlgo

# this template's own defaults (never the filled copy inside a bundle)
DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "hyper_parameters.yaml"


class SwinunetrAlgo(BundleAlgo):
    """swinunetr bundle generator; ``fill_template_config`` writes a resolved hyper_parameters.yaml."""

    def fill_template_config(self, data_stats_filename: str, algo_path: str, **kwargs: Any) -> dict:
        # imported here, not at the top: generation runs inside the bundlegen stage with this
        # repository present, while a generated bundle's algo.py must import with MONAI and
        # torch alone (``algo_from_json`` imports it to predict)
        from training.autoconfig import fill_template

        return fill_template("swinunetr", self.data_list_file, data_stats_filename, algo_path, DEFAULTS, **kwargs)
