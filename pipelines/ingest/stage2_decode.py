"""Stage 2 of ingestion, a Ray Data flat_map task per input file: probe → streamed decode (decord, 16 fps, in
chunks, a stall timeout) → shots → clips → filters → crops → encoded frames, each clip yielded as soon as it is
made. The frame-level functions it calls are in `curation.py`.

Every row that leaves `decode_and_cut` is a *candidate*: an accepted clip or a rejected file/shot/clip, with a
deterministic `clip_id`, and last the file's *done record*, which carries how many candidates the file has. A file
is done when its done record and all of its candidates are committed (stage 4: shards/, rejects/, done/); that is
what resume relies on.
"""

from __future__ import annotations

import hashlib
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import PurePath

import numpy as np
import torch

from lumiere import storage
from lumiere.storage import StorageOptions
from lumiere.video import X264_FAST_ANALYSIS, encode_mp4_bytes

from .config import IngestConfig
from .contact_sheets import thumb_strip
from .curation import (
    Reject,
    clip_scores,
    clip_signature,
    probe,
    resize_center_crop,
    stream_resampled,
)
from .range_decode import RangeSource
from .shots import ShotStream, make_detector
from .source_cache import local_source


def file_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def _reject_row(source: str, clip_id: str, reason: str, detail: str, shot: int = -1, start: int = -1,
                frames: int = 0) -> dict:
    return {"status": "reject", "clip_id": clip_id, "source": source, "file_id": file_id(source),
            "reason": reason, "detail": detail, "shot_index": shot, "start_frame": start, "num_frames": frames}


