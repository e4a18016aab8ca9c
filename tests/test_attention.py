"""dera_fast.ops.attention: every backend against the fp32 reference (forward, dq, dk, dv), modes, registration.

Triton runs under TRITON_INTERPRET=1 on CPU here, so its shapes stay small; L = 1023 and 2048 run on the torch
backend (and on every backend on a GPU).
"""

import pytest
import torch
from conftest import HAS_CUDA, assert_close_to_ref, require

from dera_fast import backends
from dera_fast.ops import attention, attention_ref

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
# (B, H, Lq, Lk, D): awkward lengths, cross-attention both ways, B*H = 1, every head dim the kernels cover.
SHAPES = [
    pytest.param(1, 1, 1, 1, 32, id="B1H1-L1-D32"),
    pytest.param(1, 2, 17, 17, 16, id="B1H2-L17-D16"),
    pytest.param(2, 1, 113, 113, 64, id="B2H1-L113-D64"),
    pytest.param(1, 1, 17, 113, 96, id="B1H1-Lq17-Lk113-D96"),
    pytest.param(1, 1, 113, 17, 128, id="B1H1-Lq113-Lk17-D128"),
    pytest.param(1, 2, 1, 113, 64, id="B1H2-Lq1-Lk113-D64"),
    pytest.param(1, 1, 33, 70, 24, id="B1H1-Lq33-Lk70-D24"),
]
LONG_SHAPES = [  # too slow for the Triton interpreter; torch backend on CPU, every backend on a GPU
    pytest.param(1, 1, 1023, 1023, 64, id="B1H1-L1023-D64", marks=pytest.mark.slow),
    pytest.param(1, 1, 2048, 2048, 64, id="B1H1-L2048-D64", marks=pytest.mark.slow),
    pytest.param(1, 1, 256, 2048, 128, id="B1H1-Lq256-Lk2048-D128", marks=pytest.mark.slow),
]


