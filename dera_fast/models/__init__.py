"""Models: the LARP and DeRA tokenizers, their config, the alignment teachers, the quantiser and the AR generator.

Submodules load on first use.
"""
import importlib

_LAZY = {
    "TokenizerConfig": ".config",
    "PRESETS": ".config",
    "LARPTokenizer": ".larp",
    "DeRATokenizer": ".dera",
    "AlignTargets": ".dera",
    "GPTCPrior": ".prior",
    "Teacher": ".teachers",
    "RandomTeacher": ".teachers",
    "ImageViTTeacher": ".teachers",
    "VideoViTTeacher": ".teachers",
    "compute_targets": ".teachers",
    "VectorQuantizer": ".quantizer",
    "ARGenerator": ".ar",
    "GeneratorConfig": ".ar",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
