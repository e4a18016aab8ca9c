"""dera_fast._files: output checks (inputs, special files, folders, overwrite), atomic writes that follow the umask
and leave nothing behind on failure, and the cleanup of temporaries left by killed writers."""
import os
import socket
import subprocess
import sys

import pytest

from dera_fast._files import (OutputError, atomic_dir, atomic_file, check_output, clean_stale, temp_name,
                              write_text)


def test_check_output_refuses_inputs_and_special_files(tmp_path):
    src = tmp_path / "in.mp4"
    src.write_bytes(b"video")
    with pytest.raises(OutputError, match="also an input"):
        check_output(src, inputs=[src], overwrite=True)
    os.link(src, tmp_path / "hard.mp4")  # same inode under another name
    with pytest.raises(OutputError, match="also an input"):
        check_output(tmp_path / "hard.mp4", inputs=[src], overwrite=True)
    (tmp_path / "sym.mp4").symlink_to(src)
    with pytest.raises(OutputError, match="also an input"):
        check_output(tmp_path / "sym.mp4", inputs=[src], overwrite=True)
    with pytest.raises(OutputError, match="exists .*--overwrite"):
        check_output(src)
    assert check_output(src, overwrite=True) == src
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="special file"):
        check_output(tmp_path / "fifo", overwrite=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(OutputError, match="special file"):
            check_output(tmp_path / "sock", overwrite=True)
    with pytest.raises(OutputError, match="special file"):
        check_output("/dev/null", overwrite=True)
    with pytest.raises(OutputError, match="existing folder"):
        check_output(tmp_path, overwrite=True)
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(src / "out.mp4")
    with pytest.raises(OutputError, match="not a folder"):
        check_output(src, kind="dir", overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        check_output(tmp_path, kind="dir", inputs=[src], overwrite=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="dangling"):
        check_output(tmp_path / "dangling")
    assert check_output(tmp_path / "new" / "deeper" / "o.mp4") == tmp_path / "new" / "deeper" / "o.mp4"


def test_atomic_file_follows_umask_and_cleans_up(tmp_path):
    old = os.umask(0o027)
    try:
        import tempfile

        def mkstemp_writer(tmp):  # writers built on mkstemp create 0600 files
            fd, name = tempfile.mkstemp(dir=tmp.parent)
            os.close(fd)
            os.replace(name, tmp)

        with atomic_file(tmp_path / "a.bin") as tmp:
            mkstemp_writer(tmp)
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)
    write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "keep.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "y").write_text("2")
            raise RuntimeError("writer failed")
    assert (tmp_path / "keep.txt").read_text() == "old" and sorted(os.listdir(tmp_path / "d")) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "d", "keep.txt"]  # no temporaries left
    with atomic_dir(tmp_path / "d") as tmp:  # replacing a whole folder
        (tmp / "z").write_text("3")
    assert sorted(os.listdir(tmp_path / "d")) == ["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "d", "keep.txt"]


def test_temp_names_keep_the_suffix():
    t = temp_name("/x/out.mp4")
    assert t.suffix == ".mp4" and t.name.startswith(".out.tmp") and str(os.getpid()) in t.name


def test_clean_stale_removes_only_dead_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    mine = os.getpid()
    names = [f".out.tmp{dead}-0badcafe.mp4", f".model.tmp{dead}-0badcafe", f".tokens.safetensors.tmp{dead}",
             f".out.tmp{mine}-0badcafe.mp4", f".eval.json.tmp{dead}-0badcafe", "visible.tmp123"]
    for n in names:
        (tmp_path / n).mkdir() if n.startswith(".model") else (tmp_path / n).write_text("x")
    # a folder moved aside by a killed atomic_dir whose replacement never arrived is put back
    (tmp_path / f".run.old{dead}-0badcafe").mkdir()
    (tmp_path / f".run.old{dead}-0badcafe" / "f").write_text("kept")
    clean_stale(tmp_path, names={"nothing"})
    assert len(list(tmp_path.iterdir())) == len(names) + 1
    removed = clean_stale(tmp_path)
    assert len(removed) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.tmp{mine}-0badcafe.mp4", "visible.tmp123",
                                                                 "run"])
    assert (tmp_path / "run" / "f").read_text() == "kept"
