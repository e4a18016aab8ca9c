"""Sampling loop for :class:`dera_fast.models.ar.ARGenerator` (gpt-fast style; KERNELS.md §4).

``prefill`` writes the cache for the condition and samples the first token; ``decode_one_token`` is one cached
step plus classifier-free guidance plus sampling, and is the function ``compile=True`` wraps in
``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA) or the default mode (CPU).

Design points:

* **No host syncs in the loop.** Sampling is the exponential race ``argmax(p / E)``, E ~ Exp(1), which is exactly
  multinomial sampling from p. E comes from a seeded ``torch.Generator`` on the model's device, drawn outside the
  compiled step, so eager and compiled runs see the same noise and a seed reproduces the tokens.
* **Sampling settings are tensors.** temperature, top-k, top-p and the CFG scale enter the step as 0-d tensors, so
  changing them never recompiles; only "filtering on or off" (``top_k > 0 or top_p < 1``) and "guided or not"
  are static.
* **Attention reads the live prefix, in buckets** (``kv_mode="prefix"``): step t attends to the first
  ``round_up(t + 1, kv_block)`` cache slots, masked to ``<= t``. The slot count reaches the step as the length of
  ``kv_positions[:n]``, a view marked dynamic, so Dynamo compiles ONE graph with a symbolic length; with
  ``reduce-overhead`` CUDA graphs then records one graph per bucket (``cache_len / kv_block`` of them, 8 for
  1024 tokens at the default 128) during the first generation. Extra reads: < kv_block slots per step (about 12%
  of the live KV bytes over a 1024-token class-conditional clip at block 128) instead of the whole cache (about
  100% extra). The cache has one spare slot so that no bucket is a full-length slice (which Dynamo would
  specialise, compiling a second graph). ``kv_mode="whole"`` is gpt-fast's variant (every step
  reads the whole static cache, masked), kept for comparison.
* Tokens leaving the compiled region are ``.clone()``d: CUDA-graph outputs are overwritten by the next replay.
* What does recompile: a new batch size, dtype, kv_mode, guided/filtered flag or model. One warm-up generation
  per configuration compiles everything; later ones run without recompiles (tests/test_generate.py checks it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .models.ar import ARGenerator, find_multiple
from .ops._checks import check_positive


@dataclass
class GenerateOutput:
    """ids [N, max_seq_len] int64; video from ``tokenizer.decode(ids)`` when asked; timings in seconds."""

    ids: Tensor
    video: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def sample_logits(logits: Tensor, noise: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                  filtered: bool) -> Tensor:
    """Sample one token per row without host syncs.

    Args: logits [B, V]; noise [B, V] Exp(1) draws; temperature, top_p 0-d float tensors; top_k 0-d int tensor
    (0 = off); filtered: whether top-k / top-p apply (static). Returns int64 [B].
    """
    logits = logits.float() / temperature
    if filtered:
        # NOTE: top-k and top-p in one sort with tensor-valued k and p (no recompiles when they change). Same
        # rule as LARP: top-k first, then drop tokens whose preceding cumulative probability exceeds top_p.
        srt, order = logits.sort(dim=-1, descending=True)  # [B, V]
        rank = torch.arange(logits.shape[-1], device=logits.device)
        keep = (rank < top_k) | (top_k <= 0)
        srt = srt.masked_fill(~keep, float("-inf"))
        p = torch.softmax(srt, dim=-1)
        keep = keep & ((p.cumsum(-1) - p <= top_p) | (top_p >= 1))
        logits = logits.masked_fill(~torch.zeros_like(keep).scatter(-1, order, keep), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # NOTE: exponential race; the clamp keeps a (measure-zero) E = 0 draw from selecting a zero-probability token.
    return torch.argmax(probs / noise.clamp_min(1e-30), dim=-1)


def _guide(logits: Tensor, cfg_scale: Tensor) -> Tensor:
    """[2B, V] rows (conditional first, then null class) -> u + s * (c - u) [B, V] in fp32."""
    cond, uncond = logits.float().chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def prefill(model: ARGenerator, cond_emb: Tensor, noise: Tensor, temperature: Tensor, top_k: Tensor,
            top_p: Tensor, cfg_scale: Tensor, *, guided: bool, filtered: bool) -> Tensor:
    """Fill the cache with cond_emb [B', c, dim] (B' = 2B when guided) and sample the first token, int64 [B]."""
    logits = model.prefill(cond_emb)
    if guided:
        logits = _guide(logits, cfg_scale)
    return sample_logits(logits, noise, temperature, top_k, top_p, filtered)


def decode_one_token(model: ARGenerator, ids: Tensor, input_pos: Tensor, kv_pos: Tensor, noise: Tensor,
                     temperature: Tensor, top_k: Tensor, top_p: Tensor, cfg_scale: Tensor, *, guided: bool,
                     filtered: bool) -> Tensor:
    """One step: ids [B, 1] at position input_pos [1] (int64, device) -> next token int64 [B].

    kv_pos [S'] = ``model.kv_positions[:S']``: the cache slots attention reads. When guided, the cache holds 2B
    rows (conditional, then null class) and the logits are combined with ``cfg_scale``.
    """
    x = torch.cat([ids, ids]) if guided else ids  # [B', 1]
    logits = model.decode_step(x, input_pos, kv_pos)
    if guided:
        logits = _guide(logits, cfg_scale)
    return sample_logits(logits, noise, temperature, top_k, top_p, filtered)


_COMPILED: dict[str, Callable] = {}
_SEEN: set[tuple] = set()  # step shapes already compiled / recorded in this process


def compiled_decode_one_token(device_type: str) -> Callable:
    """The compiled step, created once per device type (Dynamo's cache then lives as long as the process)."""
    if device_type not in _COMPILED:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _COMPILED[device_type] = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    return _COMPILED[device_type]


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _check_args(model: ARGenerator, class_labels, context_ids, cfg_scale, temperature, top_k, top_p, kv_mode,
                kv_block, batch_size, return_video, tokenizer) -> tuple[Tensor, bool]:
    cfg = model.config
    check_positive("temperature", temperature)
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k}")
    if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if kv_mode not in ("prefix", "whole"):
        raise ValueError(f"kv_mode must be 'prefix' or 'whole', got {kv_mode!r}")
    if not isinstance(kv_block, int) or kv_block < 2:
        raise ValueError(f"kv_block must be an int >= 2, got {kv_block}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    if return_video and tokenizer is None:
        raise ValueError("return_video=True needs a tokenizer with .decode(ids)")
    guided = cfg_scale != 1.0
    if cfg.frame_prediction:
        if guided:
            raise ValueError("frame prediction has no classifier-free guidance: cfg_scale must be 1.0")
        if class_labels is not None or context_ids is None:
            raise ValueError("a frame-prediction model needs context_ids (and no class_labels)")
        if not isinstance(context_ids, Tensor) or context_ids.dim() != 2:
            raise ValueError("context_ids must be an int tensor [N, context_len]")
        if context_ids.shape[1] > cfg.context_len:
            raise ValueError(f"context_ids has {context_ids.shape[1]} tokens, longer than the model's maximum "
                             f"context of {cfg.context_len} (cls_token_num - 1; SEP is appended by generate)")
        model.check_cond(None, context_ids)
        return context_ids, False
    if context_ids is not None or class_labels is None:
        raise ValueError("a class-conditional model needs class_labels (and no context_ids)")
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.numel() == 0:
        raise ValueError("class_labels must be a non-empty int tensor / list")
    bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
    if bad.numel():
        raise ValueError(f"class id {int(bad[0])} out of range [0, {cfg.num_classes})")
    return labels, guided


@torch.no_grad()
def generate(model: ARGenerator, *, class_labels: Tensor | list[int] | None = None, context_ids: Tensor | None = None,
             cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, batch_size: int | None = None, compile: bool = False,
             kv_mode: str = "prefix", kv_block: int = 128, tokenizer=None, return_video: bool = False,
             progress: bool = True) -> GenerateOutput:
    """Sample ``max_seq_len`` tokens per clip.

    Args:
        model: an :class:`ARGenerator` (put in eval mode for the call).
        class_labels: [N] class ids in [0, num_classes) (class-conditional models).
        context_ids: [N, context_len] tokens of the context clip (frame prediction: the first 5 frames repeated to
            16 and tokenized, LARP protocol); SEP is appended here.
        cfg_scale: classifier-free guidance (batch doubled with the null class when != 1; LARP uses 1.25).
        temperature: > 0; top_k: 0 = off; top_p: in (0, 1], 1 = off.
        seed: seeds the sampling noise (same seed -> same tokens, eager or compiled).
        batch_size: rows per forward (chunks of N; the last chunk is padded so shapes never change).
        compile: compile the decode step (CUDA: reduce-overhead + fullgraph; CPU: default mode).
        kv_mode: "prefix" (read the live cache prefix, bucketed by ``kv_block``) or "whole" (gpt-fast).
        tokenizer, return_video: decode ids to video with ``tokenizer.decode(ids)``.
        progress: tqdm bar over decode steps.
    Returns:
        GenerateOutput(ids [N, max_seq_len], video, stats) with stats ``prefill_s``, ``warmup_s`` (compiled steps
        whose shapes ran for the first time in this process: compile and CUDA-graph recording), ``decode_s`` and
        ``decode_tokens`` (all other steps), ``tokens_per_s`` (their rate: the steady state).
    """
    from tqdm.auto import tqdm

    cond, guided = _check_args(model, class_labels, context_ids, cfg_scale, temperature, top_k, top_p, kv_mode,
                               kv_block, batch_size, return_video, tokenizer)
    cfg = model.config
    device = model.pos_emb.device
    cond = cond.to(device)
    n = cond.shape[0]
    bs = min(batch_size or n, n)
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    f32 = dict(device=device, dtype=torch.float32)
    knobs = (torch.tensor(temperature, **f32), torch.tensor(top_k, device=device), torch.tensor(top_p, **f32),
             torch.tensor(cfg_scale, **f32))
    flags = dict(guided=guided, filtered=top_k > 0 or top_p < 1)
    step = compiled_decode_one_token(device.type) if compile else decode_one_token
    # NOTE: one spare slot, so that no bucket is the whole cache: a full-length slice specialises under Dynamo and
    # would compile a second graph for the last bucket.
    cache_len = find_multiple(cfg.pe_len, kv_block) + 1
    stats = dict(prefill_s=0.0, warmup_s=0.0, decode_s=0.0, decode_tokens=0)

    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, n, bs):
            chunk = cond[start:start + bs]
            real = chunk.shape[0]
            if real < bs:  # pad with the last row: same shapes, no recompile
                chunk = torch.cat([chunk, chunk[-1:].expand(bs - real, *chunk.shape[1:])])
            out.append(_generate_chunk(model, chunk, guided, knobs, flags, step, compile, gen, cache_len, kv_mode,
                                       kv_block, stats, progress and tqdm)[:real])
        ids = torch.cat(out)
    finally:
        model.train(was_training)
    stats["tokens_per_s"] = stats["decode_tokens"] / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    video = tokenizer.decode(ids) if return_video else None
    return GenerateOutput(ids=ids, video=video, stats=stats)


