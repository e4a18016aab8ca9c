"""Video files in and out: mp4/mkv/avi/mov/webm through PyAV, GIF and PNG strips through Pillow.

Tensor conventions (the whole package uses them):

* a clip is a float tensor ``[3, T, H, W]``; a batch is ``[B, 3, T, H, W]``;
* pixel values lie in ``value_range``, ``(-1.0, 1.0)`` by default (the public API's range). Pass
  ``value_range=(0.0, 1.0)`` for LARP-compatible models, whose data pipeline works in [0, 1];
* on disk and at the numpy boundary frames are ``uint8 [T, H, W, 3]`` (RGB).

PyAV (``pip install 'dera-fast[video]'``) is imported only when an mp4-like file is read or written. Without it,
:func:`write_video` still writes ``.gif`` and ``.png`` (a strip of frames side by side) and :func:`read_video`
still reads ``.gif``.
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

AV_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
VIDEO_SUFFIXES = AV_SUFFIXES + (".gif",)
WRITE_SUFFIXES = AV_SUFFIXES + (".gif", ".png")
DEFAULT_RANGE = (-1.0, 1.0)


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


def require_av():
    """Import PyAV or raise :class:`MissingDependencyError` naming the ``video`` extra."""
    try:
        import av
    except ImportError as e:
        raise MissingDependencyError(
            "mp4/mkv/avi/mov/webm video I/O needs PyAV: pip install 'dera-fast[video]' "
            "(or read/write .gif and .png instead)") from e
    return av


def _require_pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise MissingDependencyError("GIF/PNG I/O needs Pillow: pip install pillow") from e
    return Image


def _check_readable(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"unsupported video file type {path.suffix!r} for {path}; "
                         f"supported: {', '.join(VIDEO_SUFFIXES)}")
    return path


def _check_range(value_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return lo, hi


# ----------------------------------------------------------------------------------------------------------------
# conversions


def uint8_to_video(frames: np.ndarray | torch.Tensor, value_range=DEFAULT_RANGE) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` -> float clip ``[3, T, H, W]`` in ``value_range``."""
    lo, hi = _check_range(value_range)
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(3, 0, 1, 2).float() / 255.0  # [3, T, H, W] in [0, 1]
    return x * (hi - lo) + lo


def video_to_uint8(video: torch.Tensor, value_range=DEFAULT_RANGE) -> np.ndarray:
    """Float clip ``[3, T, H, W]`` in ``value_range`` (or uint8 ``[T, H, W, 3]``) -> numpy uint8 ``[T, H, W, 3]``.

    Values outside the range are clipped.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dtype == torch.uint8:
        if video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be [T, H, W, 3], got {tuple(video.shape)}")
        return video.cpu().numpy()
    if not video.is_floating_point():
        raise TypeError(f"video must be float [3, T, H, W] or uint8 [T, H, W, 3], got {video.dtype}")
    if video.dim() == 5 and video.shape[0] == 1:
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W] (float), got shape {tuple(video.shape)}")
    if video.numel() == 0:
        raise ValueError(f"video must not be empty, got shape {tuple(video.shape)}")
    lo, hi = _check_range(value_range)
    x = ((video.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    # NOTE: round-to-nearest (not truncation) so that uint8 -> float -> uint8 is the identity.
    return (x * 255.0).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def resize_video(video: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a float clip ``[..., H, W]`` (e.g. ``[3, T, H, W]``); only the last two dims are spatial.

    ``size=int``: the short side becomes ``size`` (aspect kept; long side ``int(size * long / short)``, as in
    torchvision's ``Resize``), then a centre crop to ``size x size`` (LARP's protocol). ``size=(H, W)``: resize to
    exactly that. Bilinear with antialiasing; triangle weights are non-negative so values stay in range.
    """
    h, w = video.shape[-2:]
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        crop = (size, size)
    else:
        nh, nw = (int(s) for s in size)
        if nh <= 0 or nw <= 0:
            raise ValueError(f"size must be positive, got {size}")
        crop = None
    lead = video.shape[:-2]
    x = video.reshape(-1, 1, h, w).float()  # [C*T, 1, H, W]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if crop is not None:
        top, left = int(round((nh - crop[0]) / 2.0)), int(round((nw - crop[1]) / 2.0))
        x = x[..., top:top + crop[0], left:left + crop[1]]
    return x.reshape(*lead, *x.shape[-2:]).to(video.dtype if video.is_floating_point() else torch.float32)


