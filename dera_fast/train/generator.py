"""AR generator trainer (SPEC.md §4.2) on token files written by ``python -m dera_fast tokenize``.

Class-conditional next-token training with class dropout (the null class, for classifier-free guidance; the
dropout itself lives in :meth:`ARGenerator.embed_cond`). AdamW with weight decay on Linear weights only,
warm-up + cosine. Under torchrun the model is sharded with FSDP2: ``fully_shard`` on every block, then on the
root (bf16 params / fp32 reductions on CUDA). Checkpoints gather full state dicts on rank 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._config import PresetConfig
from . import checkpoint as ckpt
from .distributed import DistInfo, init_distributed
from .loop import BatchStream, MetricsLog, autocast, run_steps
from .optim import EMA, decay_split, make_adam, schedule_mult, set_lr
from .tokens import load_tokens

log = logging.getLogger("dera_fast.train")


@dataclass(kw_only=True)
class GeneratorTrainConfig(PresetConfig):
    """A generator run; JSON-serialisable (``--config cfg.json`` holds these fields)."""
    _kind = "generator training"

    tokens: str = ""                      # token file from `tokenize` (required)
    model: str = "tiny"                   # GeneratorConfig preset; vocab, length and classes come from the file
    model_overrides: dict = field(default_factory=dict)
    class_dropout: float = 0.1
    batch_size: int = 64                  # global
    steps: int = 1000
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    min_lr_mult: float = 0.01
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    amp: str = "auto"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 0
    keep_last: int = 3

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("batch_size", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")



PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model="tiny", batch_size=32, steps=300, lr=3e-3, warmup_steps=20, weight_decay=0.0),
    # LARP UCF-101 (SPEC §4.2): llama-abs-LP, global batch 64, AdamW 6e-4 (0.9, 0.95), wd 0.05.
    "ucf-lp": dict(model="LP", batch_size=64, steps=447_000, warmup_steps=600),
}


class TokenDataset(Dataset):
    """Items ``{"ids": int64 [L], "label": int}`` from a token file."""

    def __init__(self, path: str | Path):
        self.tokens, self.labels, self.meta = load_tokens(path)
        if self.tokens.shape[0] == 0:
            raise ValueError(f"{path} holds no clips")

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", int(self.labels.max()) + 1 if len(self.labels) else 0))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"ids": self.tokens[i], "label": int(self.labels[i])}


class GeneratorTrainer:
    """Builds the AR generator for a token file and trains it (FSDP2 when launched with torchrun)."""

    def __init__(self, cfg: GeneratorTrainConfig, out_dir: str | Path, *, device: str = "auto",
                 progress: bool = True):
        from dera_fast.models.ar import ARGenerator, GeneratorConfig

        if not cfg.tokens:
            raise ValueError("tokens: give the token file written by `python -m dera_fast tokenize`")
        self.cfg, self.out = cfg, Path(out_dir)
        self.info: DistInfo = init_distributed(device)
        self.device = self.info.device
        if cfg.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {self.info.world_size}")
        self.data = TokenDataset(cfg.tokens)
        if self.data.num_classes <= 0:
            raise ValueError(f"{cfg.tokens} has no class labels; class-conditional training needs them")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        gcfg = GeneratorConfig.from_name(cfg.model, **{
            "vocab_size": int(self.data.meta["codebook_size"]), "max_seq_len": self.data.tokens.shape[1],
            "num_classes": self.data.num_classes, "class_dropout_prob": cfg.class_dropout, **cfg.model_overrides})
        self.model = ARGenerator(gcfg).to(self.device).train()
        self.fsdp = self.info.distributed
        if self.fsdp:
            self._shard()
        torch.manual_seed(cfg.seed + self.info.rank)
        self.opt = make_adam(decay_split(self.model, weight_decay=cfg.weight_decay), cfg.lr, cfg.betas, adamw=True)
        if cfg.ema_decay > 0 and self.fsdp and self.info.is_main:
            log.warning("ema_decay ignored: EMA weights are not kept for FSDP-sharded generators")
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 and not self.fsdp else None
        self.stream = BatchStream(self.data, cfg.batch_size // self.info.world_size, self.info, seed=cfg.seed)
        self.step = 0
        self.progress = progress and self.info.is_main
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.info.is_main)

    def _shard(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {}
        if self.device.type == "cuda" and self.cfg.amp != "off":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in self.model.blocks:
            fully_shard(block, **kw)
        fully_shard(self.model, **kw)

    def train_step(self, batch: dict) -> dict[str, float]:
        cfg = self.cfg
        ids = batch["ids"].to(self.device)
        labels = batch["label"].to(self.device)
        mult = schedule_mult(self.step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             min_lr_mult=cfg.min_lr_mult)
        set_lr(self.opt, cfg.lr, mult)
        # FSDP2 casts parameters itself; autocast is only needed for the unsharded model.
        with autocast(self.device, "off" if self.fsdp else cfg.amp):
            # NOTE: through __call__ (not ARGenerator.loss) so FSDP2's forward hooks unshard the root's params.
            logits = self.model(ids[:, :-1], class_labels=labels)          # [B, L, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {"loss": float(loss.detach()), "lr": cfg.lr * mult}

    def train(self, on_log=None) -> dict[str, float]:
        return run_steps(self, desc="train generator", rate_key="tokens_per_s", count=lambda b: b["ids"].numel(),
                         postfix={"loss": ("loss", "{:.3f}"), "tok_s": ("tokens_per_s", "{:.0f}")}, on_log=on_log)

    # ------------------------------------------------------------------ checkpoints
    def _full_states(self) -> tuple[dict, dict]:
        """(model state, optimiser state) as full, unsharded CPU tensors (collective under FSDP2)."""
        if not self.fsdp:
            return self.model.state_dict(), self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.opt, options=opts))

    def save_checkpoint(self) -> Path | None:
        model_sd, opt_sd = self._full_states()
        if not self.info.is_main:
            return None
        weights = {"model": model_sd}
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        state = {"optimizer": opt_sd, "data": self.stream.state_dict(), "rng": ckpt.rng_state(), "step": self.step}
        where = ckpt.save_checkpoint(self.out, self.step, weights=weights, config=self.cfg.to_dict(), state=state,
                                     keep_last=self.cfg.keep_last)
        self.export(self.out / "model", model_sd)
        return where

    def export(self, directory: Path, model_sd: dict) -> None:
        """Write a loadable ``ARGenerator.save_pretrained`` folder from a full state dict."""
        from dera_fast.models.ar import ARGenerator

        with torch.random.fork_rng(devices=[]):  # building a model draws init noise: keep the run's RNG intact
            plain = ARGenerator(self.model.config)
        plain.load_state_dict(self.ema.state_dict() if self.ema is not None else model_sd)
        plain.save_pretrained(directory)

    def resume(self, path: str | Path | None = None) -> bool:
        where = Path(path) if path else ckpt.latest_checkpoint(self.out)
        if where is None:
            return False
        step, weights, _, state = ckpt.load_checkpoint(where)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights["model"], options=opts)
            set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(weights["model"])
            self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(weights["ema"])
        self.stream.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        self.step = step
        return True
