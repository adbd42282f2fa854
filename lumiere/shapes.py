"""The moving-shapes demo corpus: small, captioned, learnable videos the project makes itself.

One or two coloured shapes (circle, square, triangle) move steadily left/right/up/down across a
dark background; the caption says exactly that ("a red square moving right"). The corpus is
what the demo ingests and trains on, and ``analyse_clip`` is how tests and the quality benchmark
check a video (real or generated) against its caption: right colour, right direction, smooth.

Frames are numpy uint8 ``(t, h, w, c)`` RGB throughout; coordinates are image coordinates
(x to the right, y down), in pixels.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from einops import reduce

from lumiere.video import write_mp4

# Saturated but not extreme: pure 255/0 primaries lose more to yuv420p chroma rounding.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (230, 210, 30),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# unit steps in image coordinates (x right, y down)
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

_SUPERSAMPLE = 4  # sub-pixel samples per axis: cheap anti-aliasing, so sub-pixel motion is visible


@dataclass(frozen=True)
class ShapeSpec:
    """One shape in a clip: what it is, its colour and where it moves."""

    shape: str
    color: str
    direction: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; expected one of {tuple(DIRECTIONS)}")


def caption(specs: ShapeSpec | Sequence[ShapeSpec]) -> str:
    """'a red square moving right' (one shape) or '... and a blue circle moving up' (two)."""
    if isinstance(specs, ShapeSpec):
        specs = [specs]
    if not specs:
        raise ValueError("caption needs at least one ShapeSpec")
    return " and ".join(f"a {s.color} {s.shape} moving {s.direction}" for s in specs)


def parse_caption(text: str) -> list[ShapeSpec]:
    """Inverse of ``caption``; raises ValueError on anything outside the corpus vocabulary."""
    specs = []
    for part in text.strip().lower().split(" and "):
        words = part.split()
        if len(words) != 5 or words[0] != "a" or words[3] != "moving":
            raise ValueError(
                f"cannot parse {part!r} in caption {text!r}: expected 'a <color> <shape> moving <direction>'"
            )
        _, color, shape, _, direction = words
        specs.append(ShapeSpec(shape=shape, color=color, direction=direction))  # validates the words
    return specs


def _coverage(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Fraction (h, w) in [0, 1] of each pixel covered by the shape centred at (cx, cy)."""
    ss = _SUPERSAMPLE
    # sample points at sub-pixel centres; pixel i spans [i, i+1)
    coords = (np.arange(size * ss) + 0.5) / ss
    x, y = coords[None, :], coords[:, None]
    r = side / 2
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "triangle":
        # pointing up: apex (cx, cy-r), base from (cx-r, cy+r) to (cx+r, cy+r); three half-planes
        top = cy - r
        inside = (y <= cy + r) & (y - top >= 2 * (x - cx)) & (y - top >= -2 * (x - cx))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return reduce(inside.astype(np.float32), "(h a) (w b) -> h w", "mean", a=ss, b=ss)


def _track(
    direction: str, frames: int, size: int, side: float, rng: np.random.Generator, bounce: bool
) -> np.ndarray:
    """Centre positions (t, 2) as (x, y) for one shape moving steadily in ``direction``."""
    dx, dy = DIRECTIONS[direction]
    lo, hi = side / 2, size - side / 2  # centre range that keeps the whole shape in frame
    travel = rng.uniform(0.4, 0.6) * size  # total displacement over the clip
    t = np.arange(frames) / max(frames - 1, 1)
    if bounce:
        start = rng.uniform(lo, hi, size=2)
    else:
        # start far enough from the far edge that the whole path stays in frame
        start = rng.uniform(lo, hi, size=2)
        for axis, d in ((0, dx), (1, dy)):
            if d > 0:
                start[axis] = rng.uniform(lo, max(lo, hi - travel))
            elif d < 0:
                start[axis] = rng.uniform(min(hi, lo + travel), hi)
    pos = start[None, :] + travel * t[:, None] * np.array([dx, dy], dtype=np.float64)[None, :]
    if bounce:
        # reflect at the borders: fold the unbounded path into [lo, hi]
        span = hi - lo
        u = np.mod(pos - lo, 2 * span)
        pos = lo + np.where(u <= span, u, 2 * span - u)
    return pos


