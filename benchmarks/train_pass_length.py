"""Ray Train input pipeline: how the length of a pass over a small dataset sets training throughput.

`pipelines.shards.clip_dataset` repeats the rows of a small dataset until a pass holds at least
`min_pass_clips` rows (each copy gets its own random temporal crop). Every pass over the dataset restarts Ray
Data's streaming pipeline (read tasks, map tasks, the split coordinator), a fixed cost that dominates when a
pass is only a few dozen training steps long. This script trains the same t2i job (the demo's: `small` config,
120 moving-shapes clips ingested at 16 frames 32×32, 2 Ray Train workers) once per `--pass-rows` value, each in
a fresh local Ray (`num_cpus=4`), and reports the job's own `samples_per_s` metric (median of the logged
windows after the first, which includes start-up) and the whole job's wall time.

    python benchmarks/train_pass_length.py                          # 360 (the old default here) vs 4096 rows
    python benchmarks/train_pass_length.py --pass-rows 256 1024 4096 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_job(work: Path, pass_rows: int, steps: int) -> dict:
    """Runs in a fresh Python process (a fresh Ray): one t2i job with passes of >= `pass_rows` rows."""
    sys.path.insert(0, str(ROOT))
    import mlflow
    import ray

    import pipelines.shards as shards_mod
    import pipelines.train as train_mod
    from lumiere.config import load_config

    cfg = load_config("small", [f"train.max_steps={steps}", "train.checkpoint_every=100000"])
    shards = work / "shards"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    if not (shards / "manifest.json").exists():
        from lumiere.shapes import make_corpus
        from pipelines.ingest import run_ingest
        from pipelines.ingest_config import IngestConfig

        make_corpus(work / "corpus", 120, frames=16, size=32, fps=16, seed=0)
        run_ingest(str(work / "corpus"), str(shards), str(work / "corpus" / "captions.jsonl"),
                   IngestConfig(clip_frames=16, size=32, min_side=32, hr_size=None, text=cfg.text, fps=16))
    default = shards_mod.clip_dataset
    train_mod.clip_dataset = lambda *a, **k: default(*a, **{**k, "min_pass_clips": pass_rows})
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    name = f"pass{pass_rows}-{time.time():.0f}"
    t0 = time.perf_counter()
    result = train_mod.run_training("t2i", str(shards), str(work / name), cfg, num_workers=2, run_name=name,
                                    sample_every=0, log=lambda *_: None)
    wall = time.perf_counter() - t0
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "samples_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)]
    ray.shutdown()
    return {"pass_rows": pass_rows, "steps": steps, "wall_s": wall, "samples_per_s": rates,
            "median_samples_per_s": statistics.median(rates[1:] or rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pass-rows", type=int, nargs="+", default=[360, 4096])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--one", nargs=3, metavar=("WORK", "PASS_ROWS", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_job(Path(args.one[0]), int(args.one[1]), int(args.one[2]))), flush=True)
        return
    print(f"train_pass_length: t2i small, 120 clips, 2 workers, {args.steps} steps; {platform.processor() or ''} "
          f"{os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lumiere-pass-") as work:
        for n in args.pass_rows:
            out = subprocess.run([sys.executable, __file__, "--one", work, str(n), str(args.steps)],
                                 capture_output=True, text=True, timeout=1800)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"job with pass rows {n} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            r = rows[-1]
            print(f"  pass >= {n} rows: {r['median_samples_per_s']:.1f} samples/s, job {r['wall_s']:.0f}s", flush=True)
    base = rows[0]["median_samples_per_s"]
    print("\n| rows per pass (min) | samples/s (median) | vs first | job wall s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['pass_rows']} | {r['median_samples_per_s']:.1f} | {r['median_samples_per_s'] / base:.2f}× "
              f"| {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
