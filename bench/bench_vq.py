"""VQ op family benchmarks: every backend against the naive path LARP runs, on the same inputs in one run.

    pytest bench/bench_vq.py --benchmark-json=bench/results/<machine>/vq.json

GPU shapes (issue 2): N = B*1024 for B in {8, 32}, K = 8192, D = 16 (LARP), plus K = 65536, D = 256. CPU: the
C++ vq_nearest against torch.cdist + argmin at N = 16384, K = 8192, D = 16 (target >= 2x).
extra_info carries pairs/s, TFLOP/s (2*N*K*D), GB/s (bytes the fused kernel must move), peak memory, and the
naive baseline's time from the same run (`baseline_ms`, `speedup`).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA
from dera_fast import backends
from dera_fast.ops import codebook_cross_entropy, vq_nearest, vq_sample

GPU_SHAPES = [pytest.param(8 * 1024, 8192, 16, id="N8192-K8192-D16"),
              pytest.param(32 * 1024, 8192, 16, id="N32768-K8192-D16"),
              pytest.param(8192, 65536, 256, id="N8192-K65536-D256")]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark")
_baseline_ms: dict = {}  # (op, shape) -> naive time, filled by the naive case that runs first in each group


def _backends_for(op_ext: str):
    out = [pytest.param("naive", id="naive")]
    for name in backends.BACKENDS:
        if name == "cuda" and DEVICE not in backends.EXT_OPS.get(op_ext, ()):
            continue
        if name == "triton" and "triton" not in backends.available(DEVICE):
            continue
        out.append(pytest.param(name, id=name))
    return out


def _naive_nearest(z, cb):
    # LARP's deterministic path: fp32 |z|^2 + |c|^2 - 2 z.c, materialised N x K, then argmin
    d = (z * z).sum(1, keepdim=True) + (cb * cb).sum(1) - 2 * torch.einsum("bd,nd->bn", z, cb)
    return d.argmin(1)


def _naive_sample(z, cb, tau):
    # LARP's SVQ: cosine logits N x K, softmax, multinomial
    logits = torch.einsum("bd,nd->bn", F.normalize(z, dim=1), F.normalize(cb, dim=1))
    return torch.multinomial(F.softmax(logits / tau, dim=-1), 1).squeeze(-1)


def _naive_ce(h, cb, t):
    logits = F.normalize(h, dim=1) @ F.normalize(cb, dim=1).t()
    return F.cross_entropy(logits, t)


@requires_cuda
@pytest.mark.benchmark(group="vq_nearest")
@pytest.mark.parametrize("backend", _backends_for("dera_fast_C::vq_nearest"))
@pytest.mark.parametrize("N, K, D", GPU_SHAPES)
def bench_vq_nearest(run_bench, benchmark, backend, N, K, D):
    z = torch.randn(N, D, device=DEVICE)
    cb = torch.randn(K, D, device=DEVICE)
    fn = (lambda: _naive_nearest(z, cb)) if backend == "naive" else (lambda: vq_nearest(z, cb, backend=backend))
    _timed(run_bench, benchmark, ("nearest", N, K, D), backend, fn, N, K, D,
           bytes_moved=4 * (N * D + K * D + K) + 8 * N)


@requires_cuda
@pytest.mark.benchmark(group="vq_sample")
@pytest.mark.parametrize("backend", _backends_for("dera_fast_C::vq_sample"))
@pytest.mark.parametrize("N, K, D", GPU_SHAPES)
def bench_vq_sample(run_bench, benchmark, backend, N, K, D):
    z = torch.randn(N, D, device=DEVICE)
    cb = torch.randn(K, D, device=DEVICE)
    fn = ((lambda: _naive_sample(z, cb, 0.03)) if backend == "naive"
          else (lambda: vq_sample(z, cb, temperature=0.03, backend=backend)))
    _timed(run_bench, benchmark, ("sample", N, K, D), backend, fn, N, K, D,
           bytes_moved=4 * (N * D + K * D + N) + 8 * N)


@requires_cuda
@pytest.mark.benchmark(group="codebook_cross_entropy")
@pytest.mark.parametrize("backend", _backends_for("dera_fast_C::codebook_ce_fwd"))
@pytest.mark.parametrize("N, K, D", GPU_SHAPES[:2])
def bench_codebook_cross_entropy(run_bench, benchmark, backend, N, K, D):
    h = torch.randn(N, D, device=DEVICE, requires_grad=True)
    cb = torch.randn(K, D, device=DEVICE, requires_grad=True)
    t = torch.randint(0, K, (N,), device=DEVICE)

    def fwd_bwd():
        loss = _naive_ce(h, cb, t) if backend == "naive" else codebook_cross_entropy(h, cb, t, backend=backend)
        loss.backward()

    # forward 2NKD + backward 4NKD (+ 2NKD recompute in the fused paths, not counted)
    _timed(run_bench, benchmark, ("ce", N, K, D), backend, fwd_bwd, N, K, D, flops_factor=3,
           bytes_moved=4 * 2 * (N * D + K * D) + 8 * N)


@pytest.mark.benchmark(group="vq_nearest_cpu")
@pytest.mark.skipif(HAS_CUDA, reason="CPU benchmark; runs on machines without a GPU")
@pytest.mark.parametrize("backend", ["naive", "torch", "cuda"])
def bench_vq_nearest_cpu(run_bench, benchmark, backend):
    """The C++ CPU kernel vs torch.cdist + argmin (target >= 2x) at N=16384, K=8192, D=16."""
    N, K, D = 16384, 8192, 16
    if backend == "cuda" and "cpu" not in backends.EXT_OPS.get("dera_fast_C::vq_nearest", ()):
        pytest.skip("extension has no CPU vq_nearest")
    z, cb = torch.randn(N, D), torch.randn(K, D)
    fn = ((lambda: torch.cdist(z, cb).argmin(1)) if backend == "naive"
          else (lambda: vq_nearest(z, cb, backend=backend)))
    _timed(run_bench, benchmark, ("nearest_cpu", N, K, D), backend, fn, N, K, D,
           bytes_moved=4 * (N * D + K * D + K) + 8 * N, workspace_MB=(4 * N * K / 2**20 if backend == "naive"
                                                                      else 4 * 256 * K / 2**20 if backend == "torch"
                                                                      else 0.0))


def _timed(run_bench, benchmark, key, backend, fn, N, K, D, *, flops_factor=1, **extra):
    t = run_bench(fn, pairs=N * K, flops=2 * N * K * D * flops_factor, backend=backend, shape=f"N{N}-K{K}-D{D}",
                  N=N, K=K, D=D, **extra)
    if backend == "naive":
        _baseline_ms[key] = t * 1e3
    elif key in _baseline_ms:  # the naive case of the same shape ran first in this group
        benchmark.extra_info["baseline_ms"] = _baseline_ms[key]
        benchmark.extra_info["speedup"] = _baseline_ms[key] / (t * 1e3)