def _frame_indices(step: float, start: int, frames: int | None, num_src: int | None = None) -> list[int]:
    """Source frame indices of output frames ``start, start+1, ...`` when the output advances ``step`` source
    frames per frame (nearest earlier source frame). ``frames=None`` means up to the end (needs ``num_src``);
    indices at or past ``num_src`` are dropped when it is known."""
    if frames is None:
        stop = int(math.floor((num_src - 1) / step + 1e-6)) + 1
    else:
        stop = start + frames
    # NOTE: the small epsilon keeps exact multiples (e.g. 30 -> 10 fps) from flooring one frame early.
    idx = [int(math.floor(k * step + 1e-6)) for k in range(start, stop)]
    return idx if num_src is None else [i for i in idx if i < num_src]


def _step(src_fps: float, fps: float | None) -> float:
    return 1.0 if fps is None or src_fps <= 0 else src_fps / fps


# ----------------------------------------------------------------------------------------------------------------
# reading


def _read_gif(path: Path) -> tuple[np.ndarray, float]:
    Image = _require_pil()
    try:
        with Image.open(path) as im:
            frames, durations = [], []
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(np.asarray(im.convert("RGB")))
                durations.append(im.info.get("duration", 0) or 0)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"could not decode GIF {path}: {e}") from e
    mean_ms = float(np.mean(durations)) if durations else 0.0
    return np.stack(frames), (1000.0 / mean_ms if mean_ms > 0 else 10.0)


def _av_open(path: Path):
    av = require_av()
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"could not open video {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"no video stream in {path}")
    return av, container


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.base_rate or stream.guessed_rate
    return float(rate) if rate else 0.0


def _decode_av(path: Path, start: int = 0, frames: int | None = None, fps: float | None = None):
    """Decode the RGB frames that :func:`read_video` needs; returns ``({source index: uint8 [H, W, 3]}, indices,
    source fps)``. With ``frames`` set, decoding stops at the last needed frame and only needed frames are kept."""
    av, container = _av_open(path)
    kept, n = {}, 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        src_fps = _stream_fps(stream)
        wanted = None if frames is None else _frame_indices(_step(src_fps, fps), start, frames)
        need = None if wanted is None else set(wanted)
        for frame in container.decode(stream):
            if need is None or n in need:
                kept[n] = frame.to_ndarray(format="rgb24")
            n += 1
            if wanted is not None and n > wanted[-1]:
                break
    except av.error.FFmpegError as e:
        raise ValueError(f"could not decode video {path}: {e}") from e
    finally:
        container.close()
    if n == 0:
        raise ValueError(f"no decodable frames in {path}")
    if wanted is None:
        wanted = _frame_indices(_step(src_fps, fps), start, None, n)
    return kept, [i for i in wanted if i < n], src_fps


