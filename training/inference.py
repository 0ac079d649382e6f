"""Inference of a trained builtin bundle: softmax probabilities on the input grid.

A bundle's ``scripts/infer.py`` (``InferClass``, what MONAI's ``BundleAlgo.get_inferer`` and the
ensemble use) is :class:`BundlePredictor` of the bundle's own copy of this package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .checkpoint import CKPT_BEST, CKPT_FINAL, load_checkpoint
from .distributed import pick_device
from .hparams import find_hyper_parameters, read_hyper_parameters
from .networks import build_network

if TYPE_CHECKING:
    from monai.data import MetaTensor


def bundle_model_dir(config_file: Any) -> Path:
    """The bundle's ``ckpt_path``, moved along when the bundle was copied elsewhere.

    ``hyper_parameters.yaml`` records absolute paths (``bundle_root``, ``ckpt_path``); a bundle
    copied to another directory must predict with its own model, never the original's.
    """
    hp = find_hyper_parameters(config_file)
    cfg = read_hyper_parameters(hp)
    model_dir = Path(cfg["ckpt_path"])
    recorded, here = cfg.get("bundle_root"), hp.resolve().parent.parent
    if recorded and Path(str(recorded)).resolve() != here:
        try:
            model_dir = here / model_dir.relative_to(str(recorded))
        except ValueError:
            pass  # a model folder outside the bundle stays where the config says
    return model_dir


class BundlePredictor:
    """Softmax probabilities of one trained builtin bundle; the model is loaded once.

    Args:
        config_file: the bundle's ``hyper_parameters.yaml`` (or folder, or MONAI's list).
        device: default CUDA when available.
        checkpoint: ``model_best.pt`` (default) or ``model_final.pt``.
        override: ``sw_batch_size``, ``sw_overlap``, ``amp`` for inference.
    """

    def __init__(
        self, config_file: Any, device: str | torch.device | None = None, checkpoint: str = CKPT_BEST, **override: Any
    ) -> None:
        model_dir = bundle_model_dir(config_file)
        path = model_dir / checkpoint
        if not path.is_file():
            path = model_dir / CKPT_FINAL
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: no trained model ({CKPT_BEST} / {CKPT_FINAL}); train it first")
        ck = load_checkpoint(path)
        # the trained config (train: overrides included) decides network, roi and normalisation
        self.cfg = {
            **ck["config"],
            **{k: v for k, v in override.items() if k in ("sw_batch_size", "sw_overlap", "amp")},
        }
        self.device = torch.device(device) if device is not None else pick_device(None)
        self.model = build_network(self.cfg)
        self.model.load_state_dict(ck["state_dict"])
        self.model.to(self.device).eval()
        self._xf: Callable[[str], Any] | None = None  # the load/scale transform, built on first use

    @torch.no_grad()
    def infer(self, image_file: str | os.PathLike[str] | dict[str, Any]) -> MetaTensor:
        """Softmax ``[C, X, Y, Z]`` float32 (MetaTensor with the image's affine) on the input grid."""
        from monai import transforms as T
        from monai.inferers import sliding_window_inference

        if isinstance(image_file, dict):
            image_file = image_file["image"]
        if self._xf is None:
            lo, hi = (float(v) for v in self.cfg["intensity_bounds"])
            self._xf = T.Compose(
                [
                    T.LoadImage(ensure_channel_first=True, image_only=True),
                    T.EnsureType(dtype=torch.float32),
                    T.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
                ]
            )
        img = self._xf(str(image_file))
        amp = bool(self.cfg.get("amp", True)) and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=amp):
            logits = sliding_window_inference(
                img[None].to(self.device),
                [int(r) for r in self.cfg["roi_size"]],
                int(self.cfg.get("sw_batch_size", 1)),
                self.model,
                overlap=float(self.cfg.get("sw_overlap", 0.25)),
                mode="gaussian",
            )
        assert isinstance(logits, torch.Tensor)  # the network returns one tensor in eval mode
        prob = torch.softmax(logits.float(), dim=1)[0].cpu()
        from monai.data import MetaTensor

        plain = prob.as_tensor() if isinstance(prob, MetaTensor) else prob
        return MetaTensor(plain, meta=dict(getattr(img, "meta", {})))  # the image's affine and file name


def predict_probabilities(
    bundle_dir: str | os.PathLike[str], image_path: str | os.PathLike[str], device: str | None = None
) -> np.ndarray:
    """Softmax probabilities ``[C, X, Y, Z]`` (float32 numpy) of one image by one trained bundle.

    Loads the model each call: for many cases create one :class:`BundlePredictor`.
    """
    pred = BundlePredictor(Path(bundle_dir), device=device)
    return np.asarray(pred.infer(image_path).as_tensor().numpy(), dtype=np.float32)
