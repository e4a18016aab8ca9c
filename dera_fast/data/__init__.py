"""Data: video file I/O, datasets with LARP's protocol, and the download-free ``SyntheticClips``.

Clips are float ``[3, T, H, W]`` (batches ``[B, 3, T, H, W]``) with values in ``value_range``, [-1, 1] by default
(``(0, 1)`` for LARP-compatible models). Files on disk are uint8 RGB.
"""
from .datasets import VideoFolderDataset, pad_frames, read_larp_csv
from .io import (MissingDependencyError, probe_video, read_video, resize_video, uint8_to_video, video_to_uint8,
                 write_png_strip, write_video)
from .samples import SampleVideoClips, sample_videos
from .synthetic import DEFAULT_IMAGES, IMAGES, MOTIONS, SyntheticClips

__all__ = ["VideoFolderDataset", "SyntheticClips", "SampleVideoClips", "sample_videos", "read_video", "write_video", "write_png_strip", "probe_video",
           "resize_video", "uint8_to_video", "video_to_uint8", "read_larp_csv", "pad_frames",
           "MissingDependencyError", "IMAGES", "DEFAULT_IMAGES", "MOTIONS"]
