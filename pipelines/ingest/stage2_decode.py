"""Stage 2 of ingestion, a Ray Data flat_map task per input file: probe → decode (decord, 16 fps, timeout) →
shots → clips → filters → crops → encoded frames. The frame-level functions it calls are in `curation.py`.

Every row that leaves `decode_and_cut` is a *candidate*: an accepted clip or a rejected file/shot/clip, with a
deterministic `clip_id` and the number of candidates its file produced (`file_candidates`). A file is done
when all of its candidates are committed (in a shard or a rejects part, stage 4); that is what resume relies on.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from lumiere import storage
from lumiere.storage import StorageOptions
from lumiere.video import X264_FAST_ANALYSIS, encode_mp4_bytes

from .config import IngestConfig
from .curation import (
    Reject,
    clip_scores,
    decode_with_timeout,
    multi_thumbnails,
    probe,
    resize_center_crop,
    shot_boundaries,
)


def file_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


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
        return [_reject_row(source, whole_file, "too_large",
                            f"file is {row['size']} bytes, over max_file_bytes={cfg.max_file_bytes} (raise it with "
                            "--set max_file_bytes=N)")]
    if row.get("caption_error"):
        return [_reject_row(source, whole_file, "bad_caption", row["caption_error"])]
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
                short = min(meta.width, meta.height)
                raise Reject("too_small", f"{meta.width}x{meta.height} is below min_side={cfg.min_side}; to keep "
                             f"sources this small: --set min_side={short} --set size={min(short, cfg.size)} "
                             "--set hr_size=null")
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
