"""STUNet vs the fixed-temporal-resolution video U-Net of the same width and depth (the paper's baseline family).

For each variant, on one clip (batch 1) of `--frames` frames: parameter counts, FLOPs per sample of a
forward+backward pass (torch.utils.flop_counter), the step time (median of `--repeats` forward+backward
passes), and peak memory (CUDA: max_memory_allocated; CPU: growth of the process's peak RSS during the step,
each variant in its own fresh process). Both variants are measured in one run and reported as ratios.

Imports only torch, einops and pyyaml besides the model modules, so it runs on a bare GPU machine.

    python benchmarks/stunet_vs_fixed.py                              # small config, 80 frames, 32×32, CPU
    python benchmarks/stunet_vs_fixed.py --size 64 --repeats 3
    python benchmarks/stunet_vs_fixed.py --config base --device cuda --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lumiere.stunet import STUNet, STUNetConfig  # noqa: E402 (after the sys.path insert)
from lumiere.unet2d import UNet2D, UNetConfig  # noqa: E402

TEXT_WIDTHS = {"ViT-B-32": (512, 512), "ViT-B-16": (512, 512), "ViT-L-14": (768, 768), "ViT-H-14": (1024, 1024)}


def build(config: str, resampling: bool) -> tuple[STUNet, int, int]:
    raw = yaml.safe_load((ROOT / "lumiere" / "configs" / f"{config}.yaml").read_text())
    text = raw.get("text", {})
    if text.get("arch", "custom") == "custom":
        ctx, pooled = text.get("width", 64), text.get("embed_dim", 64)
    else:
        ctx, pooled = TEXT_WIDTHS[text["arch"]]
    unet_cfg = UNetConfig(**{**raw["unet"], "context_dim": ctx, "pooled_dim": pooled})
    st_cfg = STUNetConfig(**{**raw.get("stunet", {}), "temporal_resampling": resampling})
    torch.manual_seed(0)
    return STUNet(UNet2D(unet_cfg), st_cfg), ctx, pooled


def measure(args, resampling: bool, queue) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, ctx_dim, pooled_dim = build(args.config, resampling)
    model.to(device).train()
    x = torch.randn(1, 3, args.frames, args.size, args.size, device=device)
    t = torch.tensor([500], device=device)
    ctx = torch.randn(1, 16, ctx_dim, device=device)
    pooled = torch.randn(1, pooled_dim, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, t, ctx, pooled).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    from torch.utils.flop_counter import FlopCounterMode

    # peak memory of the first step: on CPU the process's peak RSS can only grow, so measure before anything else
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queue.put({
        "variant": "STUNet (temporal down/up-sampling)" if resampling else "fixed temporal resolution",
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "coarsest_frames": args.frames // model.temporal_factor,
        "gflops_fwd_bwd": flops / 1e9,
        "step_s": statistics.median(times),
        "peak_mem_mib": peak / 2**20,
    })


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    ctx = mp.get_context("spawn")  # a fresh process per variant, so peak memory is its own
    rows = []
    for resampling in (True, False):
        q = ctx.Queue()
        proc = ctx.Process(target=measure, args=(args, resampling, q))
        proc.start()
        rows.append(q.get())
        proc.join()
    stunet, fixed = rows
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"config={args.config} frames={args.frames} size={args.size} dtype={args.dtype} device={device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    header = f"| {'variant':38} | params (trainable) | coarsest frames | GFLOPs fwd+bwd | step s | peak MiB |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['variant']:38} | {r['params_total']:,} ({r['params_trainable']:,}) | {r['coarsest_frames']} "
              f"| {r['gflops_fwd_bwd']:.2f} | {r['step_s']:.3f} | {r['peak_mem_mib']:.0f} |")
    print(f"fixed / STUNet: FLOPs {fixed['gflops_fwd_bwd'] / stunet['gflops_fwd_bwd']:.2f}x, "
          f"step time {fixed['step_s'] / stunet['step_s']:.2f}x, "
          f"peak memory {fixed['peak_mem_mib'] / max(stunet['peak_mem_mib'], 1e-9):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