def probe_video(path) -> dict:
    """Metadata of a video file: ``{"num_frames", "fps", "height", "width"}``.

    The frame count comes from the container when it records one, else from a full decode.
    """
    path = _check_readable(path)
    if path.suffix.lower() == ".gif":
        frames, fps = _read_gif(path)
        return {"num_frames": len(frames), "fps": fps, "height": frames.shape[1], "width": frames.shape[2]}
    av, container = _av_open(path)
    try:
        stream = container.streams.video[0]
        n, fps = int(stream.frames or 0), _stream_fps(stream)
        h, w = stream.codec_context.height, stream.codec_context.width
    finally:
        container.close()
    if n <= 0 or not h or not w:  # not recorded in the container (e.g. WebM): count by decoding
        av, container = _av_open(path)
        try:
            n = 0
            for frame in container.decode(container.streams.video[0]):
                n, h, w = n + 1, frame.height, frame.width
        except av.error.FFmpegError as e:
            raise ValueError(f"could not decode video {path}: {e}") from e
        finally:
            container.close()
        if n == 0:
            raise ValueError(f"no decodable frames in {path}")
    return {"num_frames": n, "fps": fps, "height": int(h), "width": int(w)}


def read_video(path, frames: int | None = None, size: int | tuple[int, int] | None = None,
               fps: float | None = None, start: int = 0, *, value_range=DEFAULT_RANGE) -> torch.Tensor:
    """Read a video file into a float clip ``[3, T, H, W]`` with values in ``value_range`` (default [-1, 1]).

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

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unsupported suffix, undecodable file, ``start`` past the end, bad arguments.
        MissingDependencyError: PyAV is needed and not installed.
    """
    if frames is not None and frames <= 0:
        raise ValueError(f"frames must be positive or None, got {frames}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive or None, got {fps}")
    lo, hi = _check_range(value_range)
    path = _check_readable(path)
    if path.suffix.lower() == ".gif":
        all_frames, src_fps = _read_gif(path)
        idx = _frame_indices(_step(src_fps, fps), start, frames, len(all_frames))
    else:
        all_frames, idx, src_fps = _decode_av(path, start, frames, fps)
    if not idx:
        raise ValueError(f"start={start} is past the end of {path} at the requested frame rate")
    clip = uint8_to_video(np.stack([all_frames[i] for i in idx]), value_range=(0.0, 1.0))  # [3, T, H, W]
    if size is not None:
        clip = resize_video(clip, size).clamp_(0.0, 1.0)
    return clip * (hi - lo) + lo


# ----------------------------------------------------------------------------------------------------------------
# writing


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, 3]`` by edge replication to even H and W (libx264 with yuv420p needs even sizes)."""
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def _write_av(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    av = require_av()
    frames = _pad_even(frames)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        # NOTE: WebM cannot hold H.264; VP9 with crf and b:v=0 is its constant-quality mode.
        codec = "libvpx-vp9" if path.suffix.lower() == ".webm" else "libx264"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), **({"b:v": "0"} if codec == "libvpx-vp9" else {})}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    Image = _require_pil()
    images = [Image.fromarray(f) for f in frames]
    # GIF stores durations in 10 ms units; Pillow rounds.
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(10, round(1000.0 / fps)),
                   loop=0, optimize=False)


def write_png_strip(path, video, *, every: int = 1, value_range=DEFAULT_RANGE) -> Path:
    """Write every ``every``-th frame of ``video`` side by side into one PNG (width ``ceil(T/every) * W``).

    ``video``: float ``[3, T, H, W]`` in ``value_range`` or uint8 ``[T, H, W, 3]``.
    """
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}")
    Image = _require_pil()
    frames = video_to_uint8(video, value_range)[::every]  # [T', H, W, 3]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)  # [H, T'*W, 3]
    return path


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
        the path written. Parent folders are created.
    """
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"unsupported output type {path.suffix!r} for {path}; supported: {', '.join(WRITE_SUFFIXES)}")
    if suffix == ".png":
        t = video.shape[0] if video.dtype == torch.uint8 else video.shape[-3]
        return write_png_strip(path, video, every=png_every or -(-t // 8), value_range=value_range)
    frames = video_to_uint8(video, value_range)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        _write_gif(path, frames, fps)
    else:
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
        try:
            _write_av(tmp, frames, float(fps), crf)
            os.replace(tmp, path)  # NOTE: atomic, so a crash never leaves a truncated video under the real name
        finally:
            tmp.unlink(missing_ok=True)
    return path
