"""Decoding: one open video file, its frame timeline, and frames by index through a keyframe seek.

A frame's index is its position in presentation order, i.e. the order in which a full decode returns frames.
Frames are identified by their presentation timestamps (pts): the *timeline* is the sorted pts of every frame,
read by one demux pass over the packets (no decoding). To decode frames ``first..last``,
:meth:`VideoSource.decode` seeks to the keyframe at or before ``timeline[first]``, decodes forward, and maps each
decoded frame back to its index by its pts; frames before ``first`` are only decoded as far as later frames need
them (H.264/HEVC: non-reference frames before the target are skipped, see :func:`_decode_packets`). Each index is
checked against the timeline, so the result is exactly what a full decode returns.

Containers that store no presentation timestamps (AVI: its pts are guessed from decode order and come out of a
B-frame decoder unordered), packets without pts, or a seek that does not land where the timeline says fall back to
a full decode from the first frame, with one warning per reason and process.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

AV_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
VIDEO_SUFFIXES = AV_SUFFIXES + (".gif",)
# demuxers whose packets carry real presentation timestamps (mov/mp4/m4v, matroska/webm)
_PTS_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm")
# decoders for which "skip non-reference frames" cannot change any other frame (nal_ref_idc / nal type rules)
_SKIP_NONREF_CODECS = ("h264", "hevc")

log = logging.getLogger("dera_fast.data")
_warned: set[str] = set()


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


def warn_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def require_av():
    """Import PyAV or raise :class:`MissingDependencyError` naming the ``video`` extra."""
    try:
        import av
    except ImportError as e:
        raise MissingDependencyError(
            "mp4/mkv/avi/mov/webm video I/O needs PyAV: pip install 'dera-fast[video]' "
            "(or read/write .gif and .png instead)") from e
    return av


def require_pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise MissingDependencyError("GIF/PNG I/O needs Pillow: pip install pillow") from e
    return Image


def check_readable(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"unsupported video file type {path.suffix!r} for {path}; "
                         f"supported: {', '.join(VIDEO_SUFFIXES)}")
    return path


def compact_timeline(tl: np.ndarray | None):
    """JSON form of a timeline: ``{"start", "step", "n"}`` when evenly spaced (constant frame rate), else the
    list of pts, ``None`` when there is none."""
    if tl is None:
        return None
    if len(tl) >= 2 and np.all(np.diff(tl) == tl[1] - tl[0]):
        return {"start": int(tl[0]), "step": int(tl[1] - tl[0]), "n": int(len(tl))}
    if len(tl) == 1:
        return {"start": int(tl[0]), "step": 1, "n": 1}
    return [int(v) for v in tl]


def expand_timeline(data) -> np.ndarray | None:
    """Inverse of :func:`compact_timeline`."""
    if data is None:
        return None
    if isinstance(data, dict):
        return data["start"] + data["step"] * np.arange(data["n"], dtype=np.int64)
    return np.asarray(data, dtype=np.int64)


class Closing:
    """``with reader: ...`` closes the reader (its ``close()``) on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Mismatch(Exception):
    """The seek path found something the timeline did not predict."""


