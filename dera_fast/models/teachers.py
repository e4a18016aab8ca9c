"""Frozen alignment teachers for DeRA (SPEC.md §3.5, ECOSYSTEM.md §3.4); nothing is downloaded.

  Teacher           protocol: features(video [B, C, T, H, W] in pixel_range) -> [B, N, feature_dim], plus `grid`
  RandomTeacher     seeded random conv nets (SPEC §7.2 stand-ins) for tests and CPU smoke runs
  ImageViTTeacher   DINOv2 / DINOv3-style ViT on frame 0; loads local safetensors in the torch-hub layout
                    (facebookresearch/dinov2, dinov3) or the HF layout (Dinov2Model, DINOv3ViTModel)
  VideoViTTeacher   VideoMAE-style video ViT (tubelets, fixed sin-cos PE, q/v biases); loads the official
                    VideoMAE layout or HF VideoMAEModel
Teachers resize inputs to their own fixed size, so `grid` is fixed: (h, w) for images, (t, h, w) for videos.
Features are the final-norm patch tokens (class / register tokens dropped).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from dera_fast import ops

from .dera import AlignTargets
from .tokenizer_base import load_state_dict_strict, rename_key

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@runtime_checkable
class Teacher(Protocol):
    grid: tuple[int, ...]  # token grid of features(): (h, w) or (t, h, w)
    feature_dim: int

    def features(self, video: Tensor) -> Tensor:
        """video [B, C, T, H, W] in the teacher's pixel_range -> [B, prod(grid), feature_dim]."""


class _Frozen(nn.Module):
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


# --------------------------------------------------------------------------------------------- random teacher
class RandomTeacher(_Frozen):
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


