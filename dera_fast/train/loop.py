"""Pieces both trainers share: the :class:`Trainer` base (run state, optimiser step, the two ends of resume), a
resumable sharded batch stream, the JSONL metrics log, progress bars, autocast and the step loop."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dera_fast import _progress
from dera_fast._files import check_output, clean_stale, write_text
from dera_fast.data.loader import BatchStream

from . import checkpoint as ckpt
from .distributed import cleanup, mean_across_ranks
from .schedule import apply_epochs

log = logging.getLogger("dera_fast.train")


class MetricsLog:
    """Append-only JSONL log (one object per logged step); only rank 0 writes.

    :meth:`rewind` (called on resume) drops the records past the resumed step and merges duplicates, so the log
    holds each step once; a later write for the last step recorded is merged into that record.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._last: tuple[int, int, dict] | None = None  # (step, byte offset, record) of the last line
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a+b") as f:
            if self._last is not None and self._last[0] == step:  # same step again: one merged record
                offset, rec = self._last[1], {**self._last[2], **rec}
                f.truncate(offset)
            else:
                offset = f.seek(0, os.SEEK_END)
            f.write((json.dumps(rec) + "\n").encode())
        self._last = (step, offset, rec)

    def rewind(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (one per step, merged; unreadable lines dropped)."""
        if not self.enabled or not self.path.is_file():
            return
        merged: dict[int, dict] = {}
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                merged[rec["step"]] = {**merged.get(rec["step"], {}), **rec}
        lines = [json.dumps(merged[k]) + "\n" for k in sorted(merged)]
        write_text(self.path, "".join(lines))
        self._last = None
        if merged:
            last = max(merged)
            self._last = (last, len("".join(lines[:-1]).encode()), merged[last])


class Trainer:
    """What the tokenizer and generator trainers share. A subclass sets ``cfg``, ``out``, ``info``, ``device``,
    ``model``, ``opt`` and ``ema`` (or None), calls :meth:`_start_run` once they exist, and builds its ``resume`` from
    :meth:`_open_checkpoint` and :meth:`_finish_resume`."""

    def _start_run(self, dataset, progress: bool | None) -> None:
        """The run state: this rank's batch stream over ``dataset``, the epoch schedule (epochs -> steps from the
        data, before anything reads ``cfg.steps``: cosine schedule, scheduled-sampling ramp), step 0, the progress
        setting (rank 0 only; None: the package setting) and the metrics log."""
        cfg, info = self.cfg, self.info
        self.stream = BatchStream(dataset, cfg.batch_size // info.world_size, info, seed=cfg.seed,
                                  num_workers=cfg.num_workers)
        self.schedule = apply_epochs(cfg, self.stream.steps_per_epoch, len(dataset))
        self.step = 0
        self.progress = progress if info.is_main else False
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=info.is_main)

    def _optimizer_step(self) -> None:
        """After the backward: clip (``cfg.grad_clip`` > 0), step the optimiser, update the EMA, count the step."""
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    def _identity(self) -> dict:
        """What a checkpoint records of the model, so that resuming another model type or architecture fails."""
        from dera_fast.models.pretrained import architecture

        return {"model_type": self.model.model_type, "architecture": architecture(self.model.config)}

    def _open_checkpoint(self, path) -> tuple[Path, int, dict, dict] | None:
        """(folder, step, weights, state) of the checkpoint to resume from: the newest intact one under the run
        folder, or ``path``; checked to hold this model. None when there is none. Collective under torchrun."""
        where = ckpt.resume_point(self.out, path, self.info)
        if where is None:
            return None
        ckpt.check_same_model(where, self._identity())
        step, weights, _, state = ckpt.load_checkpoint(where)
        return where, step, weights, state

    def _finish_resume(self, where: Path, step: int, state: dict) -> bool:
        """Once the subclass has loaded its weights and optimiser: every rank's RNG, the step, the metrics log."""
        ckpt.restore_rng(state, self.info)
        self.step = step
        self.metrics.rewind(step)
        if self.info.is_main:
            log.info("resumed from %s (step %d)", where, step)
        return True


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    return round(v, 6) if isinstance(v, float) else v


def progress_bar(total: int, initial: int, desc: str, enabled: bool | None) -> tqdm:
    """The training bar: ``enabled`` True / False, or None for the package setting (``set_progress_bar_config``;
    the trainers pass False on every rank but 0)."""
    return _progress.progress_bar(total=total, initial=initial, desc=desc, progress=enabled, unit="step")


