"""DeRA tokenizer (SPEC.md §3): two streams through ONE shared in-context encoder, LARP's SVQ and decoder,
and REPA-style alignment of each stream's patch-position encoder outputs with a frozen teacher.

  appearance: frame 0 -> 8x8 patches (own Conv2d-shaped embed) + the t = 0 slice of the 3-D sin-cos PE;
              sequence [E_s; Q_a]   (L_s patches + L_a queries)
  motion:     clip    -> t x p x p tubelets (own Conv3d embed) + the 3-D sin-cos PE;
              sequence [E_t; Q_m]   (L_t patches + L_m queries)
Both streams of all B clips are packed into one varlen sequence set (S = 2B) so every encoder layer is one
attention launch, and the streams never attend to each other (Eq. 1). Tokens: [Z_a; Z_m], appearance first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import InContextTransformer
from .config import TokenizerConfig
from .embed import PatchEmbed2D, PatchEmbed3D, sincos_3d
from .tokenizer_base import TokenizerBase


@dataclass
class AlignTargets:
    """Frozen-teacher features for one batch: appearance [B, N_a, C_a] on grid (h, w); motion [B, N_m, C_m] on
    grid (t, h, w). Either may be None (that stream is then not aligned)."""

    appearance: Tensor | None = None
    appearance_grid: tuple[int, ...] = ()
    motion: Tensor | None = None
    motion_grid: tuple[int, ...] = ()


def match_grid(pred: Tensor, pred_grid: tuple[int, ...], target: Tensor, target_grid: tuple[int, ...],
               mode: str) -> tuple[Tensor, Tensor]:
    """Bring prediction [B, Np, C] on pred_grid and target [B, Nt, C] on target_grid onto one token grid.

    Grids are (h, w) or (t, h, w), row-major tokens. mode "pool": adaptive average pooling of the target onto
    pred_grid (SPEC §3.5 option A: teacher time pooled x4); "interp": trilinear interpolation of the prediction
    onto target_grid (option B, AVTok's description). Returns both as [B, N, C].
    """
    pg, tg = (1,) * (3 - len(pred_grid)) + tuple(pred_grid), (1,) * (3 - len(target_grid)) + tuple(target_grid)
    for name, t, g in (("prediction", pred, pg), ("target", target, tg)):
        if t.shape[1] != g[0] * g[1] * g[2]:
            raise ValueError(f"{name} has {t.shape[1]} tokens but its grid {g} holds {g[0] * g[1] * g[2]}")
    if pg == tg:
        return pred, target

    def to_grid(t, g):  # [B, N, C] -> [B, C, t, h, w]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *g)

    def to_tokens(t):  # [B, C, t, h, w] -> [B, N, C]
        return t.flatten(2).transpose(1, 2)

    if mode == "pool":
        return pred, to_tokens(F.adaptive_avg_pool3d(to_grid(target, tg), pg))
    if mode == "interp":
        return to_tokens(F.interpolate(to_grid(pred, pg), size=tg, mode="trilinear", align_corners=False)), target
    raise ValueError(f"mode must be 'pool' or 'interp', got {mode!r}")


def negative_cosine(pred: Tensor, target: Tensor) -> Tensor:
    """-mean_tokens cos(pred, target) over [B, N, C] (DeRA Eq. 4); fp32 scalar."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def _mlp_head(dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, out))


class DeRATokenizer(TokenizerBase):
    """DeRA dual-stream video tokenizer; ids are [B, L_a + L_m] with the appearance tokens first.

    Example:
        >>> tok = DeRATokenizer.from_name("tiny").eval()
        >>> ids = tok.encode(torch.rand(2, 3, 8, 32, 32) * 2 - 1)   # [2, 16]: 4 appearance + 12 motion ids
        >>> video = tok.decode(ids)
    """

    model_type = "dera"

    def __init__(self, config: TokenizerConfig):
        if config.num_appearance_tokens <= 0:
            raise ValueError("DeRATokenizer needs config.num_appearance_tokens > 0 (e.g. preset 'dera-l' or 'tiny')")
        super().__init__(config)
        cfg, d = config, config.dim
        self.appearance_embed = PatchEmbed2D(cfg.in_channels, d, cfg.patch)
        self.motion_embed = PatchEmbed3D(cfg.in_channels, d, cfg.patch_t, cfg.patch)
        motion_pe = sincos_3d(d, *cfg.grid)[None]  # [1, L_t, d]
        self.register_buffer("motion_pe", motion_pe, persistent=False)
        self.register_buffer("appearance_pe", motion_pe[:, :cfg.num_frame_patches].clone(), persistent=False)
        self.queries_appearance = nn.Parameter(torch.zeros(cfg.num_appearance_tokens, d))
        self.queries_motion = nn.Parameter(torch.zeros(cfg.num_motion_tokens, d))
        self.encoder = InContextTransformer(d, cfg.encoder_depth, cfg.num_heads, cfg.mlp_ratio, cfg.ln_eps)
        self.align_head_appearance = _mlp_head(d, cfg.align_hidden, cfg.align_dim_appearance)
        self.align_head_motion = _mlp_head(d, cfg.align_hidden, cfg.align_dim_motion)
        self._init_weights()

    def _init_weights(self) -> None:
        super()._init_weights()
        self.appearance_embed.reset_parameters()
        self.motion_embed.reset_parameters()
        for q in (self.queries_appearance, self.queries_motion):
            nn.init.normal_(q, std=self.config.query_init_std)

    def shared_encoder_parameters(self) -> list[nn.Parameter]:
        """Exactly the (trainable) parameters both streams use: the shared encoder blocks, LayerNorms included
        (SACP's theta_E, SPEC §3.7.3), in a fixed order.

        Stream-exclusive parameters (the two patch embeds, Q_a, Q_m), the alignment heads, the quantizer and
        the decoder are excluded; frozen (requires_grad=False) encoder parameters are left out.
        """
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def split_ids(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids [B, L] -> (appearance ids [B, L_a], motion ids [B, L_m])."""
        n = self.config.num_appearance_tokens
        return ids[:, :n], ids[:, n:]

    def encode_streams(self, x: Tensor) -> dict[str, Tensor]:
        """Run both streams through the shared encoder (one varlen attention call per layer).

        Args:
            x: [B, C, T, H, W], already validated.
        Returns:
            "query_appearance" Z_a [B, L_a, d], "query_motion" Z_m [B, L_m, d] (last layer), and
            "patch_appearance" E_a [B, L_s, d], "patch_motion" E_m [B, L_t, d] at config.align_layer_index.
        """
        cfg = self.config
        b, d = x.shape[0], cfg.dim
        ls, lt = cfg.num_frame_patches, cfg.num_patches
        seq_a = torch.cat([self.appearance_embed(x[:, :, 0]) + self.appearance_pe,
                           self.queries_appearance[None].expand(b, -1, -1)], dim=1)  # [B, S_a, d]
        seq_m = torch.cat([self.motion_embed(x) + self.motion_pe,
                           self.queries_motion[None].expand(b, -1, -1)], dim=1)  # [B, S_m, d]
        sa, sm = seq_a.shape[1], seq_m.shape[1]
        # pack: all appearance sequences, then all motion sequences -> [1, B*S_a + B*S_m, d]
        h = torch.cat([seq_a.reshape(1, b * sa, d), seq_m.reshape(1, b * sm, d)], dim=1)
        steps = torch.arange(b + 1, device=x.device, dtype=torch.int32)
        cu_seqlens = torch.cat([steps * sa, b * sa + steps[1:] * sm])  # [2B + 1]
        patches = None
        for i, blk in enumerate(self.encoder.blocks, start=1):
            h = blk(h, cu_seqlens=cu_seqlens, max_seqlen=max(sa, sm))
            if i == cfg.align_layer_index:
                patches = h
        out_a, out_m = h[0, :b * sa].view(b, sa, d), h[0, b * sa:].view(b, sm, d)
        pat_a, pat_m = patches[0, :b * sa].view(b, sa, d), patches[0, b * sa:].view(b, sm, d)
        return {"query_appearance": out_a[:, ls:], "query_motion": out_m[:, lt:],
                "patch_appearance": pat_a[:, :ls], "patch_motion": pat_m[:, :lt]}

    def _latents(self, x: Tensor) -> tuple[Tensor, dict]:
        s = self.encode_streams(x)
        z = torch.cat([s["query_appearance"], s["query_motion"]], dim=1)  # [B, L_a + L_m, d]
        return z, {"patch_appearance": s["patch_appearance"], "patch_motion": s["patch_motion"]}

    def alignment_losses(self, patch_appearance: Tensor, patch_motion: Tensor,
                         targets: AlignTargets) -> dict[str, Tensor]:
        """Negative-cosine alignment of h_a(E_a) / h_m(E_m) with the teacher features (DeRA Eq. 4-5).

        Returns "align_appearance" / "align_motion" (unweighted, for SACP) for each stream with a target,
        "loss_align" = lambda_a * L_a + lambda_m * L_m, and the head outputs "align_pred_*".
        """
        cfg = self.config
        _, gh, gw = cfg.grid
        out, total = {}, None
        streams = (("appearance", patch_appearance, (gh, gw), self.align_head_appearance,
                    cfg.align_weight_appearance),
                   ("motion", patch_motion, cfg.grid, self.align_head_motion, cfg.align_weight_motion))
        for name, feats, grid, head, weight in streams:
            target = getattr(targets, name)
            if target is None:
                continue
            pred = head(feats)  # [B, N, C_teacher]
            if target.dim() != 3 or target.shape[0] != pred.shape[0] or target.shape[2] != pred.shape[2]:
                raise ValueError(f"{name} target must be [B={pred.shape[0]}, N, C={pred.shape[2]}] "
                                 f"(config.align_dim_{name}), got {tuple(target.shape)}")
            p, t = match_grid(pred, grid, target.detach(), tuple(getattr(targets, f"{name}_grid")),
                              cfg.align_grid_match)
            loss = negative_cosine(p, t)
            out[f"align_{name}"], out[f"align_pred_{name}"] = loss, pred
            total = weight * loss if total is None else total + weight * loss
        if total is not None:
            out["loss_align"] = total
        return out

    def forward(self, x: Tensor, *, targets: AlignTargets | None = None, step: int | None = None,
                max_steps: int | None = None, generator: torch.Generator | None = None):
        """Training/analysis forward.

        Args:
            x: [B, C, T, H, W] float in config.pixel_range.
            targets: teacher features (see dera_fast.models.teachers.compute_targets); None skips alignment.
            step, max_steps, generator: as LARPTokenizer.forward.
        Returns:
            (reconstruction, dict): LARP's entries plus "patch_appearance" E_a [B, L_s, d], "patch_motion"
            E_m [B, L_t, d] (encoder layer config.align_layer_index) and, with targets, the alignment losses.
        """
        x = self._check_video(x)
        z, aux = self._latents(x)
        recon, out = self._finish(z, aux, step, max_steps, generator)
        if targets is not None:
            out.update(self.alignment_losses(aux["patch_appearance"], aux["patch_motion"], targets))
        return recon, out
