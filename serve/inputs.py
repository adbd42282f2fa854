"""Request bodies and uploaded media, bounded before they cost memory or CPU.

- `read_body`: the body is counted while it streams in and refused with 413 past the limit, whatever
  `Content-Length` says (or when there is none: chunked uploads); a form is then parsed from that bounded buffer.
- `probe_video`: an uploaded video's frame count, size and duration from its container headers (PyAV), checked
  against the limits before a single frame is decoded.
- `decode_video` / `decode_image` are blocking: the ingress calls them in a worker thread, never on its event loop.
Every problem is an `ApiError` (a 4xx with the OpenAI error object).
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def too_large(message: str, param: str | None = None) -> ApiError:
    return ApiError(413, message, param, "request_too_large")


async def read_raw(request: Request, max_bytes: int) -> bytes:
    """The body, counted as it arrives: more than `max_bytes` is a 413 as soon as the count passes it."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise too_large(f"the request is {int(length)} bytes; at most {max_bytes} bytes are accepted")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise too_large(f"the request body exceeds {max_bytes} bytes (counted as it streamed in)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request, max_bytes: int, max_fields: int = 64) -> tuple[dict[str, Any], bytes]:
    """Multipart form (what the SDK sends), urlencoded form or JSON -> ({field: str | bytes | dict}, raw body).
    Form keys like `video[id]` become nested dicts; uploaded files become bytes."""
    raw = await read_raw(request, max_bytes)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        _check_multipart_complete(raw, ctype)
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=8, max_fields=max_fields,
                                                            max_part_size=max_bytes)
        except Exception as e:  # noqa: BLE001 - malformed or truncated multipart, too many parts
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise bad(f"the form body does not parse: {detail}", None, "invalid_body") from None
        out: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = await value.read()
            if "[" in key and key.endswith("]"):
                outer, inner = key[:-1].split("[", 1)
                if not isinstance(out.get(outer), dict):
                    out[outer] = {}
                out[outer][inner] = value
            else:
                out[key] = value
        return out, raw
    if not raw.strip():
        return {}, raw
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise bad(f"the body is neither multipart/form-data nor valid JSON: {e}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the JSON body must be an object", None, "invalid_json")
    return body, raw


def _check_multipart_complete(raw: bytes, ctype: str) -> None:
    """A multipart body cut short (a dropped connection, a client bug) still parses as far as it goes, so a
    truncated upload would silently lose its file: refuse a body that does not end with its closing boundary."""
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";")[1:]
                     if p.strip().lower().startswith("boundary=")), None)
    if not boundary:
        raise bad("the multipart/form-data body has no boundary in its Content-Type", None, "invalid_body")
    if not raw.rstrip(b"\r\n").endswith(b"--" + boundary.encode() + b"--"):
        raise bad("the multipart/form-data body is truncated: it does not end with its closing boundary; send the "
                  "whole request again", None, "invalid_body")


def data_url(value: str, param: str) -> bytes:
    if not value.startswith("data:") or ";base64," not in value:
        raise bad(f"{param} must be an uploaded file or a data: URL (base64); remote URLs are not fetched",
                  param, "invalid_reference")
    try:
        return base64.b64decode(value.split(";base64,", 1)[1], validate=True)
    except ValueError:
        raise bad(f"{param} is not valid base64", param, "invalid_reference") from None


@dataclass(frozen=True)
class VideoLimits:
    max_frames: int
    max_side: int
    max_decoded_bytes: int  # frames x h x w x 3 once decoded


@dataclass(frozen=True)
class VideoProbe:
    frames: int
    width: int
    height: int
    duration_s: float | None


def probe_video(data: bytes, param: str, limits: VideoLimits) -> VideoProbe:
    """Frame count, size and duration from the container, checked against `limits`, without decoding a frame."""
    import av

    if not data:
        raise bad(f"the {param} is empty", param, "invalid_video")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.video
            if not streams:
                raise bad(f"the {param} has no video stream", param, "invalid_video")
            st = streams[0]
            width, height = int(st.codec_context.width or 0), int(st.codec_context.height or 0)
            duration = float(st.duration * st.time_base) if st.duration and st.time_base else (
                container.duration / 1e6 if container.duration else None)
            rate = float(st.average_rate) if st.average_rate else None
            frames = int(st.frames or 0)
            if frames <= 0 and duration and rate:
                frames = math.ceil(duration * rate)
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - not a container PyAV can read
        raise bad(f"the {param} does not decode as a video (mp4/H.264): {str(e).splitlines()[0][:200]}", param,
                  "invalid_video") from None
    if width <= 0 or height <= 0:
        raise bad(f"the {param} has no frame size in its header", param, "invalid_video")
    if frames <= 0:
        raise bad(f"the {param} says neither its frame count nor its duration; re-encode it as mp4", param,
                  "invalid_video")
    if frames > limits.max_frames:
        raise bad(f"the {param} has {frames} frames; at most {limits.max_frames}", param, "invalid_video")
    if max(width, height) > limits.max_side:
        raise bad(f"the {param} is {width}x{height}; at most {limits.max_side} pixels a side", param,
                  "invalid_video")
    if frames * width * height * 3 > limits.max_decoded_bytes:
        raise too_large(f"the {param} ({frames} frames of {width}x{height}) would take "
                        f"{frames * width * height * 3 / 2**20:.0f} MiB decoded; at most "
                        f"{limits.max_decoded_bytes / 2**20:.0f} MiB: send fewer frames or a smaller size", param)
    return VideoProbe(frames, width, height, duration)


def decode_video(data: bytes, param: str, limits: VideoLimits) -> np.ndarray:
    """Probe, then decode (blocking: call it in a thread)."""
    from lumiere.video import decode_mp4_bytes

    probe = probe_video(data, param, limits)
    try:
        frames = decode_mp4_bytes(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the upload's fault
        raise bad(f"the {param} does not decode as a video (mp4/H.264): {str(e).splitlines()[0][:200]}", param,
                  "invalid_video") from None
    if frames.ndim != 4 or len(frames) == 0:
        raise bad(f"the {param} has no frames", param, "invalid_video")
    if len(frames) > limits.max_frames or max(frames.shape[1:3]) > limits.max_side:
        # the header under-stated the stream: refuse what the limits exist to keep out
        raise bad(f"the {param} decodes to {len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}, more than its "
                  f"header says ({probe.frames} of {probe.width}x{probe.height}) and over the limits", param,
                  "invalid_video")
    return frames


def decode_image(data: bytes, param: str, mode: str = "RGB") -> np.ndarray:
    from lumiere.video import read_image

    try:
        return read_image(data, what=param, mode=mode)
    except ValueError as e:
        raise bad(str(e), param, "invalid_image") from None
