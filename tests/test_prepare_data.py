"""prepare-data: folder and CSV sources, layout and CSV kept, short side and keyframe interval, frames equal to the
exact resize, reruns skip complete outputs and redo broken ones, stale temporary files go, DST never overlaps SRC."""
import csv
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is not installed")

from dera_fast.cli import main  # noqa: E402
from dera_fast.data import VideoFolderDataset, probe_video, read_video, write_video  # noqa: E402
from dera_fast.metrics import psnr  # noqa: E402


def frames(n, h, w, seed=0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.stack([np.stack([128 + 90 * np.sin(xx / 9 + k / 4 + seed), 128 + 90 * np.cos(yy / 7 - k / 6),
                              (xx * 2 + yy + 5 * k) % 256], -1) for k in range(n)])
    return torch.from_numpy(np.clip(out + rng.normal(0, 2, out.shape), 0, 255).astype(np.uint8))


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    write_video(root / "Run" / "a.mp4", frames(20, 72, 128), fps=25)
    write_video(root / "Run" / "b.avi", frames(9, 96, 64, 1), fps=10)        # portrait, AVI
    write_video(root / "Walk" / "c.gif", frames(6, 40, 60, 2), fps=10)       # GIF, odd resized width
    write_video(root / "v_Jump_g01_c01.mkv", frames(18, 64, 86, 3), fps=25)  # UCF naming at the top level
    return root


def luma(x):
    """BT.601 luma of [3, T, H, W]."""
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]


def keyframes(path):
    with av.open(str(path)) as c:
        return [i for i, p in enumerate(p for p in c.demux(video=0) if p.size) if p.is_keyframe]


def test_folder(src, tmp_path, capsys):
    dst = tmp_path / "small"
    assert main(["prepare-data", str(src), str(dst), "--size", "32", "--keyint", "8", "--crf", "0", "--no-progress"]) == 0
    assert "4 transcoded, 0 already complete, 0 failed" in capsys.readouterr().out
    outs = {p.relative_to(dst).as_posix() for p in dst.rglob("*.mp4")}
    assert outs == {"Run/a.mp4", "Run/b.mp4", "Walk/c.mp4", "v_Jump_g01_c01.mp4"}
    for rel, source in [("Run/a.mp4", "Run/a.mp4"), ("Run/b.mp4", "Run/b.avi"), ("Walk/c.mp4", "Walk/c.gif"),
                        ("v_Jump_g01_c01.mp4", "v_Jump_g01_c01.mkv")]:
        info, src_info = probe_video(dst / rel), probe_video(src / source)
        assert min(info["height"], info["width"]) == 32 and info["num_frames"] == src_info["num_frames"]
        h, w = src_info["height"], src_info["width"]
        shape = (32, int(32 * w / h)) if h <= w else (int(32 * h / w), 32)
        got = read_video(dst / rel, value_range=(0, 1))[:, :, :shape[0], :shape[1]]  # drop the even-size padding
        want = read_video(src / source, size=shape, value_range=(0, 1))
        # crf 0 keeps luma lossless up to rounding; yuv420p halves the chroma resolution, so compare luma
        assert float(psnr(luma(got)[None], luma(want)[None], value_range=(0, 1))) > 40, rel
    assert keyframes(dst / "Run/a.mp4") == [0, 8, 16]
    rows = list(csv.DictReader(open(dst / "src.csv")))
    assert [(r["path"], r["action"]) for r in rows] == [("Run/a.mp4", "Run"), ("Run/b.mp4", "Run"),
                                                        ("Walk/c.mp4", "Walk"), ("v_Jump_g01_c01.mp4", "Jump")]
    original = VideoFolderDataset(src, frames=4, size=32, progress=False)
    for ds in (VideoFolderDataset(dst, frames=4, size=32, progress=False),
               VideoFolderDataset(dst / "src.csv", frames=4, size=32, progress=False)):
        assert ds.classes == original.classes and ds.labels == original.labels
        assert ds[0]["video"].shape == (3, 4, 32, 32)


def test_rerun_skips_complete_and_redoes_broken(src, tmp_path, capsys):
    dst = tmp_path / "small"
    argv = ["prepare-data", str(src), str(dst), "--size", "32", "--no-progress", "--workers", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4")}
    broken = dst / "Run" / "a.mp4"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])  # a damaged output
    stale = dst / "Walk" / ".c.tmp999999999.mp4"  # a killed run's leftover (no such process)
    stale.write_bytes(b"partial")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1 transcoded, 3 already complete, 0 failed, 1 stale temporary files removed" in out
    assert not stale.exists() and probe_video(broken)["num_frames"] == 20
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != broken)


def test_csv_source(src, tmp_path):
    listing = tmp_path / "src" / "train.csv"
    listing.write_text("id,path,action,label\n0,Run/a.mp4,Run,0\n1,Walk/c.gif,Walk,1\n")
    dst = tmp_path / "small"
    assert main(["prepare-data", str(listing), str(dst), "--size", "24", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(dst / "train.csv")))
    assert rows == [{"id": "0", "path": "Run/a.mp4", "action": "Run", "label": "0"},
                    {"id": "1", "path": "Walk/c.mp4", "action": "Walk", "label": "1"}]
    ds = VideoFolderDataset(dst / "train.csv", frames=4, size=24, progress=False)
    assert len(ds) == 2 and ds.classes == ["Run", "Walk"]


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_refuses_overlapping_dst(src, tmp_path, capsys, where):
    dst = {"same": src, "inside": src / "small", "parent": tmp_path}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["prepare-data", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "overlaps SRC" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_arguments_and_failures(src, tmp_path, capsys):
    assert main(["prepare-data", str(src), str(tmp_path / "o"), "--size", "0"]) == 2
    assert main(["prepare-data", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    (src / "Run" / "broken.mp4").write_bytes(os.urandom(2048))
    assert main(["prepare-data", str(src), str(tmp_path / "o"), "--size", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 of 5 videos failed" in err and "broken.mp4" in err
    rows = list(csv.DictReader(open(tmp_path / "o" / "src.csv")))
    assert len(rows) == 4 and not (tmp_path / "o" / "Run" / "broken.mp4").exists()
