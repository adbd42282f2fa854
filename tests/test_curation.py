"""Ingestion stages without Ray: shot cuts, filters, crops, captions, timeouts, the embedding actor."""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import corpus
from lumiere.storage import StorageOptions
from lumiere.video import decode_mp4_bytes, encode_mp4_bytes
from pipelines.ingest.config import IngestConfig, load_ingest_config
from pipelines.ingest.curation import (
    Reject,
    clip_scores,
    decode_with_timeout,
    probe,
    resample_indices,
    resize_center_crop,
    shot_boundaries,
)
from pipelines.ingest.stage1_list import list_inputs
from pipelines.ingest.stage2_decode import decode_and_cut
from pipelines.ingest.stage3_embed import CaptionEmbedder

CFG = load_ingest_config(None, ["encoder_from=tiny"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, corpus.build(root)


def _cands(row, cfg, options=None) -> list[dict]:
    """decode_and_cut's candidates (clips and rejects), without the file's done record (checked on its own)."""
    rows = list(decode_and_cut(row, cfg, options or StorageOptions()))
    done = [r for r in rows if r["status"] == "done"]
    assert len(done) == 1 and rows[-1] is done[0] and done[0]["file_candidates"] == len(rows)
    return rows[:-1]


def _file(root, name, caption="a caption"):
    path = root / "videos" / name
    return {"source": str(path), "size": path.stat().st_size, "caption": caption, "has_caption": bool(caption)}


@pytest.mark.parametrize("src_fps", [24, 25, 30000 / 1001, 30, 60])
def test_resampling_picks_nearest_source_frame(src_fps):
    idx = resample_indices(int(src_fps * 10), src_fps, 16)
    t_out = np.arange(len(idx)) / 16
    assert np.all(np.abs(idx / src_fps - t_out) <= 0.5 / src_fps + 1e-9)
    assert len(idx) == 160


def test_resample_by_time_is_resample_indices_at_a_constant_rate_and_nearest_by_time_otherwise():
    from pipelines.ingest.curation import resample_by_time

    for src_fps in (24.0, 25.0, 30000 / 1001, 30.0, 60.0, 12.0):
        n = int(src_fps * 7) + 3
        starts = np.arange(n) / src_fps
        assert np.array_equal(resample_by_time(starts, n / src_fps, 16), resample_indices(n, src_fps, 16)), src_fps
    # 2 s at 30 fps, then 4 s at 10 fps: each output time gets the source frame shown nearest it
    starts = np.concatenate([np.arange(60) / 30, 2 + np.arange(40) / 10])
    idx = resample_by_time(starts, 6.0, 16)
    t = np.arange(len(idx)) / 16
    assert len(idx) == 96
    nearest = np.abs(starts[None, :] - t[:, None]).min(axis=1)
    assert np.allclose(np.abs(starts[idx] - t), nearest)
    assert idx[16] == 30 and idx[48] == 70  # t = 1 s is frame 30; t = 3 s is frame 60 + 10


def _write_video(path, frames, times_ms=None, fps=30, rotation=0, sample_aspect=None):
    """frames (t h w c) with PyAV: at presentation times `times_ms` (variable rate) or at `fps`; a display
    rotation (counter-clockwise degrees) and a sample aspect ratio in the stream when given."""
    import fractions

    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "12"}
        if times_ms is not None:
            stream.codec_context.time_base = stream.time_base = fractions.Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        if sample_aspect:
            stream.codec_context.sample_aspect_ratio = fractions.Fraction(sample_aspect)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = int(times_ms[i]), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _ingest_one(path, **overrides) -> list[dict]:
    """decode_and_cut over one local file (no Ray), raw frames, the histogram detector: its candidate rows."""
    cfg = IngestConfig(**{"clip_frames": 16, "size": 64, "min_side": 64, "hr_size": None, "frame_format": "raw",
                          "shot_detector": "histogram", "encoder_from": "tiny", **overrides})
    row = {"source": str(path), "size": os.path.getsize(path), "caption": "x", "has_caption": True}
    return list(decode_and_cut(row, cfg, StorageOptions()))


def test_variable_frame_rate_source_is_sampled_by_presentation_time(tmp_path):
    """A phone-style variable-rate file (2 s at 30 fps, then 4 s at 10 fps; a patch codes each source frame's
    index): every 16 fps output frame is the source frame shown nearest its time. Index × average rate (17 fps
    here) was up to 0.45 s off."""
    times = np.concatenate([np.arange(60) * 1000 / 30, 2000 + np.arange(40) * 100])
    frames = np.full((len(times), 128, 128, 3), 60, np.uint8)
    for i in range(len(frames)):
        frames[i, :32, :32] = (6 * i) % 256
    _write_video(tmp_path / "vfr.mp4", frames, times_ms=times)
    rows = [r for r in _ingest_one(tmp_path / "vfr.mp4", static_threshold=0.0) if r["status"] == "ok"]
    # 95 output frames at 16 fps (the stream ends at 5.93 s: decord gives the last frame the nominal 1/30 s)
    assert len(rows) == 5
    starts = times / 1000
    for r in rows:
        clip = np.frombuffer(r["frames"], np.uint8).reshape(16, 64, 64, 3).astype(int)
        level = clip[:, 2:14, 2:14].mean(axis=(1, 2, 3))  # the patch, scaled 128 -> 64
        t = (r["start_frame"] + np.arange(16)) / 16
        want = np.argmin(np.abs(starts[None, :] - t[:, None]), axis=1)
        assert r["start_time_s"] == r["start_frame"] / 16
        assert np.all(np.abs(level - (6 * want) % 256) < 6), (r["start_frame"], level.round(), want)


def test_rotation_and_pixel_aspect_are_applied_as_a_player_shows_them(tmp_path):
    """A landscape-coded phone video with a 90° display rotation comes out portrait (left half red, right half
    blue in the stored frames -> bottom red, top blue as shown), and an anamorphic 2:1 sample aspect is widened:
    the source size in the clip rows is the displayed one, and min_side is checked against it."""
    frames = np.zeros((24, 96, 160, 3), np.uint8)
    frames[:, :, :80] = (220, 30, 30)
    frames[:, :, 80:] = (30, 30, 220)
    for i in range(24):  # a white square crossing the picture (motion: not a static clip)
        frames[i, 40:56, 20 + 5 * i:36 + 5 * i] = 255
    _write_video(tmp_path / "rot.mp4", frames, fps=16, rotation=90)
    meta = probe(str(tmp_path / "rot.mp4"))
    assert (meta.rotation, meta.width, meta.height, meta.coded_width, meta.coded_height) == (90, 96, 160, 160, 96)
    (row,) = [r for r in _ingest_one(tmp_path / "rot.mp4") if r["status"] == "ok"]
    assert (row["src_width"], row["src_height"]) == (96, 160)
    clip = np.frombuffer(row["frames"], np.uint8).reshape(16, 64, 64, 3).astype(int)
    top, bottom = clip[:, :20].mean(axis=(0, 1, 2)), clip[:, -20:].mean(axis=(0, 1, 2))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2], (top, bottom)
    ys, xs = np.nonzero(clip[10].min(axis=-1) > 200)  # the 16x16 square, 2/3 scale: still square, not squashed
    assert 9 <= np.ptp(ys) + 1 <= 13 and 9 <= np.ptp(xs) + 1 <= 13, (np.ptp(ys), np.ptp(xs))

    # 2:1 pixels: stored 80x96, shown 160x96; a square drawn 20 stored pixels wide is 40 wide as shown
    wide = np.full((24, 96, 80, 3), 40, np.uint8)
    for i in range(24):
        wide[i, 38:58, 30 + (i % 4):50 + (i % 4)] = 230
    _write_video(tmp_path / "sar.mp4", wide, fps=16, sample_aspect="2/1")
    meta = probe(str(tmp_path / "sar.mp4"))
    assert (meta.width, meta.height, meta.sample_aspect) == (160, 96, 2.0)
    from pipelines.ingest.curation import iter_resampled

    stream = iter_resampled(str(tmp_path / "sar.mp4"), 16, 96, src_size=(80, 96), geometry=(2.0, 0))
    next(stream)
    chunk = next(stream)
    assert chunk.shape[1:3] == (96, 160)
    bright = np.flatnonzero(chunk[0, 48, :, 0] > 150)
    assert 36 <= len(bright) <= 44, len(bright)  # 20 stored pixels, shown 40 wide
    too_small = _ingest_one(tmp_path / "sar.mp4", min_side=100)
    assert [r["reason"] for r in too_small if r["status"] == "reject"] == ["too_small"]
    detail = too_small[0]["detail"]  # the reject says which settings keep a source this small
    assert "160x96" in detail and "--set min_side=96 --set size=64 --set hr_size=null" in detail, detail


