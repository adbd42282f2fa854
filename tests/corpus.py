"""A small ingestion test corpus built with PyAV at test time (no binary fixtures), with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lumiere.shapes import ShapeSpec, render_clip
from lumiere.video import write_mp4


def moving(frames: int, height: int, width: int, seed: int, spec=("square", "red", "right"),
           background: int | None = None) -> np.ndarray:
    """A moving shape at any frame size: rendered on a square canvas, then cropped to h×w."""
    side = max(height, width)
    clip = render_clip([ShapeSpec(*spec)], frames, side, np.random.default_rng(seed))
    if background is not None:
        mask = clip.max(axis=-1, keepdims=True) < 40
        clip = np.where(mask, np.uint8(background), clip)
    top, left = (side - height) // 2, (side - width) // 2
    return np.ascontiguousarray(clip[:, top:top + height, left:left + width])


# name: (fps, seconds, height, width) of the plain moving videos; 80 clip frames at 16 fps = 5 s
PLAIN = {
    "fps24_wide.mp4": (24, 5.5, 144, 256),
    "fps25.mp4": (25, 5.5, 160, 160),
    "fps2997.mp4": (30000 / 1001, 5.5, 128, 160),
    "fps30_two_clips.mp4": (30, 10.5, 128, 128),
    "fps60_hd.mp4": (60, 5.5, 256, 256),  # large enough for the 256×256 high-resolution copy
}


def build(root: Path) -> dict:
    """Write the corpus under root/videos and captions under root/captions.jsonl; return expectations."""
    videos = root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i, (name, (fps, seconds, h, w)) in enumerate(PLAIN.items()):
        write_mp4(videos / name, moving(round(fps * seconds), h, w, seed=i), fps=fps)
        captions[name] = "a red square moving right"
    # a hard cut: 5.5 s of a red square on dark grey, then 5.5 s of a blue circle on light grey
    a = moving(int(16 * 5.5), 128, 128, seed=10, background=30)
    b = moving(int(16 * 5.5), 128, 128, seed=11, spec=("circle", "blue", "up"), background=200)
    write_mp4(videos / "cut.mp4", np.concatenate([a, b]), fps=16)
    captions["cut.mp4"] = "a red square then a blue circle"
    # frame timing: a 16×16 patch whose grey level codes the source frame index (8·i mod 256)
    timing = moving(180, 128, 128, seed=17)
    for i in range(len(timing)):
        timing[i, :16, :16] = (8 * i) % 256
    write_mp4(videos / "timing30.mp4", timing, fps=30)
    captions["timing30.mp4"] = "a red square moving right with a counter"
    static = np.repeat(moving(1, 128, 128, seed=12), 96, axis=0)
    write_mp4(videos / "static.mp4", static, fps=16)
    captions["static.mp4"] = "a still red square"
    write_mp4(videos / "black.mp4", np.zeros((96, 128, 128, 3), np.uint8), fps=16)
    captions["black.mp4"] = "nothing"
    write_mp4(videos / "short.mp4", moving(60, 128, 128, seed=13), fps=16)  # 60 < 80 frames
    captions["short.mp4"] = "a short clip"
    write_mp4(videos / "tiny_res.mp4", moving(96, 64, 64, seed=14), fps=16)  # below min_side=128
    captions["tiny_res.mp4"] = "a small video"
    write_mp4(videos / "no_caption.mp4", moving(96, 128, 128, seed=15), fps=16)  # not in captions
    good = (videos / "fps25.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(good[: len(good) // 3])
    captions["truncated.mp4"] = "half a file"
    (videos / "empty.mp4").write_bytes(b"")
    captions["empty.mp4"] = "nothing"
    (videos / "text.mp4").write_text("this is not a video\n" * 50)
    captions["text.mp4"] = "a text file"
    (videos / "README.txt").write_text("not a video and not a caption of one")  # ignored (not a video)
    (videos / "beside.mp4").parent.mkdir(exist_ok=True)
    write_mp4(videos / "beside.mp4", moving(96, 128, 128, seed=16, spec=("circle", "green", "down")), fps=16)
    (videos / "beside.txt").write_text("a green circle moving down\n")  # caption next to the video
    with open(root / "captions.jsonl", "w") as f:
        for name, cap in captions.items():
            f.write(json.dumps({"path": name, "caption": cap}) + "\n")

    return {
        # source file -> number of accepted clips
        "clips": {"fps24_wide.mp4": 1, "fps25.mp4": 1, "fps2997.mp4": 1, "fps30_two_clips.mp4": 2,
                  "fps60_hd.mp4": 1, "cut.mp4": 2, "beside.mp4": 1, "timing30.mp4": 1},
        # source file -> reject reasons (sorted)
        "rejects": {"static.mp4": ["static"], "black.mp4": ["black"], "short.mp4": ["too_short"],
                    "tiny_res.mp4": ["too_small"], "no_caption.mp4": ["no_caption"],
                    "truncated.mp4": ["unreadable"], "empty.mp4": ["unreadable"], "text.mp4": ["unreadable"]},
    }
