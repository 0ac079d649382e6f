"""Scripts of the builtin segresnet template: algo.py (BundleAlgo), train.py, infer.py."""