def test_shot_boundaries_split_at_hard_cuts_only():
    a = corpus.moving(40, 64, 64, seed=0, background=30)
    b = corpus.moving(30, 64, 64, seed=1, spec=("circle", "blue", "up"), background=200)
    assert shot_boundaries(np.concatenate([a, b]), 0.5) == [(0, 40), (40, 70)]
    assert shot_boundaries(a, 0.5) == [(0, 40)]  # motion alone is no cut


def test_clip_scores_flag_static_black_and_blank():
    moving = clip_scores(corpus.moving(32, 128, 128, seed=0))
    static = clip_scores(np.repeat(corpus.moving(1, 128, 128, seed=0), 32, axis=0))
    black = clip_scores(np.zeros((32, 64, 64, 3), np.uint8))
    blank = clip_scores(np.full((32, 64, 64, 3), 128, np.uint8))
    assert moving["motion_score"] > CFG.static_threshold > static["motion_score"]
    assert black["black_fraction"] == 1 and moving["black_fraction"] == 0
    assert blank["blank_fraction"] == 1 and blank["black_fraction"] == 0 and moving["blank_fraction"] == 0


def test_resize_center_crop_keeps_the_centre():
    frames = np.zeros((2, 100, 200, 3), np.uint8)
    frames[:, :, 50:150] = 255  # the centre square is white
    out = resize_center_crop(frames, 64)
    assert out.shape == (2, 64, 64, 3) and out[:, :, 2:-2].min() > 250  # antialiasing softens only the edge


def test_decode_timeout_is_a_reject(built, monkeypatch):
    root, _ = built
    with pytest.raises(Reject) as info:
        decode_with_timeout(str(root / "videos" / "fps60_hd.mp4"), 16, 128, timeout_s=0.001)
    assert info.value.reason == "decode_timeout"

    # ingestion's streaming decode bounds the wait for each next chunk. A 1 ms bound on the real decoder is a
    # race (a decoder holding the GIL can hand over its chunk before the waiter wakes — it failed CI once), so
    # the real decoder is slowed instead: its header and first chunk arrive, then it stalls for 20 s.
    from pipelines.ingest import curation

    real = curation.iter_resampled

    def stalls_after_the_first_chunk(*args, **kwargs):
        stream = real(*args, **kwargs)
        yield next(stream)  # (src_fps, n_src)
        yield next(stream)
        cancel = args[3] if len(args) > 3 else kwargs.get("cancel")
        for _ in range(200):  # a decoder that makes no progress, but stops when cancelled
            if cancel is not None and cancel.is_set():
                return
            time.sleep(0.1)
        yield from stream

    deadline = time.time() + 10  # the decode cancelled above may still be finishing its chunk; while it does,
    while curation._stuck_decoders() and time.time() < deadline:  # decodes take the forked-child path
        time.sleep(0.05)
    assert curation._stuck_decoders() == 0
    monkeypatch.setattr(curation, "iter_resampled", stalls_after_the_first_chunk)
    t0 = time.perf_counter()
    rows = _cands(_file(root, "fps60_hd.mp4"), CFG.model_copy(update={"decode_timeout_s": 2.0}),
                  StorageOptions())
    assert time.perf_counter() - t0 < 15  # bounded by the timeout, not by the 20 s stall
    stop = [r for r in rows if r["reason"] == "decode_timeout"]
    assert len(stop) == 1 and "made no progress for 2s" in stop[0]["detail"]
    assert rows[-1] is stop[0]  # the file's last candidate: nothing was cut after the stall


def test_a_decoder_that_never_returns_is_still_bounded(built, monkeypatch):
    """A decode stuck inside one native call (ignores cancellation): the caller still gets decode_timeout on
    time, and while the stuck thread lives later decodes go through a killed-on-timeout child process."""
    import threading
    import time

    from pipelines.ingest import curation

    release = threading.Event()

    def stuck(path, fps, short_side, cancel=None, threads=0, src_size=None, geometry=(1.0, 0)):
        release.wait(30)  # like a native call that never checks for cancellation
        raise Reject("unreadable", "released")

    root, _ = built
    path = str(root / "videos" / "fps60_hd.mp4")
    deadline = time.time() + 10  # a decode cancelled by an earlier test may still be finishing its chunk
    while curation._stuck_decoders() and time.time() < deadline:
        time.sleep(0.05)
    assert curation._stuck_decoders() == 0
    monkeypatch.setattr(curation, "decode_resampled", stuck)
    try:
        for _ in range(2):  # first: the thread path leaves a stuck thread; second: the forked child is killed
            t0 = time.perf_counter()
            with pytest.raises(Reject) as info:
                curation.decode_with_timeout(path, 16, 128, timeout_s=0.5)
            assert info.value.reason == "decode_timeout" and time.perf_counter() - t0 < 3
            assert curation._stuck_decoders() == 1
    finally:
        release.set()
    monkeypatch.undo()
    deadline = time.time() + 5
    while curation._stuck_decoders() and time.time() < deadline:
        time.sleep(0.05)
    assert curation._stuck_decoders() == 0  # the thread ended: back to in-process decoding
    frames, _, _ = curation.decode_with_timeout(path, 16, 128, timeout_s=60)
    assert frames.ndim == 4 and frames.shape[-1] == 3


