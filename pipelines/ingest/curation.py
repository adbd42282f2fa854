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
    "static": "motion score below static_threshold",
    "black": "most frames are black",
    "blank": "most frames are a single flat colour",
    "low_clip_score": "CLIP text-frame similarity below min_clip_score",
    "processing_failed": "an unexpected error while cutting or encoding the file's clips (the detail names it)",
}


@dataclass
class Probe:
    codec: str
    width: int
    height: int
    fps: float
    frames: int  # as declared by the container (may be 0 if unknown)
    duration_s: float


def probe(path: str) -> Probe:
    """Read stream metadata with PyAV (no decoding). Raises Reject('unreadable') on anything odd."""
    import av

    if os.path.getsize(path) == 0:
        raise Reject("unreadable", "empty file (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Reject("unreadable", "no video stream in the file")
            s = container.streams.video[0]
            fps = float(s.average_rate or s.guessed_rate or 0)
            duration = float(s.duration * s.time_base) if s.duration else float(container.duration or 0) / 1e6
            return Probe(s.codec_context.name, s.codec_context.width, s.codec_context.height, fps,
                         int(s.frames or 0), duration)
    except Reject:
        raise
    except Exception as e:  # PyAV raises many error types for malformed input; all mean "unreadable"
        raise Reject("unreadable", f"not a readable video ({type(e).__name__}: {e})") from None


def resample_indices(n: int, src_fps: float, fps: float) -> np.ndarray:
    """For output frame k at time k/fps, the index of the nearest source frame (round(k·src/fps))."""
    count = max(1, math.ceil(n * fps / src_fps - 1e-9))
    idx = np.floor(np.arange(count) * src_fps / fps + 0.5).astype(np.int64)
    return np.minimum(idx, n - 1)


class _Cancelled(Exception):
    """Raised inside a decode whose caller has given up on it (decode timeout)."""


_CHUNK = 64  # frames per decord get_batch call; a cancelled decode stops at the next chunk


def _open_resampled(path: str, fps: float, short_side: int, threads: int = 0,
                    src_size: tuple[int, int] | None = None):
    """(decord reader, source frame indices of the output frames at `fps`, src_fps, n_src): see decode_resampled."""
    import decord

    if src_size is None or min(src_size) <= 0:  # no (usable) size from the caller's probe
        probe_reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        h, w = probe_reader[0].shape[:2]
        del probe_reader
    else:
        w, h = src_size
    scale = short_side / min(h, w)
    if scale < 1:
        # even sizes, aspect preserved; decord resizes while decoding
        new_w, new_h = 2 * round(w * scale / 2), 2 * round(h * scale / 2)
        reader = decord.VideoReader(path, ctx=decord.cpu(0), width=new_w, height=new_h, num_threads=threads)
    else:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
    n, src_fps = len(reader), float(reader.get_avg_fps())
    if n == 0 or not src_fps > 0:
        raise Reject("unreadable", f"no frames or no frame rate (frames={n}, fps={src_fps})")
    return reader, resample_indices(n, src_fps, fps), src_fps, n


def _decode_error(e: Exception) -> Reject:
    # decord raises DECORDError / RuntimeError / IndexError on broken streams
    return Reject("unreadable", f"decode failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


def iter_resampled(path: str, fps: float, short_side: int, cancel: threading.Event | None = None,
                   threads: int = 0, src_size: tuple[int, int] | None = None):
    """decode_resampled as a stream: yields (src_fps, n_src) first, then the frames in chunks of _CHUNK
    (t h w c uint8), so a caller holds one chunk at a time whatever the video's length."""
    try:
        reader, idx, src_fps, n = _open_resampled(path, fps, short_side, threads, src_size)
    except Reject:
        raise
    except Exception as e:
        raise _decode_error(e) from None
    yield src_fps, n
    for i in range(0, len(idx), _CHUNK):
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        try:
            chunk = reader.get_batch(idx[i:i + _CHUNK].tolist()).asnumpy()
        except Exception as e:
            raise _decode_error(e) from None
        yield chunk


def decode_resampled(path: str, fps: float, short_side: int, cancel: threading.Event | None = None,
                     threads: int = 0, src_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float, int]:
    """Decode with decord at `fps` (nearest source frame) and, if larger, scaled so the shorter side is
    `short_side` (decoding smaller keeps memory bounded for HD sources). Returns (frames, src_fps, n_src).
    With `cancel`, the decode stops (raising _Cancelled) at the next chunk of frames once it is set.
    `threads`: decoder threads, 0 = decord's default (one per core; IngestConfig.codec_threads).
    `src_size`: the source's (width, height) when the caller has probed it (`probe`); otherwise decord is
    opened once more to read it from the first frame, which costs ~24 ms of CPU on a 640×360 file.
    The whole video in one array: ingestion streams it instead (`stream_resampled`)."""
    stream = iter_resampled(path, fps, short_side, cancel, threads, src_size)
    src_fps, n = next(stream)
    return np.ascontiguousarray(np.concatenate(list(stream))), src_fps, n


def _child(conn, path, fps, short_side, tmpdir, threads, src_size):
    try:
        frames, src_fps, n = decode_resampled(path, fps, short_side, threads=threads, src_size=src_size)
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
                    threads: int = 0, src_size: tuple[int, int] | None = None) -> tuple[np.ndarray, float, int]:
    """`decode_resampled` in a forked child that is killed after `timeout_s` (the fully isolated path:
    50–160 ms of fork + frame transfer per file). Used once a decode in this process has hung."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="lumiere-decode-") as tmpdir:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(send, path, fps, short_side, tmpdir, threads, src_size),
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

    thread = threading.Thread(target=work, name=f"lumiere-decode-{os.path.basename(path)}", daemon=True)
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
                     src_size: tuple[int, int] | None = None):
    """The frames of `decode_resampled` as a stream, decoded ahead on a helper thread (at most two chunks
    ahead, so memory is bounded by a few chunks whatever the video's length). Yields (src_fps, n_src), then
    chunks (t h w c uint8). `timeout_s` bounds the wait for each next chunk, not the whole file: a long film
    decodes for as long as it makes progress, while a hung or pathologically slow decoder gives
    Reject('decode_timeout') (the caller keeps what it got before). timeout_s <= 0: in-process, unbounded.

    Like decode_with_timeout, a decoder stuck inside one native call is left behind on its thread and later
    decodes in this process run in a forked child (`decode_in_child`; that isolated path returns the whole
    video at once, so only then does memory grow with length)."""
    if timeout_s <= 0:
        yield from iter_resampled(path, fps, short_side, threads=threads, src_size=src_size)
        return
    if _stuck_decoders():
        frames, src_fps, n = decode_in_child(path, fps, short_side, timeout_s, threads, src_size)
        yield src_fps, n
        for i in range(0, len(frames), _CHUNK):
            yield frames[i:i + _CHUNK]
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
            for item in iter_resampled(path, fps, short_side, cancel, threads, src_size):
                if not put(("ok", item)):
                    return
            put(("ok", end))
        except _Cancelled:
            pass  # the caller gave up on this stream (timeout or an early stop): nobody waits for a result
        except BaseException as e:  # Reject or anything else: re-raised in the caller
            put(("error", e))

    thread = threading.Thread(target=work, name=f"lumiere-decode-{os.path.basename(path)}", daemon=True)
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
