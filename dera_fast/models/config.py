"""`TokenizerConfig`: one frozen dataclass for the LARP and DeRA tokenizers, with named presets.

Values follow SPEC.md §1/§2/§3 (LARP-code `cfgs/larp_tokenizer.yaml`; LARP-S/B from LARP issue #11; DeRA from the
DeRA paper) and §7.2 (the tiny CPU test configuration).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._config import PresetConfig


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig(PresetConfig):
    """Shapes and hyper-parameters of a LARP or DeRA tokenizer (and its training-time AR prior)."""
    _kind = "TokenizerConfig"
    _positive = ("mlp_ratio", "ln_eps", "latent_pe_base", "vq_temperature", "prior_dim", "prior_heads", "prior_max_len",
                 "prior_ce_temperature", "align_hidden", "align_dim_appearance", "align_dim_motion")
    _non_negative = ("query_init_std", "vq_beta", "vq_codebook_weight", "prior_depth", "prior_dropout", "prior_rounds",
                     "prior_ss_max_ratio", "prior_ss_peak_fraction", "align_weight_appearance", "align_weight_motion")

    # clip geometry
    num_frames: int = 16
    size: int = 128                      # H = W (LARP's sin-cos grids are square)
    in_channels: int = 3
    patch_t: int = 4                     # temporal patch (LARP tubelet; DeRA motion tubelet; decoder patch)
    patch: int = 8                       # spatial patch
    pixel_range: tuple[float, float] = (-1.0, 1.0)  # range of encode() inputs / decode() outputs; LARP: (0, 1)
    # transformer
    dim: int = 768
    num_heads: int = 12
    encoder_depth: int = 12
    decoder_depth: int = 12
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5                 # block LayerNorm eps: LARP was trained with timm < 1.0.16 (nn.LayerNorm)
    query_init_std: float = 0.02         # N(0, std^2) init of the learned encoder queries and type embedding
    latent_pe_base: float = 10000.0      # base of the decoder's 1-D sin-cos latent PE
    decoder_query_type_embed: bool = True  # learned token-type embedding added to the fixed decoder patch queries
    # tokens and quantizer
    num_tokens: int = 1024               # discrete tokens per clip (LARP queries; DeRA appearance + motion)
    num_appearance_tokens: int = 256     # DeRA only: the first num_appearance_tokens tokens come from frame 0
    codebook_size: int = 8192
    code_dim: int = 16
    vq_temperature: float = 0.03
    vq_beta: float = 0.25                # commitment-loss weight
    vq_codebook_weight: float = 1.0
    # training-time AR prior (GPTC); prior_depth = 0 builds no prior
    prior_depth: int = 12
    prior_dim: int = 384
    prior_heads: int = 6
    prior_max_len: int = 1024            # positional table length (LARP: 1024 for every clip length)
    prior_dropout: float = 0.1           # embedding, attention and residual dropout
    prior_rounds: int = 2                # scheduled-sampling rounds
    prior_ss_max_ratio: float = 0.5
    prior_ss_peak_fraction: float = 0.3  # the ratio ramps linearly to its max over this fraction of training
    prior_ce_temperature: float = 1.0
    # DeRA representation alignment
    align_layer: int = 0                 # encoder layer (1-based) whose patch outputs are aligned; 0 = last
    align_hidden: int = 2048             # hidden width of the 2-layer MLP heads (Linear-SiLU-Linear)
    align_dim_appearance: int = 768      # image-teacher feature dim
    align_dim_motion: int = 768          # video-teacher feature dim
    align_weight_appearance: float = 1.0
    align_weight_motion: float = 0.5
    align_grid_match: str = "pool"       # "pool": teacher grid pooled to ours; "interp": ours interpolated to it

    def __post_init__(self):
        for name in ("num_frames", "size", "in_channels", "patch_t", "patch", "dim", "num_heads", "num_tokens",
                     "codebook_size", "code_dim", "encoder_depth", "decoder_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TokenizerConfig.{name} must be a positive int, got {value!r}")
        if self.num_frames % self.patch_t or self.size % self.patch:
            raise ValueError(f"num_frames={self.num_frames} and size={self.size} must be multiples of "
                             f"patch_t={self.patch_t} and patch={self.patch}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.dim % 4:
            raise ValueError(f"dim={self.dim} must be a multiple of 4 (2-D sin-cos positional encoding)")
        if not 0 <= self.num_appearance_tokens < self.num_tokens:
            raise ValueError(f"num_appearance_tokens={self.num_appearance_tokens} must be in [0, num_tokens)")
        if self.prior_depth and (self.prior_dim % self.prior_heads or self.prior_max_len < self.num_tokens):
            raise ValueError("prior_dim must be divisible by prior_heads and prior_max_len >= num_tokens")
        if not 0 <= self.align_layer <= self.encoder_depth:
            raise ValueError(f"align_layer={self.align_layer} must be in [0, encoder_depth={self.encoder_depth}]")
        if self.align_grid_match not in ("pool", "interp"):
            raise ValueError(f"align_grid_match must be 'pool' or 'interp', got {self.align_grid_match!r}")
        lo, hi = self.pixel_range
        if not lo < hi:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {self.pixel_range}")

    # derived sizes
    @property
    def grid(self) -> tuple[int, int, int]:
        """Patch grid (t, h, w) of the clip."""
        return self.num_frames // self.patch_t, self.size // self.patch, self.size // self.patch

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def num_frame_patches(self) -> int:
        """Patches of one frame (DeRA's appearance stream)."""
        return self.grid[1] * self.grid[2]

    @property
    def num_motion_tokens(self) -> int:
        return self.num_tokens - self.num_appearance_tokens

    @property
    def patch_dim(self) -> int:
        """Values per decoder patch: patch_t * patch * patch * in_channels."""
        return self.patch_t * self.patch * self.patch * self.in_channels

    @property
    def align_layer_index(self) -> int:
        """1-based encoder layer whose patch outputs are aligned."""
        return self.align_layer or self.encoder_depth

    def replace(self, **changes) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS  # the table below


_LARP = dict(pixel_range=(0.0, 1.0), num_appearance_tokens=0)

PRESETS: dict[str, dict[str, Any]] = {
    # SPEC §7.2: 8x32x32 clips, d=64, depth 2/2, 16 tokens (4 appearance + 12 motion for DeRA), K=64 x 8
    "tiny": dict(num_frames=8, size=32, dim=64, num_heads=4, encoder_depth=2, decoder_depth=2, num_tokens=16,
                 num_appearance_tokens=4, codebook_size=64, code_dim=8, prior_depth=2, prior_dim=32,
                 prior_heads=2, prior_max_len=16, align_hidden=128, align_dim_appearance=32,
                 align_dim_motion=32),
    # the demo's CPU tokenizer (issue 16, chosen by measurement in dera_fast/demo.py's notes): the tiny width and depth
    # with 16x16 patches, 8 appearance + 16 motion tokens and a 1024 x 16 codebook; 240 bits per clip
    "demo": dict(num_frames=8, size=32, dim=64, num_heads=4, encoder_depth=2, decoder_depth=2, patch=16, num_tokens=24,
                 num_appearance_tokens=8, codebook_size=1024, code_dim=16, prior_depth=2, prior_dim=32,
                 prior_heads=2, prior_max_len=24, align_hidden=128, align_dim_appearance=32,
                 align_dim_motion=32),
    # LARP sizes (SPEC §2.3): S = 512/6/8, B = 768/8/12, L = 768/12/12; pixels in [0, 1] like LARP's checkpoints
    "larp-s": dict(_LARP, dim=512, num_heads=8, encoder_depth=6, decoder_depth=6),
    "larp-b": dict(_LARP, encoder_depth=8, decoder_depth=8),
    "larp-l": dict(_LARP),
    # DeRA (SPEC §3.2): 16x128x128, 256 appearance + 768 motion tokens, d=768, depth 12/12, codebook 8192x16
    "dera-l": dict(num_appearance_tokens=256),
}
