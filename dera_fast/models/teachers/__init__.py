"""Frozen alignment teachers for DeRA (SPEC.md §3.5, ECOSYSTEM.md §3.4); nothing is downloaded.

  Teacher              protocol: features(video [B, C, T, H, W] in pixel_range) -> [B, N, feature_dim], plus `grid`
  RandomTeacher        seeded random conv nets (SPEC §7.2 stand-ins) for tests and CPU smoke runs   (random_teacher.py)
  ImageViTTeacher      DINOv2 / DINOv3 ViT on frame 0, torch-hub or HF layout                       (image.py)
  InternVideo2Teacher  InternVideo2 (DistInternVideo2 backbone), DeRA's motion teacher               (internvideo2.py)
  VideoViTTeacher      VideoMAE-style video ViT, official or HF layout                               (video.py)
  load_image_teacher / load_video_teacher   factories from local weight files                       (loading.py)

Teachers resize inputs to their own fixed size, so `grid` is fixed: (h, w) for images, (t, h, w) for videos.
Weight files: safetensors, or official .pth / .bin read with ``torch.load(weights_only=True)`` (weights.py);
``python -m dera_fast convert-teacher`` makes pickle-free copies that carry their config.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor

from ..dera import AlignTargets
from .base import IMAGENET_MEAN, IMAGENET_STD, Teacher
from .image import IMAGE_PRESETS, ImageViTConfig, ImageViTTeacher
from .internvideo2 import INTERNVIDEO2_PRESETS, InternVideo2Config, InternVideo2Teacher, internvideo2_sincos
from .loading import (IMAGE_TEACHERS, VIDEO_TEACHERS, build_teacher, detect_arch, load_image_teacher,
                      load_video_teacher, teacher_spec)
from .random_teacher import RandomTeacher
from .video import VIDEO_PRESETS, VideoViTConfig, VideoViTTeacher, videomae_sincos


def compute_targets(video: Tensor, image_teacher: Teacher | None, video_teacher: Teacher | None) -> AlignTargets:
    """Run the frozen teachers on a batch (same augmented clip the tokenizer sees) -> DeRA AlignTargets."""
    out = AlignTargets()
    if image_teacher is not None:
        out = dataclasses.replace(out, appearance=image_teacher.features(video),
                                  appearance_grid=tuple(image_teacher.grid))
    if video_teacher is not None:
        out = dataclasses.replace(out, motion=video_teacher.features(video), motion_grid=tuple(video_teacher.grid))
    return out


__all__ = ["Teacher", "RandomTeacher", "ImageViTConfig", "ImageViTTeacher", "IMAGE_PRESETS", "VideoViTConfig",
           "VideoViTTeacher", "VIDEO_PRESETS", "videomae_sincos", "InternVideo2Config", "InternVideo2Teacher",
           "INTERNVIDEO2_PRESETS", "internvideo2_sincos", "IMAGE_TEACHERS", "VIDEO_TEACHERS", "load_image_teacher",
           "load_video_teacher", "build_teacher", "teacher_spec", "detect_arch", "compute_targets",
           "IMAGENET_MEAN", "IMAGENET_STD"]