class VideoSource(Closing):
    """One open video file (PyAV). Use as a context manager.

    Args:
        path: a video file (mp4, mkv, avi, mov, webm, m4v).
        threads: decoder threads; 0 lets FFmpeg choose (frame threads on every core), 1 is right inside DataLoader
            workers, where the workers already use the cores.
        timeline: the file's timeline when known (from a dataset index); skips the demux pass.
    """

    def __init__(self, path, *, threads: int = 0, timeline: np.ndarray | None = None):
        self.path = Path(path)
        self.threads = int(threads)
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self._av = require_av()
        self._timeline, self._have_timeline = timeline, timeline is not None
        self._open()
        s, cc = self.stream, self.stream.codec_context
        rate = s.average_rate or s.base_rate or s.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.height, self.width = int(cc.height or 0), int(cc.width or 0)
        self.codec = cc.name
        self.recorded_frames = int(s.frames or 0)  # 0 where the container does not record a count

    def _open(self) -> None:
        av = self._av
        try:
            # NOTE: skip_frame=all for the stream probe only: av.open otherwise decodes the first frame to learn
            # what the codec headers already say (up to 5 ms for 720p, more than the rest of a small clip read).
            self.container = av.open(str(self.path), options={"skip_frame": "all"})
        except av.error.FFmpegError as e:
            raise ValueError(f"could not open video {self.path}: {e}") from e
        if not self.container.streams.video:
            self.container.close()
            raise ValueError(f"no video stream in {self.path}")
        self.stream = self.container.streams.video[0]
        if self.threads == 0:
            self.stream.thread_type = "AUTO"
        else:
            self.stream.thread_count = self.threads
        self._fresh = True  # nothing read yet: a plain decode starts at the first frame

    def close(self) -> None:
        self.container.close()

    def _error(self, e) -> ValueError:
        return ValueError(f"could not decode video {self.path}: {e}")

    # ------------------------------------------------------------------ timeline
    def timeline(self) -> np.ndarray | None:
        """int64 ``[N]``: the pts of every frame in presentation order (stream time base), from one demux pass;
        ``None`` when the container stores no presentation timestamps (then only a full decode can number frames).
        """
        if self._have_timeline:
            return self._timeline
        self._have_timeline = True
        fmt = set(self.container.format.name.split(","))
        if not fmt & set(_PTS_FORMATS):
            warn_once(f"fmt:{self.container.format.name}",
                      f"{self.path.suffix} files ({self.container.format.name}) store no presentation timestamps: "
                      f"reading frames by a full decode from the first frame instead of a keyframe seek")
            return None
        pts = []
        self._fresh = False
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                if packet.pts is None:
                    warn_once("nopts", f"{self.path.name}: packets without timestamps: reading frames by a full "
                                       f"decode instead of a keyframe seek")
                    return None
                if not packet.is_discard:  # dropped by the decoder (e.g. before an edit list's start)
                    pts.append(packet.pts)
        except self._av.error.FFmpegError as e:
            raise self._error(e) from e
        tl = np.sort(np.asarray(pts, dtype=np.int64))
        if len(tl) and np.any(np.diff(tl) <= 0):
            warn_once("duppts", f"{self.path.name}: repeated timestamps: reading frames by a full decode")
            return None
        self._timeline = tl
        return tl

    def num_frames(self) -> int:
        """Frames a full decode returns: the timeline's length, else the container's count, else by decoding."""
        tl = self.timeline()
        if tl is not None:
            return len(tl)
        if self.recorded_frames > 0:
            return self.recorded_frames
        return sum(1 for _ in self._decode_all(0, None))

    def size(self) -> tuple[int, int]:
        """``(height, width)``: from the codec headers, else from the first frame."""
        if not (self.height and self.width):
            for _, frame in self.decode(0, 0):
                self.height, self.width = frame.height, frame.width
        return self.height, self.width

    # ------------------------------------------------------------------ decoding
    def decode(self, first: int = 0, last: int | None = None) -> Iterator[tuple[int, object]]:
        """Yield ``(index, av.VideoFrame)`` for every frame ``first <= index <= last`` (``last=None``: to the end),
        in order, exactly as a full decode numbers them."""
        if first < 0:
            raise ValueError(f"first frame must be >= 0, got {first}")
        tl = self.timeline() if first > 0 else None
        if tl is None:
            yield from self._decode_all(first, last)
            return
        if first >= len(tl):
            return
        expected = first
        try:
            for n, frame in self._decode_seek(tl, first, last):
                yield n, frame
                expected = n + 1
        except _Mismatch as e:
            warn_once(f"mismatch:{self.path}", f"{self.path.name}: {e}; reading by a full decode instead")
            yield from self._decode_all(expected, last)

    def _rewind(self) -> None:
        if not self._fresh:
            self.container.close()
            self._open()

    def _decode_all(self, first: int, last: int | None):
        """Full decode from the first frame, numbering frames by count."""
        self._rewind()
        self._fresh = False
        try:
            for n, frame in enumerate(self.container.decode(self.stream)):
                if n >= first:
                    yield n, frame
                if last is not None and n >= last:
                    return
        except self._av.error.FFmpegError as e:
            raise self._error(e) from e

    def _decode_seek(self, tl: np.ndarray, first: int, last: int | None):
        target = int(tl[first])
        # NOTE: should the demuxer pick a keyframe whose pts lies after ``target`` (it chooses by its own index),
        # seek once more from the first frame.
        for ts in (target, int(tl[0])):
            self._fresh = False
            try:
                self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
            except self._av.error.FFmpegError as e:
                raise _Mismatch(f"seek failed ({e})") from None
            frames = _decode_packets(self, target)
            head = next(frames, None)
            if head is None or head.pts is None:
                raise _Mismatch("no timestamped frame after the seek")
            if head.pts <= target:
                break
            frames.close()
        else:
            raise _Mismatch("no keyframe at or before the first wanted frame")
        expected, stop = first, (len(tl) - 1 if last is None else min(last, len(tl) - 1))
        for frame in _chain(head, frames):
            if frame.pts is None:
                raise _Mismatch("decoded frames carry no timestamps")
            if frame.pts < target:
                continue
            if tl[expected] != frame.pts:
                raise _Mismatch(f"frame {expected} has pts {frame.pts}, the timeline says {int(tl[expected])}")
            yield expected, frame
            if expected >= stop:
                frames.close()
                return
            expected += 1
        raise _Mismatch(f"the stream ended at frame {expected} of {len(tl)}")


