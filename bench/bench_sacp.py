"""SACP benchmarks: the Gram pass (DeRA's default, pass 1 only) and the full projection (Gram + combine).

Gradients: two sets with the shared-encoder parameter list of larp-l / dera-l (12 timm ViT blocks, d = 768:
qkv 768x2304 without bias, proj 768x768 + bias, fc1 768x3072 + bias, fc2 3072x768 + bias, two LayerNorms;
85.0M parameters in 120 tensors), fp32 and bf16, one global group and per-tensor groups.

Variants: ``loop`` (per-tensor Python loop, the reference), ``libmtl`` (LibMTL PCGrad style: flatten into one
[2, P] fp32 buffer, dot / norm, ``.item()`` + Python ``if``), ``torch`` (the foreach backend), ``triton``, ``cuda``,
``cpp`` (the C++ CPU loop). Reported: GB/s (and the fraction of the HBM datasheet bandwidth), host syncs per call
(counted with ``torch.cuda.set_sync_debug_mode``; GPU only). Without CUDA: the small shape for every CPU variant,
and dera-l for ``torch`` / ``cpp`` only (the size class of the automatic ``cpp`` rule in dera_fast/backends.py).
"""
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import machine_info
from dera_fast import backends
from dera_fast.ops import gradient_gram, sacp_project
from dera_fast.ops.sacp import gradient_gram_ref, sacp_project_ref

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
HBM_GBPS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0}  # KERNELS.md §0 datasheet values


def _vit_shapes(depth: int, d: int, mlp: int = 4) -> list[tuple[int, ...]]:
    """Parameter shapes of `depth` timm ViT blocks (qkv without bias), in module order."""
    block = [(d,), (d,), (3 * d, d), (d, d), (d,), (d,), (d,), (mlp * d, d), (mlp * d,), (d, mlp * d), (d,)]
    return [s for _ in range(depth) for s in block]


