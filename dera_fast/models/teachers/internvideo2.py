"""InternVideo2 video teacher (DeRA's motion teacher is InternVideo2-B/14), after OpenGVLab/InternVideo
``InternVideo2/single_modality/models/internvideo2_distill.py`` (``DistInternVideo2``).

Architecture (what the official distilled S/B/L-14 checkpoints hold):

* tubelet-1 3-D patch embedding, patch 14, 8 frames at 224 x 224 -> an 8 x 16 x 16 token grid;
* a class token and a stored joint position table ``[1, 1 + T*H*W, D]`` (initialised from InternVideo2's 3-D
  sin-cos table: the first D/4 channels encode t, the other 3D/4 the MAE 2-D table of (w, h); zeros for the class
  token). At another frame count or size the table is resized as InternVideo2's fine-tuning code does: linear
  along t, then bicubic over (h, w);
* pre-norm blocks: RMSNorm (eps 1e-6), attention without qkv bias whose q and k are RMS-normalised over the full
  width (all heads at once) before the head split, an MLP with GELU, and LayerScale on both branches.
  The official checkpoints were trained through flash-attn's ``FusedMLP``, whose activation is the tanh
  approximation of GELU (``gelu="tanh"``, the default); ``gelu="exact"`` is the unfused ``nn.GELU`` path.

Features: the patch tokens after the last block, class token dropped: ``[B, T*H*W, D]`` on grid (T, H, W).
``DistInternVideo2`` has no final norm. What follows its last block are the CLIP-distillation heads
(``clip_projector``: attention pooling to one vector, ``clip_decoder`` / ``final_clip_decoder``), which
summarise the clip and discard the per-token grid, so the last block's output is the deepest per-token
representation the model has. It is not normalised. DeRA's alignment loss is a per-token cosine similarity, which
ignores the scale. The ``clip_*`` heads (and a fine-tuned classifier's ``fc_norm`` / ``head``) are dropped when
loading.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dera_fast import ops

from ..blocks import RMSNorm
from ..embed import sincos_1d, sincos_2d
from ..pretrained import load_state_dict_strict
from .base import IMAGENET_MEAN, IMAGENET_STD, PretrainedTeacher, resample_clip
from .weights import rename_state, strip_prefixes

# keys of the official checkpoints that are not part of the feature path
DROP_KEYS = r"clip_.*|final_clip_decoder\..*|fc_norm\..*|head\..*"


@dataclass(frozen=True, kw_only=True)
class InternVideo2Config:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    patch: int = 14
    tubelet: int = 1
    frames: int = 8                # clips are uniformly resampled to this many frames
    image_size: int = 224          # frames are resized to image_size x image_size
    pos_frames: int = 8            # frames the stored position table covers (the official checkpoints: 8)
    pos_grid: int = 16             # spatial side of the stored table (224 / 14)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    gelu: str = "tanh"             # "tanh": flash-attn FusedMLP (the official training path); "exact": nn.GELU
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.dim % self.heads or self.dim % 16:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads} and by 16 (3-D sin-cos table)")
        if self.frames % self.tubelet or self.pos_frames % self.tubelet or self.image_size % self.patch:
            raise ValueError(f"frames={self.frames} and pos_frames={self.pos_frames} must be multiples of "
                             f"tubelet={self.tubelet}, image_size={self.image_size} of patch={self.patch}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' or 'exact', got {self.gelu!r}")


INTERNVIDEO2_PRESETS = {
    # distill_internvideo2_{small,base,large}_patch14_224: 8 frames at 224, tubelet 1
    "internvideo2-s14": InternVideo2Config(dim=384, depth=12, heads=6),
    "internvideo2-b14": InternVideo2Config(dim=768, depth=12, heads=12),
    "internvideo2-l14": InternVideo2Config(dim=1024, depth=24, heads=16),
}


def internvideo2_sincos(dim: int, t: int, g: int) -> Tensor:
    """InternVideo2's initial joint table [1, 1 + t*g*g, dim] float32: per token [emb_{dim/4}(t) ; MAE 2-D
    table_{3dim/4}(h, w)], t-major raster order, a zero row first for the class token."""
    temporal = sincos_1d(dim // 4, torch.arange(t, dtype=torch.float64))  # [t, dim/4]
    spatial = sincos_2d(dim // 4 * 3, g, g)  # [g*g, 3dim/4]
    table = torch.cat([temporal[:, None].expand(t, g * g, -1), spatial[None].expand(t, -1, -1)], dim=-1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table.reshape(t * g * g, dim)]).float()[None]


def resize_joint_table(table: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """[1, 1 + T*G*G, D] -> [1, 1 + T'*G'*G', D] for (T, G) -> (T', G'): linear over t, then bicubic over
    (h, w), both align_corners=False, in float32 (InternVideo2's run_finetuning.py); the class row is kept."""
    (t0, g0), (t1, g1) = src, dst
    cls, pos = table[:, :1], table[:, 1:].float()
    d = pos.shape[-1]
    if t0 != t1:
        pos = pos.view(t0, g0 * g0, d).permute(1, 2, 0)  # [G*G, D, T]
        pos = F.interpolate(pos, size=t1, mode="linear", align_corners=False)
        pos = pos.permute(2, 0, 1).reshape(1, t1 * g0 * g0, d)
    if g0 != g1:
        pos = pos.view(t1, g0, g0, d).permute(0, 3, 1, 2)  # [T', D, G, G]
        pos = F.interpolate(pos, size=(g1, g1), mode="bicubic", align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(1, t1 * g1 * g1, d)
    return torch.cat([cls, pos.to(table.dtype)], dim=1)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))  # the official init; checkpoints store the values

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() * self.gamma.float()).to(x.dtype)  # force_fp32, as the official LayerScale


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm, self.k_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)  # over the full width, before the split
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, d).unbind(2)  # 3 x [B, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        return self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(.))); parameter names as the official checkpoints."""

    def __init__(self, c: InternVideo2Config):
        super().__init__()
        self.norm1 = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c.dim, c.heads, c.norm_eps)
        self.ls1 = LayerScale(c.dim)
        self.norm2 = RMSNorm(c.dim, c.norm_eps)
        self.mlp = Mlp(c.dim, int(c.dim * c.mlp_ratio), c.gelu)
        self.ls2 = LayerScale(c.dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, c: InternVideo2Config):
        super().__init__()
        k = (c.tubelet, c.patch, c.patch)
        self.proj = nn.Conv3d(3, c.dim, k, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, D, T', h, w] -> [B, T'*h*w, D], t-major


