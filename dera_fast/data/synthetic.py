"""``SyntheticClips``: real photographs with known camera motion, needing no download.

The photographs are files inside the scikit-image and scikit-learn wheels (``skimage/data/*.png|jpg``,
``sklearn/datasets/images/*.jpg``, the 8x8 handwritten digits in ``sklearn/datasets/data/digits.csv.gz``). They are
read straight from the installed packages' folders; nothing is fetched (``skimage.data`` functions that download
through pooch are never called). Install them with ``pip install 'dera-fast[data]'``.

Motions (each clip is one image x one motion; class = motion x image):

* ``pan``: the view translates at constant velocity in a random direction;
* ``zoom``: the view scales exponentially in or out about the centre;
* ``rotate``: the view rotates at a constant angular speed;
* ``sprites``: a static view with 2 handwritten digits moving at constant velocity, bouncing off the borders.

Camera motion is rendered with ``F.affine_grid`` + ``F.grid_sample`` (bilinear) from a ``2 * size`` square crop
of the photo, so every frame is a smooth resample of real pixels.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._validation import check_value_range
from .datasets import item_generator
from .io import DEFAULT_RANGE, MissingDependencyError, resize_video, write_video

# name -> (package, path inside the package)
IMAGES = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "grass": ("skimage", "data/grass.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "china")
MOTIONS = ("pan", "zoom", "rotate", "sprites")
_PACKAGE_FOR = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
_VIEW = 0.5  # half-width of the base view in source coordinates: the view sees half the source crop


def package_file(package: str, rel: str) -> Path:
    """Path of a data file inside an installed package, without importing it; clear error when missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"SyntheticClips needs {_PACKAGE_FOR.get(package, package)} for its bundled photographs: "
            "pip install 'dera-fast[data]'")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package} package")
    return path


@functools.lru_cache(maxsize=32)
def load_image(name: str, side: int) -> torch.Tensor:
    """A bundled photograph as float ``[3, side, side]`` in [0, 1] (short-side resize + centre crop)."""
    if name not in IMAGES:
        raise ValueError(f"unknown image {name!r}; available: {', '.join(IMAGES)}")
    from PIL import Image  # a dependency of scikit-image

    with Image.open(package_file(*IMAGES[name])) as im:
        arr = np.asarray(im.convert("RGB"))
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # [3, H, W]
    return resize_video(img, side).clamp_(0, 1)


