"""VideoMAE-style video ViT teacher (tubelets, fixed sin-cos PE, q/v biases).

Loads the official VideoMAE layout (MCG-NJU/VideoMAE; the ``encoder.`` prefix of pre-training checkpoints is
stripped) or HF ``VideoMAEModel``. Features are the final-norm patch tokens on grid (t, h, w).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..pretrained import load_state_dict_strict
from .base import IMAGENET_MEAN, IMAGENET_STD, PretrainedTeacher, ViTBlock, resample_clip
from .weights import fuse_qkv, rename_state, resolve_layout, strip_prefixes


@dataclass(frozen=True, kw_only=True)
class VideoViTConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    patch: int = 16
    tubelet: int = 2
    frames: int = 16               # clips are uniformly resampled to this many frames
    image_size: int = 224
    learned_pos: bool = False      # VideoMAE: fixed sin-cos table (not stored in the checkpoint)
    layerscale: bool = False
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


VIDEO_PRESETS = {"videomae-b": VideoViTConfig()}


def videomae_sincos(n: int, dim: int) -> Tensor:
    """VideoMAE's fixed table: angle(p, j) = p / 10000^(2 floor(j/2) / dim); sin on even j, cos on odd j."""
    j = torch.arange(dim, dtype=torch.float64)
    angle = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (2 * (j // 2) / dim)  # [n, dim]
    return torch.where(j.long() % 2 == 0, angle.sin(), angle.cos()).float()[None]


class VideoViTTeacher(PretrainedTeacher):
    """Frozen VideoMAE-style video ViT -> final-norm patch tokens [B, t*h*w, dim] on grid (t, h, w)."""

    config_class = VideoViTConfig
    presets = VIDEO_PRESETS

    def __init__(self, config: VideoViTConfig, *, pixel_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__(pixel_range)
        c = self.config = config
        self.feature_dim = c.dim
        self.grid = (c.frames // c.tubelet, c.image_size // c.patch, c.image_size // c.patch)
        n = self.grid[0] * self.grid[1] * self.grid[2]
        k = (c.tubelet, c.patch, c.patch)
        self.patch_embed = nn.Conv3d(3, c.dim, k, k)
        if c.learned_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, n, c.dim))
        else:
            self.register_buffer("pos_embed", videomae_sincos(n, c.dim), persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(c.dim, c.heads, c.mlp_ratio, c.ln_eps, c.layerscale, True)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.ln_eps)
        self.register_buffer("mean", torch.tensor(c.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, 3, 1, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        c = self.config
        x = resample_clip(self._unit(video), c.frames, c.image_size)  # [B, C, T', S, S]
        x = ((x - self.mean) / self.std).to(self.norm.weight.dtype)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], config: VideoViTConfig | str | None = None, *,
                        meta: dict[str, str] | None = None, layout: str = "auto",
                        pixel_range: tuple[float, float] = (-1.0, 1.0),
                        source: str = "state dict") -> "VideoViTTeacher":
        """Build the teacher from VideoMAE weights: official layout (blocks.i.attn.qkv + q_bias/v_bias;
        "encoder." prefix of pre-training checkpoints stripped) or HF VideoMAEModel ("videomae." prefix
        stripped); a ``convert-teacher`` file (config None: its recorded config) is in our own layout. A final
        fc_norm (mean-pooling checkpoints) serves as the per-token final norm."""
        config, model = cls._resolve(state, config, meta, pixel_range=pixel_range, source=source)
        if model is not None:
            return model
        state = strip_prefixes(state, r"module\.|model\.|videomae\.|encoder\.(?!layer\.)")
        layout = resolve_layout(layout, state, ("embeddings.", "encoder.layer."))
        model = cls(config, pixel_range=pixel_range)
        if layout == "hf":
            for i in range(config.depth):
                pre = f"encoder.layer.{i}.attention.attention"
                for src, dst in (("query", "q_bias"), ("value", "v_bias")):  # transformers >= 5 names
                    if f"{pre}.{src}.bias" in state:
                        state[f"{pre}.{dst}"] = state.pop(f"{pre}.{src}.bias")
                fuse_qkv(state, pre, ("query", "key", "value"), f"blocks.{i}.qkv")
            rules = [(r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.\1"),
                     (r"encoder\.layer\.(\d+)\.attention\.attention\.([qv]_bias)", r"blocks.\1.\2"),
                     (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.proj.\2"),
                     (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
                     (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
                     (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.fc1.\2"),
                     (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.fc2.\2"),
                     (r"(?:layernorm|fc_norm)\.(weight|bias)", r"norm.\1")]
            drop = r"classifier\..*"
        else:
            rules = [(r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
                     (r"blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias)", r"blocks.\1.\2"),
                     (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.proj.\2"),
                     (r"blocks\.(\d+)\.gamma_([12])", r"blocks.\1.ls\2"),
                     (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
                     (r"fc_norm\.(weight|bias)", r"norm.\1")]
            drop = r"head\..*|decoder.*|encoder_to_decoder.*|mask_token"
        load_state_dict_strict(model, rename_state(state, rules, drop=drop), source=source)
        return model.freeze()
