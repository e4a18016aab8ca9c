"""SACP (DeRA's Symmetric Alignment-Conflict Projection) = two-task PCGrad, over lists of gradient tensors.

Two gradient lists ``grads_a``, ``grads_b`` (one entry per parameter; ``None`` = a zero gradient, never
materialised) are split into groups (``groups[i]`` = group id of entry i; default one global group). Per group g:

  gram[g]  = (s, |a|^2, |b|^2) = (<a_g, b_g>, <a_g, a_g>, <b_g, b_g>)                 fp32 accumulation
  if s < 0:  a' = a - s / (|b|^2 + eps) * b,   b' = b - s / (|a|^2 + eps) * a            (else a' = a, b' = b)
  a' + b'  = w_a * a + w_b * b,   w_a = 1 - min(s, 0) / (|a|^2 + eps),   w_b = 1 - min(s, 0) / (|b|^2 + eps)

The last line is why SACP is cheap: one multi-tensor Gram pass, a [G, 2] solve on the device, one weighted
combine pass. Everything is branchless (``torch.where``), so nothing syncs the host (KERNELS.md §3).

Backends: ``torch`` = ``torch._foreach_*`` (a handful of launches, no flatten copy); ``triton`` and ``cuda`` =
the multi-tensor kernels of ``kernels/sacp.py`` / ``csrc/sacp_kernels.cu`` (device-side tensor tables, chunked,
ordered per-group reduction without atomics); ``cpp`` = the C++ CPU loop of ``csrc/sacp_cpu.cpp``.
``gradient_gram_ref`` / ``sacp_project_ref`` are the per-tensor loop specs (fp64 when given fp64).
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from .._validation import FLOAT_DTYPES

_ALL_DTYPES = FLOAT_DTYPES + (torch.float64,)
GradList = Sequence[Optional[Tensor]]


def _acc_dtype(tensors) -> torch.dtype:
    """fp64 if any input is fp64 (for the fp64 reference checks), else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# References (the spec): per-tensor loops
# ----------------------------------------------------------------------------------------------------------------
def gradient_gram_ref(grads_a: GradList, grads_b: GradList, groups: Sequence[int], num_groups: int) -> Tensor:
    """Per-group (dot, |a|^2, |b|^2) by a plain loop over tensors.

    Args: grads_a, grads_b: equal-length lists of same-shape tensors or None; groups: group id per entry, in
    [0, num_groups). Returns [num_groups, 3] in fp32 (fp64 if any gradient is fp64).
    """
    acc = _acc_dtype(list(grads_a) + list(grads_b))
    device = next((t.device for t in list(grads_a) + list(grads_b) if t is not None), torch.device("cpu"))
    gram = torch.zeros(num_groups, 3, dtype=acc, device=device)
    for a, b, g in zip(grads_a, grads_b, groups):
        a = a.to(acc) if a is not None else None
        b = b.to(acc) if b is not None else None
        if a is not None and b is not None:
            gram[g, 0] += (a * b).sum()
        if a is not None:
            gram[g, 1] += (a * a).sum()
        if b is not None:
            gram[g, 2] += (b * b).sum()
    return gram


def sacp_coefficients(gram: Tensor, eps: float = 1e-8) -> Tensor:
    """Combine weights [G, 2] = (w_a, w_b) from a Gram [G, 3], so that a' + b' = w_a * a + w_b * b.

    Branchless and 0/0-guarded: a group with s >= 0 (including an untouched group, s = |a|^2 = |b|^2 = 0) gets
    (1, 1); so does a group whose Gram or weights are not finite (e.g. a skipped GradScaler step).
    """
    s, na, nb = gram.unbind(-1)
    conflict = s < 0  # NOTE: s < 0 implies |a|^2 > 0 and |b|^2 > 0 unless they underflowed; den guards that too
    den_a, den_b = na + eps, nb + eps
    w_a = 1 - torch.where(conflict & (den_a > 0), s / torch.where(den_a > 0, den_a, 1), 0)
    w_b = 1 - torch.where(conflict & (den_b > 0), s / torch.where(den_b > 0, den_b, 1), 0)
    w = torch.stack([w_a, w_b], -1)  # [G, 2]
    ok = torch.isfinite(gram).all(-1, keepdim=True) & torch.isfinite(w).all(-1, keepdim=True)
    return torch.where(ok, w, torch.ones_like(w))


