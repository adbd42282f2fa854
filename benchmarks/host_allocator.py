"""The host allocator: a CPU training step with glibc's malloc as it is vs with freed memory kept mapped
(`lumiere.allocator.retain_freed_memory`, what training workers call).

Each measurement is a child process (the allocator's state cannot be reset inside one process): it builds the
config's STUNet from a random prior (or the 2D prior for `--kind t2i`), makes a pool of moving-shapes clips, then
runs `--steps` `TrainStep`s on fixed batches and reports the median time per step after `--warmup` and the minor
page faults per step (`getrusage`, over the timed steps only). The two settings alternate, `--rounds` times each
(A B B A A B ...), so a machine whose speed drifts slows both alike; the table gives the median over the rounds.

    python benchmarks/host_allocator.py                       # small STUNet, 2 threads, 3 rounds (~6 min)
    python benchmarks/host_allocator.py --kind t2i --config small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = ("glibc default", "retain freed memory")


def child(args) -> dict:
    import torch

    from lumiere.allocator import retain_freed_memory

    applied = retain_freed_memory() if args.child == SETTINGS[1] else False
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_throughput import shapes_pool

    from lumiere.checkpoint import build_prior, build_stunet
    from lumiere.config import load_config
    from lumiere.diffusion import Conditioning
    from lumiere.trainer import TrainStep

    cfg = load_config(args.config, [f"train.max_steps={args.steps}"])
    b = cfg.train.batch_size
    clips, cond = shapes_pool(cfg, 4 * b, args.seed)
    torch.manual_seed(args.seed)
    prior = build_prior(cfg)
    model = prior if args.kind == "t2i" else build_stunet(cfg, prior)
    step = TrainStep(model, cfg, args.kind)
    times, faults0 = [], None
    for i in range(args.steps):
        if i == args.warmup:
            faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        idx = torch.arange(i * b, (i + 1) * b) % len(clips)
        t0 = time.perf_counter()
        step(clips[idx], Conditioning(cond.context[idx], cond.pooled[idx]))
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    timed = times[args.warmup:]
    return {"setting": args.child, "applied": applied, "step_s": statistics.median(timed),
            "faults_per_step": faults / len(timed),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--kind", choices=("stunet", "t2i"), default="stunet")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    runs = []
    for r in range(args.rounds):
        for setting in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
            cmd = [sys.executable, __file__, "--child", setting, "--config", args.config, "--kind", args.kind,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--seed", str(args.seed)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs.append(json.loads(out))
            print(f"round {r + 1} {setting}: {runs[-1]['step_s']:.3f} s/step, "
                  f"{runs[-1]['faults_per_step']:.0f} faults/step", file=sys.stderr, flush=True)
    print(f"{args.kind} on `{args.config}`, {args.threads} threads, {args.steps} steps ({args.warmup} untimed), "
          f"{args.rounds} rounds alternating; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| allocator | s / step (median of rounds) | per round | minor page faults / step | max RSS MiB |")
    print("|---|---|---|---|---|")
    med = {}
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        med[setting] = statistics.median(r["step_s"] for r in mine)
        per_round = " ".join(f"{r['step_s']:.3f}" for r in mine)
        print(f"| {setting} | {med[setting]:.3f} | {per_round} | "
              f"{statistics.median(r['faults_per_step'] for r in mine):,.0f} | "
              f"{max(r['max_rss_mb'] for r in mine):,.0f} |")
    print(f"speed-up: {med[SETTINGS[0]] / med[SETTINGS[1]]:.2f}×")
    if args.json:
        args.json.write_text(json.dumps({"argv": argv or sys.argv[1:], "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
