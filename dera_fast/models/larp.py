"""LARP tokenizer (SPEC.md §2): 3-D patch embed + fixed 3-D sin-cos PE, learned latent queries, in-context
encoder keeping the query rows, SVQ bottleneck, LARP decoder (see tokenizer_base)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import InContextTransformer
from .config import TokenizerConfig
from .embed import PatchEmbed3D, sincos_3d
from .tokenizer_base import TokenizerBase


class LARPTokenizer(TokenizerBase):
    """LARP video tokenizer: [B, C, T, H, W] -> num_tokens discrete ids -> [B, C, T, H, W].

    Example:
        >>> tok = LARPTokenizer.from_name("tiny").eval()
        >>> ids = tok.encode(torch.rand(2, 3, 8, 32, 32) * 2 - 1)   # [2, 16] int64
        >>> video = tok.decode(ids)                                    # [2, 3, 8, 32, 32]
    """

    model_type = "larp"

    def __init__(self, config: TokenizerConfig):
        super().__init__(config)
        cfg = config
        self.patch_embed = PatchEmbed3D(cfg.in_channels, cfg.dim, cfg.patch_t, cfg.patch)
        self.register_buffer("encoder_pe", sincos_3d(cfg.dim, *cfg.grid)[None], persistent=False)  # [1, N, d]
        self.queries = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.dim))
        self.encoder = InContextTransformer(cfg.dim, cfg.encoder_depth, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        super()._init_weights()
        self.patch_embed.reset_parameters()
        nn.init.normal_(self.queries, std=self.config.query_init_std)

    def _latents(self, x: Tensor) -> tuple[Tensor, dict]:
        """x [B, C, T, H, W] -> encoder query outputs [B, L, dim]."""
        patches = self.patch_embed(x) + self.encoder_pe  # [B, N, d]
        queries = self.queries[None].expand(x.shape[0], -1, -1)  # [B, L, d]
        return self.encoder(patches, queries), {}