def sacp_project_ref(grads_a: GradList, grads_b: GradList, groups: Sequence[int], num_groups: int,
                     eps: float = 1e-8) -> list[Optional[Tensor]]:
    """a' + b' per entry, written literally as the two projections (per-tensor loop).

    Args as in :func:`gradient_gram_ref`. Returns a list of tensors (None where both inputs are None) in the
    promoted fp32/fp64 accumulation dtype.
    """
    gram = gradient_gram_ref(grads_a, grads_b, groups, num_groups)
    s, na, nb = gram.unbind(-1)
    conflict = s < 0
    # coefficient of b in a' and of a in b' (0 where there is no conflict; den > 0 whenever s < 0 and eps > 0)
    c_a = torch.where(conflict, s / torch.where(conflict, nb + eps, 1), 0)
    c_b = torch.where(conflict, s / torch.where(conflict, na + eps, 1), 0)
    ok = torch.isfinite(gram).all(-1) & torch.isfinite(c_a) & torch.isfinite(c_b)
    c_a, c_b = torch.where(ok, c_a, 0), torch.where(ok, c_b, 0)
    out = []
    for a, b, g in zip(grads_a, grads_b, groups):
        if a is None and b is None:
            out.append(None)
            continue
        a = a.to(gram.dtype) if a is not None else torch.zeros_like(b, dtype=gram.dtype)
        b = b.to(gram.dtype) if b is not None else torch.zeros_like(a, dtype=gram.dtype)
        out.append((a - c_a[g] * b) + (b - c_b[g] * a))
    return out


# ----------------------------------------------------------------------------------------------------------------
# torch backend: torch._foreach_* (horizontal launches, no flattened copy)
# ----------------------------------------------------------------------------------------------------------------
def _group_sum(vals: Tensor, groups: Sequence[int], num_groups: int) -> Tensor:
    """vals [n, 3] -> [num_groups, 3], summed in entry order (one-hot matmul: deterministic, no atomics)."""
    if num_groups == 1:
        return vals.sum(0, keepdim=True)
    onehot = torch.zeros(num_groups, len(groups), dtype=vals.dtype)
    onehot[list(groups), list(range(len(groups)))] = 1
    if vals.is_cuda:  # NOTE: pinned + non_blocking, so the host does not wait for the device
        onehot = onehot.pin_memory().to(vals.device, non_blocking=True)
    return onehot.to(vals.device) @ vals


def gradient_gram_foreach(grads_a: GradList, grads_b: GradList, groups: Sequence[int], num_groups: int) -> Tensor:
    """Same contract as :func:`gradient_gram_ref`, with ``torch._foreach_*``.

    Norms: ``_foreach_norm`` (squared) with fp32 (fp64) accumulation. Dots: ``_foreach_mm`` of [1, n] x [n, 1] views
    (no copies). NOTE: for bf16/fp16 pairs the mm result is rounded once per tensor to that dtype (relative
    error ~2^-9 per tensor dot); the triton/cuda backends keep every partial sum in fp32.
    """
    acc = _acc_dtype(list(grads_a) + list(grads_b))
    device = next(t.device for t in list(grads_a) + list(grads_b) if t is not None)
    zero = torch.zeros((), dtype=acc, device=device)
    cols = [[zero] * len(grads_a) for _ in range(3)]
    for k, grads in ((1, grads_a), (2, grads_b)):
        idx = [i for i, t in enumerate(grads) if t is not None]
        if idx:
            # NOTE: _foreach_norm, squared, rather than _foreach_powsum: dynamo cannot trace the latter
            norms = torch._foreach_norm([grads[i] for i in idx], 2, dtype=acc)
            for i, v in zip(idx, torch._foreach_mul(norms, norms)):
                cols[k][i] = v
    both = [i for i, (a, b) in enumerate(zip(grads_a, grads_b)) if a is not None and b is not None]
    if both:
        rows, cs = [], []
        for i in both:
            dt = torch.promote_types(grads_a[i].dtype, grads_b[i].dtype)
            rows.append(grads_a[i].to(dt).reshape(1, -1))  # [1, n_i]
            cs.append(grads_b[i].to(dt).reshape(-1, 1))  # [n_i, 1]
        # NOTE: dynamo cannot trace _foreach_mm; under torch.compile the per-tensor mms are fused by Inductor anyway
        dots = [r @ c for r, c in zip(rows, cs)] if torch.compiler.is_compiling() else torch._foreach_mm(rows, cs)
        for i, v in zip(both, dots):
            cols[0][i] = v.reshape(()).to(acc)
    vals = torch.stack([torch.stack(c) for c in cols], 1)  # [n, 3]
    return _group_sum(vals, groups, num_groups)


