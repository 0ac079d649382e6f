"""Parts of the shared trainer used by the builtin algorithm templates.

* :mod:`common.training.autoconfig` - hyper-parameters from ``datastats.yaml`` and GPU memory.
* :mod:`common.training.networks` - the network factories (SegResNetDS, SwinUNETR, DiNTS).
* :mod:`common.training.losses` - Dice+CE / Dice+Focal and per-class Dice that ignore unknown voxels.
* :mod:`common.trainer` - the training loop, checkpoints, resume, signals, inference.
"""
