"""Deprecated alias of :mod:`dera_fast.train.sacp` (the training-time SACP helper moved under ``train/``, so that
it no longer shares a name with the kernels' op, :mod:`dera_fast.ops.sacp`). Every name still resolves here, with a
DeprecationWarning; import from :mod:`dera_fast.train.sacp` instead."""
import importlib
import warnings

_NEW = "dera_fast.train.sacp"
__all__ = ["MODES", "SACP", "sacp_weights"]  # what ``from dera_fast.sacp import *`` gave (each with the warning)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"dera_fast.sacp is deprecated: import {name} from {_NEW}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_NEW), name)
