"""Shared code of the cellmap-auto3dseg stages: config, work_dir, markers, I/O, classes."""

__version__ = "0.1.0"
