"""How long do the motion layers take to learn what a prompt says about motion? Training only at the top of the
noise schedule, where x0 must be guessed from the prompt alone, and the mean-motion probe every 100 steps.

At the highest noise levels the loss-minimising x0 prediction is the mean of the prompt's clips; for the
moving-shapes corpus that mean travels ~+16 px the prompted way (a shape moving right starts on the left), so the
mean-motion probe (`quality_shapes.mean_motion_probe`) of a model that knows the prompt's motion rises from ~0
towards the corpus's value. Measured (benchmarks/RESULTS.md, run Q): it stays near 0 for hundreds of steps, then
rises suddenly (a plateau and an escape); how long the plateau lasts depends on how the motion layers read the
prompt. In normal training only ~5 % of steps land this high (uniform timesteps), so a plateau of N steps here is
~20 N steps there. This isolates that part of learning at a small fraction of a `quality_shapes.py` run.

Each variant trains the inflated model's trainable layers on the same 2D prior (trained once, like
`quality_shapes.py`'s) with the same batches, noise and timesteps: AdamW at a constant LR (`--lr`, or else each
variant's `train.lr`; no warm-up or decay, no EMA: the probe reads the raw weights), timesteps drawn uniformly from
[--min-timestep, 999].

    python benchmarks/motion_plateau.py --steps 800 --variant "default=" \\
        --variant "max pool=stunet.motion_text_pool=attention_max" --variant "oracle=+oracle"
    python benchmarks/motion_plateau.py --quick      # a smoke test: tiny config, 20 steps
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quality_shapes import (  # noqa: E402
    OracleDirectionEncoder,
    Trainer,
    corpus_mean_travel,
    load_corpus,
    mean_motion_probe,
    parse_variants,
)

from lumiere.allocator import retain_freed_memory  # noqa: E402
from lumiere.checkpoint import build_prior, build_stunet  # noqa: E402
from lumiere.config import load_config  # noqa: E402
from lumiere.diffusion import Conditioning, diffusion_loss, training_scheduler  # noqa: E402
from lumiere.shapes import make_corpus  # noqa: E402
from lumiere.text_encoder import TextEncoder  # noqa: E402
from lumiere.trainer import clips_to_model  # noqa: E402

ORACLE = "+oracle"  # in a variant's overrides: the prompts' direction written into the text features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--min-timestep", type=int, default=950, help="train only at timesteps >= this (of 1000)")
    ap.add_argument("--lr", type=float, default=None, help="constant LR (default: each variant's train.lr)")
    ap.add_argument("--probe-every", type=int, default=100)
    ap.add_argument("--clips", type=int, default=120)
    ap.add_argument("--t2i-steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lumiere-motion-plateau"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every model")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                    help=f"a model to train (repeatable; '{ORACLE}' among the overrides: the oracle direction code)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny config, 12 clips, 20 steps")
    args = ap.parse_args()
    if args.quick:
        args.config, args.clips, args.t2i_steps, args.steps, args.probe_every = "tiny", 12, 20, 20, 10
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as training workers do (train.retain_host_memory)
    cfg = load_config(args.config, args.overrides)
    variants = parse_variants(args.variant or ["default="])

    corpus = args.workdir / f"corpus-{cfg.name}-{args.clips}"
    if not (corpus / "captions.jsonl").exists():
        make_corpus(corpus, args.clips, frames=cfg.video.frames, size=cfg.video.size, fps=cfg.video.fps,
                    seed=cfg.train.seed)
    clips, captions = load_corpus(corpus, cfg.video.frames)
    travel = corpus_mean_travel(clips, captions)
    print(f"motion_plateau: config {cfg.name}, {args.clips} clips, timesteps >= {args.min_timestep}, corpus mean "
          "travel " + " ".join(f"{d} {v:+.1f}" for d, v in travel.items()) + " px", flush=True)
    encoder = TextEncoder(cfg.text)
    prior = build_prior(cfg)
    t2i = Trainer("t2i prior", prior, cfg, "t2i", clips, Conditioning(*encoder.encode_text(captions)),
                  args.t2i_steps)
    while not t2i.done():
        t2i.step()
    prior.load_state_dict(t2i.step_fn.ema.state_dict(prior))
    scheduler = training_scheduler(cfg.diffusion)

    curves = {}
    for name, extra in variants.items():
        oracle = ORACLE in extra
        vcfg = load_config(args.config, [*args.overrides, *(kv for kv in extra if kv != ORACLE)])
        enc = OracleDirectionEncoder(encoder) if oracle else encoder
        cond = Conditioning(*enc.encode_text(captions))
        torch.manual_seed(vcfg.train.seed)  # every variant's new layers start from the same random state
        model = build_stunet(vcfg, copy.deepcopy(prior))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr or vcfg.train.lr,
                                weight_decay=0.0)
        gen = torch.Generator().manual_seed(vcfg.train.seed)  # the same batches, noise and timesteps for all
        losses, curves[name], t0 = [], [], time.perf_counter()
        for step in range(1, args.steps + 1):
            model.train()
            idx = torch.randint(0, len(clips), (vcfg.train.batch_size,), generator=gen)
            x0 = clips_to_model(clips[idx])
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(args.min_timestep, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
            loss = diffusion_loss(model, x0, Conditioning(cond.context[idx], cond.pooled[idx]), scheduler,
                                  noise_and_t=(noise, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % args.probe_every == 0 or step == args.steps:
                probe = mean_motion_probe(model, enc, vcfg, travel)
                window = losses[-args.probe_every:]
                curves[name].append((step, probe["mean_motion_travel_px"]))
                print(f"  {name:<16} step {step:>5}  loss {sum(window) / len(window):.4f}  mean-motion travel "
                      f"{probe['mean_motion_travel_px']:+.1f} px (by direction "
                      + " ".join(f"{d} {v:+.1f}" for d, v in probe["mean_motion_travel_by_direction"].items())
                      + f")  {time.perf_counter() - t0:.0f} s", flush=True)

    steps = [s for s, _ in next(iter(curves.values()))]
    print(f"\nmean-motion travel px by step (trained only at t >= {args.min_timestep}; corpus mean "
          f"{sum(travel.values()) / len(travel):+.1f})\n")
    print("| variant | " + " | ".join(str(s) for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name, curve in curves.items():
        print(f"| {name} | " + " | ".join(f"{v:+.1f}" for _, v in curve) + " |")


if __name__ == "__main__":
    main()
