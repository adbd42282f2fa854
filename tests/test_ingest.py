"""Ray Data ingestion end to end on a corpus built with PyAV in the test: exact clips and reject reasons,
shot cuts, clip length and size, frame timing, read-back, resume after SIGKILL, S3 via moto's server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import corpus
from conftest import local_s3
from lumiere.video import decode_mp4_bytes
from pipelines.ingest.config import load_ingest_config
from pipelines.ingest.job import decode_tasks, run_ingest

pytestmark = pytest.mark.timeout(600)
OVERRIDES = ["encoder_from=tiny", "shard_clips=4"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, corpus.build(root)


@pytest.fixture(scope="module")
def ingested(built, ray_session, tmp_path_factory):
    root, expected = built
    out = tmp_path_factory.mktemp("shards")
    report = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"),
                        load_ingest_config(None, OVERRIDES))
    return out, expected, report


def _clips(out: Path):
    manifest = json.loads((out / "manifest.json").read_text())
    tables = [pq.read_table(out / s["path"]) for s in manifest["shards"]]
    return [row for t in tables for row in t.to_pylist()], manifest


def test_exact_clips_and_reject_reasons(ingested):
    out, expected, report = ingested
    rows, manifest = _clips(out)
    per_source = Counter(Path(r["source"]).name for r in rows)
    assert dict(per_source) == expected["clips"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    reasons = defaultdict(list)
    for r in rejects:
        reasons[Path(r["source"]).name].append(r["reason"])
    assert {k: sorted(v) for k, v in reasons.items()} == expected["rejects"]
    assert all(r["detail"] for r in rejects)  # every reject says why in words
    assert report["clips"] == manifest["clips"] == sum(expected["clips"].values())
    assert report["rejects"] == dict(Counter(r for v in expected["rejects"].values() for r in v))
    assert report["non_video_files_ignored"] == 2  # README.txt and the caption beside.txt
    beside = [r for r in rows if Path(r["source"]).name == "beside.mp4"]
    assert beside[0]["caption"] == "a green circle moving down"  # caption from the .txt beside the video
    # one done record per video file, counting its candidates (clips + rejects + the record)
    done = [r for p in sorted((out / "done").iterdir()) for r in pq.read_table(p).to_pylist()]
    per_file = Counter(Path(r["source"]).name for r in done)
    assert set(per_file) == set(expected["clips"]) | set(expected["rejects"]) and set(per_file.values()) == {1}
    for r in done:
        name = Path(r["source"]).name
        assert r["file_candidates"] == expected["clips"].get(name, 0) + len(expected["rejects"].get(name, [])) + 1
    assert report["scores"]["motion_score"]["count"] == report["clips"] == sum(
        report["scores"]["motion_score"]["counts"])


def test_rejects_keep_their_scores_and_the_histograms_show_both_sides_of_each_threshold(ingested):
    out, expected, report = ingested
    cfg = load_ingest_config(None, OVERRIDES)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    by_reason = defaultdict(list)
    for r in rejects:
        by_reason[r["reason"]].append(r)
    # a filter's reject carries the score it failed on (and the others measured with it)
    assert by_reason["static"] and all(r["motion_score"] < cfg.static_threshold for r in by_reason["static"])
    assert by_reason["black"] and all(r["black_fraction"] > cfg.black_max_fraction for r in by_reason["black"])
    # a candidate that never reached the filters has no scores, not zeros
    never_scored = by_reason["too_short"] + by_reason["unreadable"]
    assert never_scored and all(r[k] is None for r in never_scored
                                for k in ("motion_score", "black_fraction", "blank_fraction", "clip_score"))
    scores = report["scores"]
    motion = scores["motion_score"]
    assert motion["rejected"]["static"]["count"] == len(by_reason["static"]) == sum(
        motion["rejected"]["static"]["counts"])
    assert len(motion["counts"]) == len(motion["bin_edges"]) - 1
    # the threshold falls between the two sides: the static rejects' bins lie below every accepted clip's
    top_static_bin = max(i for i, c in enumerate(motion["rejected"]["static"]["counts"]) if c)
    first_accepted_bin = min(i for i, c in enumerate(motion["counts"]) if c)
    assert motion["min"] >= cfg.static_threshold and top_static_bin <= first_accepted_bin
    black = scores["black_fraction"]
    assert black["count"] == report["clips"] and black["rejected"]["black"]["count"] == len(by_reason["black"])
    assert scores["near_dup_cosine"]["count"] == 0  # no near-duplicates in this corpus


def test_failed_files_are_listed_with_where_they_failed_in_the_report_and_the_summary(ingested):
    from pipelines.ingest.job import _print_summary

    out, expected, report = ingested
    failed = sorted(Path(f["source"]).name for f in report["failures"]["first"])
    want = sorted(name for name, reasons in expected["rejects"].items() for r in reasons
                  if r in ("unreadable", "processing_failed"))
    assert failed == want and report["failures"]["count"] == len(want) and want  # truncated, empty, text...
    # each with its reject's detail (what is wrong: "empty file", "not a readable video (InvalidDataError…)"; an
    # unexpected exception also names where it was raised: tests/test_curation.py's failure tests)
    details = {(r["source"], r["reason"]): r["detail"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert all(f["detail"] and details[(f["source"], f["reason"])] == f["detail"] for f in report["failures"]["first"])
    lines: list[str] = []
    _print_summary(report, lines.append)
    text = "\n".join(lines)
    assert f"{len(want)} failed" in text
    for f in report["failures"]["first"][:5]:
        assert f"{f['source']}: {f['reason']}: {f['detail']}" in text


def test_every_clip_has_80_frames_at_the_base_size(ingested):
    rows, manifest = _clips(ingested[0])
    assert manifest["frames_format"] == "mp4" and manifest["clip_frames"] == 80
    for r in rows:
        frames = decode_mp4_bytes(r["frames"])
        assert frames.shape == (80, 128, 128, 3) and r["num_frames"] == 80
        if Path(r["source"]).name == "fps60_hd.mp4":  # only a source of >= 256 px gets a 256 px copy
            assert r["hr_size"] == 256 and decode_mp4_bytes(r["hr_frames"]).shape == (80, 256, 256, 3)
        else:
            assert r["hr_size"] == 0 and r["hr_frames"] == b""
        assert len(r["text_pooled"]) == manifest["text_encoder"]["pooled_dim"]
        token_shape = manifest["text_encoder"]["token_shape"]
        assert len(r["text_tokens"]) == 2 * token_shape[0] * token_shape[1]  # float16
        assert -1.0 <= r["clip_score"] <= 1.0


def test_no_clip_spans_the_hard_cut(ingested):
    rows, _ = _clips(ingested[0])
    cut = sorted((r for r in rows if Path(r["source"]).name == "cut.mp4"), key=lambda r: r["start_frame"])
    # the default detector, TransNetV2, found the cut at 5.5 s × 16 fps = frame 88; the shot after it starts
    # shot_trim_frames (2) later, while the video's own first frame is no boundary and is kept
    _, manifest = _clips(ingested[0])
    assert manifest["config"]["shot_detector"] == "transnetv2" and manifest["config"]["shot_trim_frames"] == 2
    assert [r["start_frame"] for r in cut] == [0, 90]
    assert [r["shot_index"] for r in cut] == [0, 1]
    for r, background in zip(cut, (30, 200), strict=True):
        frames = decode_mp4_bytes(r["frames"]).astype(int)
        corners = frames[:, :4, :4].reshape(80, -1).mean(axis=1)  # every frame's background is its shot's
        assert np.all(np.abs(corners - background) < 20), (r["start_frame"], corners.min(), corners.max())


def test_contact_sheets_show_accepted_clips_and_each_reject_reason(ingested):
    """One PNG of accepted clips and one per reject reason; a clip-level reject's tile shows its frames (a strip
    from the thumbnails it carries), a file rejected before decoding gets a grey tile."""
    from PIL import Image

    out, expected, report = ingested
    sheets = report["contact_sheets"]
    assert set(sheets) == {"accepted", *report["rejects"]}
    sizes = {}
    for name, path in sheets.items():
        image = Image.open(out / path)
        image.load()
        sizes[name] = image.size
        assert image.width >= 4 * 192 and image.height > 64
    # the static reject's strip is the still red square: a red tile, not the grey "no frames" one
    static = np.asarray(Image.open(out / sheets["static"]).convert("RGB")).astype(int)
    tile = static[18:18 + 64, 4:4 + 192]
    assert (tile[..., 0] - tile[..., 2]).max() > 100, "no red in the static clip's tile"
    empty = np.asarray(Image.open(out / sheets["unreadable"]).convert("RGB")).astype(int)[18 + 40:18 + 64, 4:4 + 192]
    assert np.abs(empty - 90).max() < 5  # grey: no frames for a file that could not be read
    shards = [pq.read_table(out / s["path"], columns=["thumb"]) for s in _clips(out)[1]["shards"]]
    thumbs = [t for table in shards for t in table["thumb"].to_pylist()]
    assert len(thumbs) == report["clips"] and all(t[:2] == b"\xff\xd8" for t in thumbs)  # a JPEG per clip


def test_frame_timing_picks_the_nearest_source_frame(ingested):
    rows, _ = _clips(ingested[0])
    (r,) = [r for r in rows if Path(r["source"]).name == "timing30.mp4"]
    assert r["fps"] == 16 and r["start_time_s"] == r["start_frame"] / 16
    frames = decode_mp4_bytes(r["frames"]).astype(int)
    levels = frames[:, 1:7, 1:7].mean(axis=(1, 2, 3))  # the counter patch (scaled 128 -> 128: unchanged)
    src = np.floor((r["start_frame"] + np.arange(80)) * 30 / 16 + 0.5).astype(int)
    assert np.abs(levels - (8 * src) % 256).max() < 4


def test_shards_read_back_with_pyarrow_and_ray_data(ingested, ray_session):
    import ray

    out = ingested[0]
    rows, manifest = _clips(out)
    ds = ray.data.read_parquet([str(out / s["path"]) for s in manifest["shards"]])
    assert ds.count() == len(rows) == manifest["clips"]
    assert {"clip_id", "frames", "caption", "text_tokens", "text_pooled", "image_embedding"} <= set(ds.schema().names)
    assert len({r["clip_id"] for r in rows}) == len(rows)


def test_rerun_is_a_no_op(built, ingested, ray_session):
    root, _ = built
    out, _, _ = ingested
    before = sorted(p.name for p in (out / "shards").iterdir())
    report = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"),
                        load_ingest_config(None, OVERRIDES))
    assert report["this_run"]["clips_written"] == 0
    assert sorted(p.name for p in (out / "shards").iterdir()) == before


def test_a_retried_write_task_overwrites_its_part_instead_of_duplicating_it(tmp_path):
    """Ray retries a write task whose worker died after the write: the same batch gets the same part name."""
    from lumiere.storage import StorageOptions
    from pipelines.ingest.stage4_write import write_shard

    def batch(ids):
        n = len(ids)
        return {"status": np.array(["reject"] * n), "clip_id": np.array(ids), "source": np.array(["s.mp4"] * n),
                "file_id": np.array(["f"] * n), "file_candidates": np.array([n] * n),
                "reason": np.array(["static"] * n), "detail": np.array(["d"] * n), "num_frames": np.array([0] * n)}

    for _ in range(3):  # the first attempt and two retries
        write_shard(batch(["c2", "c1"]), str(tmp_path), StorageOptions())
    write_shard(batch(["c3"]), str(tmp_path), StorageOptions())  # other clips: a part of their own
    parts = sorted((tmp_path / "rejects").glob("part-*.parquet"))
    ids = [i for p in parts for i in pq.read_table(p)["clip_id"].to_pylist()]
    assert len(parts) == 2 and sorted(ids) == ["c1", "c2", "c3"], (parts, ids)


def test_resume_with_a_different_config_is_refused_naming_the_keys(built, ingested):
    """A re-run with other settings used to skip the done files and write its config into the manifest over the old
    shards (so training's encoder check passed on mismatched embeddings)."""
    from lumiere.errors import LumiereError

    root, _ = built
    out, _, _ = ingested
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(LumiereError) as e:
        run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"),
                   load_ingest_config(None, [*OVERRIDES, "fps=8", "cut_threshold=0.3"]))
    msg = str(e.value)
    assert "fps: 16.0 -> 8.0" in msg and "cut_threshold: 0.5 -> 0.3" in msg and "new --output" in msg, msg
    assert "\n" not in msg and (out / "manifest.json").read_bytes() == manifest  # nothing was touched
    with pytest.raises(LumiereError, match="--captions"):
        run_ingest(str(root / "videos"), str(out), None, load_ingest_config(None, OVERRIDES))
    # how the work is spread (and where sources are cached) is not part of it: a resume may change it
    report = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"),
                        load_ingest_config(None, [*OVERRIDES, "embed_batch_size=8", "decode_files_per_task=1",
                                                  "source_cache_bytes=1000000000", "contact_sheet_tiles=8"]))
    assert report["this_run"]["clips_written"] == 0


