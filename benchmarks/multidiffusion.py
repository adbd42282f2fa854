"""MultiDiffusion SSR (the paper's Fig. 14 ablation, measured): cost and seams of temporal windowing.

Trains a small SSR in-process on moving-shapes clips (random `ssr.window`-frame windows of high-resolution
clips, the low-resolution input made by downsampling them), then upsamples held-out `--frames`-frame clips
four ways, with the same noise and the same sampler:

    global          one pass over the whole clip (the reference; what memory forbids at paper scale)
    multidiffusion  overlapping windows fused at every denoising step (overlap `ssr.overlap`, the paper's 2)
    independent     non-overlapping windows, each denoised on its own (no MultiDiffusion)
    stitched        overlapping windows denoised on their own, averaged only at the end (no MultiDiffusion)

Cost: wall time per clip and model evaluations (window passes) relative to `independent`.
Seam error: mean |frame[f+1] − frame[f]| over the frame pairs that straddle a window boundary of the
non-overlapping partition, divided by the same over all other pairs (1.0 = no visible seam); the same ratio of
the ground-truth clips is printed for reference. Error vs ground truth: mean absolute error in grey levels.

    python benchmarks/multidiffusion.py                 # tiny SSR, 200 training steps, 32-frame clips
    python benchmarks/multidiffusion.py --config small --train-steps 600 --frames 64
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lumiere.checkpoint import build_ssr  # noqa: E402
from lumiere.config import load_config  # noqa: E402
from lumiere.diffusion import Conditioning, sample, sampling_scheduler  # noqa: E402
from lumiere.multidiffusion import MultiDiffusion, fuse, temporal_windows  # noqa: E402
from lumiere.shapes import COLORS, DIRECTIONS, SHAPES, ShapeSpec, caption, render_clip  # noqa: E402
from lumiere.ssr import degrade, upsample_condition  # noqa: E402
from lumiere.text_encoder import TextEncoder  # noqa: E402
from lumiere.trainer import TrainStep, clips_to_model  # noqa: E402


def corpus(n: int, frames: int, size: int, seed: int, data: str = "shapes"):
    """n moving-shapes clips (b c t h w in [-1, 1]) and their captions. data="texture" adds a fine stripe texture
    (period 2 px, ±48 grey levels) with a random orientation and phase per clip, constant over time: the SSR's
    ×2 area-averaged input carries none of it, so the SSR must invent it, and keep it the same on every frame."""
    rng = np.random.default_rng(seed)
    specs = [ShapeSpec(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(DIRECTIONS))))
             for _ in range(n)]
    clips = np.stack([render_clip(s, frames, size, rng, bounce=True) for s in specs]).astype(np.float32)
    if data == "texture":
        coord = np.arange(size)
        for clip in clips:
            stripes = (coord + rng.integers(2)) % 2 * 2.0 - 1.0
            clip += 48 * (stripes[None, :, None, None] if rng.integers(2) else stripes[None, None, :, None])
    clips = np.clip(clips, 0, 255).round().astype(np.uint8)
    return clips_to_model(torch.from_numpy(clips)), [caption(s) for s in specs]


def seam_ratio(video: torch.Tensor, window: int) -> float:
    """video b c t h w: boundary / interior mean frame-to-frame difference for windows of `window` frames."""
    d = (video[:, :, 1:] - video[:, :, :-1]).abs().mean(dim=(0, 1, 3, 4))  # (t-1,) pair f -> f+1
    boundary = torch.zeros_like(d, dtype=torch.bool)
    for s, _ in temporal_windows(video.shape[2], window, 0)[1:]:
        boundary[s - 1] = True
    return float(d[boundary].mean() / d[~boundary].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", choices=["shapes", "texture"], default="shapes",
                    help="texture: detail the low-res input lacks, which each window must invent (see corpus)")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. video.size=16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["train.lr=0.002", "train.warmup_steps=20", f"train.max_steps={args.train_steps}",
                                    *args.set])
    s = cfg.ssr
    hr = cfg.video.size * s.scale
    encoder = TextEncoder(cfg.text)

    train_clips, train_caps = corpus(64, s.window * 2, hr, seed=0, data=args.data)
    context, pooled = encoder.encode_text(train_caps)
    torch.manual_seed(0)
    model = build_ssr(cfg)
    step = TrainStep(model, cfg, "ssr")
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    while step.step < args.train_steps:
        idx = torch.randint(0, len(train_clips), (cfg.train.batch_size,), generator=g)
        start = int(torch.randint(0, s.window + 1, (1,), generator=g))
        metrics = step(train_clips[idx, :, start:start + s.window], Conditioning(context[idx], pooled[idx]))
        if step.step % 50 == 0:
            print(f"train step {step.step}/{args.train_steps} loss {metrics['loss']:.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.load_state_dict(step.ema.state_dict(model))
    model.eval()

    test, test_caps = corpus(args.clips, args.frames, hr, seed=1, data=args.data)
    up = upsample_condition(degrade(test, s.scale), s.scale)
    cond = Conditioning(*encoder.encode_text(test_caps))
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(1))

    def run(denoiser, x_noise=noise, condition=up, c=cond):
        sched = sampling_scheduler(cfg.diffusion, "ddim", args.steps)
        return sample(denoiser, x_noise, sched, c, guidance_scale=1.0, condition=condition)

    results = {}
    counts = {}

    def timed(name, fn, passes):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn()
        results[name] = (out, (time.perf_counter() - t) / args.clips)
        counts[name] = passes

    T, W, OV = args.frames, s.window, s.overlap
    n_md = len(temporal_windows(T, W, OV))
    n_ind = len(temporal_windows(T, W, 0))
    timed("global", lambda: run(model), 1)
    timed("multidiffusion", lambda: run(MultiDiffusion(model, W, OV)), n_md)
    timed("independent", lambda: run(MultiDiffusion(model, W, 0)), n_ind)

    def stitched():
        wins = temporal_windows(T, W, OV)
        outs = []
        for a, b in wins:
            sub = Conditioning(cond.context, cond.pooled)
            outs.append(run(model, noise[:, :, a:b], up[:, :, a:b], sub))
        return fuse(outs, wins, T, OV)

    timed("stitched", stitched, n_md)
    gt_ratio = seam_ratio(test, W)
    print(f"\nSSR {args.config} ({args.data}, overrides {args.set or '-'}): ×{s.scale} to {hr}x{hr}, "
          f"{T}-frame clips, windows of {W} (overlap {OV}), "
          f"{args.steps} DDIM steps, {args.clips} clips; trained {args.train_steps} steps in {train_s:.0f}s")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"ground-truth seam ratio: {gt_ratio:.3f}\n")
    print("| variant | window passes / step | s per clip | cost vs independent | seam ratio | MAE vs truth |")
    print("|---|---:|---:|---:|---:|---:|")
    base_t = results["independent"][1]
    for name, (out, sec) in results.items():
        mae = float((out.clamp(-1, 1) - test).abs().mean() * 127.5)
        print(f"| {name} | {counts[name]} | {sec:.2f} | {sec / base_t:.2f}× | {seam_ratio(out.clamp(-1, 1), W):.3f} "
              f"| {mae:.2f} |")


if __name__ == "__main__":
    main()
