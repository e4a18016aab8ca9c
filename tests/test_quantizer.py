"""VectorQuantizer (LARP's SVQ module): modes, losses, straight-through gradients, id decoding, bad input."""
import pytest
import torch
import torch.nn.functional as F

from conftest import exit_worker
from dera_fast.models.quantizer import VectorQuantizer


def make(**kw):
    torch.manual_seed(0)
    return VectorQuantizer(24, 50, 8, **kw)


def test_shapes_and_eval_is_deterministic_argmax():
    vq = make().eval()
    h = torch.randn(3, 7, 24)
    out = vq(h)
    assert out.ids.shape == (3, 7) and out.ids.dtype == torch.int64
    assert out.quantized.shape == (3, 7, 24) and out.codes.shape == (3, 7, 8)
    z = F.normalize(vq.in_linear(h), dim=-1)
    expect = (z @ vq.normalized_codebook().t()).argmax(-1)
    assert torch.equal(out.ids, expect)
    assert torch.equal(vq(h).ids, out.ids)
    # the straight-through codes carry the chosen unit code vectors forward
    torch.testing.assert_close(out.codes, vq.codes_from_ids(out.ids))
    torch.testing.assert_close(out.quantized, vq.decode_ids(out.ids))


def test_training_samples_from_the_cosine_softmax():
    vq = make(temperature=0.5).train()
    h = torch.randn(1, 1, 24).expand(1, 4000, 24)
    ids = vq(h, generator=torch.Generator().manual_seed(3)).ids.flatten()
    z = F.normalize(vq.in_linear(h[0, :1]), dim=-1)
    probs = (z @ vq.normalized_codebook().t() / 0.5).softmax(-1)[0]
    freq = torch.bincount(ids, minlength=50).float() / ids.numel()
    assert (freq - probs).abs().max() < 0.03  # 4000 draws: a few standard errors
    assert len(ids.unique()) > 5  # it really samples
    vq.deterministic_eval = False
    vq.eval()
    assert len(vq(h, generator=torch.Generator().manual_seed(3)).ids.unique()) > 5  # stochastic eval on request


def test_losses_match_the_formulas():
    vq = make(beta=0.25, codebook_weight=1.0).train()
    h = torch.randn(2, 5, 24)
    out = vq(h, generator=torch.Generator().manual_seed(0))
    z = F.normalize(vq.in_linear(h), dim=-1)
    q = vq.codes_from_ids(out.ids)
    torch.testing.assert_close(out.losses["commitment"], ((q - z) ** 2).mean())
    torch.testing.assert_close(out.losses["codebook"], ((q - z) ** 2).mean())
    torch.testing.assert_close(out.losses["vq"], 1.25 * ((q - z) ** 2).mean())


def test_straight_through_gradient_is_identity_and_codebook_gets_the_codebook_loss():
    vq = make().train()
    h = torch.randn(2, 5, 24, requires_grad=True)
    out = vq(h, generator=torch.Generator().manual_seed(0))
    g = torch.randn_like(out.codes)
    # d codes / d z = I: the gradient reaching z equals the upstream gradient
    z = F.normalize(vq.in_linear(h), dim=-1)
    (gz,) = torch.autograd.grad(out.codes, h, g, retain_graph=True)
    (gz_ref,) = torch.autograd.grad(z, h, g)
    torch.testing.assert_close(gz, gz_ref)
    out.losses["vq"].backward()
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0
    assert vq.in_linear.weight.grad.abs().sum() > 0


def test_quantizer_runs_in_fp32_under_autocast():
    vq = make().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(torch.randn(2, 3, 24))
    assert out.codes.dtype == torch.float32 and out.losses["vq"].dtype == torch.float32


def test_bad_input():
    vq = make()
    with pytest.raises(ValueError, match="h must be"):
        vq(torch.randn(4, 24))
    with pytest.raises(ValueError, match="ids must be in"):
        vq.decode_ids(torch.tensor([[0, 50]]))
    with pytest.raises(TypeError, match="ids must be"):
        vq.decode_ids(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="temperature"):
        VectorQuantizer(8, 4, 2, temperature=0.0)


