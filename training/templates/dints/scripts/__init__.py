"""Scripts of the builtin dints template: algo.py (BundleAlgo), train.py, infer.py."""