def test_a_changed_config_can_write_to_its_own_output_and_find_it_again(built, ingested):
    root, _ = built
    out, _, _ = ingested
    manifest = (out / "manifest.json").read_bytes()
    cfg = load_ingest_config(None, [*OVERRIDES, "static_threshold=0.05"])
    first = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"), cfg, limit=2,
                       new_output_on_change=True)
    new_out = Path(first["output"])
    assert new_out != out and new_out.name.startswith(out.name + "-") and new_out.is_dir()
    assert json.loads((new_out / "manifest.json").read_text())["config_hash"] == new_out.name.rsplit("-", 1)[1]
    assert first["this_run"]["clips_written"] > 0 and (out / "manifest.json").read_bytes() == manifest
    again = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"), cfg, limit=2,
                       new_output_on_change=True)
    assert again["output"] == first["output"] and again["this_run"]["clips_written"] == 0


def test_every_part_is_stamped_and_a_part_of_another_config_is_refused(ingested, built, tmp_path):
    from lumiere.errors import LumiereError
    from pipelines.ingest.stage4_write import STAMP_CONFIG, STAMP_ENCODER

    root, _ = built
    out, _, _ = ingested
    manifest = json.loads((out / "manifest.json").read_text())
    parts = sorted(p for folder in ("shards", "rejects", "done") for p in (out / folder).glob("part-*.parquet"))
    stamps = Counter((pq.read_schema(p).metadata[STAMP_CONFIG].decode(), pq.read_schema(p).metadata[STAMP_ENCODER]
                      .decode()) for p in parts)
    assert stamps == Counter({(manifest["config_hash"], manifest["text_encoder"]["fingerprint"]): len(parts)})
    # a copy of the output whose ingest-config.json agrees, but one done part was written with another config
    # (e.g. by a second job started with other settings before the record existed): a resume refuses it
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted((copy / "done").glob("part-*.parquet"))[0]
    table = pq.read_table(victim)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, STAMP_CONFIG: b"0123456789abcdef"}),
                   victim)
    with pytest.raises(LumiereError, match=r"holds 1 parts made with another ingest config \(0123456789abcdef"):
        run_ingest(str(root / "videos"), str(copy), str(root / "captions.jsonl"),
                   load_ingest_config(None, OVERRIDES))


