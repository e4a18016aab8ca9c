"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else, verified on resume.

A checkpoint is a directory ``<out>/checkpoints/step_<N>/`` holding

* ``model.safetensors``, ``ema.safetensors``, ...: weights, with the training config and kind in the safetensors
  metadata (ECOSYSTEM.md §2.3), so each file loads on its own;
* ``state.safetensors`` + ``state.json``: optimiser, scheduler, every rank's RNG and data-position state, and the
  model's architecture. Any nested dict / list / tuple of tensors and JSON scalars is split into a flat tensor table
  and a JSON skeleton whose tensor leaves are ``{"__tensor__": key}`` references (:func:`flatten_state` /
  :func:`unflatten_state`);
* ``manifest.json`` (written last): the size and sha256 of every other file.

Writes are atomic (:func:`dera_fast._files.atomic_dir`: assembled under a temporary name, fsynced, renamed).
:func:`select_checkpoint` picks the newest checkpoint whose files match their manifest, warns about each newer
damaged one and renames it ``step_<N>.damaged`` (kept for inspection, never loaded again).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dera_fast import __version__
from dera_fast._files import atomic_dir, clean_stale, write_file, write_text
from dera_fast.models.pretrained import load_tensors, read_metadata

log = logging.getLogger("dera_fast.train")

_STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dera_fast.checkpoint/1"


def flatten_state(obj: Any, prefix: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split ``obj`` into (JSON skeleton, {key: tensor}). Tuples are tagged so that they round-trip."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            tensors[path] = o.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(o, dict):
            if not all(isinstance(k, (str, int)) for k in o):
                raise TypeError(f"{path}: only str/int dict keys can be stored")
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in o.items()]}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(o)]
        if isinstance(o, np.ndarray):
            return walk(torch.from_numpy(o.copy()), path)
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"{path}: cannot store a {type(o).__name__} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    return skeleton


# ------------------------------------------------------------------------------------------------ RNG
def seed_everything(seed: int) -> None:
    """Seed every RNG that :func:`rng_state` saves (Python, NumPy, torch CPU and CUDA), so a run is reproducible
    from its config alone, and the resume check covers them all."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG a training step may draw from in this process: Python, NumPy, torch CPU and (when present) CUDA."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": np_state[1], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def gather_rng_states(info) -> list[dict] | None:
    """Every rank's :func:`rng_state`, in rank order, on rank 0 (None on the others). Collective under torchrun."""
    own = rng_state()
    if not info.distributed:
        return [own]
    import torch.distributed as dist

    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(own, gathered, dst=0)
    return gathered


def restore_rng(state: dict, info) -> None:
    """Set this rank's RNGs from a checkpoint's ``state`` (``rng_ranks`` per rank; ``rng``: rank 0's, older files).

    A different world size cannot resume bit-exactly: each rank then takes the saved state of rank ``rank % n``
    and reseeds its torch generator from it and its rank, with a warning.
    """
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == info.world_size:
        set_rng_state(ranks[info.rank])
        return
    if info.is_main:
        log.warning("the checkpoint was written by %d rank(s), this run has %d: resuming, but not bit-exactly",
                    len(ranks), info.world_size)
    set_rng_state(ranks[info.rank % len(ranks)])
    if info.rank >= len(ranks):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,))) + info.rank)


# ------------------------------------------------------------------------------------------------ weights
def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, config: dict | None = None,
                 kind: str = "model") -> None:
    """Write a state dict as one self-describing safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", "dera_fast.version": __version__, "dera_fast.kind": kind}
    if config is not None:
        meta["dera_fast.config"] = json.dumps(config, sort_keys=True)
    write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_weights`: (state dict, config dict or {})."""
    meta = read_metadata(path)
    return load_tensors(path), json.loads(meta.get("dera_fast.config", "{}"))


