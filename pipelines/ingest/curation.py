"""Frame-level curation functions used by the ingestion stages: probing, decoding with a timeout, shot cuts,
motion / black / blank scores, resize + centre crop. Plain numpy / torch over uint8 `t h w c` frames, testable
without Ray.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import tempfile
import threading
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


class Reject(Exception):
    """A file or clip the pipeline rejects: `reason` is a code from REASONS, `detail` says why in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


REASONS = {
    "unreadable": "empty, truncated, corrupt or not a video",
    "decode_timeout": "decoding took longer than decode_timeout_s",
    "too_small": "shorter side below min_side pixels",
    "too_short": "shot shorter than one clip (clip_frames at fps)",
    "no_caption": "no caption found (missing_caption: reject)",
    "bad_caption": "the caption file beside the video is not UTF-8 text / a JSON object with a caption",
    "too_large": "file bigger than max_file_bytes",
    "duplicate": "the same bytes as another input file (dedup: exact); the detail names the kept file",
    "near_duplicate": "a clip whose content matches an already kept clip (near_dedup); the detail names it",
    "static": "motion score below static_threshold",
    "black": "most frames are black",
    "blank": "most frames are a single flat colour",
    "low_clip_score": "CLIP text-frame similarity below min_clip_score",
    "processing_failed": "an unexpected error while cutting or encoding the file's clips (the detail names it)",
}


@dataclass
class Probe:
    codec: str
    width: int  # as displayed: rotation and pixel aspect ratio applied
    height: int
    fps: float
    frames: int  # as declared by the container (may be 0 if unknown)
    duration_s: float
    coded_width: int = 0  # as stored in the stream (what the decoder outputs before rotation / aspect)
    coded_height: int = 0
    sample_aspect: float = 1.0  # width of a stored pixel over its height (anamorphic sources: != 1)
    rotation: int = 0  # counter-clockwise degrees the player turns the picture (phone videos: 90, 270)


def display_size(coded_w: int, coded_h: int, sample_aspect: float, rotation: int) -> tuple[int, int]:
    """(width, height) as a player shows the picture: stored pixels widened by the sample aspect ratio, then
    turned by the rotation."""
    w, h = max(1, round(coded_w * sample_aspect)), coded_h
    return (h, w) if rotation % 180 == 90 else (w, h)


def output_size(coded: tuple[int, int], short_side: int, geometry: tuple[float, int]) -> tuple[int, int]:
    """(width, height) the frames come out at, as a player shows them (pixel aspect and rotation applied), the
    shorter side scaled down to at most `short_side`, even sides; the coded size itself when nothing changes.
    Both decoders size frames with it: decord here, PyAV by byte ranges in `range_decode`."""
    w, h = coded
    sample_aspect, rotation = geometry
    if rotation:
        dw, dh = display_size(w, h, sample_aspect, rotation)
        scale = min(1.0, short_side / min(dw, dh))
        return 2 * round(dw * scale / 2), 2 * round(dh * scale / 2)
    dw = w * sample_aspect  # anamorphic: stored pixels are this much wider than tall
    scale = short_side / min(h, dw)
    if scale < 1 or abs(sample_aspect - 1) > 1e-3:
        return 2 * round(dw * min(1.0, scale) / 2), 2 * round(h * min(1.0, scale) / 2)
    return w, h


def probe(path) -> Probe:
    """Read stream metadata with PyAV (and decode the first frame for its display matrix: the rotation a phone
    records). `path`: a local path, or a `range_decode.RangeSource` (read in place by byte ranges). Raises
    Reject('unreadable') on anything odd."""
    import av

    remote = not isinstance(path, (str, os.PathLike))
    if (path.size if remote else os.path.getsize(path)) == 0:
        raise Reject("unreadable", "empty file (0 bytes)")
    f = path.open() if remote else None
    try:
        with av.open(f if remote else path) as container:
            if not container.streams.video:
                raise Reject("unreadable", "no video stream in the file")
            s = container.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            duration = float(s.duration * s.time_base) if s.duration else float(container.duration or 0) / 1e6
            sar = s.sample_aspect_ratio or s.codec_context.sample_aspect_ratio
            sample_aspect = float(sar) if sar and float(sar) > 0 else 1.0
            rotation = 0
            for frame in container.decode(s):
                rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
                break
            w, h = s.codec_context.width, s.codec_context.height
            dw, dh = display_size(w, h, sample_aspect, rotation)
            return Probe(s.codec_context.name, dw, dh, fps, int(s.frames or 0), duration, w, h, sample_aspect,
                         rotation)
    except Reject:
        raise
    except Exception as e:  # PyAV raises many error types for malformed input; all mean "unreadable"
        raise Reject("unreadable", f"not a readable video ({type(e).__name__}: {e})") from None
    finally:
        if f is not None:
            f.close()


