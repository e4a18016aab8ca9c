"""AR generation speed (gpt-fast style): tokens/s and achieved GB/s, eager vs compiled whole-cache vs compiled prefix.

GPU cases: the llama-abs-L generator (SPEC.md §4.1, 343M) in bf16, 1024 tokens per clip, class-conditional with
CFG (so the model runs 2B rows), batch B = 1, 8, 64. Each timed call is a whole ``generate``; ``decode_tok/s`` and
``decode_GB/s`` come from its steady-state decode steps. Bytes per step = the weights read (every matrix, norms,
one embedding row) + the live KV prefix (2 * layers * 2B * dim * (t + 1) * 2 bytes at position t), i.e. the
roofline of KERNELS.md §4.3, whatever the variant actually reads. ``compile_s`` is the warm-up generation's
compile + CUDA-graph recording time; ``roofline_frac`` = (bytes / HBM bandwidth) / measured step time.
The CPU case is the tiny preset, eager only (a smoke test of the harness).
"""
import pytest
import torch
import torch._dynamo

from dera_fast.generate import generate
from dera_fast.models.ar import ARGenerator, GeneratorConfig

HAS_CUDA = torch.cuda.is_available()
HBM_GBS = {"H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100": 2039}  # KERNELS.md §0 (A100-80GB SXM)
VARIANTS = {"eager": dict(compile=False, kv_mode="prefix"), "compiled-whole": dict(compile=True, kv_mode="whole"),
            "compiled-prefix": dict(compile=True, kv_mode="prefix")}


def weight_bytes(model: ARGenerator) -> int:
    """Bytes one decode step reads from parameters: everything except the embedding tables (one row each)."""
    emb = {"tok_emb.weight", "cls_emb.weight", "pos_emb"}
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n not in emb)
    return total + 3 * model.config.dim * model.pos_emb.element_size()


def decode_bytes(model: ARGenerator, rows: int) -> tuple[int, int]:
    """(bytes, steps) over the decode steps of one clip: weights + live KV prefix per step."""
    cfg = model.config
    kv_per_pos = 2 * cfg.n_layer * rows * cfg.dim * model.pos_emb.element_size()
    positions = range(cfg.cls_token_num, cfg.cls_token_num + cfg.max_seq_len - 1)  # position of the fed token
    return sum(weight_bytes(model) + kv_per_pos * (p + 1) for p in positions), len(positions)


def hbm_gbs() -> float | None:
    name = torch.cuda.get_device_name()
    for key, bw in HBM_GBS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return bw
    return None


def _run(run_bench, model, batch, variant, cfg_scale, rounds):
    labels = torch.arange(batch, device=model.pos_emb.device) % model.config.num_classes
    kw = dict(class_labels=labels, cfg_scale=cfg_scale, seed=0, progress=False, **VARIANTS[variant])
    torch._dynamo.reset()  # every variant / batch starts cold: compile_s is its own
    if HAS_CUDA:
        torch.cuda.empty_cache()
    warm = generate(model, **kw)
    last = {}

    def fn():
        last["stats"] = generate(model, **kw).stats

    rows = batch * (2 if cfg_scale != 1.0 else 1)
    nbytes, steps = decode_bytes(model, rows)
    run_bench(fn, inner=1, rounds=rounds, tokens=batch * model.config.max_seq_len, batch=batch, rows=rows,
              variant=variant, compile_s=warm.stats["warmup_s"] if VARIANTS[variant]["compile"] else 0.0)
    st = last["stats"]
    step_s = st["decode_s"] / (st["decode_tokens"] / batch)
    extra = {"decode_tok/s": st["tokens_per_s"], "decode_step_ms": step_s * 1e3,
             "decode_GB/s": nbytes / steps / step_s / 1e9}
    if HAS_CUDA and hbm_gbs():
        extra["roofline_frac"] = (nbytes / steps / (hbm_gbs() * 1e9)) / step_s
    return extra


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.benchmark(group="generate-L-bf16-cfg")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 8, 64])
def bench_generate_cuda(run_bench, benchmark, batch, variant):
    torch.manual_seed(0)
    model = ARGenerator(GeneratorConfig.from_name("L")).to("cuda", torch.bfloat16).eval()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # random tokens instead of the zero-init uniform
    benchmark.extra_info.update(_run(run_bench, model, batch, variant, cfg_scale=1.25, rounds=3))


@pytest.mark.benchmark(group="generate-tiny-cpu")
def bench_generate_tiny_cpu(run_bench, benchmark):
    model = ARGenerator(GeneratorConfig.from_name("tiny")).eval()
    benchmark.extra_info.update(_run(run_bench, model, 2, "eager", cfg_scale=1.25, rounds=2))
