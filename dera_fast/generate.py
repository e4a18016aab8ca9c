"""Sampling loop for :class:`dera_fast.models.ar.ARGenerator` (gpt-fast style; KERNELS.md §4).

The pieces, in the order a generation runs them:

* :class:`Sampling` holds how tokens are drawn: the knobs as 0-d tensors, the static flags, the noise generator.
* :func:`prefill` writes the cache for the condition and samples the first token.
* :func:`decode_n_tokens` is the decode loop; each step is :func:`decode_one_token` (one cached step plus
  classifier-free guidance plus sampling), run through the model's :class:`DecodeStep`, which with ``compile=True``
  wraps it in ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA) or the default mode (CPU).
* :func:`generate` checks the arguments, sets up the cache and runs the chunks of the batch.

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

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

from ._progress import progress_bar
from ._validation import check_positive

if TYPE_CHECKING:
    from .models.ar import ARGenerator


@dataclass
class GenerateOutput:
    """ids [N, max_seq_len] int64; video from ``tokenizer.decode(ids)`` when asked; timings in seconds."""

    ids: Tensor
    video: Tensor | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sampling:
    """How each token is drawn, as the decode step receives it.

    The knobs are 0-d tensors on the model's device, so changing them never recompiles. ``guided`` (classifier-free
    guidance: the batch is doubled with the null class) and ``filtered`` (top-k or top-p on) are static: they pick
    the graph. ``generator`` draws the exponential noise outside the compiled step, so eager == compiled.
    """

    temperature: Tensor  # float32, > 0
    top_k: Tensor  # int64, 0 = off
    top_p: Tensor  # float32 in (0, 1], 1 = off
    cfg_scale: Tensor  # float32
    guided: bool
    filtered: bool
    generator: torch.Generator

    @classmethod
    def create(cls, device: torch.device, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None) -> Sampling:
        """Check the settings and put them on ``device``.

        cfg_scale: classifier-free guidance scale, guided when != 1 (LARP uses 1.25). temperature: > 0.
        top_k: 0 = off. top_p: in (0, 1], 1 = off. seed: same seed -> same tokens, eager or compiled (None: fresh).
        """
        check_positive("temperature", temperature)
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k}")
        if not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        f32 = dict(device=device, dtype=torch.float32)
        return cls(torch.tensor(temperature, **f32), torch.tensor(top_k, device=device), torch.tensor(top_p, **f32),
                   torch.tensor(cfg_scale, **f32), guided=cfg_scale != 1.0, filtered=top_k > 0 or top_p < 1,
                   generator=generator)

    def noise(self, rows: int, vocab: int) -> Tensor:
        """One step's Exp(1) draws [rows, vocab] for the exponential race."""
        return torch.empty((rows, vocab), device=self.generator.device).exponential_(generator=self.generator)


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


def _guide_and_sample(logits: Tensor, noise: Tensor, sampling: Sampling) -> Tensor:
    """logits [B', V] (B' = 2B when guided: conditional rows, then null class) -> tokens int64 [B]."""
    if sampling.guided:
        cond, uncond = logits.float().chunk(2)
        logits = uncond + sampling.cfg_scale * (cond - uncond)  # [B, V] in fp32
    return sample_logits(logits, noise, sampling.temperature, sampling.top_k, sampling.top_p, sampling.filtered)


def prefill(model: ARGenerator, cond_emb: Tensor, noise: Tensor, sampling: Sampling) -> Tensor:
    """Fill the cache with cond_emb [B', c, dim] (B' = 2B when guided) and sample the first token, int64 [B]."""
    return _guide_and_sample(model.prefill(cond_emb), noise, sampling)


def decode_one_token(model: ARGenerator, ids: Tensor, input_pos: Tensor, kv_pos: Tensor, noise: Tensor,
                     sampling: Sampling) -> Tensor:
    """One step: ids [B, 1] at position input_pos [1] (int64, device) -> next token int64 [B].

    kv_pos [S'] = ``model.kv_positions[:S']``: the cache slots attention reads. When guided, the cache holds 2B
    rows (conditional, then null class) and the logits are combined with ``sampling.cfg_scale``.
    """
    x = torch.cat([ids, ids]) if sampling.guided else ids  # [B', 1]
    return _guide_and_sample(model.decode_step(x, input_pos, kv_pos), noise, sampling)


