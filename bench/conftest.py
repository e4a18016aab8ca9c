"""Benchmark fixtures (pytest-benchmark). Run with `pytest bench` (add --benchmark-json=bench/results/X.json).

Timings are wall-clock around `inner` back-to-back calls with a device synchronize inside the timed region, so
GPU work is included. Data-dependent input checks are turned off (DERA_FAST_VALUE_CHECKS=0) because they cost a
device-to-host sync per call that the baselines do not pay.
"""
import os

os.environ.setdefault("DERA_FAST_VALUE_CHECKS", "0")

import platform  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dera_fast import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def machine_info() -> dict:
    info = backends.info()
    return {
        "device": info["gpu"] or f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                                 f"threads)",
        "torch": info["torch"], "triton": info["triton"], "cuda": info["torch_cuda"],
        "ext": (info["build"] or {}).get("ext_kind"), "git_sha": (info["build"] or {}).get("git_sha"),
        "cpu_kernel_isa": info["cpu_kernel_isa"],
    }


@pytest.fixture
def run_bench(benchmark):
    """run_bench(fn, *, flops=None, bytes_moved=None, pairs=None, inner=None, rounds=None, **extra)."""

    def run(fn, *, flops=None, bytes_moved=None, pairs=None, tokens=None, inner=None, rounds=None, **extra):
        inner = inner or (20 if HAS_CUDA else 1)
        rounds = rounds or (15 if HAS_CUDA else 5)
        fn()
        _sync()  # compile / autotune / first-call costs stay outside the timing
        if HAS_CUDA:
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()

        def timed():
            for _ in range(inner):
                fn()
            _sync()

        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)
        t = benchmark.stats.stats.median / inner
        ei = benchmark.extra_info
        ei.update(machine_info())
        ei["ms"] = t * 1e3
        if HAS_CUDA:
            ei["peak_mem_MB"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        if flops:
            ei["TFLOP/s"] = flops / t / 1e12
        if bytes_moved:
            ei["GB/s"] = bytes_moved / t / 1e9
        if pairs:
            ei["pairs/s"] = pairs / t
        if tokens:
            ei["tokens/s"] = tokens / t
        ei.update(extra)
        return t

    return run
