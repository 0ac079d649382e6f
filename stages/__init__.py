"""The pipeline stages; each ``stages/<name>`` is runnable as ``python -m stages.<name>``."""
