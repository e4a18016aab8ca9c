"""Teacher factories (used by the CLI and the trainer) and architecture detection.

    load_image_teacher(path, preset=None, **config_overrides)  # DINOv2 / DINOv3
    load_video_teacher(path, preset=None, **config_overrides)  # InternVideo2 (DeRA's default) / VideoMAE

``preset`` names a config of ``IMAGE_TEACHERS`` / ``VIDEO_TEACHERS``; it may be omitted for files written by
``convert-teacher``, which carry their config. Overrides are config fields (``dim``, ``depth``, ``heads``,
``image_size``, ``frames``, ``patch``, ...).
"""
from __future__ import annotations

import dataclasses
import os

from torch import Tensor

from .base import Frozen
from .image import IMAGE_PRESETS, ImageViTConfig, ImageViTTeacher
from .internvideo2 import INTERNVIDEO2_PRESETS, InternVideo2Config, InternVideo2Teacher
from .video import VIDEO_PRESETS, VideoViTConfig, VideoViTTeacher
from .weights import META_ARCH, META_FORMAT, TEACHER_FORMAT, read_state_dict, recorded_config, strip_prefixes

# preset name -> (teacher class, config)
IMAGE_TEACHERS = {name: (ImageViTTeacher, cfg) for name, cfg in IMAGE_PRESETS.items()}
VIDEO_TEACHERS = {**{name: (InternVideo2Teacher, cfg) for name, cfg in INTERNVIDEO2_PRESETS.items()},
                  **{name: (VideoViTTeacher, cfg) for name, cfg in VIDEO_PRESETS.items()}}
CONFIG_OF = {ImageViTTeacher: ImageViTConfig, VideoViTTeacher: VideoViTConfig,
             InternVideo2Teacher: InternVideo2Config}


def teacher_spec(preset: str, **config_overrides):
    """(teacher class, config) of an image or video preset with overrides applied."""
    table = {**IMAGE_TEACHERS, **VIDEO_TEACHERS}
    if preset not in table:
        raise ValueError(f"unknown teacher preset {preset!r}; available: {sorted(table)}")
    cls, config = table[preset]
    return cls, with_overrides(config, config_overrides, f"teacher {preset}")


def with_overrides(config, overrides: dict, what: str):
    """dataclasses.replace with a ValueError naming unknown fields."""
    if not overrides:
        return config
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{what}: unknown config fields {unknown}; known: {sorted(names)}")
    return dataclasses.replace(config, **overrides)


def build_teacher(state: dict[str, Tensor], preset: str | None, *, table: dict, kind: str,
                  meta: dict[str, str] | None = None, pixel_range=(-1.0, 1.0), layout: str = "auto",
                  source: str = "state dict", **config_overrides) -> Frozen:
    """A teacher of ``table`` from a state dict (the factories' and convert-teacher's common path)."""
    meta = meta or {}
    recorded_arch = meta.get(META_ARCH) if meta.get(META_FORMAT) == TEACHER_FORMAT else None
    name = preset or recorded_arch
    if name is None:
        raise ValueError(f"{source}: give the {kind}-teacher preset ({', '.join(sorted(table))}); only files "
                         f"written by `dera_fast convert-teacher` carry their own config")
    if name not in table:
        raise ValueError(f"{source}: {name!r} is not a {kind}-teacher preset; available: {sorted(table)}")
    cls, config = table[name]
    if name == recorded_arch:  # the config recorded in the file: the preset plus the overrides it was converted with
        config = recorded_config(meta, CONFIG_OF[cls])
    config = with_overrides(config, config_overrides, f"{kind} teacher {name}")
    kw = {} if cls is InternVideo2Teacher else {"layout": layout}
    return cls.from_state_dict(state, config, meta=meta, pixel_range=pixel_range, source=source, **kw)


def load_image_teacher(path: str | os.PathLike, preset: str | None = None, *, pixel_range=(-1.0, 1.0),
                       layout: str = "auto", **config_overrides) -> ImageViTTeacher:
    """A frozen image teacher (DINOv2 / DINOv3, hub or HF layout, or a convert-teacher file) from local weights.

    Args:
        path: .safetensors / .pth / .bin file, or a directory holding model.safetensors / pytorch_model.bin.
        preset: one of IMAGE_TEACHERS (``dinov3-b16`` is DeRA's); None for a convert-teacher file.
        pixel_range: range of the videos ``features`` will receive.
        layout: "auto", "hub" or "hf".
        **config_overrides: ImageViTConfig fields (``dim``, ``depth``, ``heads``, ``patch``, ``image_size``, ...).
    """
    state, meta = read_state_dict(path)
    return build_teacher(state, preset, table=IMAGE_TEACHERS, kind="image", meta=meta, pixel_range=pixel_range,
                         layout=layout, source=str(path), **config_overrides)


def load_video_teacher(path: str | os.PathLike, preset: str | None = None, *, pixel_range=(-1.0, 1.0),
                       layout: str = "auto", **config_overrides) -> InternVideo2Teacher | VideoViTTeacher:
    """A frozen video teacher (InternVideo2, VideoMAE, or a convert-teacher file) from local weights.

    Args:
        path: .safetensors / .pth / .bin file, or a directory holding model.safetensors / pytorch_model.bin.
        preset: one of VIDEO_TEACHERS (``internvideo2-b14`` is DeRA's); None for a convert-teacher file.
        pixel_range: range of the videos ``features`` will receive.
        layout: VideoMAE only: "auto", "hub" or "hf".
        **config_overrides: config fields (``dim``, ``depth``, ``heads``, ``patch``, ``frames``, ...).
    """
    state, meta = read_state_dict(path)
    return build_teacher(state, preset, table=VIDEO_TEACHERS, kind="video", meta=meta, pixel_range=pixel_range,
                         layout=layout, source=str(path), **config_overrides)


_INTERNVIDEO2_BY_DIM = {cfg.dim: name for name, cfg in INTERNVIDEO2_PRESETS.items()}


def detect_arch(state: dict[str, Tensor]) -> str:
    """The teacher preset whose family and width match an official / HF state dict's keys; ValueError if none."""
    keys = set(strip_prefixes(state, r"module\.|model\.|backbone\.|videomae\.|dinov2\.|dinov3\.|encoder\.(?!layer\.)"))
    if "blocks.0.attn.q_norm.weight" in keys and "patch_embed.proj.weight" in keys:  # InternVideo2
        dim = int(next(v for k, v in state.items() if k.endswith("patch_embed.proj.weight")).shape[0])
        if dim in _INTERNVIDEO2_BY_DIM:
            return _INTERNVIDEO2_BY_DIM[dim]
        raise ValueError(f"an InternVideo2 checkpoint of width {dim}: no preset has it "
                         f"({sorted(INTERNVIDEO2_PRESETS)}); pass a preset and --set dim=... depth=... heads=...")
    if keys & {"blocks.0.attn.q_bias", "encoder.layer.0.attention.attention.q_bias"}:
        return "videomae-b"
    if keys & {"rope_embed.periods", "storage_tokens", "layer.0.attention.q_proj.weight"}:
        return "dinov3-b16"
    if keys & {"blocks.0.ls1.gamma", "encoder.layer.0.layer_scale1.lambda1"}:
        return "dinov2-b14-reg" if keys & {"register_tokens", "embeddings.register_tokens"} else "dinov2-b14"
    raise ValueError("cannot tell which teacher these weights belong to (InternVideo2, VideoMAE, DINOv2, DINOv3 "
                     "in their official or HF layouts are recognised); name the preset (--arch)")
