"""Fused multi-head attention (the tokenizer's joint query/patch attention, cross-attention, AR prefill).

q: [B, H, Lq, D], k/v: [B, H, Lk, D]  ->  out: [B, H, Lq, D] (q's dtype, fp32 accumulation)

Modes: full or causal (bottom-right aligned when Lq != Lk, as FlashAttention), a slice of query rows
(``q_rows``), and varlen (``cu_seqlens``: S independent sequences packed along the sequence dim, one launch).
The fast backends save only the log-sum-exp for the backward; no Lq x Lk buffer is ever stored.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from dera_fast import backends
from dera_fast._validation import check_positive, check_same_device, check_tensor, values_checked

_OP = "attention"

CUDA_HEAD_DIMS = (32, 64, 96, 128)  # head dims the CUDA C++ kernels are instantiated for
TRITON_MAX_HEAD_DIM = 128  # the Triton kernels pad D to a power of two >= 16 with masks

def _visible(q_pos: Tensor, k_pos: Tensor, causal: bool, q_offset: int) -> Tensor:
    """Bool [Lq, Lk]: key j is visible to query i (causal: j <= i + q_offset)."""
    if not causal:
        return torch.ones(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q_pos.device)
    return k_pos[None, :] <= q_pos[:, None] + q_offset


def _dense_ref(q, k, v, scale, causal, q_offset, return_lse, visible=None):
    """softmax(q k^T * scale + mask) v on [..., L, D] tensors; rows with no visible key give 0 (lse -inf).

    ``visible``: an explicit bool [Lq, Lk] mask instead of the (causal, q_offset) one.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if visible is None:
        dev = q.device
        visible = _visible(torch.arange(q.shape[-2], device=dev), torch.arange(k.shape[-2], device=dev), causal,
                           q_offset)
    # NOTE: masked_fill, not an additive -inf: a NaN / inf score of a masked key must not reach the row
    s = s.masked_fill(~visible, float("-inf"))
    # NOTE: subtract a finite row max (0 for fully masked rows) so exp never sees -inf - -inf = NaN.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p / torch.where(denom == 0, torch.ones_like(denom), denom), v)
    if not return_lse:
        return out
    return out, (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for fully masked rows


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False,
                  q_offset: int = 0, cu_seqlens: Tensor | None = None, upcast: bool = True,
                  return_lse: bool = False):
    """The math reference (the spec of every backend). Materialises the Lq x Lk scores.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H, Lk, D] (varlen: [1, H, T, D] packed).
        scale: softmax scale, default D**-0.5.
        causal: key j is visible to query i iff j <= i + q_offset (varlen: q_offset is ignored and each
            sequence is aligned on itself, i.e. the ordinary causal mask).
        cu_seqlens: int32 [S+1] prefix offsets along T; sequences never attend to each other.
        upcast: compute in fp32 (fp64 stays fp64, for gradcheck); False computes in the input dtype (the
            "PyTorch in low precision" baseline of the tolerance rule).
        return_lse: also return the natural-log log-sum-exp, fp32 (or fp64) [B, H, Lq], -inf on fully masked rows.
    Returns:
        out [B, H, Lq, D] in q's dtype (and lse).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    qc, kc, vc = q.to(dt), k.to(dt), v.to(dt)
    if cu_seqlens is None:
        res = _dense_ref(qc, kc, vc, scale, causal, q_offset, return_lse)
    else:
        bounds = cu_seqlens.tolist()  # host sync: the reference loops over sequences
        parts = [_dense_ref(qc[:, :, a:b], kc[:, :, a:b], vc[:, :, a:b], scale, causal, 0, True)
                 for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        res = (torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2))
        res = res if return_lse else res[0]
    if return_lse:
        return res[0].to(q.dtype), res[1].float() if dt != torch.float64 else res[1]
    return res.to(q.dtype)


def _varlen_mask(cu_seqlens: Tensor, total: int, causal: bool) -> Tensor:
    """Bool [T, T] block-diagonal mask of the packed sequences (traceable: no host loop over cu_seqlens)."""
    pos = torch.arange(total, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)  # [T] sequence id of each position
    mask = seg[:, None] == seg[None, :]
    return mask & (pos[None, :] <= pos[:, None]) if causal else mask


def _varlen_by_runs(q, k, v, bounds: list[int], scale, causal):
    """Varlen SDPA as one batched call per run of equal-length sequences: O(sum L_i^2) work where the dense
    block-diagonal mask costs O(T^2) (DeRA packs 2B sequences of two lengths: two calls, ~B times less work)."""
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    outs, i = [], 0
    while i < len(lens):
        j = i
        while j < len(lens) and lens[j] == lens[i]:
            j += 1
        start, n, length = bounds[i], j - i, lens[i]
        if length:
            qkv = [t[0, :, start:start + n * length].unflatten(1, (n, length)).transpose(0, 1)  # [n, H, len, D]
                   for t in (q, k, v)]
            o = _sdpa(*qkv, scale, causal=causal)
            outs.append(o.transpose(0, 1).flatten(1, 2)[None])  # [1, H, n * length, D]
        i = j
    return torch.cat(outs, dim=2) if outs else torch.empty_like(q)


def _sdpa(q, k, v, scale, causal=False):
    """SDPA (no mask, or square causal) with the reference's NaN semantics. NOTE: SDPA's fused kernels treat a row
    whose scores are all NaN (a NaN query, or NaN in every visible key) like a fully masked row and return 0 there;
    the reference (and every other backend) gives NaN. The repair is sync-free, one masked_fill over the rows that
    see a NaN query or key, O(B*H*L*D) extra work."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    bad = q.isnan().any(-1)  # [B, H, Lq]
    k_nan = k.isnan().any(-1)  # [B, H, Lk]
    bad = bad | ((k_nan.cumsum(-1) > 0) if causal else k_nan.any(-1, keepdim=True))  # causal: a NaN key <= i
    return out.masked_fill(bad[..., None], float("nan"))


