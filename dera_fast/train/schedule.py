"""Training length in epochs, as LARP's trainers specify it (``max_epoch``, ``optimizer.warmup_epoch``).

LARP's ``BaseTrainer`` derives its step counts from the data at run time: ``n_steps_per_epoch =
len(train_loader)`` (per-rank batches of a drop-last loader), ``max_steps = max_epoch * n_steps_per_epoch``,
``warmup_steps = warmup_epoch * n_steps_per_epoch``; the cosine schedule and the prior's scheduled-sampling ramp
(``0.3 * max_steps``) scale with ``max_steps``. Here ``epochs > 0`` derives ``steps`` and ``warmup_epochs > 0``
derives ``warmup_steps`` (each independently; 0 keeps the explicit step count) from the batch stream's
``steps_per_epoch``, which also drops the ragged tail: ``steps = ceil(epochs * steps_per_epoch)``, equal to LARP's
count for whole epochs.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("dera_fast.train")


def apply_epochs(cfg, steps_per_epoch: int, num_clips: int) -> dict[str, float]:
    """Set ``cfg.steps`` / ``cfg.warmup_steps`` from ``cfg.epochs`` / ``cfg.warmup_epochs`` (0 = keep the step
    count) and log the result; returns the schedule's numbers (empty when both are 0)."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if cfg.epochs <= 0 and cfg.warmup_epochs <= 0:
        return {}
    if cfg.epochs > 0:
        cfg.steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if cfg.warmup_epochs > 0:
        cfg.warmup_steps = math.ceil(cfg.warmup_epochs * steps_per_epoch)
    out = {"epochs": float(cfg.epochs), "warmup_epochs": float(cfg.warmup_epochs), "num_clips": num_clips,
           "steps_per_epoch": steps_per_epoch, "steps": cfg.steps, "warmup_steps": cfg.warmup_steps}
    log.info("schedule: %d steps/epoch (%d clips, global batch %d); %s; warm-up %s", steps_per_epoch, num_clips,
             cfg.batch_size, f"{cfg.epochs:g} epochs = {cfg.steps} steps" if cfg.epochs > 0 else f"{cfg.steps} steps",
             f"{cfg.warmup_epochs:g} epochs = {cfg.warmup_steps} steps" if cfg.warmup_epochs > 0 else
             f"{cfg.warmup_steps} steps")
    return out