def _generate_chunk(model: ARGenerator, cond: Tensor, guided: bool, knobs, flags, step, compiled: bool, gen,
                    cache_len: int, kv_mode: str, kv_block: int, stats: dict, tqdm) -> Tensor:
    """Generate [B, max_seq_len] ids for one chunk of labels [B] / contexts [B, context_len]."""
    cfg = model.config
    device = cond.device
    b = cond.shape[0]
    model.setup_caches(2 * b if guided else b, cache_len, model.pos_emb.dtype)
    if cfg.frame_prediction:
        cond_emb = model.embed_cond(context_ids=cond)  # [B, context_len + 1, dim]
    else:
        labels = torch.cat([cond, torch.full_like(cond, cfg.num_classes)]) if guided else cond
        cond_emb = model.embed_cond(class_labels=labels)  # [B', 1, dim]

    def noise():
        return torch.empty((b, cfg.vocab_size), device=device).exponential_(generator=gen)

    t0 = time.perf_counter()
    tok = prefill(model, cond_emb, noise(), *knobs, **flags)
    seq = torch.empty((b, cfg.max_seq_len), dtype=torch.long, device=device)
    seq[:, 0] = tok
    _sync(device)
    stats["prefill_s"] += time.perf_counter() - t0

    c = cfg.cls_token_num
    input_pos = torch.tensor([c], device=device)
    cur = tok.view(b, 1)
    steps = range(1, cfg.max_seq_len)
    _sync(device)
    t_loop, warm_s, warm_steps = time.perf_counter(), 0.0, 0
    for i in (tqdm(steps, desc="generate", leave=False) if tqdm else steps):
        pos = c + i - 1  # position of `cur`, known on the host without a sync
        if kv_mode == "whole":
            kv_pos = model.kv_positions
        else:
            kv_pos = model.kv_positions[:find_multiple(pos + 1, kv_block)]
            torch._dynamo.maybe_mark_dynamic(kv_pos, 0)
        # A step with a shape this process has not run yet compiles or records a CUDA graph: time it apart.
        key = (device.type, kv_pos.shape[0], b, tuple(flags.values()), kv_mode, model.pos_emb.dtype, id(model))
        first = compiled and key not in _SEEN
        if first:
            _SEEN.add(key)
            _sync(device)
            t0 = time.perf_counter()
        nxt = step(model, cur, input_pos, kv_pos, noise(), *knobs, **flags).clone()  # leaves the CUDA graph
        seq[:, i] = nxt
        cur = nxt.view(b, 1)
        input_pos += 1
        if first:
            _sync(device)
            warm_s += time.perf_counter() - t0
            warm_steps += 1
    _sync(device)
    stats["warmup_s"] += warm_s
    stats["decode_s"] += time.perf_counter() - t_loop - warm_s
    stats["decode_tokens"] += b * (cfg.max_seq_len - 1 - warm_steps)
    return seq
