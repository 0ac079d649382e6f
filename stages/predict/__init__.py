"""The predict stage: segment a zarr or NIfTI volume with trained bundles (see ``predict.py``)."""
