"""timm-style pre-LN transformer block and LARP's in-context encoder/decoder stack (SPEC.md §2.3).

Block: x += proj(Attn(LN(x))); x += fc2(GELU_erf(fc1(LN(x)))); qkv without bias, proj / fc1 / fc2 with bias, no
LayerScale, no drop-path. Submodule names match timm's `Block` (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2) so LARP checkpoints map one-to-one. Attention goes through `dera_fast.ops.attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dera_fast import ops


class Attention(nn.Module):
    """Multi-head self-attention with a fused, bias-free qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, *, keep_last: int = 0, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """x [B, L, dim] -> [B, L, dim], or [B, keep_last, dim] for only the last keep_last query rows.

        In varlen mode x is [1, T, dim] holding S packed sequences delimited by ``cu_seqlens`` (int32 [S+1]).
        """
        b, length, dim = x.shape
        heads, hd = self.num_heads, dim // self.num_heads
        if keep_last:
            # NOTE: queries only for the kept rows; keys/values for all (saves a third of the qkv GEMM there)
            w = self.qkv.weight  # [3*dim, dim], rows ordered (q, k, v)
            q = F.linear(x[:, -keep_last:], w[:dim]).view(b, keep_last, heads, hd).transpose(1, 2)
            kv = F.linear(x, w[dim:]).view(b, length, 2, heads, hd).permute(2, 0, 3, 1, 4)  # [2, B, H, L, hd]
            k, v = kv[0], kv[1]
        else:
            qkv = self.qkv(x).view(b, length, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, L, hd]
            q, k, v = qkv[0], qkv[1], qkv[2]
        out = ops.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)  # [B, H, Lq, hd]
        out = out.transpose(1, 2).reshape(b, q.shape[2], dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class Block(nn.Module):
    """Pre-LN transformer block (timm `vision_transformer.Block` with qkv_bias=False)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, *, keep_last: int = 0, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None) -> Tensor:
        """x [B, L, dim] -> [B, L, dim]; with keep_last > 0 only the last keep_last rows are computed and returned
        (attention still reads every row; the residual and the MLP then run on the kept rows only)."""
        h = self.attn(self.norm1(x), keep_last=keep_last, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        x = (x[:, -keep_last:] if keep_last else x) + h
        return x + self.mlp(self.norm2(x))


class InContextTransformer(nn.Module):
    """LARP's `TransformerEncoderParallel`: run [context, query] through the blocks, keep the query rows.

    No final LayerNorm. Used for both the encoder and the decoder.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth))

    def forward(self, context: Tensor, query: Tensor) -> Tensor:
        """context [B, Nc, dim], query [B, Nq, dim] -> [B, Nq, dim] (the query rows after the last block)."""
        n = query.shape[1]
        h = torch.cat([context, query], dim=1)  # [B, Nc + Nq, dim]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            h = blk(h, keep_last=n if i == last else 0)
        return h


class RMSNorm(nn.Module):
    """RMSNorm as LARP's generator and InternVideo2 compute it: normalise in fp32, cast back to the input dtype,
    then scale (so the logits match theirs bit for bit)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def xavier_init_linears(module: nn.Module) -> None:
    """LARP's `initialize_weights` pass: xavier_uniform weight and zero bias for every nn.Linear below module."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
