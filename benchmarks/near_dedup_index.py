"""The near-duplicate index: exact (float16 matrix) vs approximate (faiss IVF, 16- or 8-bit vectors), side by side.

`pipelines/ingest/near_dedup.py`'s `KeptIndex` searches the kept clips exactly up to `near_dedup_exact_max` and
approximately past it. This measures, on the same vectors, what each costs and what the approximate one misses:

    kept        vectors in the index: unit 1536-d vectors in clusters, like clip fingerprints of one corpus (a
                fresh vector's nearest kept one is at cosine ~0.85, below the 0.97 threshold, as between different
                clips of the test corpora)
    queries     `--dups` near-duplicates of random kept vectors (cosine to their source uniform in 0.975-0.9999:
                each must be found at >= 0.97) and as many fresh vectors (each must not), in batches of 64
    recall      share of the near-duplicates found at >= the threshold
    false dups  share of the fresh vectors reported at >= the threshold
    cos error   max |reported cosine - exact cosine| over the near-duplicates found
    ms / batch  search time per batch of 64 queries
    bytes/clip  index memory per kept vector (faiss: its code size + the 8-byte id + 8 bytes of direct map)
    16-bit/8-bit  how the IVF index stores each component (`near_dedup_index_bits`)
    build s     exact: filling the matrix; IVF: k-means training + adding every vector (once, at the switch);
                the grown rows: every add from empty, the switch at n/16 and the rebuilds included

    python benchmarks/near_dedup_index.py --kept 50000,200000 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.ingest.near_dedup import KeptIndex  # noqa: E402

DIM, THRESHOLD, BATCH = 1536, 0.97, 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, spread: float = 0.6) -> np.ndarray:
    """n unit vectors, each a random centre plus isotropic noise of norm ~`spread`."""
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 50_000):
        k = min(50_000, n - start)
        c = centres[rng.integers(0, len(centres), k)]
        out[start:start + k] = unit(c + spread * rng.standard_normal((k, DIM), dtype=np.float32) / np.sqrt(DIM))
    return out


def near_copies(sources: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Copies at cosine uniform in [0.975, 0.9999] to their sources: (copies, their exact cosines)."""
    target = rng.uniform(0.975, 0.9999, len(sources))
    noise = rng.standard_normal(sources.shape).astype(np.float32)
    noise -= (noise * sources).sum(1, keepdims=True) * sources  # orthogonal to the source
    noise = unit(noise)
    copies = sources * target[:, None] + noise * np.sqrt(1 - target**2)[:, None]
    return unit(copies), target


def measure(index: KeptIndex, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    best, where, times = [], [], []
    for start in range(0, len(queries), BATCH):
        q = torch.from_numpy(queries[start:start + BATCH])
        t0 = time.perf_counter()
        b, w = index.search(q)
        times.append(time.perf_counter() - t0)
        best.append(b.numpy())
        where.append(w.numpy())
    return np.concatenate(best), np.concatenate(where), 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kept", default="50000,200000", help="index sizes, comma-separated")
    ap.add_argument("--dups", type=int, default=2000)
    ap.add_argument("--nprobe", default="8,32,128")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((2000, DIM), dtype=np.float32))
    print(f"near_dedup_index: {DIM}-d, threshold {THRESHOLD}, {args.threads} thread(s), torch {torch.__version__}, "
          f"faiss {faiss.__version__}, {platform.processor() or platform.machine()}", flush=True)
    print("\n| kept | index | nprobe | recall | false dups | cos error | ms / batch of 64 | bytes / clip | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.kept.split(",")]:
        kept = clustered(n, centres, rng)
        src = rng.integers(0, n, args.dups)
        copies, _ = near_copies(kept[src], rng)
        fresh = clustered(args.dups, centres, rng)
        queries = np.concatenate([copies, fresh])

        t0 = time.perf_counter()
        exact = KeptIndex(exact_max=n)
        exact.add(torch.from_numpy(kept))
        build = time.perf_counter() - t0
        e_best, e_where, e_ms = measure(exact, queries)
        truth = e_best[:args.dups]  # exact cosine of each copy's best match (its source or better)
        assert (e_best[args.dups:] < THRESHOLD).all(), "a fresh vector is a near-duplicate: lower the spread"
        print(f"| {n:,} | exact (float16) | | {np.mean(truth >= THRESHOLD):.1%} | "
              f"{np.mean(e_best[args.dups:] >= THRESHOLD):.1%} | | {e_ms:.1f} | {2 * DIM} | {build:.1f} |", flush=True)
        del exact

        for bits, nprobe in [(b, p) for b in (16, 8) for p in (int(x) for x in args.nprobe.split(","))]:
            t0 = time.perf_counter()
            ivf = KeptIndex(exact_max=0, nprobe=nprobe, bits=bits)
            ivf.exact = torch.from_numpy(kept).to(torch.float16)  # as if the exact index had filled up
            ivf.size = n
            ivf._train_ivf(DIM)
            build = time.perf_counter() - t0
            a_best, a_where, a_ms = measure(ivf, queries)
            found = a_best[:args.dups] >= THRESHOLD
            err = np.abs(a_best[:args.dups][found] - truth[found]).max() if found.any() else float("nan")
            cells = ivf.ivf.nlist
            print(f"| {n:,} | IVF {cells} cells, {bits}-bit | {nprobe} | {found.mean():.1%} | "
                  f"{np.mean(a_best[args.dups:] >= THRESHOLD):.1%} | {err:.4f} | {a_ms:.1f} | "
                  f"{ivf.ivf.code_size + 16} | {build:.1f} |", flush=True)
            del ivf

        # an index that grew 16-fold past the switch (kept clips added 8,192 at a time): cells trained on the first
        # n/16 and never rebuilt, against the rebuild at every 4-fold growth (`near_dedup_retrain_growth`: at n/4, n)
        for label, growth in [("cells of the first n/16, never rebuilt", float("inf")),
                              ("rebuilt at each 4-fold growth", 4.0)]:
            t0 = time.perf_counter()
            grown = KeptIndex(exact_max=n // 16, nprobe=32, bits=16, retrain_growth=growth)
            for start in range(0, n, 8192):
                grown.add(torch.from_numpy(kept[start:start + 8192]))
            build = time.perf_counter() - t0
            a_best, _, a_ms = measure(grown, queries)
            found = a_best[:args.dups] >= THRESHOLD
            err = np.abs(a_best[:args.dups][found] - truth[found]).max() if found.any() else float("nan")
            print(f"| {n:,} | IVF {grown.ivf.nlist} cells, 16-bit, {label} | 32 | {found.mean():.1%} | "
                  f"{np.mean(a_best[args.dups:] >= THRESHOLD):.1%} | {err:.4f} | {a_ms:.1f} | "
                  f"{grown.ivf.code_size + 16} | {build:.1f} |", flush=True)
            del grown


if __name__ == "__main__":
    main()