def test_a_resume_whose_encoder_resolves_differently_is_refused_before_it_writes(ingested, built, tmp_path):
    """The config names its encoder (`encoder_from`); what the name resolves to can change between runs (the named
    config's text section, weights at a local path) with the config hash unchanged. A resume used to pass the start
    check, write new parts and only then fail in finalize, leaving an output that could never finalize."""
    from lumiere.errors import LumiereError
    from pipelines.ingest.stage4_write import STAMP_ENCODER

    root, _ = built
    out, _, _ = ingested
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for part in (copy / "shards").glob("part-*.parquet"):  # as if embedded by another encoder under the same name
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({**table.schema.metadata, STAMP_ENCODER: b"other-encoder"}),
                       part)
    sorted((copy / "done").glob("part-*.parquet"))[0].unlink()  # a file left to do: the resume has work to write
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    with pytest.raises(LumiereError) as e:
        run_ingest(str(root / "videos"), str(copy), str(root / "captions.jsonl"), load_ingest_config(None, OVERRIDES))
    msg = str(e.value)
    assert "parts made with another text encoder (other-encoder, not " in msg and "\n" not in msg, msg
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # nothing written


def test_a_limited_run_on_a_finished_output_keeps_the_whole_manifest(ingested, built, tmp_path):
    """`--limit 1` on an output that already holds every file used to rewrite manifest.json for that one file."""
    root, _ = built
    out, _, _ = ingested
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    full = json.loads((out / "manifest.json").read_text())
    report = run_ingest(str(root / "videos"), str(copy), str(root / "captions.jsonl"),
                        load_ingest_config(None, OVERRIDES), limit=1)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert report["this_run"]["clips_written"] == 0
    assert (manifest["files"], manifest["clips"], manifest["shards"]) == (full["files"], full["clips"], full["shards"])


