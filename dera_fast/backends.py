"""The only module that knows backends exist, and the only one that picks one.

Backends (fixed names, also used as pytest ids and benchmark labels):
  ``"cuda"``   the compiled extension ``dera_fast._C`` (CUDA kernels, plus C++ CPU kernels for some ops);
  ``"triton"`` the Triton kernels in ``dera_fast.kernels`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  ``"torch"``  the pure-PyTorch reference of each op (any device).

Selection order for every op call:
  1. the explicit ``backend=`` argument;
  2. ``use_backend(...)`` (innermost context wins), else the ``DERA_FAST_BACKEND`` environment variable;
  3. automatic: ``cuda`` (if the extension has a kernel for the tensor's device), then ``triton`` (CUDA tensors
     only), then ``torch``.
Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1, set before Triton is imported), which
is a testing tool roughly a thousand times slower than the reference: it is used only when asked for explicitly.
A backend asked for explicitly (1 or 2) that cannot run raises :class:`BackendUnavailableError`, saying what is
available and how to get the missing one. Automatic selection falls back silently.

Availability is probed once, at import. Nothing here runs per call except dictionary and set lookups, so
``pick`` is safe inside ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
from typing import Callable, Iterator, Mapping

import torch

from . import _ext

BACKENDS = ("cuda", "triton", "torch")  # automatic priority order
_DEVICE_KEYS = {"CPU": "cpu", "CUDA": "cuda"}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on this device."""


def _probe_triton() -> tuple[bool, str | None]:
    if importlib.util.find_spec("triton") is None:
        return False, None
    try:
        return True, importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return True, "unknown"


def _probe_ext_ops() -> dict[str, frozenset[str]]:
    """Map each registered ``dera_fast_C::<op>`` to the device types it has kernels for."""
    if not _ext.HAS_EXT:
        return {}
    table = {}
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("dera_fast_C::"):
            table[name] = frozenset(dev for key, dev in _DEVICE_KEYS.items()
                                    if torch._C._dispatch_has_kernel_for_dispatch_key(name, key))
    return table


HAS_EXT = _ext.HAS_EXT
HAS_TRITON, TRITON_VERSION = _probe_triton()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EXT_OPS = _probe_ext_ops()
_ENV_BACKEND = os.environ.get("DERA_FAST_BACKEND", "auto").strip().lower() or "auto"
_override: list[str] = []  # stack managed by use_backend()


def _check_name(name: str, what: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what}={name!r}: expected 'auto' or one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op inside the block on backend ``name`` ("auto" restores automatic selection)."""
    _override.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _override.pop()


def _why_not(name: str, op: str, device: str, ext_op: str | None) -> str | None:
    """None if backend ``name`` can run ``op`` on ``device``, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if not HAS_TRITON:
            return "Triton is not installed (pip install 'dera-fast[triton]')"
        if device == "cuda":
            return None
        if device == "cpu" and TRITON_INTERPRET:
            return None
        return (f"Triton runs on CUDA tensors, or on CPU tensors only when TRITON_INTERPRET=1 is set before "
                f"Triton is imported; got a {device} tensor")
    if not HAS_EXT:
        return f"the C++/CUDA extension is not loaded ({_ext.EXT_ERROR}); rebuild with `{_ext.REBUILD_CMD}`"
    if ext_op is None or ext_op not in EXT_OPS:
        return f"the extension has no {op} op (rebuild with `{_ext.REBUILD_CMD}` if it is stale)"
    if device not in EXT_OPS[ext_op]:
        have = ", ".join(sorted(EXT_OPS[ext_op])) or "none"
        hint = (" (build with DERA_FAST_BUILD_EXT=cuda on a machine with a CUDA torch and nvcc)"
                if device == "cuda" else "")
        return f"the extension's {op} has kernels for [{have}], not {device}{hint}"
    return None


def pick(op: str, impls: Mapping[str, Callable], x: torch.Tensor, backend: str | None = None, *,
         ext_op: str | None = None, supports: Mapping[str, Callable[[], bool]] | None = None) -> tuple[str, Callable]:
    """Choose the implementation of ``op`` for an input living on ``x.device``.

    Args:
        op: the op's public name, for messages.
        impls: backend name -> implementation.
        x: a representative input tensor (its device decides).
        backend: the caller's explicit choice, or None.
        ext_op: the ``dera_fast_C::<name>`` schema behind ``impls["cuda"]``.
        supports: backend -> zero-argument predicate saying whether that backend handles these inputs
            (shape limits); checked after availability.
    Returns:
        (backend name, implementation).
    """
    requested = _check_name(backend, "backend") if backend is not None else "auto"
    if requested == "auto":
        requested = _override[-1] if _override else _check_name(_ENV_BACKEND, "DERA_FAST_BACKEND")
    device = x.device.type
    if requested != "auto":
        if requested not in impls:
            raise BackendUnavailableError(f"{op} has no {requested!r} backend; it has {sorted(impls)}")
        why = _why_not(requested, op, device, ext_op)
        if why is None and supports is not None and requested in supports and not supports[requested]():
            why = f"these inputs are outside what its {requested} kernel supports"
        if why is not None:
            usable = [b for b in BACKENDS if b in impls and _why_not(b, op, device, ext_op) is None]
            raise BackendUnavailableError(f"{op}: backend {requested!r} is unavailable: {why}. "
                                          f"Usable here: {usable}")
        return requested, impls[requested]
    for name in BACKENDS:
        if name == "triton" and device != "cuda":  # never the interpreter unless asked for
            continue
        if name in impls and _why_not(name, op, device, ext_op) is None:
            if supports is None or name not in supports or supports[name]():
                return name, impls[name]
    raise BackendUnavailableError(f"{op}: no backend can run on {device}")  # unreachable while "torch" exists


def available(device: str = "cpu") -> list[str]:
    """Backends usable in principle on ``device`` ("cpu" or "cuda"); individual ops may still lack a kernel."""
    out = []
    for name in BACKENDS:
        if name == "cuda":
            if HAS_EXT and any(device in devs for devs in EXT_OPS.values()):
                out.append(name)
        elif _why_not(name, "", device, None) is None:
            out.append(name)
    return out


def info() -> dict:
    """What is installed and usable: versions, build info, backends per device, GPU."""
    cuda_ok = torch.cuda.is_available()
    return {
        "dera_fast": (_ext.BUILD_INFO or {}).get("version", "unknown"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda_ok else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda_ok else None,
        "triton": TRITON_VERSION,
        "triton_interpret": TRITON_INTERPRET,
        "extension_loaded": HAS_EXT,
        "extension_error": _ext.EXT_ERROR,
        "build": _ext.BUILD_INFO,
        "extension_ops": {k.split("::")[1]: sorted(v) for k, v in sorted(EXT_OPS.items())},
        "backends_cpu": available("cpu"),
        "backends_cuda": available("cuda") if cuda_ok else [],
        "env_backend": _ENV_BACKEND,
    }
