"""Pixel conversions and resizing: uint8 frames <-> float clips, the LARP resize/crop, padding by the last frame,
and :class:`FrameResizer`, which applies the resize to one decoded frame at a time (so nothing holds a whole video).

Two resize paths share one geometry (short side -> ``size``, long side ``int(size * long / short)``, centre crop):

* ``"exact"``: the protocol's path: RGB at native resolution, then torch bilinear with antialiasing
  (:func:`resize_video`; the same maths torchvision's ``Resize(antialias=True)`` runs in LARP's loader). Used for
  evaluation, tokenization and reconstruction.
* ``"fast"``: swscale resizes the decoder's YUV frame straight to the target size (bilinear, which averages over the
  footprint when shrinking) before the RGB conversion: no full-resolution RGB frame, no float work. Used by the
  training datasets; ``tests/test_seek.py`` bounds its difference from ``"exact"`` (about 45 dB PSNR).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from .._validation import check_value_range

DEFAULT_RANGE = (-1.0, 1.0)
RESIZE_MODES = ("exact", "fast", "area")


def uint8_to_video(frames: np.ndarray | torch.Tensor, value_range=DEFAULT_RANGE) -> torch.Tensor:
    """uint8 frames ``[T, H, W, 3]`` -> float clip ``[3, T, H, W]`` in ``value_range``."""
    lo, hi = check_value_range(value_range)
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
    lo, hi = check_value_range(value_range)
    x = ((video.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    # NOTE: round-to-nearest (not truncation) so that uint8 -> float -> uint8 is the identity.
    return (x * 255.0).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def resize_geometry(h: int, w: int, size: int | tuple[int, int]) -> tuple[int, int, tuple[int, int] | None]:
    """``(resized H, resized W, crop offset (top, left) or None)`` for a frame ``h x w`` and a ``size`` spec.

    ``size=int``: short side -> ``size`` (long side ``int(size * long / short)``, as torchvision's ``Resize``), then
    a centre crop ``size x size`` (LARP's protocol). ``size=(H, W)``: exactly that, no crop.
    """
    if isinstance(size, (int, np.integer)):
        size = int(size)
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        return nh, nw, (int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0)))
    nh, nw = (int(s) for s in size)
    if nh <= 0 or nw <= 0:
        raise ValueError(f"size must be positive, got {size}")
    return nh, nw, None


def resize_video(video: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize a float clip ``[..., H, W]`` (e.g. ``[3, T, H, W]``); only the last two dims are spatial.

    ``size=int``: the short side becomes ``size`` (aspect kept; long side ``int(size * long / short)``, as in
    torchvision's ``Resize``), then a centre crop to ``size x size`` (LARP's protocol). ``size=(H, W)``: resize to
    exactly that. Bilinear with antialiasing; triangle weights are non-negative so values stay in range.
    """
    h, w = video.shape[-2:]
    nh, nw, offset = resize_geometry(h, w, size)
    lead = video.shape[:-2]
    x = video.reshape(-1, 1, h, w).float()  # [C*T, 1, H, W]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if offset is not None:
        top, left = offset
        x = x[..., top:top + size, left:left + size]
    return x.reshape(*lead, *x.shape[-2:]).to(video.dtype if video.is_floating_point() else torch.float32)


def repeat_last_frame(video: torch.Tensor, frames: int) -> torch.Tensor:
    """Pad a clip to ``frames`` frames by repeating its last frame (LARP's ``repeat_to_m_frames``).

    Args:
        video: ``[C, T, H, W]`` or ``[B, C, T, H, W]``, any dtype.
        frames: the length to reach.
    Returns:
        ``video`` itself when ``T >= frames``, else a new tensor with ``T = frames`` whose frames ``T..frames-1``
        equal frame ``T - 1``.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() not in (4, 5):
        raise ValueError(f"video must be [C, T, H, W] or [B, C, T, H, W], got shape {tuple(video.shape)}")
    if int(frames) <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    t = video.shape[-3]
    if t == 0:
        raise ValueError("video has no frame to repeat")
    if t >= frames:
        return video
    last = video.narrow(-3, t - 1, 1)
    return torch.cat([video, last.expand(*last.shape[:-3], frames - t, *last.shape[-2:])], dim=-3)


class FrameResizer:
    """Converts one decoded frame (a PyAV ``VideoFrame`` or uint8 ``[H, W, 3]``) to the clip's pixels.

    Returns uint8 ``[h, w, 3]`` (numpy) when no float work was needed, else float ``[3, h, w]`` in [0, 1]
    (the ``"exact"`` path after a real resize); :func:`frames_to_clip` stacks either kind.

    Args:
        size: ``None`` (native), ``int`` (short side + centre crop) or ``(H, W)``; see :func:`resize_geometry`.
        mode: ``"exact"`` (torch antialiased bilinear on RGB), ``"fast"`` (swscale bilinear on YUV before the RGB
            conversion) or ``"area"`` (swscale area filter). GIF frames (already RGB) always take ``"exact"``.
    """

    def __init__(self, size: int | tuple[int, int] | None = None, mode: str = "exact"):
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
        if size is not None:
            resize_geometry(64, 64, size)  # validates
        self.size, self.mode = size, mode
        self._geometry: dict[tuple[int, int], tuple] = {}
        self._reformatter, self._owner, self._threads_kw = None, None, True

    def __getstate__(self):  # DataLoader workers may be spawned: swscale's context stays behind
        return {**self.__dict__, "_reformatter": None}

    def _reformat(self, frame, **kw):
        """``frame`` converted by swscale on this thread only, with one context reused across frames.

        NOTE: one thread, and a context never shared across ``fork``: swscale's default slice threads do not exist
        in a forked DataLoader worker, and a context inherited from the parent waits for them forever.
        """
        if self._reformatter is None or self._owner != os.getpid():
            from av.video.reformatter import VideoReformatter

            self._reformatter, self._owner = VideoReformatter(), os.getpid()
        if self._threads_kw:
            try:
                return self._reformatter.reformat(frame, threads=1, **kw)
            except TypeError:  # PyAV < 17 has no threads argument (nor slice threads)
                self._threads_kw = False
        return self._reformatter.reformat(frame, **kw)

    def geometry(self, h: int, w: int) -> tuple[int, int, tuple[int, int] | None]:
        if (h, w) not in self._geometry:
            self._geometry[h, w] = resize_geometry(h, w, self.size)
        return self._geometry[h, w]

    def _crop(self, x, offset, channels_last: bool):
        if offset is None:
            return x
        top, left = offset
        s = self.size
        return x[top:top + s, left:left + s] if channels_last else x[:, top:top + s, left:left + s]

    def __call__(self, frame):
        if isinstance(frame, np.ndarray):
            rgb, av_frame = frame, None
            h, w = frame.shape[:2]
        else:
            rgb, av_frame = None, frame
            h, w = frame.height, frame.width
        if rgb is None and (self.size is None or self.mode == "exact"):
            rgb = self._reformat(av_frame, format="rgb24").to_ndarray()
        if self.size is None:
            return rgb
        nh, nw, offset = self.geometry(h, w)
        if rgb is None:  # "fast" / "area": scale the YUV frame, then convert
            interp = "BILINEAR" if self.mode == "fast" else "AREA"
            small = self._reformat(av_frame, width=nw, height=nh, format="rgb24", interpolation=interp).to_ndarray()
            return np.ascontiguousarray(self._crop(small, offset, True))
        if (nh, nw) == (h, w):
            return np.ascontiguousarray(self._crop(rgb, offset, True))
        x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0        # [3, H, W]
        x = F.interpolate(x[:, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[:, 0]
        return self._crop(x, offset, False).clamp_(0.0, 1.0)            # [3, h, w]


def frame_to_float(frame) -> torch.Tensor:
    """One :class:`FrameResizer` output -> float ``[3, h, w]`` in [0, 1]."""
    if isinstance(frame, torch.Tensor):
        return frame
    return torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0


def frames_to_clip(frames: list, value_range=(0.0, 1.0)) -> torch.Tensor:
    """:class:`FrameResizer` outputs -> float clip ``[3, T, h, w]`` in ``value_range``.

    Computes ``x / 255 * (hi - lo) + lo`` like :func:`uint8_to_video`, but in one output buffer: at the loader's
    rates the extra full-size temporaries (and their page faults) cost as much as the resize.
    """
    lo, hi = check_value_range(value_range)
    if all(isinstance(f, np.ndarray) for f in frames):
        src = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # uint8 [3, T, h, w] (a view)
        clip = torch.empty(src.shape, dtype=torch.float32).copy_(src).div_(255.0)
    else:
        clip = torch.stack([frame_to_float(f) for f in frames], dim=1)
    if (lo, hi) != (0.0, 1.0):
        clip.mul_(hi - lo).add_(lo)
    return clip
