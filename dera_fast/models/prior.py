"""LARP's training-time AR prior (GPTC over continuous codes) and its two-round scheduled-sampling loss.

SPEC.md §2.5 (LARP-code `models/gptc.py`, `larp_tokenizer.py:476-570`). Submodule names follow GPTC's
(input_proj, pos_emb, blocks.i.{ln1, attn.{query, key, value, proj}, ln2}, ln_f, head) except the MLP, whose
`nn.Sequential` indices 0 / 2 are named fc1 / fc2 here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dera_fast import ops


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, dim = x.shape
        heads, hd = self.num_heads, dim // self.num_heads
        q, k, v = (lin(x).view(b, n, heads, hd).transpose(1, 2) for lin in (self.query, self.key, self.value))
        if self.training and self.dropout > 0:
            # NOTE: dera_fast.ops.attention has no dropout; GPTC trains with attention dropout 0.1
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)
        else:
            out = ops.attention(q, k, v, causal=True)
        return self.resid_drop(self.proj(out.transpose(1, 2).reshape(b, n, dim)))


class PriorBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class GPTCPrior(nn.Module):
    """Causal GPT over l2-normalised codes: [B, N, code_dim] -> next-code predictions [B, N, code_dim]."""

    def __init__(self, code_dim: int, dim: int, depth: int, num_heads: int, max_len: int, dropout: float):
        super().__init__()
        self.input_proj = nn.Linear(code_dim, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PriorBlock(dim, num_heads, dropout) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, code_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, n, code_dim] -> [B, n, code_dim] (position i predicts code i + 1)."""
        h = self.drop(self.input_proj(x) + self.pos_emb[:, :x.shape[1]])
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))

    def ar_predict(self, codes: Tensor) -> Tensor:
        """Teacher-forced prediction: codes [B, N, c] -> normalize(cat(codes[:, :1], GPT(codes[:, :-1]))) [B, N, c]."""
        pred = self(codes[:, :-1])  # [B, N-1, c]
        return F.normalize(torch.cat([codes[:, :1], pred], dim=1), dim=-1)


def ss_ratio(step: int | None, max_steps: int | None, *, max_ratio: float = 0.5, peak_fraction: float = 0.3) -> float:
    """Scheduled-sampling probability: min(step / (peak_fraction * max_steps) * max_ratio, max_ratio).

    Without a step (None) the ramp is taken as finished (max_ratio).
    """
    if step is None or max_steps is None:
        return max_ratio
    return min(step / (max_steps * peak_fraction) * max_ratio, max_ratio)


def prior_loss(prior: GPTCPrior, codes: Tensor, ids: Tensor, codebook: Tensor, *, ratio: float, rounds: int = 2,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """LARP's prior loss: cross-entropy of cos(pred, c_k)/temperature, averaged over scheduled-sampling rounds.

    Args:
        prior: the GPTC prior.
        codes: [B, N, c] straight-through quantized codes (LARP's regularized_z); gradients reach the encoder.
        ids: int64 [B, N] the sampled code ids; labels are ids[:, 1:].
        codebook: [K, c] raw codebook; detached here (LARP's get_emb().detach()), so the loss never updates it.
        ratio: probability that a position of a later round's input is replaced by a code drawn from the
            previous round's softmax(logits) (one Bernoulli mask (B, N-1) shared by all rounds, as LARP).
        rounds: number of rounds (LARP: 2). Every round keeps gradients.
        temperature: logit temperature (LARP's latent_ce_temperature = 1).
        generator: optional torch.Generator for the mask and the draws.
    Returns:
        scalar fp32 loss.
    """
    b, n, c = codes.shape
    codebook = codebook.detach()
    labels = ids[:, 1:].reshape(-1)  # [B*(N-1)]
    mask = torch.rand(b, n - 1, 1, device=codes.device, generator=generator) < ratio  # [B, N-1, 1]
    x, losses = codes, []
    for r in range(rounds):
        pred = prior.ar_predict(x)[:, 1:].reshape(-1, c)  # [B*(N-1), c], unit rows
        losses.append(ops.codebook_cross_entropy(pred, codebook, labels, temperature=temperature))
        if r < rounds - 1:
            drawn = ops.vq_sample(pred.detach(), codebook, temperature=temperature, generator=generator)
            emb = F.normalize(codebook.float(), dim=-1)[drawn].view(b, n - 1, c).to(codes.dtype)
            x = torch.cat([codes[:, :1], torch.where(mask, emb, codes[:, 1:])], dim=1)
    return torch.stack(losses).mean()