def _masked_ref(q, k, v, scale, visible):
    """The reference with an explicit bool [Lq, Lk] mask (traceable), in fp32. NOTE: not SDPA with attn_mask: SDPA
    adds the mask as -inf, so a NaN or +inf score of a masked key turns rows that cannot see it into NaN."""
    dt = torch.promote_types(q.dtype, torch.float32)
    return _dense_ref(q.to(dt), k.to(dt), v.to(dt), scale, False, 0, False, visible=visible).to(q.dtype)


def _attention_torch(q, k, v, cu_seqlens, max_seqlen, scale, causal, q_offset):
    """The "torch" backend: SDPA where it is exactly the reference (no mask, or the square causal mask), else the
    reference."""
    if cu_seqlens is not None:
        if not torch.compiler.is_compiling():
            return _varlen_by_runs(q, k, v, cu_seqlens.tolist(), scale, causal)
        return _masked_ref(q, k, v, scale, _varlen_mask(cu_seqlens, q.shape[2], causal))
    if not causal:
        return _sdpa(q, k, v, scale)
    if q_offset == 0 and q.shape[2] == k.shape[2]:
        return _sdpa(q, k, v, scale, causal=True)
    return attention_ref(q, k, v, scale=scale, causal=causal, q_offset=q_offset)


# ---- Triton: forward and backward custom ops with the same contract as the C++ schema in csrc/ops.cpp ----

def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, q_offset):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fake_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal,
              q_offset):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("dera_fast::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor],
                          cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                          causal: bool, q_offset: int) -> tuple[Tensor, Tensor]:
    from dera_fast.kernels.attention import attention_fwd  # lazy: triton is optional
    return attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, q_offset)


@torch.library.custom_op("dera_fast::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
                          max_seqlen_k: int, scale: float, causal: bool,
                          q_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    from dera_fast.kernels.attention import attention_bwd
    return attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         causal, q_offset)


_attention_fwd_triton.register_fake(_fake_fwd)
_attention_bwd_triton.register_fake(_fake_bwd)