@functools.lru_cache(maxsize=1)
def load_digits() -> torch.Tensor:
    """The 1,797 scikit-learn handwritten digits as float ``[1797, 8, 8]`` in [0, 1]."""
    with gzip.open(package_file("sklearn", "datasets/data/digits.csv.gz"), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return torch.from_numpy(data[:, :64] / 16.0).reshape(-1, 8, 8)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    """[T] angles -> [T, 2, 2] rotation matrices."""
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def camera_thetas(motion: str, frames: int, g: torch.Generator) -> torch.Tensor:
    """Affine matrices ``[T, 2, 3]`` mapping output coordinates to source coordinates (``F.affine_grid``).

    The view always stays inside the source square ([-1, 1]^2), so no border padding shows.
    """
    t = torch.arange(frames, dtype=torch.float32)
    u = torch.rand(4, generator=g)
    eye = torch.eye(2).expand(frames, 2, 2)
    if motion == "pan":
        # Travel from a random point to its mirror image through the centre, at most 2*(1-_VIEW) in total.
        direction = u[0] * 2 * math.pi
        reach = (1 - _VIEW) * (0.5 + 0.5 * u[1])
        end = reach * torch.stack([direction.cos(), direction.sin()])
        frac = t / max(frames - 1, 1) * 2 - 1  # [-1, 1]
        return torch.cat([_VIEW * eye, (frac[:, None] * end)[:, :, None]], dim=2)
    if motion == "zoom":
        factor = 1.4 + 0.6 * u[1]  # total zoom 1.4x..2x, in or out (more would upsample the source > 2x)
        sign = 1.0 if u[0] < 0.5 else -1.0
        scale = _VIEW * factor ** (sign * (t / max(frames - 1, 1) - 0.5)) / math.sqrt(factor)
        return torch.cat([scale[:, None, None] * eye, torch.zeros(frames, 2, 1)], dim=2)
    if motion == "rotate":
        speed = (0.5 + u[1]) * math.pi / max(frames, 1) * (1.0 if u[0] < 0.5 else -1.0)  # 0.5..1.5 half-turns
        angle = u[2] * 2 * math.pi + speed * t
        # NOTE: a rotated view's corners reach sqrt(2) * _VIEW = 0.71 < 1: always inside the source square.
        return torch.cat([_VIEW * _rotation(angle), torch.zeros(frames, 2, 1)], dim=2)
    if motion == "sprites":
        return torch.cat([_VIEW * eye, ((u[:2] * 2 - 1) * (1 - _VIEW))[None, :, None].expand(frames, 2, 1)], dim=2)
    raise ValueError(f"unknown motion {motion!r}; available: {', '.join(MOTIONS)}")


def _bounce(p0: torch.Tensor, v: torch.Tensor, t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Positions ``[T, 2]`` of a point moving at velocity ``v`` inside ``[lo, hi]`` with elastic reflections."""
    span = hi - lo
    x = (p0 - lo)[None] + v[None] * t[:, None]
    x = torch.remainder(x, 2 * span)
    return lo + torch.where(x > span, 2 * span - x, x)


def render_sprites(background: torch.Tensor, frames: int, size: int, g: torch.Generator,
                   num_sprites: int = 2) -> torch.Tensor:
    """Composite ``num_sprites`` moving digits over ``background [T, 3, size, size]`` (values in [0, 1])."""
    digits = load_digits()
    t = torch.arange(frames, dtype=torch.float32)
    half = 0.25  # sprite half-width in normalized coordinates: a quarter of the frame side
    out = background
    for _ in range(num_sprites):
        digit = digits[int(torch.randint(0, len(digits), (1,), generator=g))]
        color = torch.rand(3, generator=g) * 0.5 + (0.5 if bool(torch.rand((), generator=g) < 0.5) else 0.0)
        p0 = torch.rand(2, generator=g) * 2 * (1 - half) - (1 - half)
        angle = torch.rand((), generator=g) * 2 * math.pi
        v = (0.6 + 0.6 * torch.rand((), generator=g)) * 4 / max(frames, 1) * torch.stack([angle.cos(), angle.sin()])
        centre = _bounce(p0, v, t, -(1 - half), 1 - half)  # [T, 2] (x, y)
        # sprite coordinate = (output coordinate - centre) / half
        theta = torch.cat([torch.eye(2).expand(frames, 2, 2) / half, (-centre / half)[:, :, None]], dim=2)
        grid = F.affine_grid(theta, [frames, 1, size, size], align_corners=False)
        alpha = F.grid_sample(digit.expand(frames, 1, 8, 8), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)  # [T, 1, size, size]
        out = out * (1 - alpha) + color.view(1, 3, 1, 1) * alpha
    return out


class SyntheticClips(Dataset):
    """Clips of real photographs under known motion; items like :class:`VideoFolderDataset`.

    Args:
        num_clips: dataset length (default: 8 per class).
        frames, size: clip shape ``[3, frames, size, size]`` (the ``tiny`` preset uses 8 x 32 x 32).
        images: names from :data:`IMAGES` (default :data:`DEFAULT_IMAGES`).
        motions: subset of :data:`MOTIONS` (default all four).
        value_range: pixel range of ``video`` (default [-1, 1]).
        seed: item ``i`` depends only on ``(seed, i)``: the same in every worker, process and run.

    :attr:`classes` holds the sorted ``"motion-image"`` names and ``label`` indexes it (the same labels
    :class:`VideoFolderDataset` derives from :meth:`export`'s CSV). Item ``i`` has class ``i % num_classes``, so
    any prefix of the dataset is class-balanced.
    """

    def __init__(self, num_clips: int | None = None, frames: int = 16, size: int = 128, *, images=DEFAULT_IMAGES,
                 motions=MOTIONS, value_range=DEFAULT_RANGE, seed: int = 0):
        if frames <= 0 or size <= 0:
            raise ValueError(f"frames and size must be positive, got frames={frames}, size={size}")
        images, motions = tuple(images), tuple(motions)
        for m in motions:
            if m not in MOTIONS:
                raise ValueError(f"unknown motion {m!r}; available: {', '.join(MOTIONS)}")
        for name in images:
            if name not in IMAGES:
                raise ValueError(f"unknown image {name!r}; available: {', '.join(IMAGES)}")
        if not images or not motions:
            raise ValueError("images and motions must not be empty")
        for name in images:  # fail now, not in a DataLoader worker, when a package is missing
            package_file(*IMAGES[name])
        if "sprites" in motions:
            package_file("sklearn", "datasets/data/digits.csv.gz")
        self.images, self.motions = images, motions
        self.classes = sorted(f"{m}-{i}" for m in motions for i in images)
        self.num_clips = len(self.classes) * 8 if num_clips is None else int(num_clips)
        if self.num_clips <= 0:
            raise ValueError(f"num_clips must be positive, got {num_clips}")
        self.frames, self.size, self.seed = frames, size, seed
        self.value_range = check_value_range(value_range)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_clips

    def render(self, label: int, g: torch.Generator) -> torch.Tensor:
        """One clip of class ``label`` as float ``[3, T, size, size]`` in [0, 1], randomness from ``g``."""
        motion, name = self.classes[label].split("-")
        image = load_image(name, 2 * self.size)  # [3, 2S, 2S]
        theta = camera_thetas(motion, self.frames, g)  # [T, 2, 3]
        grid = F.affine_grid(theta, [self.frames, 3, self.size, self.size], align_corners=False)
        frames = F.grid_sample(image.expand(self.frames, -1, -1, -1), grid, mode="bilinear",
                               padding_mode="reflection", align_corners=False)  # [T, 3, S, S]
        if motion == "sprites":
            frames = render_sprites(frames, self.frames, self.size, g)
        return frames.clamp_(0, 1).permute(1, 0, 2, 3).contiguous()  # [3, T, S, S]

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        index = index % len(self)
        label = index % self.num_classes
        clip = self.render(label, item_generator(self.seed, 0, index))
        lo, hi = self.value_range
        return {"video": clip * (hi - lo) + lo, "label": label, "index": index}

    def export(self, folder, *, fps: float = 8.0, suffix: str = ".mp4", limit: int | None = None) -> Path:
        """Write the clips as video files plus a LARP-format ``metadata.csv`` (``id,path,action,label``).

        The folder then loads with ``VideoFolderDataset(folder / "metadata.csv")``. ``suffix`` ``.mp4`` needs PyAV;
        ``.gif`` does not. Returns the CSV path.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["id,path,action,label"]
        for i in range(len(self) if limit is None else min(limit, len(self))):
            item = self[i]
            action = self.classes[item["label"]]
            name = f"{action}_{i:05d}{suffix}"
            write_video(folder / name, item["video"], fps, value_range=self.value_range)
            rows.append(f"{i},{name},{action},{item['label']}")
        csv_path = folder / "metadata.csv"
        csv_path.write_text("\n".join(rows) + "\n")
        return csv_path
