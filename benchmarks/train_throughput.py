"""Training throughput: samples/s of the T2I prior and the STUNet on CPU, 1 vs 2 Ray Train workers, and the
STUNet against its fixed-temporal-resolution variant at the same step budget.

1. In-process (`lumiere.trainer.TrainStep`, the training step every job runs; no Ray, no data pipeline): for each
   config in `--configs` (tiny, small), the models t2i (the 2D prior on one random frame per clip), stunet (the
   inflated prior, temporal layers trained, prior frozen) and stunet-fixed (the same with
   `stunet.temporal_resampling=false`: no temporal down/up-sampling, the fixed-temporal baseline). Data: a pool
   of moving-shapes clips at the config's frames and size (`lumiere.shapes.render_clip`) with their captions
   embedded by the config's text encoder; every model sees the same batches in the same order and starts from
   the same prior weights. The variants step in turn (one step of each, round robin), so a noisy machine slows
   them alike: time per step is the median over the steps after `--warmup`; samples/s = batch size / that; loss
   = mean training loss over the first and the last `--loss-window` steps of `--steps` (same step budget for
   all). t2i trains first; stunet and stunet-fixed then start from its trained prior (as `lumiere train stunet
   --init-from` does) and train side by side.
2. Ray Train (`pipelines.train.job.run_training`, what `lumiere train` runs: shards → Ray Data → DDP over gloo,
   MLflow): a small shapes corpus ingested into standard shards (80 frames, 128×128, the config's text encoder),
   then t2i and stunet (initialised from the t2i run) with 1 and 2 workers (1 CPU each: torch runs 1 thread per
   worker), `--ray-steps` steps, each job `--ray-repeats` times with the 1/2-worker order reversed on the repeat
   (1 2 2 1). samples/s is the job's own MLflow metric `samples_per_s` (global, all workers;
   logged every `log_every` steps), median over the logged windows after the first (which includes start-up);
   the wall time of the whole job (Ray Train start, data, steps, checkpoint, registration) is given too.

3. Data parallelism, DDP vs FSDP (`train.parallelism`): a 2-process gloo group (the backend Ray Train uses on CPU),
   1 torch thread per rank; in each rank the same STUNet three times — DDP, FSDP2 (`lumiere.parallel.shard_model`)
   and FSDP2 with activation checkpointing — stepped round robin on the same batches (each rank its own), so the
   machine's noise hits all alike. s/step = median after `--warmup`; state per rank = the bytes a rank holds for
   weights + gradients + AdamW moments + EMA of what it trains (FSDP: its shards); the largest |loss − DDP's loss|
   over the steps shows the variants compute the same thing.

    python benchmarks/train_throughput.py              # tiny + small, in-process and Ray Train (~30 min, 2 cores)
    python benchmarks/train_throughput.py --parallel-only --configs small   # DDP vs FSDP only
    python benchmarks/train_throughput.py --quick      # tiny only, fewer steps, no repeats (~8 min)
    python benchmarks/train_throughput.py --no-ray --steps 100 --json /tmp/train.json

CPU only here: bf16 autocast and MFU on a GPU (the `base` config) are not measured by this script; `--cpu-bf16`
adds the STUNet step under bf16 autocast on the CPU to part 1 (a CPU with AVX-512 BF16 or AMX runs bf16 kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lumiere.checkpoint import build_prior, build_stunet  # noqa: E402
from lumiere.config import load_config  # noqa: E402
from lumiere.diffusion import Conditioning  # noqa: E402
from lumiere.shapes import COLORS, DIRECTIONS, SHAPES, ShapeSpec, caption, render_clip  # noqa: E402
from lumiere.text_encoder import TextEncoder  # noqa: E402
from lumiere.trainer import TrainStep, clips_to_model  # noqa: E402

VARIANTS = {  # name -> (kind, config overrides[, autocast dtype])
    "t2i": ("t2i", []),
    "stunet": ("stunet", ["stunet.temporal_resampling=true"]),
    "stunet-fixed": ("stunet", ["stunet.temporal_resampling=false"]),
}
# --cpu-bf16: the STUNet step again under bf16 autocast on the CPU (what `TrainStep(amp_dtype=...)` does on a GPU),
# to see what a CPU with bf16 instructions (AVX-512 BF16, AMX) gains per step
BF16_VARIANT = {"stunet-bf16": ("stunet", ["stunet.temporal_resampling=true"], torch.bfloat16)}


# --- 1. in-process --------------------------------------------------------------------------------------------
def shapes_pool(cfg, n: int, seed: int) -> tuple[torch.Tensor, Conditioning]:
    """n moving-shapes clips (b c t h w in [-1, 1]) at the config's frames and size, with caption embeddings."""
    rng = np.random.default_rng(seed)
    clips, texts = [], []
    for i in range(n):
        spec = ShapeSpec(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(list(DIRECTIONS))))
        clips.append(render_clip([spec], cfg.video.frames, cfg.video.size, np.random.default_rng([seed, i])))
        texts.append(caption(spec))
    frames = torch.from_numpy(np.stack(clips))  # b t h w c uint8
    with torch.no_grad():
        context, pooled = TextEncoder(cfg.text).encode_text(texts)
    return clips_to_model(frames), Conditioning(context, pooled)