def render_clip(
    specs: ShapeSpec | Sequence[ShapeSpec],
    frames: int,
    size: int,
    rng: np.random.Generator,
    bounce: bool = False,
) -> np.ndarray:
    """Render shapes moving over a dark background; returns uint8 frames (t, h, w, c), h = w = size.

    Each shape (side ~size/4) travels 0.4-0.6 x size over the clip; without ``bounce`` its
    start is chosen so it stays in frame, with ``bounce`` it starts anywhere and reflects.
    Later specs are drawn on top of earlier ones.
    """
    if isinstance(specs, ShapeSpec):
        specs = [specs]
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got frames={frames}, size={size}")
    side = size / 4
    grey = float(rng.integers(0, 24))  # slightly varied dark grey, so the model cannot rely on pure black
    video = np.full((frames, size, size, 3), grey, dtype=np.float32)
    for spec in specs:
        color = np.asarray(COLORS[spec.color], dtype=np.float32)
        track = _track(spec.direction, frames, size, side, rng, bounce)
        for i, (cx, cy) in enumerate(track):
            alpha = _coverage(spec.shape, cx, cy, side, size)[..., None]  # (h, w, 1)
            video[i] = video[i] * (1 - alpha) + color * alpha
    return np.clip(np.round(video), 0, 255).astype(np.uint8)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write text to path via temp file + os.replace, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def make_corpus(
    out_dir: str | os.PathLike,
    count: int,
    frames: int = 80,
    size: int = 64,
    fps: float = 16,
    seed: int = 0,
    two_shape_prob: float = 0.0,
    bounce: bool = False,
) -> list[dict]:
    """Write ``count`` clips to out_dir/videos/shape_{i:05d}.mp4 and their captions to out_dir/captions.jsonl.

    Each captions.jsonl line is ``{"path": "videos/shape_00000.mp4", "caption": "..."}`` with the
    path relative to out_dir. The same seed gives the same captions and pixels. Returns the records.
    """
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # balanced: walk through every (color, shape, direction) combination in a fresh random
    # order per block, so a corpus of N*60 clips has each combination exactly N times
    combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    order: list[int] = []
    while len(order) < count:
        order.extend(rng.permutation(len(combos)).tolist())

    records = []
    for i in range(count):
        color, shape, direction = combos[order[i]]
        specs = [ShapeSpec(shape, color, direction)]
        if rng.random() < two_shape_prob:
            # a second shape in a different colour, so the caption stays unambiguous
            other = [c for c in COLORS if c != color]
            specs.append(
                ShapeSpec(
                    str(rng.choice(SHAPES)),
                    str(rng.choice(other)),
                    str(rng.choice(list(DIRECTIONS))),
                )
            )
        # per-clip generator: a clip's pixels depend only on (seed, i), not on earlier clips' draws
        clip = render_clip(specs, frames, size, np.random.default_rng([seed, i]), bounce=bounce)
        rel = f"videos/shape_{i:05d}.mp4"
        write_mp4(out_dir / rel, clip, fps=fps)
        records.append({"path": rel, "caption": caption(specs)})

    _atomic_write_text(out_dir / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return records


def analyse_clip(frames: np.ndarray, background_threshold: float = 40) -> dict:
    """Measure what a clip (t, h, w, c) uint8 shows: colour, motion direction, smoothness, stability.

    Foreground = pixels whose RGB distance from the background (median of frame 0's border
    pixels) exceeds ``background_threshold``. Reliable for single-shape clips. Returns:

    - ``dominant_color``: COLORS name nearest to the mean colour of the solid foreground pixels
      (those at least half as far from the background as the strongest ones; this drops the
      anti-aliased / chroma-blurred rim, which would pull e.g. yellow towards green), or None;
    - ``centroids``: (t, 2) array of foreground centroids (x, y), each pixel weighted by its distance
      from the background, NaN where a frame has none;
    - ``displacement``: (dx, dy) net motion from a least-squares line through the centroid track
      (robust to single-frame jitter; equals last - first for steady motion);
    - ``direction``: DIRECTIONS name best aligned with the displacement, None if it is < 1 px;
    - ``smoothness``: mean |second difference| of the centroid track in px (0 = constant speed);
    - ``area_cv``: coefficient of variation of the foreground area across frames (0 = stable shape);
    - ``areas``: (t,) foreground pixel count per frame; ``background``: estimated RGB background.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (t, h, w, 3), got {frames.shape}")
    x = frames.astype(np.float32)
    t, h, w, _ = x.shape

    f0 = x[0]
    border = np.concatenate([f0[0], f0[-1], f0[1:-1, 0], f0[1:-1, -1]], axis=0)  # (n, c)
    background = np.median(border, axis=0)
    dist = np.linalg.norm(x - background, axis=-1)  # (t, h, w)
    mask = dist > background_threshold
    areas = mask.sum(axis=(1, 2)).astype(np.float64)

    dominant = None
    if mask.any():
        fg_dist = dist[mask]
        solid = mask & (dist >= 0.5 * np.percentile(fg_dist, 95))
        mean_color = x[solid].mean(axis=0)
        names = list(COLORS)
        palette = np.asarray([COLORS[n] for n in names], dtype=np.float32)
        dominant = names[int(np.argmin(np.linalg.norm(palette - mean_color, axis=1)))]

    # weight foreground pixels by their distance from the background: anti-aliased and
    # chroma-blurred rim pixels count partially, which gives sub-pixel centroids (a binary
    # mask makes the track jump whole pixels and looks ~3x less smooth than it is)
    weight = np.where(mask, dist, 0.0).astype(np.float64)
    total = weight.sum(axis=(1, 2))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight * xs).sum(axis=(1, 2)) / total
        cy = (weight * ys).sum(axis=(1, 2)) / total
    centroids = np.stack([cx, cy], axis=1)  # NaN where areas == 0

    valid = np.flatnonzero(~np.isnan(centroids[:, 0]))
    displacement = (0.0, 0.0)
    if len(valid) >= 2:
        tt = valid.astype(np.float64)
        slope = np.polyfit(tt, centroids[valid], 1)[0]  # (2,) px per frame for x and y
        displacement = tuple(float(v) for v in slope * (tt[-1] - tt[0]))
    direction = None
    if np.hypot(*displacement) >= 1.0:
        dirs = list(DIRECTIONS)
        scores = [np.dot(displacement, DIRECTIONS[d]) for d in dirs]
        direction = dirs[int(np.argmax(scores))]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN tracks give NaN, not a warning
        second = centroids[2:] - 2 * centroids[1:-1] + centroids[:-2]
        smoothness = float(np.nanmean(np.linalg.norm(second, axis=1))) if t >= 3 else float("nan")
        area_cv = float(areas.std() / areas.mean()) if areas.mean() > 0 else float("nan")

    return {
        "dominant_color": dominant,
        "centroids": centroids,
        "direction": direction,
        "displacement": displacement,
        "smoothness": smoothness,
        "area_cv": area_cv,
        "areas": areas,
        "background": background,
    }
