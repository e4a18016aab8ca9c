"""Metrics against closed forms and reference implementations: PSNR, SSIM, codebook stats, Fréchet, FVD."""
import hashlib
import math

import numpy as np
import pytest
import torch

from dera_fast.metrics import (FVD, CodebookCounter, FeatureStats, MetricResult, ProxyVideoFeatures,
                               codebook_stats, frechet_distance, psnr, ssim)


def rand_psd(d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


# ---------------------------------------------------------------------------------------------------- PSNR / SSIM


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_psnr_known_mse(value_range):
    lo, hi = value_range
    x = torch.rand(3, 3, 4, 9, 7) * (hi - lo) + lo
    offsets = torch.tensor([0.1, 0.01, 0.3]).view(3, 1, 1, 1, 1)
    out = psnr(x, x + offsets, value_range=value_range, reduction="none")
    expected = 10 * torch.log10((hi - lo) ** 2 / offsets.flatten() ** 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(psnr(x, x + offsets, value_range=value_range), expected.mean(), rtol=1e-5, atol=1e-4)
    assert math.isinf(float(psnr(x, x)))


def test_ssim_identity_and_bounds():
    x = torch.rand(2, 3, 5, 24, 20) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.tensor(1.0))
    noisy = [float(ssim(x, x + s * torch.randn_like(x))) for s in (0.05, 0.2, 0.5)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] > -1
    assert ssim(x, x + 0.1, reduction="none").shape == (2,)
    small = torch.rand(1, 3, 2, 6, 5)  # smaller than the 11-px window: the window shrinks to 5
    torch.testing.assert_close(ssim(small, small, value_range=(0, 1)), torch.tensor(1.0))
    # Scored on [0, 1] whatever the input range: [-1, 1] inputs equal their [0, 1] images.
    y = x + 0.1 * torch.randn_like(x)
    torch.testing.assert_close(ssim(x, y), ssim((x + 1) / 2, (y + 1) / 2, value_range=(0, 1)))


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.random((40, 37, 3))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ref = skm.structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    out = ssim(torch.tensor(a).permute(2, 0, 1)[None], torch.tensor(b).permute(2, 0, 1)[None], value_range=(0, 1))
    assert abs(float(out) - ref) < 1e-6
    # A video is scored frame by frame: equal to the mean of per-frame image SSIMs.
    v, w = torch.rand(1, 3, 3, 16, 16), torch.rand(1, 3, 3, 16, 16)
    per_frame = [float(ssim(v[:, :, t], w[:, :, t], value_range=(0, 1))) for t in range(3)]
    assert abs(float(ssim(v, w, value_range=(0, 1))) - sum(per_frame) / 3) < 1e-6


def test_image_metric_errors():
    x = torch.rand(2, 3, 4, 8, 8)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:1])
    with pytest.raises(TypeError):
        ssim(x.long(), x.long())
    with pytest.raises(ValueError, match="win_size"):
        ssim(x, x, win_size=4)
    with pytest.raises(ValueError, match="reduction"):
        psnr(x, x, reduction="sum")
    with pytest.raises(ValueError, match="value_range"):
        ssim(x, x, value_range=(1, 1))


# ---------------------------------------------------------------------------------------------------- codebook


def test_codebook_closed_forms():
    uniform = codebook_stats(torch.arange(16).repeat(3), 16)
    assert uniform["usage"] == 1.0 and uniform["dead"] == 0 and uniform["perplexity"] == pytest.approx(16)
    one = codebook_stats(torch.full((5, 7), 3), 16)
    assert one["used"] == 1 and one["dead"] == 15 and one["perplexity"] == pytest.approx(1.0)
    half = codebook_stats(torch.tensor([0, 1, 1, 3]), 8)  # p = (1/4, 1/2, 1/4): H = 1.5 bits
    assert half["entropy_bits"] == pytest.approx(1.5) and half["perplexity"] == pytest.approx(2**1.5)
    ids = torch.randint(0, 64, (10, 16))
    counter = CodebookCounter(64)
    for chunk in ids.split(3):
        counter.update(chunk)
    assert counter.compute() == codebook_stats(ids, 64)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        codebook_stats(torch.tensor([8]), 8)
    with pytest.raises(TypeError):
        codebook_stats(torch.tensor([0.5]), 8)


# ---------------------------------------------------------------------------------------------------- Fréchet


@pytest.mark.parametrize("d, rank", [pytest.param(1, None, id="D1"), pytest.param(7, None, id="D7"),
                                     pytest.param(33, None, id="D33"), pytest.param(16, 5, id="D16-rank5")])
def test_frechet_vs_scipy(d, rank):
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = rand_psd(d, rank, seed=1), rand_psd(d, seed=2)
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    cross = linalg.sqrtm(s1.numpy() @ s2.numpy())
    ref = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(cross).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8, abs=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8, abs=1e-8)  # symmetric


