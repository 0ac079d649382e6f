"""Parts of the shared trainer used by the builtin algorithm templates.

* :mod:`training.autoconfig` - hyper-parameters from ``datastats.yaml`` and GPU memory.
* :mod:`training.networks` - the network factories (SegResNetDS, SwinUNETR, DiNTS).
* :mod:`training.losses` - Dice+CE / Dice+Focal and per-class Dice that ignore unknown voxels.
* :mod:`training.trainer` - the training loop, checkpoints, resume, signals, inference.
"""