def _fingerprint(out: Path) -> list[tuple[str, str]]:
    """(clip id, frames hash) per clip row, sorted: a clip written twice appears twice (a dict would hide it)."""
    rows, _ = _clips(out)
    return sorted((r["clip_id"], hashlib.sha1(r["frames"]).hexdigest()) for r in rows)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_clean_clip_set(built, ingested, ray_session, tmp_path):
    import ray

    root, _ = built
    clean = _fingerprint(ingested[0])
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cli.main", "ingest", "--input", str(root / "videos"), "--output", str(out),
           "--captions", str(root / "captions.jsonl"), "--address", ray.get_runtime_context().gcs_address,
           "--set", "encoder_from=tiny", "--set", "shard_clips=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "shards").exists() and any((out / "shards").glob("part-*.parquet")):  # a committed part, not a temp
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-run"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run, between shard commits
    proc.wait()
    assert not (out / "manifest.json").exists()
    partial = set(_committed_ids(out))
    assert 0 < len(partial)
    (out / "shards" / ".tmp-torn-write").write_bytes(b"half a parquet file")  # a write cut short
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    after = _fingerprint(out)
    ids = [i for i, _ in after]
    assert all(ids.count(i) == 1 for i in ids), [i for i in set(ids) if ids.count(i) > 1]  # nothing duplicated
    assert after == clean  # same clips, same frames: nothing lost
    manifest = json.loads((out / "manifest.json").read_text())
    clean_manifest = json.loads((ingested[0] / "manifest.json").read_text())
    assert sum(s["clips"] for s in manifest["shards"]) == sum(s["clips"] for s in clean_manifest["shards"]) == len(ids)
    assert not (out / "shards" / ".tmp-torn-write").exists()


WORKER_SAYS = """
import sys, time
import ray
from pipelines.ingest.job import _init_ray

_init_ray(sys.argv[1])

@ray.remote
def task():
    sys.stderr.write("[ingest] /videos/bad.mp4: processing_failed (a worker's traceback)\\n")

ray.get(task.remote())
time.sleep(5)  # Ray's log monitor forwards worker output asynchronously
"""


def test_a_workers_output_reaches_the_drivers_log(ray_session):
    """On a cluster the driver's output is the job's log, the only one a data engineer reads: a decode task's
    traceback (`stage2_decode.failure_detail` writes it to the worker's stderr; tests/test_curation.py checks that)
    must appear there. The driver `lumiere ingest --address` starts (`_init_ray`) asks Ray to forward it."""
    import ray

    proc = subprocess.run([sys.executable, "-c", WORKER_SAYS, ray.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "[ingest] /videos/bad.mp4: processing_failed (a worker's traceback)" in proc.stdout + proc.stderr, (
        proc.stdout + proc.stderr)


def _committed_ids(out: Path):
    for p in (out / "shards").glob("part-*.parquet"):
        yield from pq.read_table(p, columns=["clip_id"])["clip_id"].to_pylist()


@pytest.mark.slow
def test_s3_input_and_output_against_a_local_s3_server(built, ray_session, tmp_path):
    root, expected = built
    with local_s3() as (s3, options):
        s3.create_bucket(Bucket="corpus")
        names = ["fps25.mp4", "cut.mp4", "text.mp4", "beside.mp4", "beside.txt"]
        for name in names:
            s3.upload_file(str(root / "videos" / name), "corpus", f"raw/{name}")
        s3.upload_file(str(root / "captions.jsonl"), "corpus", "captions.jsonl")
        report = run_ingest("s3://corpus/raw", "s3://corpus/shards", "s3://corpus/captions.jsonl",
                            load_ingest_config(None, OVERRIDES), options=options)
        assert report["clips"] == sum(expected["clips"][n] for n in names if n in expected["clips"])
        assert report["rejects"] == {"unreadable": 1}
        manifest = json.loads(s3.get_object(Bucket="corpus", Key="shards/manifest.json")["Body"].read())
        assert manifest["clips"] == report["clips"]
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="shards/")["Contents"]}
        assert {f"shards/{s['path']}" for s in manifest["shards"]} <= keys
        assert {"shards/report.json", "shards/rejects.parquet"} <= keys


