"""Conditioning of the conditional STUNet (Lumiere §4): the input is ⟨J, C, M⟩, 3 + 3 + 1 = 7 channels.

Axes: b batch, c channels, t frames, h w height/width. Videos are float in [-1, 1]; masks are {0, 1} floats.

    J  the noisy video (what is denoised)
    C  the masked condition video: the known content, zero elsewhere
    M  the binary mask, 1 = known (the model must keep it), 0 = to generate

This module builds ⟨C, M⟩ (b 4 t h w, the channels appended to J) for every task:

    t2v          C = 0, M = 0
    i2v          C = the image on frame 0, blank frames after; M = 1 on frame 0
    inpaint      C = the video outside the region; M = 1 outside the region
    cinemagraph  C = the image repeated on every frame; M = 1 on frame 0 and, on later frames, 1 outside the region
    extend       C = the clip's last k frames placed first, blanks after; M = 1 on those k frames

Regions given by the user are "where to generate / animate" (1 = region), the complement of M. Training samples
condition types at random (`random_training_condition`) so one model serves all tasks.
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat

CONDITION_TYPES = ("none", "first_frame", "prefix_frames", "spatiotemporal_box", "cinemagraph")


def condition(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """⟨C, M⟩ as the 4 channels appended to J: b 3 t h w, b 1 t h w -> b 4 t h w."""
    return torch.cat([c, m.to(c.dtype)], dim=1)


def split_condition(cm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cm[:, :3], cm[:, 3:]


def t2v_condition(b: int, t: int, h: int, w: int, device=None) -> torch.Tensor:
    return torch.zeros(b, 4, t, h, w, device=device)


def i2v_condition(image: torch.Tensor, frames: int) -> torch.Tensor:
    """image b 3 h w -> ⟨C, M⟩ with the image on frame 0 and blank (zero) frames after."""
    b, _, h, w = image.shape
    c = torch.zeros(b, 3, frames, h, w, dtype=image.dtype, device=image.device)
    m = torch.zeros(b, 1, frames, h, w, dtype=image.dtype, device=image.device)
    c[:, :, 0] = image
    m[:, :, 0] = 1
    return condition(c, m)


def _region_video(region: torch.Tensor, frames: int) -> torch.Tensor:
    """A region b h w (every frame) or b t h w -> b 1 t h w in {0, 1}."""
    if region.ndim == 3:
        region = repeat(region, "b h w -> b t h w", t=frames)
    if region.shape[1] != frames:
        raise ValueError(f"the region has {region.shape[1]} frames, the clip {frames}")
    return rearrange((region > 0.5).float(), "b t h w -> b 1 t h w")


def inpaint_condition(video: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """video b 3 t h w, region (b h w or b t h w; 1 = fill) -> C = video outside the region, M = 1 outside."""
    m = 1 - _region_video(region, video.shape[2]).to(video)
    return condition(video * m, m)


def cinemagraph_condition(image: torch.Tensor, region: torch.Tensor, frames: int) -> torch.Tensor:
    """image b 3 h w, region b h w (1 = animate) -> C = the image on every frame; M = 1 on frame 0 and outside
    the region on later frames (the still parts stay the image, the region moves)."""
    c = repeat(image, "b c h w -> b c t h w", t=frames)
    m = 1 - _region_video(region, frames).to(image)
    m[:, :, 0] = 1
    return condition(c, m)


def extend_condition(context: torch.Tensor, frames: int) -> torch.Tensor:
    """context b 3 k h w (the last k frames of a clip) -> a clip of `frames` whose first k frames are known."""
    b, _, k, h, w = context.shape
    if not 0 < k < frames:
        raise ValueError(f"extension needs 1..{frames - 1} context frames for a {frames}-frame clip, got {k}")
    c = torch.zeros(b, 3, frames, h, w, dtype=context.dtype, device=context.device)
    m = torch.zeros(b, 1, frames, h, w, dtype=context.dtype, device=context.device)
    c[:, :, :k] = context
    m[:, :, :k] = 1
    return condition(c, m)


def composite(generated: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
    """Keep the known pixels exactly: M·C + (1 − M)·generated (all b 3 t h w / b 4 t h w)."""
    c, m = split_condition(cm)
    return m * c + (1 - m) * generated


def _random_box(b: int, t: int, h: int, w: int, g: torch.Generator, spatial_only: bool) -> torch.Tensor:
    """A random box per sample (1 inside): b t h w; spans a random frame range unless spatial_only."""
    region = torch.zeros(b, t, h, w)
    for i in range(b):
        bh = int(torch.randint(h // 4, h * 3 // 4 + 1, (1,), generator=g))
        bw = int(torch.randint(w // 4, w * 3 // 4 + 1, (1,), generator=g))
        y = int(torch.randint(0, h - bh + 1, (1,), generator=g))
        x = int(torch.randint(0, w - bw + 1, (1,), generator=g))
        t0, t1 = 0, t
        if not spatial_only:
            t0 = int(torch.randint(0, t, (1,), generator=g))
            t1 = int(torch.randint(t0 + 1, t + 1, (1,), generator=g))
        region[i, t0:t1, y : y + bh, x : x + bw] = 1
    return region


def random_training_condition(
    video: torch.Tensor, generator: torch.Generator, types: tuple[str, ...] = CONDITION_TYPES
) -> torch.Tensor:
    """⟨C, M⟩ for a training batch (b 3 t h w in [-1, 1]), one condition type drawn per sample.

    none: unconditional (keeps text-to-video working); first_frame: i2v; prefix_frames: extension (1..t-1 known
    frames); spatiotemporal_box: inpainting (a box over a frame range); cinemagraph: frame 0 repeated, a box
    animated. Train towards `composite(video, cm)`: identical to the video for every type but cinemagraph,
    where it is the clip frozen outside the animated box — so known pixels always agree with the target.
    """
    b, _, t, h, w = video.shape
    out = torch.zeros(b, 4, t, h, w, dtype=video.dtype, device=video.device)
    picks = torch.randint(0, len(types), (b,), generator=generator)
    for i in range(b):
        kind, v = types[int(picks[i])], video[i : i + 1]
        if kind == "none":
            continue
        if kind == "first_frame":
            cm = i2v_condition(v[:, :, 0], t)
        elif kind == "prefix_frames":
            k = int(torch.randint(1, t, (1,), generator=generator)) if t > 1 else 1
            cm = extend_condition(v[:, :, :k], t) if t > 1 else i2v_condition(v[:, :, 0], t)
        elif kind == "spatiotemporal_box":
            cm = inpaint_condition(v, _random_box(1, t, h, w, generator, spatial_only=False).to(v))
        elif kind == "cinemagraph":
            cm = cinemagraph_condition(v[:, :, 0], _random_box(1, 1, h, w, generator, True)[:, 0].to(v), t)
        else:
            raise ValueError(f"unknown condition type {kind!r}; choose from {', '.join(CONDITION_TYPES)}")
        out[i] = cm[0]
    return out
