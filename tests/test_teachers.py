"""Alignment teachers: the seeded random stand-in, and DINOv2/v3 / VideoMAE loaders in each key layout.

Random weights are written under each layout's own key names (torch-hub: facebookresearch/dinov2, dinov3,
MCG-NJU/VideoMAE; HF: Dinov2Model, DINOv3ViTModel, VideoMAEModel) and loaded back; the same weights in two
layouts must give identical features.
"""
import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import assert_close_to_ref
from safetensors.torch import save_file

from dera_fast.models import DeRATokenizer, RandomTeacher, Teacher, compute_targets
from dera_fast.models.teachers import (IMAGENET_MEAN, IMAGENET_STD, ImageViTConfig, ImageViTTeacher, VideoViTConfig,
                                       VideoViTTeacher, load_image_teacher, load_video_teacher)

D, DEPTH, HEADS = 32, 2, 2


def clip(b=2, t=8, seed=0):
    return torch.rand(b, 3, t, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def rnd(g, *shape):
    return torch.randn(*shape, generator=g) * 0.2


# ------------------------------------------------------------------------------------------ random teacher
def test_random_teacher_seeded_frozen_and_shaped():
    a, b, c = RandomTeacher("image", seed=1), RandomTeacher("image", seed=1), RandomTeacher("image", seed=2)
    x = clip()
    fa = a.features(x)
    assert fa.shape == (2, 16, 32) and a.grid == (4, 4) and isinstance(a, Teacher)
    torch.testing.assert_close(fa, b.features(x))
    assert not torch.allclose(fa, c.features(x))
    assert not any(p.requires_grad for p in a.parameters()) and not a.train().training
    v = RandomTeacher("video", seed=1)
    assert v.features(x).shape == (2, 32, 32) and v.grid == (2, 4, 4)
    y = x.clone()
    y[:, :, 1:] = 0  # the image teacher only sees frame 0
    torch.testing.assert_close(a.features(y), fa)
    with pytest.raises(ValueError, match="expects"):
        a.features(clip(t=4))


def test_targets_drive_dera_alignment():
    torch.manual_seed(0)
    tok = DeRATokenizer.from_name("tiny")
    x = clip()
    targets = compute_targets(x, RandomTeacher("image", seed=0), RandomTeacher("video", seed=1, frames=8))
    assert targets.appearance_grid == (4, 4) and targets.motion_grid == (2, 4, 4)
    _, out = tok(x, targets=targets)
    out["loss_align"].backward()
    assert tok.align_head_appearance[0].weight.grad.any() and tok.align_head_motion[2].weight.grad.any()
    assert tok.encoder.blocks[0].attn.qkv.weight.grad.any()


# ------------------------------------------------------------------------------------------ image ViT
def _dinov2_hub(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"cls_token": rnd(g, 1, 1, D), "mask_token": rnd(g, 1, D), "patch_embed.proj.weight": rnd(g, D, 3, 8, 8),
          "patch_embed.proj.bias": rnd(g, D), "norm.weight": 1 + rnd(g, D), "norm.bias": rnd(g, D)}
    if cfg.pos == "abs":
        sd["pos_embed"] = rnd(g, 1, 1 + cfg.pos_grid ** 2, D)
    else:
        sd["rope_embed.periods"] = 100.0 ** (2 * torch.arange(D // HEADS // 4) / (D // HEADS // 2))
    if cfg.num_registers:
        sd["storage_tokens" if cfg.pos == "rope" else "register_tokens"] = rnd(g, 1, cfg.num_registers, D)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rnd(g, D), p + "norm1.bias": rnd(g, D),
                   p + "attn.qkv.weight": rnd(g, 3 * D, D), p + "attn.qkv.bias": rnd(g, 3 * D),
                   p + "attn.proj.weight": rnd(g, D, D), p + "attn.proj.bias": rnd(g, D),
                   p + "ls1.gamma": 1 + rnd(g, D), p + "norm2.weight": 1 + rnd(g, D), p + "norm2.bias": rnd(g, D),
                   p + "mlp.fc1.weight": rnd(g, 4 * D, D), p + "mlp.fc1.bias": rnd(g, 4 * D),
                   p + "mlp.fc2.weight": rnd(g, D, 4 * D), p + "mlp.fc2.bias": rnd(g, D),
                   p + "ls2.gamma": 1 + rnd(g, D)})
        if cfg.pos == "rope":  # DINOv3 LinearKMaskedBias: the k third of the bias is masked to zero
            sd[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    return sd


def _hub_to_hf(sd, cfg):
    """The same weights under transformers' names (Dinov2Model, or DINOv3ViTModel for RoPE configs)."""
    v3 = cfg.pos == "rope"
    out = {"embeddings.cls_token": sd["cls_token"], "layernorm.weight" if not v3 else "norm.weight": sd["norm.weight"],
           "layernorm.bias" if not v3 else "norm.bias": sd["norm.bias"],
           "embeddings.mask_token": sd["mask_token"].view(1, 1, D) if v3 else sd["mask_token"]}
    proj = "embeddings.patch_embeddings" + ("" if v3 else ".projection")
    out[proj + ".weight"], out[proj + ".bias"] = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    if not v3:
        out["embeddings.position_embeddings"] = sd["pos_embed"]
    if cfg.num_registers:
        out["embeddings.register_tokens"] = sd["storage_tokens" if v3 else "register_tokens"]
    for i in range(DEPTH):
        p, q = f"blocks.{i}.", (f"layer.{i}." if v3 else f"encoder.layer.{i}.")
        att = q + ("attention." if v3 else "attention.attention.")
        names = ("q_proj", "k_proj", "v_proj") if v3 else ("query", "key", "value")
        for name, w, b in zip(names, sd[p + "attn.qkv.weight"].chunk(3), sd[p + "attn.qkv.bias"].chunk(3)):
            out[att + name + ".weight"] = w
            if not (v3 and name == "k_proj"):
                out[att + name + ".bias"] = b
        o = q + ("attention.o_proj." if v3 else "attention.output.dense.")
        out[o + "weight"], out[o + "bias"] = sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        fc1, fc2 = ("mlp.up_proj.", "mlp.down_proj.") if v3 else ("mlp.fc1.", "mlp.fc2.")
        for src, dst in (("norm1.", "norm1."), ("norm2.", "norm2."), ("mlp.fc1.", fc1), ("mlp.fc2.", fc2)):
            out[q + dst + "weight"], out[q + dst + "bias"] = sd[p + src + "weight"], sd[p + src + "bias"]
        out[q + "layer_scale1.lambda1"], out[q + "layer_scale2.lambda1"] = sd[p + "ls1.gamma"], sd[p + "ls2.gamma"]
    return out


IMAGE_CFGS = {  # native grids (pos_grid == 32 / 8): hub and HF weights must agree exactly
    "dinov2": ImageViTConfig(dim=D, depth=DEPTH, heads=HEADS, patch=8, image_size=32, pos_grid=4),
    "dinov2-reg": ImageViTConfig(dim=D, depth=DEPTH, heads=HEADS, patch=8, image_size=32, pos_grid=4,
                                 num_registers=2, pos_interp_offset=0.0, pos_interp_antialias=True),
    "dinov3": ImageViTConfig(dim=D, depth=DEPTH, heads=HEADS, patch=8, image_size=32, pos="rope",
                             num_registers=2, ln_eps=1e-5),
}


@pytest.mark.parametrize("name", list(IMAGE_CFGS))
def test_image_vit_hub_and_hf_layouts(name, tmp_path):
    cfg = IMAGE_CFGS[name]
    hub = _dinov2_hub(cfg)
    torch.save(hub, tmp_path / "hub.pth")  # the hub releases are plain state-dict .pth files
    (tmp_path / "hf").mkdir()
    save_file(_hub_to_hf(hub, cfg), str(tmp_path / "hf" / "model.safetensors"))
    t_hub = ImageViTTeacher.from_pretrained(tmp_path / "hub.pth", cfg)
    t_hf = ImageViTTeacher.from_pretrained(tmp_path / "hf", cfg)
    if cfg.pos == "abs":  # Dinov2Model as transformers >= 5 names its modules
        v5 = {re.sub(r"attention\.attention\.(query|key|value)", lambda m: f"attention.{m.group(1)[0]}_proj", k)
              .replace("attention.output.dense", "attention.o_proj"): v for k, v in _hub_to_hf(hub, cfg).items()}
        save_file(v5, str(tmp_path / "hf5.safetensors"))
        torch.testing.assert_close(ImageViTTeacher.from_pretrained(tmp_path / "hf5.safetensors", cfg).features(clip()),
                                   t_hf.features(clip()))
    ours = t_hub.state_dict()
    torch.testing.assert_close(ours["blocks.1.fc2.weight"], hub["blocks.1.mlp.fc2.weight"])
    if cfg.pos == "rope":
        torch.testing.assert_close(ours["blocks.0.qkv.bias"][D:2 * D], torch.zeros(D))  # masked k bias
    x = clip()
    f = t_hub.features(x)
    assert f.shape == (2, 16, D) and t_hub.grid == (4, 4) and t_hub.feature_dim == D
    torch.testing.assert_close(t_hf.features(x), f, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in t_hub.parameters())
    t_fac = load_image_teacher(tmp_path / "hf", "dinov2-b14", dim=D, depth=DEPTH, heads=HEADS, patch=8,
                               image_size=32, pos_grid=4, num_registers=cfg.num_registers, pos=cfg.pos,
                               ln_eps=cfg.ln_eps)
    torch.testing.assert_close(t_fac.features(x), f, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ DINOv2 resizing
def _bicubic_np(a: np.ndarray, out: int, scale: float) -> np.ndarray:
    """PyTorch's bicubic resampling along axis 0 written out (Keys a = -0.75, align_corners=False, border
    clamp): source x = scale * (i + 0.5) - 0.5, where scale = 1 / scale_factor when a scale factor is given,
    else in / out."""
    A, n = -0.75, a.shape[0]

    def near(t):  # |t| <= 1
        return ((A + 2) * t - (A + 3)) * t * t + 1

    def far(t):  # 1 < |t| < 2
        return ((A * t - 5 * A) * t + 8 * A) * t - 4 * A

    res = np.zeros((out,) + a.shape[1:])
    for i in range(out):
        x = scale * (i + 0.5) - 0.5
        x0 = int(np.floor(x))
        t = x - x0
        for k, w in zip(range(x0 - 1, x0 + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            res[i] += w * a[min(max(k, 0), n - 1)]
    return res


def _resize_np(table, src, dst, scale):
    """[1, src*src, D] -> [dst*dst, D] float64, separable: rows then columns."""
    g = table[0].double().numpy().reshape(src, src, -1)
    g = _bicubic_np(g, dst, scale)
    g = _bicubic_np(g.transpose(1, 0, 2), dst, scale).transpose(1, 0, 2)
    return torch.from_numpy(g.reshape(dst * dst, -1))


def test_dinov2_position_resize_hub_vs_hf(tmp_path):
    """At a non-native grid (pretrained 3 x 3 table, 4 x 4 patches) hub weights resize as the torch-hub code
    (scale_factor (4 + 0.1) / 3) and HF weights as transformers (size 4 x 4): different tables, each equal to
    the written-out bicubic formula."""
    cfg = ImageViTConfig(dim=D, depth=DEPTH, heads=HEADS, patch=8, image_size=32, pos_grid=3)
    hub = _dinov2_hub(cfg)
    save_file(hub, str(tmp_path / "hub.safetensors"))
    save_file(_hub_to_hf(hub, cfg), str(tmp_path / "hf.safetensors"))
    t_hub = ImageViTTeacher.from_pretrained(tmp_path / "hub.safetensors", cfg)
    t_hf = ImageViTTeacher.from_pretrained(tmp_path / "hf.safetensors", cfg)
    assert (t_hub.config.pos_interp_offset, t_hf.config.pos_interp_offset) == (0.1, 0.0)
    table = hub["pos_embed"][:, 1:]
    want_hub, want_hf = _resize_np(table, 3, 4, 3 / 4.1), _resize_np(table, 3, 4, 3 / 4)
    assert_close_to_ref("hub table", t_hub.patch_position_table()[0], want_hub, None, floor=1e-5)
    assert_close_to_ref("HF table", t_hf.patch_position_table()[0], want_hf, None, floor=1e-5)
    rel = (want_hub - want_hf).norm() / want_hf.norm()
    assert rel > 1e-2  # the two formulas really differ at this size
    x = clip()
    assert not torch.allclose(t_hub.features(x), t_hf.features(x), atol=1e-3)
    # the register variants resize by size with antialiasing in both ecosystems: hub and HF agree
    reg = dataclasses.replace(cfg, num_registers=2, pos_interp_offset=0.0, pos_interp_antialias=True)
    hub_r = _dinov2_hub(reg)
    save_file(hub_r, str(tmp_path / "hub_r.safetensors"))
    save_file(_hub_to_hf(hub_r, reg), str(tmp_path / "hf_r.safetensors"))
    torch.testing.assert_close(ImageViTTeacher.from_pretrained(tmp_path / "hf_r.safetensors", reg).features(x),
                               ImageViTTeacher.from_pretrained(tmp_path / "hub_r.safetensors", reg).features(x))


@pytest.mark.parametrize("name", ["dinov2", "dinov2-reg", "dinov3"])
def test_hf_layout_matches_transformers(name, tmp_path):
    """Optional oracle: transformers' own Dinov2Model / Dinov2WithRegistersModel (at a non-native size: 3 x 3
    pretrained table, 4 x 4 patches) and DINOv3ViTModel (RoPE) on the same weights."""
    try:  # an optional oracle: skip (with the reason) wherever transformers is missing or cannot import
        import transformers

        transformers.Dinov2Model  # noqa: B018 (transformers imports its models lazily: this is the real import)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"transformers unavailable: {type(e).__name__}: {e}")
    registers = 0 if name == "dinov2" else 2
    cfg = IMAGE_CFGS["dinov3"] if name == "dinov3" else ImageViTConfig(
        dim=D, depth=DEPTH, heads=HEADS, patch=8, image_size=32, pos_grid=3, num_registers=registers,
        pos_interp_offset=0.1 if not registers else 0.0, pos_interp_antialias=bool(registers))
    hf_sd = _hub_to_hf(_dinov2_hub(cfg), cfg)
    kw = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * D,
              patch_size=8, layerscale_value=1.0)
    if name == "dinov3":
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            image_size=32, num_register_tokens=registers, layer_norm_eps=1e-5, **kw))
    elif registers:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            image_size=24, num_register_tokens=registers, layer_norm_eps=1e-6, hidden_act="gelu", **kw))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=24, layer_norm_eps=1e-6,
                                                                   hidden_act="gelu", **kw))
    own = model.state_dict()
    if "encoder.layer.0.attention.q_proj.weight" in own:  # Dinov2 in transformers >= 5: new module names
        hf_sd = {k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key",
                 "attention.k_proj").replace("attention.attention.value", "attention.v_proj")
                 .replace("attention.output.dense", "attention.o_proj"): v for k, v in hf_sd.items()}
    hf_sd = {("model." + k if "model." + k in own else k): v for k, v in hf_sd.items()}  # DINOv3ViT >= 5
    model.load_state_dict(hf_sd, strict=True)
    model.eval()
    save_file(hf_sd, str(tmp_path / "hf.safetensors"))
    ours = ImageViTTeacher.from_pretrained(tmp_path / "hf.safetensors", cfg)
    x = clip()
    pixels = ((x[:, :, 0] + 1) / 2 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(pixel_values=pixels).last_hidden_state[:, 1 + registers:]
    assert_close_to_ref("features vs transformers", ours.features(x), want, None)


def test_image_vit_errors_list_keys(tmp_path):
    cfg = IMAGE_CFGS["dinov2"]
    hub = _dinov2_hub(cfg)
    hub["blocks.9.extra"] = hub.pop("blocks.1.ls2.gamma")
    save_file(hub, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.ls2'\].*unexpected keys \['blocks.9.extra'\]"):
        ImageViTTeacher.from_pretrained(tmp_path / "bad.safetensors", cfg)
    save_file(_dinov2_hub(IMAGE_CFGS["dinov2-reg"]), str(tmp_path / "reg.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected keys \['register_tokens'\]"):
        ImageViTTeacher.from_pretrained(tmp_path / "reg.safetensors", cfg)
    with pytest.raises(ValueError, match="shape mismatches.*pos_embed"):
        ImageViTTeacher.from_pretrained(tmp_path / "bad.safetensors", dataclasses.replace(cfg, pos_grid=3))
    with pytest.raises(ValueError, match="unknown teacher preset"):
        ImageViTTeacher.from_pretrained(tmp_path / "bad.safetensors", "dinov9")
    with pytest.raises(FileNotFoundError):
        ImageViTTeacher.from_pretrained(tmp_path / "none.safetensors", cfg)


# ------------------------------------------------------------------------------------------ video ViT
VCFG = VideoViTConfig(dim=D, depth=DEPTH, heads=HEADS, patch=8, tubelet=2, frames=4, image_size=32)


def _videomae_official(seed=0, prefix=""):
    g = torch.Generator().manual_seed(seed)
    sd = {"patch_embed.proj.weight": rnd(g, D, 3, 2, 8, 8), "patch_embed.proj.bias": rnd(g, D),
          "norm.weight": 1 + rnd(g, D), "norm.bias": rnd(g, D)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + rnd(g, D), p + "norm1.bias": rnd(g, D),
                   p + "attn.qkv.weight": rnd(g, 3 * D, D), p + "attn.q_bias": rnd(g, D), p + "attn.v_bias": rnd(g, D),
                   p + "attn.proj.weight": rnd(g, D, D), p + "attn.proj.bias": rnd(g, D),
                   p + "norm2.weight": 1 + rnd(g, D), p + "norm2.bias": rnd(g, D),
                   p + "mlp.fc1.weight": rnd(g, 4 * D, D), p + "mlp.fc1.bias": rnd(g, 4 * D),
                   p + "mlp.fc2.weight": rnd(g, D, 4 * D), p + "mlp.fc2.bias": rnd(g, D)})
    return {prefix + k: v for k, v in sd.items()}


def _videomae_hf(sd):
    out = {"videomae.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "videomae.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "videomae.layernorm.weight": sd["norm.weight"], "videomae.layernorm.bias": sd["norm.bias"]}
    for i in range(DEPTH):
        p, q = f"blocks.{i}.", f"videomae.encoder.layer.{i}."
        for name, w in zip(("query", "key", "value"), sd[p + "attn.qkv.weight"].chunk(3)):
            out[q + f"attention.attention.{name}.weight"] = w
        out[q + "attention.attention.q_bias"], out[q + "attention.attention.v_bias"] = \
            sd[p + "attn.q_bias"], sd[p + "attn.v_bias"]
        for src, dst in (("attn.proj.", "attention.output.dense."), ("norm1.", "layernorm_before."),
                         ("norm2.", "layernorm_after."), ("mlp.fc1.", "intermediate.dense."),
                         ("mlp.fc2.", "output.dense.")):
            out[q + dst + "weight"], out[q + dst + "bias"] = sd[p + src + "weight"], sd[p + src + "bias"]
    return out


def test_video_vit_official_and_hf_layouts(tmp_path):
    sd = _videomae_official()
    save_file(_videomae_official(prefix="encoder."), str(tmp_path / "pretrain.safetensors"))
    save_file(_videomae_hf(sd), str(tmp_path / "hf.safetensors"))
    v5 = {k.replace("attention.attention.q_bias", "attention.attention.query.bias")
          .replace("attention.attention.v_bias", "attention.attention.value.bias"): v
          for k, v in _videomae_hf(sd).items()}
    save_file(v5, str(tmp_path / "hf5.safetensors"))  # VideoMAEModel as transformers >= 5 names it
    t_off = VideoViTTeacher.from_pretrained(tmp_path / "pretrain.safetensors", VCFG)
    t_hf = VideoViTTeacher.from_pretrained(tmp_path / "hf.safetensors", VCFG)
    t_hf5 = load_video_teacher(tmp_path / "hf5.safetensors", "videomae-b", **VCFG.__dict__)
    torch.testing.assert_close(t_off.state_dict()["blocks.0.q_bias"], sd["blocks.0.attn.q_bias"])
    x = clip()  # 8 frames, resampled to the teacher's 4
    f = t_off.features(x)
    assert f.shape == (2, 32, D) and t_off.grid == (2, 4, 4)
    torch.testing.assert_close(t_hf.features(x), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_hf5.features(x), f, atol=1e-5, rtol=1e-5)
    sd.pop("blocks.0.attn.v_bias")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.v_bias'\]"):
        VideoViTTeacher.from_pretrained(tmp_path / "bad.safetensors", VCFG)
