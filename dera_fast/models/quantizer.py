"""LARP's stochastic vector quantiser (SVQ), built on dera_fast.ops.vq (SPEC.md §2.4).

    z     = normalize(in_linear(h))                       # [B, L, code_dim]
    k*    ~ softmax_k(cos(z, c_k) / tau)   (training)     # argmax in eval (deterministic by default)
    q     = normalize(e_{k*})
    loss  = beta * |sg(q) - z|^2 + w_cb * |q - sg(z)|^2   # commitment + codebook, means over elements
    codes = z + sg(q - z)                                 # straight-through estimator
    out   = out_linear(codes)                             # [B, L, dim]

Submodule names (``in_linear``, ``out_linear``, ``embedding``) follow LARP's bottleneck so its checkpoints map 1:1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


class VQOutput(NamedTuple):
    ids: Tensor  # [B, L] int64 code ids
    quantized: Tensor  # [B, L, dim]: out_linear(codes), the decoder's input
    codes: Tensor  # [B, L, code_dim]: straight-through l2-normalised codes (LARP's regularized_z)
    losses: dict  # "commitment", "codebook", "vq" (= beta * commitment + codebook_weight * codebook), fp32 0-dim


class VectorQuantizer(nn.Module):
    """Stochastic VQ bottleneck: linear in, l2-normalised cosine codebook, linear out.

    Args:
        dim: width of the tokens going in and out.
        codebook_size: K.
        code_dim: width of the codes (LARP: 16).
        temperature: tau of the sampling softmax over cosines (LARP: 0.03).
        beta: commitment-loss weight (0.25).
        codebook_weight: codebook-loss weight (1.0).
        stochastic: sample in training (SVQ); if False, training also takes the nearest code.
    Attribute ``deterministic_eval`` (default True): in eval mode take the argmax instead of sampling.
    """

    def __init__(self, dim: int, codebook_size: int, code_dim: int, *, temperature: float = 0.03,
                 beta: float = 0.25, codebook_weight: float = 1.0, stochastic: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.temperature, self.beta, self.codebook_weight = temperature, beta, codebook_weight
        self.stochastic = stochastic
        self.deterministic_eval = True
        self.in_linear = nn.Linear(dim, code_dim)
        self.out_linear = nn.Linear(code_dim, dim)
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.kaiming_uniform_(self.embedding.weight)

    def normalized_codebook(self) -> Tensor:
        """[K, code_dim] fp32 unit rows."""
        return F.normalize(self.embedding.weight.float(), dim=-1)

    def codes_from_ids(self, ids: Tensor) -> Tensor:
        """ids [...] -> unit code vectors [..., code_dim] fp32."""
        self._check_ids(ids)
        return F.normalize(self.embedding(ids).float(), dim=-1)

    def decode_ids(self, ids: Tensor) -> Tensor:
        """ids [B, L] -> decoder input [B, L, dim] (LARP's decode_from_bottleneck before the decoder)."""
        return self.out_linear(self.codes_from_ids(ids).to(self.out_linear.weight.dtype))

    def forward(self, h: Tensor, *, generator: torch.Generator | None = None) -> VQOutput:
        """h [B, L, dim] -> VQOutput. Sampling in training (if stochastic), argmax in deterministic eval."""
        if h.dim() != 3:
            raise ValueError(f"h must be [B, L, dim], got shape {tuple(h.shape)}")
        B, L, _ = h.shape
        z_raw = self.in_linear(h)
        with torch.autocast(device_type=h.device.type, enabled=False):  # quantiser math in fp32, as LARP
            z = F.normalize(z_raw.float(), dim=-1)
            emb = self.normalized_codebook()
            flat = z.detach().reshape(B * L, self.code_dim)  # [B*L, code_dim]
            sample = self.stochastic and (self.training or not self.deterministic_eval)
            if sample:
                ids = ops.vq_sample(flat, emb, temperature=self.temperature, generator=generator)
            else:
                ids = ops.vq_nearest(flat, emb, metric="cosine")
            ids = ids.view(B, L)
            q = F.embedding(ids, emb)  # [B, L, code_dim], differentiable w.r.t. the codebook
            commitment = F.mse_loss(z, q.detach())
            codebook = F.mse_loss(q, z.detach())
            codes = z + (q - z).detach()
        losses = {"commitment": commitment, "codebook": codebook,
                  "vq": self.beta * commitment + self.codebook_weight * codebook}
        quantized = self.out_linear(codes.to(self.out_linear.weight.dtype))
        return VQOutput(ids, quantized, codes, losses)

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if not torch.compiler.is_compiling() and ids.numel() and (
                bool((ids < 0).any()) or bool((ids >= self.codebook_size).any())):
            raise ValueError(f"ids must be in [0, {self.codebook_size}), got min {int(ids.min())} "
                             f"max {int(ids.max())}")

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, temperature={self.temperature}, "
                f"beta={self.beta}, stochastic={self.stochastic}")
