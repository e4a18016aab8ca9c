"""Pieces both trainers share: a resumable sharded batch stream, the JSONL metrics log, progress bars, autocast."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from .distributed import DistInfo, cleanup, mean_across_ranks, shard_indices


class BatchStream:
    """Endless per-rank batches over ``dataset``, epoch after epoch, resumable at any batch.

    Each epoch's order is a seeded function of (epoch, rank) (:func:`shard_indices`), and datasets draw their
    augmentation randomness from (seed, epoch, index), so ``(epoch, position)`` is the whole data state.
    """

    def __init__(self, dataset: Dataset, batch_size: int, info: DistInfo, *, seed: int = 0, num_workers: int = 0):
        if batch_size <= 0:
            raise ValueError(f"per-rank batch size must be positive, got {batch_size}")
        self.dataset, self.batch_size, self.info = dataset, batch_size, info
        self.seed, self.num_workers = seed, num_workers
        self.epoch, self.position = 0, 0
        self._iter = None

    def _batches(self) -> list[list[int]]:
        order = shard_indices(len(self.dataset), self.epoch, self.seed, self.info)
        if len(order) < self.batch_size:  # tiny datasets: repeat so that one full batch exists
            order = (order * -(-self.batch_size // len(order)))[: self.batch_size]
        n = len(order) // self.batch_size  # drop the ragged tail: every step sees a full batch
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]

    def _start_epoch(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        batches = self._batches()[self.position:]
        if self.num_workers > 0:
            self._iter = iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                         persistent_workers=False))
        else:
            self._iter = (default_collate([self.dataset[i] for i in b]) for b in batches)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._iter is None:
                self._start_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                self.epoch, self.position, self._iter = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch

    @property
    def steps_per_epoch(self) -> int:
        return len(self._batches())

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iter = int(state["epoch"]), int(state["position"]), None


class MetricsLog:
    """Append-only JSONL log (one object per logged step); only rank 0 writes."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict) -> None:
        if self.enabled:
            rec = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in values.items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v


def progress_bar(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar (rank 0 only; ``disable=None`` also turns it off on non-TTY output)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=None if enabled else True, dynamic_ncols=True,
                unit="step")


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CUDA when ``amp`` is "auto" or "bf16"; fp32 everywhere else ("off", or on CPU)."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
    if device.type == "cuda" and amp != "off":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_training(trainer_cls, cfg, out_dir, *, device: str = "auto", progress: bool = True,
                 resume: bool = False) -> dict[str, float]:
    """Build ``trainer_cls(cfg, out_dir, ...)``, record its config, optionally resume, train; safe under torchrun."""
    trainer = trainer_cls(cfg, out_dir, device=device, progress=progress)
    try:
        if trainer.info.is_main:
            trainer.out.mkdir(parents=True, exist_ok=True)
            (trainer.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if resume:
            trainer.resume()
        return trainer.train()
    finally:
        cleanup()


def run_steps(trainer, *, desc: str, rate_key: str, count, postfix: dict, on_log=None, after_step=None) -> dict:
    """The step loop both trainers share, from ``trainer.step`` to ``trainer.cfg.steps``.

    Every ``log_every`` steps the logs (plus ``rate_key``: ``count(batch)`` units per second over all ranks) are
    averaged across ranks, written to the JSONL log, shown on the bar (``postfix``: label -> (key, format)) and
    passed to ``on_log(step, values)``; checkpoints every ``ckpt_every`` steps and once at the end.
    Returns the last logged values plus ``train_seconds``.
    """
    cfg = trainer.cfg
    bar = progress_bar(cfg.steps, trainer.step, desc, trainer.progress)
    last: dict[str, float] = {}
    t0 = tic = time.perf_counter()
    done = 0
    try:
        while trainer.step < cfg.steps:
            batch = next(trainer.stream)
            logs = trainer.train_step(batch)
            done += count(batch) * trainer.info.world_size
            if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
                logs[rate_key] = done / max(time.perf_counter() - tic, 1e-9)
                done, tic = 0, time.perf_counter()
                last = mean_across_ranks(logs, trainer.info)
                trainer.metrics.write(trainer.step, last)
                bar.set_postfix({label: fmt.format(last[key]) for label, (key, fmt) in postfix.items()})
                if on_log is not None:
                    on_log(trainer.step, last)
            bar.update(1)
            if cfg.ckpt_every and trainer.step % cfg.ckpt_every == 0 and trainer.step < cfg.steps:
                trainer.save_checkpoint()
            if after_step is not None:
                after_step(batch)
    finally:
        bar.close()
    trainer.save_checkpoint()
    last["train_seconds"] = time.perf_counter() - t0
    return last
