"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint is a directory ``<out>/checkpoints/step_<N>/`` holding

* ``model.safetensors`` and ``ema.safetensors``: weights, with the model config and kind in the safetensors
  metadata (ECOSYSTEM.md §2.3), so each file loads on its own;
* ``state.safetensors`` + ``state.json``: optimiser, scheduler, RNG and data-position state. Any nested
  dict / list / tuple of tensors and JSON scalars is split into a flat tensor table and a JSON skeleton
  whose tensor leaves are ``{"__tensor__": key}`` references (:func:`flatten_state` / :func:`unflatten_state`).

Writes are atomic: the directory is assembled under a temporary name and published with ``os.replace``, then the
``LATEST`` pointer is replaced the same way, so a crash never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dera_fast import __version__

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def rng_state() -> dict:
    """Every RNG a training step may draw from: Python, NumPy, torch CPU and (when present) CUDA."""
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


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, config: dict | None = None,
                 kind: str = "model") -> None:
    """Write a state dict as one self-describing safetensors file, atomically."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    meta = {"format": "pt", "dera_fast.version": __version__, "dera_fast.kind": kind}
    if config is not None:
        meta["dera_fast.config"] = json.dumps(config, sort_keys=True)
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_weights`: (state dict, config dict or {})."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), json.loads(meta.get("dera_fast.config", "{}"))


def _atomic(path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(out_dir: str | os.PathLike, step: int, *, weights: dict[str, dict[str, torch.Tensor]],
                    config: dict, state: dict, keep_last: int = 3) -> Path:
    """Write ``<out_dir>/checkpoints/step_<step>/`` atomically and prune to the newest ``keep_last``.

    Args:
        weights: file stem -> state dict, e.g. {"model": ..., "ema": ..., "disc": ...}.
        config: the training config (stored in every weight file and in ``state.json``).
        state: optimiser / scheduler / RNG / data-position state (see :func:`flatten_state`).
    Returns:
        the checkpoint directory.
    """
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}."))
    try:
        for stem, sd in weights.items():
            save_weights(tmp / f"{stem}.safetensors", sd, config=config, kind=stem)
        skeleton, tensors = flatten_state(state)
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config, "state": skeleton,
                                                    "version": __version__}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _atomic(root / "LATEST", lambda p: Path(p).write_text(final.name))
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
    """The newest complete checkpoint (the ``LATEST`` pointer, else the highest step)."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "LATEST"
    if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
        return root / pointer.read_text().strip()
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Read a checkpoint: (step, {stem: state dict}, config, state)."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "state.json").read_text())
    tensors = load_file(str(ckpt_dir / "state.safetensors"))
    weights = {p.stem: load_file(str(p)) for p in ckpt_dir.glob("*.safetensors") if p.stem != "state"}
    return meta["step"], weights, meta["config"], unflatten_state(meta["state"], tensors)
