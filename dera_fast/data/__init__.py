"""Data: video file I/O (keyframe seeks, streaming decode and encode), datasets with LARP's protocol, a cached
per-dataset video index, the trainers' batch stream, and the download-free ``SyntheticClips``.

Clips are float ``[3, T, H, W]`` (batches ``[B, 3, T, H, W]``) with values in ``value_range``, [-1, 1] by default
(``(0, 1)`` for LARP-compatible models). Files on disk are uint8 RGB.
"""
from .datasets import VideoFolderDataset, read_larp_csv
from .index import VideoIndex, VideoInfo
from .io import (ClipStream, MissingDependencyError, VideoWriter, iter_clips, iter_frames, probe_video, read_video,
                 repeat_last_frame, resize_video, uint8_to_video, video_to_uint8, write_png_strip, write_video)
from .samples import SampleVideoClips, sample_videos
from .synthetic import DEFAULT_IMAGES, IMAGES, MOTIONS, SyntheticClips

pad_frames = repeat_last_frame  # the earlier name, kept for existing callers

__all__ = ["VideoFolderDataset", "SyntheticClips", "SampleVideoClips", "sample_videos", "read_video", "iter_frames",
           "iter_clips", "ClipStream", "write_video", "VideoWriter", "write_png_strip", "probe_video",
           "VideoIndex", "VideoInfo", "resize_video", "repeat_last_frame", "pad_frames", "uint8_to_video",
           "video_to_uint8", "read_larp_csv", "MissingDependencyError", "IMAGES", "DEFAULT_IMAGES", "MOTIONS"]
