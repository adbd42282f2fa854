"""Video I/O at the boundary of the system.

Everything inside the package works on one of two layouts:

- frames: ``np.ndarray`` uint8 of shape ``(t, h, w, c)`` with c = 3 (RGB), as decoders and
  encoders like it;
- tensors: ``torch.FloatTensor`` of shape ``(c, t, h, w)`` in [-1, 1], as the diffusion model
  likes it.

This module converts between files, frames and tensors, and nothing else. Writing uses PyAV
(libx264, yuv420p, so any player can open the result); reading uses decord, which is what the
curation pipeline uses for fast random access.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from einops import rearrange


class VideoReadError(ValueError):
    """A video file could not be decoded (missing, empty, corrupt or without frames)."""


def _check_frames(frames: np.ndarray) -> np.ndarray:
    """Validate a uint8 (t, h, w, 3) array and return it C-contiguous."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (t, h, w, 3), got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("frames must contain at least one frame")
    return np.ascontiguousarray(frames)


def _check_encodable(frames: np.ndarray, fps: float) -> np.ndarray:
    frames = _check_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        # yuv420p stores chroma at half resolution in both axes, so x264 needs even sizes.
        raise ValueError(f"frame height and width must be even for yuv420p H.264, got {h}x{w}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return frames


# x264 settings on top of a preset that make the encode of small clips cheaper for little size: inter
# prediction without 8x8 partitions (p8x8, b8x8) and the diamond motion search, both as in the `superfast`
# preset, whose other settings double the size. On 128²/256² clips with x264 `veryfast`: 17-29% less encoder
# CPU on photographic and textured content (7-13% on flat synthetic shapes) for 0-8% larger files and at most
# 0.07 dB less PSNR (0.27 dB on shapes at 256²) (benchmarks/ingest_encoder.py; docs/decisions.md).
X264_FAST_ANALYSIS = "partitions=i8x8,i4x4:me=dia"


def _encode_h264(target, frames: np.ndarray, fps: float, crf: int, preset: str | None = None,
                 threads: int = 0, x264_params: str | None = None) -> None:
    """Encode checked frames into `target` (a path or a binary file object) as an H.264 mp4 (x264's default
    preset, `medium`, unless `preset` names another; `threads`: x264 threads, 0 = x264's automatic choice;
    `x264_params`: x264 options over the preset, "key=value:key=value" as x264's --x264-params, which
    libavcodec passes on without checking: an unknown key is only warned about)."""
    import av  # imported lazily: only encoding needs it

    _, h, w, _ = frames.shape
    with av.open(target, mode="w", format="mp4") as container:
        # a Fraction keeps e.g. 29.97 exact enough for the container's time base
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(int(crf)), **({"preset": preset} if preset else {}),
                          **({"threads": str(int(threads))} if threads else {}),
                          **({"x264-params": x264_params} if x264_params else {})}
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float = 16, crf: int = 12) -> None:
    """Encode frames (t, h, w, 3) uint8 RGB as an H.264 mp4 at ``path``.

    The file appears atomically: we encode into a temporary file in the same directory and
    ``os.replace`` it into place, so readers (and a crashed run) never see half an mp4.
    """
    frames = _check_encodable(frames, fps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _encode_h264(tmp, frames, fps, crf)  # the temp name does not end in .mp4: format is explicit
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; make the mp4 readable like any written file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def encode_mp4_bytes(frames: np.ndarray, fps: float = 16, crf: int = 18, preset: str | None = None,
                     threads: int = 0, x264_params: str | None = None) -> bytes:
    """Frames (t, h, w, 3) uint8 -> the bytes of an H.264 mp4 (how dataset shards store clips); `preset`: an
    x264 preset (ultrafast … veryslow), x264's default (medium) when None; `threads`: x264 threads, 0 = x264's
    automatic choice (about 1.5 per core); `x264_params`: x264 options over the preset (e.g. X264_FAST_ANALYSIS)."""
    frames = _check_encodable(frames, fps)
    buf = io.BytesIO()
    _encode_h264(buf, frames, fps, crf, preset, threads, x264_params)
    return buf.getvalue()


def decode_mp4_bytes(data: bytes) -> np.ndarray:
    """The bytes of a video file -> frames (t, h, w, 3) uint8, decoded with decord from memory (every width:
    the same row-padding workaround as `read_video`)."""
    what = f"video bytes ({len(data)} bytes)"
    if not data:
        raise VideoReadError("cannot decode video bytes: empty")
    import decord

    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
        n = len(vr)
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoReadError(f"cannot decode {what}: {e}") from e
    if n == 0:
        raise VideoReadError(f"cannot decode {what}: no frames")
    return _decode_frames(vr, np.arange(n), what)


def _resample_indices(n: int, src_fps: float, fps: float) -> np.ndarray:
    """Source frame index for each output frame when resampling n frames from src_fps to fps.

    Output frame k sits at time k / fps; we take the nearest source frame, index
    round(k * src_fps / fps) (halves round up), for every k whose time falls inside the
    source duration n / src_fps.
    """
    count = max(1, math.ceil(n * fps / src_fps - 1e-9))  # epsilon: 30 frames @30 -> 16 @16, not 17
    k = np.arange(count)
    idx = np.floor(k * src_fps / fps + 0.5).astype(np.int64)
    return np.minimum(idx, n - 1)


def read_video(path: str | os.PathLike, fps: float | None = None) -> tuple[np.ndarray, float]:
    """Decode a video into frames (t, h, w, 3) uint8 RGB and return ``(frames, fps)``.

    With ``fps`` given, the clip is resampled to that rate by nearest-frame picking (no
    blending, so frames stay real frames); the returned fps is then ``fps``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VideoReadError(f"cannot read video {path!r}: no such file")
    if os.path.getsize(path) == 0:
        # checked up front: decord's error for empty files is unhelpful
        raise VideoReadError(f"cannot read video {path!r}: file is empty")

    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0))
        n = len(vr)
        src_fps = float(vr.get_avg_fps())
    except (decord.DECORDError, RuntimeError) as e:  # decord raises both, depending on where it fails
        raise VideoReadError(f"cannot read video {path!r}: {e}") from e
    if n == 0:
        raise VideoReadError(f"cannot read video {path!r}: no frames")
    if not src_fps > 0:
        raise VideoReadError(f"cannot read video {path!r}: invalid frame rate {src_fps}")

    if fps is None:
        indices, out_fps = np.arange(n), src_fps
    else:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        indices, out_fps = _resample_indices(n, src_fps, fps), float(fps)

    return _decode_frames(vr, indices, repr(path)), out_fps


def _decode_frames(vr, indices: np.ndarray, what: str) -> np.ndarray:
    """Frames `indices` of a decord VideoReader -> (t, h, w, 3) uint8, contiguous."""
    import decord

    try:
        frames = vr.get_batch(indices.tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError):
        # decord bug: for some widths (e.g. 16, 24, 48) its RGB rows carry alignment padding
        # and get_batch fails its size check; single frames come back as (h, w, padded/w),
        # so decode one by one and cut the padding off each row
        try:
            h, w = vr[0].shape[:2]
            frames = np.stack([_unpad(vr[int(i)].asnumpy(), h, w) for i in indices])
        except (decord.DECORDError, RuntimeError, ValueError) as e:
            raise VideoReadError(f"cannot decode frames of {what}: {e}") from e
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _unpad(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w, k) decord frame whose rows hold w*k bytes -> (h, w, 3), dropping row padding."""
    return rearrange(frame.reshape(h, -1)[:, : w * 3], "h (w c) -> h w c", c=3)


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (t, h, w, c) -> float tensor (c, t, h, w) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return rearrange(x, "t h w c -> c t h w").contiguous()


def tensor_to_frames(x: torch.Tensor) -> np.ndarray:
    """float tensor (c, t, h, w) in [-1, 1] -> uint8 frames (t, h, w, c); clamps out-of-range values."""
    x = torch.as_tensor(x).detach().float().cpu()
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(rearrange(x, "c t h w -> t h w c").numpy())


def spritesheet(frames: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Lay frames (t, h, w, c) out in a grid image (rows*h, cols*w, c), row-major, black padding.

    ``cols`` defaults to ceil(sqrt(t)), giving a roughly square sheet.
    """
    frames = np.asarray(frames)
    t = frames.shape[0]
    cols = cols or math.ceil(math.sqrt(t))
    rows = math.ceil(t / cols)
    pad = np.zeros((rows * cols - t, *frames.shape[1:]), dtype=frames.dtype)
    grid = np.concatenate([frames, pad], axis=0)
    return rearrange(grid, "(r k) h w c -> (r h) (k w) c", r=rows, k=cols)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Save a uint8 (h, w, 3) or (h, w) image as PNG, creating parent directories."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path, format="PNG")


MAX_IMAGE_PIXELS = 4096 * 4096  # a decompression bomb is refused, not decoded


def read_image(source: str | os.PathLike | bytes, what: str = "image", mode: str = "RGB") -> np.ndarray:
    """An image file (path or bytes) -> uint8 (h, w, 3) RGB, or (h, w) with mode="L" (masks: white, or
    transparent in an RGBA image as in OpenAI's edit API, marks the region).

    Raises ValueError naming `what` when it cannot be decoded or is too large.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {source}: {e.strerror or e}") from None
    if not data:
        raise ValueError(f"the {what} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"the {what} is {img.width}x{img.height}; at most {MAX_IMAGE_PIXELS} pixels")
            if mode == "L" and img.mode in ("RGBA", "LA") and _alpha_has_holes(img):
                return 255 - np.asarray(img.getchannel("A"), dtype=np.uint8)  # transparent = the region
            return np.asarray(img.convert(mode), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"the {what} does not decode as an image (PNG, JPEG, WebP, …): {e}") from None


def _alpha_has_holes(img) -> bool:
    """An RGBA mask whose alpha is not all opaque marks its region by alpha (OpenAI's edit convention: the
    transparent part is the region); an opaque one by its brightness."""
    alpha = np.asarray(img.getchannel("A"))
    return bool((alpha < 255).any())


def fit_frames(frames: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """(t, h, w, c) or (t, h, w) uint8 -> square `size`×`size`: center-crop to square, then resize
    (bilinear with antialiasing for pictures, nearest for masks)."""
    frames = np.asarray(frames)
    squeeze = frames.ndim == 3
    x = frames[..., None] if squeeze else frames
    t, h, w, _ = x.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, top : top + side, left : left + side]
    if side != size:
        v = rearrange(torch.from_numpy(np.ascontiguousarray(x)).float(), "t h w c -> t c h w")
        if nearest:
            v = torch.nn.functional.interpolate(v, size=(size, size), mode="nearest")
        else:
            v = torch.nn.functional.interpolate(v, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        x = rearrange(v.round().clamp(0, 255).to(torch.uint8), "t c h w -> t h w c").numpy()
    return np.ascontiguousarray(x[..., 0] if squeeze else x)
