"""Input validation shared across the package (ops, models, generation, data, plotting): clear ValueError /
TypeError messages that name the public function and the argument (``vq_sample: temperature must be ...``).

A public *internal* module: any dera_fast layer may import it; users reach :func:`value_checks` through
:mod:`dera_fast.ops`.

Shape, dtype and device checks are free (metadata only) and always run. Checks on tensor *values* (NaN/inf,
index ranges) need a reduction and, on a GPU, a device-to-host sync; they run in eager mode by default, are skipped
while ``torch.compile`` traces or a CUDA graph is being captured, and can be switched off with
``value_checks(False)`` or ``DERA_FAST_VALUE_CHECKS=0`` (benchmarks do this, and say so).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INV_LIMIT = 2.0 ** 126  # largest accepted 1/temperature (check_inverse_finite)
_state = {"value_checks": os.environ.get("DERA_FAST_VALUE_CHECKS", "1") != "0"}


class value_checks:
    """Turn the data-dependent input checks (NaN, index range) on or off.

    ``value_checks(False)`` switches them off from here on; ``with value_checks(False): ...`` only inside the block
    (the setting in force before is restored on exit, so blocks nest).
    """

    def __init__(self, enabled: bool):
        self._before = _state["value_checks"]
        _state["value_checks"] = bool(enabled)

    def __enter__(self) -> "value_checks":
        return self

    def __exit__(self, *exc) -> None:
        _state["value_checks"] = self._before


def values_checked(x: torch.Tensor) -> bool:
    """Whether data-dependent checks should run now for tensors like ``x``."""
    if not _state["value_checks"] or torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _where(op: str | None) -> str:
    return f"{op}: " if op else ""


def check_tensor(name: str, x, *, ndim: int | Iterable[int] | None = None,
                 dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES, allow_empty: bool = False,
                 op: str | None = None) -> None:
    """Raise TypeError/ValueError unless ``x`` is a tensor of the given rank and dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_where(op)}{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in ndims:
            want = " or ".join(f"{d}-D" for d in ndims)
            raise ValueError(f"{_where(op)}{name} must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if x.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{_where(op)}{name} must have dtype in ({names}), "
                            f"got {str(x.dtype).replace('torch.', '')}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{_where(op)}{name} must not be empty, got shape {tuple(x.shape)}")


def check_same_device(*, op: str | None = None, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{_where(op)}tensors must be on one device, got {desc}")


def check_finite(name: str, x: torch.Tensor, *, op: str | None = None) -> None:
    """Raise ValueError if ``x`` holds NaN or inf (only when value checks are on)."""
    if not values_checked(x) or x.numel() == 0:
        return
    if x.is_floating_point():
        # NOTE: one reduction pass without an N x D bool buffer (10x faster than isfinite(x).all() on the CPU):
        # NaN propagates through min and max, and an inf is one of them
        lo, hi = torch.aminmax(x.detach())
        finite = bool(torch.isfinite(lo) & torch.isfinite(hi))
    else:
        finite = bool(torch.isfinite(x).all())
    if not finite:
        raise ValueError(f"{_where(op)}{name} contains NaN or inf")


def check_index_range(name: str, idx: torch.Tensor, high: int, *, op: str | None = None) -> None:
    """Raise ValueError unless every entry of ``idx`` is in [0, high) (only when value checks are on)."""
    if values_checked(idx) and idx.numel() and not bool(((idx >= 0) & (idx < high)).all()):
        bad = idx[(idx < 0) | (idx >= high)][0].item()
        raise ValueError(f"{_where(op)}{name} must hold indices in [0, {high}), found {bad}")


def check_positive(name: str, value, *, op: str | None = None) -> float:
    """Return ``value`` as a float, raising TypeError/ValueError unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_where(op)}{name} must be a positive float, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{_where(op)}{name} must be a finite number > 0, got {value}")
    return value


def check_inverse_finite(name: str, value, *, op: str | None = None) -> float:
    """Return 1 / ``value`` after checking that ``value`` is a finite number > 0 whose inverse stays finite in the
    fp32 arithmetic of the kernels: 1/T <= 2**126 (T >= 2**-126 ~ 1.18e-38, the smallest normal fp32). NOTE: 1/T
    alone fits fp32 up to ~3.4e38, but the logits are also formed in base 2 (x log2 e) and the loss is a difference
    of two logits (x 2): the factor 4 of headroom keeps both finite."""
    value = check_positive(name, value, op=op)
    inv = 1.0 / value
    if not inv <= INV_LIMIT:
        raise ValueError(f"{_where(op)}{name}={value:g} is too small: 1/{name} = {inv:.3g} would overflow the fp32 "
                         f"logits (need {name} >= {1 / INV_LIMIT:.3g}, i.e. 1/{name} <= 2**126)")
    return inv


def parse_json_object(text: str | bytes, source, what: str = "a JSON object") -> dict:
    """``text`` parsed as a JSON object; ValueError naming ``source`` (a path, or a description) when it is not
    valid JSON (or not UTF-8), or holds something other than ``what``."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{source} must hold {what}, got {type(obj).__name__}")
    return obj


def check_value_range(value_range) -> tuple[float, float]:
    """``value_range`` (the pixel range of a clip) as floats ``(low, high)``, raising ValueError unless high > low."""
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return lo, hi