def _train(runs: dict, clips, cond, batch: int, steps: int, args, label: str) -> None:
    """`steps` steps of every model in `runs`, round robin on the same batches (who goes first alternates)."""
    order = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for i in range(steps):
        idx = torch.randperm(len(clips), generator=order)[:batch]  # the same batch for every model
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            r = runs[name]
            s0 = time.perf_counter()
            m = r["step"](clips[idx], Conditioning(cond.context[idx], cond.pooled[idx]))
            r["times"].append(time.perf_counter() - s0)
            r["losses"].append(m["loss"])
        if time.perf_counter() - t0 > args.budget_s:
            print(f"  {label}: stopped after {i + 1} steps (--budget-s {args.budget_s:g})", file=sys.stderr)
            break


def _entry(name: str, kind: str, cfg, model, amp_dtype: torch.dtype | None = None) -> dict:
    return {"kind": kind, "step": TrainStep(model, cfg, kind, amp_dtype=amp_dtype), "times": [], "losses": [],
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def in_process(config: str, args) -> list[dict]:
    """t2i for --steps steps; then its trained prior inflated into stunet and stunet-fixed, trained side by side
    (round robin) for --steps steps (what `lumiere train stunet --init-from` does)."""
    base_cfg = load_config(config, [f"train.max_steps={args.steps}"])
    batch = base_cfg.train.batch_size
    clips, cond = shapes_pool(base_cfg, max(4 * batch, 32), args.seed)
    torch.manual_seed(args.seed)
    prior = build_prior(base_cfg)
    t2i = {"t2i": _entry("t2i", "t2i", base_cfg, prior)}
    _train(t2i, clips, cond, batch, args.steps, args, f"{config} t2i")
    prior_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
    runs = {}
    for name, (kind, overrides, *amp) in {**VARIANTS, **(BF16_VARIANT if args.cpu_bf16 else {})}.items():
        if kind == "t2i":
            continue
        cfg = load_config(config, [f"train.max_steps={args.steps}", *overrides])
        p = build_prior(cfg)
        p.load_state_dict(prior_state)  # both start from the same trained prior
        torch.manual_seed(args.seed)
        runs[name] = _entry(name, kind, cfg, build_stunet(cfg, p), *amp)
    _train(runs, clips, cond, batch, args.steps, args, f"{config} stunet")
    out = []
    for name, r in {**t2i, **runs}.items():
        times = r["times"][args.warmup:] or r["times"]
        med = statistics.median(times)
        out.append({"config": config, "variant": name, "batch": batch, "frames": base_cfg.video.frames,
                    "size": base_cfg.video.size, "params": r["params"], "trainable": r["trainable"],
                    "steps": len(r["times"]), "step_s_median": med, "step_s_mean": statistics.mean(times),
                    "samples_per_s": batch / med,
                    "loss_first": statistics.mean(r["losses"][:args.loss_window]),
                    "loss_last": statistics.mean(r["losses"][-args.loss_window:])})
    return out


# --- 3. DDP vs FSDP on a gloo group ----------------------------------------------------------------------------
PARALLEL_VARIANTS = ("ddp", "fsdp", "fsdp+ac")


def _parallel_rank(rank: int, world: int, port: int, config: str, steps: int, warmup: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lumiere.parallel import set_activation_checkpointing, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config(config, ["unet.dropout=0.0"])
        clips, cond = shapes_pool(cfg, 4 * cfg.train.batch_size, 1000 + rank)  # each rank its own data
        runs = {}
        for name in PARALLEL_VARIANTS:
            torch.manual_seed(0)
            model = build_stunet(cfg)
            set_activation_checkpointing(model, name == "fsdp+ac")
            forward = DistributedDataParallel(model) if name == "ddp" else shard_model(model, torch.device("cpu"))
            trained = [p for p in model.parameters() if p.requires_grad]
            local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in trained)
            runs[name] = {"step": TrainStep(model, cfg, "stunet", forward=forward, rank=rank), "times": [],
                          "losses": [], "state_bytes": local * 4 * 5}  # fp32 weight, grad, 2 Adam moments, EMA
        order = torch.Generator().manual_seed(0)
        b = cfg.train.batch_size
        for i in range(steps):
            idx = torch.randperm(len(clips), generator=order)[:b]
            for name in (PARALLEL_VARIANTS if i % 2 == 0 else PARALLEL_VARIANTS[::-1]):
                dist.barrier()  # every rank starts the variant's step together: its time is the gang's
                t0 = time.perf_counter()
                m = runs[name]["step"](clips[idx], Conditioning(cond.context[idx], cond.pooled[idx]))
                runs[name]["times"].append(time.perf_counter() - t0)
                runs[name]["losses"].append(m["loss"])
        if rank == 0:
            res = {name: {"s_per_step": statistics.median(r["times"][warmup:] or r["times"]),
                          "losses": r["losses"], "state_bytes": r["state_bytes"]} for name, r in runs.items()}
            res["meta"] = {"batch_per_rank": b, "frames": cfg.video.frames, "size": cfg.video.size,
                           "trainable": sum(p.numel() for p in runs["ddp"]["step"].model.parameters()
                                            if p.requires_grad)}
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def ddp_vs_fsdp(config: str, args) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="ddp-fsdp-")) / "result.json"
    world = 2
    mp.spawn(_parallel_rank, args=(world, port, config, args.parallel_steps, args.warmup, str(out)), nprocs=world,
             join=True)
    res = json.loads(out.read_text())
    meta, ddp = res.pop("meta"), res["ddp"]
    rows = []
    for name, r in res.items():
        rows.append({"config": config, "variant": name, "workers": world, **meta, "steps": len(r["losses"]),
                     "s_per_step": r["s_per_step"], "samples_per_s": world * meta["batch_per_rank"] / r["s_per_step"],
                     "state_mb_per_rank": r["state_bytes"] / 2**20,
                     "max_loss_diff": max(abs(a - b) for a, b in zip(r["losses"], ddp["losses"], strict=True)),
                     "loss_first": r["losses"][0], "loss_last": r["losses"][-1]})
    return rows