# ------------------------------------------------------------------------------------------------ manifest
def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: Path, step: int) -> None:
    """Record the size and sha256 of every file in ``ckpt_dir`` (call it last)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _digest(p)}
             for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    (ckpt_dir / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint folder (empty list: every file matches its manifest).

    A folder without a manifest (written before manifests existed) is checked by reading every file instead.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return _verify_by_reading(ckpt_dir)
    except (OSError, ValueError) as e:
        return [f"{MANIFEST} unreadable ({e})"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return [f"{MANIFEST} is malformed"]
    problems = []
    for name, rec in manifest["files"].items():
        p = ckpt_dir / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != rec.get("size"):
            problems.append(f"{name} has {p.stat().st_size} bytes, {rec.get('size')} recorded")
        elif _digest(p) != rec.get("sha256"):
            problems.append(f"{name} does not match its recorded sha256")
    for name in ("state.json", "state.safetensors", "model.safetensors"):
        if name not in manifest["files"]:
            problems.append(f"{name} is not in the manifest")
    return problems


def _verify_by_reading(ckpt_dir: Path) -> list[str]:
    try:
        json.loads((ckpt_dir / "state.json").read_text())
        for p in ckpt_dir.glob("*.safetensors"):
            load_tensors(p)
        if not (ckpt_dir / "model.safetensors").is_file():
            return ["model.safetensors is missing"]
    except (OSError, ValueError) as e:
        return [str(e)]
    return []


# ------------------------------------------------------------------------------------------------ save / load
def save_checkpoint(out_dir: str | os.PathLike, step: int, *, weights: dict[str, dict[str, torch.Tensor]],
                    config: dict, state: dict, keep_last: int = 3, model: dict | None = None) -> Path:
    """Write ``<out_dir>/checkpoints/step_<step>/`` atomically and prune to the newest ``keep_last``.

    Args:
        weights: file stem -> state dict, e.g. {"model": ..., "ema": ..., "disc": ...}.
        config: the training config (stored in every weight file and in ``state.json``).
        state: optimiser / scheduler / RNG / data-position state (see :func:`flatten_state`).
        model: the model's identity (``{"model_type", "architecture"}``), checked by :func:`check_same_model`.
    Returns:
        the checkpoint directory.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    final = root / f"step_{step:08d}"
    skeleton, tensors = flatten_state(state)
    with atomic_dir(final) as tmp:
        for stem, sd in weights.items():
            tensors_sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
            meta = {"format": "pt", "dera_fast.version": __version__, "dera_fast.kind": stem,
                    "dera_fast.config": json.dumps(config, sort_keys=True)}
            save_file(tensors_sd, str(tmp / f"{stem}.safetensors"), metadata=meta)
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config, "model": model,
                                                    "state": skeleton, "version": __version__}))
        write_manifest(tmp, step)
    write_text(root / "LATEST", final.name)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``out_dir``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint folder by step (unverified; see :func:`select_checkpoint`)."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def select_checkpoint(out_dir: str | os.PathLike, *, quarantine: bool = True) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; None when there is none at all.

    Each newer damaged one is reported with a warning and (``quarantine``) renamed ``step_<N>.damaged``.
    Raises ValueError when checkpoints exist but none is intact.
    """
    ckpts = list_checkpoints(out_dir)
    for ckpt in reversed(ckpts):
        problems = verify_checkpoint(ckpt)
        if not problems:
            return ckpt
        log.warning("checkpoint %s is damaged (%s); trying an older one", ckpt, "; ".join(problems[:3]))
        if quarantine:
            aside = ckpt.with_name(ckpt.name + ".damaged")
            n = 1
            while aside.exists():
                n += 1
                aside = ckpt.with_name(f"{ckpt.name}.damaged{n}")
            os.replace(ckpt, aside)
    if ckpts:
        raise ValueError(f"no intact checkpoint under {Path(out_dir) / 'checkpoints'}: all {len(ckpts)} are damaged")
    return None


def resume_point(out_dir: str | os.PathLike, path: str | os.PathLike | None, info) -> Path | None:
    """The checkpoint a resume loads: ``path`` if given (refused when damaged), else :func:`select_checkpoint` run
    by rank 0 and shared with every rank (so all ranks load the same one, or all raise the same error)."""
    from .distributed import broadcast_object

    if path is not None:
        problems = verify_checkpoint(path)
        if problems:
            raise ValueError(f"checkpoint {path} is damaged or not a checkpoint: {'; '.join(problems[:3])}")
        return Path(path)
    choice = None
    if info.is_main:
        try:
            choice = select_checkpoint(out_dir)
        except ValueError as e:
            choice = e
    choice = broadcast_object(choice, info)
    if isinstance(choice, Exception):
        raise ValueError(str(choice))
    return choice


def checkpoint_info(ckpt_dir: str | os.PathLike) -> dict:
    """``state.json`` without the state: ``{"step", "config", "model", "version"}``."""
    path = Path(ckpt_dir) / "state.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{ckpt_dir} is not a checkpoint folder (no state.json)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None
    meta.pop("state", None)
    return meta


def check_same_model(ckpt_dir: str | os.PathLike, model: dict) -> None:
    """Refuse (ValueError) to resume a checkpoint written for another model type or architecture."""
    from dera_fast.models.pretrained import architecture_diff

    saved = checkpoint_info(ckpt_dir).get("model")
    if saved is None:  # checkpoints from before the record: the strict state-dict load still checks shapes
        return
    if saved.get("model_type") != model.get("model_type"):
        raise ValueError(f"cannot resume {ckpt_dir}: it holds a {saved.get('model_type')!r} model, this run builds "
                         f"a {model.get('model_type')!r} one (use a new --out, or the run's own config)")
    diff = architecture_diff(saved.get("architecture", {}), model.get("architecture", {}))
    if diff:
        raise ValueError(f"cannot resume {ckpt_dir}: the model architecture changed ({'; '.join(diff[:6])}"
                         f"{'; ...' if len(diff) > 6 else ''}); resume with the run's own config or use a new --out")


def load_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Read a checkpoint: (step, {stem: state dict}, config, state)."""
    ckpt_dir = Path(ckpt_dir)
    info = checkpoint_info(ckpt_dir)
    meta = json.loads((ckpt_dir / "state.json").read_text())
    tensors = load_tensors(ckpt_dir / "state.safetensors")
    weights = {p.stem: load_tensors(p) for p in ckpt_dir.glob("*.safetensors") if p.stem != "state"}
    return info["step"], weights, info["config"], unflatten_state(meta["state"], tensors)
