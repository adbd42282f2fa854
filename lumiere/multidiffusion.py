"""MultiDiffusion over time (Bar-Tal et al. 2023; Lumiere §3.2): run a video model on overlapping temporal
windows and reconcile their predictions at every denoising step.

Axes: b batch, c channels, t frames, h w height/width; `L` is the window length.

At each step every window i predicts Φ(J_i) for its frames; the fused prediction is the least-squares solution

    argmin_J Σ_i || W_i ⊙ (J − Φ(J_i)) ||²   =>   J[f] = Σ_i W_i[f] Φ(J_i)[f] / Σ_i W_i[f]

i.e. a per-frame (weighted) average over the windows covering frame f. Uniform weights are the paper's choice;
"ramp" weights fade each window in and out over its overlap. Windows advance by L − overlap; the last window is
placed to end exactly at the last frame, so any clip length works. With one window covering the clip this is
exactly one pass of the model.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat

Weighting = Literal["uniform", "ramp"]


def temporal_windows(frames: int, length: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end)) windows of `length` frames overlapping by at least `overlap`, covering 0..frames."""
    if frames < 1 or length < 1:
        raise ValueError(f"need frames >= 1 and window length >= 1, got {frames} and {length}")
    if length >= frames:
        return [(0, frames)]
    if not 0 <= overlap < length:
        raise ValueError(f"window overlap must be in 0..{length - 1} for windows of {length} frames, got {overlap}")
    starts = list(range(0, frames - length + 1, length - overlap))
    if starts[-1] + length < frames:
        starts.append(frames - length)  # the last window ends at the last frame
    return [(s, s + length) for s in starts]


def window_weights(length: int, overlap: int, weighting: Weighting = "uniform") -> torch.Tensor:
    """Per-frame weight of a window (L,): ones, or a linear fade over `overlap` frames at both ends."""
    if weighting == "uniform" or overlap == 0:
        return torch.ones(length)
    if weighting == "ramp":
        i = torch.arange(length, dtype=torch.float32)
        return torch.minimum(torch.minimum((i + 1) / (overlap + 1), (length - i) / (overlap + 1)), torch.ones(1))
    raise ValueError(f"unknown weighting {weighting!r}; choose uniform or ramp")


def fusion_weights(windows: list[tuple[int, int]], frames: int, overlap: int,
                   weighting: Weighting = "uniform") -> list[torch.Tensor]:
    """Each window's normalised per-frame weights; over the windows covering a frame they sum to one."""
    raw = [window_weights(e - s, overlap, weighting) for s, e in windows]
    total = torch.zeros(frames)
    for (s, e), w in zip(windows, raw, strict=True):
        total[s:e] += w
    if (total <= 0).any():
        raise ValueError(f"frames {torch.nonzero(total <= 0).flatten().tolist()} are not covered by any window")
    return [w / total[s:e] for (s, e), w in zip(windows, raw, strict=True)]


def fuse(predictions: list[torch.Tensor], windows: list[tuple[int, int]], frames: int, overlap: int = 0,
         weighting: Weighting = "uniform") -> torch.Tensor:
    """Least-squares reconciliation of per-window predictions (each b c L h w) into one b c t h w."""
    weights = fusion_weights(windows, frames, overlap, weighting)
    b, c, _, h, w = predictions[0].shape
    out = predictions[0].new_zeros(b, c, frames, h, w)
    for pred, (s, e), wt in zip(predictions, windows, weights, strict=True):
        out[:, :, s:e] += pred * rearrange(wt.to(pred), "t -> 1 1 t 1 1")
    return out


class MultiDiffusion:
    """A denoiser over any clip length built from a model over `length`-frame windows.

    Called like the model, (x b c t h w, timesteps (b), context (b l d), pooled (b e)) -> b c' t h w, so the
    plain samplers in `diffusion.py` run it unchanged; the condition channels appended to x are windowed with
    it. Windows are batched `windows_per_call` at a time (all by default).
    """

    def __init__(self, model, length: int, overlap: int, weighting: Weighting = "uniform",
                 windows_per_call: int | None = None):
        self.model, self.length, self.overlap, self.weighting = model, length, overlap, weighting
        self.windows_per_call = windows_per_call

    def windows(self, frames: int) -> list[tuple[int, int]]:
        return temporal_windows(frames, self.length, self.overlap)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.shape[2]
        wins = self.windows(frames)
        per_call = self.windows_per_call or len(wins)
        preds: list[torch.Tensor] = []
        for k in range(0, len(wins), per_call):
            group = wins[k : k + per_call]
            n = len(group)
            xs = rearrange(torch.stack([x[:, :, s:e] for s, e in group]), "n b c t h w -> (n b) c t h w")
            out = self.model(
                xs,
                repeat(timesteps, "b -> (n b)", n=n),
                repeat(context, "b l d -> (n b) l d", n=n),
                None if pooled is None else repeat(pooled, "b e -> (n b) e", n=n),
            )
            preds.extend(rearrange(out, "(n b) c t h w -> n b c t h w", n=n).unbind(0))
        return fuse(preds, wins, frames, self.overlap, self.weighting)