class InternVideo2Teacher(PretrainedTeacher):
    """Frozen InternVideo2 (DistInternVideo2 backbone) -> last-block patch tokens [B, T'*h*w, dim] on grid
    (frames / tubelet, S/p, S/p); see the module docstring for the choice of features."""

    config_class = InternVideo2Config
    presets = INTERNVIDEO2_PRESETS

    def __init__(self, config: InternVideo2Config, *, pixel_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__(pixel_range)
        c = self.config = config
        self.feature_dim = c.dim
        self.grid = (c.frames // c.tubelet, c.image_size // c.patch, c.image_size // c.patch)
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(internvideo2_sincos(c.dim, c.pos_frames // c.tubelet, c.pos_grid))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.register_buffer("mean", torch.tensor(c.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, 3, 1, 1, 1), persistent=False)
        self.freeze()

    def position_table(self) -> Tensor:
        """The position table at this teacher's grid: [1, 1 + T'*h*w, dim]."""
        c = self.config
        src, dst = (c.pos_frames // c.tubelet, c.pos_grid), (self.grid[0], self.grid[1])
        return self.pos_embed if src == dst else resize_joint_table(self.pos_embed, src, dst)

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        c = self.config
        x = resample_clip(self._unit(video), c.frames, c.image_size)  # [B, 3, T', S, S]
        x = ((x - self.mean) / self.std).to(self.cls_token.dtype)
        tokens = self.patch_embed(x)  # [B, N, D]
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        h = h + self.position_table().to(h.dtype)  # [B, 1 + N, D]
        for blk in self.blocks:
            h = blk(h)
        return h[:, 1:]

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], config: InternVideo2Config | str | None = None, *,
                        meta: dict[str, str] | None = None, pixel_range: tuple[float, float] = (-1.0, 1.0),
                        source: str = "state dict") -> "InternVideo2Teacher":
        """config: a preset of INTERNVIDEO2_PRESETS, an InternVideo2Config, or None for a ``convert-teacher``
        file (its recorded config). "module." / "model." / "backbone." / "encoder." prefixes are stripped and
        the ``clip_*`` distillation heads (and a classifier's ``fc_norm`` / ``head``) dropped; every other key
        must match (the official names are this class's names)."""
        config, model = cls._resolve(state, config, meta, pixel_range=pixel_range, source=source)
        if model is not None:
            return model
        state = rename_state(strip_prefixes(state, r"module\.|model\.|backbone\.|encoder\."), [], drop=DROP_KEYS)
        model = cls(config, pixel_range=pixel_range)
        load_state_dict_strict(model, state, source=source)
        return model.freeze()
