"""DINOv2 / DINOv3-style image ViT teacher on frame 0.

Loads local weights in the torch-hub layout (facebookresearch/dinov2, dinov3) or the Hugging Face layout
(``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``). Features are the final-norm patch tokens
(class and register tokens dropped).

Position table at a grid other than the pretrained one (DINOv2's learned table is bicubic-resized):

* torch-hub layout: as the hub code, ``scale_factor = (grid + 0.1) / pos_grid`` without antialiasing (the
  register variants: ``size = grid`` with antialiasing);
* HF layout: as ``transformers`` computes it for the same weights (checked against transformers 5.25; older
  releases used the hub's scale-factor form), ``size = grid``, with antialiasing for the register variants only.
  ``from_state_dict`` switches the offset off when it loads HF weights (legacy or transformers-5 module names).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pretrained import load_state_dict_strict
from .base import IMAGENET_MEAN, IMAGENET_STD, PretrainedTeacher, ViTBlock
from .weights import fuse_qkv, rename_state, resolve_layout, strip_prefixes


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
    pos_interp_offset: float = 0.1  # hub DINOv2 resizes the table with scale (grid + offset) / pos_grid; 0 = size
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


def resize_pos_table(table: Tensor, src: int, grid: tuple[int, int], offset: float, antialias: bool) -> Tensor:
    """Bicubic resize of a [1, src*src, D] patch-position table to [1, gh*gw, D] (float32 math).

    offset > 0: ``scale_factor = (g + offset) / src`` (torch-hub DINOv2); offset 0: ``size = grid`` (HF, and the
    hub register variants)."""
    t = table.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()  # [1, D, src, src]
    size = dict(scale_factor=tuple((g + offset) / src for g in grid)) if offset else dict(size=tuple(grid))
    t = F.interpolate(t, mode="bicubic", align_corners=False, antialias=antialias, **size)
    return t.to(table.dtype).flatten(2).transpose(1, 2)  # [1, gh*gw, D]


class ImageViTTeacher(PretrainedTeacher):
    """Frozen DINOv2/DINOv3-style ViT on frame 0 -> final-norm patch tokens [B, (S/p)^2, dim]."""

    config_class = ImageViTConfig
    presets = IMAGE_PRESETS

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
        self.blocks = nn.ModuleList(ViTBlock(c.dim, c.heads, c.mlp_ratio, c.ln_eps, c.layerscale, False)
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

    def patch_position_table(self) -> Tensor:
        """The learned table's patch rows at this teacher's grid, [1, gh*gw, dim] (``pos="abs"`` only)."""
        c = self.config
        grid_pe = self.pos_embed[:, 1:]
        if self.grid != (c.pos_grid, c.pos_grid):  # resize the pretrained table to our grid
            grid_pe = resize_pos_table(grid_pe, c.pos_grid, self.grid, c.pos_interp_offset, c.pos_interp_antialias)
        return grid_pe

    @torch.no_grad()
    def features(self, video: Tensor) -> Tensor:
        c = self.config
        x = self._unit(video)[:, :, 0]  # frame 0, [B, C, H, W]
        if tuple(x.shape[-2:]) != (c.image_size, c.image_size):
            x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bicubic", align_corners=False,
                              antialias=True)
        x = ((x - self.mean) / self.std).to(self.cls_token.dtype)
        b = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, dim]
        prefix = self.cls_token.expand(b, -1, -1)
        rope = None
        if c.pos == "abs":
            tokens = tokens + self.patch_position_table().to(tokens.dtype)
            prefix = prefix + self.pos_embed[:, :1]
        else:
            rope = tuple(t.to(tokens.dtype) for t in self._rope_tables())
        if self.register_tokens is not None:
            prefix = torch.cat([prefix, self.register_tokens.expand(b, -1, -1)], dim=1)
        h = torch.cat([prefix, tokens], dim=1)
        for blk in self.blocks:
            h = blk(h, rope)
        return self.norm(h)[:, prefix.shape[1]:]

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], config: ImageViTConfig | str | None = None, *,
                        meta: dict[str, str] | None = None, layout: str = "auto",
                        pixel_range: tuple[float, float] = (-1.0, 1.0),
                        source: str = "state dict") -> "ImageViTTeacher":
        """Build the teacher from a state dict.

        config: a preset of IMAGE_PRESETS, an ImageViTConfig, or None for a ``convert-teacher`` file (``meta``
        holds its config; such files are in this class's own layout). layout: "hub" (facebookresearch
        dinov2/dinov3 names), "hf" (transformers Dinov2Model / DINOv3ViTModel names) or "auto" (from the keys).
        HF weights resize the position table as ``transformers`` does (``pos_interp_offset`` becomes 0, see the
        module docstring).
        """
        config, model = cls._resolve(state, config, meta, pixel_range=pixel_range, source=source)
        if model is not None:
            return model
        state = strip_prefixes(state, r"module\.|model\.|backbone\.|dinov2\.|dinov3\.")
        layout = resolve_layout(layout, state, ("embeddings.", "encoder.layer.", "layer."))
        if layout == "hf" and config.pos == "abs":
            config = dataclasses.replace(config, pos_interp_offset=0.0)
        model = cls(config, pixel_range=pixel_range)
        mapped = _map_image_hf(state, model) if layout == "hf" else _map_image_hub(state)
        load_state_dict_strict(model, mapped, source=source)
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
    return rename_state(state, rules, drop=r"mask_token|(local_)?cls_norm\..*|head\..*")


def _map_image_hf(state: dict[str, Tensor], model: ImageViTTeacher) -> dict[str, Tensor]:
    state = dict(state)
    for i in range(model.config.depth):
        # Dinov2 as saved by transformers < 5 / >= 5 (module names changed), then DINOv3ViT
        for pre, names in ((f"encoder.layer.{i}.attention.attention", ("query", "key", "value")),
                           (f"encoder.layer.{i}.attention", ("q_proj", "k_proj", "v_proj")),
                           (f"layer.{i}.attention", ("q_proj", "k_proj", "v_proj"))):
            fuse_qkv(state, pre, names, f"blocks.{i}.qkv")
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
    return rename_state(state, rules, drop=r"embeddings\.mask_token|pooler\..*|classifier\..*")

