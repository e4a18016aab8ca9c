"""Video files in: :func:`read_video` (a clip), :func:`iter_frames` / :func:`iter_clips` (streams), and
:func:`probe_video`; mp4/mkv/avi/mov/webm through PyAV, GIF through Pillow. Writing lives in ``writer.py``.

Tensor conventions (the whole package uses them):

* a clip is a float tensor ``[3, T, H, W]``; a batch is ``[B, 3, T, H, W]``;
* pixel values lie in ``value_range``, ``(-1.0, 1.0)`` by default (the public API's range). Pass
  ``value_range=(0.0, 1.0)`` for LARP-compatible models, whose data pipeline works in [0, 1];
* on disk and at the numpy boundary frames are ``uint8 [T, H, W, 3]`` (RGB).

Everything here decodes frame by frame and resizes each frame as it is decoded, so memory is bounded by the
requested output, never by the file: a clip from a long video costs one keyframe seek plus the frames up to the
clip (see ``decode.py``), and the streams hold one clip at a time.

PyAV (``pip install 'dera-fast[video]'``) is imported only when an mp4-like file is read or written. Without it,
:func:`write_video` still writes ``.gif`` and ``.png`` (a strip of frames side by side) and :func:`read_video`
still reads ``.gif``.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterator

import numpy as np
import torch

from .._validation import check_value_range
from .decode import AV_SUFFIXES, VIDEO_SUFFIXES, Closing, MissingDependencyError, open_video, require_av
from .transforms import (DEFAULT_RANGE, FrameResizer, frame_to_float, frames_to_clip,
                         repeat_last_frame, resize_video, uint8_to_video, video_to_uint8)
from .writer import WRITE_SUFFIXES, VideoWriter, write_png_strip, write_video

__all__ = ["read_video", "iter_frames", "iter_clips", "ClipStream", "probe_video", "write_video", "VideoWriter",
           "write_png_strip", "resize_video", "repeat_last_frame", "uint8_to_video", "video_to_uint8",
           "MissingDependencyError", "require_av", "AV_SUFFIXES", "VIDEO_SUFFIXES", "WRITE_SUFFIXES",
           "DEFAULT_RANGE"]


def _frame_indices(step: float, start: int, frames: int | None, num_src: int | None = None) -> list[int]:
    """Source frame indices of output frames ``start, start+1, ...`` when the output advances ``step`` source
    frames per frame (nearest earlier source frame). ``frames=None`` means up to the end (needs ``num_src``);
    indices at or past ``num_src`` are dropped when it is known."""
    if frames is None:
        stop = int(math.floor((num_src - 1) / step + 1e-6)) + 1
    else:
        stop = start + frames
    idx = [_src_index(step, k) for k in range(start, stop)]
    return idx if num_src is None else [i for i in idx if i < num_src]


def _src_index(step: float, k: int) -> int:
    # NOTE: the small epsilon keeps exact multiples (e.g. 30 -> 10 fps) from flooring one frame early.
    return int(math.floor(k * step + 1e-6))


def _step(src_fps: float, fps: float | None) -> float:
    return 1.0 if fps is None or src_fps <= 0 else src_fps / fps


def _check_args(frames, start, fps) -> None:
    if frames is not None and frames <= 0:
        raise ValueError(f"frames must be positive or None, got {frames}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive and finite or None, got {fps}")


def _selected(source, step: float, start: int, frames: int | None, resizer: FrameResizer):
    """``(output index, converted frame)`` for output frames ``start, start+1, ...`` (``frames`` of them, or to the
    end): output ``k`` is source frame ``floor(k * step)``. A source frame is converted once, even when repeated
    (``fps`` above the native rate), and not at all when skipped."""
    k = start
    first = _src_index(step, start)
    last = None if frames is None else _src_index(step, start + frames - 1)
    for n, frame in source.decode(first, last):
        converted = None
        while _src_index(step, k) == n and (frames is None or k < start + frames):
            if converted is None:
                converted = resizer(frame)
            yield k, converted
            k += 1


def read_video(path, frames: int | None = None, size: int | tuple[int, int] | None = None,
               fps: float | None = None, start: int = 0, *, value_range=DEFAULT_RANGE, resize: str = "exact",
               threads: int = 0, timeline: np.ndarray | None = None) -> torch.Tensor:
    """Read a video file into a float clip ``[3, T, H, W]`` with values in ``value_range`` (default [-1, 1]).

    The file is opened once; frames before ``start`` are reached by a keyframe seek (frames are identified by
    their timestamps, so the result equals a full decode's frames), and each frame is resized as it is decoded.

    Args:
        path: ``.mp4``/``.mkv``/``.avi``/``.mov``/``.webm`` (PyAV, the ``video`` extra) or ``.gif`` (Pillow).
        frames: number of frames to return (``None``: all). A shorter video returns fewer frames; the
            datasets pad those by repeating the last frame.
        size: ``int``: resize the short side to ``size`` and centre-crop ``size x size`` (LARP's protocol);
            ``(H, W)``: resize to exactly that; ``None``: native resolution.
        fps: resample the time axis to this frame rate by picking the nearest earlier source frame
            (``None``: native rate, every frame).
        start: index of the first returned frame, counted at the output rate.
        value_range: ``(low, high)`` of the returned pixel values.
        resize: ``"exact"`` (torch antialiased bilinear on RGB: the evaluation protocol) or ``"fast"`` (swscale in
            the decoder, before the RGB conversion: for training; about 45 dB from ``"exact"``).
        threads: decoder threads (0: FFmpeg's choice; 1 inside DataLoader workers).
        timeline: the file's frame timestamps from a dataset index (:class:`dera_fast.data.VideoIndex`); saves
            the demux pass that a seek otherwise needs.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported suffix, undecodable file, ``start`` past the end, bad arguments.
        MissingDependencyError: PyAV is needed and not installed.
    """
    _check_args(frames, start, fps)
    lo, hi = check_value_range(value_range)
    resizer = FrameResizer(size, resize)
    with open_video(path, threads=threads, timeline=timeline) as source:
        return read_clip(source, frames, fps, start, resizer, (lo, hi))


def read_clip(source, frames: int | None, fps: float | None, start: int, resizer: FrameResizer,
              value_range=DEFAULT_RANGE) -> torch.Tensor:
    """:func:`read_video` on an open source (``decode.open_video``): float ``[3, T, H, W]`` in ``value_range``."""
    out = [f for _, f in _selected(source, _step(source.fps, fps), start, frames, resizer)]
    if not out:
        raise ValueError(f"no decodable frames in {source.path}" if start == 0 else
                         f"start={start} is past the end of {source.path} at the requested frame rate")
    return frames_to_clip(out, value_range)


def iter_frames(path, size: int | tuple[int, int] | None = None, fps: float | None = None, start: int = 0,
                frames: int | None = None, *, value_range=DEFAULT_RANGE, resize: str = "exact",
                threads: int = 0) -> Iterator[torch.Tensor]:
    """Yield the frames :func:`read_video` would return, one float ``[3, H, W]`` at a time, decoding as it goes."""
    _check_args(frames, start, fps)
    lo, hi = check_value_range(value_range)
    resizer = FrameResizer(size, resize)
    with open_video(path, threads=threads) as source:
        for _, f in _selected(source, _step(source.fps, fps), start, frames, resizer):
            yield frame_to_float(f) * (hi - lo) + lo


class ClipStream(Closing):
    """Clips of ``clip_len`` frames from a video file, yielded as they fill (see :func:`iter_clips`).

    Attributes (valid once created): ``fps`` (the output frame rate), ``expected_frames`` (output frames per the
    container's count, ``None`` when it records none); while iterating: ``frames_read`` (output frames decoded so
    far) and ``padded`` (True when the whole video was shorter than one clip and its clip was padded).
    """

    def __init__(self, path, clip_len: int, stride: int | None = None, size: int | tuple[int, int] | None = None,
                 fps: float | None = None, value_range=DEFAULT_RANGE, *, resize: str = "exact", pad: bool = True,
                 threads: int = 0):
        if int(clip_len) <= 0:
            raise ValueError(f"clip_len must be positive, got {clip_len}")
        stride = clip_len if stride is None else stride
        if int(stride) <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        _check_args(None, 0, fps)
        self.clip_len, self.stride, self.pad = int(clip_len), int(stride), pad
        self.lo, self.hi = check_value_range(value_range)
        self._resizer = FrameResizer(size, resize)
        self._source = open_video(path, threads=threads)  # opened now: a bad file fails before any output exists
        self._step = _step(self._source.fps, fps)
        self.fps = fps or self._source.fps or None
        n = self._source.recorded_frames
        self.expected_frames = (len(_frame_indices(self._step, 0, None, n)) if n > 0 else None)
        self.frames_read, self.padded = 0, False
        self._started = False

    def close(self) -> None:
        self._source.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._started:
            raise ValueError("a ClipStream can be iterated once")
        self._started = True
        try:
            yield from self._clips()
        finally:
            self.close()

    def _clip(self, frames) -> torch.Tensor:
        return torch.stack(list(frames), dim=1) * (self.hi - self.lo) + self.lo  # [3, T, H, W]

    def _clips(self):
        window: deque = deque(maxlen=self.clip_len)
        next_start, emitted = 0, 0
        for k, f in _selected(self._source, self._step, 0, None, self._resizer):
            self.frames_read = k + 1
            if k < next_start:  # between clips (stride > clip_len): not needed
                continue
            window.append(frame_to_float(f))
            if k - next_start + 1 == self.clip_len:
                yield self._clip(window)
                emitted += 1
                next_start += self.stride
                while window and len(window) > self.clip_len - self.stride:  # keep only the overlap
                    window.popleft()
        if emitted == 0 and window and self.pad:  # shorter than one clip: LARP's last-frame padding
            self.padded = True
            yield repeat_last_frame(self._clip(window), self.clip_len)


def iter_clips(path, clip_len: int, stride: int | None = None, size: int | tuple[int, int] | None = None,
               fps: float | None = None, value_range=DEFAULT_RANGE, *, resize: str = "exact", pad: bool = True,
               threads: int = 0) -> ClipStream:
    """Stream a video as clips: float ``[3, clip_len, H, W]`` in ``value_range``, starting at output frames
    ``0, stride, 2 * stride, ...``; only the frames of the current clip are held.

    Trailing frames that fill no clip are dropped; a video shorter than one clip yields one clip padded by repeating
    its last frame (LARP's rule; ``pad=False`` yields nothing instead). ``size``, ``fps``, ``resize`` and
    ``threads`` are as in :func:`read_video`. The file is opened (and checked) at once.
    """
    return ClipStream(path, clip_len, stride, size, fps, value_range, resize=resize, pad=pad, threads=threads)


def probe_video(path) -> dict:
    """Metadata of a video file: ``{"num_frames", "fps", "height", "width"}``.

    The frame count is the number of frames a full decode returns: the number of presentation timestamps (one
    demux pass, no decoding) where the container stores them, else the container's count, else by decoding.
    """
    with open_video(path) as source:
        n = source.num_frames()
        if n == 0:
            raise ValueError(f"no decodable frames in {path}")
        h, w = source.size()
        return {"num_frames": n, "fps": source.fps, "height": h, "width": w}
