"""Ray Train input: how many different clips a training batch holds, under the workers' data plans.

Each worker reads its own seeded plan (`pipelines.train.shards.rank_plan`: shards in a random order per epoch, each
shard's rows shuffled); this counts distinct clips per batch of each worker's first `--rows` plan rows for a
shard set, and what uniform random sampling would give. No Ray and no decoding: the plan alone fixes the rows
(the trainer checks every batch against it).

    python benchmarks/loader_batch_diversity.py SHARDS                 # e.g. demo-output/shards
    python benchmarks/loader_batch_diversity.py SHARDS --workers 2 --batch-size 4 --rows 4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4096, help="plan rows per worker")
    args = ap.parse_args()

    from pipelines.train.shards import rank_plan, shard_rows, unit_rows

    manifest = json.loads((args.shards / "manifest.json").read_text())
    shards = shard_rows(manifest, str(args.shards.resolve()))
    b = args.batch_size
    print(f"{manifest['clips']} clips in {len(shards)} shards, {args.workers} workers, batches of {b}")
    for rank in range(args.workers):
        eligible = dict(shards)
        rows = [(u["path"], int(r)) for u in rank_plan(shards, rank, args.workers, args.rows, seed=0)
                for r in unit_rows(u, eligible[u["path"]])][: args.rows]
        distinct = [len(set(rows[i : i + b])) for i in range(0, len(rows) - b + 1, b)]
        print(f"  worker {rank}: {len(distinct)} batches, distinct clips per batch mean {np.mean(distinct):.2f}, "
              f"min {min(distinct)}, max {max(distinct)}")
    n = manifest["clips"]
    uniform = n * (1 - (1 - 1 / n) ** b)  # expected distinct values in b uniform draws with replacement
    print(f"  uniform sampling with replacement would give {uniform:.2f}")


if __name__ == "__main__":
    main()
