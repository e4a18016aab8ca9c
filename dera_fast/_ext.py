"""Loads the optional compiled extension ``dera_fast._C`` and never lets it break ``import dera_fast``.

The extension is refused (and the package falls back to its Triton/PyTorch paths) when it is missing, broken, or
stale, i.e. built for another torch minor version: subtle ABI drift can segfault even when symbols resolve.
One :class:`ExtensionWarning` says why and names the rebuild command. Set ``DERA_FAST_DISABLE_EXT=1`` to skip
loading on purpose (no warning then).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

REBUILD_CMD = "pip install --no-build-isolation -e ."


class ExtensionWarning(UserWarning):
    """The C++/CUDA extension could not be used; dera_fast falls back to Triton/PyTorch."""


def _minor(version: str | None) -> tuple[str, ...]:
    return tuple((version or "").split("+")[0].split(".")[:2])


def _build_info() -> dict | None:
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return None
    return BUILD_INFO


def _load() -> tuple[object | None, str | None, bool]:
    """Return (module, error, deliberate). ``deliberate`` is True when the extension was turned off on purpose."""
    if os.environ.get("DERA_FAST_DISABLE_EXT", "0") == "1":
        return None, "disabled by DERA_FAST_DISABLE_EXT=1", True
    info = BUILD_INFO
    if info is None:
        return None, "no build info found (dera_fast was not installed through setup.py)", False
    if info["ext_kind"] == "none":
        return None, f"not built: {info['ext_reason']}", info["build_mode"] == "0"
    if _minor(info["torch_version"]) != _minor(torch.__version__):
        return None, (f"stale: built for torch {info['torch_version']}, running torch {torch.__version__}"), False
    try:
        module = importlib.import_module("dera_fast._C")
    except (ImportError, OSError) as e:  # missing or broken shared object
        return None, f"failed to load: {type(e).__name__}: {e}", False
    return module, None, False


BUILD_INFO = _build_info()
_C, EXT_ERROR, _DELIBERATE = _load()
HAS_EXT = _C is not None

if not HAS_EXT and not _DELIBERATE:
    warnings.warn(
        f"dera_fast C++/CUDA extension not loaded ({EXT_ERROR}); using the Triton/PyTorch fallbacks. "
        f"Rebuild it with `{REBUILD_CMD}` from the source checkout "
        "(DERA_FAST_BUILD_EXT=cpu|cuda to force a mode).",
        ExtensionWarning,
        stacklevel=2,
    )
