"""Writing videos: :class:`VideoWriter` streams frames chunk by chunk (mp4-like files hold nothing in memory),
:func:`write_video` writes one clip, :func:`write_png_strip` a strip of frames side by side.

Every write is atomic: frames go to a hidden temporary file beside the target, renamed over it only when complete,
and removed on any error, so a crash never leaves a truncated file under the real name.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .._files import fsync_path
from .._validation import check_value_range
from .decode import AV_SUFFIXES, require_av, require_pil
from .transforms import DEFAULT_RANGE, video_to_uint8

WRITE_SUFFIXES = AV_SUFFIXES + (".gif", ".png")


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, 3]`` by edge replication to even H and W (libx264 with yuv420p needs even sizes)."""
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def _png_strip(frames: np.ndarray, path: Path) -> None:
    Image = require_pil()
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path, format="PNG")  # [H, T*W, 3]


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    Image = require_pil()
    images = [Image.fromarray(f) for f in frames]
    # GIF stores durations in 10 ms units; Pillow rounds.
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(10, round(1000.0 / fps)), loop=0, optimize=False)


def temp_path(path: Path) -> Path:
    """The hidden temporary name a write to ``path`` goes through (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


class VideoWriter:
    """Write a video chunk by chunk; the suffix picks the format (see :func:`write_video`).

    ``.mp4``-like files are encoded as the chunks arrive (memory stays flat in the video's length); ``.gif`` and
    ``.png`` need every frame at the end, so they keep the uint8 frames until :meth:`close` (use them for short
    clips). Use as a context manager: on an exception the temporary file is removed and the target is untouched.

    Args:
        path: output file; parent folders are created.
        fps: frame rate (> 0).
        value_range: pixel range of float chunks.
        crf: H.264 / VP9 constant-quality factor.
        png_every: ``.png`` only: keep every ``png_every``-th frame (default: at most 8 frames).
        keyint: a keyframe exactly every ``keyint`` frames (default: the encoder's choice, up to 250 for x264).
        bframes: B-frames between reference frames (default: the encoder's choice, 3 for x264).
        threads: encoder threads (0: the encoder's choice).
    """

    def __init__(self, path, fps: float, *, value_range=DEFAULT_RANGE, crf: int = 18, png_every: int | None = None,
                 keyint: int | None = None, bframes: int | None = None, threads: int = 0):
        if not fps or not np.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be positive and finite, got {fps}")
        for name, v in (("png_every", png_every), ("keyint", keyint)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if bframes is not None and bframes < 0:
            raise ValueError(f"bframes must be >= 0, got {bframes}")
        self.keyint, self.bframes, self.threads = keyint, bframes, int(threads)
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in WRITE_SUFFIXES:
            raise ValueError(f"unsupported output type {self.path.suffix!r} for {self.path}; "
                             f"supported: {', '.join(WRITE_SUFFIXES)}")
        check_value_range(value_range)
        self.fps, self.value_range, self.crf, self.png_every = float(fps), value_range, int(crf), png_every
        if self.suffix in AV_SUFFIXES:
            require_av()  # fail before any file exists
        else:
            require_pil()
        self.frames_written = 0
        self._held: list[np.ndarray] = []  # gif / png frames
        self._container = self._stream = None
        self._size = None
        self._tmp = temp_path(self.path)
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_av(self, h: int, w: int) -> None:
        av = require_av()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), mode="w", format=None)
        # NOTE: WebM cannot hold H.264; VP9 with crf and b:v=0 is its constant-quality mode.
        codec = "libvpx-vp9" if self.suffix == ".webm" else "libx264"
        rate = Fraction(self.fps).limit_denominator(1001)
        self._time_base = 1 / rate
        self._stream = self._container.add_stream(codec, rate=rate)
        self._stream.codec_context.time_base = self._time_base
        self._stream.width, self._stream.height = w + w % 2, h + h % 2
        self._stream.pix_fmt = "yuv420p"
        opts = {"crf": str(self.crf)}
        if codec == "libvpx-vp9":
            opts["b:v"] = "0"
            if self.keyint:
                opts.update(g=str(self.keyint), keyint_min=str(self.keyint))
        else:
            params = [] if self.keyint is None else [f"keyint={self.keyint}", f"min-keyint={self.keyint}",
                                                     "scenecut=0"]
            params += [] if self.bframes is None else [f"bframes={self.bframes}"]
            if params:
                opts["x264-params"] = ":".join(params)
        if self.threads:
            self._stream.codec_context.thread_count = self.threads
        self._stream.options = opts

    def write(self, video) -> None:
        """Append frames: float ``[3, T, H, W]`` in ``value_range`` or uint8 ``[T, H, W, 3]``; every chunk has the
        first chunk's H and W."""
        if self._done:
            raise ValueError(f"{self.path}: the writer is closed")
        frames = video_to_uint8(video, self.value_range)  # [T, H, W, 3]
        if self._size is None:
            self._size = frames.shape[1:3]
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frames are {frames.shape[1]}x{frames.shape[2]}, earlier ones "
                             f"{self._size[0]}x{self._size[1]}")
        if self.suffix not in AV_SUFFIXES:
            self._held.extend(frames)
            self.frames_written += len(frames)
            return
        av = require_av()
        if self._container is None:
            self._open_av(*self._size)
        for f in _pad_even(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = self.frames_written, self._time_base  # frame k at k / fps
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        """Finish the file and move it to ``path`` (atomic). Returns the path."""
        if self._done:
            return self.path
        try:
            if self.frames_written == 0:
                raise ValueError(f"{self.path}: no frames were written")
            if self._container is not None:
                for packet in self._stream.encode():  # flush the encoder
                    self._container.mux(packet)
                self._container.close()
                self._container = None
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                frames = np.stack(self._held)
                if self.suffix == ".gif":
                    _write_gif(self._tmp, frames, self.fps)
                else:
                    _png_strip(frames[::self.png_every or -(-len(frames) // 8)], self._tmp)
            fsync_path(self._tmp)  # the bytes are on disk before the rename makes them the file
            os.replace(self._tmp, self.path)
            fsync_path(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._held = []
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the target path is left as it was."""
        self._done, self._held = True, []
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - a half-written container may refuse to close; it is deleted anyway
                pass
            self._container = None
        self._tmp.unlink(missing_ok=True)


def write_png_strip(path, video, *, every: int = 1, value_range=DEFAULT_RANGE) -> Path:
    """Write every ``every``-th frame of ``video`` side by side into one PNG (width ``ceil(T/every) * W``).

    ``video``: float ``[3, T, H, W]`` in ``value_range`` or uint8 ``[T, H, W, 3]``.
    """
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}")
    with VideoWriter(path, 1.0, value_range=value_range, png_every=every) as w:
        if w.suffix != ".png":
            raise ValueError(f"write_png_strip writes .png files, got {path}")
        w.write(video)
    return Path(path)


def write_video(path, video, fps: float = 8.0, *, value_range=DEFAULT_RANGE, crf: int = 18,
                png_every: int | None = None) -> Path:
    """Write a clip to ``path``; the suffix picks the format.

    * ``.mp4``/``.mkv``/``.avi``/``.mov``/``.m4v``: H.264 (libx264, yuv420p, ``crf``) through PyAV; ``.webm``: VP9.
      Odd heights/widths are padded by one replicated row/column, because yuv420p needs even sizes.
    * ``.gif``: Pillow, 256-colour palette, looping (works without PyAV).
    * ``.png``: every ``png_every``-th frame side by side in one image (default: at most 8 frames, i.e. every
      ``ceil(T / 8)``-th), the easiest format to view in a review or an issue (works without PyAV).

    Args:
        video: float ``[3, T, H, W]`` (or ``[1, 3, T, H, W]``) with values in ``value_range`` (clipped), or
            uint8 ``[T, H, W, 3]``.
        fps: frame rate (> 0).
    Returns:
        the path written (atomically). Parent folders are created.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    with VideoWriter(path, fps, value_range=value_range, crf=crf, png_every=png_every) as w:
        w.write(video)
    return Path(path)
