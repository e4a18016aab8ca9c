"""The demo's pictures: labelled frame strips (reconstructions, samples), labelled animations (the real-video side by
side, samples) and the training curves.

Clips are float ``[3, T, H, W]`` in ``value_range``. Pictures are built as uint8 RGB arrays with Pillow (nearest-
neighbour upscaling, so every pixel the model produced stays visible) and written atomically.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ._files import write_file

log = logging.getLogger("dera_fast.demo")

BG, FG, GRID = (255, 255, 255), (20, 20, 20), (200, 200, 200)


def _font(size: int = 14):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 ships a scalable default font
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def to_uint8(clip: torch.Tensor, value_range) -> np.ndarray:
    """float ``[3, T, H, W]`` in ``value_range`` -> uint8 ``[T, H, W, 3]``."""
    lo, hi = value_range
    x = ((clip.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of ``[..., H, W, 3]`` by an integer factor."""
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2)


def error_clip(x: torch.Tensor, recon: torch.Tensor, value_range, gain: float = 4.0) -> torch.Tensor:
    """``|x - recon| * gain`` in ``value_range`` (0 error = the low end, black)."""
    lo, hi = value_range
    return (lo + (x - recon).abs() * gain).clamp(lo, hi)


def _save_png(path: Path, image: np.ndarray) -> Path:
    from PIL import Image

    img = Image.fromarray(image)
    return write_file(path, lambda tmp: img.save(tmp, format="PNG", optimize=True))


