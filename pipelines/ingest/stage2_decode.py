"""The ingestion stages, each a plain function or class over a row or a batch (testable without Ray).

    list_inputs        driver: list videos under a URI, attach captions (sidecar or .txt/.json beside)
    decode_and_cut     per file: probe → decode (decord, 16 fps, timeout) → shots → clips → filters → crops
    CaptionEmbedder    actor: open_clip text embedding of the caption, image embedding of the keyframe,
                       CLIP score (and the low_clip_score filter)
    write_shard        per batch: one Parquet shard of accepted clips + one part of rejects, written atomically

Every row that leaves `decode_and_cut` is a *candidate*: an accepted clip or a rejected file/shot/clip, with a
deterministic `clip_id` and the number of candidates its file produced (`file_candidates`). A file is done
when all of its candidates are committed (in a shard or a rejects part); that is what resume relies on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import uuid
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lumiere import storage
from lumiere.storage import StorageOptions
from lumiere.video import X264_FAST_ANALYSIS, encode_mp4_bytes

from .curation import (
    Reject,
    clip_scores,
    decode_with_timeout,
    multi_thumbnails,
    probe,
    resize_center_crop,
    shot_boundaries,
)
from .ingest_config import IngestConfig

SCHEMA_VERSION = 1

# --- the shard schema (documented in docs/data-format.md) -------------------------------------------------
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
    ("src_width", pa.int32()),
    ("src_height", pa.int32()),
    ("src_fps", pa.float32()),
    ("src_codec", pa.string()),
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
])


def file_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


# --- 1. list inputs (driver) -------------------------------------------------------------------------------
def _read_sidecar(uri: str, options: StorageOptions) -> dict[str, str]:
    data = storage.read_bytes(uri, options)
    name = uri.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data), columns=["path", "caption"])
        rows = table.to_pylist()
    elif name.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    elif name.endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"captions file {uri} must be .jsonl, .csv or .parquet")
    try:
        return {str(r["path"]): str(r["caption"] or "") for r in rows}
    except KeyError as e:
        raise ValueError(f"captions file {uri} needs columns 'path' and 'caption' (missing {e})") from None


def _caption_beside(video_uri: str, files: set[str], options: StorageOptions) -> str | None:
    stem = video_uri.rsplit(".", 1)[0]
    if stem + ".txt" in files:
        return storage.read_bytes(stem + ".txt", options).decode("utf-8").strip()
    if stem + ".json" in files:
        doc = json.loads(storage.read_bytes(stem + ".json", options))
        return str(doc.get("caption", "")).strip() if isinstance(doc, dict) else None
    return None


def list_inputs(input_uri: str, captions_uri: str | None, cfg: IngestConfig,
                options: StorageOptions) -> tuple[list[dict], int]:
    """The video files under `input_uri` with their captions; returns (files, number of non-video files)."""
    listing = storage.list_files(input_uri, options)
    names = {u for u, _ in listing}
    sidecar = _read_sidecar(captions_uri, options) if captions_uri else {}
    # the listing's URIs are resolved (a local path made absolute), so the root they are relative to must be too:
    # with the raw argument, a relative --input matched no sidecar path and every file was "no_caption"
    resolved = storage.resolve(input_uri, options)[1]
    root = ("s3://" + resolved if storage.is_s3(input_uri) else resolved).rstrip("/")
    files, skipped = [], 0
    for uri, size in listing:
        if not uri.lower().endswith(tuple(e.lower() for e in cfg.extensions)):
            skipped += 1
            continue
        rel = uri[len(root) + 1:] if uri.startswith(root + "/") else PurePosixPath(uri).name
        caption = sidecar.get(rel, sidecar.get(uri, sidecar.get(PurePosixPath(uri).name)))
        if caption is None:
            caption = _caption_beside(uri, names, options)
        files.append({"source": uri, "size": int(size), "caption": caption or "",
                      "has_caption": bool(caption)})
    return files, skipped


# --- 2. decode, cut, filter (per file) ---------------------------------------------------------------------
def _reject_row(source: str, clip_id: str, reason: str, detail: str, shot: int = -1, start: int = -1,
                frames: int = 0) -> dict:
    return {"status": "reject", "clip_id": clip_id, "source": source, "file_id": file_id(source),
            "reason": reason, "detail": detail, "shot_index": shot, "start_frame": start, "num_frames": frames}


def _encode(frames: np.ndarray, cfg: IngestConfig) -> bytes:
    if cfg.frame_format == "raw":
        return frames.tobytes()
    return encode_mp4_bytes(frames, cfg.fps, cfg.mp4_crf, cfg.mp4_preset, cfg.codec_threads,
                            X264_FAST_ANALYSIS if cfg.mp4_fast_analysis else None)


CANDIDATE_DEFAULTS = {
    "status": "ok", "clip_id": "", "source": "", "file_id": "", "file_candidates": 0, "reason": "", "detail": "",
    "shot_index": -1, "clip_index": -1, "start_frame": -1, "start_time_s": -1.0, "fps": 0.0, "num_frames": 0,
    "height": 0, "width": 0, "frames_format": "", "frames": b"", "hr_size": 0, "hr_frames": b"", "keyframe": b"",
    "caption": "", "motion_score": 0.0, "brightness": 0.0, "src_width": 0, "src_height": 0, "src_fps": 0.0,
    "src_codec": "",
}


def decode_and_cut(row: dict, cfg: IngestConfig, options: StorageOptions) -> list[dict]:
    """One input file -> its candidates: accepted clips (frames encoded) and rejects with reason codes.
    Candidates whose clip_id is in row["skip_ids"] (committed by an earlier run) are dropped. Every
    candidate has the same keys (CANDIDATE_DEFAULTS), so Ray Data can put them in one block."""
    out = _candidates(row, cfg, options)
    skip = set(row.get("skip_ids") or ())
    fid = file_id(row["source"])
    return [
        {**CANDIDATE_DEFAULTS, **c, "file_id": fid, "file_candidates": len(out)}
        for c in out if c["clip_id"] not in skip
    ]


def _candidates(row: dict, cfg: IngestConfig, options: StorageOptions) -> list[dict]:
    source = row["source"]
    fid = file_id(source)
    whole_file = f"{fid}-file"
    if row["size"] > cfg.max_file_bytes:
        return [_reject_row(source, whole_file, "unreadable",
                            f"file is {row['size']} bytes, over max_file_bytes={cfg.max_file_bytes}")]
    if not row["has_caption"] and cfg.missing_caption == "reject":
        return [_reject_row(source, whole_file, "no_caption",
                            "no caption in the sidecar nor a .txt/.json beside the video")]
    try:
        path, is_temp = storage.local_copy(source, options)
    except OSError as e:
        return [_reject_row(source, whole_file, "unreadable", f"cannot fetch: {e}")]
    try:
        try:
            meta = probe(path)
            if min(meta.width, meta.height) < cfg.min_side:
                raise Reject("too_small", f"{meta.width}x{meta.height} is below min_side={cfg.min_side}")
            short_side = max(cfg.size, cfg.hr_size or 0)
            frames, src_fps, _ = decode_with_timeout(path, cfg.fps, short_side, cfg.decode_timeout_s,
                                                   cfg.codec_threads, (meta.width, meta.height))
        except Reject as r:
            return [_reject_row(source, whole_file, r.reason, r.detail)]
    finally:
        if is_temp:
            os.unlink(path)

    src_short = min(meta.width, meta.height)
    thumbs = multi_thumbnails(frames, (32, 64))  # once per file: shot cuts use 32², clip scores 64²
    out = []
    for shot, (a, b) in enumerate(shot_boundaries(frames, cfg.cut_threshold, thumbs[32])):
        n_clips = (b - a) // cfg.clip_frames
        if n_clips == 0:
            out.append(_reject_row(source, f"{fid}-s{shot:03d}", "too_short",
                                   f"shot of {b - a} frames at {cfg.fps:g} fps; a clip needs {cfg.clip_frames}",
                                   shot, a, b - a))
            continue
        for k in range(n_clips):
            start = a + k * cfg.clip_frames
            clip = frames[start:start + cfg.clip_frames]
            clip_id = f"{fid}-{start:07d}"
            scores = clip_scores(clip, thumbs=thumbs[64][start:start + cfg.clip_frames])
            reason = None
            if scores["black_fraction"] > cfg.black_max_fraction:
                reason = ("black", f"{scores['black_fraction']:.0%} of frames are black")
            elif scores["blank_fraction"] > cfg.blank_max_fraction:
                reason = ("blank", f"{scores['blank_fraction']:.0%} of frames are one flat colour")
            elif scores["motion_score"] < cfg.static_threshold:
                reason = ("static", f"motion score {scores['motion_score']:.3f} < {cfg.static_threshold}")
            if reason:
                out.append(_reject_row(source, clip_id, *reason, shot, start, len(clip)))
                continue
            base = resize_center_crop(clip, cfg.size)
            # the high-resolution copy is only worth keeping when the source has that resolution
            hr = resize_center_crop(clip, cfg.hr_size) if cfg.hr_size and src_short >= cfg.hr_size else None
            out.append({
                "status": "ok", "clip_id": clip_id, "source": source, "shot_index": shot, "clip_index": k,
                "start_frame": start, "start_time_s": start / cfg.fps, "fps": cfg.fps,
                "num_frames": len(clip), "height": cfg.size, "width": cfg.size,
                "frames_format": cfg.frame_format, "frames": _encode(base, cfg),
                "hr_size": cfg.hr_size if hr is not None else 0,
                "hr_frames": _encode(hr, cfg) if hr is not None else b"",
                "keyframe": base[len(base) // 2].tobytes(), "caption": row["caption"],
                "motion_score": scores["motion_score"], "brightness": scores["brightness"],
                "src_width": meta.width, "src_height": meta.height, "src_fps": src_fps,
                "src_codec": meta.codec,
            })
    return out


# --- 3. caption-embed (actor) ------------------------------------------------------------------------------
class CaptionEmbedder:
    """Loads the open_clip encoder once per actor; adds text/image embeddings and the CLIP score."""

    def __init__(self, cfg: IngestConfig):
        from lumiere.text_encoder import TextEncoder

        self.cfg = cfg
        device = "cuda" if cfg.embed_num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.encoder = TextEncoder(cfg.text_encoder()).to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["clip_id"])
        ok = np.array([s == "ok" for s in batch["status"]])
        tokens = np.empty(n, dtype=object)
        pooled = np.empty(n, dtype=object)
        image = np.empty(n, dtype=object)
        score = np.zeros(n, dtype=np.float32)
        tokens[:], pooled[:], image[:] = b"", None, None
        if ok.any():
            idx = np.flatnonzero(ok)
            context, text = self.encoder.encode_text([str(batch["caption"][i]) for i in idx])
            size = self.cfg.size
            keyframes = torch.stack([
                torch.from_numpy(np.frombuffer(batch["keyframe"][i], dtype=np.uint8).reshape(size, size, 3).copy())
                for i in idx
            ]).permute(0, 3, 1, 2).float() / 255.0
            img = self.encoder.encode_image(keyframes)
            cos = torch.nn.functional.cosine_similarity(text, img, dim=-1)
            for j, i in enumerate(idx):
                tokens[i] = context[j].to(torch.float16).cpu().numpy().tobytes()
                pooled[i] = text[j].cpu().numpy().astype(np.float32)
                image[i] = img[j].cpu().numpy().astype(np.float32)
                score[i] = float(cos[j])
                if self.cfg.min_clip_score is not None and score[i] < self.cfg.min_clip_score:
                    batch["status"][i] = "reject"
                    batch["reason"][i] = "low_clip_score"
                    batch["detail"][i] = f"CLIP score {score[i]:.3f} < min_clip_score={self.cfg.min_clip_score}"
        batch.update(text_tokens=tokens, text_pooled=pooled, image_embedding=image, clip_score=score)
        return batch


# --- 4. write shards (per batch) ---------------------------------------------------------------------------
def _column(batch: dict, name: str, n: int, default):
    values = batch.get(name)
    if values is None:
        return [default] * n
    return [default if (v is None or (isinstance(v, float) and np.isnan(v))) else v for v in values]


def _table(rows_idx: np.ndarray, batch: dict, schema: pa.Schema) -> pa.Table:
    defaults = {pa.string(): "", pa.binary(): b"", pa.int32(): -1, pa.int64(): -1, pa.float32(): 0.0,
                pa.float64(): 0.0}
    cols = {}
    for f in schema:
        default = defaults.get(f.type, None)
        col = _column(batch, f.name, len(batch["clip_id"]), default)
        vals = [col[i] for i in rows_idx]
        if pa.types.is_list(f.type):
            vals = [list(v) if v is not None else [] for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=schema)


def write_shard(batch: dict[str, np.ndarray], output_uri: str, options: StorageOptions) -> dict[str, np.ndarray]:
    """Write the batch's accepted clips as one shard and its rejects as one part; each file atomically.
    Returns one summary row per written file (what the driver counts for progress)."""
    statuses = np.asarray(batch["status"])
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    summary = {"kind": [], "path": [], "rows": [], "frames": [], "sources": []}
    for kind, schema, mask in (("shard", CLIP_SCHEMA, statuses == "ok"),
                               ("rejects", REJECT_SCHEMA, statuses != "ok")):
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            continue
        table = _table(idx, batch, schema)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        uri = storage.join(output_uri, "shards" if kind == "shard" else "rejects", name)
        storage.write_bytes(uri, sink.getvalue(), options)
        summary["kind"].append(kind)
        summary["path"].append(uri)
        summary["rows"].append(len(idx))
        summary["frames"].append(int(np.sum(np.asarray(batch["num_frames"])[idx])) if kind == "shard" else 0)
        summary["sources"].append(len(set(np.asarray(batch["source"])[idx].tolist())))
    summary["written_at"] = [time.time()] * len(summary["kind"])
    return {k: np.asarray(v) for k, v in summary.items()}
