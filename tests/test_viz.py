"""Visual output: grids built in torch, written as mp4 / GIF / PNG strip; benchmark plots from pytest-benchmark JSON."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dera_fast.data import probe_video, read_video
from dera_fast.viz import reconstruction_grid, samples_grid, save_video_grid, video_grid

HAS_AV = importlib.util.find_spec("av") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def clips(n, t=4, h=6, w=5, seed=0):
    return torch.rand(n, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_video_grid_layout():
    a, b = clips(3), clips(2, seed=1)
    g = video_grid([a, b], pad=2)
    assert g.shape == (3, 4, 2 * (6 + 2) + 2, 3 * (5 + 2) + 2)
    torch.testing.assert_close(g[:, :, 2:8, 2 + 7:2 + 7 + 5], a[1])  # row 0, column 1
    torch.testing.assert_close(g[:, :, 10:16, 2:7], b[0])  # row 1, column 0
    assert torch.all(g[:, :, 10:16, 16:21] == -1)  # row 1 has no third item: blank (low end of the range)
    assert torch.all(g[:, :, :2] == -1)  # the border
    assert video_grid(a, pad=0, max_items=2).shape == (3, 4, 6, 10)
    with pytest.raises(ValueError, match="clip shape"):
        video_grid([a, clips(1, h=7)])
    with pytest.raises(ValueError, match="empty"):
        video_grid([])


def test_reconstruction_grid_rows():
    x = clips(3)
    recon = x.clone()
    recon[1] += 0.1
    g = reconstruction_grid(x, recon, pad=1)
    assert g.shape == (3, 4, 3 * 7 + 1, 3 * 6 + 1)
    err = g[:, :, 1 + 2 * 7:1 + 2 * 7 + 6]  # third row: |error| x 4 mapped to [-1, 1]
    assert torch.all(err[..., 1:6] == -1)  # item 0 is exact: black
    torch.testing.assert_close(err[..., 7:12], torch.full((3, 4, 6, 5), -1 + 0.4), atol=1e-5, rtol=0)
    assert reconstruction_grid(clips(10), clips(10), max_items=4).shape[-1] == 4 * 7 + 2
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_grid(x, x[:2])


def test_samples_grid_per_class():
    v = clips(5)
    g = samples_grid(v, [2, 0, 2, 1, 2], pad=0)
    assert g.shape == (3, 4, 3 * 6, 3 * 5)  # classes 0, 1, 2 as rows; class 2 has 3 samples
    torch.testing.assert_close(g[:, :, :6, :5], v[1])
    torch.testing.assert_close(g[:, :, 12:18, 10:15], v[4])
    assert samples_grid(v, [2, 0, 2, 1, 2], max_per_class=1, pad=0).shape == (3, 4, 18, 5)
    with pytest.raises(ValueError, match="labels"):
        samples_grid(v, [0, 1])


@pytest.mark.parametrize("suffix", [".gif", ".png", pytest.param(".mp4", marks=pytest.mark.skipif(
    not HAS_AV, reason="PyAV (the 'video' extra) is not installed"))])
def test_save_video_grid_sizes(tmp_path, suffix):
    x = clips(2, t=3, h=9, w=8)
    path = save_video_grid([x, x], tmp_path / f"grid{suffix}", fps=4, pad=1)
    h, w = 2 * 10 + 1, 2 * 9 + 1  # 21 x 19: odd on purpose
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            assert im.size == (3 * w, h)  # the three frames side by side
    else:
        info = probe_video(path)
        even = suffix == ".mp4"  # yuv420p pads odd sizes by one pixel
        assert (info["num_frames"], info["height"], info["width"]) == (3, h + even, w + even)
        assert read_video(path).shape == (3, 3, h + even, w + even)
    grid = reconstruction_grid(x, x)
    assert save_video_grid(grid, tmp_path / f"rec{suffix}", fps=4).exists()  # a ready grid works too


def _bench_json(path):
    def bench(backend, shape, ms, **extra):
        return {"group": "vq", "name": f"bench_vq[{backend}-{shape}]", "param": f"{backend}-{shape}",
                "params": {"backend": backend, "shape": shape}, "stats": {"median": ms / 1e3},
                "extra_info": {"ms": ms, "GB/s": 10.0 / ms, "device": "test-cpu", **extra}}
    data = {"benchmarks": [bench("torch", "N17", 2.0), bench("triton", "N17", 1.0), bench("torch", "N4096", 8.0),
                           bench("cuda", "N4096", 2.0), bench("triton", "N4096", 4.0, baseline_ms=12.0)]}
    path.write_text(json.dumps(data))
    return path


def _plot_bench():
    spec = importlib.util.spec_from_file_location(
        "plot_bench", Path(__file__).resolve().parents[1] / "bench" / "plot_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_bench_table_and_png(tmp_path, capsys):
    pb = _plot_bench()
    src = _bench_json(tmp_path / "results.json")
    assert pb.main([str(src), "--md", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| vq | N17 | triton | 1 | 10 GB/s | 2.00x | test-cpu |" in table
    assert "| vq | N4096 | cuda | 2 | 5 GB/s | 4.00x |" in table
    assert "| vq | N4096 | triton | 4 | 2.5 GB/s | 3.00x |" in table  # its own same-run baseline wins
    if HAS_MPL:
        assert pb.main([str(src), "--out", str(tmp_path / "p.png"), "--md", "-"]) == 0
        assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "speed-up" in capsys.readouterr().out
    assert pb.main([str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text("{not json")
    assert pb.main([str(tmp_path / "bad.json")]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
