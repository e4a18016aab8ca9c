"""AR generator trainer (SPEC.md §4.2): class-conditional or frame prediction, as LARP's AR trainers run them.

Two data paths:

* **videos, tokenized on the fly** (``data`` + ``tokenizer``; LARP's ``larp_ar_trainer`` / ``larp_ar_fp_trainer``):
  every step draws a random ``frames_per_clip``-frame window of each video with a random horizontal flip
  (:class:`dera_fast.data.VideoFolderDataset`, a folder or a LARP CSV), and the frozen tokenizer (eval mode:
  deterministic argmax VQ) encodes the batch under ``no_grad`` on the training device. Frame prediction encodes,
  in the same batch, the context clip: the first ``context_frames`` frames padded to full length by repeating the
  last one (:func:`dera_fast.data.repeat_last_frame`, LARP's ``repeat_to_m_frames``); the model then sees
  ``[context tokens ; SEP ; clip tokens]``. Class labels come from sub-folder names / UCF file names or the CSV.
* **pre-tokenized clips** (``tokens``, from ``python -m dera_fast tokenize``): the fast path, class-conditional only.

AdamW with weight decay on Linear weights only (minGPT split), warm-up + cosine; ``epochs`` / ``warmup_epochs``
derive the step counts from the data at run time (:mod:`dera_fast.train.schedule`). Class dropout (the null class,
for classifier-free guidance) lives in :meth:`ARGenerator.embed_cond`. Under torchrun the model is sharded with
FSDP2: ``fully_shard`` on every block, then on the root (bf16 params / fp32 reductions on CUDA). Checkpoints
gather full state dicts on rank 0.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dera_fast.models.pretrained import check_state_dict

from .._config import PresetConfig
from . import checkpoint as ckpt
from .distributed import DistInfo, init_distributed
from .loop import Trainer, autocast, run_steps
from .optim import EMA, decay_split, make_adam, schedule_mult, set_lr
from .tokens import load_tokens

log = logging.getLogger("dera_fast.train")

TASKS = ("class", "frame-prediction")


@dataclass(kw_only=True)
class GeneratorTrainConfig(PresetConfig):
    """A generator run; JSON-serialisable (``--config cfg.json`` holds these fields)."""
    _kind = "generator training"
    _positive = ("batch_size", "lr", "log_every", "context_frames")
    _non_negative = ("class_dropout", "weight_decay", "warmup_steps", "warmup_epochs", "epochs", "min_lr_mult",
                     "grad_clip", "ema_decay", "ckpt_every", "ckpt_minutes", "keep_last")

    task: str = "class"                   # "class" (class-conditional) | "frame-prediction" (LARP_AR_FP)
    data: str = ""                        # a folder of videos or a LARP CSV, tokenized on the fly by `tokenizer`
    tokenizer: str = ""                   # frozen tokenizer folder (save_pretrained) for `data`
    tokens: str = ""                      # or: a token file from `tokenize` (class task only; the fast path)
    context_frames: int = 5               # frame prediction: frames given as context (LARP: 5 of 16)
    model: str = "tiny"                   # GeneratorConfig preset; vocab, length and classes come from the data
    model_overrides: dict = field(default_factory=dict)
    class_dropout: float = 0.1
    batch_size: int = 64                  # global
    steps: int = 1000
    epochs: float = 0.0                   # > 0: steps = epochs x steps per epoch, at run time (LARP's max_epoch)
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    warmup_epochs: float = 0.0            # > 0: warmup_steps derived the same way (LARP's warmup_epoch)
    min_lr_mult: float = 0.01
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    amp: str = "auto"
    seed: int = 0
    num_workers: int | None = 0           # data-loading processes (None: dera_fast.data.loader's default)
    log_every: int = 10
    ckpt_every: int = 1000                # checkpoint every N steps (0: off) ...
    ckpt_minutes: float = 30.0            # ... and every N minutes of wall time (0: off); always at the end
    keep_last: int = 3                    # checkpoints kept (0: all)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.epochs < 0 or self.warmup_epochs < 0 or self.warmup_steps < 0:
            raise ValueError("epochs, warmup_epochs and warmup_steps must be >= 0")
        for name in ("batch_size",) + (() if self.epochs > 0 else ("steps",)):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context_frames <= 0:
            raise ValueError(f"context_frames must be positive, got {self.context_frames}")

    @classmethod
    def presets(cls) -> dict[str, dict[str, Any]]:
        return PRESETS  # the table below


# LARP's AR runs (scripts/train_larp_ar*_reproduce.sh over cfgs/larp_ar*.yaml): AdamW lr 6e-4, betas (0.9, 0.95),
# weight decay 0.05 on Linear weights, cosine to 0.01 x lr, global batch 64, bf16 AMP, no clipping, no EMA.
_LARP_AR = dict(batch_size=64, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.05, min_lr_mult=0.01)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model="tiny", batch_size=32, steps=300, lr=3e-3, warmup_steps=20, weight_decay=0.0, ckpt_every=100),
    # LARP UCF-101 class-conditional (hywang66/LARP-L-long-AR): llama-abs-LP, 3000 epochs, 4 warm-up
    "ucf-lp": dict(_LARP_AR, model="LP", epochs=3000, warmup_epochs=4),
    # LARP K600 frame prediction (hywang66/LARP-L-long-AR-FP): llama-abs-LP, 75 epochs, 1 warm-up
    "k600-fp-lp": dict(_LARP_AR, task="frame-prediction", model="LP", epochs=75, warmup_epochs=1),
    # DeRA ("following LARP", a 343M LLaMA-style generator): llama-abs-L on LARP's recipes
    "dera-ucf": dict(_LARP_AR, model="L", epochs=3000, warmup_epochs=4),
    "dera-k600-fp": dict(_LARP_AR, task="frame-prediction", model="L", epochs=75, warmup_epochs=1),
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


def load_frozen_tokenizer(path: str | os.PathLike, device):
    """A LARP or DeRA tokenizer (``save_pretrained`` folder or self-describing .safetensors), eval mode
    (deterministic VQ), frozen, on ``device``."""
    from dera_fast.models.pretrained import TOKENIZER_TYPES, load_model

    try:
        return load_model(path, device=device, kinds=TOKENIZER_TYPES).requires_grad_(False)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"tokenizer {path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"tokenizer {path}: {e}") from None


class GeneratorTrainer(Trainer):
    """Builds the AR generator for its data and trains it (FSDP2 when launched with torchrun)."""

    def __init__(self, cfg: GeneratorTrainConfig, out_dir: str | Path, *, device: str = "auto",
                 progress: bool | None = None):
        from dera_fast.models.ar import ARGenerator, GeneratorConfig

        self.cfg, self.out = cfg, Path(out_dir)
        fp = cfg.task == "frame-prediction"
        if bool(cfg.tokens) == bool(cfg.data):
            raise ValueError("give either data (videos, with tokenizer) or tokens (a token file from `tokenize`)")
        if cfg.data and not cfg.tokenizer:
            raise ValueError("data: videos are tokenized on the fly, so give the tokenizer folder (--tokenizer)")
        if fp and cfg.tokens:
            raise ValueError("task frame-prediction: the context clips are tokenized on the fly; give data "
                             "(--data VIDEOS) and tokenizer (--tokenizer TOK) instead of a token file")
        self.info: DistInfo = init_distributed(device)
        self.device = self.info.device
        if cfg.batch_size % self.info.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {self.info.world_size}")
        self.tokenizer, self.classes = None, None
        if cfg.tokens:
            self.data = TokenDataset(cfg.tokens)
            vocab, length, num_classes = (int(self.data.meta["codebook_size"]), self.data.tokens.shape[1],
                                          self.data.num_classes)
        else:
            self.data, vocab, length, num_classes = self._video_data()
        if not fp and num_classes <= 0:
            raise ValueError(f"{cfg.tokens or cfg.data} has no class labels; class-conditional training needs them "
                             f"(sub-folders per class, UCF file names or a LARP CSV with an action column)")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        cond = dict(frame_prediction=True) if fp else dict(num_classes=num_classes,
                                                           class_dropout_prob=cfg.class_dropout)
        gcfg = GeneratorConfig.from_name(cfg.model, **{"vocab_size": vocab, "max_seq_len": length, **cond,
                                                       **cfg.model_overrides})
        self.model = ARGenerator(gcfg).to(self.device).train()
        self.fsdp = self.info.distributed
        if self.fsdp:
            self._shard()
        ckpt.seed_everything(cfg.seed + self.info.rank)
        self.opt = make_adam(decay_split(self.model, weight_decay=cfg.weight_decay), cfg.lr, cfg.betas, adamw=True)
        # under FSDP2 the EMA shadows are DTensors sharded like the parameters (checkpoints gather them)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self._start_run(self.data, progress)

    def _video_data(self):
        """(VideoFolderDataset, vocab, tokens per clip, classes) for on-the-fly tokenization."""
        from dera_fast.data import VideoFolderDataset

        cfg = self.cfg
        self.tokenizer = load_frozen_tokenizer(cfg.tokenizer, self.device)
        tcfg = self.tokenizer.config
        if cfg.task == "frame-prediction" and cfg.context_frames >= self.tokenizer.frames_per_clip:
            raise ValueError(f"context_frames={cfg.context_frames} must be fewer than the tokenizer's "
                             f"{self.tokenizer.frames_per_clip} frames per clip")
        data = VideoFolderDataset(cfg.data, frames=self.tokenizer.frames_per_clip, size=tcfg.size, train=True,
                                  value_range=tcfg.pixel_range, seed=cfg.seed)
        self.classes = list(data.classes)
        if cfg.task == "class" and data.classes and min(data.labels) < 0:
            raise ValueError(f"{cfg.data}: some videos have no class (no sub-folder / action column)")
        return data, self.tokenizer.codebook_size, self.tokenizer.tokens_per_clip, data.num_classes

    @torch.no_grad()
    def _tokenize(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(clip ids [B, L], context ids [B, L] or None): one batched encode of the clips (and, for frame
        prediction, their context clips), as LARP's trainers do."""
        from dera_fast.data import repeat_last_frame

        x = video.to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.amp):
            if self.cfg.task == "class":
                return self.tokenizer.encode(x), None
            ctx = repeat_last_frame(x[:, :, : self.cfg.context_frames], x.shape[2])  # [B, C, T, H, W]
            ids, ctx_ids = self.tokenizer.encode(torch.cat([x, ctx])).chunk(2)
        return ids, ctx_ids

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
        if self.tokenizer is None:
            ids, ctx_ids = batch["ids"].to(self.device), None
        else:
            ids, ctx_ids = self._tokenize(batch["video"])
        cond = dict(context_ids=ctx_ids) if cfg.task == "frame-prediction" else \
            dict(class_labels=batch["label"].to(self.device))
        mult = schedule_mult(self.step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             min_lr_mult=cfg.min_lr_mult)
        set_lr(self.opt, cfg.lr, mult)
        # FSDP2 casts parameters itself; autocast is only needed for the unsharded model.
        with autocast(self.device, "off" if self.fsdp else cfg.amp):
            # NOTE: through __call__ (not ARGenerator.loss) so FSDP2's forward hooks unshard the root's params.
            logits = self.model(ids[:, :-1], **cond)          # [B, L, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer_step()
        return {"loss": float(loss.detach()), "lr": cfg.lr * mult}

    def train(self, on_log=None) -> dict[str, float]:
        if self.info.is_main and self.schedule:
            self.metrics.write(self.step, {"schedule_" + k: v for k, v in self.schedule.items()})
        length = self.model.config.max_seq_len
        return run_steps(self, desc="train generator", rate_key="tokens_per_s",
                         count=lambda b: (b["ids"] if "ids" in b else b["video"]).shape[0] * length,
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

    def _ema_full_state(self) -> dict | None:
        """The EMA weights as full CPU tensors (collective under FSDP2, where the shadows are sharded DTensors)."""
        if self.ema is None:
            return None
        return {k: (v.full_tensor() if self.fsdp else v).detach().cpu() for k, v in self.ema.state_dict().items()}

    def _ema_local(self, full: dict) -> dict:
        """Full EMA tensors from a checkpoint, sharded like this run's shadows under FSDP2."""
        if not self.fsdp:
            return full
        from torch.distributed.tensor import distribute_tensor

        shadow = self.ema.state_dict()
        return {k: distribute_tensor(v.to(self.device), shadow[k].device_mesh, shadow[k].placements)
                for k, v in full.items() if k in shadow}

    def tokenizer_provenance(self) -> dict:
        """What the generator's tokens are: model_type, tokens per clip, codebook size, architecture hash."""
        if self.tokenizer is not None:
            from dera_fast.models.pretrained import architecture_hash

            tok = self.tokenizer
            return {"model_type": tok.model_type, "tokens_per_clip": tok.tokens_per_clip,
                    "codebook_size": tok.codebook_size, "config_hash": architecture_hash(tok.config)}
        meta = self.data.meta
        rec = {"model_type": meta.get("model_type"), "tokens_per_clip": int(self.data.tokens.shape[1]),
               "codebook_size": int(meta["codebook_size"]), "config_hash": meta.get("tokenizer_config_hash")}
        return {k: v for k, v in rec.items() if v is not None}

    def save_checkpoint(self) -> Path | None:
        """Checkpoint (every rank's RNG included) and export ``model/``; collective under torchrun."""
        model_sd, opt_sd = self._full_states()
        ema_sd = self._ema_full_state()
        rngs = ckpt.gather_rng_states(self.info)
        if not self.info.is_main:
            return None
        weights = {"model": model_sd}
        if ema_sd is not None:
            weights["ema"] = ema_sd
        state = {"optimizer": opt_sd, "data": self.stream.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                 "step": self.step}
        where = ckpt.save_checkpoint(self.out, self.step, weights=weights, config=self.cfg.to_dict(), state=state,
                                     keep_last=self.cfg.keep_last, model=self._identity())
        self.export(self.out / "model", model_sd, ema_sd)
        return where

    def export(self, directory: Path, model_sd: dict, ema_sd: dict | None = None) -> None:
        """Write a loadable ``ARGenerator.save_pretrained`` folder (atomically) from full state dicts: the EMA
        weights when kept, with the tokenizer provenance and the class names (video folder / CSV, label order)."""
        from dera_fast.models.ar import ARGenerator

        with torch.random.fork_rng(devices=[]):  # building a model draws init noise: keep the run's RNG intact
            plain = ARGenerator(self.model.config)
        if ema_sd is None and self.ema is not None and not self.fsdp:
            ema_sd = self.ema.state_dict()
        plain.load_state_dict(ema_sd if ema_sd is not None else model_sd)
        files = {"classes.json": json.dumps(self.classes, indent=1)} if self.classes else None
        plain.save_pretrained(directory, tokenizer=self.tokenizer_provenance(), files=files)

    def resume(self, path: str | Path | None = None) -> bool:
        """Restore the newest intact checkpoint under the run folder (or ``path``); False when there is none.

        Damaged newer checkpoints are skipped with a warning; a checkpoint of another model type or architecture is
        refused (ValueError). Collective under torchrun (rank 0 picks, every rank loads).
        """
        opened = self._open_checkpoint(path)
        if opened is None:
            return False
        where, step, weights, state = opened
        if self.ema is not None and "ema" not in weights:
            raise ValueError(f"cannot resume {where}: it has no EMA weights (ema_decay was 0 when it was written); "
                             f"resume with the run's own ema_decay")
        check_state_dict(self.model.state_dict(), weights["model"], source=str(where / "model.safetensors"),
                         target=type(self.model).__name__)
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
            self.ema.load_state_dict(self._ema_local(weights["ema"]))
        self.stream.load_state_dict(state["data"])
        return self._finish_resume(where, step, state)
