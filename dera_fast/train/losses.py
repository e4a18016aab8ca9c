"""Tokenizer training losses (SPEC.md §2.6): pixel L1, LPIPS-style perceptual loss, the transformer
discriminator, the non-saturating smoothed GAN loss and the LeCam regulariser.

All functions take videos ``B x 3 x T x H x W`` in [0, 1] (the tokenizer's internal range, as in LARP).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("dera_fast.train")


def l1_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements (LARP's pixel loss, weight 1)."""
    return (x - x_hat).abs().mean()


# --------------------------------------------------------------------------------------------- perceptual loss
# Layer lists mirror torchvision's ``vgg16().features`` / ``alexnet().features`` index for index, so their
# state-dict keys (``features.<i>.weight``) load unchanged. ``taps`` are the ReLU outputs LPIPS compares.
_NETS = {
    "vgg": dict(layers=[64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
                taps=(3, 8, 15, 22, 29)),
    "alex": dict(layers=None, taps=(1, 4, 7, 9, 11)),
}
# LPIPS' input scaling layer: (x - shift) / scale on inputs in [-1, 1].
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _NETS["vgg"]["layers"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)  # 30 modules; features.29 is relu5_3


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: unit-normalised VGG16 / AlexNet activations compared at five ReLU taps.

    ``d(x, y) = sum_l mean_hw sum_c w_lc (f̂_l(x) - f̂_l(y))²`` with ``f̂`` normalised over channels. ``w`` are the
    lpips package's linear heads when given, else uniform ``1 / C_l``. Frozen; gradients flow to the inputs only.
    """

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in _NETS:
            raise ValueError(f"perceptual net must be one of {sorted(_NETS)}, got {net!r}")
        self.net = net
        self.features = _vgg16_features() if net == "vgg" else _alexnet_features()
        self.taps = _NETS[net]["taps"]
        tap_chans = [next(m.out_channels for m in reversed(self.features[: t + 1]) if isinstance(m, nn.Conv2d))
                     for t in self.taps]
        self.heads = nn.ParameterList([nn.Parameter(torch.full((c,), 1.0 / c)) for c in tap_chans])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(cls, path: str | os.PathLike, net: str = "vgg",
                     heads_path: str | os.PathLike | None = None) -> "PerceptualLoss":
        """Load backbone weights from a torchvision-layout safetensors file (``features.<i>.weight`` keys,
        with or without the ``features.`` prefix; classifier keys are ignored) and, optionally, the lpips
        package's linear heads (keys ``lin<l>.model.1.weight``, shape (1, C, 1, 1)): the wheel's
        ``weights/v0.1/<net>.pth`` (read with ``torch.load(weights_only=True)``) or a safetensors copy."""
        from safetensors.torch import load_file

        m = cls(net)
        sd = load_file(str(path))
        feats = {k.removeprefix("features."): v for k, v in sd.items()
                 if k.startswith("features.") or k.split(".")[0].isdigit()}
        own = m.features.state_dict()
        bad = sorted(set(own) ^ set(feats)) + sorted(k for k in own.keys() & feats.keys()
                                                     if own[k].shape != feats[k].shape)
        if bad:
            raise ValueError(f"{path}: not a torchvision {net} feature stack (missing, unexpected or mis-shaped "
                             f"keys: {bad[:4]})")
        m.features.load_state_dict(feats)
        if heads_path is not None:
            hs = load_file(str(heads_path)) if str(heads_path).endswith(".safetensors") else \
                torch.load(heads_path, map_location="cpu", weights_only=True)
            for i, h in enumerate(m.heads):
                key = f"lin{i}.model.1.weight"
                if key not in hs or hs[key].numel() != h.numel():
                    raise ValueError(f"{heads_path}: expected {key} with {h.numel()} values")
                h.data.copy_(hs[key].flatten())
        return m

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, T, H, W) in [0, 1] -> scalar mean distance over the B*T frames."""
        frames = torch.cat([x, y]).transpose(1, 2).flatten(0, 1)        # (2*B*T, 3, H, W)
        h = ((frames * 2 - 1) - self.shift) / self.scale
        total = frames.new_zeros(())
        tap = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == self.taps[tap]:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fx, fy = f.chunk(2)
                diff = (fx - fy).pow(2) * self.heads[tap].view(1, -1, 1, 1)
                total = total + diff.sum(1).mean()
                tap += 1
                if tap == len(self.taps):
                    break
        return total


def lpips_heads_file(net: str = "vgg") -> Path | None:
    """The linear heads shipped in the ``lpips`` wheel (``lpips/weights/v0.1/<net>.pth``), or None when lpips is
    not installed. Found without importing lpips (its import needs torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / f"{net}.pth"
    return path if path.is_file() else None


def build_perceptual(path: str | None, net: str = "vgg", heads: str | None = None) -> PerceptualLoss | None:
    """The perceptual loss from user weights, or None (with a logged notice) when no backbone weights are given.

    heads: a linear-heads file, ``"uniform"`` (1 / C per channel), or None: the lpips wheel's heads when
    ``lpips`` is installed (``pip install 'dera-fast[lpips]'``; LPIPS as LARP computes it), else uniform.
    The VGG16 / AlexNet backbone always comes from the local ``path`` (nothing is downloaded).
    """
    if not path:
        log.warning("perceptual loss OFF: no %s backbone weights given (set perceptual_weights to a local "
                    "torchvision-layout .safetensors file to enable LPIPS-style training)", net)
        return None
    if heads is None:
        heads = lpips_heads_file(net)
        if heads is None:
            log.warning("perceptual loss with UNIFORM channel weights: install lpips (pip install "
                        "'dera-fast[lpips]') for LPIPS' calibrated linear heads, or set perceptual_heads")
    elif heads == "uniform":
        heads = None
    if heads is not None:
        log.info("perceptual loss: LPIPS linear heads from %s", heads)
    return PerceptualLoss.from_weights(path, net, heads)


# ---------------------------------------------------------------------------------------------- discriminator
class TransformerDiscriminator(nn.Module):
    """LARP's discriminator: 3D patch embedding + fixed sin-cos PE + a learned CLS token, a stack of
    transformer blocks, LayerNorm on the CLS output and a linear logit head.

    x (B, 3, T, H, W) -> logits (B, 1).
    """

    def __init__(self, *, frames: int, size: int, patch_t: int = 4, patch: int = 8, dim: int = 512,
                 depth: int = 12, heads: int = 8):
        super().__init__()
        from dera_fast.models.blocks import Block
        from dera_fast.models.embed import PatchEmbed3D, sincos_3d

        if frames % patch_t or size % patch:
            raise ValueError(f"clip {frames}x{size}x{size} is not divisible by patch {patch_t}x{patch}x{patch}")
        self.grid = (frames // patch_t, size // patch, size // patch)
        self.embed = PatchEmbed3D(3, dim, patch_t, patch)
        self.register_buffer("pos", sincos_3d(dim, *self.grid), persistent=False)
        self.cls = nn.Parameter(torch.empty(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 1)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.embed.reset_parameters()
        nn.init.xavier_uniform_(self.cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos                                        # (B, N, dim), raster t, h, w
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)     # (B, N + 1, dim)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 0]))                                # (B, 1)


# ------------------------------------------------------------------------------------------------- GAN losses
def d_loss_ns_smooth(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss with one-sided label noise (LARP's ``ns_smooth``).

    Real targets ``1 - |N(0, 0.15²)|`` clamped to >= 0.7; fake targets ``|N(0, 0.15²)|`` clamped to <= 0.3.
    """
    real_t = (1.0 - torch.randn_like(logits_real).abs() * 0.15).clamp_min(0.7)
    fake_t = (torch.randn_like(logits_fake).abs() * 0.15).clamp_max(0.3)
    return (F.binary_cross_entropy_with_logits(logits_real.float(), real_t.float())
            + F.binary_cross_entropy_with_logits(logits_fake.float(), fake_t.float()))


def g_loss_ns(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``-mean log sigmoid(D(x̂))``."""
    return -F.logsigmoid(logits_fake.float()).mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al. 2021) with EMA anchors of the mean real / fake logits.

    ``R = relu(mean D(x) - ema_fake)² + relu(ema_real - mean D(x̂))²``; the caller multiplies by the weight once.
    NOTE: LARP's config says ``lecam_weight: 0.001`` but its ``VQLPIPSWithDiscriminator`` multiplies that weight in
    twice (``lecam_loss = w * lecam_reg(...)``, then ``d_loss + w * lecam_loss``), so the runs behind its released
    checkpoints used an effective 1e-6. The trainer applies its ``lecam_weight`` once and defaults to that 1e-6.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        real, fake = logits_real.float().mean(), logits_fake.float().mean()
        reg = F.relu(real - self.ema_fake).pow(2) + F.relu(self.ema_real - fake).pow(2)
        with torch.no_grad():  # the anchors update after the regulariser is formed, as in LARP
            self.ema_real.lerp_(real.detach(), 1.0 - self.decay)
            self.ema_fake.lerp_(fake.detach(), 1.0 - self.decay)
        return reg
