"""VectorQuantizer (LARP's SVQ module): modes, losses, straight-through gradients, id decoding, bad input."""
import pytest
import torch
import torch.nn.functional as F

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