def autocast(device: torch.device, amp: str):
    """bf16 autocast on CUDA when ``amp`` is "auto" or "bf16"; fp32 everywhere else ("off", or on CPU)."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be auto, bf16 or off, got {amp!r}")
    if device.type == "cuda" and amp != "off":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


RUN_ENTRIES = ("checkpoints", "model", "metrics.jsonl", "train_config.json", "samples")  # what a run folder holds


def prepare_run_folder(out_dir, *, resume: bool = False, overwrite: bool = False, inputs=()) -> Path:
    """Check a run folder before training and (rank 0) clean what killed runs left in it.

    A folder holding a previous run is refused unless ``resume`` (continue it) or ``overwrite`` (its checkpoints,
    metrics, samples and model are deleted first). ``inputs`` (data, token files, tokenizers) may not lie inside the
    entries a run replaces.
    """
    out = check_output(out_dir, kind="dir", overwrite=True, what="--out")
    managed = [out / name for name in RUN_ENTRIES]
    check_output(out / "model", kind="dir", overwrite=True, inputs=inputs, what="--out")
    check_output(out / "checkpoints", kind="dir", overwrite=True, inputs=inputs, what="--out")
    existing = [p.name for p in managed if p.exists()]
    if existing and not (resume or overwrite):
        raise ValueError(f"--out {out} holds a previous run ({', '.join(existing)}): pass --resume to continue it or "
                         f"--overwrite to start over")
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank checks, rank 0 alone changes files
        return out
    if out.is_dir():
        clean_stale(out, names=set(RUN_ENTRIES))
        clean_stale(out / "checkpoints")
    if overwrite and not resume:
        for p in managed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    return out


def run_training(trainer_cls, cfg, out_dir, *, device: str = "auto", progress: bool | None = None, resume: bool = False,
                 overwrite: bool = False, inputs=()) -> dict[str, float]:
    """Check the run folder (:func:`prepare_run_folder`), build ``trainer_cls(cfg, out_dir, ...)``, record its
    config, optionally resume, train; safe under torchrun."""
    prepare_run_folder(out_dir, resume=resume, overwrite=overwrite, inputs=inputs)
    trainer = trainer_cls(cfg, out_dir, device=device, progress=progress)
    try:
        if resume and not trainer.resume() and trainer.info.is_main:
            log.info("--resume: no checkpoint under %s yet; starting from step 0", trainer.out)
        if trainer.info.is_main:  # after a refused resume the folder still records the run's own config
            trainer.out.mkdir(parents=True, exist_ok=True)
            write_text(trainer.out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        return trainer.train()
    finally:
        cleanup()


def _checkpoint_due(trainer, last_save: float) -> bool:
    """Every ``ckpt_every`` steps, or ``ckpt_minutes`` after the last save (rank 0's clock, at logged steps)."""
    cfg, step = trainer.cfg, trainer.step
    if cfg.ckpt_every and step % cfg.ckpt_every == 0:
        return True
    minutes = getattr(cfg, "ckpt_minutes", 0)
    if not minutes or step % cfg.log_every:  # the clock is read where ranks already synchronise
        return False
    due = time.monotonic() - last_save >= 60 * minutes
    if trainer.info.distributed:  # every rank must agree: saving is collective
        import torch.distributed as dist

        flag = torch.tensor([float(due)], device=trainer.info.device if trainer.info.device.type == "cuda" else "cpu")
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def run_steps(trainer, *, desc: str, rate_key: str, count, postfix: dict, on_log=None, after_step=None) -> dict:
    """The step loop both trainers share, from ``trainer.step`` to ``trainer.cfg.steps``.

    Every ``log_every`` steps the logs (plus ``rate_key``: ``count(batch)`` units per second over all ranks) are
    averaged across ranks, written to the JSONL log, shown on the bar (``postfix``: label -> (key, format)) and
    passed to ``on_log(step, values)``; checkpoints every ``ckpt_every`` steps, every ``ckpt_minutes`` of wall time
    and once at the end.
    Returns the last logged values plus ``train_seconds``.
    """
    cfg = trainer.cfg
    bar = progress_bar(cfg.steps, trainer.step, desc, trainer.progress)
    last: dict[str, float] = {}
    t0 = tic = time.perf_counter()
    last_save = time.monotonic()
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
            if trainer.step < cfg.steps and _checkpoint_due(trainer, last_save):
                trainer.save_checkpoint()
                last_save = time.monotonic()
            if after_step is not None:
                after_step(batch)
    finally:
        bar.close()
    trainer.save_checkpoint()
    last["train_seconds"] = time.perf_counter() - t0
    return last