def _chain(head, rest):
    yield head
    yield from rest


def _decode_packets(source: VideoSource, target: int):
    """Decode packets from the current position; packets whose pts is before ``target`` are decoded with
    ``skip_frame=NONREF`` where the codec allows it: nothing references a non-reference frame, and frames before
    the target are never returned, so this changes no returned frame and saves their decoding."""
    av, stream = source._av, source.stream
    cc = stream.codec_context
    skip = source.codec in _SKIP_NONREF_CODECS
    mode = "DEFAULT"
    try:
        for packet in source.container.demux(stream):
            if skip:
                want = "NONREF" if packet.pts is not None and packet.pts < target else "DEFAULT"
                if want != mode:
                    cc.skip_frame = mode = want
            yield from packet.decode()
    except av.error.FFmpegError as e:
        raise source._error(e) from e
    finally:
        if mode != "DEFAULT":
            cc.skip_frame = "DEFAULT"


class GifSource(Closing):
    """A GIF read frame by frame through Pillow, with :class:`VideoSource`'s interface (frames as uint8 RGB)."""

    def __init__(self, path):
        self.path = Path(path)
        Image = require_pil()
        try:
            self._im = Image.open(self.path)
            self._im.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"could not decode GIF {self.path}: {e}") from e
        self.width, self.height = self._im.size
        self.codec = "gif"
        self.recorded_frames = getattr(self._im, "n_frames", 1)
        durations = []
        for i in range(self.recorded_frames):
            self._im.seek(i)
            durations.append(self._im.info.get("duration", 0) or 0)
        mean_ms = float(np.mean(durations)) if durations else 0.0
        self.fps = 1000.0 / mean_ms if mean_ms > 0 else 10.0

    def close(self) -> None:
        self._im.close()

    def timeline(self):
        return None

    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def num_frames(self) -> int:
        return self.recorded_frames

    def decode(self, first: int = 0, last: int | None = None):
        stop = self.recorded_frames if last is None else min(last + 1, self.recorded_frames)
        try:
            for i in range(first, stop):
                self._im.seek(i)
                yield i, np.array(self._im.convert("RGB"))  # a writable copy (torch refuses read-only arrays)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"could not decode GIF {self.path}: {e}") from e


def open_video(path, *, threads: int = 0, timeline: np.ndarray | None = None):
    """A :class:`VideoSource` (PyAV) or :class:`GifSource` for ``path`` (checked: exists, supported type)."""
    path = check_readable(path)
    if path.suffix.lower() == ".gif":
        return GifSource(path)
    return VideoSource(path, threads=threads, timeline=timeline)
