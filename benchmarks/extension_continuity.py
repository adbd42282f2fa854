"""Does a small conditional STUNet learn to continue a clip? (issue 5's extension test, measured at other budgets)

Trains the conditional STUNet from scratch in-process (every weight trains, no prior) on synthetic clips whose
colours drift slowly, then extends held-out clips with `TextToVideo.generate(task="extend")` (the last 4 of 8
frames condition the next clip) and compares the first new frame with the clip's last frame, against an
unconditioned sample from the same model:

    ratio = mean gap(first new frame, last input frame) / mean gap(unconditioned frame 0, last input frame)

1 means the condition is ignored; the test in tests/test_tasks.py asks for < 0.5. Also reported: how much the
condition changes the model's prediction of the known frames at the noisiest timestep (x0 error with the
condition vs with a zero condition), which shows whether the ⟨C, M⟩ channels are used at all.

    python benchmarks/extension_continuity.py                    # the test's setup: binary patterns, 16², 300 steps
    python benchmarks/extension_continuity.py --data fades --steps 150   # the test's earlier setup
    python benchmarks/extension_continuity.py --data patterns --size 8 --steps 1200 --set train.lr=0.01
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lumiere.checkpoint import build_stunet, save_checkpoint  # noqa: E402
from lumiere.conditioning import extend_condition  # noqa: E402
from lumiere.config import load_config  # noqa: E402
from lumiere.diffusion import Conditioning, with_condition  # noqa: E402
from lumiere.pipeline import TextToVideo, _to_model  # noqa: E402
from lumiere.text_encoder import TextEncoder  # noqa: E402
from lumiere.trainer import TrainStep, clips_to_model  # noqa: E402

PROMPT = "a colour slowly changing"
TRAIN = ["stunet.conditional=true", "stunet.freeze_prior=false", "train.lr=0.003", "train.warmup_steps=20",
         "train.batch_size=8", "train.condition_types=[none,prefix_frames,first_frame]"]


def make_clips(kind: str, n: int, size: int, rng: np.random.Generator, frames: int = 8, grid: int = 4) -> np.ndarray:
    """n t h w c uint8. fades: one flat colour per clip; patterns: a grid×grid colour pattern upsampled
    bilinearly; both drift by up to ±6 / ±4 a frame. binary: a grid×grid pattern of dark and light grey cells
    (the test's data), upsampled bilinearly, whose colour drifts by up to ±4 a frame."""
    if kind == "binary":
        cells = rng.choice([40.0, 215.0], (n, 1, grid, grid, 1))
        low = cells + rng.uniform(-4, 4, (n, 1, 1, 1, 3)) * np.arange(frames)[None, :, None, None, None]
        return _upsample(low, size)
    cells = 1 if kind == "fades" else grid
    step = 6 if kind == "fades" else 4
    low = rng.uniform(40, 215, (n, 1, cells, cells, 3)) + rng.uniform(-step, step, (n, 1, 1, 1, 3)) * np.arange(
        frames
    )[None, :, None, None, None]
    return _upsample(low, size)


def _upsample(low: np.ndarray, size: int) -> np.ndarray:
    """n t g g c float (grey levels) -> n t size size c uint8, bilinear."""
    n = low.shape[0]
    x = rearrange(torch.from_numpy(np.clip(low, 0, 255)).float(), "n t h w c -> (n t) c h w")
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return rearrange(x, "(n t) c h w -> n t h w c", n=n).round().clamp(0, 255).to(torch.uint8).numpy()


def gap(a: np.ndarray, b: np.ndarray, colour: bool) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    if colour:  # distance between mean colours
        return float(np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)).mean())
    return float(np.abs(a - b).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", choices=["binary", "fades", "patterns"], default="binary")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. train.lr=0.01")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args()
    colour = args.data == "fades"

    cfg = load_config("tiny", [*TRAIN, f"train.max_steps={args.steps}", f"video.size={args.size}", *args.set])
    clips = torch.from_numpy(make_clips(args.data, 256, args.size, np.random.default_rng(0)))
    encoder = TextEncoder(cfg.text)
    context, pooled = encoder.encode_text([PROMPT])
    torch.manual_seed(0)
    model = build_stunet(cfg)
    step = TrainStep(model, cfg, "stunet")
    g, b = torch.Generator().manual_seed(0), cfg.train.batch_size
    t0 = time.perf_counter()
    while step.step < args.steps:
        idx = torch.randint(0, len(clips), (b,), generator=g)
        metrics = step(clips_to_model(clips[idx]), Conditioning(context.expand(b, -1, -1), pooled.expand(b, -1)))
    train_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as d:
        path = save_checkpoint(Path(d) / "ckpt", model, cfg, "stunet", step=step.step,
                               ema_state=step.ema.state_dict(model),
                               extra_meta={"text_fingerprint": encoder.fingerprint()})
        gen = TextToVideo.from_checkpoint(path)
    seams, free, used = [], [], []
    for seed in range(args.samples):
        clip = make_clips(args.data, 1, args.size, np.random.default_rng(100 + seed))[0]
        out = gen.generate([PROMPT], task="extend", video=clip, context_frames=4, steps=20, seed=seed).videos[0]
        seams.append(gap(out[8], clip[-1], colour))
        free.append(gap(gen.generate([PROMPT], steps=20, seed=seed).videos[0][0], clip[-1], colour))
        cm, known = extend_condition(_to_model(clip[-4:]), 8), _to_model(clip[-4:])
        x = torch.randn(1, 3, 8, args.size, args.size, generator=torch.Generator().manual_seed(seed))
        enc = gen.encode([PROMPT])
        with torch.no_grad():  # at t=999 the input is noise: x0 ≈ −v, all information about the clip is in ⟨C, M⟩
            errs = [float((-gen.model(with_condition(x, c), torch.tensor([999]), enc.context, enc.pooled)[:, :, :4]
                           - known).abs().mean() * 127.5) for c in (cm, torch.zeros_like(cm))]
        used.append(errs)
    used = np.mean(used, axis=0)
    print(f"data {args.data} {args.size}x{args.size}, {args.steps} steps ({train_s:.0f} s), "
          f"overrides {args.set or '-'}, last loss {metrics['loss']:.4f}")
    print(f"  first new frame vs last input frame ({'colour' if colour else 'pixel'} gap): "
          f"{np.round(seams, 1).tolist()}; unconditioned: {np.round(free, 1).tolist()}; "
          f"ratio {np.mean(seams) / np.mean(free):.2f} (test asks < 0.5)")
    print(f"  known frames' x0 at t=999, mean abs error (grey levels): with the condition {used[0]:.1f}, "
          f"with a zero condition {used[1]:.1f}")


if __name__ == "__main__":
    main()
