"""dera_fast: kernel-backed PyTorch package for the DeRA and LARP 1D video tokenizers and their AR generator.

Hot paths live in :mod:`dera_fast.ops` (each with a pure-PyTorch reference and Triton / CUDA C++ backends chosen
by :mod:`dera_fast.backends`); models are plain PyTorch on top of them. Models, data, metrics and plotting load on
first use, so ``import dera_fast`` stays light.
"""
import importlib

from . import backends, ops
from ._ext import ExtensionWarning
from .backends import BackendUnavailableError, use_backend

__version__ = "0.1.0"

_LAZY = {
    "TokenizerConfig": "dera_fast.models.config",
    "LARPTokenizer": "dera_fast.models.larp",
    "DeRATokenizer": "dera_fast.models.dera",
    "VectorQuantizer": "dera_fast.models.quantizer",
    "GeneratorConfig": "dera_fast.models.ar",
    "ARGenerator": "dera_fast.models.ar",
    "set_progress_bar_config": "dera_fast._progress",  # one switch for the library's progress bars
}
_SUBMODULES = ("models", "convert", "data", "metrics", "viz", "train", "generate", "eval")
_DEPRECATED_SUBMODULES = ("sacp",)  # dera_fast.sacp: an alias of dera_fast.train.sacp that warns on use


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES or name in _DEPRECATED_SUBMODULES:
        return importlib.import_module(f"dera_fast.{name}")
    raise AttributeError(f"module 'dera_fast' has no attribute {name!r}")


__all__ = ["ops", "backends", "use_backend", "BackendUnavailableError", "ExtensionWarning", "__version__", *_LAZY,
           *_SUBMODULES]