# --------------------------------------------------------------------------------------------- shared ViT parts
class _Block(nn.Module):
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
            q, k = _rope(q, *rope), _rope(k, *rope)
        h = self.proj(ops.attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        x = x + (h * self.ls1 if self.ls1 is not None else h)
        h = self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return x + (h * self.ls2 if self.ls2 is not None else h)


def _rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last sin.shape[0] tokens of x [B, H, N, hd] (prefix tokens untouched), rotate-half convention."""
    n = sin.shape[0]
    pre, pat = x[:, :, :-n], x[:, :, -n:]
    x1, x2 = pat.chunk(2, dim=-1)
    return torch.cat([pre, pat * cos + torch.cat([-x2, x1], dim=-1) * sin], dim=2)


def _load_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else str(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found (teachers load local safetensors files only)")
    return load_file(file)


def _rename(state: dict[str, Tensor], rules: list[tuple[str, str]], drop: str) -> dict[str, Tensor]:
    """Apply the first matching (regex, template) rule to every key; drop keys matching ``drop``."""
    out = {}
    for key, value in state.items():
        if re.fullmatch(drop, key):
            continue
        out[rename_key(key, rules) or key] = value
    return out


def _fuse_qkv(state: dict[str, Tensor], prefix: str, names: tuple[str, str, str], dst: str) -> None:
    """Concatenate separate q/k/v Linears (HF layouts) into one qkv tensor; a missing k bias becomes zeros."""
    for kind in ("weight", "bias"):
        parts = [state.pop(f"{prefix}.{n}.{kind}", None) for n in names]
        if all(p is None for p in parts):
            continue
        if kind == "bias" and parts[1] is None and parts[0] is not None:
            parts[1] = torch.zeros_like(parts[0])
        if any(p is None for p in parts):  # leave the fragments so the strict load names them
            state.update({f"{prefix}.{n}.{kind}": p for n, p in zip(names, parts) if p is not None})
            continue
        state[f"{dst}.{kind}"] = torch.cat(parts)


# --------------------------------------------------------------------------------------------- image ViT
@dataclass(frozen=True, kw_only=True)
class ImageViTConfig:
    dim: int = 768
    depth: int = 12
    heads: int = 12
    patch: int = 14
    image_size: int = 224          # input frames are resized to image_size x image_size
    num_registers: int = 0         # DINOv2-reg / DINOv3 register ("storage") tokens
    pos: str = "abs"               # "abs": learned table (DINOv2, bicubic-resized); "rope": DINOv3 2-D RoPE
    pos_grid: int = 37             # side of the pretrained absolute table (DINOv2: 518 / 14)
    pos_interp_offset: float = 0.1  # DINOv2's bicubic resize of the table uses scale (grid + offset) / pos_grid
    pos_interp_antialias: bool = False  # (the register variants: offset 0, antialias True)
    rope_base: float = 100.0
    layerscale: bool = True
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-6
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


IMAGE_PRESETS = {
    "dinov2-b14": ImageViTConfig(),
    "dinov2-b14-reg": ImageViTConfig(num_registers=4, pos_interp_offset=0.0, pos_interp_antialias=True),
    # SPEC §3.5: frame 0 resized to 256 -> 16 x 16 patch grid
    "dinov3-b16": ImageViTConfig(patch=16, image_size=256, num_registers=4, pos="rope", ln_eps=1e-5),
}


class ImageViTTeacher(_Frozen):
    """Frozen DINOv2/DINOv3-style ViT on frame 0 -> final-norm patch tokens [B, (S/p)^2, dim]."""

    def __init__(self, config: ImageViTConfig, *, pixel_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__(pixel_range)
        c = self.config = config
        self.feature_dim = c.dim
        self.grid = (c.image_size // c.patch, c.image_size // c.patch)
        self.patch_embed = nn.Conv2d(3, c.dim, c.patch, c.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, c.num_registers, c.dim)) if c.num_registers else None
        if c.pos == "abs":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.pos_grid ** 2, c.dim))
        elif c.pos == "rope":
            hd = c.dim // c.heads  # DINOv3 periods: base^(2i / (hd/2)), i < hd/4
            self.register_buffer("rope_periods", c.rope_base ** (2 * torch.arange(hd // 4) / (hd // 2)))
        else:
            raise ValueError(f"pos must be 'abs' or 'rope', got {c.pos!r}")
        self.blocks = nn.ModuleList(_Block(c.dim, c.heads, c.mlp_ratio, c.ln_eps, c.layerscale, False)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.ln_eps)
        self.register_buffer("mean", torch.tensor(c.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _rope_tables(self) -> tuple[Tensor, Tensor]:
        gh, gw = self.grid  # patch-centre coordinates in [-1, 1], axis-separate normalisation (DINOv3 default)
        ch = (torch.arange(gh, device=self.rope_periods.device) + 0.5) / gh * 2 - 1
        cw = (torch.arange(gw, device=self.rope_periods.device) + 0.5) / gw * 2 - 1
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(-1, 2)  # [N, 2]
        angles = 2 * math.pi * coords[:, :, None] / self.rope_periods.float()  # [N, 2, hd/4]
        angles = angles.flatten(1).tile(2)  # [N, hd]
        return angles.sin(), angles.cos()

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        c = self.config
        x = F.interpolate(self._unit(video)[:, :, 0], size=(c.image_size, c.image_size), mode="bicubic",
                          align_corners=False, antialias=True)
        x = ((x - self.mean) / self.std).to(self.cls_token.dtype)
        b = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        prefix = self.cls_token.expand(b, -1, -1)
        rope = None
        if c.pos == "abs":
            cls_pe, grid_pe = self.pos_embed[:, :1], self.pos_embed[:, 1:]
            if self.grid != (c.pos_grid, c.pos_grid):  # resize the pretrained table to our grid, as DINOv2 does
                grid_pe = grid_pe.reshape(1, c.pos_grid, c.pos_grid, -1).permute(0, 3, 1, 2)
                off = c.pos_interp_offset
                size = dict(scale_factor=tuple((g + off) / c.pos_grid for g in self.grid)) if off else \
                    dict(size=self.grid)
                grid_pe = F.interpolate(grid_pe.float(), mode="bicubic", antialias=c.pos_interp_antialias, **size)
                grid_pe = grid_pe.to(tokens.dtype).flatten(2).transpose(1, 2)
            tokens, prefix = tokens + grid_pe, prefix + cls_pe
        else:
            rope = tuple(t.to(tokens.dtype) for t in self._rope_tables())
        if self.register_tokens is not None:
            prefix = torch.cat([prefix, self.register_tokens.expand(b, -1, -1)], dim=1)
        h = torch.cat([prefix, tokens], dim=1)
        for blk in self.blocks:
            h = blk(h, rope)
        return self.norm(h)[:, prefix.shape[1]:]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: ImageViTConfig | str, *, layout: str = "auto",
                        pixel_range: tuple[float, float] = (-1.0, 1.0)) -> "ImageViTTeacher":
        """Load DINOv2/DINOv3 weights from a local safetensors file (or a directory with model.safetensors).

        layout: "hub" (facebookresearch dinov2/dinov3 names), "hf" (transformers Dinov2Model /
        DINOv3ViTModel names) or "auto" (detected from the keys).
        """
        config = IMAGE_PRESETS[config] if isinstance(config, str) else config
        state = _load_weights(path)
        state = {re.sub(r"^(module\.|model\.|backbone\.|dinov2\.|dinov3\.)", "", k): v for k, v in state.items()}
        hf = any(k.startswith(("embeddings.", "encoder.layer.", "layer.")) for k in state)
        if layout == "auto":
            layout = "hf" if hf else "hub"
        if layout not in ("hub", "hf"):
            raise ValueError(f"layout must be 'auto', 'hub' or 'hf', got {layout!r}")
        model = cls(config, pixel_range=pixel_range)
        mapped = _map_image_hf(state, model) if layout == "hf" else _map_image_hub(state)
        load_state_dict_strict(model, mapped, source=str(path))
        return model.freeze()


def _map_image_hub(state: dict[str, Tensor]) -> dict[str, Tensor]:
    state = dict(state)
    for key in [k for k in state if k.endswith("attn.qkv.bias_mask")]:  # DINOv3: the k bias is masked out
        mask = state.pop(key)
        bias_key = key[:-len("_mask")]
        state[bias_key] = state[bias_key] * torch.nan_to_num(mask, nan=1.0)
    rules = [(r"storage_tokens", "register_tokens"), (r"rope_embed\.periods", "rope_periods"),
             (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
             (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.\2.\3"),
             (r"blocks\.(\d+)\.ls([12])\.gamma", r"blocks.\1.ls\2"),
             (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3")]
    return _rename(state, rules, drop=r"mask_token|(local_)?cls_norm\..*|head\..*")


def _map_image_hf(state: dict[str, Tensor], model: ImageViTTeacher) -> dict[str, Tensor]:
    state = dict(state)
    for i in range(model.config.depth):
        for pre in (f"encoder.layer.{i}.attention.attention", f"layer.{i}.attention"):
            names = ("query", "key", "value") if pre.startswith("encoder") else ("q_proj", "k_proj", "v_proj")
            _fuse_qkv(state, pre, names, f"blocks.{i}.qkv")
    if model.config.pos == "rope" and "rope_periods" not in state:  # HF keeps inv_freq non-persistent
        state["rope_periods"] = model.rope_periods.clone()
    rules = [(r"embeddings\.(cls_token|register_tokens)", r"\1"),
             (r"embeddings\.position_embeddings", "pos_embed"),
             (r"embeddings\.patch_embeddings(\.projection)?\.(weight|bias)", r"patch_embed.\2"),
             (r"(?:encoder\.)?layer\.(\d+)\.(norm[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
             (r"(?:encoder\.)?layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.proj.\2"),
             (r"(?:encoder\.)?layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2"),
             (r"(?:encoder\.)?layer\.(\d+)\.mlp\.(?:fc1|up_proj)\.(weight|bias)", r"blocks.\1.fc1.\2"),
             (r"(?:encoder\.)?layer\.(\d+)\.mlp\.(?:fc2|down_proj)\.(weight|bias)", r"blocks.\1.fc2.\2"),
             (r"(?:layernorm|norm)\.(weight|bias)", r"norm.\1")]
    return _rename(state, rules, drop=r"embeddings\.mask_token|pooler\..*|classifier\..*")


# --------------------------------------------------------------------------------------------- video ViT
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


class VideoViTTeacher(_Frozen):
    """Frozen VideoMAE-style video ViT -> final-norm patch tokens [B, t*h*w, dim] on grid (t, h, w)."""

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
        self.blocks = nn.ModuleList(_Block(c.dim, c.heads, c.mlp_ratio, c.ln_eps, c.layerscale, True)
                                    for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=c.ln_eps)
        self.register_buffer("mean", torch.tensor(c.mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, 3, 1, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        c = self.config
        x = self._unit(video)
        b, ch, t = x.shape[:3]
        if t != c.frames:  # uniform temporal resampling (nearest frame)
            x = x[:, :, torch.linspace(0, t - 1, c.frames, device=x.device).round().long()]
        x = x.transpose(1, 2).reshape(b * c.frames, ch, *x.shape[3:])
        x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.view(b, c.frames, ch, c.image_size, c.image_size).transpose(1, 2)  # [B, C, T', S, S]
        x = ((x - self.mean) / self.std).to(self.norm.weight.dtype)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: VideoViTConfig | str, *, layout: str = "auto",
                        pixel_range: tuple[float, float] = (-1.0, 1.0)) -> "VideoViTTeacher":
        """Load VideoMAE weights: official layout (blocks.i.attn.qkv + q_bias/v_bias; "encoder." prefix of
        pre-training checkpoints stripped) or HF VideoMAEModel ("videomae." prefix stripped). A final fc_norm
        (mean-pooling checkpoints) serves as the per-token final norm."""
        config = VIDEO_PRESETS[config] if isinstance(config, str) else config
        state = _load_weights(path)
        state = {re.sub(r"^(module\.|model\.|videomae\.|encoder\.(?!layer\.))", "", k): v for k, v in state.items()}
        if layout == "auto":
            layout = "hf" if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state) else "hub"
        if layout not in ("hub", "hf"):
            raise ValueError(f"layout must be 'auto', 'hub' or 'hf', got {layout!r}")
        model = cls(config, pixel_range=pixel_range)
        if layout == "hf":
            for i in range(config.depth):
                pre = f"encoder.layer.{i}.attention.attention"
                _fuse_qkv(state, pre, ("query", "key", "value"), f"blocks.{i}.qkv")
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
        load_state_dict_strict(model, _rename(state, rules, drop=drop), source=str(path))
        return model.freeze()


# --------------------------------------------------------------------------------------------- targets
def compute_targets(video: Tensor, image_teacher: Teacher | None, video_teacher: Teacher | None) -> AlignTargets:
    """Run the frozen teachers on a batch (same augmented clip the tokenizer sees) -> DeRA AlignTargets."""
    out = AlignTargets()
    if image_teacher is not None:
        out = dataclasses.replace(out, appearance=image_teacher.features(video),
                                  appearance_grid=tuple(image_teacher.grid))
    if video_teacher is not None:
        out = dataclasses.replace(out, motion=video_teacher.features(video), motion_grid=tuple(video_teacher.grid))
    return out
