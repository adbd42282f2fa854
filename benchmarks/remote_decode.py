"""Decoding a long S3 file cut into time ranges: a local copy + decord (`remote_decode: copy`, the default) vs
PyAV reading the object in place by byte ranges (`remote_decode: ranges`), side by side in one run.

One grainy video (a 1/f texture panning under per-frame sensor grain, so the codec cannot make it tiny; x264's
default GOP of 250 frames, so a range's keyframe lookback is the realistic worst case) is put on a local S3
server (moto's, 127.0.0.1) and cut into `--ranges` equal time ranges, decoded the way a decode task does
(`curation.iter_resampled`: 16 fps out, the shorter side 256, one codec thread). Per method:

- bytes fetched from S3 in all, as a multiple of the file's size;
- seconds to the first frame of a range (the copy waits for the whole download first);
- decode seconds per range and output frames per second (wall, one process, ranges one after another);
- `copy, shared`: the ranges on one node share one copy (the node cache); `copy, apart`: every range on its own
  node, one copy each (what a cluster does when the ranges spread out).

moto on localhost serves at memory speed, so download time here is a floor: on real S3 a copy of a multi-GB film
at ~100-200 MB/s per task is minutes before the first frame.

    .venv/bin/python benchmarks/remote_decode.py                       # 120 s at 640x360, 4 ranges
    .venv/bin/python benchmarks/remote_decode.py --seconds 60 --ranges 2 --json /tmp/rd.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def grainy_video(seconds: float, fps: int, w: int, h: int, seed: int = 0) -> bytes:
    """An H.264 mp4 of a panning 1/f colour texture with per-frame grain (σ = 4 levels), encoded in chunks."""
    import av

    rng = np.random.default_rng(seed)
    big = 2 * max(w, h)
    fy, fx = np.meshgrid(np.fft.fftfreq(big), np.fft.fftfreq(big), indexing="ij")
    amp = 1 / np.maximum(np.hypot(fx, fy), 1 / big)
    tex = np.stack([np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((big, big))))) for _ in range(3)], -1)
    tex = ((tex - tex.min()) / np.ptp(tex) * 255).astype(np.uint8)
    path = tempfile.mktemp(suffix=".mp4")
    with av.open(path, "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "23", "preset": "veryfast"}
        n = int(seconds * fps)
        for i in range(n):
            x, y = int(i * 1.3) % (big - w), int(i * 0.7) % (big - h)
            f = tex[y:y + h, x:x + w].astype(np.int16) + rng.normal(0, 4, (h, w, 1)).astype(np.int16)
            for p in s.encode(av.VideoFrame.from_ndarray(np.clip(f, 0, 255).astype(np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def decode_range(source, meta, fps: float, short_side: int, frames) -> tuple[int, float, float]:
    """(output frames, seconds to the first chunk, seconds in all) for one range."""
    from pipelines.ingest.curation import iter_resampled

    t = time.perf_counter()
    it = iter_resampled(source, fps, short_side, None, 1, (meta.coded_width, meta.coded_height),
                        (meta.sample_aspect, meta.rotation), frames)
    next(it)
    n, first = 0, None
    for chunk in it:
        first = first if first is not None else time.perf_counter() - t
        n += len(chunk)
    return n, first or 0.0, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--src-fps", type=int, default=24)
    ap.add_argument("--ranges", type=int, default=4)
    ap.add_argument("--blocks", default="1048576,4194304", help="remote_read_block_bytes values to measure")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import boto3
    from moto.server import ThreadedMotoServer

    from lumiere.storage import StorageOptions
    from pipelines.ingest.curation import probe
    from pipelines.ingest.range_decode import RangeSource
    from pipelines.ingest.source_cache import local_source

    t = time.perf_counter()
    data = grainy_video(args.seconds, args.src_fps, args.width, args.height)
    print(f"video: {args.seconds:.0f} s at {args.width}x{args.height}, {args.src_fps} fps, "
          f"{len(data) / 2**20:.1f} MiB (encoded in {time.perf_counter() - t:.0f} s)", flush=True)
    fps, short_side = 16.0, 256
    n_out = int(args.seconds * fps)
    bounds = np.linspace(0, n_out, args.ranges + 1).astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    results = []
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                              region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        client.put_object(Bucket="bench", Key="long.mp4", Body=data)
        uri = "s3://bench/long.mp4"
        options = StorageOptions(endpoint_override=endpoint, region="us-east-1", access_key="test", secret_key="test")

        def copy_method(shared: bool) -> dict:
            cache = tempfile.mkdtemp() if shared else None
            fetched, firsts, totals, frames = 0, [], [], 0
            for r in ranges:
                t = time.perf_counter()
                with local_source(uri, options, shared, cache, 32 * 2**30) as (path, got):
                    fetched += got
                    meta = probe(path)
                    n, first, total = decode_range(path, meta, fps, short_side, r)
                wall = time.perf_counter() - t
                firsts.append(wall - total + first)
                totals.append(wall)
                frames += n
            return dict(method=f"copy + decord, {'shared (one node)' if shared else 'apart (a node per range)'}",
                        fetched=fetched, first_s=float(np.mean(firsts)), range_s=float(np.mean(totals)),
                        frames=frames)

        def ranges_method(block: int) -> dict:
            fetched, firsts, totals, frames = 0, [], [], 0
            for r in ranges:
                t = time.perf_counter()
                src = RangeSource(uri, options, len(data), block)
                try:
                    meta = probe(src)
                    n, first, total = decode_range(src, meta, fps, short_side, r)
                finally:
                    fetched += src.fetched
                    src.close()
                wall = time.perf_counter() - t
                firsts.append(wall - total + first)
                totals.append(wall)
                frames += n
            return dict(method=f"ranges (PyAV), {block // 2**20} MiB blocks", fetched=fetched,
                        first_s=float(np.mean(firsts)), range_s=float(np.mean(totals)), frames=frames)

        methods = [lambda: copy_method(True), lambda: copy_method(False)]
        methods += [lambda b=int(b): ranges_method(b) for b in args.blocks.split(",")]
        for m in methods:
            results.append(m())
            r = results[-1]
            print(f"{r['method']:<40} fetched {r['fetched'] / len(data):5.2f}× size  first frame {r['first_s']:6.2f} s"
                  f"  per range {r['range_s']:6.1f} s  {r['frames'] / (r['range_s'] * len(ranges)):6.1f} frames/s"
                  f"  ({r['frames']} frames)", flush=True)
    finally:
        server.stop()
    base = results[0]
    print("\n| method | S3 bytes fetched (× size) | first frame of a range (s) | s per range | output frames/s | "
          "vs copy, shared |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['fetched'] / len(data):.2f} | {r['first_s']:.2f} | {r['range_s']:.1f} | "
              f"{r['frames'] / (r['range_s'] * len(ranges)):.1f} | {base['range_s'] / r['range_s']:.2f}× |")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), size=len(data), results=results), f, indent=1)


if __name__ == "__main__":
    main()
