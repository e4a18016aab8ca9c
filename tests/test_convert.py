"""LARP drop-in loading: synthetic checkpoints with LARP's exact key names and shapes (hywang66/LARP
`models/larp_tokenizer.py`, `bottleneck.py`, `gptc.py`, timm `Block`), written in its PyTorchModelHubMixin layout.

The official code cannot run here (no released weights offline, and it needs timm), so equivalence is checked
against an independent plain-PyTorch forward written straight from LARP's state dict (SDPA, einops unpatchify).
"""
import json

import einops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_ref
from safetensors.torch import save_file

from dera_fast.convert import from_larp
from dera_fast.convert.larp import map_larp_state_dict

D, HEADS, DEPTH, TOKENS, K, CODE = 32, 2, 2, 16, 64, 8
FRAMES, SIZE, PT, P = 8, 32, 4, 8
GT, GS = FRAMES // PT, SIZE // P
N = GT * GS * GS


def larp_config(prior="none", **over):
    """LARP constructor arguments as its config.json stores them (cfgs/larp_tokenizer.yaml, tiny sizes)."""
    cfg = {
        "bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": CODE, "norm": "none", "regularizer": {
            "name": "vq", "args": {"codebook_size": K, "commitment_loss_weight": 0.25, "codebook_loss_weight": 1.0,
                                   "entropy_loss_weight": 0.0, "entropy_loss_temperature": 0.01,
                                   "l2_normalized": True, "stochastic": True, "stochastic_temperature": 0.03}}}},
        "prior_model": {"name": prior, "use_mix_ss": True, "mix_ss_max_ratio": 0.5, "mix_ss_peak_steps_ratio": 0.3,
                        "n_rounds": 2, "avg_loss_over_rounds": True, "no_grad_before_last_round": False,
                        "no_dropout": False, "latent_ce_temperature": 1.0,
                        "args": {"l2_normalized": True, "max_seq_len": TOKENS}},
        "transformer_name": "transformer_encoder_parallel", "encoder_name": "none", "decoder_name": "none",
        "bottleneck_token_num": TOKENS, "input_size": SIZE, "frame_num": FRAMES, "temporal_patch_size": PT,
        "patch_size": P, "decoder_temporal_patch_size": PT, "decoder_patch_size": P, "in_channels": 3,
        "encoder_hidden_size": D, "decoder_hidden_size": D, "encoder_num_heads": HEADS, "decoder_num_heads": HEADS,
        "encoder_depth": DEPTH, "decoder_depth": DEPTH, "learned_encoder_patch_pe": False,
        "learned_encoder_latent_query_embed": True, "learned_decoder_latent_pe": False,
        "learned_decoder_patch_query_embed": False, "use_encoder_patch_token_type_embed": False,
        "use_encoder_latent_query_token_type_embed": False, "use_decoder_latent_token_type_embed": False,
        "use_decoder_patch_query_token_type_embed": True, "encoder_query_gaussian_init": True,
        "latent_pe_scale_factor": 10000, "query_init_std": 0.02,
    }
    cfg.update(over)
    return cfg


def _np_1d(dim, pos):  # LARP's get_1d_sincos_pos_embed_from_grid
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _np_3d(dim, grid, frames):  # LARP's get_3d_sincos_pos_embed (MAE 2-D table, w first, + 1-D over t)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    pe2 = np.concatenate([_np_1d(dim // 2, gw), _np_1d(dim // 2, gh)], axis=1)
    pe1 = _np_1d(dim, np.arange(frames, dtype=np.float32))
    return torch.from_numpy((pe2[None] + pe1[:, None]).reshape(1, -1, dim)).float()


