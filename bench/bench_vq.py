"""VQ op family benchmarks: every backend against the naive path LARP runs, on the same inputs in one run.

    pytest bench/bench_vq.py --benchmark-json=bench/results/<machine>/vq.json
    python bench/plot_bench.py bench/results/<machine>/vq.json --md table.md --baseline torch --baseline vq_*=naive

GPU shapes (issue 2): N = B*1024 for B in {8, 32}, K = 8192, D = 16 (LARP), plus K = 65536, D = 256; one benchmark
per backend, ratios computed from the JSON (plot_bench.py: the baseline backend's time on the same group and shape).
CPU (issue 13): ``bench_vq_nearest_cpu_grid``, the automatic choice (the C++ kernel ``cpp``) against the torch path
and torch.cdist + argmin at every D in {8, 16, 32, 64, 128, 256}, K in {1024, 8192}, N in {4096, 16384} (plus
N in {1, 64}, the small-batch class of the dispatch rule), 2 threads by default (BENCH_THREADS). They run in
interleaved rounds inside one benchmark (the machine is shared: back-to-back runs drift), with the torch path's GEMMs
alone (``torch-gemm-only``: its lower bound, how GEMM-bound it is), and each record carries all the medians in
``extra_info["variants"]`` plus ``gflops`` per variant, ``matmul_gflops`` and ``matmul_bf16_gflops``, the rates of
a 2048^3 fp32 and bf16 matmul on the same threads (the practical compute ceilings of the fp32 tile and of the AMX
screen), and ``cpu_kernel_isa`` (which variant of the C++ kernel ran).
extra_info carries pairs/s, TFLOP/s (2*N*K*D), GB/s (bytes the fused kernel must move), peak memory.
"""
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA, machine_info
from dera_fast import backends
from dera_fast.ops import codebook_cross_entropy, vq_nearest, vq_sample

GPU_SHAPES = [pytest.param(8 * 1024, 8192, 16, id="N8192-K8192-D16"),
              pytest.param(32 * 1024, 8192, 16, id="N32768-K8192-D16"),
              pytest.param(8192, 65536, 256, id="N8192-K65536-D256")]
CPU_GRID = [pytest.param(n, k, d, id=f"N{n}-K{k}-D{d}") for n in (4096, 16384) for k in (1024, 8192)
            for d in (8, 16, 32, 64, 128, 256)]
CPU_SMALL_N = [pytest.param(n, k, d, id=f"N{n}-K{k}-D{d}") for n in (1, 64) for k in (1024, 8192) for d in (16, 256)]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark")


def _backends_for(op: str):
    """naive, then every backend that can run ``op`` on this machine's device."""
    return [pytest.param("naive", id="naive")] + [pytest.param(name, id=name) for name in backends.BACKENDS
                                                   if backends.why_unavailable(name, op, DEVICE) is None]


def _gpu_bench(op: str, shapes=GPU_SHAPES):
    """The marks of a GPU benchmark of ``op``: CUDA only, grouped by op, over ``shapes`` x (naive + backends)."""
    def mark(fn):
        for m in (pytest.mark.parametrize("N, K, D", shapes), pytest.mark.parametrize("backend", _backends_for(op)),
                  pytest.mark.benchmark(group=op), requires_cuda):
            fn = m(fn)
        return fn
    return mark


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


@_gpu_bench("vq_nearest")
def bench_vq_nearest(run_bench, backend, N, K, D):
    z, cb = torch.randn(N, D, device=DEVICE), torch.randn(K, D, device=DEVICE)
    fn = (lambda: _naive_nearest(z, cb)) if backend == "naive" else (lambda: vq_nearest(z, cb, backend=backend))
    _timed(run_bench, backend, fn, N, K, D, bytes_moved=4 * (N * D + K * D + K) + 8 * N)


@_gpu_bench("vq_sample")
def bench_vq_sample(run_bench, backend, N, K, D):
    z, cb = torch.randn(N, D, device=DEVICE), torch.randn(K, D, device=DEVICE)
    fn = ((lambda: _naive_sample(z, cb, 0.03)) if backend == "naive"
          else (lambda: vq_sample(z, cb, temperature=0.03, backend=backend)))
    _timed(run_bench, backend, fn, N, K, D, bytes_moved=4 * (N * D + K * D + N) + 8 * N)