def _combine_foreach(out: list[Tensor], grads_a: GradList, grads_b: GradList, groups: Sequence[int],
                     weights: Tensor, accumulate: bool) -> None:
    """out[i] (=|+=) w_a[g_i] a_i + w_b[g_i] b_i with foreach ops; ``weights`` [G, 2] stays on the device."""
    w_a, w_b = weights[:, 0].unbind(0), weights[:, 1].unbind(0)  # G 0-d views each: no launch, no sync
    terms = [None] * len(out)
    for w, grads in ((w_a, grads_a), (w_b, grads_b)):
        idx = [i for i, t in enumerate(grads) if t is not None]
        if not idx:
            continue
        prods = torch._foreach_mul([grads[i].to(out[i].dtype) for i in idx], [w[groups[i]].to(out[i].dtype)
                                                                             for i in idx])
        for i, p in zip(idx, prods):
            terms[i] = p if terms[i] is None else terms[i].add_(p)
    idx = [i for i, t in enumerate(terms) if t is not None]
    if idx:
        dst, src = [out[i] for i in idx], [terms[i] for i in idx]
        torch._foreach_add_(dst, src) if accumulate else torch._foreach_copy_(dst, src)


# ----------------------------------------------------------------------------------------------------------------
# Triton and C++ custom ops
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dera_fast::gradient_gram_triton", mutates_args=())
def _gram_triton(a: list[Optional[Tensor]], b: list[Optional[Tensor]], groups: list[int],
                 num_groups: int) -> Tensor:
    from dera_fast.kernels.sacp import gradient_gram_fwd  # lazy: triton is optional
    return gradient_gram_fwd(a, b, groups, num_groups)


@torch.library.custom_op("dera_fast::sacp_combine_triton", mutates_args=("out",))
def _combine_triton(out: list[Tensor], a: list[Optional[Tensor]], b: list[Optional[Tensor]], groups: list[int],
                    weights: Tensor, accumulate: bool) -> None:
    from dera_fast.kernels.sacp import sacp_combine_fwd
    sacp_combine_fwd(out, a, b, groups, weights, accumulate)


def _fake_gram(a, b, groups, num_groups):
    x = next(t for t in list(a) + list(b) if t is not None)
    return x.new_empty(num_groups, 3, dtype=torch.float32)


def _fake_combine(out, a, b, groups, weights, accumulate):
    return None


_gram_triton.register_fake(_fake_gram)
_combine_triton.register_fake(_fake_combine)
if "dera_fast_C::gradient_gram" in backends.EXT_OPS:
    torch.library.register_fake("dera_fast_C::gradient_gram")(_fake_gram)
    torch.library.register_fake("dera_fast_C::sacp_combine_")(_fake_combine)

def _ext_gram(a, b, groups, num_groups):
    return torch.ops.dera_fast_C.gradient_gram(a, b, groups, num_groups)


def _ext_combine(out, a, b, groups, weights, accumulate):
    torch.ops.dera_fast_C.sacp_combine_(out, a, b, groups, weights, accumulate)