def resample_indices(n: int, src_fps: float, fps: float) -> np.ndarray:
    """For output frame k at time k/fps, the index of the nearest source frame (round(k·src/fps)), for a source of
    constant frame rate."""
    count = max(1, math.ceil(n * fps / src_fps - 1e-9))
    idx = np.floor(np.arange(count) * src_fps / fps + 0.5).astype(np.int64)
    return np.minimum(idx, n - 1)


def resample_by_time(starts: np.ndarray, end: float, fps: float) -> np.ndarray:
    """For output frame k at time starts[0] + k/fps (up to `end`, the last frame's end), the index of the source
    frame shown nearest that time, from the frames' own presentation times `starts` (seconds, ascending): right
    for variable-frame-rate sources, where index × average fps drifts. Ties go to the later frame, so a constant
    rate gives exactly `resample_indices`."""
    starts = np.asarray(starts, dtype=np.float64)
    n = len(starts)
    t0 = starts[0]
    count = max(1, math.ceil((end - t0) * fps - 1e-6))
    t = t0 + np.arange(count) / fps
    j = np.clip(np.searchsorted(starts, t, side="left"), 1, max(1, n - 1))
    if n == 1:
        return np.zeros(count, np.int64)
    earlier = (t - starts[j - 1]) < (starts[j] - t) - 1e-6
    idx = np.where(earlier, j - 1, j)
    idx = np.where(t <= starts[0], 0, idx)
    return np.minimum(idx, n - 1).astype(np.int64)


class _Cancelled(Exception):
    """Raised inside a decode whose caller has given up on it (decode timeout)."""


_CHUNK = 64  # frames per decord get_batch call; a cancelled decode stops at the next chunk


def _open_resampled(path: str, fps: float, short_side: int, threads: int = 0,
                    src_size: tuple[int, int] | None = None, geometry: tuple[float, int] = (1.0, 0)):
    """(decord reader, source frame indices of the output frames at `fps`, src_fps, n_src, (h, w) to resize each
    decoded frame to or None, bytes of one frame as decord decodes it): see decode_resampled. `src_size`: the
    coded (width, height); `geometry`: the (sample aspect, rotation) of `probe`."""
    import decord

    sample_aspect, rotation = geometry
    if src_size is None or min(src_size) <= 0:  # no (usable) size from the caller's probe
        probe_reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        h, w = probe_reader[0].shape[:2]
        del probe_reader
        sample_aspect, rotation = 1.0, 0  # decord has applied what it knows
    else:
        w, h = src_size
    out_w, out_h = output_size((w, h), short_side, (sample_aspect, rotation))
    resize_after = None
    if rotation:
        # decord turns the picture by the display matrix itself, but only at full size: with a decode size it
        # squashes the turned picture into it (or returns 4 channels). So: full size, then resized here.
        resize_after = (out_h, out_w)
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        frame_bytes = w * h * 3
    elif (out_w, out_h) != (w, h):  # decord resizes while decoding
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=out_w, height=out_h, num_threads=threads)
        frame_bytes = out_w * out_h * 3
    else:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        frame_bytes = w * h * 3
    n, src_fps = len(reader), float(reader.get_avg_fps())
    if n == 0 or not src_fps > 0:
        raise Reject("unreadable", f"no frames or no frame rate (frames={n}, fps={src_fps})")
    try:
        # the frames' presentation times (from the index, no decoding): variable frame rates come out right
        stamps = reader.get_frame_timestamp(np.arange(n))
        if not (np.all(np.diff(stamps[:, 0]) >= 0) and stamps[-1, 1] > stamps[0, 0]):
            raise ValueError("timestamps out of order")
        idx = resample_by_time(stamps[:, 0], float(stamps[-1, 1]), fps)
    except Exception:  # noqa: BLE001 - a container without usable timestamps: index × average rate
        idx = resample_indices(n, src_fps, fps)
    return reader, idx, src_fps, n, resize_after, frame_bytes