# --- 2. Ray Train -------------------------------------------------------------------------------------------
def ray_train(config: str, args, work: Path) -> list[dict]:
    import mlflow

    from lumiere.shapes import make_corpus
    from pipelines.ingest.config import load_ingest_config
    from pipelines.ingest.job import run_ingest
    from pipelines.train.job import run_training

    root = work / config
    t0 = time.perf_counter()
    make_corpus(root / "corpus", args.ray_clips, frames=88, size=128, seed=args.seed)
    run_ingest(str(root / "corpus"), str(root / "shards"), str(root / "corpus" / "captions.jsonl"),
               load_ingest_config(None, [f"encoder_from={config}", "hr_size=null"]), log=lambda *a: None)
    print(f"  {config}: corpus + ingest {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    log_every = max(1, args.ray_steps // 6)
    cfg = load_config(config, [f"train.max_steps={args.ray_steps}", f"train.log_every={log_every}",
                               f"train.checkpoint_every={args.ray_steps}"])
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    out = []
    t2i_ckpt = None
    order = [("t2i", 1), ("t2i", 2), ("stunet", 2), ("stunet", 1)]
    order += [(k, 3 - w) for k, w in order] * (args.ray_repeats - 1)  # repeats in the opposite order
    for i, (kind, workers) in enumerate(order):
        name = f"{kind}-{config}-{workers}w-{i}"
        t0 = time.perf_counter()
        res = run_training(kind, str(root / "shards"), str(root / name), cfg, num_workers=workers,
                           init_from=t2i_ckpt if kind == "stunet" else None, run_name=name, sample_every=0,
                           log=lambda *a: None)
        wall = time.perf_counter() - t0
        if kind == "t2i" and t2i_ckpt is None:
            t2i_ckpt = res["checkpoint"]
        hist = client.get_metric_history(res["run_id"], "samples_per_s")
        values = [m.value for m in sorted(hist, key=lambda m: m.step)]
        steady = values[1:] or values
        losses = [m.value for m in sorted(client.get_metric_history(res["run_id"], "loss"), key=lambda m: m.step)]
        out.append({"config": config, "kind": kind, "workers": workers, "batch_per_worker": cfg.train.batch_size,
                    "steps": res["step"], "samples_per_s": statistics.median(steady), "windows": values,
                    "wall_s": wall, "loss_last": losses[-1] if losses else float("nan")})
        print(f"  {name}: {out[-1]['samples_per_s']:.1f} samples/s, {wall:.1f}s wall", file=sys.stderr, flush=True)
    return out


# --- report -------------------------------------------------------------------------------------------------
def report(data: dict) -> None:
    m = data["meta"]
    m.setdefault("loadavg_end", float("nan"))
    print(f"Machine: {m['cores']} cores ({m['machine']}), torch {m['torch']}, {m['torch_threads']} torch threads "
          f"in-process; no GPU (bf16 / MFU not measured); 1-min load average {m['loadavg_start']:.1f} → "
          f"{m['loadavg_end']:.1f}\n")
    rows = data["in_process"]
    if rows:
        print("In-process (TrainStep, same batches; t2i first, then stunet and stunet-fixed from its trained prior, "
              "round robin), time per step = median after the warm-up, loss = mean over the first / last "
              f"{data['meta'].get('loss_window', '?')} steps:\n")
        print("| config | model | frames×size | batch | params (trainable) | steps | s/step | samples/s "
              "| s/step vs stunet | loss first → last |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ref = next(x for x in rows if x["config"] == r["config"] and x["variant"] == "stunet")
            vs = "" if r["variant"] == "t2i" else f"{r['step_s_median'] / ref['step_s_median']:.2f}×"
            print(f"| {r['config']} | {r['variant']} | {r['frames']}×{r['size']}² | {r['batch']} "
                  f"| {r['params'] / 1e6:.3f}M ({r['trainable'] / 1e6:.3f}M) | {r['steps']} "
                  f"| {r['step_s_median']:.3f} | {r['samples_per_s']:.1f} "
                  f"| {vs} "
                  f"| {r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    rows = data.get("parallel", [])
    if rows:
        print("\nDDP vs FSDP (2-process gloo group, 1 thread per rank, the STUNet, same batches round robin), "
              "s/step = median after the warm-up:\n")
        print("| config | variant | workers | batch per rank | trainable | steps | s/step | samples/s (global) "
              "| vs DDP | state per rank (MB) | max |Δloss| vs DDP | loss first → last |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ref = next(x for x in rows if x["config"] == r["config"] and x["variant"] == "ddp")
            print(f"| {r['config']} | {r['variant']} | {r['workers']} | {r['batch_per_rank']} "
                  f"| {r['trainable'] / 1e6:.3f}M | {r['steps']} | {r['s_per_step']:.3f} | {r['samples_per_s']:.2f} "
                  f"| {r['s_per_step'] / ref['s_per_step']:.2f}× | {r['state_mb_per_rank']:.1f} "
                  f"| {r['max_loss_diff']:.1e} | {r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    rows = data["ray"]
    if rows:
        print("\nRay Train (run_training: shards → Ray Data → DDP/gloo, 1 CPU per worker), samples/s = the job's "
              "MLflow metric (global), median of its windows after the first, mean over the repeats:\n")
        print("| config | model | workers | batch per worker | steps | samples/s | vs 1 worker | job wall s "
              "| last logged loss | samples/s per repeat |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["config"], r["kind"], r["workers"]), []).append(r)
        mean = {k: statistics.mean(x["samples_per_s"] for x in v) for k, v in groups.items()}
        for (config, kind, workers), rs in groups.items():
            sps = mean[(config, kind, workers)]
            print(f"| {config} | {kind} | {workers} | {rs[0]['batch_per_worker']} | {rs[0]['steps']} | {sps:.1f} "
                  f"| {sps / mean[(config, kind, 1)]:.2f}× | {statistics.mean(x['wall_s'] for x in rs):.1f} "
                  f"| {statistics.mean(x['loss_last'] for x in rs):.3f} "
                  f"| {', '.join(format(x['samples_per_s'], '.1f') for x in rs)} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny only, fewer steps")
    ap.add_argument("--configs", nargs="+", default=None, help="default: tiny small (--quick: tiny)")
    ap.add_argument("--steps", type=int, default=None, help="in-process steps per model (default 100; quick 40)")
    ap.add_argument("--warmup", type=int, default=5, help="in-process steps not timed")
    ap.add_argument("--loss-window", type=int, default=None, help="steps averaged for the loss (default steps/5)")
    ap.add_argument("--budget-s", type=float, default=600, help="in-process: stop a config after this long")
    ap.add_argument("--threads", type=int, default=0, help="in-process torch threads (default: torch's default)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray Train part")
    ap.add_argument("--ray-steps", type=int, default=None, help="steps per Ray Train job (default 60; quick 24)")
    ap.add_argument("--ray-clips", type=int, default=16, help="clips in the Ray Train corpus")
    ap.add_argument("--ray-repeats", type=int, default=None,
                    help="each Ray Train job this many times, alternating the 1/2-worker order (default 2; quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-bf16", action="store_true", help="in-process: also the STUNet under bf16 autocast")
    ap.add_argument("--parallel-only", action="store_true", help="only the DDP vs FSDP part (3)")
    ap.add_argument("--no-parallel", action="store_true", help="skip the DDP vs FSDP part (3)")
    ap.add_argument("--parallel-steps", type=int, default=None, help="steps per variant in part 3 (default 30)")
    ap.add_argument("--json", type=Path, help="also write the measurements as JSON here")
    ap.add_argument("--from-json", type=Path, help="only print the tables of a run saved with --json")
    args = ap.parse_args(argv)
    if args.from_json:
        report(json.loads(args.from_json.read_text()))
        return 0
    args.configs = args.configs or (["tiny"] if args.quick else ["tiny", "small"])
    args.steps = args.steps or (40 if args.quick else 100)
    args.ray_steps = args.ray_steps or (24 if args.quick else 40)
    args.ray_repeats = args.ray_repeats or (1 if args.quick else 2)
    args.loss_window = args.loss_window or max(1, args.steps // 5)
    if args.threads:
        torch.set_num_threads(args.threads)

    load0 = os.getloadavg()[0]
    data = {"meta": {"argv": sys.argv[1:], "cores": os.cpu_count(), "machine": platform.processor() or
                     platform.machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "python": platform.python_version(), "loadavg_start": load0,
                     "loss_window": args.loss_window},
            "in_process": [], "ray": [], "parallel": []}
    args.parallel_steps = args.parallel_steps or (12 if args.quick else 30)
    if args.parallel_only:
        args.no_ray = True
    for config in ([] if args.parallel_only else args.configs):
        t0 = time.perf_counter()
        data["in_process"] += in_process(config, args)
        if args.json:  # partial results survive an interrupted run
            args.json.write_text(json.dumps(data, indent=2))
        print(f"in-process {config}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    if not args.no_parallel:
        for config in args.configs:
            t0 = time.perf_counter()
            data["parallel"] += ddp_vs_fsdp(config, args)
            if args.json:
                args.json.write_text(json.dumps(data, indent=2))
            print(f"ddp vs fsdp {config}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    if not args.no_ray:
        import ray

        work = Path(tempfile.mkdtemp(prefix="trainbench-", dir="/tmp"))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            for config in args.configs:
                data["ray"] += ray_train(config, args, work)
                if args.json:
                    args.json.write_text(json.dumps(data, indent=2))
        finally:
            ray.shutdown()
    data["meta"]["loadavg_end"] = os.getloadavg()[0]
    report(data)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