def _inputs(b, h, lq, lk, d, dtype, device):
    q = torch.randn(b, h, lq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, lk, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, lk, d, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _check_against_ref(out, dx, q, k, v, dout, rows=slice(None), **ref_kw):
    """Compare out and (dq, dk, dv) with the fp32 reference and the same-dtype PyTorch baseline."""
    refs = {}
    for upcast in (True, False):
        r = attention_ref(q, k, v, upcast=upcast, **ref_kw)[:, :, rows]
        refs[upcast] = (r, *_grads(r, (q, k, v), dout))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        got = out if i == 0 else dx[i - 1]
        assert_close_to_ref(name, got, refs[True][i], refs[False][i])


def _run_case(backend, b, h, lq, lk, d, dtype, causal, heavy=False):
    device = require(backend, "attention", dtype=dtype, heavy=heavy, head_dim=d)
    q, k, v = _inputs(b, h, lq, lk, d, dtype, device)
    out = attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    dout = torch.randn_like(out)
    _check_against_ref(out, _grads(out, (q, k, v), dout), q, k, v, dout, causal=causal, q_offset=lk - lq)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, h, lq, lk, d", SHAPES)
def test_attention_matches_ref(backend, b, h, lq, lk, d, dtype, causal):
    _run_case(backend, b, h, lq, lk, d, dtype, causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, h, lq, lk, d", LONG_SHAPES)
def test_attention_long_matches_ref(backend, b, h, lq, lk, d, dtype, causal):
    _run_case(backend, b, h, lq, lk, d, dtype, causal, heavy=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_varlen_equals_separate_calls(backend, dtype, causal):
    device = require(backend, "attention", dtype=dtype, head_dim=32)
    lens = [17, 0, 40, 1, 55]  # includes an empty sequence
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = _inputs(1, 2, sum(lens), sum(lens), 32, dtype, device)
    out = attention(q, k, v, causal=causal, cu_seqlens=cu, max_seqlen=max(lens), backend=backend)
    dout = torch.randn_like(out)
    dx = _grads(out, (q, k, v), dout)
    parts, dparts = [], []
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > a:
            o = attention(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], causal=causal, backend=backend)
            parts.append(o)
            dparts.append(_grads(o, (q, k, v), dout[:, :, a:e]))
    sep = torch.cat(parts, dim=2)
    sep_dx = [sum(g[i] for g in dparts) for i in range(3)]
    assert_close_to_ref("out: varlen vs separate calls", out, sep, None)
    for name, g, g_sep in zip(("dq", "dk", "dv"), dx, sep_dx):
        assert_close_to_ref(f"{name}: varlen vs separate calls", g, g_sep, None)
    _check_against_ref(out, dx, q, k, v, dout, causal=causal, cu_seqlens=cu)
    # max_seqlen=None reads it from cu_seqlens (a host sync) and gives the same result
    assert_close_to_ref("max_seqlen=None", attention(q, k, v, causal=causal, cu_seqlens=cu, backend=backend), out,
                        None)


@pytest.mark.parametrize("rows", [slice(5, 30), (0, 7), slice(-3, None), slice(None, 1)],
                         ids=["5:30", "tuple0:7", "-3:", ":1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_q_rows_equals_slicing(backend, causal, rows):
    device = require(backend, "attention", head_dim=64)
    q, k, v = _inputs(1, 2, 40, 57, 64, torch.float32, device)
    full = attention(q, k, v, causal=causal, backend=backend)
    out = attention(q, k, v, causal=causal, q_rows=rows, backend=backend)
    sl = slice(*rows) if isinstance(rows, tuple) else rows
    assert_close_to_ref("q_rows vs slicing", out, full[:, :, sl], None)
    dout = torch.randn_like(out)
    _check_against_ref(out, _grads(out, (q, k, v), dout), q, k, v, dout, rows=sl, causal=causal, q_offset=57 - 40)


def test_fully_masked_rows_give_zero(backend):
    # causal with Lq > Lk (bottom-right): the first Lq - Lk query rows see no key at all
    device = require(backend, "attention", head_dim=32)
    q, k, v = _inputs(1, 2, 50, 20, 32, torch.float32, device)
    out = attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(out[:, :, :30], torch.zeros_like(out[:, :, :30]))
    dq, dk, dv = _grads(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[:, :, :30], torch.zeros_like(dq[:, :, :30]))


def test_backward_is_deterministic(backend):
    device = require(backend, "attention", head_dim=64)
    q, k, v = _inputs(1, 2, 70, 90, 64, torch.float32, device)
    dout = torch.randn(1, 2, 70, 64, device=device)
    runs = [_grads(attention(q, k, v, causal=True, backend=backend), (q, k, v), dout) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_CUDA, reason="peak memory is measured on the GPU")
def test_no_quadratic_buffer(backend):
    """fwd + bwd at L = 4096 stays far below one fp32 L x L score matrix per head (kernels only)."""
    if backend == "torch":
        pytest.skip("the torch reference materialises the scores by design")
    device = require(backend, "attention", dtype=torch.bfloat16, head_dim=64)
    q, k, v = _inputs(1, 4, 4096, 4096, 64, torch.bfloat16, device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _grads(attention(q, k, v, backend=backend), (q, k, v), torch.ones_like(q))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 4096 * 4096 * 4  # one head's fp32 scores: 64 MiB


# ---- Triton op internals: lse, split-KV, registration ----

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_triton_split_kv_and_lse(causal, splits):
    from dera_fast.kernels.attention import attention_fwd
    device = require("triton", "attention")
    q, k, v = (t.detach() for t in _inputs(1, 2, 9, 200, 16, torch.float32, device))
    out, lse = attention_fwd(q, k, v, None, None, 9, 200, 0.3, causal, 200 - 9 - 50, num_splits=splits)
    out_ref, lse_ref = attention_ref(q, k, v, scale=0.3, causal=causal, q_offset=200 - 9 - 50, return_lse=True)
    assert_close_to_ref("out", out, out_ref, None)
    assert_close_to_ref("lse", lse, lse_ref, None)


def _op_args(device, varlen):
    """Arguments of the attention_fwd schema (csrc/ops.cpp): q, k, v, cu_q, cu_k, max_q, max_k, scale, causal,
    q_offset."""
    q, k, v = (t.detach() for t in _inputs(1, 2, 21, 21 if varlen else 30, 32, torch.float32, device))
    if varlen:
        cu = torch.tensor([0, 8, 8, 21], dtype=torch.int32, device=device)
        return q, k, v, cu, cu, 13, 13, 0.25, True, 0
    return q, k, v, None, None, 21, 30, 0.25, True, 4


def _fwd_bwd_ops(backend):
    """The (forward, backward) custom ops behind ``backend``, skipping where they do not exist."""
    device = require(backend, "attention", head_dim=32)
    if backend == "torch":
        pytest.skip("the torch backend is plain PyTorch (no custom op)")
    ns = torch.ops.dera_fast_C if backend in ("cuda", "cpp") else torch.ops.dera_fast
    suffix = "_triton" if backend == "triton" else ""
    return device, getattr(ns, "attention_fwd" + suffix), getattr(ns, "attention_bwd" + suffix)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_fwd_op_out_and_lse(backend, varlen):
    device, fwd, _ = _fwd_bwd_ops(backend)
    args = _op_args(device, varlen)
    out, lse = fwd(*args)
    q, k, v, cu = args[0], args[1], args[2], args[3]
    out_ref, lse_ref = attention_ref(q, k, v, scale=args[7], causal=True, q_offset=args[9], cu_seqlens=cu,
                                     return_lse=True)
    assert_close_to_ref("out", out, out_ref, None)
    assert_close_to_ref("lse", lse, lse_ref, None)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck(backend, varlen):
    device, fwd, bwd = _fwd_bwd_ops(backend)
    args = _op_args(device, varlen)
    q, k, v = (t.clone().requires_grad_() for t in args[:3])
    torch.library.opcheck(fwd.default, (q, k, v, *args[3:]))
    out, lse = fwd(*args)
    torch.library.opcheck(bwd.default, (torch.randn_like(out), *args[:3], out, lse, *args[3:]))


def test_gradcheck_reference():
    kw = dict(dtype=torch.float64, requires_grad=True)
    q, k, v = torch.randn(1, 2, 5, 4, **kw), torch.randn(1, 2, 7, 4, **kw), torch.randn(1, 2, 7, 4, **kw)
    assert torch.autograd.gradcheck(lambda a, b, c: attention_ref(a, b, c, causal=True, q_offset=1), (q, k, v))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    k2, v2 = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: attention_ref(a, b, b, causal=True, cu_seqlens=cu), (k2, v2))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_torch_compile_fullgraph(backend, varlen):
    device = require(backend, "attention", head_dim=32)
    q, k, v = _inputs(1, 2, 24, 24, 32, torch.float32, device)
    cu = torch.tensor([0, 10, 24], dtype=torch.int32, device=device) if varlen else None

    def fn(q, k, v):
        return attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=14 if varlen else None, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    dx = torch.autograd.grad(out.sum(), (q, k, v))
    out_e = fn(q, k, v)
    dx_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    assert_close_to_ref("compiled out", out, out_e, None)
    for name, a, b in zip(("dq", "dk", "dv"), dx, dx_e):
        assert_close_to_ref(f"compiled {name}", a, b, None)


# ---- dispatch and bad input ----

def test_head_dim_limits():
    q = torch.randn(1, 1, 8, 160)
    assert_close_to_ref("auto, D=160", attention(q, q, q), attention_ref(q, q, q), None)  # auto falls back to torch
    with pytest.raises(backends.BackendUnavailableError):
        attention(q, q, q, backend="triton")


def _bad(name):
    q = torch.randn(1, 2, 8, 16)
    kw = dict(q=q, k=torch.randn(1, 2, 6, 16), v=torch.randn(1, 2, 6, 16))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    cases = {
        "q-rank": (dict(q=q[0]), ValueError, "q must be 4-D"),
        "k-heads": (dict(k=torch.randn(1, 3, 6, 16)), ValueError, "k must be"),
        "v-dim": (dict(v=torch.randn(1, 2, 6, 8)), ValueError, "v must be"),
        "k-batch": (dict(k=torch.randn(2, 2, 6, 16)), ValueError, "k must be"),
        "v-len": (dict(v=torch.randn(1, 2, 5, 16)), ValueError, "same length"),
        "q-int": (dict(q=q.long()), TypeError, "q must have dtype"),
        "mixed-dtype": (dict(k=kw["k"].half()), TypeError, "one dtype"),
        "device": (dict(k=torch.randn(1, 2, 6, 16, device="meta")), ValueError, "one device"),
        "scale": (dict(scale=-1.0), ValueError, "scale"),
        "q_rows-type": (dict(q_rows=3), TypeError, "q_rows"),
        "q_rows-empty": (dict(q_rows=slice(5, 5)), ValueError, "q_rows"),
        "q_rows-step": (dict(q_rows=slice(0, 8, 2)), ValueError, "q_rows"),
        "q_rows+varlen": (dict(k=q, v=q, q_rows=slice(0, 2), cu_seqlens=cu), ValueError, "q_rows"),
        "cu-dtype": (dict(k=q, v=q, cu_seqlens=cu.long()), TypeError, "cu_seqlens"),
        "cu-rank": (dict(k=q, v=q, cu_seqlens=cu[None]), ValueError, "cu_seqlens"),
        "cu-start": (dict(k=q, v=q, cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, "start"),
        "cu-decreasing": (dict(k=q, v=q, cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError,
                          "non-decreasing"),
        "cu-last": (dict(k=q, v=q, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, "T=8"),
        "cu-lk": (dict(cu_seqlens=cu), ValueError, "same packed length"),
        "cu-batch": (dict(q=q.expand(2, -1, -1, -1), k=q.expand(2, -1, -1, -1), v=q.expand(2, -1, -1, -1),
                          cu_seqlens=cu), ValueError, "batch"),
        "max_seqlen": (dict(k=q, v=q, cu_seqlens=cu, max_seqlen=3), ValueError, "max_seqlen"),
        "backend": (dict(backend="nope"), ValueError, "backend"),
    }
    upd, exc, match = cases[name]
    return {**kw, **upd}, exc, match


@pytest.mark.parametrize("name", [
    "q-rank", "k-heads", "v-dim", "k-batch", "v-len", "q-int", "mixed-dtype", "device", "scale", "q_rows-type",
    "q_rows-empty", "q_rows-step", "q_rows+varlen", "cu-dtype", "cu-rank", "cu-start", "cu-decreasing", "cu-last",
    "cu-lk", "cu-batch", "max_seqlen", "backend"])
def test_bad_input(name):
    kw, exc, match = _bad(name)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    with pytest.raises(exc, match=match):
        attention(q, k, v, **kw)