def failure_detail(source: str, reason: str, e: BaseException) -> str:
    """An unexpected per-file failure as its reject detail: the error and the innermost frame it came from
    ("ValueError: bad frame (in encode_mp4_bytes, video.py:212)"). The whole traceback goes to the worker's stderr,
    which Ray forwards to the driver (the job's log) and keeps in the worker's log file."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (in {frames[-1].name}, {PurePath(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    sys.stderr.write(f"[ingest] {source}: {reason}\n{''.join(traceback.format_exception(e))}")
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


def _encode(frames: np.ndarray, cfg: IngestConfig) -> bytes:
    if cfg.frame_format == "raw":
        return frames.tobytes()
    return encode_mp4_bytes(frames, cfg.fps, cfg.mp4_crf, cfg.mp4_preset, cfg.codec_threads,
                            X264_FAST_ANALYSIS if cfg.mp4_fast_analysis else None)


CANDIDATE_DEFAULTS = {
    "status": "ok", "clip_id": "", "source": "", "file_id": "", "file_candidates": 0, "reason": "", "detail": "",
    "shot_index": -1, "clip_index": -1, "start_frame": -1, "start_time_s": -1.0, "fps": 0.0, "num_frames": 0,
    "height": 0, "width": 0, "frames_format": "", "frames": b"", "hr_size": 0, "hr_frames": b"", "keyframe": b"",
    "caption": "", "motion_score": float("nan"), "black_fraction": float("nan"), "blank_fraction": float("nan"),
    "brightness": 0.0, "src_width": 0, "src_height": 0, "src_fps": 0.0,
    "src_codec": "", "content_hash": "", "duplicate_of": "", "decode_s": 0.0, "thumb": b"",
    "signature": b"", "file_ranges": 0, "fetched_bytes": 0,
}


def range_key(source: str, row: dict | None = None) -> str:
    """The prefix of a task's candidate ids: the file id, and for a file cut into time ranges also the range
    (`<file_id>-r007`), so ids are unique across ranges and a resume can tell which ranges are complete."""
    fid = file_id(source)
    if row is None or int(row.get("ranges") or 1) <= 1:
        return fid
    return f"{fid}-r{int(row['range_index']):03d}"


def done_id(source: str, row: dict | None = None) -> str:
    return f"{range_key(source, row)}-done"


def decode_and_cut(row: dict, cfg: IngestConfig, options: StorageOptions) -> Iterator[dict]:
    """One input file -> its candidates, yielded as they are made (accepted clips with frames encoded, rejects
    with reason codes), then the file's done record: a row with status "done" and, in `file_candidates`, how
    many candidates the file has with the record itself (every other row has 0). Candidates whose clip_id is in
    row["skip_ids"] (committed by an earlier run) are dropped. Every row has the same keys (CANDIDATE_DEFAULTS),
    so Ray Data can put them in one block. Memory does not grow with the video's length: frames are decoded in
    chunks and only the clip being made is held (`curation.stream_resampled`, `shots.ShotStream`)."""
    skip = set(row.get("skip_ids") or ())
    fid = file_id(row["source"])
    key = range_key(row["source"], row)
    count = 0
    # the file's decode+cut wall seconds, not counting the time Ray spends between our yields; carried on the
    # done record (one per file, overwritten, never added, when a task is retried) to report.json's timings
    seconds, since = 0.0, time.perf_counter()
    for c in _candidates(row, cfg, options, key):
        count += 1
        if c["clip_id"] not in skip:
            seconds += time.perf_counter() - since
            yield {**CANDIDATE_DEFAULTS, **c, "file_id": fid, "file_candidates": 0}
            since = time.perf_counter()
    seconds += time.perf_counter() - since
    done = done_id(row["source"], row)
    if done not in skip:
        yield {**CANDIDATE_DEFAULTS, "status": "done", "clip_id": done, "source": row["source"], "file_id": fid,
               "file_candidates": count + 1, "content_hash": row.get("content_hash") or "",
               "duplicate_of": row.get("duplicate_of") or "", "decode_s": seconds,
               "file_ranges": int(row.get("ranges") or 1), "fetched_bytes": int(row.get("fetched_bytes") or 0)}


def _candidates(row: dict, cfg: IngestConfig, options: StorageOptions, key: str | None = None) -> Iterator[dict]:
    source = row["source"]
    key = key or range_key(source, row)
    whole_file = f"{key}-file"
    if row["size"] > cfg.max_file_bytes:
        yield _reject_row(source, whole_file, "too_large",
                          f"file is {row['size']} bytes, over max_file_bytes={cfg.max_file_bytes} (raise it with "
                          "--set max_file_bytes=N)")
        return
    if row.get("duplicate_of"):
        yield _reject_row(source, whole_file, "duplicate",
                          f"the same bytes as {row['duplicate_of']} (kept); --set dedup=none ingests every copy")
        return
    if row.get("caption_error"):
        yield _reject_row(source, whole_file, "bad_caption", row["caption_error"])
        return
    if not row["has_caption"] and cfg.missing_caption == "reject":
        yield _reject_row(source, whole_file, "no_caption",
                          "no caption in the sidecar nor a .txt/.json beside the video")
        return
    if storage.is_s3(source) and cfg.reads_by_ranges(int(row.get("ranges") or 1)):  # in place, by byte ranges
        remote = RangeSource(source, options, int(row["size"]), cfg.remote_read_block_bytes)
        try:
            yield from _cut(remote, row, key, whole_file, cfg)
        finally:
            row["fetched_bytes"] = remote.fetched  # carried to the done record (report.json's source_fetch)
            remote.close()
        return
    # a remote file is copied to local disk for the decoder; the time ranges of one file share a copy per node
    shared = int(row.get("ranges") or 1) > 1
    local = local_source(source, options, shared, cfg.source_cache_dir, cfg.source_cache_bytes)
    try:
        path, fetched = local.__enter__()
    except OSError as e:
        yield _reject_row(source, whole_file, "unreadable", f"cannot fetch: {e}")
        return
    row["fetched_bytes"] = fetched  # carried to the done record (report.json's source_fetch)
    try:
        yield from _cut(path, row, key, whole_file, cfg)
    finally:
        local.__exit__(None, None, None)


def _cut(path: str, row: dict, key: str, whole_file: str, cfg: IngestConfig) -> Iterator[dict]:
    source = row["source"]
    try:
        meta = probe(path)
        if min(meta.width, meta.height) < cfg.min_side:
            short = min(meta.width, meta.height)
            raise Reject("too_small", f"{meta.width}x{meta.height} is below min_side={cfg.min_side}; to keep "
                         f"sources this small: --set min_side={short} --set size={min(short, cfg.size)} "
                         "--set hr_size=null")
        short_side = max(cfg.size, cfg.hr_size or 0)
        # a file cut into time ranges: this task's output frames only (frame numbers stay the file's)
        first, end = int(row.get("range_first") or 0), int(row.get("range_end", -1))
        frames = (first, None if end < 0 else end) if int(row.get("ranges") or 1) > 1 else None
        stream = stream_resampled(path, cfg.fps, short_side, cfg.decode_timeout_s, cfg.codec_threads,
                                  (meta.coded_width, meta.coded_height), (meta.sample_aspect, meta.rotation), frames,
                                  cfg.decode_ahead_max_bytes)
        src_fps, _ = next(stream)
    except Reject as r:
        yield _reject_row(source, whole_file, r.reason, r.detail)
        return
    except Exception as e:  # noqa: BLE001 - any per-file failure is that file's reject, never the job's failure
        yield _reject_row(source, whole_file, "unreadable", failure_detail(source, "unreadable", e))
        return

    src_short = min(meta.width, meta.height)
    made = 0
    # outside the per-file try: a detector that cannot be built (the driver checks the package) is the job's error
    device = "cuda" if cfg.shot_num_gpus > 0 and torch.cuda.is_available() else "cpu"
    detector = make_detector(cfg.shot_detector, cfg.cut_threshold, cfg.transnet_threshold, device)
    shots = ShotStream(cfg.clip_frames, detector=detector, trim=cfg.shot_trim_frames)
    try:
        for chunk in stream:
            for event in shots.push(chunk):
                row_out = _event_row(event, row, key, first, meta, src_fps, src_short, cfg)
                made += 1
                yield row_out
        for event in shots.finish():
            row_out = _event_row(event, row, key, first, meta, src_fps, src_short, cfg)
            made += 1
            yield row_out
    except (Reject, Exception) as e:  # noqa: BLE001 - the decoder stalled or broke part-way, or a clip failed:
        # the file's reject (the clips made before it are kept), never the job's failure
        r = e if isinstance(e, Reject) else Reject("processing_failed",
                                                   failure_detail(source, "processing_failed", e))
        at = first + shots.n
        yield _reject_row(source, whole_file if made == 0 else f"{key}-stop", r.reason,
                          f"{r.detail} (stopped at frame {at} of the {cfg.fps:g} fps stream; the {made} clips/shots "
                          "before it are kept)" if made else r.detail, -1, at, 0)
    finally:
        stream.close()  # stops the decode thread if the consumer stopped early


def _event_row(event: tuple, row: dict, key: str, first: int, meta, src_fps: float, src_short: int,
               cfg: IngestConfig) -> dict:
    """A ShotStream event -> its candidate row; `first`: the task's first output frame in the file (0, or where
    its time range starts), so start frames and times are the file's."""
    source = row["source"]
    strip = thumb_strip if cfg.contact_sheet_tiles else (lambda thumbs: b"")
    if event[0] == "short":
        _, shot, start, length, thumbs = event
        start += first
        return {**_reject_row(source, f"{key}-s{shot:03d}", "too_short",
                           f"shot of {length} frames at {cfg.fps:g} fps; a clip needs {cfg.clip_frames}"
                           + (f" plus {cfg.shot_trim_frames} trimmed at each end of the shot" if cfg.shot_trim_frames
                              else ""),
                           shot, start, length), "thumb": strip(thumbs)}
    _, shot, k, start, clip, thumbs = event
    start += first
    clip_id = f"{key}-{start:07d}"
    scores = clip_scores(clip, thumbs=thumbs)
    reason = None
    if scores["black_fraction"] > cfg.black_max_fraction:
        reason = ("black", f"{scores['black_fraction']:.0%} of frames are black")
    elif scores["blank_fraction"] > cfg.blank_max_fraction:
        reason = ("blank", f"{scores['blank_fraction']:.0%} of frames are one flat colour")
    elif scores["motion_score"] < cfg.static_threshold:
        reason = ("static", f"motion score {scores['motion_score']:.3f} < {cfg.static_threshold}")
    measured = {k: scores[k] for k in ("motion_score", "black_fraction", "blank_fraction")}
    if reason:  # the scores go with the reject: report.json's histograms show where the thresholds cut
        return {**_reject_row(source, clip_id, *reason, shot, start, len(clip)), "thumb": strip(thumbs), **measured}
    base = resize_center_crop(clip, cfg.size)
    # the high-resolution copy is only worth keeping when the source has that resolution
    hr = resize_center_crop(clip, cfg.hr_size) if cfg.hr_size and src_short >= cfg.hr_size else None
    return {
        "status": "ok", "clip_id": clip_id, "source": source, "shot_index": shot, "clip_index": k,
        "start_frame": start, "start_time_s": start / cfg.fps, "fps": cfg.fps,
        "num_frames": len(clip), "height": cfg.size, "width": cfg.size,
        "frames_format": cfg.frame_format, "frames": _encode(base, cfg),
        "hr_size": cfg.hr_size if hr is not None else 0,
        "hr_frames": _encode(hr, cfg) if hr is not None else b"",
        "keyframe": base[len(base) // 2].tobytes(), "caption": row["caption"],
        **measured, "brightness": scores["brightness"],
        "src_width": meta.width, "src_height": meta.height, "src_fps": src_fps,
        "src_codec": meta.codec, "thumb": strip(thumbs),
        "signature": clip_signature(thumbs).tobytes() if cfg.near_dedup == "frames" else b"",
    }