def larp_state_dict(prior_layers=0, prior_dim=0, seed=0):
    """Random tensors under LARP's state-dict names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {"encoder_patch_pe": _np_3d(D, GS, GT), "encoder_latent_query_embed": r(TOKENS, D, std=1.0),
          "decoder_latent_pe": torch.from_numpy(_np_1d(D, np.arange(TOKENS))).float()[None],
          "decoder_patch_query_embed": _np_3d(D, GS, GT), "decoder_patch_query_token_type_embed": r(1, 1, D),
          "x_embedder.proj.weight": r(D, 3, PT, P, P), "x_embedder.proj.bias": r(D)}
    for part in ("encoder", "decoder"):
        for i in range(DEPTH):
            pre = f"{part}.blocks.{i}."
            sd.update({pre + "norm1.weight": 1 + r(D), pre + "norm1.bias": r(D), pre + "attn.qkv.weight": r(3 * D, D),
                       pre + "attn.proj.weight": r(D, D), pre + "attn.proj.bias": r(D),
                       pre + "norm2.weight": 1 + r(D), pre + "norm2.bias": r(D), pre + "mlp.fc1.weight": r(4 * D, D),
                       pre + "mlp.fc1.bias": r(4 * D), pre + "mlp.fc2.weight": r(D, 4 * D), pre + "mlp.fc2.bias": r(D)})
    sd.update({"bottleneck.in_linear.weight": r(CODE, D, std=0.3), "bottleneck.in_linear.bias": r(CODE),
               "bottleneck.out_linear.weight": r(D, CODE), "bottleneck.out_linear.bias": r(D),
               "bottleneck.regularizer.embedding.weight": r(K, CODE, std=1.0),
               "final_layer.norm_final.weight": 1 + r(D), "final_layer.norm_final.bias": r(D),
               "final_layer.linear.weight": r(PT * P * P * 3, D), "final_layer.linear.bias": r(PT * P * P * 3)})
    if prior_layers:
        c = prior_dim
        sd.update({"prior_model.input_proj.weight": r(c, CODE), "prior_model.input_proj.bias": r(c),
                   "prior_model.pos_emb": r(1, TOKENS, c), "prior_model.ln_f.weight": 1 + r(c),
                   "prior_model.ln_f.bias": r(c), "prior_model.head.weight": r(CODE, c),
                   "prior_model.head.bias": r(CODE)})
        for i in range(prior_layers):
            pre = f"prior_model.blocks.{i}."
            for ln in ("ln1", "ln2"):
                sd.update({pre + ln + ".weight": 1 + r(c), pre + ln + ".bias": r(c)})
            for lin in ("key", "query", "value", "proj"):
                sd.update({pre + f"attn.{lin}.weight": r(c, c), pre + f"attn.{lin}.bias": r(c)})
            sd.update({pre + "mlp.0.weight": r(4 * c, c), pre + "mlp.0.bias": r(4 * c),
                       pre + "mlp.2.weight": r(c, 4 * c), pre + "mlp.2.bias": r(c)})
    return sd


def write_larp(path, config, state):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    return path


# --------------------------------------------------------------------------- independent reference forward
def _ref_blocks(sd, part, h):
    for i in range(DEPTH):
        pre = f"{part}.blocks.{i}."
        b, n, _ = h.shape
        x = F.layer_norm(h, (D,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], 1e-5)
        q, k, v = F.linear(x, sd[pre + "attn.qkv.weight"]).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
        h = h + F.linear(a, sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        x = F.layer_norm(h, (D,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], 1e-5)
        x = F.linear(F.gelu(F.linear(x, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"])),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        h = h + x
    return h


def ref_encode(sd, x):
    tok = F.conv3d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=(PT, P, P))
    tok = tok.flatten(2).transpose(1, 2) + sd["encoder_patch_pe"]
    q = sd["encoder_latent_query_embed"][None].repeat(x.shape[0], 1, 1)
    z = _ref_blocks(sd, "encoder", torch.cat([tok, q], 1))[:, -TOKENS:]
    z = F.normalize(F.linear(z, sd["bottleneck.in_linear.weight"], sd["bottleneck.in_linear.bias"]), dim=-1)
    emb = F.normalize(sd["bottleneck.regularizer.embedding.weight"], dim=-1)
    return torch.argmax(F.softmax(torch.einsum("bnd,kd->bnk", z, emb) / 0.03, -1), -1)


def ref_decode(sd, ids):
    emb = F.normalize(sd["bottleneck.regularizer.embedding.weight"], dim=-1)
    z = F.linear(emb[ids], sd["bottleneck.out_linear.weight"], sd["bottleneck.out_linear.bias"])
    z = z + sd["decoder_latent_pe"]
    q = (sd["decoder_patch_query_embed"] + sd["decoder_patch_query_token_type_embed"]).expand(ids.shape[0], -1, -1)
    x = _ref_blocks(sd, "decoder", torch.cat([z, q], 1))[:, -N:]
    x = F.layer_norm(x, (D,), sd["final_layer.norm_final.weight"], sd["final_layer.norm_final.bias"], 1e-6)
    x = F.linear(x, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    x = x.reshape(-1, GT, GS, GS, PT, P, P, 3)
    return einops.rearrange(x, "b t h w pt p1 p2 c -> b c (t pt) (h p1) (w p2)")


# --------------------------------------------------------------------------- tests
def test_from_larp_matches_reference_forward(tmp_path):
    sd = larp_state_dict()
    tok = from_larp(write_larp(tmp_path / "larp", larp_config(), sd))
    assert not tok.training and tok.config.pixel_range == (0.0, 1.0) and tok.prior is None
    assert tok.config.num_tokens == TOKENS and tok.config.codebook_size == K and tok.config.ln_eps == 1e-5
    x = torch.rand(2, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    ids = tok.encode(x)
    torch.testing.assert_close(ids, ref_encode(sd, x))
    assert_close_to_ref("decode", tok.decode(ids), ref_decode(sd, ids), None)


def test_every_tensor_is_mapped(tmp_path):
    sd = larp_state_dict(prior_layers=6, prior_dim=256)
    tok = from_larp(write_larp(tmp_path / "larp", larp_config(prior="gptc-XXS"), sd), prior=True)
    assert tok.config.prior_depth == 6 and tok.config.prior_dim == 256 and tok.config.prior_heads == 4
    ours = tok.state_dict()
    mapped, fixed = map_larp_state_dict(sd)
    assert set(mapped) == set(ours) and set(fixed) == {"encoder_pe", "decoder_latent_pe", "decoder_query_pe"}
    for key, value in mapped.items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)
    torch.testing.assert_close(ours["prior.blocks.3.fc1.weight"], sd["prior_model.blocks.3.mlp.0.weight"])
    torch.testing.assert_close(ours["quantizer.embedding.weight"], sd["bottleneck.regularizer.embedding.weight"])
    # without prior=True the prior's tensors are dropped
    assert from_larp(tmp_path / "larp").prior is None


def test_wrapper_prefixes_are_stripped(tmp_path):
    sd = {f"_orig_mod.{k}": v for k, v in larp_state_dict().items()}
    tok = from_larp(write_larp(tmp_path / "larp", larp_config(), sd))
    torch.testing.assert_close(tok.queries, sd["_orig_mod.encoder_latent_query_embed"])


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = larp_state_dict()
    sd["bogus.weight"] = sd.pop("final_layer.linear.bias")
    with pytest.raises(ValueError, match=r"missing keys \['output_layer.linear.bias'\].*unexpected.*bogus.weight"):
        from_larp(write_larp(tmp_path / "larp", larp_config(), sd))


def test_shape_mismatch_and_bad_buffers(tmp_path):
    sd = larp_state_dict()
    sd["encoder_latent_query_embed"] = sd["encoder_latent_query_embed"][:8]
    with pytest.raises(ValueError, match="shape mismatches.*queries"):
        from_larp(write_larp(tmp_path / "a", larp_config(), sd))
    sd = larp_state_dict()
    sd["decoder_patch_query_embed"] = sd["decoder_patch_query_embed"] + 1
    with pytest.raises(ValueError, match="fixed buffer for decoder_query_pe"):
        from_larp(write_larp(tmp_path / "b", larp_config(), sd))


def test_unsupported_options_are_reported(tmp_path):
    cfg = larp_config(learned_decoder_latent_pe=True, decoder_hidden_size=64)
    with pytest.raises(ValueError, match="learned_decoder_latent_pe=True.*encoder_hidden_size=32 != decoder"):
        from_larp(write_larp(tmp_path / "larp", cfg, larp_state_dict()))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_larp(tmp_path / "nowhere")


def test_lazy_export():
    import dera_fast.convert
    assert dera_fast.convert.from_larp is from_larp


# ------------------------------------------------------------------------------------------ convert-teacher
def _teacher_checkpoints(tmp_path):
    """An InternVideo2 training checkpoint (.pth, clip heads included) and an HF DINOv2 folder, tiny sizes."""
    from test_internvideo2 import make_config, official_state
    from test_teachers import _dinov2_hub, _hub_to_hf

    from dera_fast.models.teachers import ImageViTConfig

    c = make_config("D32-H2-L2-p8-t1-f4-s32-native")
    torch.save({"model": official_state(c), "epoch": 7}, tmp_path / "iv2.pth")
    icfg = ImageViTConfig(dim=32, depth=2, heads=2, patch=8, image_size=32, pos_grid=3)
    (tmp_path / "dinov2").mkdir()
    save_file(_hub_to_hf(_dinov2_hub(icfg), icfg), str(tmp_path / "dinov2" / "model.safetensors"))
    return c, icfg


IV2_SET = ["--set", "dim=32", "--set", "heads=2", "--set", "depth=2", "--set", "patch=8", "--set", "frames=4",
           "--set", "image_size=32", "--set", "pos_frames=4", "--set", "pos_grid=4"]
DINO_SET = ["--set", "dim=32", "--set", "heads=2", "--set", "depth=2", "--set", "patch=8", "--set", "image_size=32",
            "--set", "pos_grid=3"]


def test_convert_teacher_cli_round_trip(tmp_path, capsys):
    from safetensors import safe_open

    from dera_fast.cli import main
    from dera_fast.models.teachers import InternVideo2Teacher, load_image_teacher, load_video_teacher

    c, icfg = _teacher_checkpoints(tmp_path)
    out = tmp_path / "iv2.safetensors"
    assert main(["convert-teacher", str(tmp_path / "iv2.pth"), str(out), "--arch", "internvideo2-b14", *IV2_SET]) == 0
    assert "internvideo2-b14" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["dera_fast.teacher_arch"] == "internvideo2-b14"
    assert json.loads(meta["dera_fast.teacher_config"])["dim"] == 32
    assert not any(k.startswith(("clip_", "final_clip")) for k in keys)
    x = torch.rand(2, 3, 4, 32, 32) * 2 - 1
    copy = load_video_teacher(out)  # no preset: the file carries its config
    orig = InternVideo2Teacher.from_pretrained(tmp_path / "iv2.pth", c)
    assert isinstance(copy, InternVideo2Teacher) and copy.config == orig.config
    torch.testing.assert_close(copy.features(x), orig.features(x), rtol=0, atol=0)
    named = load_video_teacher(out, "internvideo2-b14")  # the recorded preset: its converted config, not B/14's
    assert named.config == orig.config
    # HF DINOv2, family detected from the keys; the HF position-table rule travels in the recorded config
    out2 = tmp_path / "dino.safetensors"
    assert main(["convert-teacher", str(tmp_path / "dinov2"), str(out2), *DINO_SET]) == 0
    dino = load_image_teacher(out2)
    assert dino.config.pos_interp_offset == 0.0
    ref = load_image_teacher(tmp_path / "dinov2", "dinov2-b14", **{k: v for k, v in icfg.__dict__.items()})
    torch.testing.assert_close(dino.features(x), ref.features(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a video-teacher preset"):
        load_video_teacher(out2)


@pytest.mark.parametrize("case", ["same-file", "exists", "suffix", "undetectable", "bad-keys", "missing"])
def test_convert_teacher_refusals_exit_2(tmp_path, capsys, case):
    from dera_fast.cli import main

    _teacher_checkpoints(tmp_path)
    src, out = tmp_path / "iv2.pth", tmp_path / "out.safetensors"
    extra = ["--arch", "internvideo2-b14", *IV2_SET]
    if case == "same-file":
        save_file({"w": torch.zeros(1)}, str(out))
        src = out
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "suffix":
        out = tmp_path / "out.pth"
    elif case == "undetectable":
        save_file({"w": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
        src, extra = tmp_path / "odd.safetensors", []
    elif case == "bad-keys":
        extra = ["--arch", "internvideo2-b14"]  # the B/14 preset's shapes do not fit the tiny weights
    else:
        src = tmp_path / "none.pth"
    assert main(["convert-teacher", str(src), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if case == "exists":
        assert out.read_bytes() == b"keep me" and "--overwrite" in err
        assert main(["convert-teacher", str(src), str(out), *extra, "--overwrite"]) == 0
    assert not list(tmp_path.glob(".*.tmp*"))  # nothing half-written left behind
