"""Stage 4 of ingestion, a Ray Data task per batch: one Parquet shard of the accepted clips, one part of the
rejects and one of the files' done records, each written atomically; and their schemas (documented in
docs/data-format.md; the training side reads it with `pipelines.train.shards`, which checks `SCHEMA_VERSION`
through the manifest).
"""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lumiere import storage
from lumiere.storage import StorageOptions

SCHEMA_VERSION = 1

# stamped into every part's Parquet footer (schema metadata): the hash of the ingest config that made its rows
# (`job.ingest_config_hash`) and the fingerprint of the text encoder that embedded them, so a resume, finalize
# and a reader can tell parts of another config or encoder from the footer alone
STAMP_CONFIG = b"lumiere.ingest_config_hash"
STAMP_ENCODER = b"lumiere.encoder_fingerprint"

# the shard schema (documented in docs/data-format.md)
CLIP_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("file_id", pa.string()),
    ("file_candidates", pa.int32()),
    ("shot_index", pa.int32()),
    ("clip_index", pa.int32()),
    ("start_frame", pa.int64()),
    ("start_time_s", pa.float64()),
    ("fps", pa.float32()),
    ("num_frames", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("frames_format", pa.string()),
    ("frames", pa.binary()),
    ("hr_size", pa.int32()),
    ("hr_frames", pa.binary()),
    ("caption", pa.string()),
    ("text_tokens", pa.binary()),
    ("text_pooled", pa.list_(pa.float32())),
    ("image_embedding", pa.list_(pa.float32())),
    ("clip_score", pa.float32()),
    ("motion_score", pa.float32()),
    ("brightness", pa.float32()),
    ("black_fraction", pa.float32()),  # share of the clip's frames that are black
    ("blank_fraction", pa.float32()),  # share of the clip's frames that are one flat colour
    ("src_width", pa.int32()),
    ("src_height", pa.int32()),
    ("src_fps", pa.float32()),
    ("src_codec", pa.string()),
    ("thumb", pa.binary()),  # JPEG strip of the first, middle and last frame at 64x64 (contact sheets); or b""
    ("signature", pa.binary()),  # near_dedup=frames: 1536 float16, curation.clip_signature; or b""
])
REJECT_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("file_id", pa.string()),
    ("file_candidates", pa.int32()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("shot_index", pa.int32()),
    ("start_frame", pa.int64()),
    ("num_frames", pa.int32()),
    # the filter scores measured before the candidate was rejected, null where it never got that far (a too-short
    # shot, a file that failed): report.json's histograms put them beside the accepted clips'
    ("motion_score", pa.float32()),
    ("black_fraction", pa.float32()),
    ("blank_fraction", pa.float32()),
    ("clip_score", pa.float32()),
    ("near_dup_cosine", pa.float32()),  # near_duplicate: the cosine to the kept clip
    ("thumb", pa.binary()),  # as in shards; b"" for files rejected before decoding
])
# columns that are null, not 0, where a row has no value: a score that was never measured
SCORE_COLUMNS = ("motion_score", "black_fraction", "blank_fraction", "clip_score", "near_dup_cosine")


# a file's done record: written with (or after) its candidates; `file_candidates` counts them with the record
DONE_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("source", pa.string()),
    ("file_id", pa.string()),
    ("file_candidates", pa.int32()),
    ("content_hash", pa.string()),  # SHA-256 of the file's bytes ("" when not hashed: dedup off, unreadable)
    ("duplicate_of", pa.string()),  # the kept file this one duplicates, or ""
    ("decode_s", pa.float64()),  # the file's decode+cut wall seconds (report.json timings)
    # how many time ranges (decode tasks, each with its own done record) the file was cut into; 1 for most files
    ("file_ranges", pa.int32()),
    # bytes this task copied from remote storage (0 for local files, and for a time range whose file was already
    # in its node's cache: source_cache.py); summed in report.json's source_fetch
    ("fetched_bytes", pa.int64()),
])


def _column(batch: dict, name: str, n: int, default):
    values = batch.get(name)
    if values is None:
        return [default] * n
    # np.float32 is not a float subclass: a NaN score from a float32 column must become the default (null) too
    return [default if (v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))) else v for v in values]


