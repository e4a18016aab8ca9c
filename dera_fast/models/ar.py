"""LARP's "llama-abs" autoregressive generator (SPEC.md §4.1), with a gpt-fast style static KV cache.

Sequence layout: ``[cond ; tok(z_1) ... tok(z_{n-1})]`` with a learned absolute position embedding, logits read
from position ``cls_token_num - 1`` onwards predict ``z_1 ... z_n``.

* Class-conditional (UCF-101): ``cls_token_num = 1``, cond = the class embedding (row ``num_classes`` is the null
  class used for classifier-free guidance and class dropout).
* Frame prediction (K600): ``cls_token_num = max_seq_len + 1``, cond = the ``max_seq_len`` tokens of the context
  clip (5 frames repeated to 16, LARP protocol) followed by the SEP token ``vocab_size``; no class embedding.

Attention goes through :func:`dera_fast.ops.attention` (training and prefill); the single-token decode step reads
the static cache with a position mask (see :meth:`Attention.forward`). ``generate.py`` holds the sampling loop.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .._config import PresetConfig
from .._validation import check_index_range, values_checked
from .blocks import RMSNorm


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


PRESETS: dict[str, dict[str, Any]] = {
    # SPEC.md §7.2 tiny CPU configuration.
    "tiny": dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=5, max_seq_len=16, multiple_of=32),
    # LARP's llama-abs presets (models/larp_ar.py). Parameters counted here at vocab 8192 (codebook), 1024 tokens,
    # 101 classes / frame prediction; the papers' labels are LlamaGen's counts at vocab 16384 (+16.8M for L).
    "B": dict(dim=768, n_layer=12, n_head=12),        # 98.4M / 99.1M ("111M")
    "L": dict(dim=1024, n_layer=24, n_head=16),       # 326.3M / 327.2M ("343M"): DeRA's generator, LARP Table 1
    "LP": dict(dim=1280, n_layer=30, n_head=20),      # 632.0M / 633.2M ("632M"): LARP's released generators
}


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig(PresetConfig):
    """Hyper-parameters of :class:`ARGenerator` (LARP ``ModelArgs`` names where they exist)."""
    _kind = "GeneratorConfig"
    _positive = ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "max_seq_len", "cls_token_num",
                 "multiple_of", "norm_eps")
    _non_negative = ("class_dropout_prob", "token_dropout_p", "resid_dropout_p", "ffn_dropout_p", "initializer_range")

    dim: int = 1280
    n_layer: int = 30
    n_head: int = 20
    vocab_size: int = 8192          # codebook size of the tokenizer; SEP = vocab_size in frame prediction
    num_classes: int = 101          # class-conditional only; id num_classes is the null (CFG) class
    max_seq_len: int = 1024         # generated tokens per clip
    frame_prediction: bool = False
    cls_token_num: int = 1          # conditioning positions: 1 (class) or max_seq_len + 1 (context + SEP)
    class_dropout_prob: float = 0.1
    multiple_of: int = 256          # SwiGLU hidden = find_multiple(int(8 * dim / 3), multiple_of)
    norm_eps: float = 1e-5
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be divisible by n_head={self.n_head}")
        if self.frame_prediction and self.cls_token_num < 2:
            raise ValueError("frame_prediction needs cls_token_num >= 2 (context tokens + SEP); "
                             f"got {self.cls_token_num}")
        if not self.frame_prediction and self.cls_token_num != 1:
            raise ValueError(f"class-conditional models use cls_token_num=1, got {self.cls_token_num}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def hidden_dim(self) -> int:
        return find_multiple(int(8 * self.dim / 3), self.multiple_of)

    @property
    def embed_vocab(self) -> int:
        """Rows of the token embedding: the codebook, plus SEP in frame prediction."""
        return self.vocab_size + int(self.frame_prediction)

    @property
    def context_len(self) -> int:
        """Context tokens expected by frame prediction (SEP excluded)."""
        return self.cls_token_num - 1

    @property
    def pe_len(self) -> int:
        """Positions that ever enter the model: cond + max_seq_len - 1 tokens (the last one is only sampled)."""
        return self.max_seq_len + self.cls_token_num - 1

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GeneratorConfig":
        """A preset (``tiny``, ``B``, ``L``, ``LP``) with overrides; ``frame_prediction=True`` alone also sets
        ``cls_token_num = max_seq_len + 1`` (LARP's K600 layout)."""
        args = {**cls.presets().get(name, {}), **overrides}
        if args.get("frame_prediction") and "cls_token_num" not in overrides:
            overrides = {**overrides, "cls_token_num": args.get("max_seq_len", cls.max_seq_len) + 1}
        return super().from_name(name, **overrides)


class KVCache(nn.Module):
    """Static per-layer cache [B, H, S, Dh] in non-persistent buffers, written in place at tensor positions."""

    def __init__(self, batch: int, n_head: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H, S_new, Dh] at positions ``input_pos`` [S_new]; return the full caches."""
        # NOTE: index_copy_ with a device tensor keeps shapes static and the buffers' addresses fixed, which is
        # what CUDA graphs need (a Python-int slice would bake the position into the graph).
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, input_pos: Tensor | None = None, kv_pos: Tensor | None = None) -> Tensor:
        """x [B, L, dim] -> [B, L, dim].

        * no input_pos: causal self-attention over x, cache untouched (training, teacher forcing);
        * input_pos, no kv_pos (prefill from position 0): write the cache, causal attention over x itself;
        * input_pos and kv_pos (decode, L == 1): write position ``input_pos`` [1], attend to the cache slots
          ``kv_pos`` [S'] (positions of the first S' slots, S' <= cache length) masked to ``kv_pos <= input_pos``.
        """
        b, n, _ = x.shape
        q, k, v = self.wqkv(x).view(b, n, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x[B, H, L, Dh]
        if input_pos is not None:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            if kv_pos is not None:
                s = kv_pos.shape[0]
                # NOTE: S' is the live prefix rounded up to a bucket (generate.py), symbolic under compile: the
                # slice reads only those slots; the mask hides unwritten/stale slots inside the bucket. Stock SDPA
                # here because the mask depends on a device position (dera_fast.ops.attention has no key mask).
                mask = (kv_pos <= input_pos).view(1, 1, 1, s)
                out = F.scaled_dot_product_attention(q, k_all[:, :, :s].to(q.dtype), v_all[:, :, :s].to(q.dtype),
                                                     attn_mask=mask)
                return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, n, -1)))
        out = ops.attention(q, k, v, causal=True)
        out = out.transpose(1, 2).reshape(b, n, -1)  # [B, L, dim]
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    """One pre-norm transformer block: the unit FSDP2 ``fully_shard`` wraps."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: Tensor, input_pos: Tensor | None = None, kv_pos: Tensor | None = None) -> Tensor:
        h = x + self.attn(self.attn_norm(x), input_pos, kv_pos)
        return h + self.mlp(self.mlp_norm(h))


def _is_int_tensor(x) -> bool:
    return isinstance(x, Tensor) and not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


class ARGenerator(nn.Module):
    """LARP_AR ("llama-abs"): RMSNorm, SwiGLU, fused bias-free QKV, learned absolute PE, zero-init head.

    Parameters: ``tok_emb`` [embed_vocab, dim], ``cls_emb`` [num_classes + 1, dim] (class-conditional only),
    ``pos_emb`` [pe_len, dim], ``blocks.{i}`` (FSDP2 units), ``norm``, ``head`` [vocab_size, dim].
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.embed_vocab, cfg.dim)
        # Class dropout needs the extra null row; LARP creates it whenever class_dropout_prob > 0.
        self.cls_emb = None if cfg.frame_prediction else nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.pe_len, cfg.dim))
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Decode steps dera_fast.generate built for this model (compiled code and its warm-up record); not state.
        self.decode_steps: dict[tuple, Any] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
        nn.init.normal_(self.pos_emb, std=std)
        nn.init.zeros_(self.head.weight)

    # ---------------------------------------------------------------------------------------------------------
    # conditioning
    # ---------------------------------------------------------------------------------------------------------
    def check_cond(self, class_labels: Tensor | None, context_ids: Tensor | None, *, null_class: bool = True) -> None:
        """Raise ValueError for a missing, extra, malformed or out-of-range condition (eager, before any loop).

        The one place a condition is checked (:meth:`forward`, :meth:`loss`, :func:`dera_fast.generate.generate`).
        class_labels: int [B] in [0, num_classes), or up to num_classes itself with ``null_class`` (the null class
        that class dropout and guidance feed). context_ids: int [B, context_len] in [0, vocab_size), exactly that
        long. Range checks follow :func:`dera_fast.ops.value_checks`.
        """
        config = self.config
        if config.frame_prediction:
            if context_ids is None or class_labels is not None:
                raise ValueError("a frame-prediction model needs context_ids (and no class_labels)")
            length = config.context_len
            if _is_int_tensor(context_ids) and context_ids.dim() == 2 and context_ids.shape[1] > length:
                raise ValueError(f"context_ids has {context_ids.shape[1]} tokens, longer than the model's maximum "
                                 f"context of {length} (cls_token_num - 1; SEP is appended here)")
            if not _is_int_tensor(context_ids) or context_ids.dim() != 2 or context_ids.shape[1] != length:
                raise ValueError(f"context_ids must be an int tensor [B, {length}]: exactly the context clip's "
                                 f"{length} tokens (LARP protocol: first frames repeated to full length; SEP is "
                                 f"appended here), got {_describe(context_ids)}")
            check_index_range("context_ids", context_ids, config.vocab_size)
        else:
            if class_labels is None or context_ids is not None:
                raise ValueError("a class-conditional model needs class_labels (and no context_ids)")
            if not _is_int_tensor(class_labels) or class_labels.dim() != 1 or class_labels.numel() == 0:
                raise ValueError(f"class_labels must be a non-empty int tensor [B], got {_describe(class_labels)}")
            high = config.num_classes + int(null_class)
            bad = class_labels[(class_labels < 0) | (class_labels >= high)] if values_checked(class_labels) else None
            if bad is not None and bad.numel():
                raise ValueError(f"class id {int(bad[0])} out of range [0, {high})")

    def embed_cond(self, class_labels: Tensor | None = None, context_ids: Tensor | None = None) -> Tensor:
        """The conditioning embeddings [B, cls_token_num, dim] (before the position embedding)."""
        if self.config.frame_prediction:
            sep = context_ids.new_full((context_ids.shape[0], 1), self.config.vocab_size)
            return self.tok_emb(torch.cat([context_ids, sep], dim=1))  # [B, context_len + 1, dim]
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.config.class_dropout_prob
            class_labels = torch.where(drop, self.config.num_classes, class_labels)
        return self.cls_emb(class_labels).unsqueeze(1)  # [B, 1, dim]

    # ---------------------------------------------------------------------------------------------------------
    # full (teacher-forced) forward and loss
    # ---------------------------------------------------------------------------------------------------------
    def forward(self, ids: Tensor, class_labels: Tensor | None = None, context_ids: Tensor | None = None) -> Tensor:
        """Teacher-forced logits.

        Args: ids [B, n] input tokens (n <= max_seq_len - 1, may be 0); class_labels [B] or context_ids
        [B, context_len]. Returns logits [B, n + 1, vocab_size] in the model's dtype, row t predicting token
        t + 1 of the clip.
        """
        cfg = self.config
        if ids.dim() != 2 or ids.shape[1] > cfg.max_seq_len - 1:
            raise ValueError(f"ids must be [B, n] with n <= {cfg.max_seq_len - 1}, got {tuple(ids.shape)}")
        self.check_cond(class_labels, context_ids)
        h = torch.cat([self.embed_cond(class_labels, context_ids), self.tok_emb(ids)], dim=1)  # [B, c + n, dim]
        h = self.tok_dropout(h) + self.pos_emb[: h.shape[1]]  # LARP: dropout before the position embedding
        for block in self.blocks:
            h = block(h)
        h = h[:, cfg.cls_token_num - 1:]  # [B, n + 1, dim]
        return self.head(self.norm(h))

    def loss(self, ids: Tensor, class_labels: Tensor | None = None, context_ids: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy of the clip tokens ``ids`` [B, L] (L <= max_seq_len) in fp32."""
        # NOTE: self(...), not self.forward(...): FSDP2 unshards the root parameters in __call__'s hooks.
        logits = self(ids[:, :-1], class_labels, context_ids)  # [B, L, V]
        return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())

    # ---------------------------------------------------------------------------------------------------------
    # cached inference (driven by dera_fast.generate)
    # ---------------------------------------------------------------------------------------------------------
    def setup_caches(self, batch: int, length: int, dtype: torch.dtype | None = None) -> None:
        """Allocate (or keep, if the shape already matches) a static cache of ``length`` slots per layer, and
        the slot-position buffer ``kv_positions`` [length]."""
        dtype = dtype or self.pos_emb.dtype
        device = self.pos_emb.device
        cache = self.blocks[0].attn.kv_cache
        if cache is not None and cache.k_cache.shape[0] == batch and cache.k_cache.shape[2] == length \
                and cache.k_cache.dtype == dtype and cache.k_cache.device == device:
            return
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, self.config.n_head, length, self.config.head_dim, dtype, device)
        self.register_buffer("kv_positions", torch.arange(length, device=device), persistent=False)

    def reset_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def cache_len(self) -> int:
        cache = self.blocks[0].attn.kv_cache
        return 0 if cache is None else cache.k_cache.shape[2]

    def prefill(self, cond_emb: Tensor) -> Tensor:
        """Write the caches for positions [0, c) from cond embeddings [B, c, dim]; return last logits [B, V]."""
        c = cond_emb.shape[1]
        input_pos = torch.arange(c, device=cond_emb.device)
        h = cond_emb + self.pos_emb[:c]
        for block in self.blocks:
            h = block(h, input_pos)
        return self.head(self.norm(h[:, -1]))  # only the last row: the prefill of a 1025-token context is big

    def decode_step(self, ids: Tensor, input_pos: Tensor, kv_pos: Tensor) -> Tensor:
        """One cached step: ids [B, 1] at position ``input_pos`` [1] -> logits [B, V]; ``kv_pos`` as in
        :meth:`Attention.forward`."""
        h = self.tok_emb(ids) + self.pos_emb[input_pos]  # [B, 1, dim]
        for block in self.blocks:
            h = block(h, input_pos, kv_pos)
        return self.head(self.norm(h[:, 0]))

    def generate(self, **kwargs):
        """Shortcut for :func:`dera_fast.generate.generate` (same keyword arguments, same GenerateOutput)."""
        # NOTE: imported on use: the sampler takes the model, so this module never imports it at load time.
        from ..generate import generate

        return generate(self, **kwargs)

    # ---------------------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------------------
    model_type = "ar_generator"

    def save_pretrained(self, path: str | os.PathLike, *, tokenizer: dict | None = None,
                        files: dict[str, str] | None = None) -> None:
        """Write ``config.json`` + ``model.safetensors`` atomically (:mod:`dera_fast.models.pretrained` format).

        Args:
            tokenizer: provenance of the tokens it was trained on (``{"model_type", "tokens_per_clip",
                "codebook_size", "config_hash"}``), recorded in config.json and checked by ``dera_fast generate``.
            files: extra text files for the folder (name -> text), e.g. ``classes.json``.
        """
        from .pretrained import save_pretrained

        save_pretrained(path, model_type=self.model_type, config=self.config.to_dict(), state_dict=self.state_dict(),
                        extra={"tokenizer": tokenizer} if tokenizer else None, files=files)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, device: str | torch.device = "cpu") -> "ARGenerator":
        """Load a folder written by :meth:`save_pretrained` (also the bare-config folders of dera_fast <= 0.1) or a
        single self-describing .safetensors; eval mode, on ``device``."""
        from .pretrained import load_pretrained

        if args:  # the old positional form from_pretrained(path, device)
            warnings.warn("ARGenerator.from_pretrained(path, device): pass device= as a keyword", FutureWarning,
                          stacklevel=2)
            (device,) = args
        return load_pretrained(cls, path, config_cls=GeneratorConfig, device=device)