def _x264_option(mp4: bytes, name: str) -> str:
    """x264 writes its settings into the stream (an SEI message), e.g. the `threads=` it ran with."""
    return re.search(rb" " + name.encode() + rb"=(\S+) ", mp4).group(1).decode()


def _x264_threads(mp4: bytes) -> int:
    return int(_x264_option(mp4, "threads"))


def test_codec_threads_change_the_cost_not_the_frames(built):
    """codec_threads (default 1: one decoder/encoder thread per Ray decode task) decodes exactly the frames
    decord's own threading decodes, and reaches x264: the shards' clips are encoded with one thread."""
    root, _ = built
    path = str(root / "videos" / "fps60_hd.mp4")
    one, fps_one, n_one = decode_with_timeout(path, 16, 128, timeout_s=60, threads=1)
    auto, fps_auto, n_auto = decode_with_timeout(path, 16, 128, timeout_s=60, threads=0)
    assert np.array_equal(one, auto) and (fps_one, n_one) == (fps_auto, n_auto)

    clip = resize_center_crop(one[:16], 128)  # x264 caps its threads by frame height: 1 at 64 px
    single = encode_mp4_bytes(clip, 16, 18, "veryfast", threads=1)
    assert _x264_threads(single) == 1 and _x264_threads(encode_mp4_bytes(clip, 16, 18, "veryfast", threads=2)) == 2
    assert np.abs(decode_mp4_bytes(single).astype(int) - clip).mean() < 3

    assert CFG.codec_threads == 1
    rows = [r for r in _cands(_file(root, "fps60_hd.mp4"), CFG, StorageOptions()) if r["status"] == "ok"]
    assert rows and all(_x264_threads(r["frames"]) == 1 for r in rows)


def test_a_probed_size_decodes_the_same_frames(built):
    """decode_and_cut passes the size PyAV's probe read to the decoder, which then opens decord once instead of
    twice: same frames, source fps and frame count as decord reading the size itself, scaled or not."""
    root, _ = built
    for name, short_side in (("fps24_wide.mp4", 128), ("fps2997.mp4", 256)):  # 256x144 scaled; 160x128 not
        path = str(root / "videos" / name)
        meta = probe(path)
        probed = decode_with_timeout(path, 16, short_side, timeout_s=60, threads=1,
                                     src_size=(meta.width, meta.height))
        itself = decode_with_timeout(path, 16, short_side, timeout_s=60, threads=1)
        assert np.array_equal(probed[0], itself[0]) and probed[1:] == itself[1:]
        unknown = decode_with_timeout(path, 16, short_side, timeout_s=60, threads=1, src_size=(0, 0))
        assert np.array_equal(unknown[0], itself[0])  # a probe without a size: decord reads it
        assert min(probed[0].shape[1:3]) == min(short_side, meta.width, meta.height)


def test_fast_x264_analysis_reaches_the_encoder_and_keeps_the_frames(built):
    """mp4_fast_analysis (default on) encodes the shards' clips with X264_FAST_ANALYSIS over the preset: x264
    reports no 8x8 inter partitions and the diamond search, and the clip decodes as close to its frames as
    the preset alone does. Off, the preset's own analysis is used."""
    root, _ = built
    fast = [r for r in _cands(_file(root, "fps60_hd.mp4"), CFG, StorageOptions()) if r["status"] == "ok"]
    plain_cfg = CFG.model_copy(update={"mp4_fast_analysis": False})
    plain = [r for r in _cands(_file(root, "fps60_hd.mp4"), plain_cfg, StorageOptions())
             if r["status"] == "ok"]
    assert CFG.mp4_fast_analysis and fast and len(fast) == len(plain)
    for f, p in zip(fast, plain, strict=True):
        for column in ("frames", "hr_frames"):
            # analyse=<intra>:<inter> partition bit masks; 0x3 = i4x4 + i8x8, with p8x8/b8x8 (0x10/0x100) only
            # in the preset's own inter mask
            assert (_x264_option(f[column], "me"), _x264_option(f[column], "analyse")) == ("dia", "0x3:0x3")
            assert _x264_option(p[column], "me") == "hex" and _x264_option(p[column], "analyse") != "0x3:0x3"
            a, b = decode_mp4_bytes(f[column]).astype(int), decode_mp4_bytes(p[column]).astype(int)
            assert a.shape == b.shape and np.abs(a - b).mean() < 1.5  # both within x264's CRF 18 of the source


def test_missing_caption_can_be_kept(built):
    root, _ = built
    keep = CFG.model_copy(update={"missing_caption": "keep"})
    rows = _cands(_file(root, "no_caption.mp4", caption=""), keep, StorageOptions())
    assert [r["status"] for r in rows] == ["ok"] and rows[0]["caption"] == ""
    rows = _cands(_file(root, "no_caption.mp4", caption=""), CFG, StorageOptions())
    assert [r["reason"] for r in rows] == ["no_caption"]


