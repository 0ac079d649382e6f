"""``InferClass`` used by MONAI's ``BundleAlgo.predict`` and the ensemble (loads the model once)."""

from training.trainer import BundlePredictor


class InferClass(BundlePredictor):
    """``InferClass(config_file, **override).infer(image_file)`` -> softmax ``[C, X, Y, Z]``."""
