"""Loads the optional compiled extension ``dera_fast._C`` and never lets it break ``import dera_fast``.

The extension is refused (and the package falls back to its Triton/PyTorch paths) when it is missing, broken, or
stale, i.e. built for another torch minor version: subtle ABI drift can segfault even when symbols resolve.
One :class:`ExtensionWarning` says why and names the rebuild command. Set ``DERA_FAST_DISABLE_EXT=1`` to skip
loading on purpose (no warning then).
"""
from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path

import torch

REBUILD_CMD = "pip install --no-build-isolation -e ."
# Written by setup.py's build_ext next to the compiled _C (its build output: the package folder of an editable
# install, build_lib for a wheel), never by a plain build into the source tree; wheels without the extension get
# it from build_py.
BUILD_INFO_FILE = Path(__file__).with_name("_build_info.json")


class ExtensionWarning(UserWarning):
    """The C++/CUDA extension could not be used; dera_fast falls back to Triton/PyTorch."""


def _minor(version: str | None) -> tuple[str, ...]:
    return tuple((version or "").split("+")[0].split(".")[:2])


def _build_info() -> dict | None:
    try:
        return json.loads(BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def _load() -> tuple[object | None, str | None, bool]:
    """Return (module, error, deliberate). ``deliberate`` is True when the extension was turned off on purpose."""
    if os.environ.get("DERA_FAST_DISABLE_EXT", "0") == "1":
        return None, "disabled by DERA_FAST_DISABLE_EXT=1", True
    info = BUILD_INFO
    if info is None:
        return None, (f"not built (no build record {BUILD_INFO_FILE.name}: dera_fast was not installed through "
                      "setup.py)"), False
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