# ------------------------------------------------------------------------------------------------ codebook health
def _clustered(n_clusters=6, per=40, dim=24, seed=0):
    """h [1, n_clusters * per, dim]: tight clusters around random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 3
    return (centres.repeat_interleave(per, 0) + 0.05 * torch.randn(n_clusters * per, dim, generator=g))[None]


def test_health_is_off_by_default_and_keeps_larp_state_dict_keys():
    vq = make()
    assert not bool(vq.kmeans_pending) and vq.restart_after == 0 and vq.entropy_weight == 0
    assert set(vq.state_dict()) == {"in_linear.weight", "in_linear.bias", "out_linear.weight", "out_linear.bias",
                                    "embedding.weight"}  # health buffers are not inference weights
    w = vq.embedding.weight.detach().clone()
    vq.train()(torch.randn(2, 5, 24))
    assert torch.equal(vq.embedding.weight, w)  # nothing rewrites the codebook when the options are off
    assert "entropy" not in vq(torch.randn(2, 5, 24)).losses


def test_spherical_kmeans_finds_clusters_and_fills_small_inputs():
    from dera_fast.models.quantizer import spherical_kmeans

    centres = F.normalize(torch.randn(5, 8), dim=-1)
    x = F.normalize(centres.repeat_interleave(50, 0) + 0.01 * torch.randn(250, 8), dim=-1)
    c = spherical_kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert c.shape == (5, 8) and torch.allclose(c.norm(dim=-1), torch.ones(5))
    assert (centres @ c.t()).max(1).values.min() > 0.99  # every true centre found
    again = spherical_kmeans(x, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, again)
    few = spherical_kmeans(x[:3], 7, generator=torch.Generator().manual_seed(0))  # N < K: distinct rows
    assert few.shape == (7, 8) and torch.equal(few[:3], x[:3])
    assert torch.cdist(few, few).add(torch.eye(7) * 9).min() > 1e-3


def test_kmeans_init_uses_the_first_batch_latents():
    vq = VectorQuantizer(24, 16, 8, kmeans_init=True).train()
    h = _clustered()
    random_codes = vq.eval()(h).ids.unique().numel()
    vq.train()(h)
    assert not bool(vq.kmeans_pending)
    z = F.normalize(vq.in_linear(h), dim=-1)[0]
    # every latent now sits next to a code, and every code next to latents: all 16 in use (the random init: few)
    assert (z @ vq.normalized_codebook().t()).max(1).values.min() > 0.99
    assert vq.eval()(h).ids.unique().numel() == 16 > random_codes
    w = vq.embedding.weight.detach().clone()
    vq.train()(h)
    assert torch.equal(vq.embedding.weight, w)  # once only


def test_dead_codes_restart_onto_batch_latents_after_n_idle_steps():
    torch.manual_seed(0)
    vq = VectorQuantizer(24, 32, 8, restart_after=3, stochastic=False).train()
    h = _clustered(n_clusters=2, per=20)
    for _ in range(3):
        vq(h)
    dead = (vq.idle_steps >= 3).nonzero().flatten()
    assert 0 < dead.numel() <= 30 and int(vq.last_counts.sum()) == 40
    vq(h)  # the restart happens at the start of the next training forward
    z = F.normalize(vq.in_linear(h), dim=-1)[0]
    moved = vq.normalized_codebook()[dead]
    assert (moved @ z.t()).max(1).values.min() > 0.999  # each restarted code is one of the batch's latents
    assert bool((vq.idle_steps[dead] <= 1).all())
    stats = vq.usage_stats()
    assert 0 < stats["vq_used"] <= 1 and 1 <= stats["vq_perplexity"] <= 32 and stats["vq_alive"] == 1.0


def test_usage_stats_and_perplexity():
    vq = VectorQuantizer(24, 4, 8, stochastic=False, usage_decay=0.5).train()
    vq._count(torch.tensor([[0, 1, 2, 3]]))
    s = vq.usage_stats()
    assert s["vq_used"] == 1.0 and s["vq_perplexity"] == pytest.approx(4.0)
    vq._count(torch.tensor([[0, 0, 0, 0]]))
    s = vq.usage_stats()
    assert s["vq_used"] == 0.25 and s["vq_perplexity"] == pytest.approx(1.0)
    torch.testing.assert_close(vq.usage_ema, torch.tensor([2.25, 0.25, 0.25, 0.25]))
    assert vq.idle_steps.tolist() == [0, 1, 1, 1]


def test_entropy_loss_matches_larp_formula_and_trains_both_sides():
    from dera_fast.models.quantizer import entropy_loss

    vq = VectorQuantizer(24, 10, 8, entropy_weight=0.5, entropy_temperature=0.2).train()
    h = torch.randn(2, 6, 24)
    out = vq(h, generator=torch.Generator().manual_seed(0))
    z = F.normalize(vq.in_linear(h), dim=-1).reshape(12, 8)
    e = vq.normalized_codebook()
    d = (z[:, None] - e[None]).pow(2).sum(-1)  # LARP: affinity = -|z - e|^2, softmax at temperature 0.2
    p = (-d / 0.2).softmax(-1)
    sample = -(p * (-d / 0.2).log_softmax(-1)).sum(-1).mean()
    avg = -(p.mean(0) * torch.log(p.mean(0) + 1e-5)).sum()
    torch.testing.assert_close(out.losses["entropy"], sample - avg)
    torch.testing.assert_close(entropy_loss(-d / 0.2)[0], sample - avg)
    torch.testing.assert_close(out.losses["vq"], 1.25 * out.losses["commitment"] + 0.5 * out.losses["entropy"])
    out.losses["entropy"].backward()
    assert vq.embedding.weight.grad.abs().sum() > 0 and vq.in_linear.weight.grad.abs().sum() > 0
    assert "entropy" not in vq.eval()(h).losses  # a training loss only


def test_health_state_round_trip_is_bit_exact():
    vq = VectorQuantizer(24, 16, 8, kmeans_init=True, restart_after=2).train()
    for _ in range(3):
        vq(torch.randn(2, 5, 24))
    state = vq.health_state_dict()
    twin = VectorQuantizer(24, 16, 8, kmeans_init=True, restart_after=2).train()
    twin.load_state_dict(vq.state_dict())
    twin.load_health_state_dict(state)
    torch.manual_seed(5)
    a = vq(torch.randn(2, 5, 24)).ids
    torch.manual_seed(5)
    b = twin(torch.randn(2, 5, 24)).ids
    assert torch.equal(a, b) and torch.equal(vq.embedding.weight, twin.embedding.weight)
    for k, v in vq.health_state_dict().items():
        assert torch.equal(v, twin.health_state_dict()[k]), k
    with pytest.raises(KeyError, match="health state lacks"):
        twin.load_health_state_dict({})


def test_bad_health_options():
    with pytest.raises(ValueError, match="restart_after"):
        VectorQuantizer(8, 4, 2, restart_after=-1)
    with pytest.raises(ValueError, match="entropy_temperature"):
        VectorQuantizer(8, 4, 2, entropy_temperature=0.0)


def _dist_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights on both ranks ...
    vq = VectorQuantizer(24, 16, 8, kmeans_init=True, restart_after=2).train()
    vq.distributed = True
    torch.manual_seed(100 + rank)  # ... different data and RNG streams, as under DDP
    for _ in range(6):
        vq(torch.randn(2, 5, 24) + rank)
    flat = torch.cat([vq.embedding.weight.detach().flatten(), vq.usage_ema, vq.idle_steps.float()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"same": all(torch.equal(gathered[0], g) for g in gathered)}, out)
    dist.destroy_process_group()
    exit_worker()


def test_kmeans_and_restarts_are_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "result.pt")
    mp.spawn(_dist_worker, args=(2, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    assert torch.load(out, weights_only=True)["same"]