def _table(rows_idx: np.ndarray, batch: dict, schema: pa.Schema) -> pa.Table:
    defaults = {pa.string(): "", pa.binary(): b"", pa.int32(): -1, pa.int64(): -1, pa.float32(): 0.0,
                pa.float64(): 0.0}
    cols = {}
    for f in schema:
        default = None if f.name in SCORE_COLUMNS else defaults.get(f.type, None)
        col = _column(batch, f.name, len(batch["clip_id"]), default)
        vals = [col[i] for i in rows_idx]
        if pa.types.is_list(f.type):
            vals = [list(v) if v is not None else [] for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=schema)


def batch_seconds(stage: str, n: int, started: float) -> dict[str, np.ndarray]:
    """A stage's seconds for one batch of `n` rows since `started` (perf_counter), as the two columns
    `<stage>_s` / `<stage>_batches` with the values on the first row only, so sums over rows count each batch once
    however the rows are re-batched later (`write_shard` sums them into the driver's report.json timings)."""
    seconds, batches = np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int32)
    if n:
        seconds[0], batches[0] = time.perf_counter() - started, 1
    return {f"{stage}_s": seconds, f"{stage}_batches": batches}


def write_shard(batch: dict[str, np.ndarray], output_uri: str, options: StorageOptions,
                config_hash: str = "") -> dict[str, np.ndarray]:
    """Write the batch's accepted clips as one shard and its rejects as one part; each file atomically, stamped
    with `config_hash` and the encoder fingerprint the embedding stage put on the batch (STAMP_*).
    Returns one summary row per written file (what the driver counts for progress)."""
    started = time.perf_counter()
    fingerprints = np.asarray(batch.get("encoder_fingerprint", []))
    stamp = {STAMP_CONFIG: config_hash.encode(),
             STAMP_ENCODER: str(fingerprints[0]).encode() if len(fingerprints) else b""}
    statuses = np.asarray(batch["status"])
    # named by its content: a task Ray retries writes the same batch under the same name, so it overwrites its own
    # earlier (possibly committed) part instead of adding a second copy of every clip
    ids = sorted(str(c) for c in np.asarray(batch["clip_id"]).tolist())
    name = f"part-{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:20]}.parquet"
    summary = {"kind": [], "path": [], "rows": [], "frames": [], "sources": []}
    folders = {"shard": "shards", "rejects": "rejects", "done": "done"}
    for kind, schema, mask in (("shard", CLIP_SCHEMA, statuses == "ok"),
                               ("rejects", REJECT_SCHEMA, (statuses != "ok") & (statuses != "done")),
                               ("done", DONE_SCHEMA, statuses == "done")):
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            continue
        table = _table(idx, batch, schema)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **stamp})
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        uri = storage.join(output_uri, folders[kind], name)
        storage.write_bytes(uri, sink.getvalue(), options)
        summary["kind"].append(kind)
        summary["path"].append(uri)
        summary["rows"].append(len(idx))
        summary["frames"].append(int(np.sum(np.asarray(batch["num_frames"])[idx])) if kind == "shard" else 0)
        summary["sources"].append(len(set(np.asarray(batch["source"])[idx].tolist())))
    summary["written_at"] = [time.time()] * len(summary["kind"])
    # this task's timings on its first summary row only (the driver sums them into report.json's timings); a
    # retried task's rows reach the driver once, from the attempt that succeeded
    n = len(summary["kind"])
    first = [1] + [0] * (n - 1) if n else []
    summary["write_s"] = [(time.perf_counter() - started) * f for f in first]
    summary["write_batches"] = first
    for stage in ("embed", "near_dedup"):  # each stage put its batches' seconds on their first rows
        seconds = float(np.sum(np.asarray(batch[f"{stage}_s"], dtype=np.float64))) if f"{stage}_s" in batch else 0.0
        count = int(np.sum(np.asarray(batch[f"{stage}_batches"]))) if f"{stage}_batches" in batch else 0
        summary[f"{stage}_s"] = [seconds * f for f in first]
        summary[f"{stage}_batches"] = [count * f for f in first]
    return {k: np.asarray(v) for k, v in summary.items()}
