"""Vector-quantisation codebook search: nearest code, stochastic sample, codebook cross-entropy.

All three take rows ``z``/``h``: [N, D] and a codebook [K, D] in fp32, bf16 or fp16, and do their distance / logit
arithmetic in fp32. The fast backends (``triton``, ``cuda``, and the C++ CPU kernel ``cpp`` for ``vq_nearest``)
stream the codebook in tiles and never hold the N x K score matrix: extra memory is O(N + K*D).

LARP's naive path, which the benchmarks compare against, materialises N x K fp32 (1 GiB at N = 32768, K = 8192).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from .._validation import check_finite, check_index_range, check_inverse_finite, check_same_device, check_tensor

# NOTE: the torch path scores rows in fixed-size chunks, zero-padded to exactly _CHUNK rows, so every call runs the
# same GEMM shape: a row's id then never depends on what else is in the batch (BLAS picks kernels by shape), and
# memory stays O(_CHUNK * K).
_CHUNK = 256


def _upcast(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _prepare_codebook(codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """fp32 codebook [K, D] and bias [K] such that argmin_k (bias - 2 z.c_k) is the nearest code."""
    cb = codebook.detach().float()
    if metric == "cosine":
        cb = F.normalize(cb, dim=1)
        return cb.contiguous(), torch.zeros(cb.shape[0], device=cb.device, dtype=torch.float32)
    return cb.contiguous(), (cb * cb).sum(1)


def _chunks(z: Tensor):
    """Yield (start, stop, rows padded to _CHUNK) over the rows of ``z``."""
    for s in range(0, z.shape[0], _CHUNK):
        rows = z[s:s + _CHUNK]
        if rows.shape[0] < _CHUNK:
            rows = F.pad(rows, (0, 0, 0, _CHUNK - rows.shape[0]))
        yield s, min(s + _CHUNK, z.shape[0]), rows


# ----------------------------------------------------------------------------------------------------------------
# References (the spec; also the "torch" backend)
# ----------------------------------------------------------------------------------------------------------------
def vq_nearest_ref(z: Tensor, codebook: Tensor, bias: Tensor) -> Tensor:
    """argmin_k (bias[k] - 2 <z, c_k>) in fp32, first index on ties.

    Args: z [N, D] any float dtype; codebook [K, D] fp32; bias [K] fp32 (|c_k|^2 for l2, 0 for cosine with a
    normalised codebook). Returns int64 [N].
    """
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for s, e, rows in _chunks(z):
        score = torch.addmm(bias, rows.float(), codebook.t(), alpha=-2.0)  # [_CHUNK, K]
        out[s:e] = score[: e - s].argmin(1)
    return out


def vq_sample_ref(z: Tensor, codebook: Tensor, u: Tensor, inv_temperature: float) -> Tensor:
    """Inverse-CDF sample of softmax_k(cos(z, c_k) * inv_temperature) at the uniforms ``u``.

    Args: z [N, D]; codebook [K, D] fp32, l2-normalised; u [N] fp32 in [0, 1). Returns int64 [N]: the first k whose
    cumulative probability exceeds u (clamped to the last code with non-zero probability).
    """
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for s, e, rows in _chunks(z):
        logits = F.normalize(rows.float(), dim=1) @ codebook.t() * inv_temperature  # [_CHUNK, K]
        cdf = logits[: e - s].softmax(1).cumsum(1)
        idx = torch.searchsorted(cdf, (u[s:e] * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        out[s:e] = idx.clamp_max(codebook.shape[0] - 1)
    return out


def codebook_ce_ref(h: Tensor, codebook: Tensor, target: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of logits <h, c_k> * inv_temperature (h, codebook already normalised).

    Args: h [N, D]; codebook [K, D] (same dtype); target int64 [N]. Returns (loss [N], lse [N]) in fp32 (fp64 for
    fp64 inputs, so gradcheck works).
    """
    logits = _upcast(h) @ _upcast(codebook).t() * inv_temperature  # [N, K]
    lse = logits.logsumexp(1)
    return lse - logits.gather(1, target[:, None]).squeeze(1), lse


# ----------------------------------------------------------------------------------------------------------------
# Triton backend: one custom op per kernel so torch.compile(fullgraph=True) traces through them
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("dera_fast::vq_nearest_triton", mutates_args=())
def _vq_nearest_triton(z: Tensor, codebook: Tensor, bias: Tensor) -> Tensor:
    from dera_fast.kernels.vq import vq_nearest_fwd  # lazy: triton is optional

    return vq_nearest_fwd(z, codebook, bias)


@torch.library.custom_op("dera_fast::vq_sample_triton", mutates_args=())
def _vq_sample_triton(z: Tensor, codebook: Tensor, u: Tensor, inv_temperature: float) -> Tensor:
    from dera_fast.kernels.vq import vq_sample_fwd

    return vq_sample_fwd(z, codebook, u, inv_temperature)