def _resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """t h w c uint8 -> t size[0] size[1] c (antialiased bilinear on the uint8 frames)."""
    if frames.shape[1:3] == size:
        return frames
    x = rearrange(torch.from_numpy(frames), "t h w c -> t c h w")
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return np.ascontiguousarray(rearrange(x, "t c h w -> t h w c").numpy())


def _decode_error(e: Exception) -> Reject:
    # decord raises DECORDError / RuntimeError / IndexError on broken streams
    return Reject("unreadable", f"decode failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


DECODE_AHEAD_MAX_BYTES = 256 * 2**20  # IngestConfig.decode_ahead_max_bytes


def iter_resampled(path: str, fps: float, short_side: int, cancel: threading.Event | None = None,
                   threads: int = 0, src_size: tuple[int, int] | None = None,
                   geometry: tuple[float, int] = (1.0, 0), frames: tuple[int, int | None] | None = None,
                   ahead_max_bytes: int | None = DECODE_AHEAD_MAX_BYTES):
    """decode_resampled as a stream: yields (src_fps, n_src) first, then the frames in chunks of _CHUNK
    (t h w c uint8), so a caller holds one chunk at a time whatever the video's length. `frames`: only the
    output frames [first, end) (end None: to the end), e.g. one time range of a long file. `path` may be a
    `range_decode.RangeSource`: a remote file that PyAV reads in place by byte ranges (`remote_decode: ranges`).

    decord's decoder thread does not wait for its caller: behind a slow consumer (TransNetV2, the embedder) it
    decodes on towards the end of the file and holds every frame (measured: 600 MB of its buffers at one
    point behind a consumer taking 0.5 s per chunk, benchmarks/RESULTS.md). So decord decodes a local file only
    when all the source frames from this stream's first to the file's end fit in `ahead_max_bytes` at the size it
    decodes them; a longer one is decoded by PyAV, which decodes only as frames are asked for (0: always PyAV;
    None: always decord)."""
    def decode_with_pyav(source, src_size, geometry):
        from .range_decode import iter_resampled_ranges

        return iter_resampled_ranges(source, fps, short_side, cancel, threads, src_size, geometry, frames, _CHUNK)

    if not isinstance(path, (str, os.PathLike)):
        yield from decode_with_pyav(path, src_size, geometry)
        return
    try:
        reader, idx, src_fps, n, resize_after, frame_bytes = _open_resampled(path, fps, short_side, threads,
                                                                             src_size, geometry)
    except Reject:
        raise
    except Exception as e:
        raise _decode_error(e) from None
    if frames is not None:
        idx = idx[frames[0]:frames[1]]
    if ahead_max_bytes is not None and len(idx) and (n - int(idx[0])) * frame_bytes > ahead_max_bytes:
        del reader  # before it decodes ahead
        if src_size is None or min(src_size) <= 0:  # PyAV needs the probe's geometry (decord applied its own)
            meta = probe(path)
            src_size, geometry = (meta.coded_width, meta.coded_height), (meta.sample_aspect, meta.rotation)
        yield from decode_with_pyav(path, src_size, geometry)
        return
    yield src_fps, n
    # full-size chunks (a rotated source) are cut smaller so a chunk stays ~_CHUNK frames of the decode size
    chunk_len = _CHUNK
    if resize_after is not None and src_size:
        full = src_size[0] * src_size[1]
        chunk_len = max(4, min(_CHUNK, int(_CHUNK * resize_after[0] * resize_after[1] / max(1, full))))
    for i in range(0, len(idx), chunk_len):
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        try:
            chunk = reader.get_batch(idx[i:i + chunk_len].tolist()).asnumpy()
        except Exception as e:
            raise _decode_error(e) from None
        yield chunk if resize_after is None else _resize_frames(chunk, resize_after)


def decode_resampled(path: str, fps: float, short_side: int, cancel: threading.Event | None = None,
                     threads: int = 0, src_size: tuple[int, int] | None = None,
                     geometry: tuple[float, int] = (1.0, 0)) -> tuple[np.ndarray, float, int]:
    """Decode with decord at `fps` (nearest source frame) and, if larger, scaled so the shorter side is
    `short_side` (decoding smaller keeps memory bounded for HD sources). Returns (frames, src_fps, n_src).
    With `cancel`, the decode stops (raising _Cancelled) at the next chunk of frames once it is set.
    `threads`: decoder threads, 0 = decord's default (one per core; IngestConfig.codec_threads).
    `src_size`: the source's (width, height) when the caller has probed it (`probe`); otherwise decord is
    opened once more to read it from the first frame, which costs ~24 ms of CPU on a 640×360 file.
    The whole video in one array: ingestion streams it instead (`stream_resampled`)."""
    stream = iter_resampled(path, fps, short_side, cancel, threads, src_size, geometry)
    src_fps, n = next(stream)
    return np.ascontiguousarray(np.concatenate(list(stream))), src_fps, n


def _child(conn, path, fps, short_side, tmpdir, threads, src_size, geometry):
    try:
        frames, src_fps, n = decode_resampled(path, fps, short_side, threads=threads, src_size=src_size,
                                              geometry=geometry)
        out = os.path.join(tmpdir, "frames.npy")
        np.save(out, frames)  # through a file, not the pipe: clips can be hundreds of MB
        conn.send(("ok", out, src_fps, n))
    except Reject as r:
        conn.send(("reject", r.reason, r.detail, None))
    except BaseException as e:  # report, never hang the parent
        conn.send(("reject", "unreadable", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=2)}", None))
    finally:
        conn.close()


def decode_in_child(path: str, fps: float, short_side: int, timeout_s: float,
                    threads: int = 0, src_size: tuple[int, int] | None = None,
                    geometry: tuple[float, int] = (1.0, 0)) -> tuple[np.ndarray, float, int]:
    """`decode_resampled` in a forked child that is killed after `timeout_s` (the fully isolated path:
    50–160 ms of fork + frame transfer per file). Used once a decode in this process has hung."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="lumiere-decode-") as tmpdir:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, path, fps, short_side, tmpdir, threads, src_size, geometry),
                           daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(timeout_s):
                raise Reject("decode_timeout", f"decoding took longer than {timeout_s:g}s")
            status, a, b, c = recv.recv()
        except EOFError:
            raise Reject("unreadable", "the decoder process died (crash in the decoder)") from None
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join()
            recv.close()
        if status != "ok":
            raise Reject(a, b)
        return np.load(a), b, c


# decode threads that passed their deadline and have not stopped yet (a decoder stuck inside one native call)
_STUCK: list[threading.Thread] = []
_STUCK_LOCK = threading.Lock()


def _stuck_decoders() -> int:
    with _STUCK_LOCK:
        _STUCK[:] = [t for t in _STUCK if t.is_alive()]
        return len(_STUCK)


def decode_with_timeout(path: str, fps: float, short_side: int, timeout_s: float, threads: int = 0,
                        src_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float, int]:
    """`decode_resampled` bounded by `timeout_s`; timeout_s <= 0 decodes in-process without a bound.

    The decode runs in-process on a helper thread (no fork, no copy of the frames: a fork + transfer cost
    50–160 ms per file, more than decoding a short clip) and the caller waits at most `timeout_s`. On
    timeout the caller gets Reject('decode_timeout') at once and the decode is cancelled: it stops at its
    next chunk of frames (decord releases the GIL while it decodes, so the wait is never blocked by it). A
    decoder that hangs inside one native call cannot be stopped from a thread; if that happens the thread is
    left behind and every later decode in this process runs in a forked child that is killed on timeout
    (`decode_in_child`), so a hung decoder costs at most one thread and never blocks the caller."""
    if timeout_s <= 0:
        return decode_resampled(path, fps, short_side, threads=threads, src_size=src_size)
    if _stuck_decoders():
        return decode_in_child(path, fps, short_side, timeout_s, threads, src_size)
    cancel = threading.Event()
    result: list = []

    def work():
        try:
            result.append(("ok", decode_resampled(path, fps, short_side, cancel, threads, src_size)))
        except _Cancelled:
            pass
        except BaseException as e:  # Reject or anything else: re-raised in the caller
            result.append(("error", e))

    thread = threading.Thread(target=work, name=f"lumiere-decode-{os.path.basename(str(path))}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        cancel.set()
        thread.join(0.05)  # usually stops within a chunk; otherwise it is stuck in the decoder
        if thread.is_alive():
            with _STUCK_LOCK:
                _STUCK.append(thread)
        raise Reject("decode_timeout", f"decoding took longer than {timeout_s:g}s")
    status, value = result[0]
    if status == "error":
        if isinstance(value, Reject):
            raise value
        raise Reject("unreadable", f"decode failed ({type(value).__name__}: {value})")
    return value


def stream_resampled(path: str, fps: float, short_side: int, timeout_s: float, threads: int = 0,
                     src_size: tuple[int, int] | None = None, geometry: tuple[float, int] = (1.0, 0),
                     frames: tuple[int, int | None] | None = None,
                     ahead_max_bytes: int | None = DECODE_AHEAD_MAX_BYTES):
    """The frames of `decode_resampled` as a stream, decoded ahead on a helper thread (at most two chunks
    ahead, so memory is bounded by a few chunks whatever the video's length). Yields (src_fps, n_src), then
    chunks (t h w c uint8). `timeout_s` bounds the wait for each next chunk, not the whole file: a long film
    decodes for as long as it makes progress, while a hung or pathologically slow decoder gives
    Reject('decode_timeout') (the caller keeps what it got before). timeout_s <= 0: in-process, unbounded.

    Like decode_with_timeout, a decoder stuck inside one native call is left behind on its thread and later
    decodes in this process run in a forked child (`decode_in_child`; that isolated path returns the whole
    video at once, so only then does memory grow with length)."""
    if timeout_s <= 0:
        yield from iter_resampled(path, fps, short_side, threads=threads, src_size=src_size, geometry=geometry,
                                  frames=frames, ahead_max_bytes=ahead_max_bytes)
        return
    if _stuck_decoders():
        video, src_fps, n = decode_in_child(path, fps, short_side, timeout_s, threads, src_size, geometry)
        if frames is not None:
            video = video[frames[0]:frames[1]]
        yield src_fps, n
        for i in range(0, len(video), _CHUNK):
            yield video[i:i + _CHUNK]
        return
    cancel = threading.Event()
    items: queue.Queue = queue.Queue(maxsize=2)
    end = object()

    def put(item) -> bool:
        while not cancel.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iter_resampled(path, fps, short_side, cancel, threads, src_size, geometry, frames,
                                       ahead_max_bytes):
                if not put(("ok", item)):
                    return
            put(("ok", end))
        except _Cancelled:
            pass  # the caller gave up on this stream (timeout or an early stop): nobody waits for a result
        except BaseException as e:  # Reject or anything else: re-raised in the caller
            put(("error", e))

    thread = threading.Thread(target=work, name=f"lumiere-decode-{os.path.basename(str(path))}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                status, value = items.get(timeout=timeout_s)
            except queue.Empty:
                cancel.set()
                thread.join(0.05)  # usually stops within a chunk; otherwise it is stuck in the decoder
                if thread.is_alive():
                    with _STUCK_LOCK:
                        _STUCK.append(thread)
                raise Reject("decode_timeout", f"the decoder made no progress for {timeout_s:g}s") from None
            if status == "error":
                if isinstance(value, Reject):
                    raise value
                raise Reject("unreadable", f"decode failed ({type(value).__name__}: {value})")
            if value is end:
                return
            yield value
    finally:
        cancel.set()  # the caller stopped early (or is done): the decode thread ends at its next chunk


def thumbnails(frames: np.ndarray, size: int = 32) -> torch.Tensor:
    """t h w c uint8 -> t c size size float in [0, 255] (for cheap per-frame statistics): area averages."""
    return multi_thumbnails(frames, (size,))[size]


def multi_thumbnails(frames: np.ndarray, sizes: tuple[int, ...] = (32, 64)) -> dict[int, torch.Tensor]:
    """thumbnails(frames, s) for every s in `sizes` in one pass: the uint8 frames are resized as they are
    (channels-last view, torch's vectorised uint8 antialiased-bilinear kernel) to the largest size, and the
    smaller sizes are area-pooled from that. An antialiased downscale is a box-like average, so the thumbnails
    are within a grey level of area pooling in float32 — which cost ~10× more (converting every
    full-resolution frame to float was 20% of the per-file CPU). Frames are independent, so the thumbnails of
    frames[a:b] are multi_thumbnails(frames)[s][a:b]."""
    big = max(sizes)
    x = rearrange(torch.from_numpy(np.asarray(frames)), "t h w c -> t c h w")  # a view, channels-last in memory
    if len(x) == 0:
        return {s: torch.zeros(0, x.shape[1], s, s) for s in sizes}
    if x.shape[-2:] != (big, big):
        x = F.interpolate(x, size=(big, big), mode="bilinear", antialias=True, align_corners=False)
    top = x.float()
    return {s: top if s == big else F.interpolate(top, size=(s, s), mode="area") for s in sizes}


def color_histograms(thumbs: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """t c h w in [0, 255] -> t (bins^3) joint colour histograms, each summing to 1."""
    q = (thumbs.clamp(0, 255) * bins / 256).long().clamp(max=bins - 1)
    code = rearrange(q[:, 0] * bins * bins + q[:, 1] * bins + q[:, 2], "t h w -> t (h w)")
    hist = torch.zeros(code.shape[0], bins**3).scatter_add_(1, code, torch.ones_like(code, dtype=torch.float))
    return hist / code.shape[1]


def shot_boundaries(frames: np.ndarray, threshold: float, thumbs: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Split at hard cuts: where the colour-histogram distance (½·L1, in [0, 1]) between consecutive frames
    exceeds `threshold`. Returns [start, end) frame ranges. `thumbs`: thumbnails(frames, 32) if already made."""
    if len(frames) < 2:
        return [(0, len(frames))]
    hist = color_histograms(thumbs if thumbs is not None else thumbnails(frames))
    dist = 0.5 * (hist[1:] - hist[:-1]).abs().sum(dim=1)
    cuts = (torch.nonzero(dist > threshold).flatten() + 1).tolist()
    edges = [0, *cuts, len(frames)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def clip_scores(frames: np.ndarray, stride: int = 4, thumbs: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics the filters use, over a clip's frames (t h w c uint8):
    motion = mean |Δ| between grey frames `stride` apart (0–255 scale, 64×64 thumbnails; a stride of a quarter
    second at 16 fps makes slow motion measurable, while a truly static video stays at 0);
    black_fraction = share of frames whose 99th-percentile brightness is below 24;
    blank_fraction = share of frames whose grey level varies by less than 3 (std), i.e. one flat colour.
    `thumbs`: thumbnails(frames, 64) if already made."""
    thumbs = thumbs if thumbs is not None else thumbnails(frames, 64)
    grey = thumbs.mean(dim=1)  # t h w
    stride = min(stride, len(grey) - 1)
    motion = (grey[stride:] - grey[:-stride]).abs().mean().item() if stride > 0 else 0.0
    flat = rearrange(grey, "t h w -> t (h w)")
    p99 = torch.quantile(flat, 0.99, dim=1)
    return {
        "motion_score": motion,
        "brightness": grey.mean().item(),
        "black_fraction": (p99 < 24).float().mean().item(),
        "blank_fraction": (flat.std(dim=1) < 3).float().mean().item(),
    }


SIGNATURE_FRAMES, SIGNATURE_SIDE = 8, 8


def clip_signature(thumbs: torch.Tensor) -> np.ndarray:
    """A clip's content fingerprint for near-duplicate detection, from its 64x64 thumbnails (t c h w, 0-255):
    8 frames evenly spaced, each area-pooled to 8x8 in colour and normalised to zero mean and unit norm (so a
    re-encode, a resize or a brightness shift changes little, while a red and a blue square on the same path
    differ), concatenated and L2-normalised: 1536 float16. Cosine between two signatures: 0.9999 for
    re-encoded, 2x-resized or brightened copies of a clip, <= 0.93 between different clips of the test corpora
    (benchmarks/RESULTS.md, "Near-duplicate clips")."""
    idx = np.linspace(0, len(thumbs) - 1, SIGNATURE_FRAMES).round().astype(np.int64)
    pooled = F.adaptive_avg_pool2d(thumbs[idx].float(), SIGNATURE_SIDE).flatten(1)  # k (c s s)
    pooled = pooled - pooled.mean(dim=1, keepdim=True)
    pooled = pooled / (pooled.norm(dim=1, keepdim=True) + 1e-6)
    return F.normalize(pooled.flatten(), dim=0).numpy().astype(np.float16)


def resize_center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """t h w c uint8 -> t size size c uint8: scale the shorter side to `size` (antialiased bilinear), crop the
    centre. Runs on the uint8 frames as they are (channels-last: torch's vectorised uint8 kernel, ~10× faster
    than a float32 copy of the clip; results within one grey level of the float path)."""
    x = rearrange(torch.from_numpy(frames), "t h w c -> t c h w")  # a view, channels-last in memory
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return np.ascontiguousarray(rearrange(x, "t c h w -> t h w c").numpy())
