"""dera_fast: kernel-backed PyTorch package for the DeRA and LARP 1D video tokenizers and their AR generator.

Hot paths live in :mod:`dera_fast.ops` (each with a pure-PyTorch reference and Triton / CUDA C++ backends chosen
by :mod:`dera_fast.backends`); models are plain PyTorch on top of them.
"""
from . import backends, ops
from ._ext import ExtensionWarning
from .backends import use_backend

__version__ = "0.1.0"
__all__ = ["ops", "backends", "use_backend", "ExtensionWarning", "__version__"]