class DecodeStep:
    """A model's decode step (:func:`decode_one_token`, compiled or eager) and the step shapes it has run.

    The first run of a compiled step at a new shape compiles it (and on CUDA records a CUDA graph), so
    :func:`decode_n_tokens` times those steps apart as warm-up. One per model, device type and ``compile`` flag,
    kept in ``model.decode_steps``, so that later generations reuse both the compiled code and this record.
    """

    def __init__(self, device_type: str, compile: bool):
        mode = "reduce-overhead" if device_type == "cuda" else None
        self.fn = torch.compile(decode_one_token, mode=mode, fullgraph=True) if compile else decode_one_token
        self.compiled = compile
        self.seen: set[tuple] = set()

    @classmethod
    def of(cls, model: ARGenerator, compile: bool) -> DecodeStep:
        key = (model.pos_emb.device.type, bool(compile))
        if key not in model.decode_steps:
            model.decode_steps[key] = cls(*key)
        return model.decode_steps[key]

    def warms_up(self, shape: tuple) -> bool:
        """Whether a step at ``shape`` compiles or records now (compiled, and the shape is new); records it."""
        if not self.compiled or shape in self.seen:
            return False
        self.seen.add(shape)
        return True


def _now(device: torch.device) -> float:
    """perf_counter after the device's queued work (timings of asynchronous launches)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter()


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def kv_slots(model: ARGenerator, pos: int, kv_block: int | None) -> Tensor:
    """The cache slots the step at position ``pos`` reads: ``model.kv_positions[:round_up(pos + 1, kv_block)]``, a
    view whose length Dynamo keeps symbolic (one graph for every bucket), or the whole cache when kv_block is None."""
    if kv_block is None:
        return model.kv_positions
    kv_pos = model.kv_positions[:_round_up(pos + 1, kv_block)]
    torch._dynamo.maybe_mark_dynamic(kv_pos, 0)
    return kv_pos


def decode_n_tokens(model: ARGenerator, cur: Tensor, sampling: Sampling, step: DecodeStep, *,
                    kv_block: int | None, progress: bool | None = None) -> tuple[Tensor, float, int]:
    """Decode the tokens 1 .. max_seq_len - 1 of a clip after its first token ``cur`` [B] (gpt-fast's loop).

    kv_block: see :func:`kv_slots`. Returns (tokens int64 [B, max_seq_len - 1], seconds and number of the steps
    that warmed up: compiled steps at a new shape).
    """
    config = model.config
    b, n, c = cur.shape[0], config.max_seq_len - 1, config.cls_token_num
    tokens = torch.empty((b, n), dtype=torch.long, device=cur.device)
    input_pos = torch.tensor([c], device=cur.device)  # on the device: the compiled step never sees a Python int
    warm_s, warm_steps = 0.0, 0
    for i in progress_bar(range(n), progress=progress, desc="generate", leave=False):
        kv_pos = kv_slots(model, c + i, kv_block)  # c + i == input_pos, known on the host without a sync
        first = step.warms_up((kv_pos.shape[0], b, sampling.guided, sampling.filtered, kv_block is None,
                               model.pos_emb.dtype))
        t0 = _now(cur.device) if first else 0.0
        noise = sampling.noise(b, config.vocab_size)
        cur = step.fn(model, cur.view(b, 1), input_pos, kv_pos, noise, sampling).clone()  # leaves the CUDA graph
        tokens[:, i] = cur
        input_pos += 1
        if first:
            warm_s += _now(cur.device) - t0
            warm_steps += 1
    return tokens, warm_s, warm_steps


def _cond_embedding(model: ARGenerator, cond: Tensor, guided: bool) -> Tensor:
    """Embeddings [B', c, dim] of labels [B] (followed by B null-class rows when guided) or contexts [B, c - 1]."""
    if model.config.frame_prediction:
        return model.embed_cond(context_ids=cond)  # [B, context_len + 1, dim]: context, then SEP
    labels = torch.cat([cond, torch.full_like(cond, model.config.num_classes)]) if guided else cond
    return model.embed_cond(class_labels=labels)  # [B', 1, dim]


def _generate_chunk(model: ARGenerator, cond: Tensor, sampling: Sampling, step: DecodeStep, *, kv_block: int | None,
                    progress: bool | None, stats: dict) -> Tensor:
    """ids [B, max_seq_len] for one chunk of labels [B] / contexts [B, context_len]; adds its timings to stats."""
    b = cond.shape[0]
    cond_emb = _cond_embedding(model, cond, sampling.guided)
    t0 = _now(cond.device)
    first = prefill(model, cond_emb, sampling.noise(b, model.config.vocab_size), sampling)
    t1 = _now(cond.device)
    rest, warm_s, warm_steps = decode_n_tokens(model, first, sampling, step, kv_block=kv_block, progress=progress)
    stats["prefill_s"] += t1 - t0
    stats["decode_s"] += _now(cond.device) - t1 - warm_s
    stats["warmup_s"] += warm_s
    stats["decode_tokens"] += b * (rest.shape[1] - warm_steps)
    return torch.cat([first[:, None], rest], dim=1)


def _chunks(cond: Tensor, size: int) -> Iterator[tuple[Tensor, int]]:
    """(rows, number of real rows) of ``cond``, ``size`` at a time; the last chunk is padded with its last row, so
    every chunk has the same shape (no recompile)."""
    for start in range(0, cond.shape[0], size):
        chunk = cond[start:start + size]
        real = chunk.shape[0]
        if real < size:
            chunk = torch.cat([chunk, chunk[-1:].expand(size - real, *chunk.shape[1:])])
        yield chunk, real


def _condition(model: ARGenerator, class_labels, context_ids, guided: bool) -> Tensor:
    """The condition rows, labels [N] or contexts [N, context_len], checked by ``model.check_cond``."""
    if model.config.frame_prediction and guided:
        raise ValueError("frame prediction has no classifier-free guidance: cfg_scale must be 1.0")
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels).reshape(-1)
    model.check_cond(class_labels, context_ids, null_class=False)  # the null class is what guidance adds
    return context_ids if model.config.frame_prediction else class_labels


def _setup_cache(model: ARGenerator, rows: int, kv_block: int) -> None:
    # NOTE: one spare slot, so that no bucket is the whole cache: a full-length slice specialises under Dynamo and
    # would compile a second graph for the last bucket.
    model.setup_caches(rows, _round_up(model.config.pe_len, kv_block) + 1)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_options(*, kv_mode: str, kv_block: int, batch_size: int | None, return_video: bool, tokenizer) -> None:
    if kv_mode not in ("prefix", "whole"):
        raise ValueError(f"kv_mode must be 'prefix' or 'whole', got {kv_mode!r}")
    if not isinstance(kv_block, int) or kv_block < 2:
        raise ValueError(f"kv_block must be an int >= 2, got {kv_block}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    if return_video and tokenizer is None:
        raise ValueError("return_video=True needs a tokenizer with .decode(ids)")


@torch.no_grad()
def generate(model: ARGenerator, *, class_labels: Tensor | list[int] | None = None, context_ids: Tensor | None = None,
             cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, batch_size: int | None = None, compile: bool = False,
             kv_mode: str = "prefix", kv_block: int = 128, tokenizer=None, return_video: bool = False,
             progress: bool | None = None) -> GenerateOutput:
    """Sample ``max_seq_len`` tokens per clip with ``model`` (an :class:`ARGenerator`, in eval mode for the call).

    Args: class_labels [N] in [0, num_classes) for a class-conditional model, or context_ids [N, context_len]
    (frame prediction: the context clip's tokens; SEP is appended here). cfg_scale, temperature, top_k, top_p,
    seed: see :meth:`Sampling.create`. batch_size: rows per forward (the last chunk is padded, so shapes never
    change). compile: compile the decode step (:class:`DecodeStep`). kv_mode: "prefix" (the live cache prefix,
    bucketed by ``kv_block``) or "whole" (gpt-fast). tokenizer, return_video: also decode the ids to video.
    progress: a bar over decode steps (None: :func:`dera_fast.set_progress_bar_config`).

    Returns GenerateOutput(ids [N, max_seq_len], video, stats): ``prefill_s``, ``warmup_s`` (compiled steps at a
    shape new to the model: compile and CUDA-graph recording), ``decode_s`` and ``decode_tokens`` (all other steps),
    ``tokens_per_s`` (their rate: the steady state).
    """
    device = model.pos_emb.device
    sampling = Sampling.create(device, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed)
    _check_options(kv_mode=kv_mode, kv_block=kv_block, batch_size=batch_size, return_video=return_video,
                   tokenizer=tokenizer)
    cond = _condition(model, class_labels, context_ids, sampling.guided).to(device)
    bs = min(batch_size or cond.shape[0], cond.shape[0])
    _setup_cache(model, 2 * bs if sampling.guided else bs, kv_block)
    step = DecodeStep.of(model, compile)
    stats = dict(prefill_s=0.0, warmup_s=0.0, decode_s=0.0, decode_tokens=0)
    kw = dict(kv_block=None if kv_mode == "whole" else kv_block, progress=progress, stats=stats)
    with _eval_mode(model):
        ids = torch.cat([_generate_chunk(model, chunk, sampling, step, **kw)[:real]
                         for chunk, real in _chunks(cond, bs)])
    stats["tokens_per_s"] = stats["decode_tokens"] / stats["decode_s"] if stats["decode_s"] > 0 else float("nan")
    return GenerateOutput(ids=ids, video=tokenizer.decode(ids) if return_video else None, stats=stats)
