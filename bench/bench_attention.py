"""Attention benchmarks (issue 4): our backends against every SDPA backend and FlexAttention, same run, bf16.

    pytest bench/bench_attention.py --benchmark-json=bench/results/<gpu>/attention.json

GPU only. Shapes: the LARP encoder (B=8, H=12, L=2048, D=64); DeRA's two encoder streams (L=512 and L=1792)
separately and as one varlen launch (baseline: two SDPA calls); the decoder's last layer with q_rows (1024 of 2048
rows); cross-attention Lq=256 / Lk=4096 and Lq=64 / Lk=4096 (the K/V-bandwidth case). Each runs fwd, bwd and
fwd+bwd. extra_info: TFLOP/s (4*B*H*Lq*Lk*D forward, x2.5 backward, x3.5 both), peak memory, K/V GB/s for the
cross-attention shapes. The ratio to the best SDPA backend is computed from the JSON, not from the run order:

    python bench/plot_bench.py attention.json --md table.md --baseline 'attention=sdpa-*'
"""
import pytest
import torch
from conftest import HAS_CUDA
from torch.nn.attention import SDPBackend, sdpa_kernel

from dera_fast import backends
from dera_fast.ops import attention

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark")

B, H, D = 8, 12, 64
# name -> (kind, Lq, Lk, extra); kind "varlen" packs DeRA's two streams of every clip into one call
SHAPES = {
    "larp-enc-L2048": ("self", 2048, 2048, None),
    "dera-app-L512": ("self", 512, 512, None),
    "dera-mot-L1792": ("self", 1792, 1792, None),
    "dera-varlen-512+1792": ("varlen", None, None, (512, 1792)),
    "decoder-q_rows-1024of2048": ("q_rows", 2048, 2048, slice(1024, 2048)),
    "cross-Lq256-Lk4096": ("self", 256, 4096, None),
    "cross-Lq64-Lk4096": ("self", 64, 4096, None),
}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
OURS = [b for b in ("triton", "cuda") if backends.why_unavailable(b, "attention", "cuda") is None]
PROVIDERS = [*SDPA, "flex", "torch", *OURS]


def _flops(kind, lq, lk, extra):
    if kind == "varlen":
        return sum(4 * B * H * n * n * D for n in extra)
    rows = len(range(*extra.indices(lq))) if kind == "q_rows" else lq
    return 4 * B * H * rows * lk * D


def _make_inputs(kind, lq, lk, extra):
    kw = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if kind == "varlen":
        total = B * sum(extra)
        q, k, v = (torch.randn(1, H, total, D, **kw) for _ in range(3))
        cu = torch.tensor([0] + [n for _ in range(B) for n in extra], device="cuda").cumsum(0).to(torch.int32)
        return q, k, v, cu
    return torch.randn(B, H, lq, D, **kw), torch.randn(B, H, lk, D, **kw), torch.randn(B, H, lk, D, **kw), None


def _flex(kind, extra, q, k, v, cu):
    """FlexAttention (torch.compile-generated Triton) computing the same attention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    if kind == "varlen":
        # NOTE: flex's varlen form: one packed sequence with a block-diagonal (document) mask
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device="cuda"), cu.diff().long())
        mask = create_block_mask(lambda b, h, i, j: doc[i] == doc[j], None, None, q.shape[2], k.shape[2])
        return lambda: flex(q, k, v, block_mask=mask)
    return lambda: flex(q[:, :, extra] if kind == "q_rows" else q, k, v)


def _sdpa(provider, kind, extra, q, k, v):
    """One SDPA backend; the varlen baseline is one SDPA call per stream length on dense [B, H, L_s, D] inputs."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if kind == "varlen":
        streams = [tuple(torch.randn(B, H, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                         for _ in range(3)) for n in extra]

        def fwd():
            with sdpa_kernel(SDPA[provider]):
                return tuple(sdpa(*s) for s in streams)  # one [B, H, L_s, D] output per stream
        return fwd, tuple(t for s in streams for t in s)

    def fwd():
        with sdpa_kernel(SDPA[provider]):
            return sdpa(q[:, :, extra] if kind == "q_rows" else q, k, v)
    return fwd, (q, k, v)


def _fn(provider, kind, lq, lk, extra):
    """(forward callable, the leaf tensors its backward differentiates)."""
    q, k, v, cu = _make_inputs(kind, lq, lk, extra)
    if provider in SDPA:
        return _sdpa(provider, kind, extra, q, k, v)
    if provider == "flex":
        return _flex(kind, extra, q, k, v, cu), (q, k, v)
    max_len = max(extra) if kind == "varlen" else None
    rows = extra if kind == "q_rows" else None
    return (lambda: attention(q, k, v, q_rows=rows, cu_seqlens=cu, max_seqlen=max_len, backend=provider)), (q, k, v)


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
def bench_attention(run_bench, shape, mode, provider):
    kind, lq, lk, extra = SHAPES[shape]
    fwd, leaves = _fn(provider, kind, lq, lk, extra)
    try:
        out = fwd()
        torch.cuda.synchronize()
    except RuntimeError as e:  # an SDPA backend that does not support this shape / GPU
        pytest.skip(f"{provider} unavailable here: {str(e).splitlines()[0][:200]}")
    outs = out if isinstance(out, tuple) else (out,)
    douts = tuple(torch.randn_like(o) for o in outs)
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                fwd()
    elif mode == "bwd":
        outs = fwd()

        def fn():
            torch.autograd.grad(outs, leaves, douts, retain_graph=True)
    else:
        def fn():
            torch.autograd.grad(fwd(), leaves, douts)
    # shape carries the mode: plot_bench.py compares bars of the same group and shape
    extra_info = dict(backend=provider, shape=f"{shape}-{mode}", mode=mode, dtype="bf16", B=B, H=H, D=D)
    bytes_moved = None
    if shape.startswith("cross"):  # the K/V stream: read K and V once (bwd: also write dK, dV)
        kv_bytes = 2 * B * H * lk * D * 2
        bytes_moved = kv_bytes * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)
    run_bench(fn, flops=_flops(kind, lq, lk, extra) * FLOP_FACTOR[mode], bytes_moved=bytes_moved, **extra_info)
