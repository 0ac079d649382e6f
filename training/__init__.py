"""The training library of the builtin algorithm templates, and the templates themselves.

Run time (copied into every generated bundle as ``scripts/cellmap_training`` by
:func:`training.vendor.vendor_into`, so a trained bundle runs the code it was trained with and
needs only torch, MONAI, numpy and PyYAML; these modules import nothing outside this package):

* :mod:`training.trainer` - the public entry: :func:`~training.trainer.train_bundle`,
  :func:`~training.trainer.cli_main`;
* :mod:`training.hparams`, :mod:`training.data`, :mod:`training.loop`, :mod:`training.validation`,
  :mod:`training.checkpoint`, :mod:`training.signals`, :mod:`training.inference`,
  :mod:`training.reporting`, :mod:`training.tracking`, :mod:`training.distributed`,
  :mod:`training.fileio`, :mod:`training.errors`;
* :mod:`training.networks`, :mod:`training.losses`, :mod:`training.sampling`,
  :mod:`training.dints_search`.

Generation time (inside the bundlegen stage, with this repository present; not copied):

* :mod:`training.autoconfig` - hyper-parameters from ``datastats.yaml`` and GPU memory;
* :mod:`training.vendor` - the copy into a bundle; ``training/templates/<algo>/`` - the templates.
"""
