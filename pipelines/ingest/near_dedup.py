"""Stage 3b of ingestion, one Ray Data actor after the embeddings: near-duplicate clips.

Every accepted clip is compared with the clips kept so far — those committed by earlier runs into this output
(loaded when the actor starts) and those this run has let through — by the cosine of a content vector: the
clip's frame fingerprint (`near_dedup: frames`, `curation.clip_signature`) or its CLIP image embedding
(`near_dedup: clip`). A clip at `near_dedup_threshold` or above becomes a `near_duplicate` reject whose detail
names the kept clip; otherwise it is kept and joins the index.

One actor holds the index, so a clip is compared with every kept clip, whichever decode task made it. Which of
two near-duplicates is kept is the one that reaches the actor first. Decisions are remembered by clip id: a batch
Ray re-runs (lineage reconstruction, a retried task) gets the same answers, so a retry neither rejects a clip as
a duplicate of itself nor keeps both copies. Memory: 2 bytes x dimension per kept clip (float16: 3 KB for the
1536-d fingerprint, 3 GB per million kept clips); each batch costs one (batch x kept) matrix product, in float32
chunks. Past a few million kept clips per job an approximate index (e.g. faiss) sharded by signature would take
this actor's place.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import torch

from lumiere import storage
from lumiere.storage import StorageOptions

from .config import IngestConfig


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
        self.index = torch.zeros(0, 0)
        self.size = 0
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
            part = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri, options)))
            if column not in part.schema_arrow.names:
                return None
            return part.read(columns=["clip_id", "source", column])  # never the frames

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

    def _add(self, vectors: torch.Tensor, ids: list[str], sources: list[str]) -> None:
        if len(vectors) == 0:
            return
        if self.index.numel() == 0:
            self.index = torch.zeros(max(1024, len(vectors)), vectors.shape[1], dtype=torch.float16)
        while self.size + len(vectors) > len(self.index):  # grown by doubling: amortised O(1) per clip
            self.index = torch.cat([self.index, torch.zeros_like(self.index)])
        self.index[self.size:self.size + len(vectors)] = vectors.to(torch.float16)
        self.size += len(vectors)
        self.kept_ids += ids
        self.kept_sources += sources

    _CHUNK = 65536  # kept vectors per float32 product: the index itself stays float16

    def _search(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row of `vectors`, the highest cosine to a kept clip and that clip's position (-inf, -1: none)."""
        best = torch.full((len(vectors),), float("-inf"))
        where = torch.full((len(vectors),), -1, dtype=torch.long)
        for start in range(0, self.size, self._CHUNK):
            sims = vectors @ self.index[start:min(self.size, start + self._CHUNK)].float().T  # b k
            value, pos = sims.max(dim=1)
            better = value > best
            best, where = torch.where(better, value, best), torch.where(better, pos + start, where)
        return best, where

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = batch["status"]
        ok = [i for i in range(len(status)) if status[i] == "ok"]
        ok.sort(key=lambda i: str(batch["clip_id"][i]))  # the batch's own order does not decide
        new = [i for i in ok if str(batch["clip_id"][i]) not in self.decisions]
        if new:
            vectors = _vectors(self.cfg, batch.get("signature"), batch.get("image_embedding"), new)
            best, where = self._search(vectors)
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
        for i in ok:
            match = self.decisions[str(batch["clip_id"][i])]
            if match is not None:
                kept, source, cos = match
                status[i] = "reject"
                batch["reason"][i] = "near_duplicate"
                batch["detail"][i] = (f"cosine {cos:.4f} ({self.cfg.near_dedup} near_dedup) to clip {kept} of "
                                      f"{source} (kept); raise near_dedup_threshold or --set near_dedup=none to "
                                      "keep both")
        return batch
