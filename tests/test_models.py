"""LARPTokenizer and the shared tokenizer machinery on the tiny preset (CPU; SPEC.md §7.2, §9)."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_ref, assert_encode_is_batch_invariant, require
from safetensors import safe_open

import dera_fast
from dera_fast.models import DeRATokenizer, LARPTokenizer, TokenizerConfig
from dera_fast.models.config import PRESETS
from dera_fast.models.embed import PatchEmbed3D, sincos_3d
from dera_fast.models.prior import GPTCPrior, prior_loss, ss_ratio


def video(b=2, seed=0, cfg=None):
    cfg = cfg or TokenizerConfig.from_name("tiny")
    g = torch.Generator().manual_seed(seed)
    lo, hi = cfg.pixel_range
    return torch.rand(b, cfg.in_channels, cfg.num_frames, cfg.size, cfg.size, generator=g) * (hi - lo) + lo


@pytest.fixture(scope="module")
def larp():
    torch.manual_seed(0)
    return LARPTokenizer.from_name("tiny").eval()


# ----------------------------------------------------------------------------- config
def test_config_roundtrip_and_presets():
    for name in PRESETS:
        cfg = TokenizerConfig.from_name(name)
        assert TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TokenizerConfig.from_name("larp-l").pixel_range == (0.0, 1.0)
    assert TokenizerConfig.from_name("dera-l").pixel_range == (-1.0, 1.0)
    with pytest.raises(ValueError, match="unknown TokenizerConfig preset"):
        TokenizerConfig.from_name("nope")
    with pytest.raises(ValueError, match="multiples"):
        TokenizerConfig.from_name("tiny", num_frames=6)
    with pytest.raises(ValueError, match="unknown TokenizerConfig fields"):
        TokenizerConfig.from_dict({"bogus": 1})


# ----------------------------------------------------------------------------- positional encodings / patchify
def _mae_1d(dim, pos, base=10000.0):  # the published MAE / LARP formula, in numpy
    omega = 1.0 / base ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def larp_3d_pe(dim, grid, frames):
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    pe2 = np.concatenate([_mae_1d(dim // 2, gw), _mae_1d(dim // 2, gh)], axis=1)  # [g*g, dim]
    pe1 = _mae_1d(dim, np.arange(frames, dtype=np.float32))
    return (pe2.reshape(1, grid * grid, dim) + pe1.reshape(frames, 1, dim)).reshape(-1, dim)


def test_sincos_3d_matches_formula():
    ours = sincos_3d(64, 3, 5, 5)
    ref = torch.from_numpy(larp_3d_pe(64, 5, 3)).float()
    assert_close_to_ref("sincos_3d", ours, ref, None, floor=1e-6)


def test_patch_embed_raster_order_matches_conv3d():
    pe = PatchEmbed3D(3, 16, 4, 8)
    x = torch.randn(2, 3, 8, 16, 24)
    ref = F.conv3d(x, pe.proj.weight, pe.proj.bias, stride=(4, 8, 8)).flatten(2).transpose(1, 2)
    assert_close_to_ref("patch embed", pe(x), ref, None, floor=1e-5)


# ----------------------------------------------------------------------------- shapes / API
def test_larp_shapes_and_roundtrip(larp):
    x = video()
    ids = larp.encode(x)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    rec = larp.decode(ids)
    assert rec.shape == x.shape
    torch.testing.assert_close(larp.reconstruct(x), rec)
    assert larp.tokens_per_clip == 16 and larp.frames_per_clip == 8 and larp.codebook_size == 64
    torch.testing.assert_close(larp.codebook.norm(dim=1), torch.ones(64))
    # decode(ids) is the decoder applied to the quantized latents of forward
    recon, out = larp(x)
    torch.testing.assert_close(out["ids"], ids)
    torch.testing.assert_close(recon, rec, atol=1e-5, rtol=1e-5)
    assert out["latents"].shape == (2, 16, 64) and out["codes"].shape == (2, 16, 8)
    assert "loss_prior" not in out  # the prior only runs in training


def test_triton_backend_path(larp):
    """One encode/decode with every op on the Triton kernels equals the torch references."""
    device = require("triton", "attention")
    model, x = copy.deepcopy(larp).to(device), video(1).to(device)
    with dera_fast.use_backend("triton"):
        ids = model.encode(x)
        rec = model.decode(ids)
    with dera_fast.use_backend("torch"):
        torch.testing.assert_close(ids, model.encode(x))
        assert_close_to_ref("decode", rec, model.decode(ids), None)


def test_eval_determinism_and_batch_invariance(larp):
    assert_encode_is_batch_invariant(larp, video(3, seed=1))


def test_training_mode_samples():
    torch.manual_seed(1)
    tok = LARPTokenizer.from_name("tiny")
    x = video()
    draws = {tuple(tok.encode(x).flatten().tolist()) for _ in range(4)}
    assert len(draws) > 1  # SVQ samples in training mode (tau = 0.03 on a random init)


def test_encode_video_chunks(larp):
    long = video(1, seed=2)[0].repeat(1, 3, 1, 1)  # [3, 24, 32, 32]
    ids = larp.encode_video(long, stride=4, batch_size=2, progress=False)
    assert ids.shape == (5, 16) and ids.device.type == "cpu"  # starts 0, 4, 8, 12, 16
    torch.testing.assert_close(ids[0], larp.encode(long[None, :, :8])[0])
    torch.testing.assert_close(ids[4], larp.encode(long[None, :, 16:24])[0])
    short = larp.encode_video(long[:, :5], progress=False)  # padded by repeating the last frame
    padded = torch.cat([long[:, :5], long[:, 4:5].expand(-1, 3, -1, -1)], dim=1)
    torch.testing.assert_close(short, larp.encode(padded[None]))
    with pytest.raises(ValueError, match="clip_len"):
        larp.encode_video(long, clip_len=4)


# ----------------------------------------------------------------------------- gradients / training
def _all_params_get_grads(model, loss):
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reached {missing}"


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    tok = LARPTokenizer.from_name("tiny")
    with torch.no_grad():  # the zero-init output layer would block the decoder's gradients at step 0
        tok.output_layer.linear.weight.normal_(std=0.02)
    recon, out = tok(video(), step=50, max_steps=100)
    assert set(out) >= {"loss_q", "loss_commit", "loss_codebook", "loss_prior"}
    _all_params_get_grads(tok, (recon - video()).abs().mean() + 0.1 * out["loss_q"] + 0.06 * out["loss_prior"])


def test_init_is_larps():
    tok = LARPTokenizer.from_name("tiny")
    assert not tok.output_layer.linear.weight.any() and not tok.output_layer.linear.bias.any()
    assert tok.output_layer.norm.eps == 1e-6 and tok.encoder.blocks[0].norm1.eps == 1e-5
    assert not tok.encoder.blocks[0].attn.proj.bias.any() and tok.encoder.blocks[0].attn.qkv.bias is None
    w = tok.encoder.blocks[0].mlp.fc1.weight.detach()  # xavier_uniform bound sqrt(6 / (fan_in + fan_out))
    assert float(w.abs().max()) <= (6 / sum(w.shape)) ** 0.5
    assert 0.01 < float(tok.queries.detach().std()) < 0.03
    w = tok.prior.blocks[0].attn.query.weight.detach()  # LARP re-inits the prior's Linears with xavier too
    assert float(w.abs().max()) <= (6 / sum(w.shape)) ** 0.5 and float(w.abs().max()) > 0.1


def test_encoder_permutation_equivariance(larp):
    """[patch, query] vs [query, patch] order: identical query outputs (bidirectional attention, explicit PEs)."""
    x = video(1)
    patches = larp.patch_embed(x) + larp.encoder_pe
    queries = larp.queries[None]
    ref = larp.encoder(patches, queries)
    h = torch.cat([queries, patches], dim=1)
    for blk in larp.encoder.blocks:
        h = blk(h)
    torch.testing.assert_close(h[:, :queries.shape[1]], ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- prior
def test_ss_ratio_schedule():
    assert ss_ratio(0, 1000) == 0.0
    assert ss_ratio(150, 1000) == pytest.approx(0.25)
    assert ss_ratio(300, 1000) == pytest.approx(0.5) and ss_ratio(900, 1000) == 0.5
    assert ss_ratio(None, None) == 0.5


def test_prior_rounds():
    torch.manual_seed(3)
    prior = GPTCPrior(8, 32, 2, 2, 16, dropout=0.0)
    codes = F.normalize(torch.randn(2, 16, 8), dim=-1).requires_grad_()
    full = prior.ar_predict(codes)
    torch.testing.assert_close(full.norm(dim=-1), torch.ones(2, 16))
    torch.testing.assert_close(full[:, :1], codes[:, :1])
    ids, cb = torch.randint(0, 64, (2, 16)), torch.randn(64, 8, requires_grad=True)
    # ratio 0: round 2 sees the same input as round 1, so the 2-round mean equals one round's CE
    one = F.cross_entropy(full[:, 1:].reshape(-1, 8) @ F.normalize(cb, dim=-1).t(), ids[:, 1:].reshape(-1))
    loss = prior_loss(prior, codes, ids, cb, ratio=0.0)
    torch.testing.assert_close(loss, one, atol=1e-5, rtol=1e-5)
    loss = prior_loss(prior, codes, ids, cb, ratio=0.5, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert cb.grad is None and codes.grad is not None  # codebook detached, STE input gets gradients


# ----------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name,cls,expected,prior,heads", [
    pytest.param("larp-l", LARPTokenizer, 172_179_984, 21_700_240, 0, id="larp-l"),
    pytest.param("larp-b", LARPTokenizer, 115_495_440, 21_700_240, 0, id="larp-b"),
    pytest.param("larp-s", LARPTokenizer, 39_271_696, 21_700_240, 0, id="larp-s"),
    pytest.param("dera-l", DeRATokenizer, 172_328_208, 21_700_240, 6_297_088, id="dera-l"),
    pytest.param("tiny", LARPTokenizer, 301_128, 26_536, 0, id="tiny"),
])
def test_parameter_counts(name, cls, expected, prior, heads):
    with torch.device("meta"):
        tok = cls.from_name(name)
    n = tok.num_parameters()
    assert n == expected, f"{name}: {n}"
    assert tok.num_parameters(prior=True) - n == prior
    assert tok.num_parameters(training_heads=True) - n == heads
    if name == "larp-l":  # SPEC §1: 172.18M tokenizer, 21.70M GPTC-S prior
        assert round(n / 1e6, 2) == 172.18 and round(prior / 1e6, 2) == 21.70


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_roundtrip(larp, tmp_path):
    larp.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["dera_fast.model_type"] == "larp"
    assert TokenizerConfig.from_dict(json.loads(meta["dera_fast.config"])) == larp.config
    loaded = LARPTokenizer.from_pretrained(tmp_path)
    assert not loaded.training and loaded.config == larp.config
    for (k, a), (_, b) in zip(larp.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    x = video()
    torch.testing.assert_close(loaded.encode(x), larp.encode(x))
    single = LARPTokenizer.from_pretrained(tmp_path / "model.safetensors")  # config from the metadata
    torch.testing.assert_close(single.encode(x), larp.encode(x))
    with pytest.raises(ValueError, match="'larp' tokenizer"):
        DeRATokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        LARPTokenizer.from_pretrained(tmp_path / "missing")


def test_load_reports_missing_and_unexpected_keys(larp, tmp_path):
    from safetensors.torch import load_file, save_file
    larp.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["bogus.weight"] = state.pop("queries")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['queries'\].*unexpected keys \['bogus.weight'\]"):
        LARPTokenizer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [
    pytest.param((2, 3, 4, 32, 32), id="T"), pytest.param((2, 3, 8, 16, 32), id="H"),
    pytest.param((2, 3, 8, 32, 40), id="W"), pytest.param((2, 1, 8, 32, 32), id="C"),
    pytest.param((3, 8, 32, 32), id="ndim"),
])
def test_bad_video_shape(larp, shape):
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        larp.encode(torch.zeros(shape))


def test_bad_video_values_and_dtype(larp):
    x = video()
    with pytest.raises(TypeError, match="float video"):
        larp.encode((x * 127 + 128).to(torch.uint8))
    with pytest.raises(ValueError, match="far outside"):
        larp.encode(x * 127 + 128)
    with pytest.raises(ValueError, match="NaN"):
        larp.encode(torch.full_like(x, float("nan")))
    with pytest.raises(TypeError):
        larp.encode(x.numpy())


def test_bad_ids(larp):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        larp.decode(torch.full((1, 16), 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        larp.decode(torch.full((1, 16), -1))
    with pytest.raises(TypeError, match="integer"):
        larp.decode(torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        larp.decode(torch.zeros(1, 15, dtype=torch.long))
