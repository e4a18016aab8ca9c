"""Which clips an evaluation sees, in which batches, on which rank.

* Clips come from ``VideoFolderDataset(source, frames, size, train=False, value_range=(0, 1), seed=..., root=...)``:
  one clip per video, its start drawn from ``(seed, video index)``. When more clips than videos are asked for
  (gFVD's 10,000 real clips from a smaller set), pass ``p`` over the videos uses a dataset seeded with
  :func:`derive_seed` ``(seed, p)``, so each repeat of a video is a fresh random clip.
* The evaluation order is cut into **global batches** of ``batch_size`` consecutive clips; rank ``r`` of ``W`` takes
  global batches ``r, r + W, ...``. A clip therefore meets the same batch-mates in every world size, so per-clip
  outputs (and the generator's per-batch sampling seeds) do not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def single_process(device):
    """The ``DistInfo`` of a plain (non-torchrun) run on ``device``."""
    from dera_fast.train.distributed import DistInfo

    return DistInfo(0, 1, 0, torch.device(device))


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def order_digest(order) -> str:
    """sha256 of the evaluation order (identifies the exact clip set in cache keys)."""
    return hashlib.sha256(json.dumps(order, separators=(",", ":")).encode()).hexdigest()


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence): independent streams for distinct tuples."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


def select_clips(num_videos: int, num: int | None, seed: int, *, repeat: bool) -> list[tuple[int, int]]:
    """The evaluation order as ``(pass, video index)`` pairs.

    ``num=None`` (or ``num == num_videos`` without ``repeat``): every video once, in dataset order. ``num`` below
    the number of videos: a seeded random subset, in dataset order. ``repeat=True``: ``num`` clips from seeded
    permutations of all videos, one permutation per pass (generator evaluation: labels follow the data's class
    frequencies, and batches mix classes).
    """
    if num_videos <= 0:
        raise ValueError("the dataset has no videos")
    if not repeat:
        if num is None or num >= num_videos:
            if num is not None and num > num_videos:
                raise ValueError(f"--num-videos {num} is more than the {num_videos} videos of the dataset")
            return [(0, i) for i in range(num_videos)]
        g = torch.Generator().manual_seed(derive_seed(seed, 0))
        return [(0, i) for i in sorted(torch.randperm(num_videos, generator=g)[:num].tolist())]
    out: list[tuple[int, int]] = []
    p = 0
    while len(out) < num:
        g = torch.Generator().manual_seed(derive_seed(seed, p))
        out += [(p, i) for i in torch.randperm(num_videos, generator=g).tolist()]
        p += 1
    return out[:num]


def rank_batches(num_items: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, list[int]]]:
    """This rank's ``(global batch number, positions)``: global batches ``rank, rank + world_size, ...``."""
    starts = range(0, num_items, batch_size)
    return [(k, list(range(s, min(s + batch_size, num_items)))) for k, s in enumerate(starts)
            if k % world_size == rank]


class ClipList(Dataset):
    """Position ``j`` of the evaluation order -> the dataset item of clip ``order[j]`` (see :func:`select_clips`)."""

    def __init__(self, make_dataset, order: list[tuple[int, int]], seed: int):
        self.order = order
        self.seed = seed
        self._make = make_dataset
        self._datasets: dict[int, Dataset] = {}

    def dataset(self, p: int) -> Dataset:
        if p not in self._datasets:
            self._datasets[p] = self._make(self.seed if p == 0 else derive_seed(self.seed, p, 1))
        return self._datasets[p]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> dict:
        p, i = self.order[j]
        item = self.dataset(p)[i]
        return {"video": item["video"], "label": int(item["label"]), "position": j}


def rank_loader(clips: ClipList, batches: list[tuple[int, list[int]]], workers: int, pin_memory: bool):
    """Batches of this rank in global-batch order (``batch_sampler``: the global batch boundaries are kept)."""
    return DataLoader(clips, batch_sampler=[pos for _, pos in batches], num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False)
