"""InternVideo2 teacher against an independent float64 reimplementation, on random tiny configs.

Checkpoints are written with the official key names of OpenGVLab/InternVideo
``InternVideo2/single_modality/models/internvideo2_distill.py`` (``DistInternVideo2``), including the CLIP
distillation heads that loading must drop, as ``.pth`` training checkpoints ({"model": ...}) and safetensors.
The oracle below is written from the architecture description (RMSNorm, full-width q/k RMS normalisation, no qkv
bias, LayerScale, tanh-GELU MLP, stored joint position table resized linearly over t and bicubically over h, w),
in float64, without any dera_fast code.
"""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import assert_close_to_ref

from dera_fast.models.teachers import (INTERNVIDEO2_PRESETS, VIDEO_TEACHERS, InternVideo2Config,
                                       InternVideo2Teacher, internvideo2_sincos, load_video_teacher)

# (dim, heads, depth, patch, tubelet, frames, image_size, pos_frames, pos_grid, gelu)
CONFIGS = {
    "D32-H2-L2-p8-t1-f4-s32-native": (32, 2, 2, 8, 1, 4, 32, 4, 4, "tanh"),
    "D48-H3-L1-p8-t2-f6-s24-pos4x4": (48, 3, 1, 8, 2, 6, 24, 4, 4, "tanh"),
    "D64-H4-L2-p7-t1-f5-s35-pos8x3-exact": (64, 4, 2, 7, 1, 5, 35, 8, 3, "exact"),
    "D16-H1-L1-p4-t1-f3-s12-pos2x2": (16, 1, 1, 4, 1, 3, 12, 2, 2, "tanh"),
}


def make_config(name):
    d, h, depth, p, tub, f, s, pf, pg, gelu = CONFIGS[name]
    return InternVideo2Config(dim=d, heads=h, depth=depth, patch=p, tubelet=tub, frames=f, image_size=s,
                              pos_frames=pf, pos_grid=pg, gelu=gelu)


def official_state(c: InternVideo2Config, seed=0):
    """Random weights under DistInternVideo2's names, clip_* heads included."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    d, hid = c.dim, int(c.dim * c.mlp_ratio)
    n = (c.pos_frames // c.tubelet) * c.pos_grid ** 2
    sd = {"patch_embed.proj.weight": r(d, 3, c.tubelet, c.patch, c.patch), "patch_embed.proj.bias": r(d),
          "cls_token": r(1, 1, d), "pos_embed": r(1, n + 1, d, scale=0.5), "clip_pos_embed": r(1, n + 1, d),
          "clip_projector.norm1_q.weight": r(d), "clip_projector.cross_attn.q.weight": r(d, d),
          "clip_decoder.0.head.weight": r(8, d), "final_clip_decoder.head.weight": r(8, d)}
    for i in range(c.depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(d), p + "attn.qkv.weight": r(3 * d, d),
                   p + "attn.q_norm.weight": 1 + r(d), p + "attn.k_norm.weight": 1 + r(d),
                   p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d), p + "ls1.gamma": 0.5 + r(d),
                   p + "norm2.weight": 1 + r(d), p + "mlp.fc1.weight": r(hid, d), p + "mlp.fc1.bias": r(hid),
                   p + "mlp.fc2.weight": r(d, hid), p + "mlp.fc2.bias": r(d), p + "ls2.gamma": 0.5 + r(d)})
    return sd


# ------------------------------------------------------------------------------------------ float64 oracle
def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _gelu(x, kind):
    if kind == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def oracle(sd, c, clip01, dtype=torch.float64):
    """clip01 [B, 3, frames, S, S] in [0, 1] (already at the teacher's size) -> [B, N, D] in ``dtype``."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=dtype).view(1, 3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=dtype).view(1, 3, 1, 1, 1)
    x = (clip01.to(dtype) - mean) / std
    k = (c.tubelet, c.patch, c.patch)
    x = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=k)  # [B, D, t, h, w]
    b, d, t, gh, gw = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(b, t * gh * gw, d)
    pos = sd["pos_embed"]
    t0, g0 = c.pos_frames // c.tubelet, c.pos_grid
    grid = pos[0, 1:].reshape(t0, g0, g0, d)
    if t0 != t:  # linear over t, align_corners=False, per (h, w, channel)
        grid = F.interpolate(grid.permute(1, 2, 3, 0).reshape(1, -1, t0), size=t, mode="linear",
                             align_corners=False).reshape(g0, g0, d, t).permute(3, 0, 1, 2)
    if g0 != gh:
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1)
    x = torch.cat([sd["cls_token"].expand(b, 1, d) + pos[:, :1], x + grid.reshape(1, -1, d)], dim=1)
    hd = d // c.heads
    for i in range(c.depth):
        p = f"blocks.{i}."
        y = _rms(x, sd[p + "norm1.weight"], c.norm_eps)
        q, kk, v = (y @ sd[p + "attn.qkv.weight"].T).chunk(3, dim=-1)
        q, kk = _rms(q, sd[p + "attn.q_norm.weight"], c.norm_eps), _rms(kk, sd[p + "attn.k_norm.weight"], c.norm_eps)
        q, kk, v = (z.view(b, -1, c.heads, hd).transpose(1, 2) for z in (q, kk, v))
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, -1, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1.gamma"] * att
        y = _rms(x, sd[p + "norm2.weight"], c.norm_eps)
        y = _gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"], c.gelu)
        x = x + sd[p + "ls2.gamma"] * (y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])
    return x[:, 1:]


