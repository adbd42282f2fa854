"""Stage 3b of ingestion, one Ray Data actor after the embeddings: near-duplicate clips.

Every accepted clip is compared with the clips kept so far — those committed by earlier runs into this output
(loaded when the actor starts) and those this run has let through — by the cosine of a content vector: the
clip's frame fingerprint (`near_dedup: frames`, `curation.clip_signature`) or its CLIP image embedding
(`near_dedup: clip`). A clip at `near_dedup_threshold` or above becomes a `near_duplicate` reject whose detail
names the kept clip; otherwise it is kept and joins the index.

One actor holds the index, so a clip is compared with every kept clip, whichever decode task made it. Which of
two near-duplicates is kept is the one that reaches the actor first. Decisions are remembered by clip id: a batch
Ray re-runs (lineage reconstruction, a retried task) gets the same answers, so a retry neither rejects a clip as
a duplicate of itself nor keeps both copies. Memory: 4 bytes x dimension per kept clip (2 KB for the 512-d
fingerprint: 2 GB per million kept clips); each batch costs one (batch x kept) matrix product. Past a few
million kept clips per job an approximate index (e.g. faiss) sharded by signature would take this actor's place.
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
            self.index = torch.zeros(max(1024, len(vectors)), vectors.shape[1])
        while self.size + len(vectors) > len(self.index):  # grown by doubling: amortised O(1) per clip
            self.index = torch.cat([self.index, torch.zeros_like(self.index)])
        self.index[self.size:self.size + len(vectors)] = vectors
        self.size += len(vectors)
        self.kept_ids += ids
        self.kept_sources += sources

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = batch["status"]
        ok = [i for i in range(len(status)) if status[i] == "ok"]
        ok.sort(key=lambda i: str(batch["clip_id"][i]))  # the batch's own order does not decide
        vectors = _vectors(self.cfg, batch.get("signature"), batch.get("image_embedding"), ok)
        for j, i in enumerate(ok):
            cid = str(batch["clip_id"][i])
            if cid not in self.decisions:
                v = vectors[j]
                match = None
                if self.size:
                    sims = self.index[:self.size] @ v
                    best = int(torch.argmax(sims))
                    if float(sims[best]) >= self.cfg.near_dedup_threshold:
                        match = (self.kept_ids[best], self.kept_sources[best], float(sims[best]))
                self.decisions[cid] = match
                if match is None:
                    self._add(v[None], [cid], [str(batch["source"][i])])
            match = self.decisions[cid]
            if match is not None:
                kept, source, cos = match
                status[i] = "reject"
                batch["reason"][i] = "near_duplicate"
                batch["detail"][i] = (f"cosine {cos:.4f} ({self.cfg.near_dedup} near_dedup) to clip {kept} of "
                                      f"{source} (kept); raise near_dedup_threshold or --set near_dedup=none to "
                                      "keep both")
        return batch
