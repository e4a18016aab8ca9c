"""Video datasets with LARP's training protocol (SPEC.md §2.1).

Each item is ``{"video": float [3, T, H, W] in value_range, "label": int (-1 when unlabelled), "index": int}``,
so ``torch.utils.data.default_collate`` gives ``video [B, 3, T, H, W]`` and ``label [B]``.

Protocol: ``frames`` consecutive frames from a uniformly random start (native frame rate unless ``fps`` is set),
resize of the short side to ``size``, centre crop ``size x size``, random horizontal flip (training only); clips
shorter than ``frames`` are padded by repeating their last frame. Randomness comes from ``(seed, epoch, index)``
only, so an item is the same in every worker, process and resumed run; call :meth:`set_epoch` once per epoch.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from .._validation import check_value_range
from .decode import VIDEO_SUFFIXES, open_video
from .index import VideoIndex, default_index_path
from .io import _frame_indices, _step, read_clip
from .transforms import DEFAULT_RANGE, FrameResizer, repeat_last_frame

_UCF_NAME = re.compile(r"^v_([^_]+)_g\d+_c\d+$")  # UCF-101 file names: v_<Action>_gXX_cXX


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator seeded from ``(seed, epoch, index)``; independent streams for distinct triples."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))




def _action_from_path(path: Path, root: Path) -> str | None:
    """UCF-style class name: ``v_<Action>_g.._c..`` file names, else the first folder under ``root``."""
    m = _UCF_NAME.match(path.stem)
    if m:
        return m.group(1)
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else None


def read_larp_csv(csv_path, root=None) -> list[tuple[Path, str | None]]:
    """Parse a LARP metadata CSV (header ``id,path,action,label``; only ``path`` is required).

    Relative paths are resolved against ``root`` (default: the CSV's folder). Returns ``[(path, action)]``;
    ``action`` is ``None`` when the CSV has no ``action`` column (or it is empty); a ``label`` column without
    ``action`` is used as the class name.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"dataset CSV not found: {csv_path}")
    base = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ValueError(f"{csv_path}: expected a header with a 'path' column (LARP format id,path,action,label), "
                             f"got {fields}")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row.get("path"):
                raise ValueError(f"{csv_path}:{line}: empty 'path'")
            p = Path(row["path"])
            action = row.get("action") or row.get("label") or None
            rows.append((p if p.is_absolute() else base / p, action))
    if not rows:
        raise ValueError(f"{csv_path}: no rows")
    return rows


class VideoFolderDataset(Dataset):
    """Clips from a folder of videos (searched recursively) or a LARP-format CSV.

    Args:
        source: a folder, or a ``.csv`` file with header ``id,path,action,label`` (SPEC.md §2.1).
        frames: clip length T (LARP: 16).
        size: output height = width (short-side resize, then centre crop; LARP: 128).
        train: random horizontal flip when True. The start frame is random in both modes (LARP's rFVD protocol
            samples a random start too); ``random_start=False`` always starts at frame 0.
        value_range: pixel range of ``video``: ``(-1, 1)`` (default, the public API) or ``(0, 1)`` for LARP models.
        seed: base seed; items depend only on ``(seed, epoch, index)``.
        fps: resample to this frame rate before taking the clip (``None``: native rate, as LARP).
        root: base folder for relative CSV paths (default: the CSV's folder).
        suffixes: file types picked up in folder mode.
        resize: ``"fast"`` (resize in the decoder; the default for ``train=True``) or ``"exact"`` (the evaluation
            protocol's torch bilinear with antialiasing; the default for ``train=False``).
        index: ``True``: frame counts and timestamps of every file from a :class:`VideoIndex` cached beside the
            CSV / inside the folder (built once, in parallel); a path: cache it there; ``False``: probe each item
            when it is read (no upfront pass; for one-pass uses such as tokenizing).
        index_workers: threads that build the index.
        progress: progress bar while indexing (None: the package setting, ``dera_fast.set_progress_bar_config``).

    Classes are the sorted distinct action names (CSV ``action`` column; in folder mode the UCF ``v_<Action>_``
    file name or the first sub-folder). ``label`` is the index into :attr:`classes`, or -1 without classes.
    Each item opens its file once: the frame count comes from the index (or the same container), and the clip is
    read by a keyframe seek (``decode.py``).
    """

    def __init__(self, source, frames: int = 16, size: int = 128, *, train: bool = True,
                 value_range=DEFAULT_RANGE, seed: int = 0, fps: float | None = None, root=None,
                 random_start: bool = True, suffixes=VIDEO_SUFFIXES, resize: str | None = None, index=True,
                 index_workers: int | None = None, progress: bool | None = None):
        if frames <= 0 or size <= 0:
            raise ValueError(f"frames and size must be positive, got frames={frames}, size={size}")
        self.value_range = check_value_range(value_range)
        source = Path(source)
        if source.suffix.lower() == ".csv":
            entries = read_larp_csv(source, root)
        elif source.is_dir():
            files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not files:
                raise ValueError(f"no video files ({', '.join(suffixes)}) under {source}")
            entries = [(p, _action_from_path(p, source)) for p in files]
        elif not source.exists():
            raise FileNotFoundError(f"dataset source not found: {source}")
        else:
            raise ValueError(f"dataset source must be a folder or a .csv file, got {source}")
        self.paths = [p for p, _ in entries]
        actions = [a for _, a in entries]
        self.classes = sorted({a for a in actions if a is not None})
        lookup = {a: i for i, a in enumerate(self.classes)}
        self.labels = [lookup[a] if a is not None else -1 for a in actions]
        self.frames, self.size, self.train, self.seed, self.fps = frames, size, train, seed, fps
        self.random_start = random_start
        self.resizer = FrameResizer(size, resize or ("fast" if train else "exact"))
        self.epoch = 0
        self.index = None
        if index is not False:
            cache = default_index_path(source) if index is True else Path(index)
            self.index = VideoIndex(self.paths, cache=cache, workers=index_workers, progress=progress)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream for this epoch (call before iterating, like DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _length(self, num_src: int, src_fps: float) -> int:
        """Number of frames at the requested rate."""
        return len(_frame_indices(_step(src_fps, self.fps), 0, None, num_src))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        index = index % len(self)
        g = item_generator(self.seed, self.epoch, index)
        info = self.index[index] if self.index is not None else None
        # NOTE: one decoder thread inside DataLoader workers: the workers already occupy the cores.
        threads = 1 if get_worker_info() is not None else 0
        with open_video(self.paths[index], threads=threads, timeline=info.timeline if info else None) as source:
            start = 0
            if self.random_start:
                n = self._length(*((info.num_frames, info.fps) if info else (source.num_frames(), source.fps)))
                start = int(torch.randint(0, max(n - self.frames, 0) + 1, (1,), generator=g))
            clip = read_clip(source, self.frames, self.fps, start, self.resizer, self.value_range)  # [3, T, S, S]
        clip = repeat_last_frame(clip, self.frames)  # [3, frames, size, size]
        flip = bool(torch.rand((), generator=g) < 0.5)  # drawn in both modes so streams match train/eval
        if self.train and flip:
            clip = clip.flip(-1)
        return {"video": clip.contiguous(), "label": self.labels[index], "index": index}