def clip01(c, b=2, seed=1):
    return torch.rand(b, 3, c.frames, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_float64_oracle(name, tmp_path):
    c = make_config(name)
    sd = official_state(c)
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "ckpt.pth")
    teacher = InternVideo2Teacher.from_pretrained(tmp_path / "ckpt.pth", c, pixel_range=(0.0, 1.0))
    assert not any(k.startswith(("clip_", "final_clip")) for k in teacher.state_dict())
    x = clip01(c)
    got = teacher.features(x)
    grid = (c.frames // c.tubelet, c.image_size // c.patch, c.image_size // c.patch)
    assert teacher.grid == grid and got.shape == (2, math.prod(grid), c.dim) and got.dtype == torch.float32
    # tolerance rule: at most 2x plain PyTorch's own fp32 error on the same math, plus the fp32 floor
    assert_close_to_ref("features", got, oracle(sd, c, x), oracle(sd, c, x, torch.float32))


def test_gelu_variant_matters():
    """The tanh-GELU default (flash-attn FusedMLP) and exact GELU give measurably different features."""
    c = make_config("D32-H2-L2-p8-t1-f4-s32-native")
    sd = official_state(c)
    a = InternVideo2Teacher.from_state_dict(sd, c).features(clip01(c) * 2 - 1)
    e = InternVideo2Teacher.from_state_dict(sd, InternVideo2Config(**{**c.__dict__, "gelu": "exact"}))
    assert not torch.allclose(a, e.features(clip01(c) * 2 - 1), atol=1e-6)


def test_sincos_table_matches_numpy_description():
    """[0-row ; per token (t, h, w): 1-D_{D/4}(t), 1-D_{3D/8}(w), 1-D_{3D/8}(h)], 1-D_d(p) = [sin p w_i, cos p w_i],
    w_i = 10000^(-i / (d/2)) (InternVideo2 models/pos_embed.py, with MAE's meshgrid putting w first)."""
    d, t, g = 32, 3, 4

    def one(dim, p):
        w = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
        return np.concatenate([np.sin(p * w), np.cos(p * w)])

    rows = [np.zeros(d)]
    for ti in range(t):
        for hi in range(g):
            for wi in range(g):
                rows.append(np.concatenate([one(d // 4, ti), one(3 * d // 8, wi), one(3 * d // 8, hi)]))
    want = torch.from_numpy(np.stack(rows)).float()[None]
    torch.testing.assert_close(internvideo2_sincos(d, t, g), want)
    fresh = InternVideo2Teacher(InternVideo2Config(dim=d, heads=2, depth=1, patch=8, frames=t, pos_frames=t,
                                                   image_size=8 * g, pos_grid=g))
    torch.testing.assert_close(fresh.pos_embed.detach(), want)  # the stored table's initial value


def test_presets_and_default_grid():
    b = INTERNVIDEO2_PRESETS["internvideo2-b14"]
    assert (b.dim, b.depth, b.heads, b.patch, b.tubelet, b.frames, b.image_size, b.norm_eps) == \
        (768, 12, 12, 14, 1, 8, 224, 1e-6)
    assert (INTERNVIDEO2_PRESETS["internvideo2-s14"].dim, INTERNVIDEO2_PRESETS["internvideo2-l14"].depth) == (384, 24)
    assert set(INTERNVIDEO2_PRESETS) <= set(VIDEO_TEACHERS)
    with pytest.raises(ValueError, match="gelu"):
        InternVideo2Config(gelu="erf")
    with pytest.raises(ValueError, match="divisible"):
        InternVideo2Config(dim=40, heads=4)


def test_factory_prefixes_overrides_and_frame_resampling(tmp_path):
    c = make_config("D32-H2-L2-p8-t1-f4-s32-native")
    sd = official_state(c)
    torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ddp.bin")
    over = dict(dim=32, heads=2, depth=2, patch=8, frames=4, image_size=32, pos_frames=4, pos_grid=4)
    t = load_video_teacher(tmp_path / "ddp.bin", "internvideo2-b14", pixel_range=(0.0, 1.0), **over)
    assert isinstance(t, InternVideo2Teacher) and t.config.gelu == "tanh"
    x = clip01(c)
    long = x.repeat_interleave(2, dim=2)  # 8 frames, each twice: uniform resampling to 4 picks one of each pair
    torch.testing.assert_close(t.features(long), t.features(x))
    t16 = load_video_teacher(tmp_path / "ddp.bin", "internvideo2-b14", pixel_range=(0.0, 1.0), **{**over, "frames": 8})
    assert t16.grid == (8, 4, 4) and t16.features(long).shape == (2, 128, 32)  # temporal table resized 4 -> 8
    with pytest.raises(ValueError, match="unknown config fields"):
        load_video_teacher(tmp_path / "ddp.bin", "internvideo2-b14", widht=3)
    with pytest.raises(ValueError, match="unknown video-teacher preset|not a video-teacher preset"):
        load_video_teacher(tmp_path / "ddp.bin", "dinov2-b14")


def test_missing_keys_and_pickles_are_refused(tmp_path):
    c = make_config("D32-H2-L2-p8-t1-f4-s32-native")
    sd = official_state(c)
    sd.pop("blocks.1.attn.q_norm.weight")
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.attn.q_norm.weight'\]"):
        InternVideo2Teacher.from_pretrained(tmp_path / "bad.safetensors", c)
    torch.save({"model": official_state(c), "extra": np.float64(1.0).__class__}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match="weights_only"):
        InternVideo2Teacher.from_pretrained(tmp_path / "pickle.pth", c)
    with pytest.raises(ValueError, match="give a preset"):
        InternVideo2Teacher.from_pretrained(tmp_path / "bad.safetensors")