@_gpu_bench("codebook_cross_entropy", GPU_SHAPES[:2])
def bench_codebook_cross_entropy(run_bench, backend, N, K, D):
    h = torch.randn(N, D, device=DEVICE, requires_grad=True)
    cb = torch.randn(K, D, device=DEVICE, requires_grad=True)
    t = torch.randint(0, K, (N,), device=DEVICE)

    def fwd_bwd():
        loss = _naive_ce(h, cb, t) if backend == "naive" else codebook_cross_entropy(h, cb, t, backend=backend)
        loss.backward()

    # forward 2NKD + backward 4NKD (+ 2NKD recompute in the fused paths, not counted)
    _timed(run_bench, backend, fwd_bwd, N, K, D, flops_factor=3, bytes_moved=4 * 2 * (N * D + K * D) + 8 * N)


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median ms of each callable, timed in ``rounds`` round-robin rounds after one warm-up call each."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


_MATMUL_GFLOPS: dict = {}  # (threads, dtype) -> achievable GEMM rate of this machine (MKL / oneDNN, 2048^3)


def _matmul_gflops(threads: int, dtype=torch.float32) -> float:
    """The GEMM rate torch's BLAS reaches on a large square product in ``dtype``: the practical compute ceiling
    (fp32 for the fp32 tile; bf16, through oneDNN's AMX kernels where the CPU has them, for the AMX screen)."""
    if (threads, dtype) not in _MATMUL_GFLOPS:
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        ms = _interleaved({"mm": lambda: a @ b}, 5)["mm"]
        _MATMUL_GFLOPS[threads, dtype] = 2 * 2048**3 / ms / 1e6
    return _MATMUL_GFLOPS[threads, dtype]


def _torch_path_gemm(z, cb):
    """The GEMMs of the torch path alone (256-row chunks, as vq_nearest_ref), without the argmin: its lower bound."""
    bias = (cb * cb).sum(1)
    for s in range(0, z.shape[0], 256):
        torch.addmm(bias, z[s:s + 256], cb.t(), alpha=-2.0)


def _cpu_grid_case(benchmark, N, K, D, rounds):
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    z, cb = torch.randn(N, D), torch.randn(K, D)
    auto = backends.pick("vq_nearest", {"torch": None, "cpp": None}, z, shape={"N": N, "K": K, "D": D})[0]
    fns = {"auto": lambda: vq_nearest(z, cb), "torch": lambda: vq_nearest(z, cb, backend="torch"),
           "cdist": lambda: torch.cdist(z, cb).argmin(1), "torch-gemm-only": lambda: _torch_path_gemm(z, cb)}
    ms = _interleaved(fns, rounds)
    # the pytest-benchmark stats of the record are the automatic choice's; the medians of all three (same rounds)
    # are in extra_info["variants"], from which plot_bench.py computes the ratios
    benchmark.pedantic(fns["auto"], rounds=1, iterations=1)
    flops = 2 * N * K * D
    benchmark.extra_info.update(
        **machine_info(), backend="auto", auto_picks=auto, shape=f"N{N}-K{K}-D{D}", N=N, K=K, D=D,
        threads=threads, rounds=rounds, ms=ms["auto"], variants=ms, baseline="torch",
        gflops={name: flops / t / 1e6 for name, t in ms.items()}, matmul_gflops=_matmul_gflops(threads),
        matmul_bf16_gflops=_matmul_gflops(threads, torch.bfloat16),
        **{"TFLOP/s": flops / ms["auto"] / 1e9})


@pytest.mark.benchmark(group="vq_nearest_cpu_grid")
@pytest.mark.skipif(HAS_CUDA, reason="CPU benchmark; runs on machines without a GPU")
@pytest.mark.parametrize("N, K, D", CPU_GRID + CPU_SMALL_N)
def bench_vq_nearest_cpu_grid(benchmark, N, K, D):
    """auto (the C++ kernel where the rule picks it) vs the torch path vs cdist + argmin, interleaved rounds."""
    _cpu_grid_case(benchmark, N, K, D, rounds=5 if N * K * D < 2**33 else 3)


def _timed(run_bench, backend, fn, N, K, D, *, flops_factor=1, **extra):
    return run_bench(fn, pairs=N * K, flops=2 * N * K * D * flops_factor, backend=backend, shape=f"N{N}-K{K}-D{D}",
                     N=N, K=K, D=D, **extra)
