"""Writing files safely: outputs never destroy inputs or special files, and every write is atomic.

* :func:`check_output` refuses an output that is an input (same path or same inode), a folder where a file is
  expected (or the reverse), an existing device / FIFO / socket, a path under an existing file, or an existing
  output without ``overwrite``.
* :func:`atomic_file` / :func:`write_text` and :func:`atomic_dir` write under a temporary name in the target's
  folder (so the final rename is atomic), fsync, then publish with ``os.replace``; the temporary is removed on every
  error path. Created files and folders follow the user's umask.
* Temporary names carry the writer's pid (``.<name>.tmp<pid>-<tag><suffix>``); :func:`clean_stale` removes the
  ones whose process is dead (a killed run), and puts back a folder a killed :func:`atomic_dir` had moved aside.

``DERA_FAST_TEST_SLOW_WRITE=<seconds>[:<text>]`` sleeps inside every atomic write (of a path holding ``text``),
after the data is written and before it is published: the kill-and-resume tests use it to land a SIGKILL there.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("dera_fast")

# .<name>.tmp<pid>[-<tag>][<suffix>]: every atomic write (ours, dera_fast.data's writer, the eval results);
# .<name>.old<pid>-<tag>: a folder moved aside by atomic_dir while its replacement is renamed in.
_TEMP = re.compile(r"^\.(?P<base>.+?)\.(?P<kind>tmp|old)(?P<pid>\d+)(?:-[0-9a-f]{8})?(?P<suffix>\.[^.]+)?$")


class OutputError(ValueError):
    """An output path that would destroy an input or a special file, or replace an output without permission."""


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without the set-and-restore race
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> bool:
    try:
        return child.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_output(path: str | os.PathLike, *, inputs=(), overwrite: bool = False, kind: str = "file",
                 what: str = "output") -> Path:
    """Validate an output path before any work is done; returns it as a Path.

    Args:
        inputs: paths the command reads (files or folders). The output may not be one of them (same path or same
            inode) and, for ``kind="dir"``, may not contain one.
        overwrite: allow replacing an existing output of the right kind.
        kind: ``"file"`` or ``"dir"``.
        what: how errors name the path (e.g. ``"--out"``).
    Raises:
        OutputError (a ValueError) naming the path and the reason.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(path)
    if str(path) == "" or (kind == "file" and p.name in ("", ".", "..")):
        raise OutputError(f"{what} {str(path)!r} is not a usable {kind} name")
    if p.name in ("", ".", ".."):  # a folder given as ".": name it
        p = Path(os.path.abspath(p))
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        if _same_file(p, src):
            raise OutputError(f"{what} {p} is also an input; refusing to overwrite it (write elsewhere)")
        if kind == "dir" and src.exists() and _inside(src, p):
            raise OutputError(f"{what} {p} contains the input {src}; refusing to replace it (write elsewhere)")
    for parent in p.absolute().parents:  # an existing non-folder above the output
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutputError(f"{what} {p}: {parent} exists and is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{what} {p}: cannot write into {parent} (not writable)")
            break
    if p.is_symlink() and not p.exists():
        raise OutputError(f"{what} {p} is a dangling symbolic link; remove it or write elsewhere")
    if not p.exists():
        return p
    mode = os.stat(p).st_mode
    if stat.S_ISDIR(mode) and kind == "file":
        raise OutputError(f"{what} {p} is an existing folder; expected a file name")
    if not stat.S_ISDIR(mode) and kind == "dir":
        raise OutputError(f"{what} {p} exists and is not a folder")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"{what} {p} is an existing special file (device, FIFO or socket); refusing to replace it")
    if not overwrite:
        raise OutputError(f"{what} {p} exists (pass --overwrite to replace it)")
    return p