def test_sidecar_captions_match_with_a_relative_input_path(tmp_path, monkeypatch):
    """`lumiere ingest --input data/shapes --captions data/shapes/captions.jsonl`, run from the parent directory:
    the sidecar's paths are relative to the input root whether --input is relative or absolute."""
    from lumiere.storage import StorageOptions
    from pipelines.ingest.stage1_list import list_inputs

    videos = tmp_path / "data" / "shapes" / "videos"
    videos.mkdir(parents=True)
    (videos / "a.mp4").write_bytes(b"not decoded here")
    sidecar = tmp_path / "data" / "shapes" / "captions.jsonl"
    sidecar.write_text(json.dumps({"path": "videos/a.mp4", "caption": "a red square moving right"}) + "\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_ingest_config(None, [])
    for root in ("data/shapes", "data/shapes/", str(tmp_path / "data" / "shapes")):
        files, _ = list_inputs(root, "data/shapes/captions.jsonl", cfg, StorageOptions())
        assert [f["caption"] for f in files] == ["a red square moving right"], root


def test_a_bad_caption_file_or_an_oversized_file_is_that_files_reject_not_the_runs_failure(tmp_path):
    """A non-UTF-8 .txt or a malformed .json beside one video used to abort the whole run on the driver; a file over
    max_file_bytes was reported as "unreadable"."""
    from lumiere.storage import StorageOptions
    from pipelines.ingest.stage1_list import list_inputs
    from pipelines.ingest.stage2_decode import _candidates

    for name in ("latin1", "badjson", "notobject", "good", "big"):
        (tmp_path / f"{name}.mp4").write_bytes(b"x" * (64 if name != "big" else 4096))
    (tmp_path / "latin1.txt").write_bytes("une vid\xe9o".encode("latin-1"))
    (tmp_path / "badjson.json").write_text('{"caption": "unterminated')
    (tmp_path / "notobject.json").write_text('["a list"]')
    (tmp_path / "good.txt").write_text("a red square moving right\n")
    (tmp_path / "big.txt").write_text("a big file")
    cfg = load_ingest_config(None, ["max_file_bytes=1024"])
    files, skipped = list_inputs(str(tmp_path), None, cfg, StorageOptions())
    assert skipped == 5 and len(files) == 5
    by_name = {Path(f["source"]).stem: f for f in files}
    assert by_name["good"]["caption"] == "a red square moving right" and not by_name["good"]["caption_error"]
    assert "not UTF-8" in by_name["latin1"]["caption_error"]
    assert "not valid JSON" in by_name["badjson"]["caption_error"]
    assert "JSON object" in by_name["notobject"]["caption_error"]
    for name, reason in (("latin1", "bad_caption"), ("badjson", "bad_caption"), ("notobject", "bad_caption"),
                         ("big", "too_large")):
        (row,) = _candidates(by_name[name], cfg, StorageOptions())
        assert row["reason"] == reason, (name, row)
    (big,) = _candidates(by_name["big"], cfg, StorageOptions())
    assert "max_file_bytes=1024" in big["detail"]


def test_relative_paths_give_the_same_dataset(ingested, built, tmp_path, monkeypatch):
    """`lumiere ingest --input corpus/videos --output out --captions corpus/captions.jsonl` from the parent
    directory: the same clips (ids, captions) as with absolute paths, and a manifest whose shard paths resolve."""
    out_abs, _, _ = ingested
    root, _ = built
    monkeypatch.chdir(root.parent)
    out = tmp_path / "relative-out"
    run_ingest(f"{root.name}/videos", os.path.relpath(out, root.parent), f"{root.name}/captions.jsonl",
               load_ingest_config(None, OVERRIDES))
    rows, manifest = _clips(out)  # reads every shard the manifest names
    expected, _ = _clips(out_abs)
    assert sorted((r["clip_id"], r["caption"]) for r in rows) == sorted((r["clip_id"], r["caption"]) for r in expected)
    assert rows and all(not s["path"].startswith(("/", "..")) for s in manifest["shards"])


def test_decode_tasks_group_files_but_give_every_slot_work():
    """Files are grouped decode_files_per_task (4) to a task, but cut into at least two tasks per decode slot
    (the cluster's CPUs / decode_num_cpus), and never into more tasks than files. The corpus of the tests
    above (16 files on 4 CPUs) runs as 8 tasks of 2 files: the exact-clips and resume tests cover tasks of
    several files."""
    cfg = load_ingest_config(None, OVERRIDES)
    assert cfg.decode_files_per_task == 4 and cfg.decode_num_cpus == 1
    assert decode_tasks(192, cfg, {"CPU": 4}) == 48
    assert decode_tasks(16, cfg, {"CPU": 4}) == 8
    assert decode_tasks(3, cfg, {"CPU": 4}) == 3
    assert decode_tasks(1, cfg, {}) == 1
    assert decode_tasks(100, cfg.model_copy(update={"decode_num_cpus": 2.0}), {"CPU": 64}) == 64  # 32 slots
    assert decode_tasks(1000, cfg.model_copy(update={"decode_files_per_task": 1}), {"CPU": 32}) == 1000


def test_dry_run_writes_nothing_and_limit_makes_a_complete_sample(built, ray_session, tmp_path):
    from conftest import run_cli

    root, expected = built
    out = tmp_path / "sample"
    n_videos = len(set(expected["clips"]) | set(expected["rejects"]))
    proc = run_cli("ingest", "--input", str(root / "videos"), "--output", str(out), "--captions",
                   str(root / "captions.jsonl"), "--set", "encoder_from=tiny", "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{n_videos} files" in proc.stdout and "nothing written" in proc.stdout, proc.stdout
    assert not out.exists()  # not even the config record
    report = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"),
                        load_ingest_config(None, OVERRIDES), limit=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert report["files"] == manifest["files"] == 2
    rows = [r for s in manifest["shards"] for r in pq.read_table(out / s["path"]).to_pylist()]
    assert len({r["source"] for r in rows}) <= 2 and manifest["clips"] == len(rows)
    plan = run_ingest(str(root / "videos"), str(out), str(root / "captions.jsonl"),
                      load_ingest_config(None, OVERRIDES), dry_run=True)
    assert plan["already_done"] == 2 and plan["to_process"] == n_videos - 2


def test_exact_duplicates_are_rejected_pointing_at_the_kept_file_also_across_a_resume(ray_session, tmp_path):
    """Three copies of one video (one without a caption) and another video: one copy is kept (a captioned one),
    the others are `duplicate` rejects naming it; a copy added later is a duplicate of the committed original;
    dedup=none keeps every copy. Clips are counted per id (a clip written twice fails)."""
    import shutil

    from lumiere.video import write_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "b-original.mp4", corpus.moving(40, 128, 128, seed=3), fps=16)
    write_mp4(videos / "other.mp4", corpus.moving(40, 128, 128, seed=4, spec=("circle", "blue", "up")), fps=16)
    shutil.copy(videos / "b-original.mp4", videos / "c-copy.mp4")
    shutil.copy(videos / "b-original.mp4", videos / "a-copy-no-caption.mp4")  # first in order, but no caption
    for name in ("b-original", "other", "c-copy"):
        (videos / f"{name}.txt").write_text(f"caption of {name}")
    cfg = load_ingest_config(None, [*OVERRIDES, "clip_frames=16"])
    out = tmp_path / "out"
    run_ingest(str(videos), str(out), None, cfg)

    def state():
        rows, _ = _clips(out)
        rejects = pq.read_table(out / "rejects.parquet").to_pylist()
        return Counter(r["clip_id"] for r in rows), Counter(Path(r["source"]).name for r in rows), rejects

    ids, per_file, rejects = state()
    assert set(ids.values()) == {1}  # no clip twice
    assert set(per_file) == {"b-original.mp4", "other.mp4"} and per_file["b-original.mp4"] == 40 // 16
    dupes = {Path(r["source"]).name: r["detail"] for r in rejects if r["reason"] == "duplicate"}
    assert set(dupes) == {"a-copy-no-caption.mp4", "c-copy.mp4"}
    assert all("b-original.mp4" in d for d in dupes.values()), dupes
    # a copy added later ("0-…" sorts first) is a duplicate of the committed original, which stays
    shutil.copy(videos / "b-original.mp4", videos / "0-late-copy.mp4")
    (videos / "0-late-copy.txt").write_text("a late copy")
    report = run_ingest(str(videos), str(out), None, cfg)
    ids, per_file, rejects = state()
    assert set(ids.values()) == {1} and set(per_file) == {"b-original.mp4", "other.mp4"}
    late = [r for r in rejects if Path(r["source"]).name == "0-late-copy.mp4"]
    assert [r["reason"] for r in late] == ["duplicate"] and "b-original.mp4" in late[0]["detail"]
    assert report["rejected_files_by_reason"]["duplicate"] == 3
    # dedup off (exact and near): every captioned copy gives its clips
    off = tmp_path / "off"
    run_ingest(str(videos), str(off), None,
               load_ingest_config(None, [*OVERRIDES, "clip_frames=16", "dedup=none", "near_dedup=none"]))
    rows, _ = _clips(off)
    assert Counter(Path(r["source"]).name for r in rows) == {
        "0-late-copy.mp4": 2, "b-original.mp4": 2, "c-copy.mp4": 2, "other.mp4": 2}


def test_near_duplicates_across_files_and_runs_are_rejected_naming_the_kept_clip(ray_session, tmp_path):
    """A re-encoded copy of a video (other bytes: exact dedup cannot see it) gives near_duplicate rejects, one per
    clip, each naming a kept clip of the original; a different video keeps all its clips; a copy added before a
    resume is rejected against the committed clips. Clips are counted per id."""
    from lumiere.video import read_video, write_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    write_mp4(videos / "a.mp4", corpus.scene(96, 144, 256, seed=21), fps=16)
    frames, _ = read_video(videos / "a.mp4")
    write_mp4(videos / "a-reencoded.mp4", frames, fps=16, crf=30)
    write_mp4(videos / "b.mp4", corpus.scene(96, 144, 256, seed=22), fps=16)
    cfg = load_ingest_config(None, [*OVERRIDES, "missing_caption=keep", "clip_frames=32", "size=64", "min_side=64",
                                    "hr_size=null", "shot_detector=histogram"])
    out = tmp_path / "out"

    def state():
        rows, _ = _clips(out)
        rejects = pq.read_table(out / "rejects.parquet").to_pylist()
        return rows, [r for r in rejects if r["reason"] == "near_duplicate"]

    run_ingest(str(videos), str(out), None, cfg)
    rows, near = state()
    assert set(Counter(r["clip_id"] for r in rows).values()) == {1}
    per_file = Counter(Path(r["source"]).name for r in rows)
    assert per_file["b.mp4"] == 3 and per_file["a.mp4"] + per_file["a-reencoded.mp4"] == 3  # one copy's clips
    kept = {r["clip_id"] for r in rows}
    assert len(near) == 3 and all(any(k in r["detail"] for k in kept) for r in near), near
    # each reject keeps the cosine it was rejected at, as its detail says
    assert all(r["near_dup_cosine"] >= cfg.near_dedup_threshold - 1e-6
               and abs(r["near_dup_cosine"] - float(r["detail"].split()[1])) < 2e-4 for r in near)
    assert {Path(r["source"]).name for r in near} | {Path(r["source"]).name for r in rows} >= {"a.mp4",
                                                                                              "a-reencoded.mp4"}
    write_mp4(videos / "0-late.mp4", frames, fps=16, crf=24)  # sorts first; the committed clips stay kept
    run_ingest(str(videos), str(out), None, cfg)
    rows2, near2 = state()
    assert sorted(r["clip_id"] for r in rows2) == sorted(kept)
    late = [r for r in near2 if Path(r["source"]).name == "0-late.mp4"]
    assert len(late) == 3 and all(any(k in r["detail"] for k in kept) for r in late)


def test_the_inspect_pass_reports_its_progress_and_keeps_the_listing_order(built, ray_session):
    from lumiere.storage import StorageOptions
    from pipelines.ingest.job import _inspect_files

    root, _ = built
    paths = sorted((root / "videos").glob("*.mp4"))
    todo = [{"source": str(p), "size": p.stat().st_size} for p in paths]
    lines: list[str] = []
    seen = _inspect_files(todo, load_ingest_config(None, OVERRIDES), StorageOptions(), lines.append, every_s=0)
    assert [r["source"] for r in seen] == [str(p) for p in paths]
    assert all(r["content_hash"] for r in seen if r["size"]) and seen[0]["duration_s"] >= 0
    # a line per file at every_s=0, counting up to all of them, naming what is being read
    assert [line.split(": ")[1].split(",")[0] for line in lines] == [f"{i}/{len(todo)}" for i in
                                                                      range(1, len(todo) + 1)]
    assert "content hashes" in lines[0]


def test_a_long_file_is_cut_into_time_ranges_with_the_clips_of_one_task(ray_session, tmp_path):
    """A 40 s video at range_seconds=10 runs as 4 decode tasks (4 done records, each saying 4 ranges) and gives
    the clips (start frames, frames) that one task over the whole file gives, since 160-frame ranges hold whole
    32-frame clips; no clip id twice; the progress line counts file ranges."""
    from lumiere.video import write_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    video = corpus.moving(640, 96, 96, seed=5, spec=("circle", "green", "right"))
    video[:, :8, :8] = (np.arange(640) % 200)[:, None, None, None]  # a counter: every frame distinct
    write_mp4(videos / "long.mp4", video, fps=16)
    base = [*OVERRIDES, "missing_caption=keep", "clip_frames=32", "size=64", "min_side=64", "hr_size=null",
            "shot_detector=histogram", "near_dedup=none", "frame_format=raw", "static_threshold=0"]
    lines = []
    split = run_ingest(str(videos), str(tmp_path / "split"), None,
                       load_ingest_config(None, [*base, "range_seconds=10"]), log=lines.append)
    whole = run_ingest(str(videos), str(tmp_path / "whole"), None, load_ingest_config(None, base))
    assert any("file ranges 4/4" in line for line in lines), lines
    done = [r for p in sorted((tmp_path / "split" / "done").iterdir()) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["clip_id"].rsplit("-", 2)[1] for r in done) == ["r000", "r001", "r002", "r003"]
    assert {r["file_ranges"] for r in done} == {4}
    rows_split, _ = _clips(tmp_path / "split")
    rows_whole, _ = _clips(tmp_path / "whole")
    assert set(Counter(r["clip_id"] for r in rows_split).values()) == {1}
    assert split["clips"] == whole["clips"] == 20
    by_start = {r["start_frame"]: r["frames"] for r in rows_whole}
    assert sorted(by_start) == sorted(r["start_frame"] for r in rows_split)
    for r in rows_split:
        assert r["frames"] == by_start[r["start_frame"]] and r["start_time_s"] == r["start_frame"] / 16
        assert r["start_frame"] // 160 == (r["start_frame"] + 31) // 160  # no clip crosses a range edge
    rerun = run_ingest(str(videos), str(tmp_path / "split"), None,
                       load_ingest_config(None, [*base, "range_seconds=10"]))
    assert rerun["this_run"]["clips_written"] == 0 and rerun["clips"] == 20


def _s3_clip_counters(s3, options, bucket: str, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """(clip_id, the frame counter in each frame's corner) of every clip in an S3 output, sorted; a clip written
    twice appears twice."""
    import io

    out = []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/shards/")["Contents"]:
        if not obj["Key"].endswith(".parquet"):
            continue
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()),
                              columns=["clip_id", "frames", "num_frames", "height", "width"])
        for row in table.to_pylist():
            clip = np.frombuffer(row["frames"], np.uint8).reshape(row["num_frames"], row["height"], row["width"], 3)
            out.append((row["clip_id"], tuple(int(v) for v in clip[:, 1:4, 1:4, 0].mean(axis=(1, 2)).round())))
    return sorted(out)


