"""Builtin swinunetr template (package marker)."""
