"""Stage 3b of ingestion, one Ray Data actor after the embeddings: near-duplicate clips.

Every accepted clip is compared with the clips kept so far — those committed by earlier runs into this output
(loaded when the actor starts) and those this run has let through — by the cosine of a content vector: the
clip's frame fingerprint (`near_dedup: frames`, `curation.clip_signature`) or its CLIP image embedding
(`near_dedup: clip`). A clip at `near_dedup_threshold` or above becomes a `near_duplicate` reject whose detail
names the kept clip; otherwise it is kept and joins the index.

One actor holds the index, so a clip is compared with every kept clip, whichever decode task made it. Which of
two near-duplicates is kept is the one that reaches the actor first. Decisions are remembered by clip id: a batch
Ray re-runs (lineage reconstruction, a retried task) gets the same answers, so a retry neither rejects a clip as
a duplicate of itself nor keeps both copies.

The index (`KeptIndex`) is exact up to `near_dedup_exact_max` kept clips: a float16 matrix (3 KB per clip for the
1536-d fingerprint), each batch one (batch x kept) product. Past that it becomes an approximate one: a faiss
inverted file (k-means cells trained on the clips kept so far) holding the vectors as float16 (cosines as exact as
the exact index's) or, with `near_dedup_index_bits: 8`, 8-bit scalar-quantised (half the memory: 1.5 KB per clip,
at a cosine error of a few thousandths), a batch compared only with the clips of its `near_dedup_nprobe` nearest
cells. Each time the kept clips have grown `near_dedup_retrain_growth`-fold (4) since the cells were trained, the
index is rebuilt with ~2·sqrt(n) new cells trained on all of them. What that costs in missed duplicates and cosine
error, and gains in time and memory, is measured in `benchmarks/near_dedup_index.py`.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lumiere import storage
from lumiere.storage import StorageOptions

from .config import IngestConfig
from .stage4_write import batch_seconds


class KeptIndex:
    """The kept clips' unit vectors (n d), searched for each query's most similar one (cosine).

    Exact while it holds at most `exact_max` vectors; when an add passes that, a faiss IVF index (vectors stored in
    `bits` 16 or 8 per component) is trained on every vector held (k-means into ~2·sqrt(n) cells) and takes them
    over, and every later search scans the `nprobe` cells nearest each query. Each time a 16-bit index has grown
    `retrain_growth`-fold since its cells were trained, it is rebuilt: new cells (~2·sqrt(n) again) trained on a
    sample of all the vectors held, then every vector re-added from the old index in order — so a cell keeps
    holding ~sqrt(n)/2 clips and the cells follow what later sources look like, instead of the first 200,000
    clips' cells filling up ever further (a search's cost grows ~sqrt(n), not ~n). The rebuild stops this actor
    for its duration (the k-means and one assignment of every vector: amortised, a fraction of the adds' own
    cost with growth 4) and holds the old and new index at once. Positions are insertion order, across rebuilds."""

    _CHUNK = 65536  # kept vectors per float32 product / per re-add: the exact index itself stays float16
    _MAX_CELLS = 65536

    def __init__(self, exact_max: int = 200_000, nprobe: int = 32, bits: int = 16, retrain_growth: float = 4.0):
        if bits not in (8, 16):
            raise ValueError(f"bits must be 8 or 16, got {bits}")
        if retrain_growth <= 1:
            raise ValueError(f"retrain_growth must be above 1, got {retrain_growth}")
        self.exact_max, self.nprobe, self.bits, self.retrain_growth = exact_max, nprobe, bits, retrain_growth
        self.exact = torch.zeros(0, 0, dtype=torch.float16)
        self.ivf = None  # the faiss index, once past exact_max
        self.trained_size = 0  # vectors held when the IVF cells were last trained
        self.size = 0

    @property
    def approximate(self) -> bool:
        return self.ivf is not None

    def add(self, vectors: torch.Tensor) -> None:
        if len(vectors) == 0:
            return
        if self.ivf is not None:
            self.ivf.add(np.ascontiguousarray(vectors.float().numpy()))
            self.size += len(vectors)
            # 8-bit codes are not rebuilt: a component outside the per-dimension range its cells were trained on
            # was clipped when added, and re-encoding those read-back codes under the new, wider ranges made them
            # worse (the corpus of tests/test_curation.py's rebuild test at 8 bits: 16 % of vectors no longer found
            # at their own position after a rebuild, 2 % without one); float16 codes read back exactly
            if (self.bits == 16 and self.size >= self.retrain_growth * self.trained_size
                    and self._cells(self.size) > self.ivf.nlist):
                self._train_ivf(vectors.shape[1])
            return
        if self.exact.numel() == 0:
            self.exact = torch.zeros(max(1024, len(vectors)), vectors.shape[1], dtype=torch.float16)
        while self.size + len(vectors) > len(self.exact):  # grown by doubling: amortised O(1) per clip
            self.exact = torch.cat([self.exact, torch.zeros_like(self.exact)])
        self.exact[self.size:self.size + len(vectors)] = vectors.to(torch.float16)
        self.size += len(vectors)
        if self.size > self.exact_max:  # trained on everything held, this batch included
            self._train_ivf(vectors.shape[1])

    @classmethod
    def _cells(cls, n: int) -> int:
        # ~2·sqrt(n) cells, each trained on >= 39 vectors (faiss's floor): k-means on 200k kept fingerprints takes
        # ~10 s of one core
        return max(1, min(cls._MAX_CELLS, round(2 * math.sqrt(n)), n // 39))

    def _held(self, start: int, stop: int) -> np.ndarray:
        if self.ivf is not None:
            return self.ivf.reconstruct_n(start, stop - start)
        return self.exact[start:stop].float().numpy()

    def _held_at(self, positions: np.ndarray) -> np.ndarray:
        if self.ivf is not None:
            return self.ivf.reconstruct_batch(positions.astype(np.int64))
        return self.exact[torch.from_numpy(positions)].float().numpy()

    def _train_ivf(self, dim: int) -> None:
        """(Re)build the IVF index over the `size` vectors held (exact matrix or the previous IVF index)."""
        import faiss

        cells = self._cells(self.size)
        quantizer = faiss.IndexFlatIP(dim)
        codec = faiss.ScalarQuantizer.QT_fp16 if self.bits == 16 else faiss.ScalarQuantizer.QT_8bit
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, cells, codec, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = 0  # k-means from a fixed seed: the same kept clips give the same cells
        # a fixed-seed sample of positions (numpy draws k of n without an n-long permutation)
        sample = np.sort(np.random.default_rng(0).choice(self.size, min(self.size, 40 * cells), replace=False))
        ivf.train(np.ascontiguousarray(self._held_at(sample)))
        if self.bits == 16:  # only these are rebuilt (see add)
            ivf.make_direct_map()  # position -> stored code, so a later rebuild can read the vectors back
        for start in range(0, self.size, self._CHUNK):
            ivf.add(np.ascontiguousarray(self._held(start, min(self.size, start + self._CHUNK))))
        ivf.nprobe = min(self.nprobe, cells)
        self.quantizer, self.ivf = quantizer, ivf  # the IVF index does not own its quantizer: keep it alive
        self.exact = torch.zeros(0, 0, dtype=torch.float16)
        self.trained_size = self.size

    def search(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row of `vectors`, the highest cosine to a held vector and its position (-inf, -1: none)."""
        if self.ivf is not None:
            sims, pos = self.ivf.search(np.ascontiguousarray(vectors.float().numpy()), 1)
            best, where = torch.from_numpy(sims[:, 0].copy()), torch.from_numpy(pos[:, 0].astype(np.int64))
            return torch.where(where >= 0, best, torch.full_like(best, float("-inf"))), where
        best = torch.full((len(vectors),), float("-inf"))
        where = torch.full((len(vectors),), -1, dtype=torch.long)
        for start in range(0, self.size, self._CHUNK):
            sims = vectors @ self.exact[start:min(self.size, start + self._CHUNK)].float().T  # b k
            value, pos = sims.max(dim=1)
            better = value > best
            best, where = torch.where(better, value, best), torch.where(better, pos + start, where)
        return best, where


