"""The pieces of `dera_fast.eval` without video: streaming statistics vs one shot, FVD identities and TF-GAN's
square-root rule, clip selection and rank sharding, the real-statistics cache, protocol comparison, LPIPS heads."""
import json
import math

import pytest
import torch

from dera_fast.eval import protocol as P
from dera_fast.eval.sampling import derive_seed, rank_batches, select_clips
from dera_fast.eval.stats import cache_path, exact_means, load_real_stats, save_real_stats
from dera_fast.metrics import FeatureStats, frechet_distance


def feats(n, d, seed, scale=3.0, shift=5.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift


def fvd_of(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = FeatureStats().update(a), FeatureStats().update(b)
    return frechet_distance(sa.mean(), sa.cov(), sb.mean(), sb.cov())


def tfgan_reference(mu1, s1, mu2, s2, eps=1e-10):
    """TF-GAN's trace_sqrt_product written with torch.linalg.svd, as LARP's utils/fvd computes it."""
    def sqrt_sym(m):
        u, s, vh = torch.linalg.svd(m)
        return u @ torch.diag(torch.where(s < eps, s, s.sqrt())) @ vh

    r = sqrt_sym(s1)
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1 + s2) - 2 * torch.trace(sqrt_sym(r @ s2 @ r)))


@pytest.mark.parametrize("n,d", [pytest.param(1000, 7, id="N1000-D7"), pytest.param(50, 33, id="N50-D33"),
                                 pytest.param(9, 40, id="N9-D40-rank-deficient")])
