"""Builtin dints template (package marker)."""
