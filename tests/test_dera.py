"""DeRATokenizer on the tiny preset: two streams through one shared encoder, alignment outputs (SPEC.md §3, §9.6-7)."""
import copy

import pytest
import torch
from conftest import assert_close_to_ref, assert_encode_is_batch_invariant, require

import dera_fast
from dera_fast.models import AlignTargets, DeRATokenizer, TokenizerConfig
from dera_fast.models.dera import match_grid, negative_cosine


def video(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 32, 32, generator=g) * 2 - 1


def targets(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)  # teacher grids: image 4x4 (= ours), video 4x4x4 (2x ours in time)
    return AlignTargets(appearance=torch.randn(b, 16, 32, generator=g), appearance_grid=(4, 4),
                        motion=torch.randn(b, 64, 32, generator=g), motion_grid=(4, 4, 4))


@pytest.fixture(scope="module")
def dera():
    torch.manual_seed(0)
    return DeRATokenizer.from_name("tiny").eval()


def test_shapes_and_roundtrip(dera):
    x = video()
    ids = dera.encode(x)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    a, m = dera.split_ids(ids)
    assert a.shape == (2, 4) and m.shape == (2, 12)
    assert dera.decode(ids).shape == x.shape
    recon, out = dera(x, targets=targets())
    assert recon.shape == x.shape
    assert out["patch_appearance"].shape == (2, 16, 64) and out["patch_motion"].shape == (2, 32, 64)
    assert out["align_pred_appearance"].shape == (2, 16, 32) and out["align_pred_motion"].shape == (2, 32, 32)
    torch.testing.assert_close(out["ids"], ids)
    torch.testing.assert_close(out["loss_align"], 1.0 * out["align_appearance"] + 0.5 * out["align_motion"])
    for k in ("align_appearance", "align_motion"):
        assert -1.0 <= out[k].item() <= 1.0


def test_triton_backend_varlen_path(dera):
    """Both streams through the Triton varlen attention kernel equal the torch reference."""
    device = require("triton", "attention")
    model, x = copy.deepcopy(dera).to(device), video(1).to(device)
    with dera_fast.use_backend("triton"):
        s = model.encode_streams(x)
    with dera_fast.use_backend("torch"):
        ref = model.encode_streams(x)
    for k in ref:
        assert_close_to_ref(k, s[k], ref[k], None)


def test_eval_determinism_and_batch_invariance(dera):
    assert_encode_is_batch_invariant(dera, video(3, seed=3))


def _dense_stream(model, patches, queries):
    h = torch.cat([patches, queries], dim=1)
    for blk in model.encoder.blocks:
        h = blk(h)
    return h


def test_varlen_packing_equals_two_separate_passes(dera):
    x = video()
    s = dera.encode_streams(x)
    b = x.shape[0]
    ha = _dense_stream(dera, dera.appearance_embed(x[:, :, 0]) + dera.appearance_pe,
                       dera.queries_appearance[None].expand(b, -1, -1))
    hm = _dense_stream(dera, dera.motion_embed(x) + dera.motion_pe, dera.queries_motion[None].expand(b, -1, -1))
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s["query_appearance"], ha[:, 16:], **tol)
    torch.testing.assert_close(s["patch_appearance"], ha[:, :16], **tol)
    torch.testing.assert_close(s["query_motion"], hm[:, 32:], **tol)
    torch.testing.assert_close(s["patch_motion"], hm[:, :32], **tol)
    # token order: appearance ids first
    torch.testing.assert_close(dera.encode(x)[:, :4], dera.quantizer(s["query_appearance"]).ids)


def test_stream_isolation(dera):
    """Perturbing frames 1..T-1 leaves the appearance stream unchanged; its gradient w.r.t. them is zero."""
    x = video()
    y = x.clone()
    y[:, :, 1:] = torch.rand_like(y[:, :, 1:]) * 2 - 1
    sx, sy = dera.encode_streams(x), dera.encode_streams(y)
    for k in ("query_appearance", "patch_appearance"):
        torch.testing.assert_close(sx[k], sy[k], atol=1e-6, rtol=0)
    assert not torch.allclose(sx["query_motion"], sy["query_motion"])
    x = x.requires_grad_()
    s = dera.encode_streams(x)
    (g,) = torch.autograd.grad(s["query_appearance"].sum() + s["patch_appearance"].sum(), x, retain_graph=True)
    assert not g[:, :, 1:].any() and g[:, :, 0].any()
    (g,) = torch.autograd.grad(s["query_motion"].sum(), x)
    assert g[:, :, 1:].any()


