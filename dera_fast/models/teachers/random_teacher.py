"""Seeded random teachers: frozen stand-ins (SPEC §7.2) for tests and CPU smoke runs, never for real training
(the trainer uses them only when asked: the ``tiny`` preset or ``teachers="random"``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Frozen


class RandomTeacher(Frozen):
    """Frozen random stand-in (SPEC §7.2): image = Conv2d(C, dim, p, p) + GELU + 1x1 conv on frame 0;
    video = Conv3d(C, dim, (t, p, p)) + GELU + 1x1x1 conv on the clip. Weights depend only on ``seed``."""

    def __init__(self, kind: str = "image", *, seed: int = 0, dim: int = 32, frames: int = 8, size: int = 32,
                 patch: int = 8, tubelet: int = 4, in_channels: int = 3,
                 pixel_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__(pixel_range)
        if kind not in ("image", "video"):
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
        self.kind, self.frames, self.size, self.feature_dim = kind, frames, size, dim
        if kind == "image":
            self.embed, self.mix = nn.Conv2d(in_channels, dim, patch, patch), nn.Conv2d(dim, dim, 1)
            self.grid = (size // patch, size // patch)
        else:
            k = (tubelet, patch, patch)
            self.embed, self.mix = nn.Conv3d(in_channels, dim, k, k), nn.Conv3d(dim, dim, 1)
            self.grid = (frames // tubelet, size // patch, size // patch)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # N(0, 1/fan_in): unit-scale features, independent of the global RNG
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (p.dim() > 1))
        self.freeze()

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        x = self._unit(video)
        if tuple(x.shape[2:]) != (self.frames, self.size, self.size):
            raise ValueError(f"RandomTeacher expects [B, C, {self.frames}, {self.size}, {self.size}], "
                             f"got {tuple(video.shape)}")
        x = x[:, :, 0] if self.kind == "image" else x
        return self.mix(F.gelu(self.embed(x))).flatten(2).transpose(1, 2)  # [B, N, dim]