SIZES = [pytest.param("dera-l", 12, 768, id="dera-l-85M"), pytest.param("cpu-small", 2, 128, id="cpu-small-0.4M")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
GROUPS = [pytest.param("global", id="global"), pytest.param("tensor", id="per-tensor")]
VARIANTS = ["loop", "libmtl", "torch", "triton", "cuda", "cpp"]


def _skip(size, variant, dtype):
    if size == "dera-l" and not HAS_CUDA and variant not in ("torch", "cpp"):
        pytest.skip("on CPU the dera-l shape runs for torch and cpp only (the dispatch rule's large class)")
    if size == "cpu-small" and HAS_CUDA:
        pytest.skip("the small CPU shape is for machines without CUDA")
    if variant == "triton" and not HAS_CUDA:
        pytest.skip("Triton benchmarks need a GPU (the interpreter is not a performance target)")
    if variant in backends.BACKENDS and (why := backends.why_unavailable(variant, "sacp_project", DEVICE)):
        pytest.skip(f"{variant}: {why}")
    if not HAS_CUDA and dtype == torch.bfloat16:
        pytest.skip("bf16 on CPU is not a target")


def _grads(depth, d, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shapes = _vit_shapes(depth, d)
    a = [torch.randn(s, generator=g, device=DEVICE, dtype=dtype) for s in shapes]
    b = [torch.randn(s, generator=g, device=DEVICE, dtype=dtype) for s in shapes]
    return a, b


def _libmtl_gram(a, b):
    """LibMTL style: flatten both tasks into one fp32 [2, P] buffer, then dot / norms read back to the host."""
    grads = torch.stack([torch.cat([x.reshape(-1).float() for x in a]), torch.cat([y.reshape(-1).float() for y in b])])
    s = torch.dot(grads[0], grads[1]).item()
    return s, grads[0].norm().pow(2).item(), grads[1].norm().pow(2).item()


def _libmtl_project(a, b):
    """LibMTL PCGrad for two tasks: flatten, per-pair dot with a host `if`, sum, split back into tensors."""
    grads = torch.stack([torch.cat([x.reshape(-1).float() for x in a]), torch.cat([y.reshape(-1).float() for y in b])])
    pc = grads.clone()
    for i, j in ((0, 1), (1, 0)):
        g_ij = torch.dot(pc[i], grads[j])
        if g_ij < 0:  # host sync
            pc[i] -= g_ij * grads[j] / (grads[j].norm().pow(2) + 1e-8)
    new = pc.sum(0)
    return [c.view_as(x).to(x.dtype) for c, x in zip(new.split([x.numel() for x in a]), a)]


def _fn(op, variant, a, b, groups):
    gid = None if groups == "global" else list(range(len(a)))
    ids = gid or [0] * len(a)
    if op == "gram":
        return {"loop": lambda: gradient_gram_ref(a, b, ids, max(ids) + 1),
                "libmtl": lambda: _libmtl_gram(a, b)}.get(
            variant, lambda: gradient_gram(a, b, groups=gid, backend=variant))
    out = [torch.empty_like(x) for x in a]
    return {"loop": lambda: sacp_project_ref(a, b, ids, max(ids) + 1),
            "libmtl": lambda: _libmtl_project(a, b)}.get(
        variant, lambda: sacp_project(a, b, groups=gid, out=out, backend=variant))


def _count_syncs(fn) -> int | None:
    """Host syncs of one steady-state call (after a warm-up call), counted by torch's sync debug mode (GPU only)."""
    if not HAS_CUDA:
        return None
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _hbm():
    if not HAS_CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in HBM_GBPS.items() if k in name), None)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _run(run_bench, benchmark, op, size, depth, d, dtype, groups, variant) -> None:
    _skip(size, variant, dtype)
    if variant == "libmtl" and groups == "tensor":
        pytest.skip("LibMTL's PCGrad has one global group")
    a, b = _grads(depth, d, dtype)
    fn = _fn(op, variant, a, b, groups)
    numel = sum(x.numel() for x in a)
    el = a[0].element_size()
    # minimum traffic: gram reads a and b; project reads them twice (gram, combine) and writes out once
    bytes_moved = numel * el * (2 if op == "gram" else 5)
    syncs = _count_syncs(fn)
    t = run_bench(fn, bytes_moved=bytes_moved,
                  backend=variant, shape=f"{size}-{dtype_name(dtype)}-{groups}", dtype=dtype_name(dtype),
                  groups=groups, params=numel, tensors=len(a), host_syncs=syncs)
    if hbm := _hbm():
        benchmark.extra_info["hbm_fraction"] = bytes_moved / t / 1e9 / hbm


def _cases(group: str):
    """The marks of a Gram / projection benchmark: ``group``, over sizes x dtypes x groupings x variants (ids in that
    order: ``dera-l-85M-fp32-global-torch``)."""
    def mark(fn):
        for m in (pytest.mark.parametrize("size, depth, d", SIZES), pytest.mark.parametrize("dtype", DTYPES),
                  pytest.mark.parametrize("groups", GROUPS), pytest.mark.parametrize("variant", VARIANTS),
                  pytest.mark.benchmark(group=group)):
            fn = m(fn)
        return fn
    return mark


@_cases("sacp_gram")
def bench_gradient_gram(run_bench, benchmark, size, depth, d, dtype, groups, variant):
    _run(run_bench, benchmark, "gram", size, depth, d, dtype, groups, variant)


@_cases("sacp_project")
def bench_sacp_project(run_bench, benchmark, size, depth, d, dtype, groups, variant):
    _run(run_bench, benchmark, "project", size, depth, d, dtype, groups, variant)


@pytest.mark.benchmark(group="sacp_dera_step")
@pytest.mark.parametrize("preset, batch", [pytest.param("dera-l", 4, id="dera-l-B4"),
                                           pytest.param("tiny", 2, id="tiny-B2")])
