"""Converters from official LARP checkpoints (drop-in loading) and pickle-free copies of teacher checkpoints.
Submodules are imported on first use."""
import importlib

_LAZY = {"from_larp": ".larp", "from_larp_ar": ".larp_ar", "convert_teacher": ".teacher"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
