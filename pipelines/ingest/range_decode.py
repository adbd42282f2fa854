"""Decoding a remote (S3) video by byte ranges, with no local copy (`remote_decode: ranges`).

decord needs a local path, so by default a remote file is copied to the node first (`source_cache.py`): one copy
per node that runs any of its time ranges. On a cluster the ranges of one long file land on many nodes, so a film
cut into 24 ranges may be fetched up to 24 times, and each range's task waits for the whole file before it decodes
a frame. Here PyAV reads the object itself through a random-access file: the container's index, then only the
packets from the keyframe before the range's first frame to its last one. Every range fetches its own part, so a
file costs about its size once in all, on any number of nodes, and a range starts decoding after one block.

The frames are the same as the decord path's (`curation.iter_resampled`): output frame k is the source frame shown
nearest the time t0 + k / fps (ties to the later frame), scaled so the shorter side is `short_side`, with the
display rotation and sample aspect applied; the resize filter differs (swscale's here), so pixels differ by a few
levels, not frames.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from lumiere import storage
from lumiere.storage import StorageOptions

# bytes per read from remote storage by default: one ranged GET per block (at S3's ~20-50 ms per request, 4 MiB
# blocks keep a task's reads at ~100 MB/s; the decoder itself asks for 32 KiB at a time)
READ_BLOCK = 4 * 2**20


@dataclass
class RangeSource:
    """A remote video to decode in place: its URI, storage options and size, and the bytes per ranged read.

    Reads are whole aligned blocks, and the last `cache_blocks` blocks are kept for every reader opened on this
    source, so the probe and the decode of one task (two opens) fetch the container's index once. `fetched`
    counts the bytes pulled from remote storage (report.json's source_fetch). Memory: at most
    `cache_blocks` × `block` bytes, whatever the file's size."""

    uri: str
    options: StorageOptions
    size: int
    block: int = READ_BLOCK
    cache_blocks: int = 4
    fetched: int = 0
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _file: object = field(default=None, repr=False, compare=False)

    def open(self) -> io.BufferedReader:
        """A seekable binary file over the object (what PyAV reads from)."""
        return io.BufferedReader(_BlockReader(self), buffer_size=min(self.block, 2**16))

    def read_block(self, index: int) -> bytes:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
            if self._file is None:
                fs, path = storage.resolve(self.uri, self.options)
                self._file = fs.open_input_file(path)
            data = self._file.read_at(min(self.block, max(0, self.size - index * self.block)), index * self.block)
            self.fetched += len(data)
            self._cache[index] = data
            while len(self._cache) > self.cache_blocks:
                self._cache.popitem(last=False)
            return data

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._cache.clear()

    def __str__(self) -> str:
        return self.uri


class _BlockReader(io.RawIOBase):
    """A raw Python file over a RangeSource's blocks."""

    def __init__(self, source: RangeSource):
        self._source, self._pos = source, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._pos >= self._source.size:
            return 0
        index, offset = divmod(self._pos, self._source.block)
        data = self._source.read_block(index)
        n = min(len(b), len(data) - offset)
        b[:n] = data[offset:offset + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._source.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def iter_resampled_ranges(source: RangeSource, fps: float, short_side: int, cancel: threading.Event | None = None,
                          threads: int = 0, src_size: tuple[int, int] | None = None,
                          geometry: tuple[float, int] = (1.0, 0), frames: tuple[int, int | None] | None = None,
                          chunk: int = 64) -> Iterator:
    """`curation.iter_resampled` by PyAV, decoding only as the caller asks for frames: yields (src_fps, declared
    source frame count), then the output frames [first, end) in chunks of `chunk` (t h w c uint8). `source`: a
    remote file read by byte ranges, or a local path (a file decord would decode too far ahead of its caller)."""
    import av

    from .curation import Reject, _Cancelled, output_size

    first, end = (frames or (0, None))
    first = max(0, int(first))
    local = isinstance(source, (str, os.PathLike))
    f = None if local else source.open()
    try:
        try:
            container = av.open(str(source) if local else f, mode="r")
        except Exception as e:  # noqa: BLE001 - PyAV raises many types for malformed input
            raise Reject("unreadable", f"not a readable video ({type(e).__name__}: {e})") from None
        with container:
            if not container.streams.video:
                raise Reject("unreadable", "no video stream in the file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            src_fps = float(stream.average_rate or stream.guessed_rate or 0)
            if not src_fps > 0:
                raise Reject("unreadable", "no frame rate in the stream")
            nominal = 1.0 / float(stream.guessed_rate or stream.average_rate)
            tb = stream.time_base
            t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
            coded = src_size if src_size and min(src_size) > 0 else (stream.codec_context.width,
                                                                     stream.codec_context.height)
            out_w, out_h = output_size(coded, short_side, geometry)  # as displayed
            rotation = geometry[1]
            turns = (rotation // 90) % 4 if rotation % 90 == 0 else 0  # counter-clockwise quarter turns
            if turns % 2:  # scaled in the stored orientation, then turned
                out_w, out_h = out_h, out_w
            yield src_fps, int(stream.frames or 0)

            if first > 0:  # from the keyframe before the frame shown just before the range's first output time
                at = t0 + first / fps - 2 * nominal
                container.seek(max(0, int(math.floor(at / tb))), stream=stream, backward=True, any_frame=False)

            def picture(frame) -> np.ndarray:
                rgb = frame.to_ndarray(format="rgb24", width=out_w, height=out_h)
                return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

            k, out, prev, prev_t, last_t, last_dur = first, [], None, None, None, nominal
            decoded = 0
            try:
                for frame in container.decode(stream):
                    decoded += 1
                    if cancel is not None and decoded % 16 == 0 and cancel.is_set():
                        raise _Cancelled
                    ts = float(frame.pts * tb) if frame.pts is not None else (
                        (last_t + last_dur) if last_t is not None else t0)
                    last_t = ts
                    last_dur = float(frame.duration * tb) if frame.duration else nominal
                    # every output time up to this frame's is shown by this frame or the one before it
                    while (end is None or k < end) and t0 + k / fps <= ts + 1e-9:
                        t = t0 + k / fps
                        use_prev = prev is not None and (t - prev_t) < (ts - t) - 1e-6
                        out.append(picture(prev if use_prev else frame))
                        k += 1
                        if len(out) == chunk:
                            if cancel is not None and cancel.is_set():
                                raise _Cancelled
                            yield np.stack(out)
                            out = []
                    if end is not None and k >= end:
                        break
                    prev, prev_t = frame, ts
            except (Reject, _Cancelled):
                raise
            except av.error.FFmpegError as e:
                raise Reject("unreadable", f"decode failed ({type(e).__name__}: {str(e)[:200]})") from None
            if prev is not None and last_t is not None:
                # past the last frame's start: it is shown until its end (as in curation.resample_by_time)
                stream_end = last_t + last_dur
                while (end is None or k < end) and t0 + k / fps < stream_end - 1e-6:
                    out.append(picture(prev))
                    k += 1
                    if len(out) == chunk:
                        yield np.stack(out)
                        out = []
            elif decoded == 0 and first == 0:
                raise Reject("unreadable", "no frames in the stream")
            if out:
                yield np.stack(out)
    finally:
        if f is not None:
            f.close()
