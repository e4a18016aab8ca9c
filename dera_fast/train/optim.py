"""Optimisers, the warm-up + cosine schedule with per-group multipliers, and EMA weights.

LARP's released trainer sets *every* param group to ``base_lr * schedule(step)`` on each step
(``BaseTrainer.apply_lr_multiplier``), so the AR prior's x50 multiplier survives only step 0 (SPEC.md §2.5).
Here each param group carries its own ``lr_mult`` and the schedule sets ``lr = base_lr * lr_mult * schedule(step)``,
so a multiplier persists for the whole run.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


def param_groups(named: Iterable[tuple[str, Iterable[nn.Parameter], float]], *,
                 weight_decay: float = 0.0) -> list[dict]:
    """Build optimiser param groups from ``(name, params, lr_mult)`` triples, skipping frozen or empty groups."""
    groups = []
    for name, params, mult in named:
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "name": name, "lr_mult": float(mult), "weight_decay": weight_decay})
    return groups


def decay_split(module: nn.Module, lr_mult: float = 1.0, *, weight_decay: float = 0.0,
                prefix: str = "") -> list[dict]:
    """minGPT-style split: weight decay on ``nn.Linear`` weights only; biases, norms, embeddings get none."""
    decay, no_decay = [], []
    linear_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    for p in module.parameters():
        if p.requires_grad:
            (decay if id(p) in linear_weights else no_decay).append(p)
    out = [{"params": decay, "name": f"{prefix}decay", "lr_mult": lr_mult, "weight_decay": weight_decay},
           {"params": no_decay, "name": f"{prefix}no_decay", "lr_mult": lr_mult, "weight_decay": 0.0}]
    return [g for g in out if g["params"]]


def make_adam(groups: list[dict], lr: float, betas: tuple[float, float] = (0.5, 0.9), *,
              adamw: bool = False) -> torch.optim.Optimizer:
    """Adam (LARP tokenizer and discriminator: betas (0.5, 0.9)) or AdamW (generator) over tagged groups.

    ``lr`` is the base rate; :func:`set_lr` scales it by each group's ``lr_mult`` and the schedule.
    """
    for g in groups:
        g.setdefault("lr_mult", 1.0)
        g["lr"] = lr * g["lr_mult"]
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    return cls(groups, lr=lr, betas=betas)


def schedule_mult(step: int, *, total_steps: int, warmup_steps: int, min_lr_mult: float = 0.01) -> float:
    """LARP's per-step schedule: linear warm-up from ``min_lr_mult`` to 1, then cosine down to ``min_lr_mult``."""
    if warmup_steps > 0 and step <= warmup_steps:
        return min_lr_mult + (1.0 - min_lr_mult) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_lr_mult + (1.0 - min_lr_mult) * 0.5 * (math.cos(math.pi * progress) + 1.0)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, mult: float) -> None:
    """``lr = base_lr * group["lr_mult"] * mult`` for every group (the multiplier is never overwritten)."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_mult", 1.0) * mult


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers, kept in fp32.

    ``shadow = decay * shadow + (1 - decay) * param`` after every optimiser step.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        state = module.state_dict()
        keys = list(self.shadow)
        # NOTE: one fused foreach lerp instead of a Python loop of small kernels.
        torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].detach().float() for k in keys],
                             1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s floating-point weights with the EMA weights."""
        state = module.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)
