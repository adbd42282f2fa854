"""Which decoder should a decode task use? decord (ingestion's local path) vs torchcodec, side by side in one run.

One grainy H.264 file (`remote_decode.grainy_video`: a panning 1/f texture with per-frame grain, x264's default
GOP) is decoded the way a decode task does it: output frames at `--fps` by presentation time, the shorter side
scaled to `--short-side`, one codec thread, chunks of 64 frames. Per method, alternating over `--repeats` rounds
so load drift hits all alike: output frames per second (median), and the frames' mean |difference| from the
decord path's (0-255; the decoders pick frames by slightly different rules, see below).

- `decord` is `curation.iter_resampled` itself: decord resizes while decoding, frames nearest each output time.
- `torchcodec, resize in decoder`: `VideoDecoder(transforms=[Resize])`, `get_frames_played_at` (the frame on
  screen at each output time, which can be one source frame earlier than the nearest).
- `torchcodec, then torch resize`: full-size frames, then the antialiased uint8 resize ingestion uses.

torchcodec links the system's FFmpeg (4-8) at run time and these machines have none, so the run points it at the
FFmpeg 8 libraries PyAV's wheel bundles (`--ffmpeg-libs`, symlinks with plain sonames); torchcodec is not a
project dependency, so it is installed beside the venv for the measurement:

    pip install --no-deps --target /tmp/tcenv/pkg torchcodec==0.17.0
    PYTHONPATH=/tmp/tcenv/pkg LD_LIBRARY_PATH=/tmp/tcenv/lib:.venv/lib/python3.11/site-packages/av.libs \
        .venv/bin/python benchmarks/decoders.py --seconds 60 --width 1280 --height 720
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from remote_decode import grainy_video  # noqa: E402

from pipelines.ingest.curation import _resize_frames, iter_resampled, output_size, probe  # noqa: E402


def decord_frames(path: str, fps: float, short_side: int, meta) -> np.ndarray:
    it = iter_resampled(path, fps, short_side, None, 1, (meta.coded_width, meta.coded_height),
                        (meta.sample_aspect, meta.rotation))
    next(it)
    return np.concatenate(list(it))


def torchcodec_frames(path: str, fps: float, short_side: int, meta, in_decoder: bool) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    w, h = output_size((meta.coded_width, meta.coded_height), short_side, (meta.sample_aspect, meta.rotation))
    dec = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=1,
                       transforms=[Resize((h, w))] if in_decoder else None)
    md = dec.metadata
    start, end = float(md.begin_stream_seconds or 0.0), float(md.end_stream_seconds)
    times = start + np.arange(int((end - start) * fps)) / fps
    out = []
    for i in range(0, len(times), 64):
        frames = dec.get_frames_played_at(seconds=times[i:i + 64].tolist()).data.numpy()
        out.append(frames if in_decoder else _resize_frames(frames, (h, w)))
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--src-fps", type=int, default=30)
    ap.add_argument("--fps", type=float, default=16)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import torchcodec

    path = tempfile.mktemp(suffix=".mp4")
    with open(path, "wb") as f:
        f.write(grainy_video(args.seconds, args.src_fps, args.width, args.height))
    meta = probe(path)
    print(f"decoders: {args.seconds:g} s at {args.width}x{args.height}, {args.src_fps} fps, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB -> {args.fps:g} fps, shorter side {args.short_side}; "
          f"torchcodec {torchcodec.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}", flush=True)
    methods = {
        "decord (ingestion's path)": lambda: decord_frames(path, args.fps, args.short_side, meta),
        "torchcodec, resize in decoder": lambda: torchcodec_frames(path, args.fps, args.short_side, meta, True),
        "torchcodec, then torch resize": lambda: torchcodec_frames(path, args.fps, args.short_side, meta, False),
    }
    rates, outputs = {m: [] for m in methods}, {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            frames = fn()
            rates[name].append(len(frames) / (time.perf_counter() - t))
            outputs[name] = frames
    ref = outputs["decord (ingestion's path)"]
    base = float(np.median(rates["decord (ingestion's path)"]))
    print("\n| method | output frames | frames/s (median) | vs decord | mean abs diff from decord's frames |")
    print("|---|---|---|---|---|")
    for name, frames in outputs.items():
        n = min(len(frames), len(ref))
        diff = np.abs(frames[:n].astype(np.int16) - ref[:n].astype(np.int16)).mean() if frames.shape[1:] == \
            ref.shape[1:] else float("nan")
        r = float(np.median(rates[name]))
        print(f"| {name} | {len(frames)} {frames.shape[1]}x{frames.shape[2]} | {r:.0f} | {r / base:.2f}x | "
              f"{diff:.2f} |", flush=True)
    os.unlink(path)


if __name__ == "__main__":
    main()