def test_frechet_closed_forms():
    d = 6
    s = rand_psd(d, seed=3)
    mu1, mu2 = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-9)
    a, b = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())  # diagonal covariances: sum (sqrt a - sqrt b)^2
    assert frechet_distance(torch.zeros(d), torch.diag(a), torch.zeros(d), torch.diag(b)) == pytest.approx(expected)
    # Numpy inputs work too; shape mismatches are reported.
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2) * 4) == pytest.approx(2 + 2 * 1.0)
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(torch.zeros(2), torch.eye(2) * float("nan"), torch.zeros(2), torch.eye(2))


def test_feature_stats_streaming_equals_batch():
    feats = torch.randn(103, 12, dtype=torch.float64) * 3 + 5
    stats = FeatureStats()
    for chunk in feats.split([1, 40, 2, 60]):
        stats.update(chunk.float() if chunk.shape[0] == 2 else chunk)  # float32 input is upcast
    stats_f64 = FeatureStats().update(feats)
    assert stats.num_items == 103 and stats.num_features == 12
    torch.testing.assert_close(stats_f64.mean(), feats.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats_f64.cov(ddof=1), torch.cov(feats.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats_f64.cov(), torch.cov(feats.T, correction=0), rtol=1e-12, atol=1e-12)
    exact = FeatureStats().update(feats[:1]).update(feats[1:41]).update(feats[41:])
    torch.testing.assert_close(exact.cov(), torch.cov(feats.T, correction=0), rtol=1e-12, atol=1e-12)
    merged = FeatureStats().update(feats[:50]).merge(FeatureStats().update(feats[50:]))
    torch.testing.assert_close(merged.cov(), stats_f64.cov(), rtol=1e-12, atol=1e-12)
    back = FeatureStats.from_state_dict(merged.state_dict())
    assert back.num_items == 103
    torch.testing.assert_close(back.mean(), merged.mean())
    with pytest.raises(ValueError, match="empty"):
        FeatureStats().mean()
    with pytest.raises(ValueError, match="dimension"):
        FeatureStats().update(feats[:3]).update(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        FeatureStats().update(torch.randn(5))


# ---------------------------------------------------------------------------------------------------- FVD


def videos(n, seed, t=8, size=16, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, t, size, size, generator=g) * 2 - 1 + shift).clamp(-1, 1)


def test_fvd_proxy_protocol_and_zero():
    real = videos(6, 0)
    fvd = FVD(ProxyVideoFeatures(seed=0, dim=16), batch_size=4)
    fvd.update(real, real=True)
    fvd.update(real[:3], real=False)
    fvd.update(real[3:], real=False)
    res = fvd.compute()
    assert isinstance(res, MetricResult) and res.name == "FVD-proxy" and float(res) == pytest.approx(0, abs=1e-8)
    p = res.protocol
    assert (p["frames"], p["resolution"], p["num_real"], p["num_fake"]) == (8, [16, 16], 6, 6)
    assert p["extractor"] == "proxy-random-c3d-seed0-dim16" and p["proxy"] is True and len(p["weights_sha256"]) == 64
    other = FVD(ProxyVideoFeatures(seed=0, dim=16))
    other.update(real, real=True)
    other.update(videos(6, 1, shift=0.5), real=False)
    assert float(other.compute()) > 0
    # The input range is mapped to [-1, 1] before the extractor: [0, 1] inputs give the same value.
    zo = FVD(ProxyVideoFeatures(seed=0, dim=16), value_range=(0, 1))
    zo.update((real + 1) / 2, real=True)
    zo.update((videos(6, 1, shift=0.5) + 1) / 2, real=False)
    assert float(zo.compute()) == pytest.approx(float(other.compute()), rel=1e-6)
    assert res.to_dict()["protocol"]["num_real"] == 6


class _FakeI3D(torch.nn.Module):
    """The call signature of StyleGAN-V's I3D TorchScript, with a tiny random body."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return self.proj(x.mean(dim=(2, 3, 4)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fvd_torchscript_weights(tmp_path, monkeypatch):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_FakeI3D()).save(str(path))
    fvd = FVD(weights=path)
    fvd.update(videos(4, 0, t=10), real=True)
    fvd.update(videos(4, 1, t=10), real=False)
    res = fvd.compute()
    assert res.name == "FVD" and res.protocol["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert res.protocol["extractor"] == "i3d-torchscript:i3d_torchscript.pt" and res.protocol["proxy"] is False
    with pytest.raises(ValueError, match="10 frames"):
        FVD(weights=path).update(videos(2, 0, t=8), real=True)
    monkeypatch.setenv("DERA_FAST_I3D", str(path))
    assert FVD().weights_sha256 == res.protocol["weights_sha256"]


def test_fvd_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("DERA_FAST_I3D", raising=False)
    with pytest.raises(ValueError, match="extractor"):
        FVD()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        FVD(weights=tmp_path / "nope.pt")
    with pytest.raises(TypeError):
        FVD(extractor=3)
    fvd = FVD(ProxyVideoFeatures(dim=8))
    fvd.update(videos(2, 0), real=True)
    with pytest.raises(ValueError, match="share"):
        fvd.update(videos(2, 0, size=12), real=False)
    with pytest.raises(ValueError, match="at least 2 fake"):
        fvd.compute()
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        fvd.update(torch.rand(3, 8, 16, 16), real=True)
