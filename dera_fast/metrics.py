"""Evaluation metrics: PSNR, SSIM, codebook statistics, Fréchet distance and FVD.

Videos are float ``[B, 3, T, H, W]``; PSNR/SSIM take the pixel ``value_range`` (the package's default [-1, 1], or
(0, 1) for LARP's models), which sets the peak ``data_range = high - low``. Everything here is weight-free except
:class:`FVD`, whose feature extractor the user supplies (an I3D TorchScript file, or any callable). FVD results
carry their protocol (resolution, frames, sample counts, extractor name, sha256 of the weights) so numbers can be
compared honestly.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# weight-free image metrics


def _check_pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.to(dtype), y.to(dtype)


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "none":
        return v
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _range(value_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return lo, hi


def psnr(x: torch.Tensor, y: torch.Tensor, *, value_range=(-1.0, 1.0), reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per sample: ``10 * log10(data_range^2 / MSE)``, ``data_range = hi - lo``.

    Args:
        x, y: ``[B, ...]`` (e.g. ``[B, 3, T, H, W]``); the MSE of each sample is over all non-batch dims, then
            ``reduction="mean"`` averages the per-sample PSNRs (LARP's protocol) and ``"none"`` returns ``[B]``.
        value_range: ``(lo, hi)`` pixel range of x and y.
    Identical samples give ``inf``.
    """
    lo, hi = _range(value_range)
    x, y = _check_pair(x, y)
    mse = (x - y).pow(2).flatten(1).mean(1)  # [B]
    return _reduce(10 * torch.log10((hi - lo) ** 2 / mse), reduction)


