"""Statistics across ranks and runs: exact reduction of feature statistics, per-clip values gathered and summed
exactly, the I3D extractor with a signature check, and the safetensors cache of real-data statistics.

Reduction (``torch.distributed``; a no-op in one process). Each rank holds float64 :class:`FeatureStats` of its
shard (``n_r``, mean ``m_r``, scatter ``M2_r``). Two all-reduces of sums combine them exactly (the parallel-axis
form of Chan et al.): ``n = sum n_r``, ``mu = sum n_r m_r / n``, ``M2 = sum [M2_r + n_r (m_r - mu)(m_r - mu)^T]``.
That is what one process computes on all clips, up to float64 round-off (never a mean of means). Memory stays
O(D^2) whatever the number of clips. Per-clip scalars (PSNR, SSIM, LPIPS) are few, so they are gathered and
summed with ``math.fsum`` (exactly rounded): identical in every world size.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dera_fast.metrics import FVD, FeatureStats

CACHE_FORMAT = 1


def _comm_device(info) -> torch.device:
    return info.device if info.device.type == "cuda" else torch.device("cpu")


def _all_reduce(t: torch.Tensor, info, op=None) -> torch.Tensor:
    t = t.to(_comm_device(info))
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.cpu()


def reduce_feature_stats(stats: FeatureStats, info) -> FeatureStats:
    """The statistics of all ranks' features (exact combination, see the module docstring); every rank gets them.

    A rank without clips (more ranks than clips) contributes zeros.
    """
    if not info.distributed:
        return stats
    d = int(_all_reduce(torch.tensor([stats.num_features or 0], dtype=torch.int64), info, dist.ReduceOp.MAX))
    if stats.num_items:
        state = stats.state_dict()
        n_r, mean_r, m2_r = float(stats.num_items), state["mean"], state["m2"]
    else:
        n_r, mean_r, m2_r = 0.0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
    first = _all_reduce(torch.cat([torch.tensor([n_r], dtype=torch.float64), n_r * mean_r]), info)  # [1 + D]
    n, mu = first[0], first[1:] / first[0].clamp_min(1)
    dev = mean_r - mu
    m2 = _all_reduce(m2_r + n_r * torch.outer(dev, dev), info)
    if not int(n):
        return FeatureStats()
    return FeatureStats.from_state_dict({"mean": mu, "m2": m2, "num_items": torch.tensor(int(n))})


def reduce_counts(counts: torch.Tensor, info) -> torch.Tensor:
    """Element-wise sum over ranks (integer-valued float64 counts: exact)."""
    return _all_reduce(counts.double(), info) if info.distributed else counts


def gather_rows(rows: torch.Tensor, info) -> torch.Tensor:
    """Concatenate every rank's ``[n_r, K]`` float64 rows (any n_r, zero included) on every rank."""
    if not info.distributed:
        return rows
    k = rows.shape[1]
    n_max = int(_all_reduce(torch.tensor([rows.shape[0]]), info, dist.ReduceOp.MAX))
    sizes = [torch.zeros(1, dtype=torch.int64, device=_comm_device(info)) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([rows.shape[0]], device=_comm_device(info)))
    padded = torch.zeros(n_max, k, dtype=torch.float64)
    padded[: rows.shape[0]] = rows
    out = [torch.empty(n_max, k, dtype=torch.float64, device=_comm_device(info)) for _ in range(info.world_size)]
    dist.all_gather(out, padded.to(_comm_device(info)))
    return torch.cat([o[: int(s)].cpu() for o, s in zip(out, sizes)])


def exact_means(rows: torch.Tensor, columns: list[str]) -> dict[str, float]:
    """Column means of ``[N, K]`` per-clip values with ``math.fsum``: the same bits in any order."""
    n = rows.shape[0]
    return {c: (math.fsum(rows[:, i].tolist()) / n if n else float("nan")) for i, c in enumerate(columns)}


# ------------------------------------------------------------------------------------------------ extractor


def load_extractor(i3d, device, *, value_range=(0.0, 1.0), batch_size: int = 16) -> FVD:
    """An :class:`FVD` around the I3D TorchScript at ``i3d`` (path) or a callable; its output feeds both sides.

    Raises ValueError with one clear line when the file is not TorchScript.
    """
    if callable(i3d):
        return FVD(i3d, value_range=value_range, batch_size=batch_size, device=device)
    path = Path(i3d)
    if not path.is_file():
        raise FileNotFoundError(f"I3D TorchScript not found: {path}")
    try:
        return FVD(weights=path, value_range=value_range, batch_size=batch_size, device=device)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a loadable TorchScript file ({first[:160]})") from None


def probe_extractor(fvd: FVD, frames: int, size: int) -> int:
    """Run the extractor once on two blank clips of the evaluation shape: checks the call signature and the frame
    count up front and returns the feature dimension."""
    if frames < 10 and fvd.name.startswith("i3d"):
        raise ValueError(f"the I3D extractor needs clips of at least 10 frames; these have {frames} "
                         f"(LARP's protocol: 16)")
    clip = torch.full((2, 3, frames, size, size), 0.5)
    try:
        feats = fvd.features(clip)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the feature extractor {fvd.name} failed on a [2, 3, {frames}, {size}, {size}] clip "
                         f"batch; expected StyleGAN-V's I3D signature i3d(x, rescale=, resize=, "
                         f"return_features=) -> [B, D] ({first[:160]})") from None
    fvd.clip_shape = None  # the probe must not fix the clip shape of the real evaluation
    return int(feats.shape[1])


# ------------------------------------------------------------------------------------------------ real-stats cache


def cache_key(fields: dict) -> tuple[str, str]:
    """(canonical JSON of the key fields, 16-hex digest used in the file name)."""
    import hashlib

    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(directory, fields: dict) -> Path:
    _, digest = cache_key(fields)
    return Path(directory) / f"real-stats-{fields.get('split', 'data')}-{digest}.safetensors"


def load_real_stats(path: Path, fields: dict) -> tuple[FeatureStats, torch.Tensor | None] | None:
    """The cached (stats, labels or None) when ``path`` holds statistics for exactly ``fields``; else None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable real-stats cache {path}: {e}", stacklevel=2)
        return None
    if meta.get("dera_fast.real_stats_key") != cache_key(fields)[0]:
        return None
    stats = FeatureStats.from_state_dict({k: tensors[k] for k in ("mean", "m2", "num_items")})
    return stats, tensors.get("labels")


def save_real_stats(path: Path, fields: dict, stats: FeatureStats, labels: torch.Tensor | None,
                    world_size: int) -> None:
    """Write the cache atomically (:func:`dera_fast._files.write_file`); safetensors, no pickle."""
    from safetensors.torch import save_file

    from dera_fast._files import write_file

    from dera_fast import __version__

    state = stats.state_dict()
    if labels is not None:
        state["labels"] = labels.to(torch.int64).contiguous()
    meta = {"format": "pt", "dera_fast.kind": "real_stats", "dera_fast.cache_format": str(CACHE_FORMAT),
            "dera_fast.real_stats_key": cache_key(fields)[0], "dera_fast.world_size": str(world_size),
            "dera_fast.version": __version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