@pytest.mark.slow
def test_the_time_ranges_of_an_s3_file_share_one_copy_per_node(ray_session, tmp_path):
    """A 40 s video on S3 at range_seconds=10 is 4 decode tasks: with the node's source cache they copy the object
    once (report.json's source_fetch counts the bytes each task fetched), without it (source_cache_bytes=0) once
    per range (remote_decode=copy); read in place by byte ranges (remote_decode=auto, the default, for a file cut
    into ranges) each range fetches about its own part, with no local copy. The clips are the same, down to which
    source frame each output frame is."""
    from lumiere.video import encode_mp4_bytes

    video = corpus.moving(640, 96, 96, seed=5, spec=("circle", "green", "right"))
    # grain, so the file's size is in its frames rather than its headers (as in real footage), and a keyframe
    # every 2 s (a camera's GOP), so a range starts decoding near its own start
    grain = np.random.default_rng(5).integers(-12, 13, video.shape)
    video = np.clip(video.astype(int) + grain, 0, 255).astype(np.uint8)
    video[:, :8, :8] = (np.arange(640) % 200)[:, None, None, None]  # a counter: every frame distinct
    (tmp_path / "long.mp4").write_bytes(encode_mp4_bytes(video, fps=16, crf=12, x264_params="keyint=32"))
    size = (tmp_path / "long.mp4").stat().st_size
    with local_s3() as (s3, options):
        s3.create_bucket(Bucket="films")
        s3.upload_file(str(tmp_path / "long.mp4"), "films", "raw/long.mp4")
        base = [*OVERRIDES, "missing_caption=keep", "clip_frames=32", "size=64", "min_side=64", "hr_size=null",
                "shot_detector=histogram", "near_dedup=none", "frame_format=raw", "static_threshold=0",
                "range_seconds=10", f"source_cache_dir={tmp_path / 'cache'}"]
        copy = [*base, "remote_decode=copy"]
        shared = run_ingest("s3://films/raw", "s3://films/shared", None, load_ingest_config(None, copy),
                            options=options)
        apart = run_ingest("s3://films/raw", "s3://films/apart", None,
                           load_ingest_config(None, [*copy, "source_cache_bytes=0"]), options=options)
        ranges = run_ingest("s3://films/raw", "s3://films/ranges", None,
                            load_ingest_config(None, [*base, "remote_read_block_bytes=16384",
                                                      f"source_cache_dir={tmp_path / 'unused'}"]), options=options)
        clips = {name: _s3_clip_counters(s3, options, "films", name) for name in ("shared", "apart", "ranges")}
    assert shared["clips"] == apart["clips"] == ranges["clips"] == 20
    assert shared["source_fetch"] == {"remote_files": 1, "remote_bytes": size, "bytes_fetched": size}
    assert apart["source_fetch"] == {"remote_files": 1, "remote_bytes": size, "bytes_fetched": 4 * size}
    assert [p.name.endswith(".mp4") for p in (tmp_path / "cache").iterdir()].count(True) == 1
    # by ranges: each task reads the index and its own packets, in 16 KiB reads (the file is a few hundred KiB)
    # (each range also reads the file's head and index, from the keyframe before its start, and a few blocks
    # past its end: ~60 KiB a range here)
    fetched = ranges["source_fetch"]["bytes_fetched"]
    assert size <= fetched < 1.5 * size, (fetched, size)  # against 4 * size for the copies of the ranges
    assert not (tmp_path / "unused").exists()  # no local copy
    assert len(clips["shared"]) == 20 and [c for c, _ in clips["shared"]] == [c for c, _ in clips["ranges"]]
    assert clips["shared"] == clips["apart"]
    for (cid, want), (_, got) in zip(clips["shared"], clips["ranges"], strict=True):
        assert np.abs(np.array(want) - np.array(got)).max() <= 3, cid  # the same source frames


def test_report_has_per_stage_timings_counted_per_file_and_part(ingested):
    out, expected, report = ingested
    # the run's own report: a later test re-runs into this output, and a resume reports the work it did itself
    timings = report["timings"]
    assert json.loads((out / "report.json").read_text())["timings"].keys() == timings.keys()
    files = len(set(expected["clips"]) | set(expected["rejects"]))
    assert timings["decode"]["count"] == files  # one value per file, from its done record
    # a write task names its part (in shards/, rejects/, done/) by its batch's ids: one name per task
    parts = {p.name for f in ("shards", "rejects", "done") for p in (out / f).iterdir() if p.suffix == ".parquet"}
    assert timings["write"]["count"] == len(parts)
    assert timings["embed"]["count"] >= 1 and timings["near_dedup"]["count"] >= 1  # near_dedup=frames, the default
    for stage in ("decode", "embed", "near_dedup", "write"):
        assert timings[stage]["total_s"] > 0 and timings[stage]["mean_s"] > 0, stage
    assert timings["decode"]["p50_s"] <= timings["decode"]["p95_s"]
    assert timings["inspect"]["files"] == files and 0 < timings["inspect"]["wall_s"] < timings["job_wall_s"]
    assert timings["job_wall_s"] > 0
