"""Where a decode task's CPU goes: `decode_and_cut` over the photo-pan corpus of `ingest_throughput.py`, in one
process under cProfile, against a one-thread decord decode of every frame of the same files (the per-core raw
decode limit). The decoder runs in-process (decode_timeout_s=0: no helper thread, so cProfile sees it).

    python benchmarks/ingest_profile.py --set shot_detector=histogram           # 48 files, 640x360, 5.5 s
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ingest_throughput  # noqa: E402

from lumiere.storage import StorageOptions  # noqa: E402
from pipelines.ingest import stage1_list, stage2_decode  # noqa: E402
from pipelines.ingest.config import load_ingest_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--videos", type=int, default=48)
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/photo48"), help="built here once, reused after")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as in a Ray task with num_cpus=1
    corpus = argparse.Namespace(videos=args.videos, source="photo", side=160, width=640, height=360, seconds=5.5,
                                fps_list=[16, 24, 25, 30, 30000 / 1001], seed=0)
    if not (args.corpus / "records.json").exists():
        records = ingest_throughput.make_videos(args.corpus, corpus)
        (args.corpus / "records.json").write_text(json.dumps({"records": records}))
    cfg = load_ingest_config(None, ["encoder_from=small", "decode_timeout_s=0", *args.overrides])
    options = StorageOptions()
    files, _ = stage1_list.list_inputs(str(args.corpus), str(args.corpus / "captions.jsonl"), cfg, options)
    files = files[:args.videos]
    for f in files[:2]:  # warm-up: first calls into torch, decord, x264
        list(stage2_decode.decode_and_cut(dict(f), cfg, options))
    raw = ingest_throughput.raw_decode([f["source"] for f in files], 1)
    profile = cProfile.Profile()
    cpu0, wall0, clips = time.process_time(), time.perf_counter(), 0
    profile.enable()
    for f in files:
        clips += sum(r["status"] == "ok" for r in stage2_decode.decode_and_cut(dict(f), cfg, options))
    profile.disable()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(f"{len(files)} files, {raw['frames']} source frames, {clips} clips")
    print(f"raw decode, one thread: {raw['cpu_seconds']:.2f} CPU-s ({raw['cpu_seconds'] / len(files) * 1e3:.0f} ms "
          f"per file), {raw['seconds']:.2f} s")
    print(f"decode_and_cut: {cpu:.2f} CPU-s ({cpu / len(files) * 1e3:.0f} ms per file), {wall:.2f} s; "
          f"{cpu / raw['cpu_seconds']:.2f}x the raw decode's CPU")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
