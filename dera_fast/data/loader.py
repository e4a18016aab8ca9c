"""The trainers' data pipeline: :class:`BatchStream`, endless resumable per-rank batches fed by persistent
DataLoader workers."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..train.distributed import DistInfo, shard_indices


def default_num_workers() -> int:
    """``min(8, CPU cores per rank)``: the cores this process may run on, shared by the local ranks (torchrun's
    ``LOCAL_WORLD_SIZE``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)))


class _EpochItems(Dataset):
    """``dataset`` addressed by ``(epoch, index)`` keys: each worker sets its own copy's epoch, which a
    ``set_epoch`` call in the main process could not reach once the workers are persistent."""

    def __init__(self, dataset: Dataset):
        self.dataset, self.epoch = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if epoch != self.epoch and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            self.epoch = epoch
        return self.dataset[index]


class _EndlessBatches:
    """A batch sampler over every epoch from ``start = (epoch, position)`` on, without end: one DataLoader iterator
    runs the whole training and prefetches across epoch boundaries."""

    def __init__(self, stream: "BatchStream"):
        self.stream, self.start = stream, (0, 0)

    def __iter__(self):
        epoch, position = self.start
        while True:
            for batch in self.stream.batches(epoch)[position:]:
                yield [(epoch, i) for i in batch]
            epoch, position = epoch + 1, 0


class BatchStream:
    """Endless per-rank batches over ``dataset``, epoch after epoch, resumable at any batch.

    Each epoch's order is a seeded function of (epoch, rank) (:func:`shard_indices`), and datasets draw their
    augmentation randomness from (seed, epoch, index), so ``(epoch, position)`` is the whole data state: a run with
    workers, killed and resumed, sees the same batches as a run without workers.

    Args:
        dataset: items are dicts of tensors / numbers (``default_collate``); ``set_epoch(epoch)`` is called when
            it has one.
        batch_size: per-rank batch size.
        info: this rank (its device decides ``pin_memory`` and where batches land).
        seed: the order's seed.
        num_workers: DataLoader worker processes (0: load in this process; ``None``: :func:`default_num_workers`).
            Workers are persistent for the whole run.
        prefetch_factor: batches each worker loads ahead.

    On CUDA, batches come from pinned memory and are copied to ``info.device`` with ``non_blocking=True``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, info: DistInfo, *, seed: int = 0,
                 num_workers: int | None = 0, prefetch_factor: int = 4):
        if batch_size <= 0:
            raise ValueError(f"per-rank batch size must be positive, got {batch_size}")
        num_workers = default_num_workers() if num_workers is None else int(num_workers)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (or None for the default), got {num_workers}")
        if prefetch_factor <= 0:
            raise ValueError(f"prefetch_factor must be positive, got {prefetch_factor}")
        self.dataset, self.batch_size, self.info = dataset, batch_size, info
        self.seed, self.num_workers, self.prefetch_factor = seed, num_workers, prefetch_factor
        self.epoch, self.position = 0, 0
        self._cuda = info.device.type == "cuda"
        self._sampler = _EndlessBatches(self)
        self._items = _EpochItems(dataset)
        self._loader = None
        if num_workers > 0:
            # NOTE: an own generator, so creating the iterator (its workers' base seed) never draws from the global
            # RNG: a resumed run's model RNG stream stays the same as the original's.
            self._loader = DataLoader(self._items, batch_sampler=self._sampler, num_workers=num_workers,
                                      persistent_workers=True, pin_memory=self._cuda, prefetch_factor=prefetch_factor,
                                      generator=torch.Generator().manual_seed(seed))
        self._iter = None
        self._epochs: dict[int, list[list[int]]] = {}  # the last two epochs' batches (the sampler runs ahead)
        self.steps_per_epoch = len(self.batches(0))  # the same in every epoch: n and the world size are fixed

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (dataset indices) of ``epoch``; the ragged tail is dropped."""
        if epoch not in self._epochs:
            order = shard_indices(len(self.dataset), epoch, self.seed, self.info)
            if len(order) < self.batch_size:  # tiny datasets: repeat so that one full batch exists
                order = (order * -(-self.batch_size // len(order)))[: self.batch_size]
            n = len(order) // self.batch_size  # drop the ragged tail: every step sees a full batch
            self._epochs = {k: v for k, v in self._epochs.items() if k == epoch - 1}
            self._epochs[epoch] = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]
        return self._epochs[epoch]

    def _start(self) -> None:
        self._sampler.start = (self.epoch, self.position)
        if self._loader is not None:
            self._iter = iter(self._loader)
        else:
            self._iter = (default_collate([self._items[k] for k in keys]) for keys in self._sampler)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self._cuda:
            batch = {k: v.to(self.info.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iter = int(state["epoch"]), int(state["position"]), None
