"""Scripts of the builtin swinunetr template: algo.py (BundleAlgo), train.py, infer.py."""