def test_streaming_stats_equal_one_shot(n, d):
    x = feats(n, d, 0)
    chunks = FeatureStats()
    k = (n - 3) // 3
    for i, c in enumerate(x.split([1, 2, k, n - 3 - k])):  # uneven chunks, including a single row
        chunks.update(c.float() if i == 1 else c)
    assert chunks.num_items == n
    ref = torch.cat([x[:1], x[1:3].float().double(), x[3:]])  # two rows came in as float32: same rounding
    torch.testing.assert_close(chunks.mean(), ref.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(chunks.cov(), torch.cov(ref.T, correction=0), rtol=1e-11, atol=1e-11)
    # Shards merged like ranks (the exact combination), empty shards included.
    merged = FeatureStats()
    for part in x.split([n // 2, 0, n - n // 2]):
        merged.merge(FeatureStats().update(part))
    torch.testing.assert_close(merged.cov(), torch.cov(x.T, correction=0), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("n,d", [pytest.param(200, 12, id="N200-D12"), pytest.param(6, 12, id="N6-D12"),
                                 pytest.param(400, 64, id="N400-D64")])
def test_fvd_self_zero_and_symmetric(n, d):
    a, b = feats(n, d, 1), feats(n, d, 2, scale=2.5, shift=4.0)
    assert fvd_of(a, a) == pytest.approx(0.0, abs=1e-8 * d)
    assert fvd_of(a, a[torch.randperm(n)]) == pytest.approx(0.0, abs=1e-8 * d)  # order does not matter
    ab, ba = fvd_of(a, b), fvd_of(b, a)
    assert ab > 0 and ab == pytest.approx(ba, rel=1e-9)


@pytest.mark.parametrize("n,d", [pytest.param(300, 16, id="N300-D16"), pytest.param(10, 24, id="N10-D24-rank9")])
def test_frechet_matches_tfgan_svd_form(n, d):
    a, b = feats(n, d, 3), feats(n, d, 4, scale=2.0)
    sa, sb = FeatureStats().update(a), FeatureStats().update(b)
    ref = tfgan_reference(sa.mean(), sa.cov(), sb.mean(), sb.cov())
    assert frechet_distance(sa.mean(), sa.cov(), sb.mean(), sb.cov()) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_exact_means_order_independent():
    rows = torch.tensor([[1e16, 1.0], [1.0, 2.0], [-1e16, 3.0]], dtype=torch.float64)
    m = exact_means(rows, ["a", "b"])
    assert m == {"a": 1.0 / 3, "b": 2.0}  # fsum keeps the 1.0 that naive summation loses
    assert exact_means(rows[[2, 0, 1]], ["a", "b"]) == m


def test_psnr_per_video_definition():
    """What eval tokenizer reports: mean over videos of -10 log10(MSE_v) on [0, 1] (metrics.psnr, reduction none)."""
    from dera_fast.metrics import psnr

    x = torch.rand(3, 3, 4, 8, 8, dtype=torch.float64)
    y = (x + torch.tensor([0.01, 0.1, 0.3], dtype=torch.float64).view(3, 1, 1, 1, 1)).clamp(0, 1)
    per_video = [-10 * math.log10(float((x[i] - y[i]).pow(2).mean())) for i in range(3)]
    assert float(psnr(x, y, value_range=(0, 1))) == pytest.approx(sum(per_video) / 3, rel=1e-12)
    assert float(psnr(x, y, value_range=(0, 1))) != pytest.approx(
        -10 * math.log10(float((x - y).pow(2).mean())), rel=1e-3)


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("n,bs", [pytest.param(10, 3, id="N10-B3"), pytest.param(1, 4, id="N1-B4"),
                                  pytest.param(17, 17, id="N17-B17")])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_batches_partition_global_batches(n, bs, world):
    per_rank = [rank_batches(n, bs, r, world) for r in range(world)]
    flat = sorted(p for batches in per_rank for _, pos in batches for p in pos)
    assert flat == list(range(n))  # every clip exactly once, ranks with no batch allowed
    single = dict(rank_batches(n, bs, 0, 1))
    for batches in per_rank:
        for k, pos in batches:
            assert single[k] == pos  # global batch k has the same clips in every world size


def test_select_clips():
    assert select_clips(5, None, 0, repeat=False) == [(0, i) for i in range(5)]
    sub = select_clips(20, 7, 3, repeat=False)
    assert len(sub) == 7 and sub == sorted(sub) and sub == select_clips(20, 7, 3, repeat=False)
    assert sub != select_clips(20, 7, 4, repeat=False)
    rep = select_clips(4, 10, 0, repeat=True)
    assert len(rep) == 10 and sorted(i for p, i in rep if p == 0) == [0, 1, 2, 3]
    assert sorted(i for p, i in rep if p == 1) == [0, 1, 2, 3] and [p for p, _ in rep[8:]] == [2, 2]
    with pytest.raises(ValueError, match="more than the 5 videos"):
        select_clips(5, 6, 0, repeat=False)
    assert derive_seed(1, 2) != derive_seed(2, 1) and 0 <= derive_seed(0, 0) < 2**63


# ---------------------------------------------------------------------------------------------------- cache


def test_real_stats_cache_roundtrip(tmp_path):
    key = {"format": 1, "split": "ucf101_train", "dataset_digest": "sha256:00", "extractor_sha256": "ab"}
    stats = FeatureStats().update(feats(20, 6, 0))
    path = cache_path(tmp_path, key)
    assert path.name.startswith("real-stats-ucf101_train-") and path.suffix == ".safetensors"
    save_real_stats(path, key, stats, torch.arange(20) % 3, world_size=2)
    back, labels = load_real_stats(path, key)
    torch.testing.assert_close(back.cov(), stats.cov(), rtol=0, atol=0)
    assert labels.tolist() == (torch.arange(20) % 3).tolist() and back.num_items == 20
    assert load_real_stats(path, {**key, "extractor_sha256": "cd"}) is None  # other key: not reused
    assert load_real_stats(tmp_path / "none.safetensors", key) is None
    path.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_real_stats(path, key) is None
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------- protocol


def _result(**proto):
    base = {"task": "tokenizer reconstruction", "seed": 0, "num_videos": 6, "world_size": 1, "git_sha": "abc",
            "split": "videos", "dataset_digest": "sha256:ff", "frames": 16, "size": 32}
    return {"kind": "dera_fast.eval/tokenizer", "protocol": {**base, **proto},
            "metrics": {"rfvd": 10.0, "psnr": 25.0}, "models": {}}


def test_compare_results_rules():
    a = _result()
    table = P.compare_results(a, {**_result(), "metrics": {"rfvd": 7.5, "psnr": 26.0}})
    assert "-2.5" in table and "+1" in table
    with pytest.raises(ValueError, match=r"seed \(0 vs 1\)"):
        P.compare_results(a, _result(seed=1))
    with pytest.raises(ValueError, match="cfg"):
        P.compare_results(a, _result(cfg=1.25))  # a key present on one side only differs too
    assert "note: git_sha differs" in P.compare_results(a, _result(git_sha="def"))
    with pytest.raises(ValueError, match="git_sha"):
        P.compare_results(a, _result(git_sha="def"), strict=True)
    with pytest.raises(ValueError, match="generator"):
        P.compare_results(a, {**_result(), "kind": "dera_fast.eval/generator"})


def test_write_json_atomic_and_load(tmp_path):
    path = tmp_path / "sub" / "r.json"
    P.write_json_atomic(path, {**_result(), "metrics": {"psnr": float("inf")}})
    assert json.loads(path.read_text())["metrics"]["psnr"] is None  # strict JSON: no Infinity
    assert P.load_result(path)["protocol"]["seed"] == 0
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        P.load_result(tmp_path / "x.json")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["r.json"]


# ---------------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    from safetensors.torch import save_file

    from dera_fast.train.losses import PerceptualLoss

    torch.manual_seed(0)
    net = PerceptualLoss("vgg")
    for p in net.features.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in net.features.state_dict().items()}, str(path))
    return path


def test_lpips_heads_from_lpips_wheel(vgg_file, tmp_path, monkeypatch):
    """With the lpips package installed its shipped heads are used (read with weights_only=True, never
    imported); without it the heads are uniform and the metric is named apart."""
    import importlib

    from dera_fast.eval import build_lpips

    net, rec, name = build_lpips(vgg_file)
    if rec["heads"] == "uniform 1/C":
        assert name == "lpips_uniform_heads"
    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 128, 256, 512, 512])}
    torch.save(heads, pkg / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    net, rec, name = build_lpips(vgg_file)
    assert name == "lpips" and rec["heads"] == "lpips wheel v0.1 vgg.pth" and len(rec["heads_sha256"]) == 64
    for i, h in enumerate(net.heads):
        torch.testing.assert_close(h.detach(), heads[f"lin{i}.model.1.weight"].flatten())
    x, y = torch.rand(1, 3, 2, 16, 16), torch.rand(1, 3, 2, 16, 16)
    per_frame = [float(net(x[:, :, t:t + 1], y[:, :, t:t + 1])) for t in range(2)]
    assert float(net(x, y)) == pytest.approx(sum(per_frame) / 2, rel=1e-5)  # mean over frames, as LARP
    assert float(net(x, x)) == 0.0
