"""Builtin segresnet template (package marker)."""
