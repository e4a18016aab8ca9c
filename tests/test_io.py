"""Video I/O: real mp4 encode/decode through PyAV, GIF and PNG fallbacks, odd sizes, clear errors."""
import sys

import numpy as np
import pytest
import torch

from dera_fast.data import io
from dera_fast.data.io import (MissingDependencyError, probe_video, read_video, uint8_to_video, video_to_uint8,
                               write_png_strip, write_video)
from dera_fast.metrics import psnr

try:
    import av  # noqa: F401
    HAS_AV = True
except ImportError:
    HAS_AV = False
requires_av = pytest.mark.skipif(not HAS_AV, reason="PyAV (the 'video' extra) is not installed")


def smooth_clip(t=12, h=32, w=48):
    """A moving colour gradient in [-1, 1], [3, T, H, W]: smooth enough to survive yuv420p + crf 18."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    frames = []
    for k in range(t):
        s = k / max(t - 1, 1)
        frames.append(torch.stack([torch.sin(3 * xx + 2 * s), torch.cos(2 * yy - s), 0.8 * (xx * yy) - 0.4]))
    return torch.stack(frames, dim=1).clamp(-1, 1)  # [3, T, H, W]


@requires_av
def test_mp4_round_trip(tmp_path):
    x = smooth_clip()
    path = write_video(tmp_path / "clip.mp4", x, fps=8)
    info = probe_video(path)
    assert (info["num_frames"], info["height"], info["width"]) == (12, 32, 48)
    assert info["fps"] == pytest.approx(8.0)
    y = read_video(path)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert -1.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert float(psnr(x[None], y[None])) > 35.0


@requires_av
def test_mp4_odd_size_is_padded_even(tmp_path):
    x = smooth_clip(t=5, h=33, w=35)
    path = write_video(tmp_path / "odd.mp4", x, fps=10)
    y = read_video(path)
    assert y.shape == (3, 5, 34, 36)  # one replicated row and column for yuv420p
    assert float(psnr(x[None], y[None, :, :, :33, :35])) > 30.0


@requires_av
def test_mp4_frames_start_fps_size(tmp_path):
    t = 20
    levels = torch.linspace(-0.9, 0.9, t)
    x = levels.view(1, t, 1, 1).expand(3, t, 16, 24).contiguous()  # frame k is a flat grey level
    path = write_video(tmp_path / "ramp.mp4", x, fps=10)
    y = read_video(path, frames=4, start=3)
    assert y.shape == (3, 4, 16, 24)
    torch.testing.assert_close(y.mean((0, 2, 3)), levels[3:7], atol=0.03, rtol=0)
    y = read_video(path, frames=4, start=1, fps=5)  # every second source frame
    torch.testing.assert_close(y.mean((0, 2, 3)), levels[2:10:2], atol=0.03, rtol=0)
    assert read_video(path, size=8).shape == (3, t, 8, 8)
    assert read_video(path, size=(10, 6)).shape == (3, t, 10, 6)
    assert read_video(path, frames=50).shape[1] == t  # a short video returns what it has
    z = read_video(path, frames=2, value_range=(0, 1))
    torch.testing.assert_close(z, (read_video(path, frames=2) + 1) / 2, atol=1e-6, rtol=0)


def test_gif_round_trip_and_odd_size(tmp_path):
    x = smooth_clip(t=6, h=17, w=23)
    path = write_video(tmp_path / "clip.gif", x, fps=10)
    info = probe_video(path)
    assert (info["num_frames"], info["height"], info["width"]) == (6, 17, 23)
    assert info["fps"] == pytest.approx(10.0)
    y = read_video(path)
    assert y.shape == x.shape
    assert float(psnr(x[None], y[None])) > 25.0  # 256-colour palette


def test_gif_fallback_without_av(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    x = smooth_clip(t=3, h=8, w=8)
    with pytest.raises(MissingDependencyError, match=r"dera-fast\[video\]"):
        write_video(tmp_path / "x.mp4", x, fps=8)
    assert not (tmp_path / "x.mp4").exists()
    assert read_video(write_video(tmp_path / "x.gif", x, fps=8)).shape == x.shape
    write_video(tmp_path / "x.png", x, fps=8)
    (tmp_path / "y.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(MissingDependencyError, match=r"dera-fast\[video\]"):
        read_video(tmp_path / "y.mp4")


def test_png_strip_and_uint8(tmp_path):
    from PIL import Image

    x = smooth_clip(t=5, h=9, w=7)
    with Image.open(write_png_strip(tmp_path / "s.png", x)) as im:
        assert im.size == (5 * 7, 9)
    with Image.open(write_png_strip(tmp_path / "s2.png", x, every=2)) as im:
        assert im.size == (3 * 7, 9)
    with Image.open(write_video(tmp_path / "s3.png", smooth_clip(t=20, h=9, w=7), fps=8)) as im:
        assert im.size == (7 * 7, 9)  # at most 8 frames by default: every 3rd of 20
    with Image.open(write_video(tmp_path / "s4.png", smooth_clip(t=20, h=9, w=7), fps=8, png_every=10)) as im:
        assert im.size == (2 * 7, 9)
    frames = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(video_to_uint8(uint8_to_video(frames)), frames)
    np.testing.assert_array_equal(video_to_uint8(uint8_to_video(frames, (0, 1)), (0, 1)), frames)
    write_video(tmp_path / "u8.gif", torch.from_numpy(frames), fps=4)  # uint8 [T, H, W, 3] input
    assert read_video(tmp_path / "u8.gif").shape == (3, 4, 5, 6)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(FileNotFoundError, match="nope.gif"):
        probe_video(tmp_path / "nope.gif")
    bad_gif = tmp_path / "bad.gif"
    bad_gif.write_bytes(b"GIF89a garbage" * 10)
    with pytest.raises(ValueError, match="bad.gif"):
        read_video(bad_gif)
    other = tmp_path / "clip.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="unsupported"):
        read_video(other)
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a file"):
        read_video(folder)


@requires_av
def test_corrupt_mp4(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="bad.mp4"):
        read_video(bad)
    with pytest.raises(ValueError, match="bad.mp4"):
        probe_video(bad)
    good = write_video(tmp_path / "good.mp4", smooth_clip(t=4, h=8, w=8), fps=8)
    with pytest.raises(ValueError, match="past the end"):
        read_video(good, start=10)


def test_bad_arguments(tmp_path):
    x = smooth_clip(t=3, h=8, w=8)
    gif = write_video(tmp_path / "a.gif", x, fps=8)
    with pytest.raises(ValueError, match="frames"):
        read_video(gif, frames=0)
    with pytest.raises(ValueError, match="start"):
        read_video(gif, start=-1)
    with pytest.raises(ValueError, match="fps"):
        read_video(gif, fps=0)
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "b.gif", x, fps=0)
    with pytest.raises(ValueError, match="unsupported output"):
        write_video(tmp_path / "b.xyz", x, fps=8)
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        write_video(tmp_path / "b.gif", x[:2], fps=8)
    with pytest.raises(ValueError, match="value_range"):
        write_video(tmp_path / "b.gif", x, fps=8, value_range=(1, -1))
    with pytest.raises(TypeError):
        write_video(tmp_path / "b.gif", x.numpy(), fps=8)


def test_frame_indices():
    assert io._frame_indices(1.0, 2, 3) == [2, 3, 4]
    assert io._frame_indices(io._step(30.0, 10.0), 0, None, 10) == [0, 3, 6, 9]
    assert io._frame_indices(io._step(30.0, 10.0), 1, 2, 10) == [3, 6]
    assert io._frame_indices(io._step(10.0, 20.0), 0, None, 4) == [0, 0, 1, 1, 2, 2, 3]
    assert io._frame_indices(1.0, 8, 4, 10) == [8, 9]  # past the end: dropped
