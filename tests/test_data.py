"""Datasets: LARP's clip protocol (frame count, crop, flip, padding, labels), CSV parsing, determinism;
SyntheticClips from the photographs inside the scikit-image / scikit-learn wheels."""
import importlib.util

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dera_fast.data import (MissingDependencyError, SyntheticClips, VideoFolderDataset, read_larp_csv, read_video,
                            write_video)
from dera_fast.data import synthetic

HAS_DATA = all(importlib.util.find_spec(p) is not None for p in ("skimage", "sklearn"))
requires_data = pytest.mark.skipif(not HAS_DATA, reason="scikit-image/scikit-learn (the 'data' extra) missing")


def coded_video(path, num_frames, h=12, w=16):
    """GIF whose frame k has grey level 8*(k+1) in the left half and white in the right half.

    The grey level identifies the frame (checks consecutive sampling and padding); the halves reveal flips.
    """
    frames = np.full((num_frames, h, w, 3), 255, dtype=np.uint8)
    for k in range(num_frames):
        frames[k, :, : w // 2] = 8 * (k + 1)
    write_video(path, torch.from_numpy(frames), fps=10)
    return path


def frame_codes(clip):
    """Per-frame code k (from the grey level) of a clip in [0, 1] whose dark half is on the left."""
    left = clip[0, :, :, : clip.shape[-1] // 2].mean((1, 2)) * 255
    return (left / 8).round().long() - 1


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "videos"
    (root / "Walk").mkdir(parents=True)
    (root / "Run").mkdir()
    coded_video(root / "Walk" / "a.gif", 20)
    coded_video(root / "Walk" / "b.gif", 12)
    coded_video(root / "Run" / "c.gif", 5)  # shorter than a clip: padded
    coded_video(root / "v_Jump_g01_c01.gif", 9)  # UCF naming at the top level
    return root


def test_folder_protocol(folder):
    ds = VideoFolderDataset(folder, frames=8, size=12, train=False, value_range=(0, 1), seed=3)
    assert len(ds) == 4 and ds.classes == ["Jump", "Run", "Walk"]
    names = [p.name for p in ds.paths]
    assert [ds.labels[names.index(n)] for n in ("a.gif", "c.gif", "v_Jump_g01_c01.gif")] == [2, 1, 0]
    for i in range(len(ds)):
        item = ds[i]
        clip = item["video"]
        assert clip.shape == (3, 8, 12, 12) and item["label"] == ds.labels[i] and item["index"] == i
        assert 0.0 <= float(clip.min()) and float(clip.max()) <= 1.0
        codes = frame_codes(clip)
        n = {"a.gif": 20, "b.gif": 12, "c.gif": 5, "v_Jump_g01_c01.gif": 9}[names[i]]
        if n >= 8:  # 8 consecutive frames from a start in [0, n - 8]
            assert 0 <= int(codes[0]) <= n - 8
            assert torch.equal(codes, codes[0] + torch.arange(8))
        else:  # all frames, then the last one repeated
            assert torch.equal(codes, torch.tensor([0, 1, 2, 3, 4, 4, 4, 4]))


def test_centre_crop_and_resize(tmp_path):
    frames = np.zeros((3, 20, 60, 3), dtype=np.uint8)
    frames[:, :, 20:40] = 255  # white centre square, black sides
    write_video(tmp_path / "wide.gif", torch.from_numpy(frames), fps=10)
    ds = VideoFolderDataset(tmp_path, frames=3, size=20, train=False, value_range=(0, 1))
    assert torch.equal(ds[0]["video"], torch.ones(3, 3, 20, 20))
    ds = VideoFolderDataset(tmp_path, frames=3, size=10, train=False, value_range=(0, 1))
    clip = ds[0]["video"]  # 20x60 -> 10x30 -> centre 10x10: still the white square, up to antialias edges
    assert clip.shape == (3, 3, 10, 10) and float(clip[..., 1:-1].min()) > 0.99


def test_flip_only_in_training(folder):
    train = VideoFolderDataset(folder, frames=4, size=12, train=True, value_range=(0, 1), seed=0)
    evald = VideoFolderDataset(folder, frames=4, size=12, train=False, value_range=(0, 1), seed=0)
    flips = 0
    for epoch in range(6):
        train.set_epoch(epoch)
        evald.set_epoch(epoch)
        for i in range(len(train)):
            t, e = train[i]["video"], evald[i]["video"]
            assert float(e[..., :6].mean()) < float(e[..., 6:].mean())  # eval: dark half stays left
            if torch.equal(t, e.flip(-1)):
                flips += 1
            else:
                assert torch.equal(t, e)  # same start frame; only the flip differs
    assert 6 <= flips <= 18  # about half of 24 draws


def test_determinism_and_epochs(folder):
    a = VideoFolderDataset(folder, frames=4, size=12, seed=7)
    b = VideoFolderDataset(folder, frames=4, size=12, seed=7)
    for i in range(len(a)):
        assert torch.equal(a[i]["video"], b[i]["video"])
    e = VideoFolderDataset(folder, frames=4, size=12, seed=7, train=False, value_range=(0, 1))
    i, starts = e.paths.index(folder / "Walk" / "a.gif"), set()
    for epoch in range(8):
        e.set_epoch(epoch)
        starts.add(int(frame_codes(e[i]["video"])[0]))
    assert len(starts) > 1  # a new random start per epoch


def test_value_range_and_loader(folder):
    lo = VideoFolderDataset(folder, frames=4, size=12, value_range=(0, 1), seed=1)
    pm = VideoFolderDataset(folder, frames=4, size=12, seed=1)  # default [-1, 1]
    torch.testing.assert_close(pm[0]["video"], lo[0]["video"] * 2 - 1, atol=1e-6, rtol=0)
    batch = next(iter(DataLoader(pm, batch_size=3)))
    assert batch["video"].shape == (3, 3, 4, 12, 12) and batch["label"].shape == (3,)


def test_csv(tmp_path, folder):
    csv = tmp_path / "meta.csv"
    csv.write_text("id,path,action,label\n"
                   "0,videos/Walk/a.gif,Walk,1\n"
                   f"1,{folder / 'Run' / 'c.gif'},Run,0\n"
                   "2,videos/Walk/b.gif,Walk,1\n")
    ds = VideoFolderDataset(csv, frames=4, size=12)
    assert ds.classes == ["Run", "Walk"] and ds.labels == [1, 0, 1]
    assert ds[1]["video"].shape == (3, 4, 12, 12)
    rows = read_larp_csv(csv)
    assert rows[0] == (tmp_path / "videos" / "Walk" / "a.gif", "Walk")
    nolabel = tmp_path / "paths.csv"
    nolabel.write_text("path\nvideos/Walk/a.gif\n")
    ds = VideoFolderDataset(nolabel, frames=4, size=12)
    assert ds.classes == [] and ds[0]["label"] == -1


def test_dataset_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        VideoFolderDataset(tmp_path / "missing.csv")
    with pytest.raises(FileNotFoundError, match="nodir"):
        VideoFolderDataset(tmp_path / "nodir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no video files"):
        VideoFolderDataset(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,file\n0,a.mp4\n")
    with pytest.raises(ValueError, match="'path' column"):
        VideoFolderDataset(bad)
    gone = tmp_path / "gone.csv"
    gone.write_text("id,path,action,label\n0,gone.gif,X,0\n")
    with pytest.raises(FileNotFoundError, match="gone.gif"):  # the index reads every file up front
        VideoFolderDataset(gone, frames=4, size=8)
    ds = VideoFolderDataset(gone, frames=4, size=8, index=False)
    with pytest.raises(FileNotFoundError, match="gone.gif"):
        ds[0]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError, match="frames"):
        VideoFolderDataset(folder, frames=0)


@requires_data
def test_synthetic_clips_tiny():
    ds = SyntheticClips(frames=8, size=32, seed=0)
    assert ds.num_classes == 20 and len(ds) == 160 and ds.classes == sorted(ds.classes)
    for i in (0, 1, 7, 19, 23):
        item = ds[i]
        clip = item["video"]
        assert clip.shape == (3, 8, 32, 32) and item["label"] == i % 20
        assert -1.0 <= float(clip.min()) and float(clip.max()) <= 1.0
        assert float((clip[:, 1:] - clip[:, :-1]).abs().mean()) > 1e-3  # the camera or the sprites move
        assert float(clip.std()) > 0.05  # a real photo, not a flat field
    assert torch.equal(ds[5]["video"], SyntheticClips(frames=8, size=32, seed=0)[5]["video"])
    assert not torch.equal(ds[5]["video"], SyntheticClips(frames=8, size=32, seed=1)[5]["video"])
    zo = SyntheticClips(frames=8, size=32, value_range=(0, 1))
    torch.testing.assert_close(zo[3]["video"] * 2 - 1, ds[3]["video"], atol=1e-6, rtol=0)


@requires_data
def test_synthetic_known_motion():
    # A pan samples a fixed photo through a translating window: with the direction read from theta, shifting
    # frame 0 by the known displacement must match the last frame better than not shifting it.
    g = torch.Generator().manual_seed(0)
    theta = synthetic.camera_thetas("pan", 8, g)
    assert torch.allclose(theta[:, :, :2], 0.5 * torch.eye(2).expand(8, 2, 2))
    assert torch.allclose(theta[0, :, 2], -theta[-1, :, 2])  # mirror image through the centre
    for motion in ("zoom", "rotate", "sprites"):
        th = synthetic.camera_thetas(motion, 8, torch.Generator().manual_seed(1))
        corners = th[:, :, :2] @ torch.tensor([[1.0, 1, -1, -1], [1, -1, 1, -1]]) + th[:, :, 2:]
        assert float(corners.abs().max()) <= 1.0 + 1e-6  # the view never leaves the photo
    ds = SyntheticClips(frames=6, size=24, images=("astronaut", "china"), motions=("pan", "sprites"), seed=2)
    assert ds.classes == ["pan-astronaut", "pan-china", "sprites-astronaut", "sprites-china"]


@requires_data
def test_synthetic_export_loads_as_folder(tmp_path):
    ds = SyntheticClips(num_clips=4, frames=4, size=16, images=("coffee",), motions=("pan", "zoom"))
    csv = ds.export(tmp_path / "syn", fps=8, suffix=".gif")
    back = VideoFolderDataset(csv, frames=4, size=16, train=False, random_start=False)
    assert back.classes == ds.classes and back.labels == [ds[i]["label"] for i in range(4)]
    assert float((back[1]["video"] - ds[1]["video"]).abs().mean()) < 0.05  # GIF palette error only


def test_synthetic_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown motion"):
        SyntheticClips(motions=("spin",))
    with pytest.raises(ValueError, match="unknown image"):
        SyntheticClips(images=("mona_lisa",))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"dera-fast\[data\]"):
        SyntheticClips(images=("astronaut",))


def test_read_video_matches_dataset_item(folder):
    ds = VideoFolderDataset(folder, frames=5, size=12, train=False, random_start=False, value_range=(0, 1))
    i = ds.paths.index(folder / "Walk" / "b.gif")
    torch.testing.assert_close(ds[i]["video"], read_video(folder / "Walk" / "b.gif", frames=5, size=12,
                                                          value_range=(0, 1)))
