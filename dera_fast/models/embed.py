"""Fixed sin-cos positional encodings and patch embeddings (SPEC.md §2.2, §3.2).

The sin-cos tables follow LARP's `models/embed.py` (MAE recipe) exactly, in float64 then cast to float32:
  1-D: emb(pos) = [sin(pos * w_i), cos(pos * w_i)], w_i = 1 / base^(i / (D/2)), i < D/2;
  2-D: [emb_{D/2}(column), emb_{D/2}(row)] (the first half encodes the w coordinate, as MAE's meshgrid does);
  3-D: PE[t, h, w] = PE2D[h, w] + emb_D(t); flattened t-major, then h, then w (Conv3d raster order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(dim: int, pos: Tensor, base: float = 10000.0) -> Tensor:
    """[M] positions -> [M, dim] float64 sin-cos table (dim even)."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # [M, dim/2]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """[grid_h * grid_w, dim] float64, row-major over (h, w)."""
    rows = torch.arange(grid_h, dtype=torch.float64)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64)[None, :].expand(grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int) -> Tensor:
    """[grid_t * grid_h * grid_w, dim] float32: 2-D spatial table plus a full-width 1-D table of t."""
    pe2 = sincos_2d(dim, grid_h, grid_w)  # [h*w, dim]
    pe1 = sincos_1d(dim, torch.arange(grid_t, dtype=torch.float64))  # [t, dim]
    return (pe2[None] + pe1[:, None]).reshape(-1, dim).float()


class PatchEmbed3D(nn.Module):
    """Non-overlapping (pt, p, p) tubelets -> tokens. Holds a Conv3d weight (LARP's `x_embedder.proj` layout).

    NOTE: stride == kernel, so the conv is a reshape plus one GEMM against the flattened (C, pt, p, p) weight;
    that is what forward runs (cheaper than cuDNN's Conv3d, identical numbers up to summation order).
    """

    def __init__(self, in_channels: int, dim: int, patch_t: int, patch: int):
        super().__init__()
        self.patch_size = (patch_t, patch, patch)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, T, H, W] -> [B, (T/pt)(H/p)(W/p), dim], t-major raster order."""
        b, c, t, h, w = x.shape
        pt, p, _ = self.patch_size
        x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * pt * p * p)  # [B, N, C*pt*p*p]
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)

    def reset_parameters(self) -> None:
        """LARP's init: xavier_uniform on the flattened (dim, C*pt*p*p) weight, zero bias."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


class PatchEmbed2D(nn.Module):
    """Non-overlapping p x p patches of one frame -> tokens (DeRA's appearance stream; a Conv2d weight)."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, C, H, W] -> [B, (H/p)(W/p), dim], row-major."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)

    def reset_parameters(self) -> None:
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch_t: int, patch: int, channels: int) -> Tensor:
    """[B, t*h*w, pt*p*p*C] (last dim ordered pt, p, p, C as LARP) -> video [B, C, t*pt, h*p, w*p]."""
    t, h, w = grid
    b = x.shape[0]
    x = x.reshape(b, t, h, w, patch_t, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, t, pt, h, p, w, p]
    return x.reshape(b, channels, t * patch_t, h * patch, w * patch)
