"""The shard encoder as ingestion runs it: x264 presets, with and without `X264_FAST_ANALYSIS`, side by side.

Ingestion re-encodes every accepted clip twice (the 128² clip and the 256² copy for SSR training) with
`lumiere.video.encode_mp4_bytes`: CRF 18, preset `veryfast`, one thread (`codec_threads: 1`). With
`mp4_fast_analysis: true` (the default) it adds `X264_FAST_ANALYSIS` (no sub-8×8 inter partitions, diamond
motion search). This compares settings (`--settings`: presets, `+fast` for the fast analysis) on the content
kinds of `benchmarks/frame_storage.py` (moving shapes, photographs under a camera pan, a 1/f texture with and
without grain), at both sizes, per clip:

- encode CPU ms (process CPU time, one thread), mean over `--rounds` rounds that alternate the order of the
  settings (A B C, C B A, …) on every clip, so load drifts on this shared machine hit all alike;
- size KiB (the `frames` cell), PSNR of the decoded clip against its frames (dB), and the loader's decode
  CPU ms (`decode_mp4_bytes`, what `pipelines/train/shards.py` does per sample).

    .venv/bin/python benchmarks/ingest_encoder.py                 # 3 clips per kind, 3 rounds: ~2 minutes
    .venv/bin/python benchmarks/ingest_encoder.py --settings veryfast+fast,superfast+fast,ultrafast
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


def parse_setting(name: str) -> tuple[str, str | None]:
    """'veryfast' -> (veryfast, None); 'veryfast+fast' -> (veryfast, X264_FAST_ANALYSIS)."""
    preset, _, extra = name.partition("+")
    if extra not in ("", "fast"):
        raise SystemExit(f"setting {name!r}: the only suffix is '+fast' (X264_FAST_ANALYSIS)")
    return preset, X264_FAST_ANALYSIS if extra else None


def measure(clips: list[np.ndarray], settings: list[str], crf: int, rounds: int) -> dict[str, dict]:
    out = {k: {"cpu": 0.0, "bytes": 0, "psnr": [], "dec": 0.0} for k in settings}
    for r in range(rounds):
        order = settings if r % 2 == 0 else settings[::-1]
        for frames in clips:
            for name in order:
                preset, params = parse_setting(name)
                t = time.process_time()
                data = encode_mp4_bytes(frames, 16, crf, preset, threads=1, x264_params=params)
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
    ap.add_argument("--settings", default="veryfast,veryfast+fast",
                    help="comma-separated x264 presets to compare, '+fast' adds X264_FAST_ANALYSIS; the first is "
                         "the reference of the ratio columns (default: veryfast,veryfast+fast; the ingest default "
                         "is veryfast+fast)")
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--hr-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        parse_setting(s)
    import torch

    torch.set_num_threads(1)  # as in a Ray decode task with num_cpus=1
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"CRF {args.crf}, one thread; '+fast' = {X264_FAST_ANALYSIS}; {args.clips} clips per kind, "
          f"{args.rounds} rounds; settings {', '.join(settings)} (ratios against {settings[0]})\n")
    print("| content | size | setting | encode CPU ms | vs first | KiB | vs first | PSNR dB | loader decode CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = {k: {"encode_ms": 0.0, "kib": 0.0} for k in settings}
    for kind, hr_clips in clips_by_kind(args.clips, args.hr_size, args.seed).items():
        if not hr_clips:
            continue
        for side in (args.hr_size, args.size):
            clips = hr_clips if side == args.hr_size else [resize_center_crop(c, side) for c in hr_clips]
            m = measure(clips, settings, args.crf, args.rounds)
            ref = m[settings[0]]
            for name in settings:
                a = m[name]
                totals[name]["encode_ms"] += a["encode_ms"]
                totals[name]["kib"] += a["kib"]
                print(f"| {kind} | {side}² | {name} | {a['encode_ms']:.1f} | {a['encode_ms'] / ref['encode_ms']:.2f} | "
                      f"{a['kib']:.1f} | {a['kib'] / ref['kib']:.2f} | {a['psnr']:.2f} | {a['loader_ms']:.1f} |",
                      flush=True)
    ref = totals[settings[0]]
    print("\nsummed over every content kind and size (one clip of each):")
    for name in settings:
        t = totals[name]
        print(f"  {name}: encode {t['encode_ms']:.0f} ms ({t['encode_ms'] / ref['encode_ms']:.2f}x), "
              f"{t['kib']:.0f} KiB ({t['kib'] / ref['kib']:.2f}x)")
    print(f"\nload after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