def bench_dera_step_sacp_overhead(run_bench, benchmark, preset, batch):
    """One DeRA training step (forward, reconstruction + alignment losses, backward) with SACP loss rewriting,
    against the same step with the fixed lambda-weighted alignment loss, measured in the same run."""
    from dera_fast.models.config import TokenizerConfig
    from dera_fast.models.dera import AlignTargets, DeRATokenizer
    from dera_fast.train.sacp import SACP

    if (preset == "dera-l") != HAS_CUDA:
        pytest.skip("dera-l runs on the GPU; the tiny preset is the CPU smoke run")
    cfg = TokenizerConfig.from_name(preset)
    model = DeRATokenizer(cfg).to(DEVICE)
    _, gh, gw = cfg.grid
    x = torch.rand(batch, cfg.in_channels, cfg.num_frames, cfg.size, cfg.size, device=DEVICE) * 2 - 1
    targets = AlignTargets(torch.randn(batch, gh * gw, cfg.align_dim_appearance, device=DEVICE), (gh, gw),
                           torch.randn(batch, cfg.num_patches, cfg.align_dim_motion, device=DEVICE), cfg.grid)
    sacp = SACP(model.shared_encoder_parameters())

    def step(with_sacp):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=HAS_CUDA):
            recon, out = model(x, targets=targets)
            loss_a = cfg.align_weight_appearance * out["align_appearance"]
            loss_m = cfg.align_weight_motion * out["align_motion"]
            align = sacp.reweight(loss_a, loss_m) if with_sacp else loss_a + loss_m
            loss = F.mse_loss(recon.float(), x) + align
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed_baseline(n):
        step(False)
        if HAS_CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step(False)
        if HAS_CUDA:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    base = timed_baseline(10 if HAS_CUDA else 2)
    t = run_bench(lambda: step(True), inner=5 if HAS_CUDA else 1, rounds=5 if HAS_CUDA else 2, preset=preset,
                  batch=batch, baseline_ms=base * 1e3)
    benchmark.extra_info["sacp_overhead"] = t / base - 1


CPU_CLASSES = {  # the size classes of the automatic cpp rule (dera_fast/backends.py): name -> tensor shapes
    "cpu-small-22x": _vit_shapes(2, 128),
    "dera-l-132x": _vit_shapes(12, 768),
    "few-big-4x8M": [(2048, 4096)] * 4,
    "many-tiny-2000x100": [(100,)] * 2000,
}


@pytest.mark.benchmark(group="sacp_cpu_classes")
@pytest.mark.skipif(HAS_CUDA, reason="CPU benchmark; runs on machines without a GPU")
@pytest.mark.parametrize("op", ["gram", "project"])
@pytest.mark.parametrize("size", list(CPU_CLASSES))
def bench_sacp_cpu_classes(benchmark, size, op):
    """cpp vs the torch path in interleaved rounds (the shared machine drifts between back-to-back runs)."""
    import os
    import statistics

    if backends.why_unavailable("cpp", "sacp_project", "cpu"):
        pytest.skip("needs the C++ CPU kernels")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(s, generator=g) for s in CPU_CLASSES[size]]
    b = [torch.randn(s, generator=g) for s in CPU_CLASSES[size]]
    out = [torch.empty_like(x) for x in a]
    fns = {be: (lambda be=be: gradient_gram(a, b, backend=be)) if op == "gram" else
           (lambda be=be: sacp_project(a, b, out=out, backend=be)) for be in ("cpp", "torch")}
    times = {be: [] for be in fns}
    for fn in fns.values():
        fn()
    for _ in range(5):
        for be, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[be].append(time.perf_counter() - t0)
    ms = {be: statistics.median(t) * 1e3 for be, t in times.items()}
    benchmark.pedantic(fns["cpp"], rounds=1, iterations=1)
    numel = sum(x.numel() for x in a)
    benchmark.extra_info.update(**machine_info(), backend="cpp", shape=f"{size}-{op}", ms=ms["cpp"], variants=ms,
                                baseline="torch",
                                threads=torch.get_num_threads(), params=numel,
                                **{"GB/s": numel * 4 * (2 if op == "gram" else 5) / ms["cpp"] / 1e6})