def _gaussian_window(win_size: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(win_size, dtype=dtype, device=device) - (win_size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, value_range=(-1.0, 1.0), win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, frame by frame.

    Args:
        x, y: videos ``[B, C, T, H, W]`` or images ``[B, C, H, W]``. Each frame and channel is filtered with a
            separable ``win_size`` Gaussian (``sigma``), "valid" borders (as ``pytorch_msssim`` and
            ``skimage.metrics.structural_similarity(gaussian_weights=True)``); the SSIM map is averaged over
            pixels, channels and frames per sample.
        value_range: ``(lo, hi)`` pixel range of x and y. Inputs are mapped to [0, 1] and scored with ``L = 1``
            (``C1 = k1^2``, ``C2 = k2^2``): SSIM's luminance term assumes non-negative intensities, so this is
            LARP's protocol (``pytorch_msssim.ssim(data_range=1)`` on [0, 1]) whatever the input range.
        win_size: odd; shrunk to the largest odd size that fits frames smaller than the window.
    Returns:
        scalar mean over samples, or ``[B]`` with ``reduction="none"``. ``ssim(x, x) == 1``.
    """
    lo, hi = _range(value_range)
    x, y = _check_pair(x, y)
    x, y = (x - lo) / (hi - lo), (y - lo) / (hi - lo)  # -> [0, 1]
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be [B, C, T, H, W] or [B, C, H, W], got {tuple(x.shape)}")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd number, got {win_size}")
    b, c = x.shape[:2]
    h, w = x.shape[-2:]
    win = min(win_size, h - (1 - h % 2), w - (1 - w % 2))  # largest odd size that fits
    if x.dim() == 5:
        x = x.transpose(1, 2).reshape(-1, c, h, w)  # [B*T, C, H, W]
        y = y.transpose(1, 2).reshape(-1, c, h, w)
    g = _gaussian_window(win, sigma, x.dtype, x.device)
    # NOTE: the five local moments are blurred in one depthwise separable convolution (5*C channels, valid borders).
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # [N, 5C, H, W]
    k = 5 * c
    blurred = F.conv2d(F.conv2d(stack, g.view(1, 1, win, 1).expand(k, 1, win, 1), groups=k),
                       g.view(1, 1, 1, win).expand(k, 1, 1, win), groups=k)
    mu_x, mu_y, e_xx, e_yy, e_xy = blurred.split(c, dim=1)
    c1, c2 = k1**2, k2**2
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov = e_xy - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return _reduce(smap.reshape(b, -1).mean(1), reduction)


# ----------------------------------------------------------------------------------------------------------------
# codebook statistics


class CodebookCounter:
    """Streaming code-usage counts; ``update(indices)`` any number of times, then :meth:`compute`."""

    def __init__(self, codebook_size: int):
        if codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> "CodebookCounter":
        """Add token ids (any shape, integer, values in ``[0, codebook_size)``)."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            raise TypeError("indices must be an integer tensor")
        flat = indices.reshape(-1).long().cpu()
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{int(flat.min())}, "
                             f"{int(flat.max())}]")
        self.counts += torch.bincount(flat, minlength=self.codebook_size).double()
        return self

    def compute(self) -> dict:
        """``{"usage": fraction of codes used, "used", "dead": codes never used, "perplexity", "entropy_bits",
        "num_tokens"}``. Perplexity is ``exp(H)`` of the empirical code distribution (``codebook_size`` when
        uniform, 1 when one code is used)."""
        total = float(self.counts.sum())
        used = int((self.counts > 0).sum())
        p = self.counts[self.counts > 0] / max(total, 1.0)
        entropy = float(-(p * p.log()).sum()) if total > 0 else 0.0
        return {"usage": used / self.codebook_size, "used": used, "dead": self.codebook_size - used,
                "perplexity": math.exp(entropy), "entropy_bits": entropy / math.log(2), "num_tokens": int(total)}


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict:
    """Usage, perplexity and dead codes of one batch of token ids (see :meth:`CodebookCounter.compute`)."""
    return CodebookCounter(codebook_size).update(indices).compute()


# ----------------------------------------------------------------------------------------------------------------
# Fréchet machinery


def _f64(name: str, a) -> torch.Tensor:
    t = torch.as_tensor(a).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite entries")
    return t


def _symmetric_sqrt_eigvals(evals: torch.Tensor, eps: float) -> torch.Tensor:
    """TF-GAN's ``_symmetric_matrix_square_root`` rule on eigenvalues: ``sign(l) * sqrt|l|``, but ``l`` itself where
    ``|l| < eps`` (TF-GAN takes the SVD of the symmetric matrix, whose singular values are ``|l|`` with the sign of
    ``l`` carried by ``U V^T``; below ``eps`` it keeps ``s`` instead of ``sqrt(s)``, so round-off noise in a
    rank-deficient covariance stays noise-sized instead of growing to ``sqrt(noise)``)."""
    mag = evals.abs()
    return torch.where(mag < eps, evals, evals.sign() * mag.sqrt())


def _symmetric_sqrt(m: torch.Tensor, eps: float) -> torch.Tensor:
    """Symmetric square root of a symmetric matrix (TF-GAN's rule, see :func:`_symmetric_sqrt_eigvals`)."""
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * _symmetric_sqrt_eigvals(evals, eps)) @ evecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-10) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64), TF-GAN's method (LARP's FVD):

    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sqrt(sigma1) sigma2 sqrt(sigma1))^(1/2))``.

    Both square roots are TF-GAN's symmetric ones (``trace_sqrt_product``): eigenvalues ``l`` map to
    ``sign(l) sqrt|l|``, or to ``l`` where ``|l| < eps`` (TF-GAN's SVD form, computed here with ``eigh``, which is
    the same for symmetric matrices and stays real where ``scipy.linalg.sqrtm`` of the non-symmetric product
    ``sigma1 @ sigma2`` can return complex round-off). The last trace equals ``Tr(sqrtm(sigma1 @ sigma2))``, so
    the distance is symmetric in its two arguments. ``mu``: ``[D]``; ``sigma``: ``[D, D]`` symmetric PSD (tensors
    or arrays). The result is clamped at 0 (equal inputs can round to about -1e-10).
    """
    mu1, mu2, s1, s2 = _f64("mu1", mu1), _f64("mu2", mu2), _f64("sigma1", sigma1), _f64("sigma2", sigma2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"expected mu [D] and sigma [D, D] with one D, got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    root1 = _symmetric_sqrt(s1, eps)
    inner = root1 @ s2 @ root1  # symmetric PSD, same eigenvalues as s1 @ s2
    tr_cross = _symmetric_sqrt_eigvals(torch.linalg.eigvalsh((inner + inner.T) / 2), eps).sum()
    value = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_cross)
    return max(value, 0.0)


class FeatureStats:
    """Streaming mean and covariance of feature vectors, in float64 (Chan et al.'s parallel update).

    ``update(features [N, D])`` in any chunking gives the same :meth:`mean` / :meth:`cov` as one batch
    computation (up to float64 round-off); :meth:`merge` combines stats from other processes or shards. Save with
    ``safetensors.torch.save_file(stats.state_dict(), path)`` and reload with :meth:`from_state_dict`, so the
    real-data statistics of an evaluation split are computed once.
    """

    def __init__(self):
        self.num_items = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # sum of outer products of deviations from the mean, [D, D]

    @property
    def num_features(self) -> int | None:
        return None if self._mean is None else self._mean.shape[0]

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self._mean is None:
            self.num_items, self._mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        if mean_b.shape != self._mean.shape:
            raise ValueError(f"feature dimension changed from {self._mean.shape[0]} to {mean_b.shape[0]}")
        n_a, n = self.num_items, self.num_items + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.num_items = n

    def update(self, features: torch.Tensor) -> "FeatureStats":
        """Add a batch of features ``[N, D]`` (any float dtype/device; accumulated on CPU in float64)."""
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a 2-D tensor [N, D], got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
        f = _f64("features", features)
        if f.shape[0] == 0:
            return self
        mean_b = f.mean(0)
        dev = f - mean_b
        self._combine(f.shape[0], mean_b, dev.T @ dev)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold ``other`` into ``self`` (in place) and return ``self``."""
        if other.num_items:
            self._combine(other.num_items, other._mean, other._m2)
        return self

    def mean(self) -> torch.Tensor:
        """Mean ``[D]`` (float64)."""
        if not self.num_items:
            raise ValueError("FeatureStats is empty: call update() first")
        return self._mean.clone()

    def cov(self, ddof: int = 0) -> torch.Tensor:
        """Covariance ``[D, D]`` (float64). ``ddof=0`` (population, LARP/StyleGAN-V FVD) or 1 (``np.cov``)."""
        if self.num_items - ddof <= 0:
            raise ValueError(f"need more than {ddof} samples for cov(ddof={ddof}), have {self.num_items}")
        return self._m2 / (self.num_items - ddof)

    def state_dict(self) -> dict:
        """Tensors for safetensors: ``mean [D]``, ``m2 [D, D]``, ``num_items`` (a 0-d int64)."""
        if not self.num_items:
            raise ValueError("FeatureStats is empty: nothing to save")
        return {"mean": self._mean.clone(), "m2": self._m2.clone(), "num_items": torch.tensor(self.num_items)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStats":
        missing = {"mean", "m2", "num_items"} - set(state)
        if missing:
            raise ValueError(f"FeatureStats state is missing {sorted(missing)}")
        stats = cls()
        stats._combine(int(state["num_items"]), _f64("mean", state["mean"]), _f64("m2", state["m2"]))
        return stats


# ----------------------------------------------------------------------------------------------------------------
# FVD


@dataclass
class MetricResult:
    """A metric value with the protocol that produced it (resolution, frames, sample counts, extractor, hash)."""

    name: str
    value: float
    protocol: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_module(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): identifies in-memory weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ProxyVideoFeatures(nn.Module):
    """A frozen random-init 3D CNN (fixed seed): "FVD-proxy" features when no I3D weights are available.

    Only comparable between runs that use the same seed and dim; never a substitute for real FVD numbers.
    Input ``[B, 3, T, H, W]`` in [-1, 1] (any T >= 1, H, W >= 8); output ``[B, 2 * dim]`` (mean + std pooled).
    """

    is_proxy = True

    def __init__(self, seed: int = 0, dim: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.name = f"proxy-random-c3d-seed{seed}-dim{dim}"
        self.conv1 = nn.Conv3d(3, dim // 2, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1))
        self.conv2 = nn.Conv3d(dim // 2, dim, (3, 4, 4), stride=(2, 2, 2), padding=(1, 1, 1))
        for p in self.parameters():  # NOTE: explicit generator, so the weights do not depend on global RNG state
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p[0].numel(), 1) ** 0.5 if p.dim() > 1
                                                             else 0.01))
            p.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # [B, dim, T', H', W']
        h = h.flatten(2)
        return torch.cat([h.mean(-1), h.std(-1)], dim=1)  # [B, 2*dim]


class _TorchScriptI3D:
    """StyleGAN-V's I3D TorchScript (as used by LARP): input in [-1, 1], resized to 224 inside, 400-d logits."""

    def __init__(self, path: Path, device):
        # NOTE: torch.jit.load runs the TorchScript program in the file: only load trusted files. The published I3D
        # exists only as TorchScript, so torch.jit's deprecation warning is silenced here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(str(path), map_location=device).eval()
        self.name = f"i3d-torchscript:{path.name}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] < 10:
            raise ValueError(f"the I3D extractor needs at least 10 frames, got {x.shape[2]}")
        return self.model(x, rescale=False, resize=True, return_features=True)


class FVD:
    """Fréchet Video Distance between real and generated (or reconstructed) clips.

    Args:
        extractor: a callable ``videos [B, 3, T, H, W] in [-1, 1] -> features [B, D]`` (e.g.
            :class:`ProxyVideoFeatures`), or ``None`` to load ``weights``.
        weights: path to an I3D TorchScript file (StyleGAN-V's ``i3d_torchscript.pt``, which LARP uses); default
            the ``DERA_FAST_I3D`` environment variable. It is loaded with ``torch.jit.load``, which executes the
            file's TorchScript program: only use a trusted file. Its sha256 is recorded in the protocol.
        name: extractor name recorded in the protocol (default: the extractor's ``name`` attribute or class).
        value_range: pixel range of the videos passed to :meth:`update` (mapped to [-1, 1] for the extractor).
        batch_size: feature extraction chunk size.
        device: where the extractor runs.

    Use ``update(real_videos, real=True)`` / ``update(fake_videos, real=False)`` in any number of batches, then
    :meth:`compute`. Statistics are population covariances in float64 (LARP's protocol, SPEC.md §6.1).
    ``self.real`` may be replaced by precomputed :class:`FeatureStats`.
    """

    def __init__(self, extractor: Callable | None = None, *, weights=None, name: str | None = None,
                 value_range=(-1.0, 1.0), batch_size: int = 16, device="cpu"):
        self.weights_sha256 = None
        if extractor is None:
            weights = weights if weights is not None else os.environ.get("DERA_FAST_I3D")
            if weights is None:
                raise ValueError("FVD needs a feature extractor: pass extractor=callable, or weights=path to an I3D "
                                 "TorchScript file (or set DERA_FAST_I3D); ProxyVideoFeatures() gives a labelled "
                                 "proxy without weights")
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"I3D weights not found: {path}")
            self.weights_sha256 = sha256_file(path)
            extractor = _TorchScriptI3D(path, device)
        elif weights is not None:
            raise ValueError("pass either extractor or weights, not both")
        elif not callable(extractor):
            raise TypeError(f"extractor must be callable, got {type(extractor).__name__}")
        elif isinstance(extractor, nn.Module):
            self.weights_sha256 = sha256_module(extractor)
            extractor = extractor.to(device).eval()
        self.extractor = extractor
        self.name = name or getattr(extractor, "name", None) or type(extractor).__name__
        self.is_proxy = bool(getattr(extractor, "is_proxy", False))
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.value_range, self.batch_size, self.device = (lo, hi), int(batch_size), device
        self.real, self.fake = FeatureStats(), FeatureStats()
        self.clip_shape: tuple[int, int, int] | None = None  # (T, H, W) seen so far

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """Extractor features ``[B, D]`` (float64, CPU) of videos ``[B, 3, T, H, W]`` in ``value_range``."""
        if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be [B, 3, T, H, W], got "
                             f"{tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos)}")
        shape = tuple(videos.shape[2:])
        if self.clip_shape is not None and shape != self.clip_shape:
            raise ValueError(f"all clips of one FVD must share (T, H, W): got {shape} after {self.clip_shape}")
        self.clip_shape = shape
        lo, hi = self.value_range
        out = []
        for chunk in videos.split(self.batch_size):
            x = (chunk.to(self.device, torch.float32) - lo) / (hi - lo) * 2 - 1  # -> [-1, 1]
            out.append(torch.as_tensor(self.extractor(x)).reshape(x.shape[0], -1).double().cpu())
        return torch.cat(out)

    def update(self, videos: torch.Tensor, *, real: bool) -> None:
        (self.real if real else self.fake).update(self.features(videos))

    def protocol(self) -> dict:
        t, h, w = self.clip_shape if self.clip_shape else (None, None, None)
        return {"frames": t, "resolution": [h, w], "num_real": self.real.num_items, "num_fake": self.fake.num_items,
                "extractor": self.name, "weights_sha256": self.weights_sha256, "proxy": self.is_proxy,
                "value_range": list(self.value_range), "covariance": "population (ddof=0), float64"}

    def compute(self) -> MetricResult:
        """FVD between the accumulated real and fake statistics (needs >= 2 clips on each side)."""
        for side, stats in (("real", self.real), ("fake", self.fake)):
            if stats.num_items < 2:
                raise ValueError(f"FVD needs at least 2 {side} clips, have {stats.num_items}")
        value = frechet_distance(self.real.mean(), self.real.cov(), self.fake.mean(), self.fake.cov())
        return MetricResult("FVD-proxy" if self.is_proxy else "FVD", value, self.protocol())