def _vectors(cfg: IngestConfig, signatures, embeddings, rows) -> torch.Tensor:
    if cfg.near_dedup == "frames":
        data = [np.frombuffer(signatures[i], dtype=np.float16) for i in rows]
    else:
        data = [np.asarray(embeddings[i], dtype=np.float32) for i in rows]
    if not data:
        return torch.zeros(0, 0)
    v = torch.from_numpy(np.stack(data).astype(np.float32))
    return torch.nn.functional.normalize(v, dim=1)


class NearDuplicateFilter:
    """Marks near-duplicate clips in each batch as rejects (see the module docstring)."""

    def __init__(self, cfg: IngestConfig, output_uri: str, options: StorageOptions):
        self.cfg = cfg
        self.index = KeptIndex(cfg.near_dedup_exact_max, cfg.near_dedup_nprobe, cfg.near_dedup_index_bits,
                               cfg.near_dedup_retrain_growth)
        self.kept_ids: list[str] = []
        self.kept_sources: list[str] = []
        self.decisions: dict[str, tuple[str, str, float] | None] = {}  # clip id -> (kept id, source, cos) or None
        self._load_committed(output_uri, options)

    def _load_committed(self, output_uri: str, options: StorageOptions) -> None:
        """The clips earlier runs committed to this output: kept clips, so new ones are compared with them."""
        root = storage.join(output_uri, "shards")
        if not storage.exists(root, options):
            return
        column = "signature" if self.cfg.near_dedup == "frames" else "image_embedding"

        def read(uri: str):
            table = storage.read_parquet_columns(uri, ["clip_id", "source", column], options)  # never the frames
            return table if column in table.column_names else None

        uris = [u for u, _ in storage.list_files(root, options) if u.endswith(".parquet")]
        with ThreadPoolExecutor(16) as pool:
            for table in pool.map(read, uris):
                if table is None or table.num_rows == 0:
                    continue
                values = table[column].to_pylist()
                have = [i for i, v in enumerate(values) if v]
                ids, sources = table["clip_id"].to_pylist(), table["source"].to_pylist()
                vectors = _vectors(self.cfg, values, values, have)
                for i in have:
                    self.decisions[ids[i]] = None
                self._add(vectors, [ids[i] for i in have], [sources[i] for i in have])

    @property
    def size(self) -> int:
        """Kept clips the index holds."""
        return self.index.size

    def _add(self, vectors: torch.Tensor, ids: list[str], sources: list[str]) -> None:
        self.index.add(vectors)
        self.kept_ids += ids
        self.kept_sources += sources

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        status = batch["status"]
        ok = [i for i in range(len(status)) if status[i] == "ok"]
        ok.sort(key=lambda i: str(batch["clip_id"][i]))  # the batch's own order does not decide
        new = [i for i in ok if str(batch["clip_id"][i]) not in self.decisions]
        if new:
            vectors = _vectors(self.cfg, batch.get("signature"), batch.get("image_embedding"), new)
            best, where = self.index.search(vectors)
            fresh: list[int] = []  # rows of `vectors` kept from this batch (a copy can be in the same batch)
            for r, i in enumerate(new):
                match = None
                if float(best[r]) >= self.cfg.near_dedup_threshold:
                    k = int(where[r])
                    match = (self.kept_ids[k], self.kept_sources[k], float(best[r]))
                elif fresh:
                    sims = vectors[fresh] @ vectors[r]
                    k = int(torch.argmax(sims))
                    if float(sims[k]) >= self.cfg.near_dedup_threshold:
                        match = (str(batch["clip_id"][new[fresh[k]]]), str(batch["source"][new[fresh[k]]]),
                                 float(sims[k]))
                if match is None:
                    fresh.append(r)
                self.decisions[str(batch["clip_id"][i])] = match
            self._add(vectors[fresh], [str(batch["clip_id"][new[r]]) for r in fresh],
                      [str(batch["source"][new[r]]) for r in fresh])
        cosine = np.full(len(status), np.nan, dtype=np.float32)
        for i in ok:
            match = self.decisions[str(batch["clip_id"][i])]
            if match is not None:
                kept, source, cos = match
                cosine[i] = cos
                status[i] = "reject"
                batch["reason"][i] = "near_duplicate"
                batch["detail"][i] = (f"cosine {cos:.4f} ({self.cfg.near_dedup} near_dedup) to clip {kept} of "
                                      f"{source} (kept); raise near_dedup_threshold or --set near_dedup=none to "
                                      "keep both")
        batch["near_dup_cosine"] = cosine
        # the one actor sees every clip: its seconds say when it becomes the job's bottleneck (report.json)
        batch.update(batch_seconds("near_dedup", len(status), started))
        return batch
