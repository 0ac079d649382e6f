"""Builtin MONAI Auto3DSeg algorithm templates (``<algo>/scripts/algo.py`` + ``configs/``).

A package only so that the templates ship inside the wheel; MONAI's ``BundleGen`` copies this
folder to ``<work_dir>/algorithm_templates`` and imports ``<algo>.scripts.algo.<Algo>Algo``.
"""
