"""The two scripts bundlegen writes into every builtin bundle's ``scripts/`` (``train.py``, ``infer.py``).

A package only so that they ship inside the wheel; they are copied, never imported from here.
"""