# "cuda" and "cpp" call the same schemas (the dispatcher routes by device)
_GRAM = {"torch": gradient_gram_foreach, "triton": _gram_triton, "cuda": _ext_gram, "cpp": _ext_gram}
_COMBINE = {"torch": _combine_foreach, "triton": _combine_triton, "cuda": _ext_combine, "cpp": _ext_combine}


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _check_lists(grads_a, grads_b, groups, op: str) -> tuple[list, list, list[int], int]:
    """Validate; return (a, b, groups as a list, num_groups)."""
    for name, grads in (("grads_a", grads_a), ("grads_b", grads_b)):
        if isinstance(grads, Tensor) or not isinstance(grads, Sequence):
            raise TypeError(f"{op}: {name} must be a list of tensors (or None), got {type(grads).__name__}")
    a, b = list(grads_a), list(grads_b)
    if len(a) != len(b):
        raise ValueError(f"{op}: grads_a and grads_b must have the same length, got {len(a)} and {len(b)}")
    device = None
    for i, (x, y) in enumerate(zip(a, b)):
        for name, t in ((f"grads_a[{i}]", x), (f"grads_b[{i}]", y)):
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: {name} must be a tensor or None, got {type(t).__name__}")
            if t.dtype not in _ALL_DTYPES:
                raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
            if device is not None and t.device != device:
                raise ValueError(f"{op}: {name} is on {t.device}, the other gradients on {device}")
            device = t.device
        if x is not None and y is not None and x.shape != y.shape:
            raise ValueError(f"{op}: grads_a[{i}] and grads_b[{i}] differ in shape: {tuple(x.shape)} vs "
                             f"{tuple(y.shape)}")
    if groups is None:
        return a, b, [0] * len(a), 1
    if isinstance(groups, Tensor):
        raise TypeError(f"{op}: groups must be a list of ints (host data, so that no device read is needed)")
    try:
        groups = [operator.index(g) for g in groups]
    except TypeError:
        raise TypeError(f"{op}: groups must be a list of ints, got {list(groups)[:8]!r}") from None
    if len(groups) != len(a):
        raise ValueError(f"{op}: groups must have one id per gradient ({len(a)}), got {len(groups)}")
    # NOTE: ids index a [G, 3] buffer, G = max id + 1: bounding them by the number of tensors bounds G
    bad = [g for g in groups if not 0 <= g < len(a)]
    if bad:
        raise ValueError(f"{op}: groups must hold ids in [0, {len(a)}) (one id per gradient, at most one group "
                         f"per gradient), found {bad[0]}")
    return a, b, groups, (max(groups) + 1) if groups else 1


def _check_out(out, a, b, accumulate: bool, op: str) -> list[Optional[Tensor]]:
    """Validate every ``out`` entry against its gradients (before anything is written); allocate missing ones."""
    if out is None:
        out = [None] * len(a)
    elif isinstance(out, Tensor) or not isinstance(out, Sequence):
        raise TypeError(f"{op}: out must be a list of tensors (or None), got {type(out).__name__}")
    else:
        out = list(out)
        if len(out) != len(a):
            raise ValueError(f"{op}: out must have one entry per gradient ({len(a)}), got {len(out)}")
    device = next((t.device for t in a + b if t is not None), None)
    for i, o in enumerate(out):
        if o is None:
            continue
        x = a[i] if a[i] is not None else b[i]
        if not isinstance(o, Tensor) or o.dtype not in _ALL_DTYPES:
            got = o.dtype if isinstance(o, Tensor) else type(o).__name__
            raise TypeError(f"{op}: out[{i}] must be a float32, bfloat16, float16 or float64 tensor or None, "
                            f"got {got}")
        if device is not None and o.device != device:
            raise ValueError(f"{op}: out[{i}] is on {o.device}, the gradients on {device}")
        if x is not None and o.shape != x.shape:
            raise ValueError(f"{op}: out[{i}] has shape {tuple(o.shape)}, the gradients {tuple(x.shape)}")
    for i, o in enumerate(out):  # all entries are valid: only now write anything
        x = a[i] if a[i] is not None else b[i]
        if o is None and x is not None:
            dt = torch.promote_types(x.dtype, (b[i] if a[i] is not None and b[i] is not None else x).dtype)
            out[i] = (torch.zeros_like if accumulate else torch.empty_like)(x, dtype=dt,
                                                                            memory_format=torch.contiguous_format)
        elif o is not None and x is None and not accumulate:
            o.zero_()
    return out