@torch.library.custom_op("dera_fast::codebook_ce_triton", mutates_args=())
def _codebook_ce_triton(h: Tensor, codebook: Tensor, target: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
    from dera_fast.kernels.vq import codebook_ce_fwd

    return codebook_ce_fwd(h, codebook, target, inv_temperature)


@torch.library.custom_op("dera_fast::codebook_ce_bwd_triton", mutates_args=())
def _codebook_ce_bwd_triton(grad_loss: Tensor, h: Tensor, codebook: Tensor, target: Tensor, lse: Tensor,
                            inv_temperature: float) -> tuple[Tensor, Tensor]:
    from dera_fast.kernels.vq import codebook_ce_bwd

    return codebook_ce_bwd(grad_loss, h, codebook, target, lse, inv_temperature)


def _fake_ids(z, *args):
    return z.new_empty(z.shape[0], dtype=torch.long)


def _fake_ce(h, codebook, target, inv_temperature):
    return h.new_empty(h.shape[0], dtype=torch.float32), h.new_empty(h.shape[0], dtype=torch.float32)


def _fake_ce_bwd(grad_loss, h, codebook, target, lse, inv_temperature):
    return h.new_empty(h.shape, dtype=torch.float32), codebook.new_empty(codebook.shape, dtype=torch.float32)


_vq_nearest_triton.register_fake(_fake_ids)
_vq_sample_triton.register_fake(_fake_ids)
_codebook_ce_triton.register_fake(_fake_ce)
_codebook_ce_bwd_triton.register_fake(_fake_ce_bwd)


def _ce_setup_context(ctx, inputs, output):
    h, codebook, target, inv_temperature = inputs
    ctx.save_for_backward(h, codebook, target, output[1])
    ctx.inv_temperature = inv_temperature


def _ce_backward_with(bwd_op):
    def backward(ctx, grad_loss, grad_lse):
        h, codebook, target, lse = ctx.saved_tensors
        dh, dc = bwd_op(grad_loss.float().contiguous(), h, codebook, target, lse, ctx.inv_temperature)
        return dh.to(h.dtype), dc.to(codebook.dtype), None, None

    return backward


_codebook_ce_triton.register_autograd(_ce_backward_with(_codebook_ce_bwd_triton), setup_context=_ce_setup_context)

# ----------------------------------------------------------------------------------------------------------------
# Extension backends (dera_fast._C): "cuda" (CUDA kernels) and "cpp" (C++ CPU kernels) call the same schema; the
# dispatcher routes by device. Fake / autograd registrations only when the extension provides the ops.
# ----------------------------------------------------------------------------------------------------------------
if "dera_fast_C::vq_nearest" in backends.EXT_OPS:
    torch.library.register_fake("dera_fast_C::vq_nearest")(_fake_ids)
if "dera_fast_C::vq_sample" in backends.EXT_OPS:
    torch.library.register_fake("dera_fast_C::vq_sample")(_fake_ids)
if "dera_fast_C::codebook_ce_fwd" in backends.EXT_OPS:
    torch.library.register_fake("dera_fast_C::codebook_ce_fwd")(_fake_ce)
    torch.library.register_fake("dera_fast_C::codebook_ce_bwd")(_fake_ce_bwd)
    torch.library.register_autograd(
        "dera_fast_C::codebook_ce_fwd",
        _ce_backward_with(lambda *a: torch.ops.dera_fast_C.codebook_ce_bwd(*a)), setup_context=_ce_setup_context)

def _ext_nearest(z, cb, bias):
    return torch.ops.dera_fast_C.vq_nearest(z, cb, bias)


def _ext_sample(z, cb, u, inv_t):
    return torch.ops.dera_fast_C.vq_sample(z, cb, u, inv_t)


def _ext_ce(h, cb, target, inv_t):
    return torch.ops.dera_fast_C.codebook_ce_fwd(h, cb, target, inv_t)


_NEAREST = {"torch": vq_nearest_ref, "triton": _vq_nearest_triton, "cuda": _ext_nearest, "cpp": _ext_nearest}
_SAMPLE = {"torch": vq_sample_ref, "triton": _vq_sample_triton, "cuda": _ext_sample, "cpp": _ext_sample}
_CE = {"torch": codebook_ce_ref, "triton": _codebook_ce_triton, "cuda": _ext_ce, "cpp": _ext_ce}
_TRITON_MAX_D = 256  # one D tile per program (registers / shared memory); wider codes fall back


def _check_pair(z: Tensor, codebook: Tensor, zname: str, op: str) -> None:
    check_tensor(zname, z, ndim=2, op=op)
    check_tensor("codebook", codebook, ndim=2, op=op)
    check_same_device(op=op, **{zname: z, "codebook": codebook})
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"{op}: {zname} has D={z.shape[1]} but codebook has D={codebook.shape[1]}; they must match")
    check_finite(zname, z, op=op)
    check_finite("codebook", codebook, op=op)


