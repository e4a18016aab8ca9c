"""Input validation shared by every op: clear ValueError/TypeError messages that name the argument.

Shape, dtype and device checks are free (metadata only) and always run. Checks on tensor *values* (NaN/inf,
index ranges) need a reduction and, on a GPU, a device-to-host sync; they run in eager mode by default, are skipped
while ``torch.compile`` traces or a CUDA graph is being captured, and can be switched off with
``value_checks(False)`` or ``DERA_FAST_VALUE_CHECKS=0`` (benchmarks do this, and say so).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_value_checks = [os.environ.get("DERA_FAST_VALUE_CHECKS", "1") != "0"]


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the data-dependent input checks (NaN, index range) on or off inside the block."""
    _value_checks.append(bool(enabled))
    try:
        yield
    finally:
        _value_checks.pop()


def values_checked(x: torch.Tensor) -> bool:
    """Whether data-dependent checks should run now for tensors like ``x``."""
    if not _value_checks[-1] or torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def check_tensor(name: str, x, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES, allow_empty: bool = False) -> None:
    """Raise TypeError/ValueError unless ``x`` is a tensor of the given rank and dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in ndims:
            want = " or ".join(f"{d}-D" for d in ndims)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device, got {desc}")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError if ``x`` holds NaN or inf (only when value checks are on)."""
    if values_checked(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_index_range(name: str, idx: torch.Tensor, high: int) -> None:
    """Raise ValueError unless every entry of ``idx`` is in [0, high) (only when value checks are on)."""
    if values_checked(idx) and idx.numel() and not bool(((idx >= 0) & (idx < high)).all()):
        bad = idx[(idx < 0) | (idx >= high)][0].item()
        raise ValueError(f"{name} must hold indices in [0, {high}), found {bad}")


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float, raising TypeError/ValueError unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value
