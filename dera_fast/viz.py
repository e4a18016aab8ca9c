"""Video grids for looking at results: built in torch, written as mp4, GIF or a PNG strip.

Inputs are float clips ``[B, 3, T, H, W]`` with values in ``value_range`` ([-1, 1] by default). A grid is itself a
clip ``[3, T, H', W']`` in the same range: items are tiled along W, rows along H, separated by ``pad`` pixels of
``pad_value`` (default: the range's low end, i.e. black).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ._validation import check_value_range
from .data.io import DEFAULT_RANGE, write_video


def _as_batch(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor [B, 3, T, H, W]")
    if x.dim() == 4:
        x = x[None]
    if x.dim() != 5 or x.shape[1] != 3 or x.numel() == 0:
        raise ValueError(f"{name} must be [B, 3, T, H, W] (or one clip [3, T, H, W]), got {tuple(x.shape)}")
    return x.detach().float().cpu()


def video_grid(rows: Sequence[torch.Tensor], *, pad: int = 2, pad_value: float | None = None,
               value_range=DEFAULT_RANGE, max_items: int | None = None) -> torch.Tensor:
    """Tile clips into one clip: ``rows[r][i]`` lands at grid row ``r``, column ``i``.

    Args:
        rows: a list of batches ``[B_r, 3, T, H, W]`` sharing T, H and W (B_r may differ; short rows are filled
            with ``pad_value``), or a single batch ``[B, 3, T, H, W]`` (one row).
        pad: border width in pixels around every cell.
        max_items: keep at most this many items per row.
    Returns:
        float ``[3, T, R*(H+pad)+pad, C*(W+pad)+pad]`` in ``value_range``.
    """
    lo, _ = check_value_range(value_range)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if isinstance(rows, torch.Tensor):
        rows = [rows]
    if len(rows) == 0:
        raise ValueError("rows must not be empty")
    batches = [_as_batch(f"rows[{r}]", x)[:max_items] for r, x in enumerate(rows)]
    _, c, t, h, w = batches[0].shape
    for r, b in enumerate(batches):
        if b.shape[1:] != (c, t, h, w):
            raise ValueError(f"rows[{r}] has clip shape {tuple(b.shape[1:])}, rows[0] has {(c, t, h, w)}")
    n_rows, n_cols = len(batches), max(b.shape[0] for b in batches)
    fill = lo if pad_value is None else float(pad_value)
    grid = torch.full((c, t, n_rows * (h + pad) + pad, n_cols * (w + pad) + pad), fill)
    for r, b in enumerate(batches):
        for i in range(b.shape[0]):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[:, :, top:top + h, left:left + w] = b[i]
    return grid


def save_video_grid(rows, path, fps: float = 8.0, *, pad: int = 2, value_range=DEFAULT_RANGE,
                    max_items: int | None = None) -> Path:
    """Build :func:`video_grid` from ``rows`` (or take a ready grid ``[3, T, H, W]``) and write it to ``path``.

    The suffix picks the format: ``.mp4`` (PyAV, the ``video`` extra), ``.gif`` or ``.png`` (up to 8 evenly
    spaced frames side by side; see :func:`dera_fast.data.write_video`). Returns the path.
    """
    if isinstance(rows, torch.Tensor) and rows.dim() == 4:
        grid = _as_batch("rows", rows)[0]
    else:
        grid = video_grid(rows, pad=pad, value_range=value_range, max_items=max_items)
    return write_video(path, grid, fps, value_range=value_range)


def error_video(x: torch.Tensor, recon: torch.Tensor, *, gain: float = 4.0,
                value_range=DEFAULT_RANGE) -> torch.Tensor:
    """``|x - recon| * gain`` mapped into ``value_range`` (0 error = the low end, black), shape of ``x``."""
    lo, hi = check_value_range(value_range)
    return (lo + (x - recon).abs() * gain).clamp(lo, hi)


def reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, *, max_items: int = 8, gain: float = 4.0,
                        pad: int = 2, value_range=DEFAULT_RANGE) -> torch.Tensor:
    """The standard reconstruction picture: rows input / reconstruction / ``|error| x gain``.

    Args:
        x, recon: ``[B, 3, T, H, W]`` in ``value_range`` (same shape).
    Returns:
        grid clip ``[3, T, 3*(H+pad)+pad, min(B, max_items)*(W+pad)+pad]``.
    """
    x, recon = _as_batch("x", x), _as_batch("recon", recon)
    if x.shape != recon.shape:
        raise ValueError(f"x and recon must have the same shape, got {tuple(x.shape)} and {tuple(recon.shape)}")
    x, recon = x[:max_items], recon[:max_items]
    err = error_video(x, recon, gain=gain, value_range=value_range)
    return video_grid([x, recon, err], pad=pad, value_range=value_range)


def samples_grid(videos: torch.Tensor, labels, *, max_per_class: int | None = None, pad: int = 2,
                 value_range=DEFAULT_RANGE) -> torch.Tensor:
    """Generated samples arranged one row per class: row ``r`` holds the samples of class
    ``sorted(set(labels))[r]``, in their original order.

    Args:
        videos: ``[N, 3, T, H, W]`` in ``value_range``.
        labels: ``[N]`` integer class of each sample.
    Returns:
        grid clip ``[3, T, H', W']``; classes with fewer samples leave blank cells.
    """
    videos = _as_batch("videos", videos)
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.numel() != videos.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries for {videos.shape[0]} videos")
    rows = [videos[labels == c][:max_per_class] for c in sorted(set(labels.tolist()))]
    return video_grid(rows, pad=pad, value_range=value_range)
