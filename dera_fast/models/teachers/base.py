"""What every teacher shares: the ``Teacher`` protocol, the frozen-module base and its loader, input resampling and the ViT block
used by the DINOv2/v3 and VideoMAE teachers."""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dera_fast import ops

from ..pretrained import load_state_dict_strict
from .weights import read_state_dict, recorded_config, resolve_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@runtime_checkable
class Teacher(Protocol):
    grid: tuple[int, ...]  # token grid of features(): (h, w) or (t, h, w)
    feature_dim: int

    def features(self, video: Tensor) -> Tensor:
        """video [B, C, T, H, W] in the teacher's pixel_range -> [B, prod(grid), feature_dim]."""


class Frozen(nn.Module):
    """Frozen (no grad, always eval) module with the pixel-range handling shared by the teachers."""

    def __init__(self, pixel_range: tuple[float, float]):
        super().__init__()
        self.pixel_range = tuple(pixel_range)

    def freeze(self):
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher never trains (and never uses dropout / augmentation)

    def _unit(self, video: Tensor) -> Tensor:
        """video in pixel_range -> [0, 1] float."""
        if not isinstance(video, Tensor) or video.dim() != 5 or not video.is_floating_point():
            raise ValueError(f"video must be a float [B, C, T, H, W] tensor, got "
                             f"{getattr(video, 'dtype', type(video).__name__)} {tuple(getattr(video, 'shape', ()))}")
        lo, hi = self.pixel_range
        return (video.float() - lo) / (hi - lo)


class PretrainedTeacher(Frozen):
    """A frozen teacher built from local weights. Subclasses set ``config_class`` and ``presets`` (name -> config)
    and implement ``from_state_dict(state, config, *, meta, pixel_range, source, ...)``, starting it with
    :meth:`_resolve` (which loads ``convert-teacher`` files, already in the class's own layout)."""

    config_class: type
    presets: dict

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config=None, *, pixel_range: tuple[float, float] = (-1.0, 1.0),
                        **kwargs):
        """Load weights from a local file (safetensors, or an official .pth / .bin read with ``weights_only=True``;
        a top-level "model" / "module" dict is unwrapped) or a directory holding one. ``config``: a preset name,
        a config object, or None for a ``convert-teacher`` file; it and ``kwargs`` go to :meth:`from_state_dict`."""
        state, meta = read_state_dict(path)
        return cls.from_state_dict(state, config, meta=meta, pixel_range=pixel_range, source=str(path), **kwargs)

    @classmethod
    def _resolve(cls, state: dict[str, Tensor], config, meta: dict[str, str] | None, *,
                 pixel_range: tuple[float, float], source: str):
        """(config, model): the config from a preset name, a config object or the file's recorded config; the
        model, loaded and frozen, when the file is a ``convert-teacher`` file (its state is in our layout), else
        None (the caller maps the foreign layout)."""
        recorded = recorded_config(meta, cls.config_class)
        config = resolve_config(config, cls.presets, cls.config_class, recorded)
        if recorded is None:
            return config, None
        model = cls(config, pixel_range=pixel_range)
        load_state_dict_strict(model, state, source=source)
        return config, model.freeze()


def resample_clip(x: Tensor, frames: int, size: int) -> Tensor:
    """[B, C, T, H, W] -> [B, C, frames, size, size]: uniform temporal resampling (nearest frame of
    ``linspace(0, T - 1, frames)``), then a bilinear (antialiased) resize of every frame."""
    b, c, t = x.shape[:3]
    if t != frames:
        x = x[:, :, torch.linspace(0, t - 1, frames, device=x.device).round().long()]
    if tuple(x.shape[3:]) == (size, size):
        return x
    x = x.transpose(1, 2).reshape(b * frames, c, *x.shape[3:])  # [B*T', C, H, W]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.view(b, frames, c, size, size).transpose(1, 2)  # [B, C, T', S, S]


class ViTBlock(nn.Module):
    """Pre-LN ViT block with optional LayerScale and optional RoPE on the patch tokens (DINOv2/v3, VideoMAE)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, layerscale: bool, split_qv_bias: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=not split_qv_bias)
        # VideoMAE: q and v biases, no k bias
        self.q_bias = nn.Parameter(torch.zeros(dim)) if split_qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if split_qv_bias else None
        self.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(torch.ones(dim)) if layerscale else None
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.ls2 = nn.Parameter(torch.ones(dim)) if layerscale else None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = x.shape
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(self.norm1(x), self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, hd]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        h = self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + (h * self.ls2 if self.ls2 is not None else h)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last sin.shape[0] tokens of x [B, H, N, hd] (prefix tokens untouched), rotate-half convention."""
    n = sin.shape[0]
    pre, pat = x[:, :, :-n], x[:, :, -n:]
    x1, x2 = pat.chunk(2, dim=-1)
    return torch.cat([pre, pat * cos + torch.cat([-x2, x1], dim=-1) * sin], dim=2)