def _register_autograd(fwd_op, bwd_op):
    """Wire ``bwd_op`` as the backward of ``fwd_op`` (both follow the attention_fwd/attention_bwd schemas)."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, q_offset = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, q_offset)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)


_register_autograd(_attention_fwd_triton, _attention_bwd_triton)

# ---- CUDA C++ (dera_fast._C): schemas in csrc/ops.cpp; registered only when the extension has them ----
if "dera_fast_C::attention_fwd" in backends.EXT_OPS:
    torch.library.register_fake("dera_fast_C::attention_fwd")(_fake_fwd)
    torch.library.register_fake("dera_fast_C::attention_bwd")(_fake_bwd)
    _register_autograd("dera_fast_C::attention_fwd", torch.ops.dera_fast_C.attention_bwd)


def _kernel_impl(fwd):
    """Adapt a forward op of the attention_fwd schema to the public call: contiguous inputs, output only."""
    def run(q, k, v, cu_seqlens, max_seqlen, scale, causal, q_offset):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        max_q = q.shape[2] if cu_seqlens is None else max_seqlen
        max_k = k.shape[2] if cu_seqlens is None else max_seqlen
        return fwd(q, k, v, cu_seqlens, cu_seqlens, max_q, max_k, scale, causal, q_offset)[0]
    return run


def _ext_fwd(*args):
    return torch.ops.dera_fast_C.attention_fwd(*args)


# no "cpp": the extension has CUDA attention kernels only
_IMPLS = {"torch": _attention_torch, "triton": _kernel_impl(_attention_fwd_triton), "cuda": _kernel_impl(_ext_fwd)}


def _check_cu_seqlens(cu_seqlens, q, k, max_seqlen):
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), op=_OP)
    check_same_device(q=q, cu_seqlens=cu_seqlens, op=_OP)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{_OP}: cu_seqlens must hold S+1 >= 2 offsets, got {cu_seqlens.numel()}")
    if q.shape[0] != 1:
        raise ValueError(f"{_OP}: varlen mode (cu_seqlens) packs sequences as q [1, H, T, D], got batch "
                         f"{q.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{_OP}: varlen mode uses the same cu_seqlens for q and k, so they need the same packed "
                         f"length T, got {q.shape[2]} and {k.shape[2]}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)
                                   or max_seqlen < 1):
        raise ValueError(f"{_OP}: max_seqlen must be a positive int or None, got {max_seqlen!r}")
    if values_checked(cu_seqlens):
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0:
            raise ValueError(f"{_OP}: cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
        if bool((lens < 0).any()):
            raise ValueError(f"{_OP}: cu_seqlens must be non-decreasing")
        if int(cu_seqlens[-1]) != q.shape[2]:
            raise ValueError(f"{_OP}: cu_seqlens[-1] must equal the packed length T={q.shape[2]}, "
                             f"got {int(cu_seqlens[-1])}")
        if max_seqlen is not None and int(lens.max()) > max_seqlen:
            raise ValueError(f"{_OP}: max_seqlen={max_seqlen} is smaller than the longest sequence "
                             f"({int(lens.max())})")


def _row_range(q_rows, lq: int) -> tuple[int, int]:
    if isinstance(q_rows, tuple) and len(q_rows) == 2:
        q_rows = slice(*q_rows)
    if not isinstance(q_rows, slice):
        raise TypeError(f"{_OP}: q_rows must be a slice or a (start, stop) tuple, got {type(q_rows).__name__}")
    start, stop, step = q_rows.indices(lq)
    if step != 1 or stop <= start:
        raise ValueError(f"{_OP}: q_rows must select a non-empty contiguous range of the {lq} query rows, "
                         f"got {q_rows}")
    return start, stop


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False,
              q_rows: slice | tuple[int, int] | None = None, cu_seqlens: Tensor | None = None,
              max_seqlen: int | None = None, backend: str | None = None) -> Tensor:
    """Scaled dot-product attention, differentiable in q, k and v.

    Args:
        q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; fp32, bf16 or fp16 (all three the same), Lq != Lk allowed.
        scale: softmax scale, default D**-0.5.
        causal: query i sees key j iff j <= i + (Lk - Lq) (bottom-right alignment, as FlashAttention).
        q_rows: a slice (or (start, stop) tuple) of query rows: only those rows are computed and returned;
            with ``causal`` row i of the slice keeps its absolute position start + i.
        cu_seqlens: varlen mode. int32 [S+1] prefix offsets over T with q, k, v packed as [1, H, T, D]; the S
            sequences attend only within themselves (causal: per-sequence causal mask). Not combinable with q_rows.
        max_seqlen: longest sequence in varlen mode. If None it is read from cu_seqlens, which costs a
            device-to-host sync (and a graph break under torch.compile): pass it in hot loops.
        backend: "torch", "triton", "cuda" or None (automatic; see dera_fast.backends). No C++ CPU kernel.
    Returns:
        out: [B, H, Lq, D] ([B, H, stop - start, D] with q_rows), q's dtype. NaN and inf in the inputs are not
        rejected: they propagate to the rows that see them, as in :func:`attention_ref`.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, op=_OP)
    check_same_device(q=q, k=k, v=v, op=_OP)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_OP}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, h, lq, d), lk = q.shape, k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != b or t.shape[1] != h or t.shape[3] != d:
            raise ValueError(f"{_OP}: {name} must be [B={b}, H={h}, Lk, D={d}] like q, got {tuple(t.shape)}")
    if v.shape[2] != lk:
        raise ValueError(f"{_OP}: k and v must have the same length, got {lk} and {v.shape[2]}")
    scale = d ** -0.5 if scale is None else check_positive("scale", scale, op=_OP)
    causal = bool(causal)
    if cu_seqlens is not None:
        if q_rows is not None:
            raise ValueError(f"{_OP}: q_rows cannot be combined with cu_seqlens (slice each sequence's rows "
                             "instead)")
        _check_cu_seqlens(cu_seqlens, q, k, max_seqlen)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync, documented above
        max_seqlen = min(max_seqlen, q.shape[2])  # a loose bound is fine; the kernels size their grid by it
        q_offset = 0
    else:
        start, stop = (0, lq) if q_rows is None else _row_range(q_rows, lq)
        q_offset = start + (lk - lq)
        if (start, stop) != (0, lq):
            q = q[:, :, start:stop]  # [B, H, rows, D]
    # shape class for the automatic rules: the torch path needs an explicit Lq x Lk mask for varlen and for
    # causal attention that is not the plain square case
    masked = causal and (q_offset != 0 or q.shape[2] != lk)
    _, fn = backends.pick(_OP, _IMPLS, q, backend, shape={"varlen": cu_seqlens is not None, "masked": masked},
                          supports={"cuda": lambda: d in CUDA_HEAD_DIMS,
                                    "triton": lambda: d <= TRITON_MAX_HEAD_DIM})
    return fn(q, k, v, cu_seqlens, max_seqlen, scale, causal, q_offset)