def _shape(x: Tensor, codebook: Tensor) -> dict:
    """The shape class the automatic backend rules see (backends.AUTO_RULES)."""
    return {"N": x.shape[0], "K": codebook.shape[0], "D": x.shape[1]}


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------
def vq_nearest(z: Tensor, codebook: Tensor, *, metric: str = "l2", backend: str | None = None) -> Tensor:
    """Index of the nearest codebook entry for every row.

    Args:
        z: [N, D] fp32 / bf16 / fp16.
        codebook: [K, D] fp32 / bf16 / fp16.
        metric: "l2" (min |z - c|^2) or "cosine" (max cos(z, c)).
        backend: None (automatic), "torch", "triton", "cuda" or "cpp".
    Returns:
        int64 [N]. Distances are computed in fp32 whatever the input dtype; ties go to the lowest index; a row's id
        does not depend on the other rows in the batch (same device, dtype and backend).
    """
    _check_pair(z, codebook, "z", "vq_nearest")
    if metric not in ("l2", "cosine"):
        raise ValueError(f"vq_nearest: metric must be 'l2' or 'cosine', got {metric!r}")
    cb, bias = _prepare_codebook(codebook, metric)
    z = z.detach().contiguous()
    _, fn = backends.pick("vq_nearest", _NEAREST, z, backend, shape=_shape(z, cb),
                          supports={"triton": lambda: z.shape[1] <= _TRITON_MAX_D})
    return fn(z, cb, bias)


def vq_sample(z: Tensor, codebook: Tensor, *, temperature: float, generator: torch.Generator | None = None,
              backend: str | None = None) -> Tensor:
    """LARP's stochastic VQ: draw k ~ softmax_k(cos(z, c_k) / temperature) for every row.

    Args:
        z: [N, D] fp32 / bf16 / fp16.
        codebook: [K, D] fp32 / bf16 / fp16 (normalised internally).
        temperature: > 0, with 1/temperature finite in fp32 (LARP uses 0.03).
        generator: a torch.Generator on z's device, for reproducible draws.
        backend: None (automatic), "torch", "triton" or "cuda" (no C++ CPU kernel).
    Returns:
        int64 [N]. Exact inverse-CDF sampling with one uniform per row drawn from ``generator``; the fast paths run
        two passes over the codebook (row max / normaliser, then the running CDF) and never store N x K.
    """
    _check_pair(z, codebook, "z", "vq_sample")
    inv_t = check_inverse_finite("temperature", temperature, op="vq_sample")
    if generator is not None and generator.device.type != z.device.type:
        raise ValueError(f"vq_sample: generator is on {generator.device} but z is on {z.device}; they must match")
    cb, _ = _prepare_codebook(codebook, "cosine")
    z = z.detach().contiguous()
    u = torch.rand(z.shape[0], generator=generator, device=z.device, dtype=torch.float32)
    _, fn = backends.pick("vq_sample", _SAMPLE, z, backend, shape=_shape(z, cb),
                          supports={"triton": lambda: z.shape[1] <= _TRITON_MAX_D})
    return fn(z, cb, u, inv_t)


def codebook_cross_entropy(h: Tensor, codebook: Tensor, target: Tensor, *, temperature: float = 1.0,
                           reduction: str = "mean", backend: str | None = None) -> Tensor:
    """Cross-entropy of logits cos(h, c_k) / temperature over the codebook (LARP's AR-prior loss).

    Args:
        h: [N, D] predictions (any norm; normalised internally).
        codebook: [K, D] (normalised internally; pass it detached to keep gradients out of it, as LARP does).
        target: int64 [N] code ids in [0, K).
        temperature: > 0, with 1/temperature finite in fp32.
        reduction: "mean", "sum" or "none".
        backend: None (automatic), "torch", "triton" or "cuda" (no C++ CPU kernel).
    Returns:
        A scalar (mean/sum) or [N] fp32 losses. Differentiable w.r.t. ``h`` and ``codebook``; the fast paths keep
        only per-row log-sum-exps (O(N)) for the backward and never store the N x K logits.
    """
    op = "codebook_cross_entropy"
    _check_pair(h, codebook, "h", op)
    check_tensor("target", target, ndim=1, dtypes=(torch.int64, torch.int32), op=op)
    if target.shape[0] != h.shape[0]:
        raise ValueError(f"{op}: target has {target.shape[0]} entries but h has {h.shape[0]} rows")
    if target.device != h.device:
        raise ValueError(f"{op}: target is on {target.device} but h is on {h.device}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_index_range("target", target, codebook.shape[0], op=op)
    inv_t = check_inverse_finite("temperature", temperature, op=op)
    dtype = torch.promote_types(h.dtype, codebook.dtype)
    # normalisation stays in autograd (O(N*D + K*D)); the fused op sees unit rows of one dtype
    hn = F.normalize(h.to(dtype), dim=1).contiguous()
    cn = F.normalize(codebook.to(dtype), dim=1).contiguous()
    _, fn = backends.pick(op, _CE, hn, backend, shape=_shape(hn, cn),
                          supports={"triton": lambda: h.shape[1] <= _TRITON_MAX_D})
    loss, _ = fn(hn, cn, target.long().contiguous(), inv_t)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
