"""Uploads are bounded before they cost memory or CPU (serve/inputs.py), without a server: a body is refused as
soon as its count passes the limit (however it is framed), and a video's header is checked before any frame is
decoded."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from starlette.requests import Request

from lumiere.video import encode_mp4_bytes
from serve.inputs import ApiError, VideoLimits, decode_video, probe_video, read_body

LIMITS = VideoLimits(max_frames=64, max_side=256, max_decoded_bytes=8 * 2**20)


def _request(chunks: list[bytes], headers: dict[str, str]) -> tuple[Request, list[int]]:
    """A Starlette request fed chunk by chunk; the list counts the chunks the server pulled."""
    pulled = [0]
    it = iter(chunks)

    async def receive():
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode())
                                                                       for k, v in headers.items()]}
    return Request(scope, receive), pulled


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit():
    chunks = [b"x" * 1024] * 1000  # 1000 KiB offered, no Content-Length
    request, pulled = _request(chunks, {"content-type": "application/json"})
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(request, max_bytes=10 * 1024))
    assert e.value.status == 413 and "counted as it streamed in" in e.value.message
    assert pulled[0] == 11  # it stopped reading right past the limit, not after all 1000 chunks
    # a lying Content-Length (small) does not help
    request, pulled = _request(chunks, {"content-type": "multipart/form-data; boundary=b", "content-length": "10"})
    with pytest.raises(ApiError):
        asyncio.run(read_body(request, max_bytes=10 * 1024))
    assert pulled[0] == 11


def test_a_video_is_checked_from_its_header_before_any_frame_is_decoded(monkeypatch):
    import lumiere.video

    def no_decoding(data):
        raise AssertionError("decoded before the limits were checked")

    monkeypatch.setattr(lumiere.video, "decode_mp4_bytes", no_decoding)
    cases = {
        "frames": (encode_mp4_bytes(np.zeros((80, 16, 16, 3), np.uint8), 16), "80 frames; at most 64"),
        "side": (encode_mp4_bytes(np.zeros((2, 16, 320, 3), np.uint8), 16), "320x16; at most 256"),
        "decoded size": (encode_mp4_bytes(np.zeros((60, 240, 240, 3), np.uint8), 16), "MiB decoded"),
        "not a video": (b"\x00\x01garbage" * 10, "does not decode as a video"),
        "empty": (b"", "is empty"),
    }
    for name, (data, words) in cases.items():
        with pytest.raises(ApiError) as e:
            decode_video(data, "video", LIMITS)
        assert e.value.status in (400, 413) and words in e.value.message, (name, e.value.message)
    probe = probe_video(encode_mp4_bytes(np.zeros((12, 32, 48, 3), np.uint8), 16), "video", LIMITS)
    assert (probe.frames, probe.width, probe.height) == (12, 48, 32) and probe.duration_s == pytest.approx(0.75)


def test_a_truncated_multipart_body_is_refused_not_parsed_as_far_as_it_goes():
    import httpx

    good = httpx.Request("POST", "http://x/v1/videos", data={"prompt": "x"},
                         files={"input_reference": ("a.png", b"\x89PNG" + b"0" * 2000)})
    raw = good.read()
    ctype = good.headers["content-type"]
    body, _ = asyncio.run(read_body(_request([raw], {"content-type": ctype})[0], max_bytes=2**20))
    assert body["prompt"] == "x" and body["input_reference"].startswith(b"\x89PNG")
    for cut in (len(raw) // 2, len(raw) - 10):
        with pytest.raises(ApiError, match="truncated"):
            asyncio.run(read_body(_request([raw[:cut]], {"content-type": ctype})[0], max_bytes=2**20))