def temp_name(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh hidden name beside ``path`` that carries this process's pid (and keeps its suffix)."""
    p = Path(path)
    return p.with_name(f".{p.stem}.{kind}{os.getpid()}-{secrets.token_hex(4)}{p.suffix}")


def _test_pause(target: Path) -> None:
    """The kill tests' hook: ``DERA_FAST_TEST_SLOW_WRITE=<seconds>[:<text>]`` (only targets whose path holds
    ``text``)."""
    spec = os.environ.get("DERA_FAST_TEST_SLOW_WRITE")
    if spec:
        seconds, _, text = spec.partition(":")
        if text in str(target):
            time.sleep(float(seconds))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's entry list: makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync folders
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(p) as tmp: write(tmp)``: publish ``tmp`` as ``p`` only when the block succeeds.

    The temporary keeps ``p``'s suffix (writers that pick a format from it still work), is fsynced, given the mode a
    new file gets under the umask, and renamed over ``p``. On any exception it is removed and ``p`` is untouched.
    """
    p = Path(path)
    # NOTE: the file is written inside a private folder named after this process, so that whatever the writer
    # itself leaves on a kill (safetensors writes through its own ".tmpXXXXXX" files) is cleaned with it.
    box = _make_temp_dir(p)
    tmp = box / p.name
    try:
        yield tmp
        if not tmp.is_file():
            raise OSError(f"the writer left no file at {tmp}")
        os.chmod(tmp, 0o666 & ~_umask())  # e.g. mkstemp-based writers create 0600
        fsync_path(tmp)
        _test_pause(p)
        os.replace(tmp, p)
        fsync_path(p.parent)
    finally:
        _remove(box)


def _make_temp_dir(target: Path) -> Path:
    """Create the folder ``temp_name(target)`` (mode 0777 & ~umask; tempfile.mkdtemp would make it 0700)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(target)
        os.mkdir(tmp)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {target} ({e.strerror})") from None
    return tmp


def write_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Atomically write ``path`` with ``write(temporary_path)``; returns the path."""
    with atomic_file(path) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(d) as tmp: fill(tmp)``: publish the folder ``tmp`` as ``d`` only when the block succeeds.

    Files inside are fsynced. An existing ``d`` is moved aside, the new folder renamed in, then the old one
    deleted; a crash between the two renames leaves the old folder under a ``.old<pid>`` name that
    :func:`clean_stale` puts back. On any exception the temporary folder is removed and ``d`` is untouched.
    """
    p = Path(path)
    tmp = _make_temp_dir(p)
    old = None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        _test_pause(p)
        if p.exists() or p.is_symlink():
            old = temp_name(p, "old")
            os.replace(p, old)
        os.replace(tmp, p)
        fsync_path(p.parent)
    finally:
        if tmp.exists():
            _remove(tmp)
        if old is not None:
            if p.exists():
                _remove(old)
            else:  # the rename in failed: put the old folder back
                os.replace(old, p)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(folder: str | os.PathLike, *, names=None) -> list[Path]:
    """Remove temporaries left in ``folder`` by killed writers (their pid is not alive).

    Args:
        names: only temporaries of these target names (e.g. ``{"model", "out.mp4"}``); default: all.
    Returns:
        the paths removed or restored. A folder moved aside by a killed :func:`atomic_dir` is renamed back when its
        target is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = []
    for entry in folder.iterdir():
        m = _TEMP.match(entry.name)
        if not m or _pid_alive(int(m["pid"])):
            continue
        target = m["base"] + (m.groupdict().get("suffix") or "")
        if names is not None and target not in names and m["base"] not in names:
            continue
        if m.groupdict().get("kind") == "old" and not (folder / target).exists():
            os.replace(entry, folder / target)
            log.warning("restored %s from %s (a run was killed while replacing it)", folder / target, entry.name)
        else:
            _remove(entry)
        done.append(entry)
    return done


__all__ = ["OutputError", "check_output", "atomic_file", "atomic_dir", "write_file", "write_text", "clean_stale",
           "temp_name", "fsync_path"]