def test_candidates_share_keys_and_skip_committed_ids(built):
    root, _ = built
    rows = list(decode_and_cut(_file(root, "cut.mp4"), CFG, StorageOptions()))
    assert [r["status"] for r in rows][-1] == "done" and len(rows) == 3 and len({tuple(sorted(r)) for r in rows}) == 1
    # the count is on the done record only: a row committed without it never makes the file look done
    assert [r["file_candidates"] for r in rows] == [0, 0, 3]
    again = list(decode_and_cut({**_file(root, "cut.mp4"), "skip_ids": [rows[0]["clip_id"]]}, CFG, StorageOptions()))
    assert [r["clip_id"] for r in again] == [rows[1]["clip_id"], rows[2]["clip_id"]]
    skip_all = {**_file(root, "cut.mp4"), "skip_ids": [r["clip_id"] for r in rows]}
    assert list(decode_and_cut(skip_all, CFG, StorageOptions())) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_caption_sidecars(built, tmp_path, fmt):
    root, _ = built
    records = [{"path": "fps25.mp4", "caption": "from the sidecar"}]
    side = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        side.write_text("path,caption\nfps25.mp4,from the sidecar\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), side)
    else:
        side.write_text("\n".join(json.dumps(r) for r in records))
    files, skipped = list_inputs(str(root / "videos"), str(side), CFG, StorageOptions())
    by_name = {f["source"].rsplit("/", 1)[1]: f for f in files}
    assert by_name["fps25.mp4"]["caption"] == "from the sidecar"
    assert by_name["beside.mp4"]["caption"] == "a green circle moving down"
    assert not by_name["fps60_hd.mp4"]["has_caption"] and skipped == 2


def test_embedder_scores_and_low_clip_score_filter(built):
    root, _ = built
    rows = _cands(_file(root, "fps25.mp4"), CFG, StorageOptions())
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    out = CaptionEmbedder(CFG)(dict(batch))
    assert out["status"][0] == "ok" and -1 <= out["clip_score"][0] <= 1
    strict = CaptionEmbedder(CFG.model_copy(update={"min_clip_score": 1.5}))
    out = strict({k: v.copy() for k, v in batch.items()})
    assert out["status"][0] == "reject" and out["reason"][0] == "low_clip_score"


@pytest.mark.parametrize("chunk", [1, 7, 40, 64])
def test_shot_stream_cuts_and_clips_exactly_as_the_whole_video_does(chunk):
    """Streaming in chunks of any size (a cut landing on a chunk's first frame included, chunk 40) gives the same
    shots, clips (frames and ids) and too-short rejects as shot_boundaries over the whole array."""
    from pipelines.ingest.shots import ShotStream

    shots = [corpus.moving(40, 64, 64, seed=0, background=30),
             corpus.moving(10, 64, 64, seed=1, spec=("circle", "blue", "up"), background=200),
             corpus.moving(37, 64, 64, seed=2, spec=("triangle", "green", "left"), background=90)]
    video = np.concatenate(shots)
    clip_frames = 16
    want_clips, want_short = [], []
    for shot, (a, b) in enumerate(shot_boundaries(video, 0.5)):
        if (b - a) // clip_frames == 0:
            want_short.append((shot, a, b - a))
        want_clips += [(shot, k, a + k * clip_frames) for k in range((b - a) // clip_frames)]
    assert want_short == [(1, 40, 10)] and len(want_clips) == 4  # the corpus has what the test is about
    stream = ShotStream(clip_frames, 0.5)
    events = []
    for i in range(0, len(video), chunk):
        events += stream.push(video[i:i + chunk])
    events += stream.finish()
    clips = [e for e in events if e[0] == "clip"]
    assert [(s, k, start) for _, s, k, start, _, _ in clips] == want_clips
    assert [e[1:4] for e in events if e[0] == "short"] == want_short
    for _, _, _, start, frames, _ in clips:
        assert np.array_equal(frames, video[start:start + clip_frames])


def _events(stream, video: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, len(video), chunk):
        events += stream.push(video[i:i + chunk])
    return events + stream.finish()


def test_shot_stream_trims_frames_at_detected_boundaries_only():
    """trim=3: no clip starts within 3 frames after a cut or ends within 3 frames before it, while the video's own
    first and last frames (no boundary) are used."""
    from pipelines.ingest.shots import ShotStream

    a = corpus.moving(35, 64, 64, seed=0, background=30)
    b = corpus.moving(35, 64, 64, seed=1, spec=("circle", "blue", "up"), background=200)
    video = np.concatenate([a, b])  # one cut, before frame 35
    clips = [e for e in _events(ShotStream(16, 0.5, trim=3), video, 9) if e[0] == "clip"]
    # shot 0: frames 0..31 usable (32 = 35 - 3) -> clips at 0 and 16; shot 1: 38..69 -> clips at 38 and 54
    assert [(s, start) for _, s, _, start, _, _ in clips] == [(0, 0), (0, 16), (1, 38), (1, 54)]
    for _, _, _, start, frames, _ in clips:
        assert np.array_equal(frames, video[start:start + 16])
    untrimmed = [e for e in _events(ShotStream(16, 0.5, trim=0), video, 9) if e[0] == "clip"]
    assert [start for _, _, _, start, _, _ in untrimmed] == [0, 16, 35, 51]


def test_transnetv2_streamed_is_the_whole_video_prediction_and_finds_what_histograms_miss():
    """The learned detector over chunks of any size gives the package's whole-video probabilities exactly; on a
    video with a hard cut and a dissolve it marks both, where the colour histogram misses the dissolve (it changes
    the palette gradually), and no clip it lets through spans either."""
    import torch

    from pipelines.ingest.shots import (
        CUT,
        TRANSITION,
        HistogramCuts,
        ShotStream,
        TransNetV2Cuts,
        _transnet_input,
        load_transnetv2,
    )

    deterministic = torch.are_deterministic_algorithms_enabled()
    video, spans = corpus.transitions_video(48, ["cut", "dissolve"], transition_frames=12, seed=3)
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # loading changed no global setting
    single, every = load_transnetv2().predict_frames(_transnet_input(video), quiet=True)
    want = np.maximum(single.numpy(), every.numpy())
    for chunk in (7, 64):
        detector = TransNetV2Cuts(0.5)
        detector.keep_probabilities = True
        labels = np.concatenate([detector.push(video[i:i + chunk]) for i in range(0, len(video), chunk)]
                                + [detector.finish()])
        assert len(labels) == len(video)
        np.testing.assert_allclose(np.concatenate(detector.probabilities), want, atol=1e-6)
    boundary = np.flatnonzero(labels != 0)
    for a, b in spans:
        assert any(a - 2 <= i <= b + 2 for i in boundary), (a, b, boundary)
    assert set(labels[labels != 0]) <= {CUT, TRANSITION}
    hist = HistogramCuts(0.5)
    from pipelines.ingest.curation import thumbnails

    cuts = np.flatnonzero(hist.push(video, thumbnails(video)))
    (a, b) = spans[1]
    assert not any(a - 2 <= i <= b + 2 for i in cuts), cuts  # the baseline misses the dissolve
    clips = [e for e in _events(ShotStream(16, detector=TransNetV2Cuts(0.5), trim=2), video, 64) if e[0] == "clip"]
    assert len(clips) >= 3
    for _, _, _, start, _, _ in clips:
        assert not any(start <= b and a <= start + 15 for a, b in spans), (start, spans)


def _write_long_video(path, seconds: int, fps: int = 16, size=(320, 240)) -> None:
    """A moving-square video encoded frame by frame (the test process never holds the whole video either)."""
    import av

    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        frame = np.zeros((h, w, 3), np.uint8)
        for i in range(seconds * fps):
            frame[:] = 40
            x = (i * 3) % (w - 40)
            frame[100:140, x:x + 40] = (220, 60, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


_PEAK_MEMORY = """
import json, resource, sys, tracemalloc
from lumiere.storage import StorageOptions
from pipelines.ingest.config import IngestConfig, load_ingest_config
from pipelines.ingest.stage2_decode import decode_and_cut
cfg = load_ingest_config(None, ["encoder_from=tiny", "clip_frames=32"])
row = {"source": sys.argv[1], "size": 1, "caption": "a red square moving right", "has_caption": True}
tracemalloc.start()
rows = [{k: r[k] for k in ("status", "reason", "num_frames")} for r in decode_and_cut(row, cfg, StorageOptions())]
print(json.dumps({"peak_mb": tracemalloc.get_traced_memory()[1] / 2**20, "rows": rows,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.timeout(300)
def test_decode_memory_does_not_grow_with_video_length(tmp_path):
    """Peak memory of decode_and_cut (one fresh process each) on a 20 s and a 160 s 320x240 video, as the peak of
    the arrays Python holds (tracemalloc sees every numpy frame buffer: decoded chunks, clips, crops). The whole
    160 s video at the decode size is 2,560 frames x 230 KB = 590 MB, so a whole-file decode peaks there; the
    streamed decode holds a few chunks and one clip, whatever the length. (Process RSS is not asserted: the
    decoder's and torch's native buffers move it by a few hundred MB from run to run, at any length.)"""
    import subprocess
    import sys

    peaks, counts = {}, {}
    for seconds in (20, 160):
        path = tmp_path / f"long-{seconds}s.mp4"
        _write_long_video(path, seconds)
        proc = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path)], capture_output=True, text=True,
                              timeout=240, cwd=str(Path(__file__).resolve().parents[1]))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[seconds] = out["peak_mb"]
        ok = [r for r in out["rows"] if r["status"] == "ok"]
        counts[seconds] = len(ok)
        assert out["rows"][-1]["status"] == "done" and all(r["num_frames"] == 32 for r in ok)
    assert counts == {20: 20 * 16 // 32, 160: 160 * 16 // 32}, counts  # every clip of both videos was made
    # measured: 86 MB at both lengths; the whole-file decode it replaced: 156 MB at 20 s, 1,125 MB at 160 s
    assert peaks[160] < 200 and peaks[160] < 1.25 * peaks[20] + 5, peaks


_SLOW_CONSUMER = """
import json, sys, time
import numpy as np
from pipelines.ingest.curation import iter_resampled, probe
path, ahead = sys.argv[1], None if sys.argv[2] == "decord" else int(sys.argv[2])
meta = probe(path)
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
stream = iter_resampled(path, 16, 240, None, 1, (meta.coded_width, meta.coded_height),
                        (meta.sample_aspect, meta.rotation), ahead_max_bytes=ahead)
next(stream)
first, peak, frames, means = None, 0.0, 0, []
for chunk in stream:
    frames += len(chunk)
    means.append(float(chunk.mean()))
    first = rss_mb() if first is None else first
    time.sleep(0.4)  # a consumer slower than the decoder, as TransNetV2 or the embedder is
    peak = max(peak, rss_mb())
print(json.dumps({"frames": frames, "growth_mb": peak - first, "means": means}))
"""


@pytest.mark.timeout(300)
def test_a_slow_consumer_does_not_let_the_decoder_run_ahead_of_it(tmp_path):
    """decord's decoder thread decodes on behind a slow consumer and holds the frames (native memory, which
    tracemalloc does not see, so RSS here): on a 160 s 320x240 video (2,560 frames x 230 KB = 590 MB at the decode
    size) forced decord's RSS grew by 550 MB on one machine and by 146 MB in the full suite on another (measured)
    behind a consumer sleeping 0.25 s per chunk; 176 MB alone there with the 0.4 s used here. With the default
    `decode_ahead_max_bytes` the file is too long for decord and PyAV decodes it on demand: RSS stays within a few
    chunks (30 MB measured), with the same frames (the same count, means within a few levels)."""
    import subprocess
    import sys

    from pipelines.ingest.curation import DECODE_AHEAD_MAX_BYTES

    path = tmp_path / "long-160s.mp4"
    _write_long_video(path, 160)
    out = {}
    for mode in ("decord", str(DECODE_AHEAD_MAX_BYTES)):
        proc = subprocess.run([sys.executable, "-c", _SLOW_CONSUMER, str(path), mode], capture_output=True,
                              text=True, timeout=240, cwd=str(Path(__file__).resolve().parents[1]))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    bounded = out[str(DECODE_AHEAD_MAX_BYTES)]
    assert out["decord"]["frames"] == bounded["frames"] == 160 * 16
    assert np.abs(np.subtract(out["decord"]["means"], bounded["means"])).max() < 3
    # the fault this guards against is real: decord holds several times what the bounded path does (a loaded
    # machine decodes ahead less, hence the margins)
    forced_mb, bounded_mb = out["decord"]["growth_mb"], bounded["growth_mb"]
    assert forced_mb > max(100, 3 * bounded_mb), (forced_mb, bounded_mb)
    assert bounded_mb < 80, bounded_mb


def test_near_duplicate_filter_rejects_copies_against_kept_clips_and_repeats_its_answers(tmp_path):
    """Re-encoded and brightened copies of a clip are near_duplicate rejects naming the kept clip, a different
    clip is kept; the same batch again (a Ray retry) gets the same answers (no clip is a duplicate of itself);
    and a new filter over an output with committed shards compares new clips with those."""
    from lumiere.video import read_video, write_mp4
    from pipelines.ingest.near_dedup import NearDuplicateFilter
    from pipelines.ingest.stage4_write import write_shard

    original = corpus.scene(40, 96, 128, seed=7)
    write_mp4(tmp_path / "a.mp4", original, fps=16)
    v, _ = read_video(tmp_path / "a.mp4")
    write_mp4(tmp_path / "a_crf32.mp4", v, fps=16, crf=32)
    write_mp4(tmp_path / "a_bright.mp4", np.clip(v.astype(int) + 30, 0, 255).astype(np.uint8), fps=16)
    write_mp4(tmp_path / "b.mp4", corpus.scene(40, 96, 128, seed=8), fps=16)

    def batch_of(*names):
        rows = [r for n in names for r in _ingest_one(tmp_path / n, clip_frames=32) if r["status"] == "ok"]
        return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}

    cfg = IngestConfig(near_dedup="frames", near_dedup_threshold=0.97, encoder_from="tiny")
    out = tmp_path / "out"
    first = NearDuplicateFilter(cfg, str(out), StorageOptions())
    batch = batch_of("a.mp4", "a_crf32.mp4", "a_bright.mp4", "b.mp4")
    result = first({k: v.copy() for k, v in batch.items()})
    rows = list(zip([Path(s).name for s in result["source"]], result["clip_id"], result["status"],
                    result["reason"], result["detail"], strict=True))
    family = [r for r in rows if r[0].startswith("a")]
    assert len(rows) == 4 and [r[2] for r in rows if r[0] == "b.mp4"] == ["ok"]
    (kept_a,) = [cid for _, cid, status, _, _ in family if status == "ok"]  # one of the three copies is kept
    for name, _, status, reason, detail in family:
        if status != "ok":
            assert reason == "near_duplicate" and kept_a in detail, (name, detail)
    again = first({k: v.copy() for k, v in batch.items()})
    assert list(again["status"]) == list(result["status"]) and list(again["detail"]) == list(result["detail"])

    # commit what was kept, then a later run's filter knows it: a new copy is rejected against the committed clip
    kept = {k: v[[s == "ok" for s in result["status"]]] for k, v in result.items()}
    kept.update(text_pooled=np.zeros((len(kept["clip_id"]), 4), np.float32),
                image_embedding=np.zeros((len(kept["clip_id"]), 4), np.float32))
    write_shard(kept, str(out), StorageOptions())
    write_mp4(tmp_path / "a_again.mp4", v, fps=16, crf=26)
    later = NearDuplicateFilter(cfg, str(out), StorageOptions())
    assert later.size == 2
    result = later(batch_of("a_again.mp4"))
    assert list(result["reason"]) == ["near_duplicate"] and kept_a in result["detail"][0]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("bits,cos_error", [(16, 0.002), (8, 0.03)])
def test_the_kept_index_turns_approximate_past_exact_max_and_still_finds_near_copies(bits, cos_error):
    """KeptIndex: exact while small; the add that passes exact_max trains a faiss IVF index on what it holds
    (positions kept in insertion order). Near copies (cosine 0.98-0.999) of kept vectors, added before and after
    the switch, are found at their own position, their cosine as exact as the storage allows (float16: < 0.002;
    8 bits at 256-d: measured 0.014); fresh vectors are not found."""
    from pipelines.ingest.near_dedup import KeptIndex

    rng = np.random.default_rng(0)
    dim = 256
    centres = _unit_rows(rng.standard_normal((40, dim)))
    kept = _unit_rows(centres[rng.integers(0, 40, 3000)] + 0.6 * rng.standard_normal((3000, dim)) / np.sqrt(dim))
    index = KeptIndex(exact_max=1000, nprobe=8, bits=bits)
    index.add(torch.from_numpy(kept[:1000]))
    assert not index.approximate and index.size == 1000
    index.add(torch.from_numpy(kept[1000:2000]))  # passes exact_max: trained on the first 1000, then these added
    assert index.approximate and index.ivf.nlist > 1 and index.size == 2000
    index.add(torch.from_numpy(kept[2000:]))
    assert index.size == 3000 and index.ivf.ntotal == 3000

    src = rng.choice(3000, 300, replace=False)  # from both sides of the switch
    target = rng.uniform(0.98, 0.999, len(src))
    noise = rng.standard_normal((len(src), dim))
    noise -= (noise * kept[src]).sum(1, keepdims=True) * kept[src]
    copies = _unit_rows(kept[src] * target[:, None] + _unit_rows(noise) * np.sqrt(1 - target**2)[:, None])
    best, where = index.search(torch.from_numpy(copies))
    assert (where.numpy() == src).mean() >= 0.99, (where.numpy() != src).sum()
    hit = where.numpy() == src
    assert np.abs(best.numpy()[hit] - target[hit]).max() < cos_error

    fresh = _unit_rows(centres[rng.integers(0, 40, 300)] + 0.6 * rng.standard_normal((300, dim)) / np.sqrt(dim))
    best, _ = index.search(torch.from_numpy(fresh))
    exact = (fresh @ kept.T).max(1)
    assert exact.max() < 0.95 and (best.numpy() < 0.97).all()


def test_the_approximate_index_is_rebuilt_with_more_cells_as_it_grows_and_keeps_every_position():
    """Past the switch the IVF cells are retrained each time the index has grown retrain_growth-fold: 240 vectors
    at the switch (exact_max 200), then 4x and 16x that -> two rebuilds, each with ~2·sqrt(n) cells (more than
    before). After them every held vector is still found at its own insertion position (positions survive the
    re-adds) and the cells are balanced: no cell holds more than 8x its share, as cells
    trained on the first 240 vectors of a corpus whose later vectors come from other clusters would. (16-bit:
    8-bit indexes are not rebuilt, see KeptIndex.add.)"""
    from pipelines.ingest.near_dedup import KeptIndex

    bits = 16
    rng = np.random.default_rng(2)
    dim = 64
    centres = _unit_rows(rng.standard_normal((64, dim)))
    # the first vectors come from 4 clusters only; later ones from all 64 (a corpus whose sources change)
    early = _unit_rows(centres[rng.integers(0, 4, 240)] + 0.5 * rng.standard_normal((240, dim)) / np.sqrt(dim))
    late = _unit_rows(centres[rng.integers(0, 64, 3600)] + 0.5 * rng.standard_normal((3600, dim)) / np.sqrt(dim))
    kept = np.concatenate([early, late])
    index = KeptIndex(exact_max=200, nprobe=4, bits=bits, retrain_growth=4)
    cells = []
    for start in range(0, len(kept), 120):
        index.add(torch.from_numpy(kept[start:start + 120]))
        if index.approximate and (not cells or cells[-1] != index.ivf.nlist):
            cells.append(index.ivf.nlist)
    assert index.size == index.ivf.ntotal == 3840
    assert cells == [KeptIndex._cells(240), KeptIndex._cells(960), KeptIndex._cells(3840)], cells
    assert cells[0] < cells[1] < cells[2]

    best, where = index.search(torch.from_numpy(kept))
    assert (where.numpy() == np.arange(len(kept))).mean() >= 0.99
    assert best.numpy().min() > 0.97
    sizes = np.array([index.ivf.get_list_size(c) for c in range(index.ivf.nlist)])
    assert sizes.max() <= 8 * len(kept) / index.ivf.nlist, sizes.max()

    stale = KeptIndex(exact_max=200, nprobe=4, bits=bits, retrain_growth=float("inf"))  # the control: no rebuild
    for start in range(0, len(kept), 120):
        stale.add(torch.from_numpy(kept[start:start + 120]))
    stale_sizes = np.array([stale.ivf.get_list_size(c) for c in range(stale.ivf.nlist)])
    assert stale.ivf.nlist == cells[0] and stale_sizes.max() > 8 * len(kept) / index.ivf.nlist


def test_the_kept_index_with_exact_max_0_is_approximate_from_its_first_add():
    """near_dedup_exact_max=0 (the config allows it): the first batch trains the index on itself, so the first
    add and search work, and a copy in a later batch is found."""
    from pipelines.ingest.near_dedup import KeptIndex

    rng = np.random.default_rng(3)
    kept = _unit_rows(rng.standard_normal((300, 32)))
    index = KeptIndex(exact_max=0, nprobe=4)
    index.add(torch.from_numpy(kept[:50]))
    assert index.approximate and index.size == 50
    index.add(torch.from_numpy(kept[50:]))
    best, where = index.search(torch.from_numpy(kept[[7, 120, 299]]))
    assert where.tolist() == [7, 120, 299] and best.min() > 0.99


def test_the_near_duplicate_filter_rejects_copies_once_its_index_is_approximate(tmp_path):
    """The filter with near_dedup_exact_max=200 over 600 distinct clips and 60 near copies of them: after the
    switch every copy is a near_duplicate reject naming its own original, every distinct clip is kept (counted
    per id), and the batches again (a Ray retry) get the same answers."""
    from pipelines.ingest.near_dedup import NearDuplicateFilter

    rng = np.random.default_rng(1)
    dim = 1536
    centres = _unit_rows(rng.standard_normal((30, dim)))
    originals = _unit_rows(centres[rng.integers(0, 30, 600)] + 0.6 * rng.standard_normal((600, dim)) / np.sqrt(dim))
    copies = _unit_rows(originals[:60] + 0.1 * rng.standard_normal((60, dim)) / np.sqrt(dim))  # cosine ~0.995
    vectors = np.concatenate([originals, copies])
    ids = [f"orig-{i:03d}" for i in range(600)] + [f"copy-{i:03d}" for i in range(60)]

    def batch(rows):
        return {"status": np.array(["ok"] * len(rows), dtype=object),
                "clip_id": np.array([ids[i] for i in rows], dtype=object),
                "source": np.array([f"/v/{ids[i]}.mp4" for i in rows], dtype=object),
                "reason": np.array([""] * len(rows), dtype=object),
                "detail": np.array([""] * len(rows), dtype=object),
                "signature": np.array([vectors[i].astype(np.float16).tobytes() for i in rows], dtype=object)}

    cfg = IngestConfig(near_dedup="frames", near_dedup_exact_max=200, near_dedup_nprobe=8, encoder_from="tiny")
    filt = NearDuplicateFilter(cfg, str(tmp_path / "out"), StorageOptions())
    order = list(range(600)) + list(range(600, 660))  # every original first, the copies after the switch
    batches = [order[i:i + 64] for i in range(0, len(order), 64)]
    results = [filt(batch(rows)) for rows in batches]
    assert filt.index.approximate and filt.size == 600
    status = Counter()
    for res in results:
        for cid, st, reason, detail in zip(res["clip_id"], res["status"], res["reason"], res["detail"], strict=True):
            status[(cid.split("-")[0], st)] += 1
            if cid.startswith("copy"):
                assert reason == "near_duplicate" and f"clip orig-{cid.split('-')[1]} " in detail, (cid, detail)
    assert status == Counter({("orig", "ok"): 600, ("copy", "reject"): 60}), status
    again = [filt(batch(rows)) for rows in batches]
    assert [list(r["detail"]) for r in again] == [list(r["detail"]) for r in results] and filt.size == 600


def test_long_files_are_split_into_time_ranges_and_a_resume_knows_each_range():
    """split_into_ranges: a 35 s file at range_seconds=10 -> 4 tasks over output frames [0,160) [160,320)
    [320,480) [480, end); a short file, or one rejected before decoding, stays one task. The committed state
    tells a range done only when its done record and every candidate it counts are committed, and a file done
    only when all its ranges are."""
    import pyarrow as pa

    from pipelines.ingest.job import _committed_state, is_done, range_is_done
    from pipelines.ingest.stage1_list import split_into_ranges

    cfg = IngestConfig(range_seconds=10, fps=16, encoder_from="tiny")
    row = {"source": "/v/long.mp4", "size": 1, "has_caption": True, "duration_s": 35.0}
    ranges = split_into_ranges(row, cfg)
    assert [(r["range_index"], r["ranges"], r["range_first"], r["range_end"]) for r in ranges] == [
        (0, 4, 0, 160), (1, 4, 160, 320), (2, 4, 320, 480), (3, 4, 480, -1)]
    assert len(split_into_ranges({**row, "duration_s": 9.5}, cfg)) == 1
    assert len(split_into_ranges({**row, "duplicate_of": "/v/other.mp4"}, cfg)) == 1
    assert len(split_into_ranges({**row, "has_caption": False}, cfg)) == 1  # a no_caption reject: one task

    from pipelines.ingest.stage2_decode import done_id, range_key

    keys = [range_key(row["source"], r) for r in ranges]
    assert len(set(keys)) == 4 and all(k.endswith(f"-r{i:03d}") for i, k in enumerate(keys))

    def table(ids, counts, ranges_col=None):
        cols = {"clip_id": ids, "source": [row["source"]] * len(ids), "file_candidates": counts}
        if ranges_col is not None:
            cols["file_ranges"] = ranges_col
        return pa.table(cols)

    # ranges 0 and 1 complete (2 clips + done record each); range 2's done record without one of its clips
    ids, counts = [], []
    for r, have in ((ranges[0], 2), (ranges[1], 2), (ranges[2], 1)):
        key = range_key(row["source"], r)
        ids += [f"{key}-{i:07d}" for i in range(have)] + [done_id(row["source"], r)]
        counts += [0] * have + [3]
    state = _committed_state([table(ids, counts, [0] * (len(ids) - 3) + [4, 4, 4])])[row["source"]]
    assert [range_is_done(state, r) for r in ranges] == [True, True, False, False]
    assert not is_done(state)
    for r in ranges[2:]:
        key = range_key(row["source"], r)
        ids += [f"{key}-{i:07d}" for i in range(2)] + [done_id(row["source"], r)]
    state = _committed_state([table(ids, [0] * len(ids))])[row["source"]]
    assert not is_done(state)  # the counts come from the done records: the table above has none with a count
    full = _committed_state([table(ids, [3 if i.endswith("-done") else 0 for i in ids],
                                   [4 if i.endswith("-done") else 0 for i in ids])])[row["source"]]
    assert is_done(full) and all(range_is_done(full, r) for r in ranges)


def test_remote_decode_auto_reads_a_file_cut_into_ranges_in_place_and_copies_a_short_one():
    """remote_decode=auto (the default): the time ranges of a long S3 file read their own bytes in place (a copy per
    node would only add downloads; PyAV decodes such a file either way), a one-range file is copied for decord;
    copy and ranges are what they say for every file."""
    from pipelines.ingest.stage1_list import split_into_ranges

    auto = IngestConfig(range_seconds=10, encoder_from="tiny")
    assert auto.remote_decode == "auto"
    row = {"source": "s3://b/film.mp4", "size": 1, "has_caption": True}
    long_file, short_file = split_into_ranges({**row, "duration_s": 35.0}, auto), split_into_ranges(
        {**row, "duration_s": 9.0}, auto)
    assert [auto.reads_by_ranges(r["ranges"]) for r in long_file] == [True] * 4
    assert [auto.reads_by_ranges(r["ranges"]) for r in short_file] == [False]
    for mode, want in (("copy", False), ("ranges", True)):
        cfg = auto.model_copy(update={"remote_decode": mode})
        assert {cfg.reads_by_ranges(r["ranges"]) for r in long_file + short_file} == {want}


def test_a_file_read_in_place_by_byte_ranges_decodes_to_the_frames_of_a_local_copy(tmp_path):
    """remote_decode=ranges (pipelines/ingest/range_decode.py) against the decord path on a local copy: the same
    output frames (which source frame each is: a patch codes the frame index) for a variable frame rate, a display
    rotation and anamorphic pixels, for the whole file and for time ranges; pixels within the resize filters'
    difference. A range reads only its part of a long file, in whole blocks; a file that is not a video is
    unreadable."""
    from pipelines.ingest.curation import iter_resampled
    from pipelines.ingest.range_decode import RangeSource

    def moving(n, h, w):
        frames = np.full((n, h, w, 3), 50, np.uint8)
        for i in range(n):
            frames[i, 10:30, (3 * i) % (w - 20):(3 * i) % (w - 20) + 20] = (200, 100, 30)
            frames[i, :8, :8] = (6 * i) % 256
        return frames

    vfr = np.concatenate([np.arange(60) * 1000 / 30, 2000 + np.arange(40) * 100])
    cases = {"vfr": (moving(100, 128, 128), dict(times_ms=vfr)),
             "rot": (moving(40, 96, 160), dict(fps=16, rotation=90)),
             "sar": (moving(40, 96, 80), dict(fps=16, sample_aspect="2/1"))}
    for name, (frames, kw) in cases.items():
        path = str(tmp_path / f"{name}.mp4")
        _write_video(path, frames, **kw)
        meta = probe(path)
        remote = RangeSource(path, StorageOptions(), os.path.getsize(path), block=8192)
        assert probe(remote) == meta, name
        geometry = dict(src_size=(meta.coded_width, meta.coded_height), geometry=(meta.sample_aspect, meta.rotation))
        for frames_range in (None, (5, 23), (17, None)):
            local = list(iter_resampled(path, 16, 64, frames=frames_range, **geometry))
            ranged = list(iter_resampled(remote, 16, 64, frames=frames_range, **geometry))
            assert ranged[0] == local[0]  # (source fps, declared frames)
            a, b = np.concatenate(local[1:]).astype(int), np.concatenate(ranged[1:]).astype(int)
            assert a.shape == b.shape, (name, frames_range, a.shape, b.shape)
            assert np.abs(a - b).mean() < 3, (name, frames_range)
            if name != "rot":  # the frame-index patch, top left as stored: the same source frame for each output
                assert np.abs(a[:, 1:3, 1:3].mean(axis=(1, 2, 3)) - b[:, 1:3, 1:3].mean(axis=(1, 2, 3))).max() < 4
        remote.close()

    # a long file: the last quarter's range fetches its part, the head and the index, not the file
    grain = np.random.default_rng(0).integers(-12, 13, (320, 96, 96, 3))
    long = np.clip(moving(320, 96, 96).astype(int) + grain, 0, 255).astype(np.uint8)
    (tmp_path / "long.mp4").write_bytes(encode_mp4_bytes(long, fps=16, crf=12, x264_params="keyint=32"))
    size = os.path.getsize(tmp_path / "long.mp4")
    remote = RangeSource(str(tmp_path / "long.mp4"), StorageOptions(), size, block=16384)
    out = list(iter_resampled(remote, 16, 96, frames=(240, None), src_size=(96, 96)))
    assert sum(len(c) for c in out[1:]) == 80
    assert remote.fetched < 0.45 * size, (remote.fetched, size)
    remote.close()

    (tmp_path / "junk.mp4").write_bytes(b"\x00not a video" * 1000)
    with pytest.raises(Reject, match="not a readable video"):
        probe(RangeSource(str(tmp_path / "junk.mp4"), StorageOptions(), 12000, block=4096))


def test_a_failure_after_decoding_keeps_the_clips_before_it_and_rejects_the_rest(built, monkeypatch, capfd):
    """Post-decode work (here the clip encoder) raising on the file's second clip: the first clip is kept, the rest
    is one `processing_failed` reject naming the error and where it was raised, the done record still counts every
    candidate, and the traceback goes to stderr (the job's log)."""
    from pipelines.ingest import stage2_decode

    root, _ = built
    real, calls = stage2_decode._encode, []

    def encode(frames, cfg):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("encoder crashed")
        return real(frames, cfg)

    monkeypatch.setattr(stage2_decode, "_encode", encode)
    rows = _cands(_file(root, "fps30_two_clips.mp4"), CFG)
    clips = [r for r in rows if r["status"] == "ok"]
    rejects = [r for r in rows if r["status"] == "reject"]
    assert len(clips) == 1 and len(rejects) == 1, rows
    r = rejects[0]
    assert r["reason"] == "processing_failed" and r["clip_id"].endswith("-stop")
    assert "RuntimeError: encoder crashed (in encode, test_curation.py:" in r["detail"]
    assert "the 1 clips/shots before it are kept" in r["detail"]
    err = capfd.readouterr().err
    assert "processing_failed" in err and "Traceback" in err and "encoder crashed" in err


def test_a_file_gone_after_listing_is_an_unreadable_reject(built, tmp_path):
    root, _ = built
    path = tmp_path / "gone.mp4"
    path.write_bytes((root / "videos" / "fps25.mp4").read_bytes())
    row = {"source": str(path), "size": path.stat().st_size, "caption": "x", "has_caption": True}
    path.unlink()  # listed (its size known), then deleted before its decode task ran
    rows = _cands(row, CFG)
    assert [(r["status"], r["reason"]) for r in rows] == [("reject", "unreadable")]
    assert rows[0]["detail"].startswith("FileNotFoundError") and "gone.mp4" in rows[0]["detail"]