def strip_picture(blocks: Sequence[dict], value_range, *, scale: int = 3, label_width: int = 150,
                  gap: int = 2) -> np.ndarray:
    """One picture of labelled frame strips.

    Args:
        blocks: ``[{"title": str, "rows": [(label, clip [3, T, H, W]), ...]}, ...]``; every clip has the same
            ``T, H, W``. Each row shows the clip's frames left to right, upscaled ``scale`` x (nearest neighbour).
        scale: rows are ``H * scale`` pixels tall (>= 96 for a readable picture of 32 x 32 clips at scale 3).
    Returns:
        uint8 ``[H', W', 3]``.
    """
    from PIL import Image, ImageDraw

    t, h, w = blocks[0]["rows"][0][1].shape[1:]
    cell_h, cell_w, title_h = h * scale, w * scale, 26
    width = label_width + t * (cell_w + gap)
    height = sum(title_h + len(b["rows"]) * (cell_h + gap) + 8 for b in blocks)
    canvas = Image.new("RGB", (width, height), BG)
    draw, font, bold = ImageDraw.Draw(canvas), _font(14), _font(16)
    y = 0
    for b in blocks:
        draw.text((6, y + 5), b["title"], fill=FG, font=bold)
        y += title_h
        for label, clip in b["rows"]:
            frames = upscale(to_uint8(clip, value_range), scale)            # [T, cell_h, cell_w, 3]
            for lineno, line in enumerate(label.split("\n")):
                draw.text((6, y + cell_h // 2 - 9 + 17 * lineno - 8 * label.count("\n")), line, fill=FG, font=font)
            for i in range(t):
                canvas.paste(Image.fromarray(frames[i]), (label_width + i * (cell_w + gap), y))
            y += cell_h + gap
        y += 8
    return np.asarray(canvas)


def animation(grid: Sequence[Sequence[torch.Tensor]], value_range, *, col_titles: Sequence[str] = (),
              row_labels: Sequence[str] = (), title: str = "", scale: int = 3, gap: int = 4) -> np.ndarray:
    """Clips tiled into one labelled animation.

    Args:
        grid: ``grid[r][c]`` a clip ``[3, T, H, W]``; all share the shape.
        col_titles, row_labels: text above each column / left of each row (either may be empty).
        title: text above everything (lines split at newlines; the picture widens to fit it).
    Returns:
        uint8 ``[T, H', W', 3]`` frames (for :func:`dera_fast.data.write_video`).
    """
    from PIL import Image, ImageDraw

    t, h, w = grid[0][0].shape[1:]
    cell_h, cell_w = h * scale, w * scale
    label_w = 130 if row_labels else gap
    lines = title.split("\n") if title else []
    top = 20 * len(lines) + 4 * bool(lines) + (22 if col_titles else 0) + gap
    n_rows, n_cols = len(grid), max(len(r) for r in grid)
    font, title_font = _font(14), _font(16)
    text_w = max([int(title_font.getlength(line)) + 12 for line in lines], default=0)
    width = max(label_w + n_cols * (cell_w + gap), text_w)
    height = top + n_rows * (cell_h + gap)
    base = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(base)
    for i, line in enumerate(lines):
        draw.text((6, 4 + 20 * i), line, fill=FG, font=title_font)
    for c, text in enumerate(col_titles):
        draw.text((label_w + c * (cell_w + gap) + 2, top - 22), text, fill=FG, font=font)
    for r, text in enumerate(row_labels):
        draw.text((6, top + r * (cell_h + gap) + cell_h // 2 - 8), text, fill=FG, font=font)
    out = np.repeat(np.asarray(base)[None], t, axis=0).copy()               # [T, height, width, 3]
    for r, row in enumerate(grid):
        for c, clip in enumerate(row):
            y0, x0 = top + r * (cell_h + gap), label_w + c * (cell_w + gap)
            out[:, y0:y0 + cell_h, x0:x0 + cell_w] = upscale(to_uint8(clip, value_range), scale)
    return out


def write_animation(stem: Path, frames: np.ndarray, fps: float) -> list[str]:
    """``frames`` uint8 ``[T, H, W, 3]`` to ``stem``.mp4 (when PyAV is installed; else one warning) and .gif."""
    from dera_fast.data import MissingDependencyError, write_video

    video = torch.from_numpy(np.ascontiguousarray(frames))
    written = []
    for suffix in (".mp4", ".gif"):
        try:
            written.append(str(write_video(stem.with_suffix(suffix), video, fps)))
        except MissingDependencyError as e:
            log.warning("skipped %s (PyAV is not installed: %s); the .gif is written", stem.with_suffix(suffix).name, e)
    return written


def training_curves(path: Path, curve: Sequence[dict], losses: Sequence[tuple[int, float]], baselines: dict,
                    *, title: str = "") -> Path:
    """Training loss and held-out PSNR against step, with the baselines as horizontal lines.

    Args:
        curve: ``[{"step", "psnr"}, ...]`` held-out evaluations.
        losses: ``[(step, loss), ...]`` logged training losses.
        baselines: ``{label: psnr}`` drawn as horizontal lines on the PSNR panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax_loss, ax_psnr = fig.subplots(1, 2)
    if losses:
        s, v = zip(*losses)
        ax_loss.plot(s, v, color="tab:blue", lw=1.2, marker="." if len(s) < 20 else None)
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="training loss (MSE on [0,1] pixels + VQ)", title="training loss")
    ax_loss.grid(alpha=0.3)
    ax_psnr.plot([p["step"] for p in curve], [p["psnr"] for p in curve], "o-", color="tab:red", lw=1.5,
                 label="DeRA tokenizer (held-out)")
    styles = iter([("tab:green", "--"), ("tab:purple", "--"), ("gray", ":")])
    for label, value in baselines.items():
        color, ls = next(styles, ("black", "-."))
        ax_psnr.axhline(value, color=color, ls=ls, lw=1.2, label=f"{label}: {value:.2f} dB")
    ax_psnr.set(xlabel="step", ylabel="PSNR (dB)", title="held-out real clips")
    ax_psnr.grid(alpha=0.3)
    ax_psnr.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    return write_file(path, lambda tmp: fig.savefig(tmp, format="png"))


def reconstruction_picture(path: Path, x: torch.Tensor, recon: torch.Tensor, psnrs: Sequence[float],
                           titles: Sequence[str], value_range, *, thumb: torch.Tensor | None = None,
                           thumb_psnrs: Sequence[float] = (), scale: int = 3) -> Path:
    """``path``: one block per clip, rows input / reconstruction (/ 4x4 thumbnail) / |error| x 4, frames across.

    Args:
        x, recon: ``[N, 3, T, H, W]``; psnrs, titles: one per clip; thumb: the thumbnail baseline's frames.
    """
    blocks = []
    for i in range(len(x)):
        rows = [("input", x[i]), (f"reconstruction\n{psnrs[i]:.1f} dB", recon[i])]
        if thumb is not None:
            rows.append((f"4x4 thumbnail\n{thumb_psnrs[i]:.1f} dB", thumb[i]))
        rows.append(("|error| x 4\n(reconstruction)", error_clip(x[i], recon[i], value_range)))
        blocks.append({"title": f"{titles[i]}    PSNR {psnrs[i]:.2f} dB", "rows": rows})
    return _save_png(path, strip_picture(blocks, value_range, scale=scale))


def samples_picture(path: Path, videos: torch.Tensor, labels: Sequence[int], class_names: Sequence[str],
                    value_range, *, scale: int = 3) -> Path:
    """``path``: generated samples, one block per class, one row per sample, frames across."""
    blocks = []
    for c in sorted({int(v) for v in labels}):
        idx = [i for i, v in enumerate(labels) if int(v) == c]
        blocks.append({"title": f"class {c}: {class_names[c]}",
                       "rows": [(f"sample {k + 1}", videos[i]) for k, i in enumerate(idx)]})
    return _save_png(path, strip_picture(blocks, value_range, scale=scale))
