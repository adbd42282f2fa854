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


def scene(frames: int, height: int, width: int, seed: int, flip: bool = False) -> np.ndarray:
    """A textured 'camera shot': a smooth random colour field panning steadily, with a bright disc moving across
    it (t h w c uint8). `flip`: the same field mirrored left-right and upside down, so two shots with the same
    seed have the same colour histogram but a different picture (a cut a histogram detector cannot see)."""
    rng = np.random.default_rng(seed)
    big_h, big_w = height + frames * 4 + 8, width + frames * 4 + 8
    coarse = rng.uniform(0, 255, (big_h // 16 + 2, big_w // 16 + 2, 3)).astype(np.float32)
    field = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:big_h, :big_w]
    for axis in (0, 1):  # box blur: smooth blobs of colour instead of 16-pixel squares
        field = sum(np.roll(field, s, axis=axis) for s in range(-8, 8)) / 16
    if flip:
        field = field[::-1, ::-1]
    dy, dx = rng.choice([-2, -1, 1, 2], size=2)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.8) * width
    vy, vx = rng.uniform(-1.5, 1.5, size=2)
    yy, xx = np.mgrid[:height, :width]
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        oy, ox = 2 * frames + 4 + dy * t, 2 * frames + 4 + dx * t
        frame = field[oy:oy + height, ox:ox + width].copy()
        disc = (yy - (cy + vy * t)) ** 2 + (xx - (cx + vx * t)) ** 2 < (min(height, width) / 8) ** 2
        frame[disc] = 235
        out[t] = frame.clip(0, 255).astype(np.uint8)
    return out


def transitions_video(shot_frames: int, transitions: list[str], height: int = 72, width: int = 128,
                      transition_frames: int = 12, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Shots of `shot_frames` frames joined by `transitions` ("cut", "same_palette_cut", "fade" through black,
    "dissolve"): returns (video, [first, last] frame ranges of every transition, inclusive). A cut's range is
    its last old and first new frame; a fade's and a dissolve's are the `transition_frames` mixed frames."""
    shots, shot_seed, flip = [scene(shot_frames, height, width, seed)], seed, False
    for kind in transitions:
        if kind == "same_palette_cut":  # the previous shot's colour field, mirrored: the same histogram
            flip = not flip
        else:
            shot_seed, flip = shot_seed + 1, False
        shots.append(scene(shot_frames, height, width, shot_seed, flip=flip))
    video, spans = [shots[0]], []
    n = shot_frames
    for kind, shot in zip(transitions, shots[1:], strict=True):
        if kind in ("cut", "same_palette_cut"):
            spans.append((n - 1, n))
            video.append(shot)
            n += len(shot)
            continue
        prev_last, nxt = video[-1][-1].astype(np.float32), shot
        k = transition_frames
        w = (np.arange(k, dtype=np.float32) + 1) / (k + 1)
        if kind == "dissolve":
            mixed = [(1 - a) * prev_last + a * nxt[0].astype(np.float32) for a in w]
        elif kind == "fade":
            mixed = [prev_last * max(0.0, 1 - 2 * a) + nxt[0].astype(np.float32) * max(0.0, 2 * a - 1) for a in w]
        else:
            raise ValueError(kind)
        video.append(np.stack(mixed).clip(0, 255).astype(np.uint8))
        spans.append((n, n + k - 1))
        video.append(shot)
        n += k + len(shot)
    return np.concatenate(video), spans
