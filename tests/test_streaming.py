"""Streaming video: iter_frames / iter_clips give what read_video gives, one clip at a time; VideoWriter writes
chunk by chunk and atomically; encode_stream equals encode_video; tokenize / reconstruct stream (same tokens, same
metrics as in memory) and tokenize's peak RSS stays flat in the video's length."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

from dera_fast.data import (VideoWriter, iter_clips, iter_frames, read_video, repeat_last_frame,  # noqa: E402
                            write_video)
from dera_fast.data.writer import temp_path  # noqa: E402


def pattern(n: int, h: int = 36, w: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [n, h, w, 3]: a smooth moving gradient plus a little noise (survives H.264 well enough)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for k in range(n):
        f = np.stack([128 + 100 * np.sin(xx / 7 + k / 5), 128 + 100 * np.cos(yy / 5 - k / 7),
                      (xx + yy + 3 * k) % 256], -1) + rng.normal(0, 4, (h, w, 3))
        out[k] = np.clip(f, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "v.mp4"
    write_video(path, torch.from_numpy(pattern(45)), fps=10)
    return path


@pytest.mark.parametrize("clip_len,stride", [(8, 8), (8, 3), (5, 11), (1, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("size,fps", [(None, None), (16, None), (16, 6.0)], ids=["native", "s16", "s16-fps6"])
def test_iter_clips_equal_read_video_windows(video, clip_len, stride, size, fps):
    whole = read_video(video, size=size, fps=fps)  # [3, N, H, W]
    n = whole.shape[1]
    stream = iter_clips(video, clip_len, stride, size=size, fps=fps)
    assert stream.expected_frames == n
    clips = list(stream)
    starts = list(range(0, n - clip_len + 1, stride))
    assert len(clips) == len(starts) and stream.frames_read == n and not stream.padded
    for s, c in zip(starts, clips):
        torch.testing.assert_close(c, whole[:, s:s + clip_len], atol=1e-6, rtol=0)
    frames = list(iter_frames(video, size=size, fps=fps, start=3, frames=7))
    torch.testing.assert_close(torch.stack(frames, 1), whole[:, 3:10], atol=1e-6, rtol=0)


def test_short_video_is_padded_and_value_range(tmp_path):
    path = write_video(tmp_path / "short.mp4", torch.from_numpy(pattern(5)), fps=10)
    stream = iter_clips(path, 8, size=16, value_range=(0, 1))
    (clip,) = list(stream)
    assert stream.padded and stream.frames_read == 5
    torch.testing.assert_close(clip, repeat_last_frame(read_video(path, size=16, value_range=(0, 1)), 8))
    assert list(iter_clips(path, 8, pad=False)) == []
    with pytest.raises(ValueError, match="stride"):
        iter_clips(path, 8, 0)
    with pytest.raises(ValueError, match="fps"):
        iter_clips(path, 8, fps=float("inf"))
    with pytest.raises(FileNotFoundError):
        iter_clips(tmp_path / "nope.mp4", 8)


def test_repeat_last_frame_matches_larp():
    def larp_repeat_to_m_frames(v, m):  # LARP utils/common.py, restated: (b, c, t, h, w), cat the last frame
        b, c, t, h, w = v.shape
        return v if t >= m else torch.cat([v, v[:, :, -1:].repeat(1, 1, m - t, 1, 1)], dim=2)

    for t in (1, 3, 5, 16, 17):
        x = torch.randn(2, 3, t, 4, 5)
        torch.testing.assert_close(repeat_last_frame(x, 16), larp_repeat_to_m_frames(x, 16), atol=0, rtol=0)
        torch.testing.assert_close(repeat_last_frame(x[0], 16), larp_repeat_to_m_frames(x, 16)[0], atol=0, rtol=0)
    x = torch.randint(0, 255, (3, 20, 2, 2), dtype=torch.uint8)
    assert repeat_last_frame(x, 16) is x  # unchanged (the same tensor) when long enough
    with pytest.raises(ValueError, match="C, T, H, W"):
        repeat_last_frame(torch.zeros(3, 4, 5), 8)
    with pytest.raises(ValueError, match="frames"):
        repeat_last_frame(x, 0)


def test_video_writer_chunks_and_atomicity(tmp_path, video):
    # NOTE: one x264 thread and a width that is a multiple of 128: measured, only then is libx264's bitstream a
    # function of the frames alone (other widths differ from run to run, chunked or not).
    frames = torch.from_numpy(pattern(30, 36, 128))
    with VideoWriter(tmp_path / "whole.mp4", 10, threads=1) as w:
        w.write(frames)
    with VideoWriter(tmp_path / "chunks.mp4", 10, threads=1) as w:
        for i in range(0, 30, 7):
            w.write(frames[i:i + 7])
    np.testing.assert_array_equal(read_video(tmp_path / "chunks.mp4").numpy(),
                                  read_video(tmp_path / "whole.mp4").numpy())
    target = tmp_path / "keep.mp4"
    target.write_bytes(b"precious")
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(target, 10) as w:
            for _ in range(4):  # past the encoder's lookahead, so the temporary file exists
                w.write(frames)
            assert temp_path(target).exists()
            raise RuntimeError("boom")
    assert target.read_bytes() == b"precious" and not temp_path(target).exists()
    with pytest.raises(ValueError, match="no frames"):
        VideoWriter(tmp_path / "empty.mp4", 10).close()
    assert not (tmp_path / "empty.mp4").exists()
    with pytest.raises(ValueError, match="earlier ones"):
        with VideoWriter(tmp_path / "mixed.gif", 10) as w:
            w.write(frames[:2])
            w.write(frames[:2, :10])
    assert not (tmp_path / "mixed.gif").exists()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dera_fast.models import DeRATokenizer, TokenizerConfig

    torch.manual_seed(0)
    model = DeRATokenizer(TokenizerConfig.from_name("tiny")).eval()
    folder = tmp_path_factory.mktemp("tok") / "model"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_encode_stream_equals_encode_video(video, tiny_model, batch_size):
    model, _ = tiny_model
    cfg = model.config
    whole = read_video(video, size=cfg.size, value_range=cfg.pixel_range)
    ref = model.encode_video(whole, stride=5, batch_size=4, progress=False)
    got, seen = [], []
    for clips, ids in model.encode_stream(iter_clips(video, cfg.num_frames, 5, size=cfg.size,
                                                     value_range=cfg.pixel_range), batch_size):
        assert clips.shape[0] == ids.shape[0] <= batch_size and ids.dtype == torch.int64
        got.append(ids)
        seen.append(clips)
    assert torch.equal(torch.cat(got), ref)
    assert torch.equal(torch.cat(seen)[1], whole[:, 5:5 + cfg.num_frames])
    with pytest.raises(ValueError, match="clips must be"):
        list(model.encode_stream([whole[:, :3]]))


def test_tokenize_and_reconstruct_stream(video, tiny_model, tmp_path, capsys):
    from dera_fast import metrics
    from dera_fast.cli import main
    from dera_fast.train.tokens import load_tokens

    model, folder = tiny_model
    cfg = model.config
    out = tmp_path / "t.safetensors"
    assert main(["tokenize", str(video), str(out), "--model", str(folder), "--stride", "6", "--batch-size", "3",
                 "--no-progress", "--device", "cpu"]) == 0
    ids, _, meta = load_tokens(out)
    whole = read_video(video, size=cfg.size, value_range=cfg.pixel_range)
    assert torch.equal(ids, model.encode_video(whole, stride=6, progress=False))
    rec = tmp_path / "r.mp4"
    capsys.readouterr()
    assert main(["reconstruct", str(video), str(rec), "--model", str(folder), "--metrics", "--batch-size", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    n = whole.shape[1] // cfg.num_frames * cfg.num_frames
    ids = model.encode_video(whole, progress=False)
    recon = model.decode(ids).clamp(*cfg.pixel_range).permute(1, 0, 2, 3, 4).flatten(1, 2)  # [3, n, S, S]
    x = whole[None, :, :n]
    expect = (f"PSNR {float(metrics.psnr(x, recon[None], value_range=cfg.pixel_range)):.2f} dB  "
              f"SSIM {float(metrics.ssim(x, recon[None], value_range=cfg.pixel_range)):.4f}")
    assert expect in printed
    info = av.open(str(rec))
    assert info.streams.video[0].frames == n and float(info.streams.video[0].average_rate) == 10.0
    info.close()
    assert main(["reconstruct", str(video), str(tmp_path / "r.mp4"), "--model", str(folder), "--fps", "inf",
                 "--no-progress"]) == 2


def _tokenize_peak_rss_mb(video, folder, tmp_path) -> float:
    # NOTE: VmHWM, the peak of this process image: ru_maxrss would include the parent's RSS at fork (Linux)
    code = ("import re, sys\nfrom dera_fast.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "sys.exit(rc)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code, "tokenize", str(video), str(tmp_path / f"{video.stem}.st"),
                          "--model", str(folder), "--no-progress", "--device", "cpu", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split("MAXRSS")[1].split()[0]) / 1024


@pytest.mark.slow
def test_tokenize_peak_rss_is_flat_in_video_length(tiny_model, tmp_path):
    """A 10x longer video must not raise tokenize's peak RSS: the old whole-video decode needed ~N * 0.7 MB here
    (float32 frames at 320x180), i.e. +400 MB for the long one."""
    _, folder = tiny_model
    base = torch.from_numpy(pattern(60, 180, 320))
    short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
    write_video(short, base, fps=25, crf=30)
    with VideoWriter(long, 25, crf=30) as w:
        for _ in range(10):
            w.write(base)
    rss_short = _tokenize_peak_rss_mb(short, folder, tmp_path)
    rss_long = _tokenize_peak_rss_mb(long, folder, tmp_path)
    assert rss_long - rss_short < 60, (rss_short, rss_long)
