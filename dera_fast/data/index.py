"""A dataset's video index: frame count, frame rate, size and frame timeline of every file, computed once.

Building it costs one open and one demux pass (no decoding) per file, run in parallel threads with a progress bar.
It is cached as JSON (never pickle) beside the dataset: ``<name>.csv.index.json`` beside a LARP CSV,
``.dera_fast_index.json`` inside a video folder (or a path you give); where that is not writable, in
``$XDG_CACHE_HOME/dera_fast/index/`` (default ``~/.cache``). Entries are keyed by the file's path and checked
against its size and mtime, so an edited file is indexed again. Under ``torch.distributed`` rank 0 builds and
writes the cache while the other ranks wait, then read it; DataLoader workers inherit the index from the dataset.
Writes are atomic (temporary file + rename), so concurrent builders never see a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._progress import progress_bar
from .decode import compact_timeline, expand_timeline, open_video, warn_once

_FORMAT, _VERSION = "dera_fast.video_index", 1


@dataclass(frozen=True)
class VideoInfo:
    """What a dataset needs to know about one file before decoding it."""
    num_frames: int
    fps: float
    height: int
    width: int
    timeline: np.ndarray | None = field(default=None, compare=False, repr=False)  # pts per frame, or None

    def to_json(self) -> dict:
        return {"num_frames": self.num_frames, "fps": self.fps, "height": self.height, "width": self.width,
                "timeline": compact_timeline(self.timeline)}

    @classmethod
    def from_json(cls, d: dict) -> "VideoInfo":
        return cls(int(d["num_frames"]), float(d["fps"]), int(d["height"]), int(d["width"]),
                   expand_timeline(d.get("timeline")))


def probe_info(path) -> VideoInfo:
    """Index one file: one open, one demux pass (no decoding unless the container records no count)."""
    with open_video(path, threads=1) as source:
        n = source.num_frames()
        if n == 0:
            raise ValueError(f"no decodable frames in {path}")
        return VideoInfo(n, source.fps, *source.size(), source.timeline())


def default_index_path(source) -> Path:
    """Where the index of a dataset ``source`` (a CSV or a folder) is cached by default."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return source.with_name(source.name + ".index.json")
    return source / ".dera_fast_index.json"


def _fallback_cache(path: Path) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dera_fast" / "index"
    return root / (hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20] + ".json")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _dist_rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


class VideoIndex:
    """``VideoInfo`` for each of ``paths``, loaded from the cache where fresh and computed (in parallel) where not.

    Args:
        paths: the dataset's video files.
        cache: the cache file (default: none; :class:`VideoFolderDataset` passes :func:`default_index_path`),
            or ``None`` to keep the index in memory only.
        workers: threads that index files (default ``min(32, 4 * cores)``: indexing is mostly I/O).
        progress: show a progress bar while indexing (None: the package setting, ``set_progress_bar_config``).
    """

    def __init__(self, paths, *, cache=None, workers: int | None = None, progress: bool | None = None):
        self.paths = [Path(p) for p in paths]
        self.cache = Path(cache) if cache is not None else None
        if workers is not None and workers <= 0:
            raise ValueError(f"workers must be positive, got {workers}")
        self.workers = workers or min(32, 4 * (os.cpu_count() or 1))
        rank, world = _dist_rank()
        if world > 1 and rank != 0:
            _barrier()  # rank 0 builds and writes the cache first
            self._infos = self._build(progress=False, write=False)
        else:
            self._infos = self._build(progress=progress, write=True)
            if world > 1:
                _barrier()

    def __len__(self) -> int:
        return len(self._infos)

    def __getitem__(self, i: int) -> VideoInfo:
        return self._infos[i]

    # ------------------------------------------------------------------ cache
    def _key(self, path: Path) -> str:
        """Paths relative to the cache's folder, so a moved dataset keeps its index."""
        if self.cache is not None:
            try:
                return os.path.relpath(path.resolve(), self.cache.parent.resolve())
            except ValueError:  # another drive (Windows)
                pass
        return str(path.resolve())

    def _load(self, where: Path | None) -> dict:
        if where is None or not where.is_file():
            return {}
        try:
            data = json.loads(where.read_text())
            if data.get("format") != _FORMAT or data.get("version") != _VERSION:
                raise ValueError(f"not a version-{_VERSION} index")
            return dict(data["entries"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warn_once(f"index:{where}", f"ignoring the unreadable video index {where} ({e}); rebuilding it")
            return {}

    def _write(self, entries: dict) -> None:
        payload = json.dumps({"format": _FORMAT, "version": _VERSION, "entries": entries}, separators=(",", ":"))
        for where in (self.cache, _fallback_cache(self.cache)):
            tmp = where.with_name(f".{where.name}.tmp{os.getpid()}")
            try:
                where.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(payload)
                os.replace(tmp, where)  # atomic: readers see the old or the new index, never half of one
                if where != self.cache:
                    warn_once(f"indexdir:{self.cache}", f"{self.cache.parent} is not writable: video index cached "
                                                        f"in {where}")
                return
            except OSError:
                tmp.unlink(missing_ok=True)
        warn_once(f"indexmem:{self.cache}", f"could not write a video index for {self.cache}: kept in memory")

    def _build(self, *, progress: bool | None, write: bool) -> list[VideoInfo]:
        entries = {}
        if self.cache is not None:
            entries = self._load(self.cache) or self._load(_fallback_cache(self.cache))
        infos: list[VideoInfo | None] = [None] * len(self.paths)
        todo = []
        for i, p in enumerate(self.paths):
            try:
                size, mtime = _stat(p)
            except OSError as e:
                raise FileNotFoundError(f"dataset video not readable: {p} ({e})") from None
            e = entries.get(self._key(p))
            if e is not None and e.get("size") == size and e.get("mtime_ns") == mtime:
                infos[i] = VideoInfo.from_json(e)
            else:
                todo.append((i, p, size, mtime))
        if todo:
            failures = []

            def one(item):
                i, p, size, mtime = item
                try:
                    return item, probe_info(p), None
                except (ValueError, OSError, ImportError) as e:
                    return item, None, e

            with ThreadPoolExecutor(max_workers=min(self.workers, len(todo))) as pool:
                bar = progress_bar(pool.map(one, todo), total=len(todo), desc="indexing videos", unit="video",
                                   progress=progress)
                for (i, p, size, mtime), info, err in bar:
                    if err is not None:
                        if isinstance(err, ImportError):
                            raise err
                        failures.append((p, err))
                        continue
                    infos[i] = info
                    entries[self._key(p)] = {"size": size, "mtime_ns": mtime, **info.to_json()}
            if failures:
                p, err = failures[0]
                raise ValueError(f"{len(failures)} of {len(self.paths)} dataset videos could not be read (first: "
                                 f"{err}); remove them from the dataset")
            if write and self.cache is not None:
                self._write(entries)
        return infos
