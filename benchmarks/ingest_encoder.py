"""The shard encoder as ingestion runs it: x264 preset alone vs preset + `X264_FAST_ANALYSIS`.

Ingestion re-encodes every accepted clip twice (the 128² clip and the 256² copy for SSR training) with
`lumiere.video.encode_mp4_bytes`: CRF 18, preset `veryfast`, one thread (`codec_threads: 1`). With
`mp4_fast_analysis: true` (the default) it adds `X264_FAST_ANALYSIS` (no sub-8×8 inter partitions, diamond
motion search). This compares the two on the content kinds of `benchmarks/frame_storage.py` (moving shapes,
photographs under a camera pan, a 1/f texture with and without grain), at both sizes, per clip:

- encode CPU ms (process CPU time, one thread), mean over `--rounds` rounds that alternate the order of the two
  settings (A B, B A, …) on every clip, so load drifts on this shared machine hit both alike;
- size KiB (the `frames` cell), PSNR of the decoded clip against its frames (dB), and the loader's decode
  CPU ms (`decode_mp4_bytes`, what `pipelines/train/shards.py` does per sample).

    .venv/bin/python benchmarks/ingest_encoder.py                 # 3 clips per kind, 3 rounds: ~2 minutes
    .venv/bin/python benchmarks/ingest_encoder.py --clips 8 --preset faster
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from frame_storage import photo_clip, psnr, sample_photos, shape_clips, texture_clip  # noqa: E402

from lumiere.video import X264_FAST_ANALYSIS, decode_mp4_bytes, encode_mp4_bytes  # noqa: E402
from pipelines.ingest.curation import resize_center_crop  # noqa: E402


def clips_by_kind(n: int, hr: int, seed: int) -> dict[str, list[np.ndarray]]:
    photos = sample_photos()
    return {
        "moving shapes": shape_clips(n, hr, seed),
        "photographs, camera pan": [photo_clip(photos[i % len(photos)], hr) for i in range(n)] if photos else [],
        "1/f texture": [texture_clip(hr, seed + i) for i in range(n)],
        "1/f texture + grain (σ 4)": [texture_clip(hr, seed + i, grain=4.0) for i in range(n)],
    }


def measure(clips: list[np.ndarray], preset: str, crf: int, rounds: int) -> dict[str, dict]:
    settings = {"preset only": None, "fast analysis": X264_FAST_ANALYSIS}
    out = {k: {"cpu": 0.0, "bytes": 0, "psnr": [], "dec": 0.0} for k in settings}
    for r in range(rounds):
        order = list(settings) if r % 2 == 0 else list(settings)[::-1]
        for frames in clips:
            for name in order:
                t = time.process_time()
                data = encode_mp4_bytes(frames, 16, crf, preset, threads=1, x264_params=settings[name])
                out[name]["cpu"] += time.process_time() - t
                if r == 0:
                    t = time.process_time()
                    decoded = decode_mp4_bytes(data)
                    out[name]["dec"] += time.process_time() - t
                    out[name]["bytes"] += len(data)
                    out[name]["psnr"].append(psnr(decoded, frames)[0])
    n = len(clips)
    return {k: {"encode_ms": 1000 * v["cpu"] / (rounds * n), "kib": v["bytes"] / n / 1024,
                "psnr": float(np.mean(v["psnr"])), "loader_ms": 1000 * v["dec"] / n} for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=3, help="clips per content kind (default 3)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (default 3)")
    ap.add_argument("--preset", default="veryfast", help="x264 preset (default veryfast, the ingest default)")
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--hr-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as in a Ray decode task with num_cpus=1
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"x264 preset {args.preset}, CRF {args.crf}, one thread; fast analysis = {X264_FAST_ANALYSIS}; "
          f"{args.clips} clips per kind, {args.rounds} rounds\n")
    print("| content | size | encode CPU ms: preset only | fast analysis | ratio | KiB: preset only | fast analysis "
          "| ratio | PSNR dB: preset only | fast analysis | loader decode CPU ms: preset only | fast analysis |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, hr_clips in clips_by_kind(args.clips, args.hr_size, args.seed).items():
        if not hr_clips:
            continue
        for side in (args.hr_size, args.size):
            clips = hr_clips if side == args.hr_size else [resize_center_crop(c, side) for c in hr_clips]
            m = measure(clips, args.preset, args.crf, args.rounds)
            a, b = m["preset only"], m["fast analysis"]
            print(f"| {kind} | {side}² | {a['encode_ms']:.1f} | {b['encode_ms']:.1f} | "
                  f"{b['encode_ms'] / a['encode_ms']:.2f} | {a['kib']:.1f} | {b['kib']:.1f} | "
                  f"{b['kib'] / a['kib']:.3f} | {a['psnr']:.2f} | {b['psnr']:.2f} | {a['loader_ms']:.1f} | "
                  f"{b['loader_ms']:.1f} |", flush=True)
    print(f"\nload after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