def test_shared_encoder_parameters_are_exactly_the_shared_ones():
    torch.manual_seed(4)
    tok = DeRATokenizer.from_name("tiny")
    s = tok.encode_streams(video())
    names = [n for n, p in tok.named_parameters()]
    params = [p for p in tok.parameters()]
    ga = torch.autograd.grad(s["query_appearance"].sum() + s["patch_appearance"].sum(), params,
                             retain_graph=True, allow_unused=True)
    gm = torch.autograd.grad(s["query_motion"].sum() + s["patch_motion"].sum(), params, allow_unused=True)
    both = {n for n, a, m in zip(names, ga, gm) if a is not None and m is not None and a.any() and m.any()}
    shared = {id(p) for p in tok.shared_encoder_parameters()}
    assert both == {n for n, p in tok.named_parameters() if id(p) in shared}
    assert both == {n for n in names if n.startswith("encoder.")}


def test_gradients_reach_every_parameter():
    torch.manual_seed(5)
    tok = DeRATokenizer.from_name("tiny")
    with torch.no_grad():
        tok.output_layer.linear.weight.normal_(std=0.02)
    x = video()
    recon, out = tok(x, targets=targets(), step=10, max_steps=100)
    loss = (recon - x).abs().mean() + 0.1 * out["loss_q"] + 0.06 * out["loss_prior"] + out["loss_align"]
    loss.backward()
    missing = [n for n, p in tok.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_align_layer_is_configurable():
    torch.manual_seed(6)
    last = DeRATokenizer.from_name("tiny").eval()
    first = DeRATokenizer(last.config.replace(align_layer=1)).eval()
    first.load_state_dict(last.state_dict())
    x = video()
    s_last, s_first = last.encode_streams(x), first.encode_streams(x)
    torch.testing.assert_close(s_first["query_motion"], s_last["query_motion"])
    assert not torch.allclose(s_first["patch_motion"], s_last["patch_motion"])
    h = torch.cat([last.motion_embed(x) + last.motion_pe, last.queries_motion[None].expand(2, -1, -1)], dim=1)
    assert_close_to_ref("patch_motion", s_first["patch_motion"], last.encoder.blocks[0](h)[:, :32], None, floor=1e-5)


def test_alignment_loss_and_grid_matching():
    t = torch.randn(2, 16, 8)
    torch.testing.assert_close(negative_cosine(3.0 * t, t), torch.tensor(-1.0))
    pred, target = torch.randn(2, 32, 8), torch.randn(2, 64, 8)  # grids (2,4,4) and (4,4,4)
    p, q = match_grid(pred, (2, 4, 4), target, (4, 4, 4), "pool")
    assert p is pred
    torch.testing.assert_close(q, target.view(2, 2, 2, 16, 8).mean(2).reshape(2, 32, 8))
    p, q = match_grid(pred, (2, 4, 4), target, (4, 4, 4), "interp")
    assert q is target and p.shape == (2, 64, 8)
    with pytest.raises(ValueError, match="grid"):
        match_grid(pred, (2, 4, 4), target, (3, 4, 4), "pool")
    tok = DeRATokenizer.from_name("tiny")
    with pytest.raises(ValueError, match="align_dim_motion"):
        tok.alignment_losses(torch.randn(2, 16, 64), torch.randn(2, 32, 64),
                             AlignTargets(motion=torch.randn(2, 32, 7), motion_grid=(2, 4, 4)))
    only_a = tok.alignment_losses(torch.randn(2, 16, 64), torch.randn(2, 32, 64),
                                  AlignTargets(appearance=torch.randn(2, 16, 32), appearance_grid=(4, 4)))
    assert "align_motion" not in only_a
    torch.testing.assert_close(only_a["loss_align"], only_a["align_appearance"])


def test_save_load_roundtrip(dera, tmp_path):
    dera.save_pretrained(tmp_path)
    loaded = DeRATokenizer.from_pretrained(tmp_path)
    x = video()
    torch.testing.assert_close(loaded.encode(x), dera.encode(x))
    torch.testing.assert_close(loaded.reconstruct(x), dera.reconstruct(x))


def test_bad_config_and_input(dera):
    with pytest.raises(ValueError, match="num_appearance_tokens"):
        DeRATokenizer(TokenizerConfig.from_name("tiny", num_appearance_tokens=0))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        dera.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        dera.decode(torch.full((1, 16), 99))
