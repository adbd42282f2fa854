"""The demo's STUNet training on 2 cores: 2 Ray Train workers x 1 CPU (DDP over gloo) vs 1 worker x 2 CPUs.

Both layouts train the demo's conditional STUNet (`cli.demo.demo_stunet_config`: 8 clips per step in all, the
demo's condition types) from the same prior on the demo's shards (`cli.demo.demo_ingest_config`), so a step does
the same work; what differs is how the cores are used: two single-threaded processes that all-reduce their
gradients, or one process whose torch ops run on two threads. Jobs alternate (A B B A ...) so load drifts hit both.
Reported per job: samples/s (the job's own MLflow metric, median of its windows after the first), the wall time of
the whole `run_training` call (Ray Train start-up, data, steps, checkpoint, registration) and the last loss.

    .venv/bin/python benchmarks/demo_workers.py                 # 120 clips, 120 steps per job, 2 rounds: ~10 min
    .venv/bin/python benchmarks/demo_workers.py --steps 60 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"2 workers x 1 CPU": (2, 1), "1 worker x 2 CPUs": (1, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--clips", type=int, default=120, help="corpus clips (the demo's default)")
    ap.add_argument("--t2i-steps", type=int, default=100, help="prior steps (only a starting point here)")
    ap.add_argument("--steps", type=int, default=120, help="STUNet steps per job")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs both layouts, order alternating")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import mlflow
    import ray

    from cli.demo import demo_ingest_config, demo_stunet_config
    from lumiere.config import load_config
    from lumiere.shapes import make_corpus
    from pipelines.ingest.job import run_ingest
    from pipelines.train.job import run_training

    work = args.workdir or Path(tempfile.mkdtemp(prefix="demo-workers-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(args.config, [f"train.max_steps={args.t2i_steps}"])
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"config {args.config}, {args.clips} clips, STUNet {args.steps} steps per job, {args.rounds} round(s); "
          f"{work}", flush=True)
    # the demo's Ray: oversubscribed logical CPUs, as `lumiere demo` starts it
    ray.init(num_cpus=max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    quiet = {"log": lambda *a: None, "sample_every": 0}
    make_corpus(work / "corpus", args.clips, frames=cfg.video.frames, size=cfg.video.size, fps=cfg.video.fps,
                seed=cfg.train.seed)
    run_ingest(str(work / "corpus"), str(work / "shards"), str(work / "corpus" / "captions.jsonl"),
               demo_ingest_config(cfg), log=lambda *a: None)
    t2i = run_training("t2i", str(work / "shards"), str(work / "t2i"), cfg, num_workers=2, run_name="t2i", **quiet)
    client = mlflow.MlflowClient(tracking_uri=uri)
    log_every = max(1, args.steps // 6)
    jobs = []
    for r in range(args.rounds):
        names = list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]
        for name in names:
            workers, cpus = LAYOUTS[name]
            st = demo_stunet_config(args.config, [f"train.log_every={log_every}",
                                                  f"train.checkpoint_every={args.steps}"], args.steps, workers)
            t0 = time.perf_counter()
            res = run_training("stunet", str(work / "shards"), str(work / f"stunet-{r}-{workers}"), st,
                               init_from=t2i["checkpoint"], num_workers=workers, cpus_per_worker=cpus,
                               run_name=f"stunet-{r}-{workers}x{cpus}", **quiet)
            wall = time.perf_counter() - t0
            hist = sorted(client.get_metric_history(res["run_id"], "samples_per_s"), key=lambda m: m.step)
            losses = sorted(client.get_metric_history(res["run_id"], "loss"), key=lambda m: m.step)
            threads = client.get_run(res["run_id"]).data.tags.get("lumiere.torch_threads_per_worker")
            sps = statistics.median([m.value for m in hist[1:]] or [m.value for m in hist])
            jobs.append({"layout": name, "samples_per_s": sps, "wall_s": wall, "loss": losses[-1].value,
                         "threads": threads, "batch": st.train.batch_size,
                         "global_batch": st.train.batch_size * workers})
            print(f"  round {r} {name} (batch {st.train.batch_size} per worker, {threads} torch thread(s) each): "
                  f"{sps:.2f} samples/s, {wall:.1f} s wall, last loss {losses[-1].value:.4f}", flush=True)
    ray.shutdown()
    print(f"\nload after: {os.getloadavg()[0]:.1f}\n")
    print("| layout | batch per worker | torch threads per worker | samples/s (mean of jobs) | s per step | vs 2x1 "
          "| job wall s | last loss | samples/s per job |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref = statistics.mean(j["samples_per_s"] for j in jobs if j["layout"] == "2 workers x 1 CPU")
    for name in LAYOUTS:
        js = [j for j in jobs if j["layout"] == name]
        sps = statistics.mean(j["samples_per_s"] for j in js)
        step_s = js[0]["global_batch"] / sps
        print(f"| {name} | {js[0]['batch']} | {js[0]['threads']} | {sps:.2f} | {step_s:.3f} | {sps / ref:.2f}x "
              f"| {statistics.mean(j['wall_s'] for j in js):.1f} | {statistics.mean(j['loss'] for j in js):.4f} "
              f"| {', '.join(format(j['samples_per_s'], '.2f') for j in js)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
