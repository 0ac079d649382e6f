"""train stage: one MONAI bundle (algorithm x fold) per call; see :mod:`stages.train.train`."""
