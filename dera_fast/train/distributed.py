"""``torch.distributed`` plumbing for the trainers: process group setup, device choice, data sharding.

Launch plainly (one process) or with ``torchrun --standalone --nproc_per_node=N -m dera_fast train ...``.
The backend is nccl when the process drives a CUDA device, else gloo (ECOSYSTEM.md §5).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA (this rank's GPU) when available, else CPU."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but this PyTorch sees no CUDA device")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank (a picklable value such as a path; the identity without torchrun)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged scalars over ranks (one all-reduce for the whole dict)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return dict(zip(keys, (t / info.world_size).tolist()))


def shard_indices(n: int, epoch: int, seed: int, info: DistInfo, shuffle: bool = True) -> list[int]:
    """This rank's sample order for one epoch: a seeded permutation, cut to equal length, strided by rank.

    The order is a pure function of (n, epoch, seed, rank, world size), so a resumed run sees the same batches.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    per_rank = n // info.world_size if n >= info.world_size else 1
    order = (order * info.world_size)[: per_rank * info.world_size]  # repeat tiny datasets so each rank gets one
    return order[info.rank::info.world_size]
