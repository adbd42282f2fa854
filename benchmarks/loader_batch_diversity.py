"""Ray Train input pipeline: how many different clips a training batch holds.

A small dataset is repeated within a pass (`pipelines.shards.clip_dataset`, so a pass is long enough for the
streaming pipeline's start-up not to dominate; see train_pass_length.py). Repeating each row as consecutive
copies makes a batch one clip under several crops; `repeat_and_shuffle` repeats and shuffles each block. This
script reads the same shards both ways (clip ids only, no decode) and counts distinct clips per batch.

    python benchmarks/loader_batch_diversity.py SHARDS                 # e.g. demo-output/shards
    python benchmarks/loader_batch_diversity.py SHARDS --batch-size 8 --pass-rows 4096
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pass-rows", type=int, default=4096)
    args = ap.parse_args()

    import ray

    from pipelines.shards import repeat_and_shuffle, shard_uris

    manifest = json.loads((args.shards / "manifest.json").read_text())
    paths = shard_uris(manifest, str(args.shards.resolve()))
    times = math.ceil(args.pass_rows / manifest["clips"])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False

    def consecutive(row: dict) -> list[dict]:
        return [row] * times

    variants = {
        "consecutive copies": ray.data.read_parquet(paths, columns=["clip_id"]).flat_map(consecutive),
        "repeat_and_shuffle": ray.data.read_parquet(paths, columns=["clip_id"], shuffle="files").map_batches(
            repeat_and_shuffle, fn_kwargs={"times": times}, batch_size=None
        ),
    }
    print(f"{manifest['clips']} clips in {len(paths)} shards, each {times}× per pass, batches of {args.batch_size}")
    for name, ds in variants.items():
        distinct = [
            len(set(b["clip_id"].tolist())) for b in ds.iter_batches(batch_size=args.batch_size, drop_last=True)
        ]
        print(f"  {name:20s} {len(distinct)} batches: distinct clips per batch mean {np.mean(distinct):.2f}, "
              f"min {min(distinct)}, max {max(distinct)}")
    ray.shutdown()


if __name__ == "__main__":
    main()