def _pick(op, a, b, backend, extra_ok: bool = True):
    present = [t for t in a + b if t is not None]
    fast_ok = extra_ok and all(t.dtype in FLOAT_DTYPES for t in present)
    shape = {"numel": sum(t.numel() for t in present) // 2 or 1, "tensors": len(present)}
    return backends.pick(op, _GRAM, present[0], backend, shape=shape,
                         supports={"triton": lambda: fast_ok, "cuda": lambda: fast_ok, "cpp": lambda: fast_ok})


def _compact(a, b, groups, backend_name):
    """Drop entries where both gradients are None; make the rest contiguous for the kernels (usually a no-op)."""
    keep = [i for i in range(len(a)) if a[i] is not None or b[i] is not None]
    if backend_name != "torch":
        a = [x.contiguous() if x is not None else None for x in a]
        b = [x.contiguous() if x is not None else None for x in b]
    return keep, [a[i] for i in keep], [b[i] for i in keep], [groups[i] for i in keep]


def gradient_gram(grads_a: GradList, grads_b: GradList, *, groups: Optional[Sequence[int]] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Per-group Gram entries of two gradient lists.

    Args:
        grads_a, grads_b: equal-length lists; entry i is a tensor of any shape (the same shape in both lists)
            or None (a zero gradient, never allocated). fp32, bf16 or fp16 (fp64 on the torch backend only).
        groups: group id per entry, an int in [0, number of entries), host data; None = one global group.
        backend: None (auto), "torch", "triton", "cuda" or "cpp".
    Returns:
        fp32 [G, 3] (fp64 if any input is fp64), G = max(groups) + 1: (<a, b>, |a|^2, |b|^2) per group, with
        fp32 accumulation for every dtype. A group with no present tensor is all zeros.
    """
    a, b, groups, num_groups = _check_lists(grads_a, grads_b, groups, "gradient_gram")
    if all(t is None for t in a + b):
        return torch.zeros(num_groups, 3, dtype=torch.float32)
    name, fn = _pick("gradient_gram", a, b, backend)
    _, a, b, groups = _compact(a, b, groups, name)
    return fn(a, b, groups, num_groups)


def sacp_project(grads_a: GradList, grads_b: GradList, *, groups: Optional[Sequence[int]] = None,
                 eps: float = 1e-8, out: Optional[Sequence[Optional[Tensor]]] = None, accumulate: bool = False,
                 backend: Optional[str] = None) -> list[Optional[Tensor]]:
    """Symmetric per-group conflict projection (two-task PCGrad), returning a' + b' per entry.

    Per group: if <a, b> < 0, a' = a - <a,b>/(|b|^2+eps) b and b' = b - <a,b>/(|a|^2+eps) a; else unchanged.
    Sync-free (the conflict test is a device-side ``torch.where``); groups whose Gram is not finite are left
    unchanged (a' + b' = a + b).

    Args:
        grads_a, grads_b, groups, backend: as in :func:`gradient_gram`.
        eps: the stabiliser added to the squared norms (>= 0; with 0 the 0/0 case is still guarded).
        out: optional list (same length) of destination tensors, e.g. ``[p.grad for p in params]``, on the
            gradients' device with their shape; an entry may be None, then a new tensor is allocated (fp32/bf16/fp16
            of the promoted input dtype). Every entry is checked before anything is written. Must be contiguous on
            the triton/cuda/cpp backends.
        accumulate: add into ``out`` instead of overwriting it.
    Returns:
        list of a' + b' (the ``out`` tensors where given); None where both gradients are None and no ``out``
        entry was given (entries where both are None but ``out`` is given are zeroed unless accumulating).
    """
    op = "sacp_project"
    a, b, groups, num_groups = _check_lists(grads_a, grads_b, groups, op)
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
    out = _check_out(out, a, b, bool(accumulate), op)
    if all(t is None for t in a + b):
        return out
    name, fn = _pick(op, a, b, backend, extra_ok=all(o is None or (o.is_contiguous() and o.dtype in FLOAT_DTYPES)
                                                      for o in out))
    keep, ca, cb, cg = _compact(a, b, groups, name)
    gram = fn(ca, cb, cg, num_groups)
    weights = sacp_coefficients(gram, eps).contiguous()  # [G, 2], fp32 (fp64 for fp64 inputs on torch)
    _COMBINE[name]([out[i] for i in keep], ca, cb, cg, weights, bool(accumulate))
    return out
